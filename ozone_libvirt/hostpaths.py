"""Where a VM's files go on a host that is not this machine (pure: no libvirt, no writes).

A config names files of this machine: its disks (relative to the config's folder), an ISO,
a kernel, backing images, and the image store's base image and cloud-init seed. On another
host those paths mean nothing, so each becomes a volume in one of ozone's pools there
(:mod:`.hostfiles`):

- a writable disk with a ``size`` is made there, empty (or as an overlay over its backing
  image), as ``/var/lib/ozone/vms/NAME-FILE``; one without a size is a prepared image, copied
  from this machine once;
- the boot overlay over a store image stays in the store: ``/var/lib/ozone/images/NAME.root.qcow2``;
- the store's base images, kernels and seeds keep their names (they say what they hold) in
  ``/var/lib/ozone/images``;
- every other read-only file (an ISO, a kernel, a backing image, a read-only disk) is copied
  once to ``/var/lib/ozone/files/STEM-DIGEST.EXT``, named by its content, and shared by every
  VM that uses the same file.

The same config always gives the same paths, so ``ozone apply`` compares what a define
would write with what the host holds, and a migrated VM finds its files at the same paths
on every host ozone put them on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .config import Disk, VMConfig
    from .images import Resolved

OZONE_DIR = Path("/var/lib/ozone")
VMS_DIR = OZONE_DIR / "vms"  # disks of VMs whose config lives on another machine
FILES_DIR = OZONE_DIR / "files"  # read-only inputs from this machine (ISOs, kernels, images)
LOGS_DIR = OZONE_DIR / "logs"  # serial logs, read back through libvirt
IMAGES_DIR = OZONE_DIR / "images"  # the image store there (images.SYSTEM_STORE)
RUNS_DIR = OZONE_DIR / "runs"  # overlays of `ozone run` (:mod:`.runhost`)
CACHE_DIR = OZONE_DIR / "cache"  # the boot cache's saved states and their overlays
POOLS = {  # ozone's pools on a host, by their folder (images.POOL is the store's)
    VMS_DIR: "ozone-vms",
    FILES_DIR: "ozone-files",
    LOGS_DIR: "ozone-logs",
    IMAGES_DIR: "ozone-images",
    RUNS_DIR: "ozone-runs",
    CACHE_DIR: "ozone-cache",
}


@dataclass(frozen=True)
class Transfer:
    """One file the host must hold before the domain is defined."""

    kind: Literal["upload", "create", "seed"]
    target: Path  # on the host
    where: str  # the config's field, for messages: "disks[0]", "cdrom"
    source: Path | None = None  # upload: the file of this machine
    capacity: int | None = None  # create: the disk's size
    format: str = "qcow2"
    backing: Path | None = None  # create: an overlay over this (a path on the host)
    mode: str = "0400"  # (uploads belong to QEMU's user there: see hostfiles.bring_inputs)


@dataclass(frozen=True)
class HostPaths:
    config: VMConfig  # the config with the host's paths
    transfers: tuple[Transfer, ...]
    # the path on the host of each file of the config (by its path here)
    paths: dict[Path, Path] = dataclasses.field(default_factory=dict)


def place(
    config: VMConfig,
    resolved: Resolved | None,
    *,
    digest: Callable[[Path], str],
    there: frozenset[Path] = frozenset(),
) -> HostPaths:
    """The host's paths for ``config`` (already resolved by :func:`.images.resolve`:
    ``resolved`` says which files are the store's) and what must be copied or made there.
    ``digest``: a short digest of a file of this machine. ``there``: files the config names
    that are not on this machine but on that host (an ISO kept there): used where they are.
    """
    store = _store_of(resolved)
    paths: dict[Path, Path] = {path: path for path in there}
    transfers: list[Transfer] = []

    def read_only(path: Path, where: str) -> Path:
        """A read-only input, copied once."""
        if path in paths:
            return paths[path]
        if store is not None and path.parent == store:
            target = IMAGES_DIR / path.name  # the store's own names say what they hold
            mode = "0444"
        else:  # a user's file, which may be private: QEMU's there, and root's
            target = FILES_DIR / f"{path.stem}-{digest(path)}{path.suffix}"
            mode = "0400"
        paths[path] = target
        if resolved is not None and path == resolved.seed:
            transfers.append(Transfer("seed", target, where, mode="0400"))
        else:
            transfers.append(Transfer("upload", target, where, source=path, mode=mode))
        return target

    disks: list[Disk] = []
    overlay = config.disks[0] if resolved is not None and resolved.ref is not None else None
    for i, disk in enumerate(config.disks):
        where = f"disks[{i}]"
        backing = read_only(disk.backing, f"{where}.backing") if disk.backing else None
        if disk.readonly or disk.path in there:
            target = read_only(disk.path, where)
        else:  # the store's boot overlay stays in the store; other disks go to ozone's pool
            target = (
                IMAGES_DIR / disk.path.name
                if disk is overlay
                else VMS_DIR / f"{config.name}-{disk.path.name}"
            )
            transfers.append(_writable(disk, target, where, backing, made=disk is overlay))
        paths[disk.path] = target
        disks.append(dataclasses.replace(disk, path=target, backing=backing))
    cdrom, kernel, initrd = (
        read_only(path, field) if path is not None else None
        for path, field in (
            (config.cdrom, "cdrom"),
            (config.kernel, "kernel"),
            (config.initrd, "initrd"),
        )
    )
    config = dataclasses.replace(
        config, disks=tuple(disks), cdrom=cdrom, kernel=kernel, initrd=initrd
    )
    if store is not None and resolved is not None and resolved.ref is not None:
        # what made the image, last (as in the store here): `ozone image list` there reads it
        meta = resolved.ref.meta(store)
        transfers.append(Transfer("upload", IMAGES_DIR / meta.name, "image", source=meta))
    return HostPaths(config, tuple(transfers), paths)


def inputs_not_here(config: VMConfig, resolved: Resolved | None) -> list[Path]:
    """The files of ``config`` that must exist but are not on this machine (not the store's,
    which ozone makes): a define would fail on them, unless the VM's host has them."""
    store = _store_of(resolved)
    wanted = [config.cdrom, config.kernel, config.initrd]
    for disk in config.disks:
        wanted.append(disk.backing)
        if disk.readonly or (disk.size is None and disk.backing is None):
            wanted.append(disk.path)
    return [
        path
        for path in dict.fromkeys(wanted)
        if path is not None and (store is None or path.parent != store) and not path.exists()
    ]


def _writable(
    disk: Disk, target: Path, where: str, backing: Path | None, *, made: bool
) -> Transfer:
    """A writable disk there: an image the user prepared (no size, no backing image) is
    copied once; any other is made there, empty or over its backing image (whose format
    :func:`.hostfiles.make_disks` reads from the image)."""
    if not made and disk.size is None and disk.backing is None:
        return Transfer("upload", target, where, source=disk.path, mode="0600")
    return Transfer(
        "create", target, where, capacity=disk.size, format=disk.format, backing=backing,
        mode="0600",
    )  # fmt: skip


def _store_of(resolved: Resolved | None) -> Path | None:
    if resolved is None:
        return None
    made = resolved.base or resolved.seed
    return made.parent if made is not None else None
