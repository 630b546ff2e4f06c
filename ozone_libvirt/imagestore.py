"""The image store, side effects: the libvirt pool, VMs' boot overlays (libvirt volumes),
building images from Debian packages (the builder in ``data/``), pulling them from URLs
(:mod:`.download`), seeds, ``image list/rm``, and what dead builds and pulls left for `ozone
gc`. Names come from :mod:`.images`.

Building or pulling one image takes its lock (in ozone's state folder), so two commands
asking for the same image at once make it once; a build works in ``.build-ID-*`` and a
failed one leaves nothing in the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
from lxml import etree
from lxml.builder import E

from . import cloudinit
from .config import Disk, VMConfig
from .connection import call, find_pool, is_local, libvirt_errors
from .errors import ConfigError, ConflictError, NotFoundError, OzoneError, UsageError
from .images import (
    BUILDER,
    SYSTEM_STORE,
    ImageRef,
    Progress,
    Report,
    Resolved,
    image_ref,
    pool_name,
    store_dir,
)
from .state import state_dir

# --- the pool ------------------------------------------------------------------------------


def ensure_pool(conn: libvirt.virConnect, store: Path) -> libvirt.virStoragePool:
    """The store's storage pool, defined (autostarted) and started when it is not."""
    from .state import host_lock

    with host_lock("pool"):  # two commands must not both define or start it
        return _ensure_pool(conn, store)


def _ensure_pool(conn: libvirt.virConnect, store: Path) -> libvirt.virStoragePool:
    name = pool_name(store)
    pool = find_pool(conn, name)
    if pool is None:
        store.mkdir(parents=True, exist_ok=True, mode=0o755)
        xml = E.pool(
            E.name(name),
            E.target(E.path(str(store)), E.permissions(E.mode("0755"))),
            type="dir",
        )
        pool = call(conn.storagePoolDefineXML, etree.tostring(xml, encoding="unicode"), 0)
        call(pool.setAutostart, 1)
    target = etree.fromstring(call(pool.XMLDesc, 0).encode()).findtext("target/path")
    if target is None or Path(target) != store:
        raise ConflictError(
            f"libvirt's storage pool {name} is the folder {target}, not the image store {store}",
            hint=f"`virsh pool-destroy {name}; virsh pool-undefine {name}`: ozone defines it again",
        )
    if not call(pool.isActive):
        store.mkdir(parents=True, exist_ok=True, mode=0o755)
        call(pool.create, 0)
    else:
        call(pool.refresh, 0)
    return pool


def refresh(conn: libvirt.virConnect, store: Path) -> None:
    pool = find_pool(conn, pool_name(store))
    if pool is not None and call(pool.isActive):
        call(pool.refresh, 0)


def create_overlay(
    conn: libvirt.virConnect, store: Path, path: Path, backing: Path, size: int | None
) -> None:
    """The VM's boot disk, through libvirt (``vol-create``): a qcow2 over ``backing``, mode
    0600 (libvirt gives QEMU access while the VM runs)."""
    from .storage import image_info

    info = image_info(backing)
    virtual = int(info.get("virtual-size", 0))  # type: ignore[call-overload]
    if size is not None and size < virtual:
        raise ConfigError(
            f"a {size >> 20} MiB disk is smaller than its image ({virtual >> 20} MiB)",
            field="image.size",
            hint="give at least the image's size, or leave size out",
        )
    pool = ensure_pool(conn, store)
    xml = E.volume(
        E.name(path.name),
        E.capacity(str(size or virtual), unit="bytes"),
        E.target(E.format(type="qcow2"), E.compat("1.1"), E.permissions(E.mode("0600"))),
        E.backingStore(E.path(str(backing)), E.format(type=str(info.get("format", "qcow2")))),
    )
    call(pool.createXML, etree.tostring(xml, encoding="unicode"), 0)


