"""Moving a VM to another libvirt host: `ozone migrate NAME HOST [--live] [--copy-storage]`.

The VM stays one VM: it keeps its UUID, ozone's metadata and its QMP endpoint, is defined
(persistent) on the destination and leaves the source. Before anything moves, the
destination is checked: reachable, no VM of that name or UUID, no VM there holding the VM's
QMP endpoint or forwarded ports, and every file the VM needs but that is not copied (its
cdrom, kernel, backing images, and its disks without ``copy_storage``) at the same path.
A failed or aborted migration leaves the VM running where it was, and nothing of it on the
destination.

Pure decisions (:func:`needs`, :func:`clash`, :func:`migration_flags`) are separate from the
libvirt side effects: probing the destination's folders through storage pools, making the
folders the VM needs there, and the migration job.

The client opens both connections and drives the migration (libvirt's "managed direct"
migration, like `virsh migrate` without ``--p2p``): HOST means what it means to the user,
as ``-c`` does. Peer-to-peer would have the source's libvirtd open HOST itself, where
``qemu:///system`` names the source host and a ``qemu+ssh`` URI needs root's ssh keys there.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
from lxml import etree
from lxml.builder import E

from . import domain_xml as dx
from .connection import (
    best_effort,
    call,
    close_quietly,
    domain_metadata,
    find_domain,
    find_domain_by_uuid,
    if_exists,
    libvirt_errors,
    lookup,
    open_connection,
)
from .errors import (
    ConflictError,
    ConnectionFailed,
    LibvirtFailure,
    NotFoundError,
    OzoneError,
    StateError,
    TimeoutExpired,
    UsageError,
)
from .hostfiles import folder_pool, present_on
from .inventory import is_active, state_name
from .metadata import Forward, OzoneMetadata
from .state import SYSTEM_STATE
from .storage import parse_label

POLL = 0.2
DEFAULT_TIMEOUT = 600.0
# where ozone keeps `qmp: auto` sockets on a host (root's libvirt): a folder QEMU's user owns
QMP_FOLDER = SYSTEM_STATE / "qmp"

Report = Callable[[str], None]
Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class MigrateResult:
    name: str
    uuid: str
    host: str  # the destination as the user named it
    uri: str  # the destination's libvirt URI
    mode: str  # live | paused (QEMU stopped while its memory moved) | offline (definition only)
    state: str  # the VM's state on the destination
    seconds: float
    bytes_copied: int  # memory and disk data sent
    disks_copied: tuple[str, ...] = ()
    # copied disks whose originals stay on the source host (nothing is deleted by a move)
    left_on_source: tuple[str, ...] = ()
    made_on_destination: tuple[str, ...] = ()  # folders made there for the VM


def resolve_host(text: str) -> tuple[str, str]:
    """(name, URI) of a destination given on the command line: a libvirt URI (anything with
    ``://``) is its own name; anything else names a host of the host inventory."""
    if "://" in text:
        return text, text
    from .hosts import load_inventory

    inventory = load_inventory(wanted=f"migrate to {text[:64]!r}")
    found = inventory.find(text)
    if found is None:
        message, hint = inventory.unknown(text)
        raise UsageError(message, hint=f"{hint}; or give the destination's libvirt URI")
    return found.name, found.uri


# --- pure decisions -----------------------------------------------------------------------


@dataclass(frozen=True)
class Needs:
    """What a VM needs on the destination, from its domain XML."""

    present: tuple[dx.FileUse, ...]  # files that must be there already, at the same path
    copied: tuple[Path, ...]  # writable disks libvirt copies (must not be there yet)
    socket_folder: Path | None  # the folder of its QMP unix socket


def needs(xml: str, meta: OzoneMetadata | None, *, copy_storage: bool) -> Needs:
    """Files a VM uses that are not copied must exist on the destination; with
    ``copy_storage`` its writable disks are copied there (into a folder libvirt makes them
    in: that of a storage pool)."""
    present = []
    copied = []
    for use in dx.files_of(xml):
        if use.role == "disk" and copy_storage:
            copied.append(use.path)
        elif use not in present:
            present.append(use)
    endpoint = meta.qmp_endpoint if meta else None
    folder = None
    if endpoint is not None and endpoint.kind == "unix" and endpoint.path:
        folder = Path(endpoint.path).parent
    return Needs(tuple(present), tuple(copied), folder)


def migration_flags(*, running: bool, persistent: bool, live: bool, copy_storage: bool) -> int:
    """libvirt's flags for the move: the VM stays defined (persistent) on the destination and
    leaves the source; a stopped VM moves its definition alone (an offline migration)."""
    flags: int = libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    if persistent:
        flags |= libvirt.VIR_MIGRATE_PERSIST_DEST
    if not running:
        flags |= libvirt.VIR_MIGRATE_OFFLINE
        return flags
    if live:
        flags |= libvirt.VIR_MIGRATE_LIVE
    if copy_storage:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
    return flags


@dataclass(frozen=True)
class Destination:
    """What the destination holds that the VM could clash with."""

    label: str  # the host, for messages
    same_name: str | None  # UUID of a domain there of the VM's name
    same_uuid: str | None  # name of a domain there of the VM's UUID
    qmp: dict[str, str] = field(default_factory=dict)  # endpoint → VM name
    ports: list[tuple[Forward, str]] = field(default_factory=list)  # host ports → VM name


def clash(name: str, uuid: str, meta: OzoneMetadata | None, there: Destination) -> str | None:
    """Why the VM cannot arrive on the destination (None: it can)."""
    host = there.label
    if there.same_name is not None:
        if there.same_name == uuid:
            return f"{name} is on {host} already (the same UUID: is that its own host?)"
        return f"{host} has a VM named {name!r} already"
    if there.same_uuid is not None:
        return f"{host} has a VM with the UUID of {name} already: {there.same_uuid!r}"
    if meta is None:
        return None
    endpoint = meta.qmp_endpoint
    if endpoint is not None and str(endpoint) in there.qmp:
        user = there.qmp[str(endpoint)]
        return f"{endpoint}, the QMP endpoint of {name}, is that of VM {user!r} on {host}"
    held = list(meta.forwards)
    if endpoint is not None and endpoint.kind == "tcp" and endpoint.host and endpoint.port:
        held.append(Forward("tcp", endpoint.host, endpoint.port, 0))
    for mine in held:
        owner = next((vm for other, vm in there.ports if mine.overlaps(other)), None)
        if owner is not None:
            what = "QMP port" if mine.guest == 0 else "forwarded port"
            return (
                f"{mine.host}:{mine.port}/{mine.protocol}, a {what} of {name}, is held by VM "
                f"{owner!r} on {host}"
            )
    return None


def missing_hint(missing: list[dx.FileUse]) -> str:
    roles = {use.role for use in missing}
    if roles & {"disk"}:
        return (
            "a disk that is not on shared storage moves with --copy-storage; copy the other "
            "files to the same path there (or keep them on storage both hosts share)"
        )
    return "copy them to the same path there, or keep them on storage both hosts share"


# --- the destination's file system, through libvirt -----------------------------------------


def qemu_owner(conn: libvirt.virConnect) -> tuple[int, int] | None:
    """uid and gid QEMU runs as on ``conn``'s host (None: unknown)."""
    caps = etree.fromstring(call(conn.getCapabilities).encode())
    for model in caps.iterfind("host/secmodel"):
        if model.findtext("model") != "dac":
            continue
        for label in model.iterfind("baselabel"):
            if label.get("type") in ("kvm", "qemu") and label.text:
                return parse_label(label.text)
    return None


# --- the move -------------------------------------------------------------------------------


@dataclass
class _Made:
    """What was made on the destination for the VM, to remove again if the move fails."""

    folders: list[Path] = field(default_factory=list)
    copies: list[Path] = field(default_factory=list)  # read-only files copied there
    pools: list[libvirt.virStoragePool] = field(default_factory=list)  # ours, for copied disks
    built: list[libvirt.virStoragePool] = field(default_factory=list)  # their folders made
    disks: list[Path] = field(default_factory=list)  # copied disks (libvirt makes them)


def migrate(
    conn: libvirt.virConnect,
    name: str,
    dest_uri: str,
    *,
    live: bool,
    copy_storage: bool,
    host: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    report: Report | None = None,
    progress: Progress | None = None,
) -> MigrateResult:
    """Move VM ``name`` from ``conn``'s host to ``dest_uri`` (``host``: its name, for
    messages). ``report`` hears what is done, ``progress`` the bytes sent of those to send.
    After ``timeout`` seconds (or on Ctrl-C) the job is aborted: the VM runs on where it was."""
    say = report or (lambda _text: None)
    label = host or dest_uri
    began = time.monotonic()
    dom = lookup(conn, name)
    uuid = dom.UUIDString()
    running = is_active(dom)
    persistent = bool(call(dom.isPersistent, name=name))
    if not running and (live or copy_storage):
        option = "--live" if live else "--copy-storage"
        raise StateError(
            f"{name} is not running: {option} moves a running VM",
            hint=f"without {option} ozone moves a stopped VM's definition (its disks must be "
            f"on {label} already), or `ozone start {name}` first",
        )
    if not running and state_name(dom) == "saved":
        raise StateError(
            f"{name} has saved state, which a move would lose",
            hint=f"`ozone start {name}` resumes it; then move it running",
        )
    xml = call(dom.XMLDesc, 0, name=name)
    meta = domain_metadata(dom)
    plan = needs(xml, meta, copy_storage=copy_storage)
    say(f"connecting to {label}")
    try:
        dconn = open_connection(dest_uri)
    except ConnectionFailed as err:
        raise ConnectionFailed(
            f"cannot reach {label}: {err.message}" if label != dest_uri else err.message,
            hint=f"is libvirtd running there, and listening? `virsh -c {dest_uri} uri` tries it",
        ) from None
    try:
        say(f"checking {label}")
        to_copy = _check_destination(dconn, name, uuid, meta, plan, label=label)
        made = _Made()
        try:
            _prepare(dconn, plan, made, label=label)
            for use in to_copy:
                say(f"copying {use.path.name} to {label}")
                _copy_there(conn, dconn, use, made)
            flags = migration_flags(
                running=running, persistent=persistent, live=live, copy_storage=copy_storage
            )
            say(f"moving to {label}" if running else f"moving the definition to {label}")
            moved = _run_job(
                dom, dconn, flags, name=name, label=label, timeout=timeout, progress=progress
            )
        except BaseException:
            with contextlib.suppress(OzoneError):  # (the move's own error says more)
                _undo(dconn, made)
                _wait_gone(dconn, uuid)
            raise
        finally:
            for pool in made.pools:
                with best_effort():
                    pool.destroy()
        stats = if_exists(moved.jobStats, libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED, name=name) or {}
        mode = "offline" if not running else "live" if live else "paused"
        return MigrateResult(
            name=name,
            uuid=uuid,
            host=label,
            uri=dest_uri,
            mode=mode,
            state=state_name(moved),
            seconds=round(time.monotonic() - began, 3),
            bytes_copied=int(stats.get("data_processed", 0)),
            disks_copied=tuple(str(p) for p in plan.copied),
            left_on_source=tuple(str(p) for p in plan.copied),
            made_on_destination=tuple(str(p) for p in [*made.folders, *made.copies]),
        )
    finally:
        close_quietly(dconn)


def _check_destination(
    dconn: libvirt.virConnect,
    name: str,
    uuid: str,
    meta: OzoneMetadata | None,
    plan: Needs,
    *,
    label: str,
) -> list[dx.FileUse]:
    """Refuse a move that cannot work; return the read-only files the destination lacks,
    which ozone copies there (at the same path) before the move."""
    from .vm import neighbours

    same_name = find_domain(dconn, name)
    same_uuid = find_domain_by_uuid(dconn, uuid)
    around = neighbours(dconn, local=False)
    there = Destination(
        label=label,
        same_name=same_name.UUIDString() if same_name is not None else None,
        same_uuid=same_uuid.name() if same_uuid is not None else None,
        qmp=around.qmp,
        ports=around.ports,
    )
    problem = clash(name, uuid, meta, there)
    if problem:
        raise ConflictError(
            f"{problem}: nothing was moved",
            hint=f"`ozone -c {label} list --all` shows the VMs there",
        )
    wanted = [use.path for use in plan.present] + list(plan.copied)
    found = present_on(dconn, wanted)
    absent = [use for use in plan.present if use.path not in found]
    missing = [use for use in absent if use.role not in READ_ONLY_ROLES]
    if missing:
        raise NotFoundError(
            f"{label} lacks files {name} needs: "
            + ", ".join(f"{use.path} ({use.role})" for use in missing)
            + "; nothing was moved",
            hint=missing_hint(missing),
        )
    there_already = [p for p in plan.copied if p in found]
    if there_already:
        raise ConflictError(
            f"{label} has a file where {name}'s disk would be copied to: "
            + ", ".join(map(str, there_already))
            + "; nothing was moved",
            hint="copying would overwrite it: remove or move it there first",
        )
    folder = plan.socket_folder
    if folder is not None and folder != QMP_FOLDER:
        with folder_pool(dconn, folder) as pool:
            if pool is None:
                raise NotFoundError(
                    f"{label} has no folder {folder} for the QMP socket of {name}; "
                    "nothing was moved",
                    hint="make it there, or give the VM `qmp: auto` and `ozone define` it again",
                )
    return [use for use in absent if use.role in READ_ONLY_ROLES]


# what a VM only reads: copied to the destination when it lacks them (writable disks move
# only with --copy-storage, through the migration itself)
READ_ONLY_ROLES = frozenset({"cdrom", "kernel", "initrd", "read-only disk", "backing image"})


def _copy_there(
    conn: libvirt.virConnect, dconn: libvirt.virConnect, use: dx.FileUse, made: _Made
) -> None:
    """Copy one read-only file to the same path on the destination: QEMU's user's there,
    0400 (it may be private: a cloud-init seed holds secrets; nobody else needs it)."""
    from .hostfiles import copy_between

    made.copies.append(use.path)
    copy_between(conn, dconn, use.path, mode="0400", owner=qemu_owner(dconn))


def _prepare(dconn: libvirt.virConnect, plan: Needs, made: _Made, *, label: str) -> None:
    """Make on the destination what the VM needs there: ozone's QMP socket folder (QEMU's
    user's, 0700, as on every host of ozone's) and a storage pool for each folder of a
    copied disk (libvirt makes a copied disk in the pool that covers its folder)."""
    if plan.socket_folder == QMP_FOLDER:
        with folder_pool(dconn, QMP_FOLDER) as pool:
            there = pool is not None
        if not there:
            owner = qemu_owner(dconn)
            with folder_pool(dconn, QMP_FOLDER, build=True, mode="0700", owner=owner):
                made.folders.append(QMP_FOLDER)
    for folder in sorted({p.parent for p in plan.copied}):
        found = if_exists(
            dconn.storagePoolLookupByTargetPath,
            str(folder),
            missing=libvirt.VIR_ERR_NO_STORAGE_POOL,
        )
        if found is not None:
            continue
        with folder_pool(dconn, folder) as pool:
            exists = pool is not None
        xml = etree.tostring(
            E.pool(
                E.name(f"ozone-migrate-{secrets.token_hex(4)}"),
                E.target(E.path(str(folder))),
                type="dir",
            ),
            encoding="unicode",
        )
        flags = 0 if exists else libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD
        pool = call(dconn.storagePoolCreateXML, xml, flags)
        made.pools.append(pool)
        if not exists:
            made.built.append(pool)
            made.folders.append(folder)
    made.disks.extend(plan.copied)


def _undo(dconn: libvirt.virConnect, made: _Made) -> None:
    """The move failed: remove the copies of disks and files and the folders made for it."""
    for disk in [*made.disks, *made.copies]:
        vol = if_exists(
            dconn.storageVolLookupByPath, str(disk), missing=libvirt.VIR_ERR_NO_STORAGE_VOL
        )
        if vol is not None:
            with best_effort():
                vol.delete(0)
    for pool in made.built:
        with best_effort():
            pool.delete(0)  # removes the folder it made (when empty)
    # (ozone's QMP folder made there stays, as every define on a host keeps it)


def _wait_gone(dconn: libvirt.virConnect, uuid: str, *, timeout: float = 30) -> None:
    """After a failed move the destination drops the VM's incoming QEMU a moment later:
    return once it has (or ``timeout`` passed), so that nothing of the VM is left there."""
    deadline = time.monotonic() + timeout
    while find_domain_by_uuid(dconn, uuid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)


def _run_job(
    dom: libvirt.virDomain,
    dconn: libvirt.virConnect,
    flags: int,
    *,
    name: str,
    label: str,
    timeout: float,
    progress: Progress | None,
) -> libvirt.virDomain:
    """Run the migration job in a thread while this one watches it: shows its progress,
    aborts it when ``timeout`` passes or Ctrl-C (SIGTERM) arrives."""
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            with libvirt_errors(name=name, explain=_explain(name, label)):
                outcome["dom"] = dom.migrate3(dconn, {}, flags)
        except BaseException as err:  # handed to the watching thread
            outcome["error"] = err

    worker = threading.Thread(target=work, name=f"migrate {name}", daemon=True)
    deadline = time.monotonic() + timeout
    timed_out = False
    worker.start()
    try:
        while worker.is_alive():
            worker.join(POLL)
            if not worker.is_alive():
                break
            if progress is not None:
                stats = if_exists(dom.jobStats, 0, name=name) or {}
                if stats.get("data_total"):
                    progress(int(stats.get("data_processed", 0)), int(stats["data_total"]))
            if time.monotonic() > deadline:
                timed_out = True
                _abort(dom)  # again each time: the job may not have begun at the first
    except KeyboardInterrupt:
        _abort(dom)
        worker.join()
        raise
    if "error" in outcome:
        err = outcome["error"]
        if timed_out:
            raise TimeoutExpired(
                f"the move of {name} to {label} did not finish within {timeout:g} s and was "
                f"aborted: {name} runs on where it was",
                hint="a busy or big VM needs longer: --timeout S",
            ) from None
        raise err
    moved: libvirt.virDomain = outcome["dom"]
    return moved


def _abort(dom: libvirt.virDomain) -> None:
    with best_effort():  # the job may have just ended
        dom.abortJob()


def _explain(name: str, label: str) -> Callable[[libvirt.libvirtError], OzoneError | None]:
    """A failed migration, in the VM's terms: it runs on where it was."""

    def explain(err: libvirt.libvirtError) -> OzoneError | None:
        message = (err.get_error_message() or str(err)).strip()
        if err.get_error_code() == libvirt.VIR_ERR_OPERATION_ABORTED:
            return LibvirtFailure(
                f"the move of {name} to {label} was aborted: {name} runs on where it was"
            )
        hint = f"{name} runs on where it was; `ozone -c {label} list --all` shows that host's VMs"
        if err.get_error_code() == libvirt.VIR_ERR_MIGRATE_UNSAFE:
            hint = f"a disk of {name} is not on storage both hosts share: --copy-storage copies it"
        elif "host forwarding rule" in message or "Address already in use" in message:
            hint = (
                f"a port {name} listens on is taken on {label}: stop what holds it there; "
                f"{name} runs on where it was"
            )
        return LibvirtFailure(f"moving {name} to {label} failed: {message}", hint=hint)

    return explain
