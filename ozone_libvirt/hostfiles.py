"""Files on the VM's host, through libvirt's storage API alone: the same calls reach
``qemu:///system`` and ``qemu+ssh://rack2/system``, so nothing here touches this machine's file
system for a file of that host.

A file of the host is a volume of a storage pool: ozone's own pools (:data:`POOLS`, folders
under /var/lib/ozone), or a pool that already covers the file's folder, or one ozone defines
for it (``ozone-dir-HASH``). Volumes are made with ``vol-create`` (empty disks, overlays over a
backing image) or filled from this machine with a libvirt stream (``vol-upload``), and read
back with ``vol-download``.

An upload starts from an empty volume that grows as the data arrives, so a copy cut short
(a killed ozone, a dropped connection) is shorter than what it should hold: :func:`upload`
finds it by its size and makes it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import libvirt
from lxml import etree
from lxml.builder import E

from .connection import best_effort, call, if_exists, libvirt_errors
from .errors import ConflictError, OzoneError
from .hostpaths import LOGS_DIR, POOLS

if TYPE_CHECKING:
    from .hostpaths import HostPaths, Transfer
    from .images import Resolved

Progress = Callable[[int, int | None], None]

CHUNK = 1 << 20


def host_name(conn: libvirt.virConnect) -> str:
    """The host as people call it in messages: the URI's host part, else the URI."""
    uri: str = call(conn.getURI)
    rest = uri.partition("://")[2]
    return rest.split("/", 1)[0].rpartition("@")[2] or uri


# --- pools ---------------------------------------------------------------------------------


def _pool_covering(conn: libvirt.virConnect, folder: Path) -> libvirt.virStoragePool | None:
    """A pool of the host (active or not) whose folder is ``folder``."""
    return if_exists(
        conn.storagePoolLookupByTargetPath, str(folder), missing=libvirt.VIR_ERR_NO_STORAGE_POOL
    )


def pool_name(folder: Path) -> str:
    return POOLS.get(folder) or (
        f"ozone-dir-{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}"
    )


def ensure_pool(
    conn: libvirt.virConnect, folder: Path, *, mode: str = "0755"
) -> libvirt.virStoragePool:
    """The started pool whose folder is ``folder`` on the VM's host: one that exists, else
    a ``dir`` pool ozone defines (autostarted, the folder made by libvirt with ``mode``)."""
    pool = _pool_covering(conn, folder)
    made = pool is None
    if pool is None:
        pool = _define_pool(conn, folder, mode)
    if not call(pool.isActive):
        try:
            with libvirt_errors(explain=_cannot(conn, folder)):
                pool.build(0)  # makes the folder (an existing one is kept)
                if not pool.isActive():
                    pool.create(0)
        except BaseException:
            if made:  # leave no pool of ours that cannot start
                with best_effort():
                    pool.undefine()
            raise
    else:
        call(pool.refresh, 0)
    return pool


def _define_pool(conn: libvirt.virConnect, folder: Path, mode: str) -> libvirt.virStoragePool:
    name = pool_name(folder)
    xml = E.pool(
        E.name(name),
        E.target(E.path(str(folder)), E.permissions(E.mode(mode))),
        type="dir",
    )
    taken = False

    def explain(err: libvirt.libvirtError) -> OzoneError | None:
        nonlocal taken
        taken = "already exists" in (err.get_error_message() or "")
        if taken:
            return OzoneError("")  # answered below
        return OzoneError(
            f"cannot make storage pool {name} ({folder}) on {host_name(conn)}: "
            f"{err.get_error_message()}",
            hint="nothing was changed; `virsh pool-define-as` shows the same",
        )

    try:
        with libvirt_errors(explain=explain):
            pool = conn.storagePoolDefineXML(etree.tostring(xml, encoding="unicode"), 0)
            pool.setAutostart(1)
        return pool
    except OzoneError:
        if not taken:
            raise
    pool = _pool_covering(conn, folder)  # another ozone defined it in the meantime
    if pool is None:
        raise ConflictError(
            f"{host_name(conn)} has a storage pool named {name} for another folder than {folder}",
            hint=f"`virsh -c {call(conn.getURI)} pool-dumpxml {name}`: ozone needs that name "
            "for that folder",
        )
    return pool