def check_overlay(config: VMConfig, overlay: Disk) -> int | None:
    """An existing boot disk of a VM being defined again must be an overlay over the image
    the config names (its data would be garbage over another one), and no bigger than the
    config's ``size`` (disks do not shrink). Checked before any image is built or pulled.
    Returns the disk's size when the config gives one (for :func:`grow_overlay`)."""
    from .storage import backing_file_of, image_info

    if not overlay.path.exists():
        return None
    file = str(config.source) if config.source else None
    current = backing_file_of(overlay.path)
    if current != overlay.backing:
        raise ConflictError(
            f"{config.name}'s boot disk {overlay.path} is an overlay over "
            f"{current.name if current else 'no image'}, and the config now names "
            f"{overlay.backing.name if overlay.backing else 'none'}: a disk cannot change "
            "its image",
            hint=f"keep the old image spec, or `ozone undefine {config.name} --remove-storage` "
            f"(its disk's data goes) and define it again{f' from {file}' if file else ''}",
        )
    if overlay.size is None:
        return None
    virtual: int = int(image_info(overlay.path).get("virtual-size", 0))  # type: ignore[call-overload]
    if overlay.size < virtual:
        raise ConfigError(
            f"the boot disk is {virtual >> 20} MiB and disks do not shrink",
            file=file,
            field="image.size",
            hint=f"give at least {virtual >> 30} GiB",
        )
    return virtual


def grow_overlay(
    conn: libvirt.virConnect,
    config: VMConfig,
    overlay: Disk,
    virtual: int | None,
    *,
    running: bool,
) -> str | None:
    """Grow an existing boot disk of ``virtual`` bytes (as :func:`check_overlay` found it;
    None: no disk yet, or no size asked) to the config's bigger ``size`` while the VM is off.
    Returns a note for the user, or None."""
    if overlay.size is None or virtual is None or overlay.size == virtual:
        return None
    if running:
        size = overlay.size >> 20
        return f"the boot disk grows to {size} MiB when {config.name} is off and defined again"
    vol = call(conn.storageVolLookupByPath, str(overlay.path))
    mib = overlay.size >> 20

    def explain(err: libvirt.libvirtError) -> OzoneError:
        detail = (err.get_error_message() or "").rsplit(": ", 1)[-1]
        return OzoneError(
            f"cannot grow {config.name}'s boot disk to {mib} MiB: {detail}",
            hint="nothing was changed; keep the old size",
        )

    with libvirt_errors(name=config.name, explain=explain):
        vol.resize(overlay.size, 0)
    return f"grew the boot disk to {mib} MiB (the file system grows at boot)"


# --- making images -------------------------------------------------------------------------


def _lock_name(store: Path, image_id: str) -> str:
    """The host lock (in ozone's state folder: the store holds only images) that one build
    or pull of an image at a time holds."""
    return f"image-{hashlib.sha256(str(store).encode()).hexdigest()[:8]}-{image_id}"


@contextlib.contextmanager
def _image_lock(store: Path, image_id: str, report: Report = lambda _t: None) -> Iterator[None]:
    """One build or pull of an image at a time; ``report`` hears when another command
    holds it."""
    from .state import host_lock

    store.mkdir(parents=True, exist_ok=True, mode=0o755)
    with host_lock(
        _lock_name(store, image_id),
        report=lambda _t: report(f"waiting for another ozone making {image_id}"),
    ):
        yield


def present(ref: ImageRef, store: Path) -> bool:
    return ref.meta(store).is_file() and all(p.is_file() for p in ref.files(store))


def _install(ref: ImageRef, store: Path, made: dict[Path, Path], facts: dict[str, Any]) -> None:
    """Move the made files into the store, read-only, and write the JSON last (an image
    exists when its JSON does; on a failure, nothing of it stays). The JSON is readable by
    everyone: a URL's user and password are not in it."""
    from .download import show_url

    spec = dict(ref.spec)
    for key in ("url", "checksum_url"):
        if key in spec:
            spec[key] = show_url(spec[key], width=4096)
    meta = {"id": ref.id, "spec": spec, "created": time.time(), **facts}
    part = ref.meta(store).with_name(f".{ref.id}.json.part")
    try:
        for source, target in made.items():
            source.chmod(0o444)
            os.replace(source, target)
        part.write_text(json.dumps(meta, indent=2) + "\n")
        part.chmod(0o444)
        os.replace(part, ref.meta(store))
    except OSError as err:
        for target in (*made.values(), part):
            target.unlink(missing_ok=True)
        raise OzoneError(f"cannot store image {ref.id} in {store}: {err.strerror}") from None


