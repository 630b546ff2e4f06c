"""Where the files of `ozone run` live: on this machine when the VM's host is this machine,
else on that host, in ozone's pools there, reached through libvirt alone (:mod:`.hostfiles`).

On this machine (unchanged): a run's overlays in its folder (:mod:`.rundir`), a boot cache
slot's state and overlays in the slot's folder (:mod:`.cache`). On another host:

- the config's inputs are copied there first, as `ozone define` copies them
  (:mod:`.hostpaths`): ISOs, kernels, seeds, and every disk a run puts an overlay over (a
  base disk is read, never written: it goes where read-only inputs go, named by content);
- a run's overlays: ``/var/lib/ozone/runs/RUN-diskN.qcow2``, RUN the name of the run's
  folder here, which keeps the bookkeeping (lock, ``owner.json`` naming the host and these
  files, each recorded before it is made, so a run that dies is reaped there);
- a slot's saved state and overlays: ``/var/lib/ozone/cache/KEY-slotN.save`` and
  ``KEY-slotN-diskM.qcow2`` (libvirt's save writes on the daemon's host already);
- a one-off domain's serial log: ``/var/lib/ozone/logs/NAME-serial.log``, deleted with the
  run. (libvirt's own QEMU log of that domain, in the host's /var/log/libvirt/qemu, is
  outside ozone's pools and stays, as libvirt keeps it for every domain.)

The cache key of a remote run names the host (its UUID), this cache (:func:`.cache.cache_id`)
and the host's files by what the host tells of them: a file copied there by content carries
its digest in its name; any other, its sizes and mtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import libvirt

from .cache import Slot, cache_id, file_identity, make_dir, volume_identity
from .config import Disk
from .connection import call, host_uuid, is_local
from .errors import OzoneError
from .hostpaths import CACHE_DIR, FILES_DIR, RUNS_DIR
from .rundir import RunDir, one_off_log, remove_host_file
from .storage import create_disk, parse_label

if TYPE_CHECKING:
    from .config import VMConfig
    from .domain_xml import HostFacts
    from .images import Resolved

Kind = Literal["as-is", "overlay", "blank"]
Report = Callable[[str], None]

# what a throwaway VM's state also depends on, on this machine
_HOST_BINARIES = (Path("/usr/share/seabios/bios-256k.bin"), Path("/usr/bin/qemu-system-x86_64"))


def disk_kinds(config: VMConfig) -> list[Kind]:
    """What a run does with each disk of ``config`` (paths of this machine): reads a
    read-only one in place, puts an overlay over one that exists, makes a blank one."""
    kinds: list[Kind] = []
    for disk in config.disks:
        if disk.readonly:
            kinds.append("as-is")
        elif disk.path.exists():
            kinds.append("overlay")
        elif disk.size is not None:  # nothing to protect: a blank disk of that size
            kinds.append("blank")
        else:
            raise OzoneError(f"disk {disk.path} does not exist and has no size to create it")
    return kinds


class LocalFiles:
    """The VM's host is this machine: files in the run's and the slot's folders."""

    remote = False

    def __init__(self, conn: libvirt.virConnect, facts: HostFacts) -> None:
        self.conn = conn
        self.owner = parse_label(facts.qemu_label)  # a throwaway VM is never relabelled

    def bring(
        self, config: VMConfig, resolved: Resolved, kinds: list[Kind], report: Report
    ) -> VMConfig:
        return config

    def key_parts(self, config: VMConfig) -> dict[str, Any]:
        files = [config.cdrom, config.kernel, config.initrd]
        files += [p for d in config.disks for p in (d.path, d.backing)]
        files += _HOST_BINARIES
        return {"files": {str(p): _identity(p) for p in files if p is not None}}

    def run_disk(self, run_dir: RunDir, index: int) -> Path:
        return run_dir.path / f"disk{index}.qcow2"

    def overlay(self, target: Path, *, backing: Path, size: int | None = None) -> None:
        create_disk(Disk(path=target, backing=backing, size=size), owner=self.owner)

    def blank(self, target: Path, size: int) -> None:
        create_disk(Disk(path=target, size=size), owner=self.owner)

    def identity(self, path: Path) -> str:
        return file_identity(path)

    def empty_slot(self, slot: Slot) -> None:
        shutil.rmtree(slot.dir / "disks", ignore_errors=True)
        for stale in (slot.state, slot.meta, slot.dir / "state.save.part"):
            stale.unlink(missing_ok=True)
        make_dir(slot.dir / "disks")

    def save(self, dom: libvirt.virDomain, slot: Slot) -> None:
        partial = slot.dir / "state.save.part"
        call(dom.save, str(partial), name=slot.domain_name)  # the transient domain ends here
        partial.rename(slot.state)

    def drop_overlays(self, run_dir: RunDir) -> None:
        for overlay in run_dir.overlays():
            overlay.unlink()

    def discard(self, run_dir: RunDir, name: str | None) -> None:
        if name is not None and "-run-" in name:  # a one-off name: its logs would pile up
            for log in (f"{name}-serial.log", f"{name}.log"):
                with contextlib.suppress(OSError):
                    (Path("/var/log/libvirt/qemu") / log).unlink()
        shutil.rmtree(run_dir.path, ignore_errors=True)

    def where(self, run_dir: RunDir) -> str:
        return str(run_dir.path)


