"""Snapshots (libvirt's own, internal to the qcow2 disks) and saved state (managed save).

A running VM's snapshot holds its memory too, so reverting to it resumes the programs that
were running; a shut-off VM's snapshot holds its disks only. After a revert to a running
state, or a resume from saved state, the guest clock is set from the host's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import libvirt
from lxml import etree

from .connection import call, find_snapshot, libvirt_errors, lookup, refused_with
from .errors import OzoneError, StateError, UsageError
from .results import RevertResult, SaveResult
from .vm import is_active, state_name, sync_clock


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    created: int  # seconds since the epoch
    state: str  # the VM's state captured: running, paused, shutoff, ...
    parent: str | None
    current: bool
    memory: bool


def _describe(snap: libvirt.virDomainSnapshot) -> SnapshotInfo:
    root = etree.fromstring(call(snap.getXMLDesc, 0).encode())
    parent = root.findtext("parent/name")
    memory = root.find("memory")
    return SnapshotInfo(
        name=snap.getName(),
        created=int(root.findtext("creationTime") or 0),
        state=root.findtext("state") or "unknown",
        parent=parent,
        current=bool(call(snap.isCurrent, 0)),
        memory=memory is not None and memory.get("snapshot") not in (None, "no"),
    )


def _snapshot(dom: libvirt.virDomain, snap: str) -> libvirt.virDomainSnapshot:
    found = find_snapshot(dom, snap)
    if found is None:
        raise OzoneError(
            f"{dom.name()} has no snapshot {snap!r}",
            hint=f"`ozone snapshot list {dom.name()}` shows its snapshots",
        )
    return found


def create(
    conn: libvirt.virConnect, name: str, snap: str | None = None, description: str = ""
) -> SnapshotInfo:
    dom = lookup(conn, name)
    snap = snap or time.strftime("snap-%Y%m%d-%H%M%S")
    if not snap.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UsageError(f"snapshot name {snap!r}: use letters, digits, '.', '_' and '-'")
    root = etree.Element("domainsnapshot")
    etree.SubElement(root, "name").text = snap
    if description:
        etree.SubElement(root, "description").text = description
    xml = etree.tostring(root, encoding="unicode")

    def explain(err: libvirt.libvirtError) -> OzoneError | None:
        message = err.get_error_message() or str(err)
        if "already exists" in message:
            return OzoneError(f"{name} already has a snapshot {snap!r}")
        unsupported = (libvirt.VIR_ERR_CONFIG_UNSUPPORTED, libvirt.VIR_ERR_OPERATION_UNSUPPORTED)
        if err.get_error_code() in unsupported or "qcow2" in message:
            return StateError(
                f"cannot snapshot {name}: {message}",
                hint="snapshots live inside qcow2 disks: give the VM a qcow2 disk in its config",
            )
        return None

    with libvirt_errors(name=name, explain=explain):
        created = dom.snapshotCreateXML(xml, 0)
    return _describe(created)


def list_snapshots(conn: libvirt.virConnect, name: str) -> list[SnapshotInfo]:
    dom = lookup(conn, name)
    infos = [_describe(s) for s in call(dom.listAllSnapshots, 0, name=name)]
    return sorted(infos, key=lambda s: (s.created, s.name))


def revert(conn: libvirt.virConnect, name: str, snap: str) -> RevertResult:
    """Go back to a snapshot. A running VM stays running (from the snapshot's memory when it
    has one, else booted from its disks), with its guest clock set from the host."""
    dom = lookup(conn, name)
    snapshot = _snapshot(dom, snap)
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING if is_active(dom) else 0
    risky = libvirt.VIR_ERR_SNAPSHOT_REVERT_RISKY
    if refused_with(dom.revertToSnapshot, snapshot, flags, code=risky, name=name):
        call(
            dom.revertToSnapshot,
            snapshot,
            flags | libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_FORCE,
            name=name,
        )
    result = RevertResult(name, snap, state_name(dom))
    return result.with_clock(sync_clock(dom)) if is_active(dom) else result


def delete(conn: libvirt.virConnect, name: str, snap: str) -> None:
    dom = lookup(conn, name)
    call(_snapshot(dom, snap).delete, 0, name=name)


def save(conn: libvirt.virConnect, name: str) -> SaveResult:
    """Save the running VM's state to disk and stop it; `start` resumes from it."""
    dom = lookup(conn, name)
    if not is_active(dom):
        raise StateError(f"{name} is not running: nothing to save")
    began = time.monotonic()
    call(dom.managedSave, 0, name=name)
    return SaveResult(name, "saved", round(time.monotonic() - began, 3))