def build(ref: ImageRef, store: Path, *, report: Report = lambda _t: None) -> bool:
    """Build a Debian image (unless it is there): True when it was built now."""
    if not ref.debian:
        raise OzoneError(f"{ref.id} is downloaded, not built")
    if os.geteuid() != 0:
        raise OzoneError(
            "building an image needs root (mmdebstrap builds the root file system as root)",
            hint="run `sudo ozone image build CONFIG`",
        )
    with _image_lock(store, ref.id, report):
        if present(ref, store):
            return False
        _sweep(store, ref.id)
        work = Path(_mkdtemp(store, f".build-{ref.id}-"))
        log_path = _log_path(ref.id)
        began = time.monotonic()
        try:
            env = {
                **os.environ,
                "OZONE_BUILD_OUT": str(work),
                "OZONE_BUILD_SUITE": ref.spec["debian"],
                "OZONE_BUILD_MIRROR": ref.spec["mirror"],
                "OZONE_BUILD_PACKAGES": " ".join(ref.spec["packages"]),
                "OZONE_BUILD_CLOUD_INIT": "1" if ref.spec["cloud_init"] else "0",
                "OZONE_BUILD_NETWORK": "1",
                "OZONE_BUILD_HOSTNAME": "debian",
                "OZONE_BUILD_STAMP": "0",
            }
            env.pop("OZONE_BUILD_USERS", None)
            _run_builder(env, log_path, report)
            made = {
                work / "debian.qcow2": ref.disk(store),
                work / "vmlinuz": ref.kernel(store),
                work / "initrd.img": ref.initrd(store),
            }
            _install(ref, store, made, {"seconds": round(time.monotonic() - began, 1)})
        finally:
            shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            log_path.unlink()
    return True


def _mkdtemp(store: Path, prefix: str) -> str:
    import tempfile

    path = tempfile.mkdtemp(prefix=prefix, dir=store)
    os.chmod(path, 0o755)
    return path


def _log_path(image_id: str) -> Path:
    folder = state_dir() / "logs"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder / f"build-{image_id}.log"