def _identity(path: Path) -> str:
    """What a file is, for the key: its size, mtime and inode; a cloud-init seed, whose name
    is the hash of its content and whose mtime ozone refreshes while it is in use, by name."""
    from .images import is_seed

    if is_seed(path):
        return f"content {path.name}"
    return file_identity(path)


class HostFiles(LocalFiles):
    """The VM's host is another machine: files there, through libvirt."""

    remote = True
    there: frozenset[Path] = frozenset()  # the config's files the host keeps (used in place)

    def bring(
        self, config: VMConfig, resolved: Resolved, kinds: list[Kind], report: Report
    ) -> VMConfig:
        """Copy the config's inputs to the host (each once) and give the config its paths
        there. A disk the run puts an overlay over is copied as a read-only input."""
        from . import hostfiles
        from .hostpaths import place

        if config.shares:
            raise OzoneError(
                f"{config.name} shares folders of this machine, which a VM on "
                f"{hostfiles.host_name(self.conn)} cannot reach",
                hint="run it on this machine (-c qemu:///system), or without shares",
            )
        as_inputs = [
            dataclasses.replace(d, readonly=True) if kind == "overlay" else d
            for d, kind in zip(config.disks, kinds, strict=True)
        ]
        from .vm import kept_there

        inputs = dataclasses.replace(config, disks=tuple(as_inputs))
        there = kept_there(self.conn, resolved, inputs)
        host_paths = place(inputs, resolved, digest=hostfiles.file_digest, there=there)
        self.there = there
        for folder in (RUNS_DIR, CACHE_DIR):  # QEMU enters them, nobody lists them
            hostfiles.ensure_pool(self.conn, folder, mode="0711")
        hostfiles.bring_inputs(self.conn, host_paths, resolved, qemu=self.owner, report=report)
        disks = tuple(
            d if kind == "blank" else dataclasses.replace(placed, readonly=d.readonly)
            for d, placed, kind in zip(config.disks, host_paths.config.disks, kinds, strict=True)
        )
        return dataclasses.replace(host_paths.config, disks=disks)

    def key_parts(self, config: VMConfig) -> dict[str, Any]:
        files = [config.cdrom, config.kernel, config.initrd]
        files += [p for d in config.disks for p in (d.path, d.backing)]
        held = {
            str(p): self._identity(p)
            for p in files
            if p is not None and (p.is_relative_to(Path("/var/lib/ozone")) or p in self.there)
        }
        return {"host": host_uuid(self.conn), "cache": cache_id(), "files": held}

    def _identity(self, path: Path) -> str:
        if path.parent == FILES_DIR:  # named by its content
            return f"content {path.name}"
        return self.identity(path)

    def run_disk(self, run_dir: RunDir, index: int) -> Path:
        return run_dir.expect_volume(RUNS_DIR / f"{run_dir.path.name}-disk{index}.qcow2")

    def overlay(self, target: Path, *, backing: Path, size: int | None = None) -> None:
        from . import hostfiles

        base = hostfiles.info(self.conn, backing)
        if base is None:
            raise OzoneError(f"{backing} is gone from {hostfiles.host_name(self.conn)}")
        hostfiles.create(
            self.conn,
            target,
            capacity=max(size or 0, base.capacity),
            backing=backing,
            backing_format=base.format,
            owner=self.owner,
        )

    def blank(self, target: Path, size: int) -> None:
        from . import hostfiles

        hostfiles.create(self.conn, target, capacity=size, owner=self.owner)

    def identity(self, path: Path) -> str:
        return volume_identity(self.conn, path)

    def empty_slot(self, slot: Slot) -> None:
        from .cache import host_volumes

        slot.meta.unlink(missing_ok=True)  # first: the slot holds nothing from here on
        for stale in host_volumes(self.conn, slot.entry.name, slot.index):
            remove_host_file(self.conn, stale)

    def save(self, dom: libvirt.virDomain, slot: Slot) -> None:
        # no rename through libvirt: the slot's slot.json, written after, says it is whole
        call(dom.save, str(slot.state), name=slot.domain_name)

    def drop_overlays(self, run_dir: RunDir) -> None:
        made = run_dir.volumes()
        for path in made:
            remove_host_file(self.conn, path)
        run_dir.forget_volumes(made)

    def discard(self, run_dir: RunDir, name: str | None) -> None:
        """Delete the run's files on the host; the folder goes when they are gone (else a
        later reap deletes what is left)."""
        files = run_dir.volumes()
        log = one_off_log(name) if name is not None else None
        gone = True
        for path in [*files, *([log] if log is not None else [])]:
            try:
                remove_host_file(self.conn, path)
            except OzoneError:
                gone = gone and path == log  # a log left behind is no reason to keep the run
        if gone:
            shutil.rmtree(run_dir.path, ignore_errors=True)

    def where(self, run_dir: RunDir) -> str:
        from .hostfiles import host_name

        return f"{RUNS_DIR}/{run_dir.path.name}-* on {host_name(self.conn)}"


def files_for(conn: libvirt.virConnect, facts: HostFacts) -> LocalFiles:
    """Where a run on ``conn``'s host keeps its files."""
    return LocalFiles(conn, facts) if is_local(conn) else HostFiles(conn, facts)
