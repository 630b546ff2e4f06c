"""The folders of `ozone run`: a run's disk overlays and who owns them, and the reaping of
runs whose process died (by every `ozone run`, `ozone cache clear` and `ozone gc`).

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
from .connection import call, find_domain_by_uuid, if_exists

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
    def create(cls, config: VMConfig) -> RunDir:
        make_dir(run_root())
        path = make_dir(run_root() / f"{config.name[:40]}-{secrets.token_hex(4)}")
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        owner = {"pid": os.getpid(), "config": str(config.source), "domains": [], "kept": False}
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


def reap_runs(conn: libvirt.virConnect, *, dry_run: bool = False) -> list[str]:
    """Find runs whose process is gone (nobody holds their lock) and remove what they left:
    their transient VMs and their folders. Kept runs stay while their VM exists. Cheap: one
    flock attempt per run folder. Returns what was (or, with ``dry_run``, would be) removed."""
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
            removed += _reap(conn, path, dry_run=dry_run)
        finally:
            os.close(fd)
    return removed


def _reap(conn: libvirt.virConnect, path: Path, *, dry_run: bool) -> list[str]:
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
    found = [(entry, _run_domain(conn, entry, path)) for entry in owner.get("domains", [])]
    alive = [(entry, dom) for entry, dom in found if dom is not None]
    if owner.get("kept") and alive:
        return []  # the user's to stop; the folder holds its disks
    removed = []
    for entry, dom in alive:
        if not dry_run:
            if_exists(dom.destroy, name=entry.get("name"))  # (it may have ended meanwhile)
        removed.append(f"VM {entry['name']}")
    if not dry_run:
        shutil.rmtree(path)
    return [*removed, str(path)]


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