def _run_builder(env: dict[str, str], log_path: Path, report: Report) -> None:
    last = ""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as log:
        proc = subprocess.Popen(
            ["bash", str(BUILDER)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                text = line.strip()
                if text.startswith("build-debian-image: "):
                    last = text.removeprefix("build-debian-image: ")
                    report(last)
            code = proc.wait()
        except BaseException:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            raise
    if code != 0:
        reason = last.removeprefix("error: ") if last.startswith("error: ") else f"exit {code}"
        raise OzoneError(
            f"building the image failed: {reason}", hint=f"the whole log is in {log_path}"
        )


def _leftovers(store: Path, image_id: str) -> list[Path]:
    """The work folders of builds and the files of pulls of exactly this image."""
    found = []
    for prefix in (f".build-{image_id}-", f".pull-{image_id}-"):
        for left in store.glob(prefix + "*"):
            tail = left.name[len(prefix) :].removesuffix(".qcow2")
            if tail and "-" not in tail:  # not another image whose id starts like this one
                found.append(left)
    return found


def _sweep(store: Path, image_id: str) -> None:
    """Remove what a killed build or pull of this image left (we hold its lock)."""
    for left in _leftovers(store, image_id):
        if left.is_dir() and not left.is_symlink():
            _unmount_below(left)
            shutil.rmtree(left, ignore_errors=True)
        else:
            left.unlink(missing_ok=True)


def _unmount_below(folder: Path) -> None:
    """Unmount what a killed mmdebstrap left mounted in its chroot (/proc, /sys, /dev)."""
    prefix = str(folder) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if len(line.split()) > 1]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def pull(
    ref: ImageRef,
    store: Path,
    *,
    report: Report = lambda _t: None,
    progress: Progress | None = None,
    stall_timeout: float | None = None,
) -> bool:
    """Download, verify and store an image (unless it is there): True when pulled now. A
    server that sends nothing for ``stall_timeout`` seconds ($OZONE_STALL_TIMEOUT, 30) ends
    the download; the next pull resumes it."""
    from . import download
    from .storage import image_info

    with _image_lock(store, ref.id, report):
        if present(ref, store):
            return False
        _sweep(store, ref.id)
        url = ref.spec["url"]
        shown = download.show_url(url)
        checksum = download.resolve_checksum(
            url,
            sha256=ref.spec.get("sha256"),
            sha512=ref.spec.get("sha512"),
            checksum_url=ref.spec.get("checksum_url"),
        )
        from .state import private_dir

        partial_dir = private_dir(state_dir() / "downloads")
        partial = partial_dir / f"{ref.id}.part"
        fetched = store / f".pull-{ref.id}-{os.getpid()}"
        began = time.monotonic()
        report(f"downloading {shown}")
        try:
            download.download(
                url,
                fetched,
                checksum=checksum,
                partial=partial,
                progress=progress,
                stall_timeout=stall_timeout or _stall_timeout(),
            )
            seconds = time.monotonic() - began
            size = fetched.stat().st_size
            info = image_info(fetched)
            fmt = str(info.get("format"))
            if info.get("backing-filename") or info.get("full-backing-filename"):
                raise OzoneError(f"{shown} is a qcow2 overlay (it names a backing file): refused")
            specific = info.get("format-specific")
            data = specific.get("data", {}) if isinstance(specific, dict) else {}
            if isinstance(data, dict) and data.get("data-file"):
                # QEMU would open that host file read-write as the VM's data
                raise OzoneError(f"{shown} names an external data file: refused")
            if fmt == "raw":
                report("converting the raw image to qcow2")
                converted = fetched.with_name(fetched.name + ".qcow2")
                _qemu_img_convert(fetched, converted)
                fetched.unlink()
                fetched = converted
            elif fmt != "qcow2":
                raise OzoneError(f"{shown} is a {fmt} image; ozone takes qcow2 or raw images")
            facts = {
                "checksum": str(checksum),
                "bytes": size,
                "seconds": round(seconds, 2),
                "format": fmt,
            }
            _install(ref, store, {fetched: ref.disk(store)}, facts)
        finally:
            fetched.unlink(missing_ok=True)
    return True


def _stall_timeout() -> float:
    """$OZONE_STALL_TIMEOUT (seconds, > 0), else 30."""
    try:
        value = float(os.environ.get("OZONE_STALL_TIMEOUT", "30"))
    except ValueError:
        return 30.0
    return value if 0 < value < 86400 else 30.0


def _qemu_img_convert(source: Path, target: Path) -> None:
    proc = subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(source), str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        target.unlink(missing_ok=True)
        raise OzoneError(f"qemu-img convert failed: {proc.stderr.strip()[:200]}")


def obtain(
    ref: ImageRef,
    store: Path,
    *,
    report: Report = lambda _t: None,
    progress: Progress | None = None,
) -> bool:
    """Build or pull ``ref`` unless the store has it."""
    if present(ref, store):
        return False
    if ref.debian:
        return build(ref, store, report=report)
    return pull(ref, store, report=report, progress=progress)


# --- making a config's files exist --------------------------------------------------------


def ensure(
    conn: libvirt.virConnect,
    resolved: Resolved,
    *,
    report: Report = lambda _t: None,
    progress: Progress | None = None,
    local: bool = True,
) -> list[Path]:
    """Make the base image and the seed that ``resolved`` names (the boot overlay is made by
    define, with the other disks). Returns the files made now. Not ``local``: the VM's host
    is another machine; the image is made in this machine's store, to be copied there (the
    seed is made there: :func:`.hostfiles.bring_inputs`)."""
    if resolved.ref is None and resolved.seed is None:
        return []
    store = (resolved.base or resolved.seed or store_dir()).parent
    if not local:
        if resolved.ref is None:
            return []
        try:
            made = obtain(resolved.ref, store, report=report, progress=progress)
        except OSError as err:
            raise OzoneError(
                f"{err.filename or store}: {err.strerror}", hint=f"the image store is {store}"
            ) from None
        return [resolved.base or store] if made else []
    check_store_host(conn)
    try:
        return _ensure(conn, resolved, store, report=report, progress=progress)
    except OSError as err:
        raise OzoneError(
            f"{err.filename or store}: {err.strerror}", hint=f"the image store is {store}"
        ) from None


def check_store_host(conn: libvirt.virConnect) -> None:
    """The store is a folder of this host, which QEMU of the system daemon must read."""
    if not is_local(conn):
        raise OzoneError(
            "images and cloud-init seeds are made on this host only for now; "
            "this VM's host is another machine",
            hint="define it on its own host, or without image/cloud_init",
        )
    if os.geteuid() != 0 and not conn.getURI().startswith("qemu:///session"):
        raise OzoneError(
            f"VMs with an image or cloud_init on {conn.getURI()} need root: the image store "
            f"{SYSTEM_STORE} and its pool are root's",
            hint="run ozone with sudo (or use qemu:///session, with a store of your own)",
        )


def _ensure(
    conn: libvirt.virConnect,
    resolved: Resolved,
    store: Path,
    *,
    report: Report,
    progress: Progress | None,
) -> list[Path]:
    made: list[Path] = []
    if resolved.ref is not None and obtain(resolved.ref, store, report=report, progress=progress):
        made.append(resolved.base or store)
    seed, files = resolved.seed, resolved.seed_files
    if seed is not None and files is not None:
        from .connection import host_facts
        from .state import host_lock
        from .storage import parse_label

        qemu = parse_label(host_facts(conn).qemu_label)
        with host_lock("define"):  # `ozone gc` removes unused seeds under this lock
            if write_seed(seed, files, owner=qemu):
                made.append(seed)
    ensure_pool(conn, store)
    return made


def write_seed(path: Path, files: dict[str, bytes], *, owner: tuple[int, int] | None) -> bool:
    """The seed ISO at ``path`` (content-addressed: an existing one is the same, and is
    touched, so that `ozone gc` sees it in use). A seed may hold secrets (write_files,
    user_data): mode 0400, owned by QEMU's user (``owner``), so that QEMU and root read it
    and no other user of the host does (not even QEMU's group, often ``kvm``)."""
    if path.is_file():
        with contextlib.suppress(OSError):
            os.utime(path)
        return False
    data = cloudinit.make_iso(files)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    try:
        with os.fdopen(fd, "wb") as handle:
            if owner is not None:
                os.fchown(handle.fileno(), owner[0], owner[1])
            handle.write(data)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return True


# --- list / rm -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    id: str
    source: str
    bytes: int  # on disk
    used_by: tuple[str, ...]
    created: float
    path: str


def _source_text(spec: dict[str, Any]) -> str:
    if "debian" in spec:
        packages = spec.get("packages") or []
        extra = f" +{len(packages)} packages" if packages else ""
        ci = " +cloud-init" if spec.get("cloud_init") else ""
        return f"debian {spec['debian']}{extra}{ci}"
    return str(spec.get("name") or spec.get("url"))


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("spec"), dict) else None