def _cannot(conn: libvirt.virConnect, folder: Path) -> Callable[[libvirt.libvirtError], OzoneError]:
    def explain(err: libvirt.libvirtError) -> OzoneError:
        return OzoneError(
            f"cannot start the storage pool of {folder} on {host_name(conn)}: "
            f"{err.get_error_message()}",
            hint=f"`virsh -c {call(conn.getURI)} pool-list --all` shows it",
        )

    return explain


@contextlib.contextmanager
def folder_pool(
    conn: libvirt.virConnect,
    folder: Path,
    *,
    build: bool = False,
    mode: str | None = None,
    owner: tuple[int, int] | None = None,
) -> Iterator[libvirt.virStoragePool | None]:
    """An active storage pool of ``folder`` on ``conn``'s host: one that covers it already
    (refreshed), else a transient one of ozone's for the block, which ``build`` makes the
    folder for (with ``mode`` and ``owner``). None: the folder is not there (and not built)."""
    found = _pool_covering(conn, folder)
    if found is not None:
        call(found.refresh, 0)
        yield found
        return
    target = E.target(E.path(str(folder)))
    if mode or owner:
        perms = E.permissions()
        if mode:
            perms.append(E.mode(mode))
        if owner:
            perms.extend([E.owner(str(owner[0])), E.group(str(owner[1]))])
        target.append(perms)
    xml = etree.tostring(
        E.pool(E.name(f"ozone-look-{secrets.token_hex(4)}"), target, type="dir"),
        encoding="unicode",
    )
    flags = libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD if build else 0
    # a dir pool fails to start on a folder that is not there (a system error)
    pool = if_exists(conn.storagePoolCreateXML, xml, flags, missing=libvirt.VIR_ERR_SYSTEM_ERROR)
    try:
        yield pool
    finally:
        if pool is not None:
            with best_effort():
                pool.destroy()  # transient: gone with it; the folder stays


def present_on(conn: libvirt.virConnect, paths: list[Path]) -> set[Path]:
    """Which of ``paths`` exist on ``conn``'s host (as files libvirt's storage sees)."""
    found = set()
    for folder in sorted({p.parent for p in paths}):
        with folder_pool(conn, folder) as pool:
            if pool is None:
                continue
            for path in paths:
                if path.parent == folder and if_exists(
                    pool.storageVolLookupByName, path.name, missing=libvirt.VIR_ERR_NO_STORAGE_VOL
                ):
                    found.add(path)
    return found


# --- volumes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeInfo:
    path: Path
    capacity: int  # the disk's size as the guest sees it
    physical: int  # the file's length
    allocation: int  # the space it takes on the host's disk
    format: str
    backing: Path | None
    type: str = "file"  # file, block, dir, …
    mtime: float = 0.0  # when it was last written (seconds since the epoch)


def started_pool(conn: libvirt.virConnect, folder: Path) -> libvirt.virStoragePool | None:
    """The started pool of ``folder`` on the host, refreshed; None if it has none (a
    question about a file defines no pool)."""
    pool = _pool_covering(conn, folder)
    if pool is None or not call(pool.isActive):
        return None
    call(pool.refresh, 0)
    return pool


