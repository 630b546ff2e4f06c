"""`ozone gc`: remove what ozone processes that died (SIGKILL, a crash, a reboot) left behind.

Everything ozone leaves while it works says who owns it: a run's folder holds a lock its run
holds (:class:`.run.RunDir`), a copy holds a lease (:mod:`.state`), a boot cache slot holds
a lock. A free lock means a dead owner, so what it covers is debris:

* runs: their transient VMs and overlay folders (kept runs stay while their VM runs), also
  on another host (its overlays there, through a connection to the run's URI);
* the boot cache: entries with no saved state (a fill that failed) and half-written states
  (those on another host: when ``conn`` is that host);
* copies: ``.NAME.ozone-part-*`` files on the host, ``.ozone-cp-*`` folders in guests
  (through the guest agent; a guest that is not running keeps its folder until it runs);
* runs of `ozone exec`: their folders in the guest's stage (a program still running gets
  its stdin closed, and removes its folder when it ends);
* QMP sockets of VMs that no longer exist;
* the image store: half-made images of builds and pulls that died, and cloud-init seeds no
  VM or boot cache entry uses.
"""

from __future__ import annotations

import contextlib
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from .agent import Agent
from .cache import prune_cache
from .connection import (
    domain_metadata,
    find_domain,
    find_domain_by_uuid,
    is_local,
    open_connection,
)
from .errors import OzoneError
from .execute import STAGE_FOLDER
from .imagestore import store_debris
from .inventory import is_active
from .rundir import reap_runs
from .state import qmp_folder, stale_leases
from .transfer import GUEST_PART, HOST_PART

# In the guest: remove what a dead ozone left, if it is ozone's (root's, a real folder, one
# of ozone's names). Exit 0: removed, 3: not there, 4: still in use, 2: not ozone's.
_DISCARD_GUEST_PART = r"""
case ${1##*/} in .ozone-cp-*) ;; *) exit 2 ;; esac
[ -e "$1" ] || exit 3
[ -d "$1" ] && [ ! -h "$1" ] && [ -O "$1" ] && exec rm -rf -- "$1"
exit 2
"""
# a run's folder: while its wrapper ($2) still runs, close its stdin (it may wait for more
# forever) and leave it; the wrapper removes the folder when the program ends
_DISCARD_RUN_FOLDER = r"""
case ${1%/*} in */.ozone-exec) ;; *) exit 2 ;; esac
[ -e "$1" ] || exit 3
[ -d "$1" ] && [ ! -h "$1" ] && [ -O "$1" ] || exit 2
if [ -n "$2" ] && grep -q ozone-exec /proc/"$2"/cmdline 2>/dev/null; then
  [ -p "$1/ctl" ] && echo eof 1<>"$1/ctl"
  exit 4
fi
exec rm -rf -- "$1"
"""
_STATES = {0: "removed", 3: "gone", 4: "running"}


@dataclass(frozen=True)
class GcResult:
    removed: tuple[str, ...] = ()  # or would be, with dry_run
    kept: tuple[str, ...] = ()  # debris that cannot go yet, and why
    dry_run: bool = False


@dataclass
class _Sweep:
    """What a collection found so far (its steps add to it)."""

    dry_run: bool
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def collect(conn: libvirt.virConnect, *, dry_run: bool = False) -> GcResult:
    """Find (and unless ``dry_run``, remove) everything dead ozone processes left."""
    result = _Sweep(dry_run)
    result.removed += reap_runs(conn, dry_run=dry_run, open_others=True, skipped=result.kept)
    result.removed += prune_cache(conn, dry_run=dry_run)
    result.removed += store_debris(conn, dry_run=dry_run)
    _host_parts(result)
    _guest_leftovers(conn, result)
    _qmp_sockets(conn, result)
    return GcResult(tuple(result.removed), tuple(result.kept), dry_run)


def _host_parts(result: _Sweep) -> None:
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


def _guest_leftovers(conn: libvirt.virConnect, result: _Sweep) -> None:
    """Copies' folders and runs' folders in guests, left by an ozone that died."""
    for kind, script, name_ok in (
        ("cp-guest", _DISCARD_GUEST_PART, lambda p: GUEST_PART.fullmatch(p.rsplit("/", 1)[-1])),
        ("exec", _DISCARD_RUN_FOLDER, lambda p: p.rsplit("/", 2)[-2:-1] == [STAGE_FOLDER]),
    ):
        for lease in stale_leases(kind):
            path = str(lease.data.get("path", ""))
            where = f"{lease.data.get('vm', '?')}:{path}"
            if not name_ok(path):
                if not result.dry_run:
                    lease.release()  # it died before it made anything in the guest
                continue
            state = _in_guest(conn, lease.data, script, dry_run=result.dry_run)
            if state == "removed":
                result.removed.append(where)
            if state in ("removed", "gone") and not result.dry_run:
                lease.release()
            elif state not in ("removed", "gone"):
                result.kept.append(f"{where} ({state})")


def _in_guest(conn: libvirt.virConnect, data: dict[str, Any], script: str, *, dry_run: bool) -> str:
    """removed | gone (nothing there, or no such VM) | why it stays."""
    uri = str(data.get("uri") or "")
    try:
        other = open_connection(uri) if uri and uri != conn.getURI() else None
    except OzoneError as err:
        return err.message
    try:
        target = other or conn
        dom = find_domain_by_uuid(target, str(data.get("uuid")))
        if dom is None:
            return "gone"
        agent = Agent(dom)
        if not is_active(dom) or not agent.answers(timeout=2):
            return "the VM is not running: it stays until it runs"
        if dry_run:
            return "removed"
        pid = str(data.get("wrapper_pid") or "")
        code = agent.script(script, str(data.get("path")), pid).exit_code
        return _STATES.get(code, "not ozone's: left alone").replace(
            "running", "its program still runs (its stdin is closed now)"
        )
    finally:
        if other is not None:
            other.close()


def _qmp_sockets(conn: libvirt.virConnect, result: _Sweep) -> None:
    """Sockets in ozone's QMP folder whose VM is gone or has another endpoint now (the
    folder is this machine's: only its own VMs say whether a socket is in use)."""
    if not is_local(conn):
        return
    folder = qmp_folder(session=conn.getURI().startswith("qemu:///session"))
    if not folder.is_dir():
        return
    for sock in sorted(folder.glob("*.sock")):
        with contextlib.suppress(OSError):
            if not stat.S_ISSOCK(sock.lstat().st_mode):
                continue
            dom = find_domain(conn, sock.name.removesuffix(".sock"))
            meta = domain_metadata(dom) if dom is not None else None
            endpoint = meta.qmp_endpoint if meta is not None else None
            if endpoint is not None and endpoint.kind == "unix" and endpoint.path == str(sock):
                continue
            result.removed.append(str(sock))
            if not result.dry_run:
                sock.unlink()