def stored(store: Path) -> list[tuple[ImageRef, dict[str, Any]]]:
    """The store's images, each with what its JSON says."""
    found = []
    for meta_path in sorted(store.glob("*.json")):
        meta = _read_meta(meta_path)
        if meta and meta.get("id") == meta_path.stem:
            found.append((ImageRef(meta_path.stem, meta["spec"]), meta))
    return found


def stored_there(conn: libvirt.virConnect) -> list[tuple[ImageRef, dict[str, Any]]]:
    """:func:`stored` for the store of another host (read through libvirt)."""
    from . import hostfiles
    from .hostpaths import IMAGES_DIR

    pool = hostfiles.ensure_pool(conn, IMAGES_DIR)
    found = []
    for name in sorted(call(pool.listVolumes)):
        if not name.endswith(".json"):
            continue
        with contextlib.suppress(ValueError, UnicodeDecodeError, NotFoundError):
            meta = json.loads(hostfiles.download(conn, IMAGES_DIR / name))
            whose = isinstance(meta, dict) and meta.get("id") == name.removesuffix(".json")
            if whose and isinstance(meta.get("spec"), dict):
                found.append((ImageRef(meta["id"], meta["spec"]), meta))
    return found


def list_images(conn: libvirt.virConnect, store: Path | None = None) -> list[ImageInfo]:
    """The images of the VM host's store (this machine's, or another host's through
    libvirt), with the VMs that use each."""
    from .vm import neighbours

    local = is_local(conn)
    if local:
        store = store or store_dir()
        images = stored(store)
    else:
        from . import hostfiles
        from .hostpaths import IMAGES_DIR

        store, images = IMAGES_DIR, stored_there(conn)
    around = neighbours(conn, local=local)
    infos = []
    for ref, meta in images:
        size = 0
        for path in ref.files(store):
            if local:
                with contextlib.suppress(OSError):
                    size += path.stat().st_blocks * 512
            elif (held := hostfiles.info(conn, path)) is not None:
                size += held.allocation
        users = sorted({u.split(" (")[0] for u in around.uses(ref.disk(store))})
        infos.append(
            ImageInfo(
                id=ref.id,
                source=_source_text(ref.spec),
                bytes=size,
                used_by=tuple(users),
                created=_number(meta.get("created")),
                path=str(ref.disk(store)),
            )
        )
    return infos


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


