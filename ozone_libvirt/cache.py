"""The boot cache's store: entries (one per key) holding up to :data:`SLOTS` saved states
of a booted guest, each a libvirt save image with the disk overlays it ran on, locked by the
run that uses it. :mod:`.run` decides keys, fills slots and restores them; this module only
keeps them (and is all that `ozone cache list|clear` loads).

An entry's metadata and locks are always here, in :func:`cache_root` (this machine's ozone
coordinates its own runs). Its saved states and overlays are on the VM's host: here, in the
entry's folder; on another host (a *remote* entry, whose key names that host's UUID), in
ozone's pool there, ``/var/lib/ozone/cache/KEY-slotN.save`` and ``KEY-slotN-diskM.qcow2``,
reached through libvirt (:mod:`.hostfiles`). A remote slot is complete when its
``slot.json`` is here: it is written after the save, with the identities (sizes, mtime) the
host gives for the state and disks, which :meth:`Slot.valid` checks again.

Two machines (or two cache folders) using one host's cache never share an entry: a remote
key holds this cache's own id (:func:`cache_id`), so their slot domains and files have
names of their own. A slot whose domain name exists on the host anyway (a run kept with
--keep, or one from elsewhere) counts as busy: nobody's domain is touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import libvirt

from .connection import call, find_domain, host_uuid, is_local
from .hostpaths import CACHE_DIR

if TYPE_CHECKING:
    from .config import VMConfig

SLOTS = 4


def cache_root() -> Path:
    return Path(os.environ.get("OZONE_CACHE_DIR", "/var/lib/libvirt/images/ozone-cache"))


def file_identity(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def cache_id() -> str:
    """This cache folder's own id (made once, at random): remote keys carry it, so that two
    machines (or two cache folders) using one host never take each other's entries."""
    path = make_dir(cache_root()) / "id"
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    partial = path.with_name(f"id.{secrets.token_hex(4)}")
    partial.write_text(secrets.token_hex(8))
    try:
        os.link(partial, path)  # the first one wins
    except FileExistsError:
        pass
    finally:
        partial.unlink()
    return path.read_text().strip()


def volume_identity(conn: libvirt.virConnect, path: Path) -> str:
    """What a file of the VM's host is, as libvirt tells: sizes and mtime (or "missing")."""
    from .hostfiles import look

    held = look(conn, path)
    if held is None:
        return "missing"
    return f"{held.capacity}:{held.physical}:{held.mtime}"


def host_volumes(conn: libvirt.virConnect, key: str, slot: int | None = None) -> list[Path]:
    """A remote entry's files on the host (those of one slot, when given)."""
    from .hostfiles import ensure_pool

    pool = ensure_pool(conn, CACHE_DIR, mode="0711")
    prefixes = (f"{key}-slot{slot}.", f"{key}-slot{slot}-") if slot is not None else (f"{key}-",)
    names = [call(vol.name) for vol in call(pool.listAllVolumes, 0)]
    return [CACHE_DIR / name for name in sorted(names) if name.startswith(prefixes)]


