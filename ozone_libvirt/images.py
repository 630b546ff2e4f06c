"""Images, pure part: what a config's ``image`` and ``cloud_init`` are called in ozone's image
store and how a config with them resolves to disks, kernel and seed. No libvirt, no writes
(:func:`resolve` reads the invoking user's ssh keys and a ``user_data`` file);
:mod:`.imagestore` makes what is named here exist.

The store is one folder, also a libvirt storage pool. A base image is immutable (0444) and
named by what made it: ``debian-SUITE-HASH`` for a build spec (with the builder's version),
``STEM-HASH`` for a URL and its checksum. Its files sit side by side: ``ID.qcow2`` (and for
Debian builds ``ID.vmlinuz``, ``ID.initrd``, booted directly) and ``ID.json``, written last,
which says what made it. Each VM boots from ``NAME.root.qcow2``, an overlay over its base;
cloud-init seeds are ``seed-HASH.iso``, named by their content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import cloudinit
from .config import Disk, Image, VMConfig
from .state import state_dir

Report = Callable[[str], None]
Progress = Callable[[int, int | None], None]

SYSTEM_STORE = Path("/var/lib/ozone/images")
POOL = "ozone-images"
BUILDER = Path(__file__).parent / "data" / "build-debian-image"
DEBIAN_CMDLINE = "root=/dev/vda rw console=ttyS0"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# Part of every built image's name. Raise it when the builder makes a different image for the
# same spec, and only then: a VM's boot disk stays an overlay over the image it was made on,
# so a new name means existing VMs must be made again before they can be redefined.
BUILDER_VERSION = 1


def store_dir() -> Path:
    """``$OZONE_IMAGE_DIR``, else /var/lib/ozone/images (root) or STATE/images."""
    if os.environ.get("OZONE_IMAGE_DIR"):
        return Path(os.environ["OZONE_IMAGE_DIR"]).absolute()
    return SYSTEM_STORE if os.geteuid() == 0 else state_dir() / "images"


def pool_name(store: Path) -> str:
    """ozone-images for the default store; another folder gets a pool of its own."""
    if store == SYSTEM_STORE:
        return POOL
    return f"{POOL}-{hashlib.sha256(str(store).encode()).hexdigest()[:8]}"


# --- naming (pure) -----------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """A base image as the store names it."""

    id: str
    spec: dict[str, Any]  # what made it (JSON data)

    @property
    def debian(self) -> bool:
        return "debian" in self.spec

    def files(self, store: Path) -> list[Path]:
        kernel = [self.kernel(store), self.initrd(store)] if self.debian else []
        return [self.disk(store), *kernel]

    def disk(self, store: Path) -> Path:
        return store / f"{self.id}.qcow2"

    def kernel(self, store: Path) -> Path:  # Debian builds: booted directly
        return store / f"{self.id}.vmlinuz"

    def initrd(self, store: Path) -> Path:
        return store / f"{self.id}.initrd"

    def meta(self, store: Path) -> Path:
        return store / f"{self.id}.json"


def _digest(spec: dict[str, Any]) -> str:
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def image_ref(image: Image, *, cloud_init: bool) -> ImageRef:
    """The store's name for ``image`` (a Debian build also depends on whether it carries
    cloud-init, and on the builder's version)."""
    if image.debian:
        spec: dict[str, Any] = {
            "debian": image.debian,
            "packages": sorted(image.packages),
            "mirror": image.mirror or DEBIAN_MIRROR,
            "cloud_init": cloud_init,
            "builder": BUILDER_VERSION,
        }
        return ImageRef(f"debian-{image.debian}-{_digest(spec)}", spec)
    assert image.url is not None
    spec = {"url": image.url}
    for key in ("sha256", "sha512", "checksum_url"):
        if getattr(image, key):
            spec[key] = getattr(image, key)
    if image.name:
        spec["name"] = image.name
    digest = _digest({k: v for k, v in spec.items() if k != "name"})
    return ImageRef(f"{_stem(image.url)}-{digest}", spec)


def _stem(url: str) -> str:
    """``debian-12-genericcloud-amd64`` for ``https://…/debian-12-genericcloud-amd64.qcow2``."""
    base = Path(urlsplit(url).path).name
    for suffix in (".qcow2", ".img", ".raw", ".xz", ".gz"):
        base = base.removesuffix(suffix)
    clean = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "-" for c in base)
    return clean.strip(".-")[:48] or "image"


def is_seed(path: Path) -> bool:
    """A cloud-init seed of the image store (named by the hash of its content)."""
    name = path.name
    return (
        path.parent == store_dir()
        and name.startswith("seed-")
        and name.endswith(".iso")
        and len(name) == 25
        and all(c in "0123456789abcdef" for c in name[5:21])
    )


def seed_path(store: Path, files: dict[str, bytes]) -> Path:
    return store / f"seed-{cloudinit.files_digest(files)[:16]}.iso"


@dataclass(frozen=True)
class Resolved:
    """A config with its image made concrete."""

    config: VMConfig  # disks, kernel, initrd, cmdline filled in
    ref: ImageRef | None
    base: Path | None
    seed: Path | None
    seed_files: dict[str, bytes] | None


def resolve(
    config: VMConfig,
    *,
    store: Path | None = None,
    for_run: bool = False,
    vm_key: str | None = None,
) -> Resolved:
    """``config`` with its ``image`` and ``cloud_init`` turned into disks: the boot disk (an
    overlay ``NAME.root.qcow2`` in the store over the base image; for ``ozone run`` the base
    itself, which the run puts its own overlay over), the config's other disks, and the
    cloud-init seed (read-only; ``vm_key``: the VM's own public ssh key, which it authorises).
    A Debian build boots its own kernel unless the config names one. A config without either
    comes back unchanged."""
    if config.image is None and config.cloud_init is None:
        return Resolved(config, None, None, None, None)
    store = store or store_dir()
    changes: dict[str, Any] = {}
    disks = list(config.disks)
    ref = base = None
    if config.image is not None:
        ref = image_ref(config.image, cloud_init=config.cloud_init is not None)
        base = ref.disk(store)
        if for_run:
            root = Disk(path=base, size=config.image.size)
        else:
            root = Disk(
                path=store / f"{config.name}.root.qcow2", backing=base, size=config.image.size
            )
        disks.insert(0, root)
        if ref.debian and config.kernel is None:
            changes.update(
                kernel=ref.kernel(store),
                initrd=ref.initrd(store),
                cmdline=config.cmdline or DEBIAN_CMDLINE,
            )
    seed = files = None
    # a downloaded cloud image lacks the agent: the seed installs it
    install_agent = ref is not None and not ref.debian
    if config.uses_cloud_init:
        files = cloudinit.seed_files(
            config,
            default_keys=cloudinit.default_ssh_keys(),
            install_agent=install_agent,
            user_data=cloudinit.read_user_data(config),
            vm_key=vm_key,
        )
        seed = seed_path(store, files)
        disks.append(Disk(path=seed, format="raw", readonly=True))
    if not config.boot and config.kernel is None and "kernel" not in changes:
        changes["boot"] = ("disk",)
    resolved = dataclasses.replace(config, disks=tuple(disks), **changes)
    return Resolved(resolved, ref, base, seed, files)