def find_image(name: str, store: Path, refs: list[ImageRef] | None = None) -> ImageRef:
    """An image by its id, a unique prefix of it, or its catalogue name (among ``refs``:
    another host's; else the store's)."""
    refs = refs if refs is not None else [ref for ref, _meta in stored(store)]
    exact = [r for r in refs if r.id == name or r.spec.get("name") == name]
    # a prefix names an image only when it is a real part of the id (not "", not "d")
    found = exact or [r for r in refs if len(name) >= 4 and r.id.startswith(name)]
    if not found:
        raise NotFoundError(f"no image {name!r} in {store}", hint="`ozone image list` shows them")
    if len(found) > 1:
        raise ConflictError(
            f"{name!r} names {len(found)} images: " + ", ".join(r.id for r in found),
            hint="give the whole id",
        )
    return found[0]


def remove_image(conn: libvirt.virConnect, name: str, store: Path | None = None) -> list[str]:
    """Delete a base image no VM uses (as a backing image or a disk, defined or running);
    boot cache entries built on it go with it. Returns the files removed."""
    from .cache import clear_cache, list_cache
    from .state import host_lock
    from .vm import neighbours

    if not is_local(conn):
        return _remove_image_there(conn, name)
    store = store or store_dir()
    ref = find_image(name, store)
    with host_lock("define"), _image_lock(store, ref.id):
        users = neighbours(conn, local=is_local(conn)).uses(ref.disk(store))
        if users:
            raise ConflictError(
                f"image {ref.id} is used by VM " + ", ".join(users) + ": nothing was removed",
                hint="undefine those VMs first (`ozone undefine NAME --remove-storage` "
                "removes a VM's overlay, never its image)",
            )
        disk = str(ref.disk(store))
        cached = {entry.key for entry in list_cache() if disk in entry.files}
        if cached and len(clear_cache(conn, keys=cached)) < len(cached):
            raise ConflictError(
                f"image {ref.id} is under a boot cache entry whose VM still runs (kept with "
                "`ozone run --keep`): nothing was removed",
                hint="stop that VM first",
            )
        removed = []
        ref.meta(store).unlink(missing_ok=True)  # first: the image is gone from here on
        for path in ref.files(store):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(str(path))
    refresh(conn, store)
    return removed


