"""`ozone gc`: remove what ozone processes that died (SIGKILL, a crash, a reboot) left behind.

Everything ozone leaves while it works says who owns it: a run's folder holds a lock its run
holds (:class:`.run.RunDir`), a copy holds a lease (:mod:`.state`), a boot cache slot holds
a lock. A free lock means a dead owner, so what it covers is debris:

* runs: their transient VMs and overlay folders (kept runs stay while their VM runs);
* the boot cache: entries with no saved state (a fill that failed) and half-written states;
* copies: ``.NAME.ozone-part-*`` files on the host, ``.ozone-cp-*`` folders in guests
  (through the guest agent; a guest that is not running keeps its folder until it runs);
* QMP sockets of VMs that no longer exist.
"""

from __future__ import annotations

import contextlib
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from .agent import Agent
from .cache import prune_cache
from .connection import domain_metadata, open_connection, translate
from .errors import OzoneError
from .rundir import reap_runs
from .state import qmp_folder, stale_leases
from .transfer import GUEST_PART, HOST_PART

# remove a copy's folder in a guest, if it is one (root's, a real folder, ozone's name)
_DISCARD_GUEST_PART = r"""
case ${1##*/} in .ozone-cp-*) ;; *) exit 2 ;; esac
[ -e "$1" ] || exit 3
[ -d "$1" ] && [ ! -h "$1" ] && [ -O "$1" ] && exec rm -rf -- "$1"
exit 2
"""


@dataclass
class GcResult:
    removed: list[str] = field(default_factory=list)  # or would be, with dry_run
    kept: list[str] = field(default_factory=list)  # debris that cannot go yet, and why
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect(conn: libvirt.virConnect, *, dry_run: bool = False) -> GcResult:
    """Find (and unless ``dry_run``, remove) everything dead ozone processes left."""
    result = GcResult(dry_run=dry_run)
    result.removed += reap_runs(conn, dry_run=dry_run)
    result.removed += prune_cache(dry_run=dry_run)
    _host_parts(result)
    _guest_parts(conn, result)
    _qmp_sockets(conn, result)
    return result


def _host_parts(result: GcResult) -> None:
    for lease in stale_leases("cp-host"):
        path = Path(str(lease.data.get("path", "")))
        with contextlib.suppress(OSError):
            info = path.lstat()
            if HOST_PART in path.name and stat.S_ISREG(info.st_mode):
                result.removed.append(str(path))
                if not result.dry_run:
                    path.unlink()
        if not result.dry_run:
            lease.release()


def _guest_parts(conn: libvirt.virConnect, result: GcResult) -> None:
    for lease in stale_leases("cp-guest"):
        path = str(lease.data.get("path", ""))
        vm = str(lease.data.get("vm", "?"))
        if not GUEST_PART.fullmatch(path.rsplit("/", 1)[-1]):
            if not result.dry_run:
                lease.release()  # it died before it made anything in the guest
            continue
        uri = str(lease.data.get("uri") or "")
        try:
            other = open_connection(uri) if uri and uri != conn.getURI() else None
        except OzoneError as err:
            result.kept.append(f"{vm}:{path} ({err.message})")
            continue
        try:
            state = _discard_in_guest(other or conn, lease.data, path, dry_run=result.dry_run)
        finally:
            if other is not None:
                other.close()
        if state == "kept":
            result.kept.append(f"{vm}:{path} (the VM is not running: it stays until it runs)")
            continue
        if state == "removed":
            result.removed.append(f"{vm}:{path}")
        if not result.dry_run:
            lease.release()


def _discard_in_guest(
    conn: libvirt.virConnect, data: dict[str, Any], path: str, *, dry_run: bool
) -> str:
    """removed | gone (the VM no longer exists) | kept (not running, agent silent)."""
    try:
        dom = conn.lookupByUUIDString(str(data.get("uuid")))
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return "gone"
        raise translate(err) from None
    agent = Agent(dom)
    if not dom.isActive() or not agent.answers(timeout=2):
        return "kept"
    if dry_run:
        return "removed"
    code = agent.script(_DISCARD_GUEST_PART, path).exit_code
    return {0: "removed", 3: "gone"}.get(code, "kept")


def _qmp_sockets(conn: libvirt.virConnect, result: GcResult) -> None:
    """Sockets in ozone's QMP folder whose VM is gone or has another endpoint now."""
    folder = qmp_folder(session=conn.getURI().startswith("qemu:///session"))
    if not folder.is_dir():
        return
    for sock in sorted(folder.glob("*.sock")):
        with contextlib.suppress(OSError):
            if not stat.S_ISSOCK(sock.lstat().st_mode):
                continue
            try:
                dom = conn.lookupByName(sock.name.removesuffix(".sock"))
                meta = domain_metadata(dom)
            except libvirt.libvirtError:
                meta = None
            if meta is not None and meta.qmp == f"unix:{sock}":
                continue
            result.removed.append(str(sock))
            if not result.dry_run:
                sock.unlink()