def _lookup(pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
    return if_exists(pool.storageVolLookupByName, name, missing=libvirt.VIR_ERR_NO_STORAGE_VOL)


def _volume(conn: libvirt.virConnect, path: Path) -> libvirt.virStorageVol | None:
    return _lookup(ensure_pool(conn, path.parent), path.name)


def exists(conn: libvirt.virConnect, path: Path) -> bool | None:
    """Does the host hold ``path``? None: cannot tell (no started pool covers its folder)."""
    pool = started_pool(conn, path.parent)
    return None if pool is None else _lookup(pool, path.name) is not None


def info(conn: libvirt.virConnect, path: Path) -> VolumeInfo | None:
    """What the host holds at ``path`` (its pool refreshed first: QEMU or virtlogd may have
    written the file since), or None."""
    vol = _volume(conn, path)
    return None if vol is None else _described(vol, path)


def look(conn: libvirt.virConnect, path: Path) -> VolumeInfo | None:
    """:func:`info` of a file in any folder of the host, asked through a transient pool when
    no pool covers the folder: nothing is left there."""
    with folder_pool(conn, path.parent) as pool:
        vol = _lookup(pool, path.name) if pool is not None else None
        return None if vol is None else _described(vol, path)


def _described(vol: libvirt.virStorageVol, path: Path) -> VolumeInfo:
    root = etree.fromstring(call(vol.XMLDesc, 0).encode())
    backing = root.findtext("backingStore/path")
    return VolumeInfo(
        path=path,
        capacity=int(root.findtext("capacity") or 0),
        physical=int(root.findtext("physical") or root.findtext("capacity") or 0),
        allocation=int(root.findtext("allocation") or 0),
        format=root.find("target/format").get("type", "raw")  # type: ignore[union-attr]
        if root.find("target/format") is not None
        else "raw",
        backing=Path(backing) if backing else None,
        type=root.get("type", "file"),
        mtime=float(root.findtext("target/timestamps/mtime") or 0),
    )


def backing_chains(conn: libvirt.virConnect, paths: list[Path]) -> dict[Path, list[Path]]:
    """The backing images under each of ``paths`` (disk images of the host), as its
    storage pools see them: one refresh per folder, one volume lookup per image."""
    pools: dict[Path, libvirt.virStoragePool | None] = {}
    backing_of: dict[Path, Path | None] = {}

    def backing(path: Path) -> Path | None:
        if path not in backing_of:
            if path.parent not in pools:
                pools[path.parent] = started_pool(conn, path.parent)
            pool = pools[path.parent]
            vol = _lookup(pool, path.name) if pool is not None else None
            backing_of[path] = _described(vol, path).backing if vol is not None else None
        return backing_of[path]

    chains = {}
    for path in paths:
        chain: list[Path] = []
        below = backing(path)
        while below is not None and below not in chain and len(chain) < 16:
            chain.append(below)
            below = backing(below)
        chains[path] = chain
    return chains


def _permissions(mode: str, owner: tuple[int, int] | None) -> etree._Element:
    perms: etree._Element = E.permissions(E.mode(mode))
    if owner is not None:
        perms.append(E.owner(str(owner[0])))
        perms.append(E.group(str(owner[1])))
    return perms


def create(
    conn: libvirt.virConnect,
    path: Path,
    *,
    capacity: int,
    format: str = "qcow2",
    backing: Path | None = None,
    backing_format: str | None = None,
    mode: str = "0600",
    owner: tuple[int, int] | None = None,
) -> None:
    """Make an empty disk (or an overlay over ``backing``) at ``path`` on the host
    (``owner``: (uid, gid) of the file, else libvirt's)."""
    pool = ensure_pool(conn, path.parent)
    target = E.target(E.format(type=format), _permissions(mode, owner))
    if format == "qcow2":
        target.insert(1, E.compat("1.1"))
    xml = E.volume(E.name(path.name), E.capacity(str(capacity), unit="bytes"), target)
    if backing is not None:
        xml.append(E.backingStore(E.path(str(backing)), E.format(type=backing_format or "qcow2")))

    def explain(err: libvirt.libvirtError) -> OzoneError:
        return OzoneError(
            f"cannot make {path} on {host_name(conn)}: {err.get_error_message()}",
            hint="nothing of the VM was made; check the host's free space and the pool",
        )

    with libvirt_errors(explain=explain):
        pool.createXML(etree.tostring(xml, encoding="unicode"), 0)


def upload(
    conn: libvirt.virConnect,
    path: Path,
    source: Path | bytes,
    *,
    mode: str = "0644",
    owner: tuple[int, int] | None = None,
    progress: Progress | None = None,
) -> bool:
    """Copy ``source`` (a file of this machine, or bytes) to ``path`` on the host, unless a
    complete copy is there already (same length: names of uploads say what they hold).
    Returns True if it copied. A copy cut short is made again."""
    length = len(source) if isinstance(source, bytes) else source.stat().st_size
    held = info(conn, path)
    if held is not None and held.physical == length:
        return False
    pool = ensure_pool(conn, path.parent)
    if held is not None:
        delete(conn, path)  # a copy cut short
    xml = E.volume(
        E.name(path.name),
        E.capacity("0", unit="bytes"),
        E.target(E.format(type="raw"), _permissions(mode, owner)),
    )
    vol = call(pool.createXML, etree.tostring(xml, encoding="unicode"), 0)
    try:
        _send(conn, vol, source, length, progress)
    except BaseException:
        with libvirt_errors():
            vol.delete(0)
        raise
    return True


def _send(
    conn: libvirt.virConnect,
    vol: libvirt.virStorageVol,
    source: Path | bytes,
    length: int,
    progress: Progress | None,
) -> None:
    stream = call(conn.newStream, 0)
    sent = 0
    with (
        open(source, "rb") if isinstance(source, Path) else io.BytesIO(source) as handle,
        libvirt_errors(explain=lambda err: _transfer_failed(conn, vol, err)),
    ):
        vol.upload(stream, 0, length, 0)
        try:
            while sent < length:
                chunk = handle.read(min(CHUNK, length - sent))
                if not chunk:
                    raise OzoneError(f"{vol.path()}: the file became shorter while it was copied")
                while chunk:
                    n = stream.send(chunk)
                    chunk = chunk[n:]
                    sent += n
                if progress is not None:
                    progress(sent, length)
            stream.finish()
        except BaseException:
            with libvirt_errors():
                stream.abort()
            raise


def _transfer_failed(
    conn: libvirt.virConnect, vol: libvirt.virStorageVol, err: libvirt.libvirtError
) -> OzoneError:
    return OzoneError(
        f"copying {vol.path()} to {host_name(conn)} failed: {err.get_error_message()}",
        hint="nothing half-copied is kept; try again",
    )


def copy_between(
    source: libvirt.virConnect,
    target: libvirt.virConnect,
    path: Path,
    *,
    mode: str = "0644",
    owner: tuple[int, int] | None = None,
) -> None:
    """Copy the file ``path`` of ``source``'s host to the same path on ``target``'s, through
    two libvirt streams (from a file here when ``source`` is this machine's daemon), a chunk
    at a time. A copy cut short is removed."""
    from .connection import is_local

    if is_local(source):
        upload(target, path, path, mode=mode, owner=owner)
        return
    vol = _volume(source, path)
    if vol is None:
        from .errors import NotFoundError

        raise NotFoundError(f"{path} does not exist on {host_name(source)}")
    length = int(etree.fromstring(call(vol.XMLDesc, 0).encode()).findtext("physical") or 0)
    pool = ensure_pool(target, path.parent)
    xml = E.volume(
        E.name(path.name),
        E.capacity("0", unit="bytes"),
        E.target(E.format(type="raw"), _permissions(mode, owner)),
    )
    copy = call(pool.createXML, etree.tostring(xml, encoding="unicode"), 0)
    inbound, outbound = call(source.newStream, 0), call(target.newStream, 0)
    try:
        with libvirt_errors(explain=lambda err: _transfer_failed(target, copy, err)):
            vol.download(inbound, 0, length, 0)
            copy.upload(outbound, 0, length, 0)
            sent = 0
            while sent < length and isinstance(chunk := inbound.recv(CHUNK), bytes) and chunk:
                while chunk:
                    n = outbound.send(chunk)
                    chunk, sent = chunk[n:], sent + n
            if sent != length:
                raise OzoneError(f"{path} on {host_name(source)} ended early while it was copied")
            inbound.finish()
            outbound.finish()
    except BaseException:
        for stream in (inbound, outbound):
            with best_effort():
                stream.abort()
        with best_effort():
            copy.delete(0)
        raise


def download(conn: libvirt.virConnect, path: Path, *, offset: int = 0, length: int = 0) -> bytes:
    """The bytes of ``path`` on the host from ``offset`` (``length`` 0: to the end)."""
    vol = _volume(conn, path)
    if vol is None:
        from .errors import NotFoundError

        raise NotFoundError(f"{path} does not exist on {host_name(conn)}")
    stream = call(conn.newStream, 0)
    parts: list[bytes] = []
    with libvirt_errors():
        vol.download(stream, offset, length, 0)
        try:
            while isinstance(chunk := stream.recv(CHUNK), bytes) and chunk:
                parts.append(chunk)  # (a blocking stream never answers -2, "try again")
            stream.finish()
        except BaseException:
            with libvirt_errors():
                stream.abort()
            raise
    return b"".join(parts)


def delete(conn: libvirt.virConnect, path: Path) -> bool:
    """Remove ``path`` from the host. False if it was not there."""
    vol = _volume(conn, path)
    if vol is None:
        return False
    call(vol.delete, 0)
    return True


def check_size(conn: libvirt.virConnect, path: Path, size: int, where: str) -> None:
    """A disk that exists on the host must have the size the config asks for (disks do not
    shrink; growing one is `ozone define`'s at the VM's next stop)."""
    held = info(conn, path)
    if held is not None and held.capacity > size:
        raise ConflictError(
            f"{path} on {host_name(conn)} is {held.capacity >> 20} MiB, more than the "
            f"{size >> 20} MiB {where} asks for",
            hint="disks do not shrink: give its size, or remove the disk",
        )


def file_digest(path: Path) -> str:
    """A short digest of a file of this machine, remembered by its identity (size, time,
    inode) for the life of the process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        hasher = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                hasher.update(chunk)
        _DIGESTS[key] = hasher.hexdigest()[:12]
    return _DIGESTS[key]


_DIGESTS: dict[tuple[str, int, int, int], str] = {}


# --- bringing a host_paths's files to the host ------------------------------------------------


def bring_inputs(
    conn: libvirt.virConnect,
    host_paths: HostPaths,
    resolved: Resolved | None,
    *,
    qemu: tuple[int, int] | None,
    report: Callable[[str], None] = lambda _text: None,
    progress: Progress | None = None,
) -> list[Path]:
    """Copy the read-only files of ``host_paths`` to the host (each once: an existing
    complete copy is kept) and make its log folder. Returns the files copied now."""
    from . import cloudinit
    from .errors import ConfigError
    from .storage import backing_file_of

    ensure_pool(conn, LOGS_DIR, mode="0700")  # virtlogd (root) writes serial logs there
    copied = []
    for transfer in host_paths.transfers:
        if transfer.kind == "seed":
            assert resolved is not None and resolved.seed_files is not None
            data = cloudinit.make_iso(resolved.seed_files)
            if upload(conn, transfer.target, data, mode=transfer.mode, owner=qemu):
                copied.append(transfer.target)
        elif transfer.kind == "upload":
            assert transfer.source is not None
            source = transfer.source
            if not source.is_file():
                raise ConfigError(
                    f"{source} does not exist here, and ozone copies it to {host_name(conn)}",
                    file=str(host_paths.config.source) if host_paths.config.source else None,
                    field=transfer.where,
                    hint="give the disk a size (ozone makes it there), or the path of a file",
                )
            if source.suffix != ".iso" and backing_file_of(source) is not None:
                raise ConfigError(
                    f"{source} has a backing file of its own: ozone copies single images to "
                    "another host",
                    file=str(host_paths.config.source) if host_paths.config.source else None,
                    field=transfer.where,
                    hint=f"`qemu-img convert -O qcow2 {source} FLAT.qcow2` and use that",
                )
            held = info(conn, transfer.target)
            if held is None or held.physical != source.stat().st_size:
                report(f"copying {source.name} to {host_name(conn)}")
            copy = upload(
                conn, transfer.target, source, mode=transfer.mode, owner=qemu, progress=progress
            )
            if copy:
                copied.append(transfer.target)
    return copied


def make_disks(conn: libvirt.virConnect, host_paths: HostPaths, *, running: bool) -> list[Path]:
    """Make the host_paths's missing disks on the host. A disk that is there is kept: it
    must be an overlay over the same image, and no bigger than asked; a smaller one grows
    to the size asked while the VM is off (``running``: it is on). Returns those made, for
    the caller to remove if the domain is refused."""
    from .storage import image_info

    made: list[Path] = []
    sources = {t.target: t.source for t in host_paths.transfers if t.kind == "upload"}
    try:
        for transfer in host_paths.transfers:
            if transfer.kind != "create":
                continue
            held = info(conn, transfer.target)
            capacity = transfer.capacity
            backing_format = None
            source = sources.get(transfer.backing) if transfer.backing else None
            if source is not None:
                facts = image_info(source)
                backing_format = str(facts.get("format", "qcow2"))
                virtual = int(facts.get("virtual-size", 0))  # type: ignore[call-overload]
                capacity = max(capacity or virtual, virtual)
            if held is not None:
                _check_held(conn, host_paths, transfer, held, capacity, running=running)
                continue
            create(
                conn,
                transfer.target,
                capacity=capacity or 0,
                format=transfer.format,
                backing=transfer.backing,
                backing_format=backing_format,
                mode=transfer.mode,
            )
            made.append(transfer.target)
    except BaseException:
        remove(conn, made)
        raise
    return made


def _check_held(
    conn: libvirt.virConnect,
    host_paths: HostPaths,
    transfer: Transfer,
    held: VolumeInfo,
    capacity: int | None,
    *,
    running: bool,
) -> None:
    """A disk the host holds already serves the config only as what it was made, at the
    size the config asks."""
    name = host_paths.config.name
    if transfer.backing is not None and held.backing != transfer.backing:
        raise ConflictError(
            f"{name}'s disk {held.path} on {host_name(conn)} is an overlay over "
            f"{held.backing or 'no image'}, not {transfer.backing}: a disk cannot change "
            "its image",
            hint=f"`ozone undefine {name} --remove-storage` (its data goes) and define it again",
        )
    if capacity is not None and held.capacity > capacity:
        raise ConflictError(
            f"{name}'s disk {held.path} on {host_name(conn)} is {held.capacity >> 20} MiB, "
            f"more than the {capacity >> 20} MiB its config asks for ({transfer.where})",
            hint="disks do not shrink: give its size in the config",
        )
    if capacity is not None and held.capacity < capacity:
        if running:
            raise ConflictError(
                f"{name}'s disk {held.path} on {host_name(conn)} is {held.capacity >> 20} MiB "
                f"and grows to {capacity >> 20} MiB only while {name} is off",
                hint=f"`ozone stop {name}`, then define it again",
            )
        vol = _volume(conn, held.path)
        assert vol is not None
        with libvirt_errors(explain=lambda err: _cannot_grow(conn, held.path, err)):
            vol.resize(capacity, 0)


def _cannot_grow(conn: libvirt.virConnect, path: Path, err: libvirt.libvirtError) -> OzoneError:
    return OzoneError(
        f"cannot grow {path} on {host_name(conn)}: {err.get_error_message()}",
        hint="nothing of the VM was changed",
    )


def remove(conn: libvirt.virConnect, paths: list[Path]) -> None:
    """Remove files this command made on the host (cleanup: errors are left for the one
    that caused it)."""
    for path in paths:
        with contextlib.suppress(OzoneError):  # (translated already: not a libvirtError)
            delete(conn, path)