def _remove_image_there(conn: libvirt.virConnect, name: str) -> list[str]:
    """:func:`remove_image` in another host's store, through libvirt. (Boot cache entries
    there that were built on it cannot restore any more: a run then boots.)"""
    from . import hostfiles
    from .hostpaths import IMAGES_DIR
    from .state import host_lock
    from .vm import neighbours

    where = f"{IMAGES_DIR} on {hostfiles.host_name(conn)}"
    ref = find_image(name, Path(where), [ref for ref, _meta in stored_there(conn)])
    with host_lock("define"):
        users = neighbours(conn, local=False).uses(ref.disk(IMAGES_DIR))
        if users:
            raise ConflictError(
                f"image {ref.id} is used by VM " + ", ".join(users) + ": nothing was removed",
                hint="undefine those VMs first (`ozone undefine NAME --remove-storage` "
                "removes a VM's overlay, never its image)",
            )
        removed = []
        for path in [ref.meta(IMAGES_DIR), *ref.files(IMAGES_DIR)]:  # its JSON first
            if hostfiles.delete(conn, path) and path.suffix != ".json":
                removed.append(str(path))
    return removed


# --- the commands --------------------------------------------------------------------------


@dataclass(frozen=True)
class ObtainResult:
    id: str
    path: str
    made: bool  # False: the store had it
    seconds: float


def build_config_image(
    conn: libvirt.virConnect, config: VMConfig, *, report: Report = lambda _t: None
) -> ObtainResult:
    """``ozone image build CONFIG``: the image a config's ``image: {debian: ...}`` names."""
    if config.image is None or not config.image.debian:
        raise ConfigError(
            "has no image built from packages",
            file=str(config.source) if config.source else None,
            field="image",
            hint='add e.g. "image": {"debian": "bookworm"}; `ozone image pull` downloads images',
        )
    return _obtain_timed(
        conn, image_ref(config.image, cloud_init=config.cloud_init is not None), report=report
    )


def pull_image(
    conn: libvirt.virConnect,
    source: str,
    *,
    sha256: str | None = None,
    sha512: str | None = None,
    checksum_url: str | None = None,
    report: Report = lambda _t: None,
    progress: Progress | None = None,
) -> ObtainResult:
    """``ozone image pull URL|NAME``: a catalogue name, or a URL with one checksum option."""
    from .catalogue import CATALOGUE
    from .config import parse_config

    image: dict[str, Any]
    if "://" not in source:
        if source not in CATALOGUE:
            raise UsageError(
                f"{source!r} is neither a URL nor an image name ozone knows",
                hint="names: " + ", ".join(CATALOGUE),
            )
        if sha256 or sha512 or checksum_url:
            raise UsageError(f"{source} comes from the catalogue, which gives its checksum")
        image = {"name": source}
    else:
        image = {"url": source}
        for key, value in (("sha256", sha256), ("sha512", sha512), ("checksum_url", checksum_url)):
            if value:
                image[key] = value
        if len(image) != 2:
            raise UsageError(
                "give exactly one of --sha256, --sha512 or --checksum-url",
                hint="ozone verifies every download before it enters the image store",
            )
    try:  # the same checks as the config key
        spec = parse_config({"name": "pull", "image": image}).image
    except ConfigError as err:
        option = {"image.url": "URL", "image": "URL"}.get(
            err.field or "", f"--{(err.field or '').removeprefix('image.').replace('_', '-')}"
        )
        raise UsageError(f"{option}: {err.message.split(': ', 1)[-1]}", hint=err.hint) from None
    assert spec is not None
    return _obtain_timed(conn, image_ref(spec, cloud_init=False), report=report, progress=progress)


