"""The folders of `ozone run`: a run's disk overlays and who owns them, and the reaping of
runs whose process died (by every `ozone run`, `ozone cache clear` and `ozone gc`).

A run on another host keeps its folder here all the same (the lock, ``owner.json``), and
its overlays there (:mod:`.runhost`): ``owner.json`` names the host (URI and UUID) and
each file made there, recorded before it is made. Only a connection to that host reaps
such a run; `ozone gc` opens one, the others leave the run and say so.

Light on purpose (no config, no lxml): `cache clear` imports it.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt

from .cache import make_dir
from .connection import (
    call,
    close_quietly,
    find_domain_by_uuid,
    host_uuid,
    if_exists,
    is_local,
    open_connection,
)
from .errors import OzoneError

if TYPE_CHECKING:
    from .config import VMConfig


def run_root() -> Path:
    return Path(os.environ.get("OZONE_RUN_DIR", "/var/lib/libvirt/images/ozone-runs"))


@dataclass
class RunDir:
    """A run's folder in :func:`run_root`: its disk overlays, ``owner.json`` (the domains the
    run makes, written *before* each is created) and ``lock``, which the run holds (flock)
    for as long as it lives. A folder whose lock nobody holds belongs to a run that died:
    :func:`reap_runs` removes its domains and the folder. A run kept with --keep marks its
    folder ``kept``: the folder stays until its VM is gone."""

    path: Path
    owner: dict[str, Any] = field(default_factory=dict)
    lock_fd: int | None = None

    @classmethod
    def create(cls, config: VMConfig, conn: libvirt.virConnect | None = None) -> RunDir:
        make_dir(run_root())
        path = make_dir(run_root() / f"{config.name[:40]}-{secrets.token_hex(4)}")
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        owner: dict[str, Any] = {
            "pid": os.getpid(),
            "config": str(config.source),
            "domains": [],
            "kept": False,
        }
        if conn is not None and not is_local(conn):  # its VM and overlays are there
            owner.update(uri=call(conn.getURI), host=host_uuid(conn), volumes=[])
        run_dir = cls(path, owner, fd)
        run_dir.save()
        return run_dir

    def save(self) -> None:
        partial = self.path / "owner.json.part"
        partial.write_text(json.dumps(self.owner))
        partial.rename(self.path / "owner.json")

    def expect(self, name: str, uuid: str) -> None:
        """Record a domain before it is created (so a run killed at any moment is found)."""
        self.owner["domains"].append({"name": name, "uuid": uuid})
        self.save()

    def expect_volume(self, path: Path) -> Path:
        """Record a file on the VM's host before it is made there."""
        self.owner["volumes"].append(str(path))
        self.save()
        return path

    def volumes(self) -> list[Path]:
        return [Path(p) for p in self.owner.get("volumes", [])]

    def forget_volumes(self, paths: list[Path]) -> None:
        self.owner["volumes"] = [p for p in self.owner.get("volumes", []) if Path(p) not in paths]
        self.save()

    @property
    def remote(self) -> bool:
        return "uri" in self.owner

    @property
    def mark(self) -> str:
        """The description this run's domains carry: a boot cache slot restores under the
        same name and UUID every time, so only this tells whose a domain is."""
        return f"ozone run in {self.path}"

    def keep(self) -> None:
        self.owner["kept"] = True
        self.save()
        self.unlock()

    def unlock(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def overlays(self) -> list[Path]:
        return sorted(self.path.glob("disk*.qcow2"))


def reap_runs(
    conn: libvirt.virConnect,
    *,
    dry_run: bool = False,
    open_others: bool = False,
    skipped: list[str] | None = None,
) -> list[str]:
    """Find runs whose process is gone (nobody holds their lock) and remove what they left:
    their transient VMs, their files on another host and their folders. Kept runs stay
    while their VM exists. Cheap: one flock attempt per run folder. Returns what was (or,
    with ``dry_run``, would be) removed.

    A run on another host than ``conn``'s is reaped through a connection to its URI when
    ``open_others`` (`ozone gc`), else left, with a note in ``skipped``."""
    root = run_root()
    if not root.is_dir():
        return []
    removed: list[str] = []
    for path in sorted(root.iterdir()):
        try:
            fd = os.open(path / "lock", os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # not a run's folder, or another reaper just removed it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its run is alive
            removed += _reap(conn, path, dry_run=dry_run, open_others=open_others, skipped=skipped)
        finally:
            os.close(fd)
    return removed


def _reap(
    conn: libvirt.virConnect,
    path: Path,
    *,
    dry_run: bool,
    open_others: bool,
    skipped: list[str] | None,
) -> list[str]:
    """One dead run's folder (we hold its lock)."""
    try:
        owner = json.loads((path / "owner.json").read_text())
    except FileNotFoundError:
        # a run writes owner.json right after it locks its new folder: give it a minute
        if time.time() - path.stat().st_mtime < 60:
            return []
        owner = {"domains": []}
    except (OSError, ValueError):
        owner = {"domains": []}
    if _runs_on(conn, owner):
        return _reap_on(conn, path, owner, dry_run=dry_run)
    uri = owner.get("uri")
    if not open_others:
        if skipped is not None:
            where = uri or "this machine"
            skipped.append(f"{path}: a run on {where} (`ozone -c {uri or 'URI'} gc` removes it)")
        return []
    try:
        other = open_connection(uri)
    except OzoneError as err:
        if skipped is not None:
            skipped.append(f"{path}: {err.message}")
        return []
    try:
        return _reap_on(other, path, owner, dry_run=dry_run)
    finally:
        close_quietly(other)


def _runs_on(conn: libvirt.virConnect, owner: dict[str, Any]) -> bool:
    """Is ``conn``'s host the one the run's VM was on?"""
    if "uri" not in owner:  # this machine's
        return is_local(conn)
    return bool(owner["uri"] == call(conn.getURI) or owner.get("host") == host_uuid(conn))


def _reap_on(
    conn: libvirt.virConnect, path: Path, owner: dict[str, Any], *, dry_run: bool
) -> list[str]:
    found = [(entry, _run_domain(conn, entry, path)) for entry in owner.get("domains", [])]
    alive = [(entry, dom) for entry, dom in found if dom is not None]
    if owner.get("kept") and alive:
        return []  # the user's to stop; the folder holds its disks
    removed = []
    for entry, dom in alive:
        if not dry_run:
            if_exists(dom.destroy, name=entry.get("name"))  # (it may have ended meanwhile)
        removed.append(f"VM {entry['name']}")
    if "uri" in owner:
        files = [Path(p) for p in owner.get("volumes", [])]
        names = (str(e.get("name", "")) for e in owner.get("domains", []))
        files += [log for log in map(one_off_log, names) if log is not None]
        for file in files:
            if dry_run or remove_host_file(conn, file):
                removed.append(f"{file} on {owner['uri']}")
    if not dry_run:
        shutil.rmtree(path)
    return [*removed, str(path)]


def one_off_log(name: str) -> Path | None:
    """The serial log on another host of a run's domain with a one-off name (None for a
    boot cache slot's domain: it keeps its name, and its log is written over each time)."""
    from .hostpaths import LOGS_DIR

    return LOGS_DIR / f"{name}-serial.log" if "-run-" in name else None


def remove_host_file(conn: libvirt.virConnect, path: Path) -> bool:
    """Delete a file of the VM's host; True if it was there."""
    from .hostfiles import delete

    return delete(conn, path)


def _run_domain(
    conn: libvirt.virConnect, entry: dict[str, str], folder: Path
) -> libvirt.virDomain | None:
    """The transient domain a run recorded, if it still exists and is the run's: same UUID
    and name, and marked with the run's folder (another run may have restored the same boot
    cache slot, under the same name and UUID, since)."""
    if "uuid" not in entry:
        return None
    dom = find_domain_by_uuid(conn, entry["uuid"], name=entry.get("name"))
    if dom is None:
        return None
    if dom.name() != entry.get("name") or call(dom.isPersistent, name=dom.name()):
        return None  # not what the run made: never touch it
    from xml.etree import ElementTree

    xml = if_exists(dom.XMLDesc, 0, name=dom.name())  # (None: it ended meanwhile)
    description = ElementTree.fromstring(xml).findtext("description") if xml else None
    return dom if description == f"ozone run in {folder}" else None