def make_dir(path: Path) -> Path:
    """A folder QEMU (another user) can enter."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    return path


def key_digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# --- entries and slots ---------------------------------------------------------------------


@dataclass
class Slot:
    """One save image of an entry, usable by one run at a time. ``remote``: its state and
    disks are on another host (paths there), its lock and ``slot.json`` here."""

    entry: Path
    index: int
    domain_name: str
    lock: IO[str] | None = None
    remote: bool = False

    @property
    def dir(self) -> Path:
        return self.entry / f"slot-{self.index}"

    @property
    def state(self) -> Path:
        if self.remote:
            return CACHE_DIR / f"{self.entry.name}-slot{self.index}.save"
        return self.dir / "state.save"

    def disk(self, index: int) -> Path:
        """Where the slot's overlay over the config's disk ``index`` is (on the VM's host)."""
        if self.remote:
            return CACHE_DIR / f"{self.entry.name}-slot{self.index}-disk{index}.qcow2"
        return self.dir / "disks" / f"disk{index}.qcow2"

    @property
    def meta(self) -> Path:
        return self.dir / "slot.json"

    def valid(self, conn: libvirt.virConnect | None = None) -> bool:
        """Does the slot hold a saved state whose files are as they were saved? (A remote
        slot asks its host: ``conn``.)"""
        try:
            meta = json.loads(self.meta.read_text())
        except (OSError, ValueError):
            return False
        if self.remote:
            assert conn is not None
            files = {str(self.state): meta.get("state"), **meta["disks"]}
            return all(volume_identity(conn, Path(p)) == ident for p, ident in files.items())
        if not self.state.is_file():
            return False
        return all(file_identity(Path(p)) == ident for p, ident in meta["disks"].items())

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def _entry_dir(key: str) -> Path:
    return cache_root() / key


@contextlib.contextmanager
def _entry_locked(entry: Path) -> Iterator[Path]:
    """Hold the entry's own lock: taking a slot, and pruning the entry, happen one at a time
    (else a prune could remove an entry a run is just taking a slot of)."""
    while True:
        make_dir(entry)
        with (entry / "lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            if (entry / "lock").exists():  # not pruned while we waited
                yield entry
                return


def acquire_slot(conn: libvirt.virConnect, config: VMConfig, parts: dict[str, Any]) -> Slot | None:
    """Lock a free slot of the config's entry (creating the entry), or None if all are busy."""
    key = key_digest(parts)
    with _entry_locked(_entry_dir(key)) as entry:
        info = entry / "entry.json"
        remote = "host" in parts
        if not info.exists():
            data = {
                "key": key,
                "config": str(config.source) if config.source else None,
                "name": config.name,
                "created": time.time(),
                "parts": parts,
            }
            if remote:
                data["uri"] = call(conn.getURI)
            info.write_text(json.dumps(data, indent=2))
        for index in range(SLOTS):
            slot = Slot(entry, index, f"{config.name[:40]}-run{index}-{key[:8]}", remote=remote)
            make_dir(slot.dir)
            handle = (slot.dir / "lock").open("a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:  # a VM kept with --keep (or another machine's) still holds the slot's name
                kept = find_domain(conn, slot.domain_name)
            except BaseException:
                handle.close()
                raise
            if kept is not None:
                handle.close()
                continue
            slot.lock = handle
            return slot
    return None


@dataclass(frozen=True)
class CacheEntryInfo:
    key: str
    config: str | None
    name: str
    slots: int  # filled
    bytes: int
    age_s: float
    files: tuple[str, ...] = ()  # what its key covers
    host: str | None = None  # the URI of the host its states are on (None: this machine's)


def list_cache() -> list[CacheEntryInfo]:
    root = cache_root()
    if not root.is_dir():
        return []
    entries = []
    for entry in sorted(root.iterdir()):
        try:
            info = json.loads((entry / "entry.json").read_text())
        except (OSError, ValueError):
            continue
        size = 0
        for f in entry.rglob("*"):
            with contextlib.suppress(OSError):  # a fill may be renaming its files right now
                size += f.stat().st_size if f.is_file() else 0
        remote = "host" in info.get("parts", {})
        slots = sum(1 for s in entry.glob("slot-*") if _has_state(s, remote=remote))
        if remote:  # the files on the host, as they were when saved
            size += sum(_slot_meta(s).get("bytes", 0) for s in entry.glob("slot-*"))
        entries.append(
            CacheEntryInfo(
                key=info["key"],
                config=info.get("config"),
                name=info.get("name", "?"),
                slots=slots,
                bytes=size,
                age_s=round(time.time() - info.get("created", time.time()), 1),
                files=tuple(sorted(info.get("parts", {}).get("files", {}))),
                host=info.get("uri", "?") if remote else None,
            )
        )
    return entries


def clear_cache(
    conn: libvirt.virConnect | None = None,
    *,
    config: str | None = None,
    except_key: str | None = None,
    keys: set[str] | None = None,
) -> list[str]:
    """Remove entries (those of one config file, when given) that no run is using, and
    (given a connection) that no VM kept with --keep still runs on. Runs that died are
    reaped first, so that their slots come free. Only entries of the connection's host
    go (a remote entry's files are deleted there through libvirt); without a connection,
    this machine's."""
    removed = []
    if conn is not None:
        from .rundir import reap_runs

        reap_runs(conn)
    here = _Host(conn)
    for entry in list_cache():
        if entry.key == except_key or (keys is not None and entry.key not in keys):
            continue
        if config is not None and entry.config != config and entry.name != config:
            continue
        path = _entry_dir(entry.key)
        if not here.holds(path):
            continue  # another host's: its files are there
        if conn is not None and _slot_vm_running(conn, path):
            continue
        with _entry_locked(path), _all_slots_locked(path) as free:
            if free:
                if conn is not None and _remote_key(path):
                    for volume in host_volumes(conn, entry.key):
                        _delete_volume(conn, volume)
                shutil.rmtree(path)
                removed.append(entry.key)
    return removed


def prune_entry(entry: Path, conn: libvirt.virConnect | None = None) -> bool:
    """Remove an entry that holds no saved state (a fill that failed, or was killed) when no
    run uses any of its slots. True if it was removed. (A remote entry's files on the host
    go too, through ``conn``: without it, the entry stays for `ozone gc`.)"""
    remote = _remote_key(entry) is not None
    with _entry_locked(entry), _all_slots_locked(entry) as free:
        if not free or any(_has_state(slot, remote=remote) for slot in entry.glob("slot-*")):
            return False
        if remote:
            if conn is None:
                return False
            from .errors import OzoneError

            gone = False  # (a cleanup after a failure: the caller tells its own error)
            with contextlib.suppress(OzoneError, libvirt.libvirtError):
                for volume in host_volumes(conn, entry.name):
                    _delete_volume(conn, volume)
                gone = True
            if not gone:
                return False  # `ozone gc` tries again
        shutil.rmtree(entry)
    return True


def prune_cache(conn: libvirt.virConnect | None = None, *, dry_run: bool = False) -> list[str]:
    """`ozone gc`: entries with no saved state, and half-written states, that no run uses
    (remote entries: those of the connection's host)."""
    removed = []
    root = cache_root()
    here = _Host(conn)
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if not entry.is_dir() or entry.is_symlink():
            continue
        remote = _remote_key(entry) is not None
        if remote and (conn is None or not here.holds(entry)):
            continue
        with _entry_locked(entry), _all_slots_locked(entry) as free:
            if not free:
                continue
            if not any(_has_state(slot, remote=remote) for slot in entry.glob("slot-*")):
                removed.append(f"boot cache entry {entry.name} (no saved state)")
                if not dry_run:
                    for volume in host_volumes(conn, entry.name) if conn and remote else []:
                        _delete_volume(conn, volume)
                    shutil.rmtree(entry)
                continue
            for part in _half_written(conn, entry, remote=remote):
                removed.append(str(part))
                if dry_run:
                    continue
                if remote and conn is not None:
                    _delete_volume(conn, part)
                else:
                    part.unlink(missing_ok=True)
    return removed


def _half_written(conn: libvirt.virConnect | None, entry: Path, *, remote: bool) -> list[Path]:
    """Files of slots whose save did not complete (a run killed while it saved)."""
    if not remote:
        return sorted(entry.glob("slot-*/state.save.part"))
    assert conn is not None
    parts = []
    for slot in sorted(entry.glob("slot-*")):
        if not _has_state(slot, remote=True):
            parts += host_volumes(conn, entry.name, int(slot.name.removeprefix("slot-")))
    return parts


def _has_state(slot: Path, *, remote: bool) -> bool:
    """Does a slot's folder say it holds a complete saved state? (A remote slot: its
    slot.json, written after the save; here: the state file, renamed into place.)"""
    return (slot / ("slot.json" if remote else "state.save")).is_file()


def _slot_meta(slot: Path) -> dict[str, Any]:
    try:
        meta = json.loads((slot / "slot.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _remote_key(entry: Path) -> str | None:
    """The UUID of the host a remote entry's states are on (None: this machine's)."""
    try:
        info = json.loads((entry / "entry.json").read_text())
        host = info.get("parts", {}).get("host")
    except (OSError, ValueError, AttributeError):
        return None
    return str(host) if host else None


class _Host:
    """Which entries a connection's host holds (its UUID asked once, when needed)."""

    def __init__(self, conn: libvirt.virConnect | None) -> None:
        self.conn = conn
        self.uuid: str | None = None

    def holds(self, entry: Path) -> bool:
        host = _remote_key(entry)
        if host is None:  # this machine's
            return self.conn is None or is_local(self.conn)
        if self.conn is None:
            return False
        if self.uuid is None:
            self.uuid = host_uuid(self.conn)
        return host == self.uuid


def _delete_volume(conn: libvirt.virConnect, path: Path) -> None:
    from .hostfiles import delete

    delete(conn, path)


def _slot_vm_running(conn: libvirt.virConnect, entry: Path) -> bool:
    for meta in entry.glob("slot-*/slot.json"):
        try:
            name = str(json.loads(meta.read_text())["name"])
        except (OSError, ValueError, KeyError):
            continue
        if find_domain(conn, name) is not None:
            return True
    return False


@contextlib.contextmanager
def _all_slots_locked(entry: Path) -> Iterator[bool]:
    handles = []
    try:
        for lock in sorted(entry.glob("slot-*/lock")):
            handle = lock.open("a")
            handles.append(handle)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
        yield True
    finally:
        for handle in handles:
            handle.close()