def _obtain_timed(
    conn: libvirt.virConnect,
    ref: ImageRef,
    *,
    report: Report,
    progress: Progress | None = None,
) -> ObtainResult:
    check_store_host(conn)
    store = store_dir()
    began = time.monotonic()
    made = obtain(ref, store, report=report, progress=progress)
    ensure_pool(conn, store)
    return ObtainResult(ref.id, str(ref.disk(store)), made, round(time.monotonic() - began, 2))


# --- what dead commands left ---------------------------------------------------------------

SEED_GRACE = 600  # seconds: a seed this young may belong to a define still under way


def _age(path: Path, now: float) -> float:
    try:
        return now - path.lstat().st_mtime
    except OSError:
        return 0.0


def store_debris(conn: libvirt.virConnect, *, dry_run: bool = False) -> list[str]:
    """For `ozone gc`: half-made images of builds and pulls that died, downloads left
    unfinished for a day, and cloud-init seeds that no VM and no boot cache entry uses
    (seeds are made again when needed; one used in the last 10 minutes stays)."""
    from .cache import list_cache
    from .state import host_lock, host_lock_if_free
    from .vm import neighbours

    if not is_local(conn):
        return _debris_there(conn, dry_run=dry_run)
    store = store_dir()
    if not store.is_dir():
        return []
    removed = []
    work = [*store.glob(".build-*-*"), *store.glob(".pull-*-*")]
    ids = {left.name.split("-", 1)[1].rsplit("-", 1)[0] for left in work}
    for image_id in sorted(ids):
        with host_lock_if_free(_lock_name(store, image_id)) as free:
            left = _leftovers(store, image_id)
            if free and left:
                removed += [str(p) for p in left]
                if not dry_run:
                    _sweep(store, image_id)
    now = time.time()
    for partial in sorted((state_dir() / "downloads").glob("*.part")):
        with host_lock_if_free(_lock_name(store, partial.stem)) as free:
            if free and _age(partial, now) > 86400:
                removed.append(str(partial))
                if not dry_run:
                    partial.unlink(missing_ok=True)
    with host_lock("define"):  # a define picks its seed under this lock too
        seeds = [p for p in store.glob("seed-*.iso") if _age(p, now) > SEED_GRACE]
        seeds += [p for p in store.glob(".seed-*.part") if _age(p, now) > 60]
        if seeds:
            around = neighbours(conn, local=is_local(conn))
            cached = {f for entry in list_cache() for f in entry.files}
            for seed in seeds:
                if around.uses(seed) or str(seed) in cached:
                    continue
                removed.append(str(seed))
                if not dry_run:
                    seed.unlink(missing_ok=True)
    if removed and not dry_run:
        refresh(conn, store)
    return removed


def _debris_there(conn: libvirt.virConnect, *, dry_run: bool) -> list[str]:
    """:func:`store_debris` on another host: the copies ozone made there of this machine's
    files (ISOs, kernels, backing images) and its seeds, that no VM there uses and that were
    not made in the last 10 minutes. (Copies are named by their content: a define that
    needs one again copies it again. This machine's defines hold the define lock; one run
    from another machine at the same moment may find a copy gone, and fails.)"""
    from . import hostfiles
    from .hostpaths import FILES_DIR, IMAGES_DIR
    from .state import host_lock
    from .vm import neighbours

    removed = []
    now = time.time()
    with host_lock("define"):
        around = neighbours(conn, local=False)
        for folder, pattern in ((FILES_DIR, "*"), (IMAGES_DIR, "seed-*.iso")):
            pool = hostfiles.started_pool(conn, folder)
            for name in sorted(call(pool.listVolumes)) if pool is not None else []:
                path = folder / name
                held = hostfiles.info(conn, path)
                fresh = held is None or now - held.mtime < SEED_GRACE
                if fresh or not Path(name).match(pattern) or around.uses(path):
                    continue
                removed.append(f"{path} on {hostfiles.host_name(conn)}")
                if not dry_run:
                    hostfiles.delete(conn, path)
    return removed
