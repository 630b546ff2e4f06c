"""The boot cache's store: entries (one per key) holding up to :data:`SLOTS` saved states
of a booted guest, each a libvirt save image with the disk overlays it ran on, locked by the
run that uses it. :mod:`.run` decides keys, fills slots and restores them; this module only
keeps them (and is all that `ozone cache list|clear` loads).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import libvirt

from .connection import find_domain

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
    """One save image of an entry, usable by one run at a time."""

    entry: Path
    index: int
    domain_name: str
    lock: IO[str] | None = None

    @property
    def dir(self) -> Path:
        return self.entry / f"slot-{self.index}"

    @property
    def state(self) -> Path:
        return self.dir / "state.save"

    @property
    def meta(self) -> Path:
        return self.dir / "slot.json"

    def valid(self) -> bool:
        try:
            meta = json.loads(self.meta.read_text())
        except (OSError, ValueError):
            return False
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
        if not info.exists():
            data = {
                "key": key,
                "config": str(config.source) if config.source else None,
                "name": config.name,
                "created": time.time(),
                "parts": parts,
            }
            info.write_text(json.dumps(data, indent=2))
        for index in range(SLOTS):
            slot = Slot(entry, index, f"{config.name[:40]}-run{index}-{key[:8]}")
            make_dir(slot.dir)
            handle = (slot.dir / "lock").open("a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:  # a VM kept with --keep still holds the slot's name
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
        slots = sum(1 for s in entry.glob("slot-*") if (s / "state.save").is_file())
        entries.append(
            CacheEntryInfo(
                key=info["key"],
                config=info.get("config"),
                name=info.get("name", "?"),
                slots=slots,
                bytes=size,
                age_s=round(time.time() - info.get("created", time.time()), 1),
                files=tuple(sorted(info.get("parts", {}).get("files", {}))),
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
    reaped first, so that their slots come free."""
    removed = []
    if conn is not None:
        from .rundir import reap_runs

        reap_runs(conn)
    for entry in list_cache():
        if entry.key == except_key or (keys is not None and entry.key not in keys):
            continue
        if config is not None and entry.config != config and entry.name != config:
            continue
        path = _entry_dir(entry.key)
        if conn is not None and _slot_vm_running(conn, path):
            continue
        with _entry_locked(path), _all_slots_locked(path) as free:
            if free:
                shutil.rmtree(path)
                removed.append(entry.key)
    return removed


def prune_entry(entry: Path) -> bool:
    """Remove an entry that holds no saved state (a fill that failed, or was killed) when no
    run uses any of its slots. True if it was removed."""
    with _entry_locked(entry), _all_slots_locked(entry) as free:
        if not free or any((slot / "state.save").is_file() for slot in entry.glob("slot-*")):
            return False
        shutil.rmtree(entry)
    return True


def prune_cache(*, dry_run: bool = False) -> list[str]:
    """`ozone gc`: entries with no saved state, and half-written states, that no run uses."""
    removed = []
    root = cache_root()
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if not entry.is_dir() or entry.is_symlink():
            continue
        with _entry_locked(entry), _all_slots_locked(entry) as free:
            if not free:
                continue
            if not any((slot / "state.save").is_file() for slot in entry.glob("slot-*")):
                removed.append(f"boot cache entry {entry.name} (no saved state)")
                if not dry_run:
                    shutil.rmtree(entry)
                continue
            for part in entry.glob("slot-*/state.save.part"):
                removed.append(str(part))
                if not dry_run:
                    part.unlink(missing_ok=True)
    return removed


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
