"""Opening libvirt connections, and the one place libvirt errors become ozone errors."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import libvirt

from .errors import (
    AgentCommandFailed,
    AgentError,
    ConflictError,
    ConnectionFailed,
    ConnectionLost,
    LibvirtFailure,
    NotFoundError,
    OzoneError,
    StateError,
    TimeoutExpired,
)

if TYPE_CHECKING:
    from .domain_xml import HostFacts
    from .metadata import OzoneMetadata

T = TypeVar("T")


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr unless a handler is registered."""


libvirt.registerErrorHandler(_ignore_libvirt_error, None)

_NOT_FOUND = {
    libvirt.VIR_ERR_NO_DOMAIN: "no VM named {name!r}",
    libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT: "no such snapshot",
    libvirt.VIR_ERR_NO_NETWORK: "no such libvirt network",
    libvirt.VIR_ERR_NO_DOMAIN_METADATA: "the domain has no ozone metadata",
}


def _connection_broke(err: libvirt.libvirtError) -> bool:
    """Did an established connection break? (Its RPC layer reports it: "client socket is
    closed", "Cannot recv data: Connection reset by peer", ...)"""
    return err.get_error_domain() == libvirt.VIR_FROM_RPC and err.get_error_code() in (
        libvirt.VIR_ERR_INTERNAL_ERROR,
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_NO_CONNECT,
    )


def lost_connection(uri: str | None) -> ConnectionLost:
    return ConnectionLost(
        f"lost the connection to libvirt at {uri or 'the default URI'}",
        hint="did libvirtd restart or stop? scripts/setup-host starts it",
    )


def translate(
    err: libvirt.libvirtError, *, name: str | None = None, uri: str | None = None
) -> OzoneError:
    """Map a libvirt error to ozone's hierarchy by its error code (never by message text,
    except to add a hint for well-known causes). For errors of an open connection;
    :func:`open_connection` reports its own."""
    code = err.get_error_code()
    message = (err.get_error_message() or str(err)).strip()
    if _connection_broke(err):
        return lost_connection(uri)
    if code in _NOT_FOUND:
        text = _NOT_FOUND[code].format(name=name) if name else message
        hint = (
            "`ozone list --all` shows the VMs libvirt knows"
            if code == libvirt.VIR_ERR_NO_DOMAIN
            else None
        )
        return NotFoundError(text, hint=hint)
    if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_AUTH_FAILED) or (
        code == libvirt.VIR_ERR_SYSTEM_ERROR and "socket" in message
    ):
        return ConnectionFailed(
            f"cannot connect to libvirt at {uri or 'the default URI'}: {message}",
            hint="is libvirtd running? scripts/setup-host starts it; -c URI picks another host",
        )
    if code == libvirt.VIR_ERR_OPERATION_INVALID and "vhost-user-fs" in message:
        return StateError(
            f"{name or 'the VM'} shares host folders (virtio-fs), and QEMU cannot save the "
            "state of a VM with virtio-fs: no snapshots of it running, no saved state",
            hint="stop it for a snapshot of its disks, or share no folders with it",
        )
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return StateError(message)
    if code == libvirt.VIR_ERR_DOM_EXIST:
        return ConflictError(message)
    if code in (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED):
        return AgentError(
            f"the guest agent is not answering{f' in {name}' if name else ''}",
            hint="is qemu-guest-agent running in the guest? `ozone wait NAME` waits for it",
        )
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return TimeoutExpired(message)
    hint = None
    if "Address already in use" in message:
        hint = "another program listens on that port: pick another QMP endpoint or stop it"
        return ConflictError(message, hint=hint)
    if "Permission denied" in message:
        hint = (
            "QEMU runs as an unprivileged user (libvirt-qemu on Debian): every folder above an "
            "image must be searchable by it (chmod o+x); /var/lib/libvirt/images always is"
        )
    return LibvirtFailure(message, hint=hint)


def translate_agent_error(
    err: libvirt.libvirtError, dom: libvirt.virDomain, command: str
) -> OzoneError:
    """A failed guest-agent command, explained in terms of the VM: not running, no agent
    channel, agent not answering, or the guest's own refusal (its message kept)."""
    name = dom.name()
    code = err.get_error_code()
    message = (err.get_error_message() or str(err)).strip()
    marker = f"unable to execute QEMU agent command '{command}': "
    if marker in message:
        return AgentCommandFailed(command, message.split(marker, 1)[1], name=name)
    if _connection_broke(err) or not dom.connect().isAlive():
        return lost_connection(None)
    try:
        active = bool(dom.isActive())
    except libvirt.libvirtError as state_err:
        if state_err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            return translate(state_err, name=name)
        active = False  # a transient domain that stopped is gone
    if not active:
        return StateError(f"{name} is not running", hint=f"`ozone start {name} --wait`")
    if code == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED and "agent" in message.lower():
        return AgentError(
            f"{name} has no guest agent channel",
            hint='set "agent": true in its config and `ozone define` it again',
        )
    if code in (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED):
        return AgentError(
            f"the guest agent of {name} is not answering",
            hint=f"is the guest still booting? `ozone wait {name}` waits for its agent",
        )
    return translate(err, name=name)


@contextlib.contextmanager
def libvirt_errors(
    *,
    name: str | None = None,
    uri: str | None = None,
    explain: Callable[[libvirt.libvirtError], OzoneError | None] | None = None,
) -> Iterator[None]:
    """Translate a libvirt error raised inside into ozone's hierarchy. ``explain`` may say
    better what one call's error means (None: :func:`translate` it); it never sees a broken
    connection, which is always :class:`ConnectionLost`."""
    try:
        yield
    except libvirt.libvirtError as err:
        better = None if explain is None or _connection_broke(err) else explain(err)
        raise (better or translate(err, name=name, uri=uri)) from None


@contextlib.contextmanager
def best_effort() -> Iterator[None]:
    """Ignore any libvirt error: only for cleanup that may find its object gone already
    (a destroy after a failure, closing a connection), never for a question's answer."""
    with contextlib.suppress(libvirt.libvirtError):
        yield


def call(fn: Callable[..., T], *args: Any, name: str | None = None, **kwargs: Any) -> T:
    """Run one libvirt call, translating its error."""
    with libvirt_errors(name=name):
        return fn(*args, **kwargs)


def if_exists(
    fn: Callable[..., T],
    *args: Any,
    missing: int = libvirt.VIR_ERR_NO_DOMAIN,
    name: str | None = None,
) -> T | None:
    """Run one libvirt call for which "no such object" is an answer: None when it fails
    with exactly the ``missing`` error code; any other error (a dropped connection, a
    refused permission) is translated and raised, never taken for "not there"."""
    try:
        return fn(*args)
    except libvirt.libvirtError as err:
        if err.get_error_code() == missing and not _connection_broke(err):
            return None
        raise translate(err, name=name) from None


def refused_with(fn: Callable[..., Any], *args: Any, code: int, name: str | None = None) -> bool:
    """Run one libvirt call that may be refused with the error ``code`` (which the caller
    answers, e.g. by asking again with a flag): True if it was; other errors translated."""
    try:
        fn(*args)
    except libvirt.libvirtError as err:
        if err.get_error_code() == code and not _connection_broke(err):
            return True
        raise translate(err, name=name) from None
    return False


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    return call(conn.lookupByName, name, name=name)


def find_domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    """The domain named ``name``, or None if libvirt has none."""
    return if_exists(conn.lookupByName, name, name=name)


def find_domain_by_uuid(
    conn: libvirt.virConnect, uuid: str, *, name: str | None = None
) -> libvirt.virDomain | None:
    return if_exists(conn.lookupByUUIDString, uuid, name=name)


def find_network(conn: libvirt.virConnect, name: str) -> libvirt.virNetwork | None:
    return if_exists(conn.networkLookupByName, name, missing=libvirt.VIR_ERR_NO_NETWORK)


def find_pool(conn: libvirt.virConnect, name: str) -> libvirt.virStoragePool | None:
    return if_exists(conn.storagePoolLookupByName, name, missing=libvirt.VIR_ERR_NO_STORAGE_POOL)


def find_volume(conn: libvirt.virConnect, path: str) -> libvirt.virStorageVol | None:
    return if_exists(conn.storageVolLookupByPath, path, missing=libvirt.VIR_ERR_NO_STORAGE_VOL)


def find_snapshot(dom: libvirt.virDomain, snap: str) -> libvirt.virDomainSnapshot | None:
    return if_exists(dom.snapshotLookupByName, snap, 0, missing=libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT)


def default_uri(uri: str | None = None) -> str | None:
    return uri or os.environ.get("LIBVIRT_DEFAULT_URI") or None


CONNECT_TIMEOUT_ENV = "OZONE_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 10.0


def connect_timeout() -> float:
    """How long opening a connection may take: ``$OZONE_CONNECT_TIMEOUT`` seconds, else 10."""
    from .errors import UsageError

    raw = os.environ.get(CONNECT_TIMEOUT_ENV)
    if not raw:
        return DEFAULT_CONNECT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise UsageError(
            f"{CONNECT_TIMEOUT_ENV}={raw[:40]!r} is not valid", hint="a number of seconds above 0"
        )
    return value


def _open_within(uri: str | None, timeout: float) -> libvirt.virConnect | None:
    """``libvirt.open(uri)`` that gives up after ``timeout`` seconds (None): a host that
    takes the TCP connection but never answers (a silent listener, a stuck daemon, a
    firewall that drops packets) would hold libvirt's open for minutes, or for ever. The
    open goes on in a daemon thread, which closes what it gets if nobody waits any more."""
    import threading

    got: list[libvirt.virConnect] = []
    failed: list[libvirt.libvirtError] = []
    lock = threading.Lock()
    gave_up = threading.Event()
    done = threading.Event()

    def work() -> None:
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as err:
            failed.append(err)
        else:
            with lock:
                if gave_up.is_set():
                    close_quietly(conn)
                else:
                    got.append(conn)
        finally:
            done.set()

    threading.Thread(target=work, name=f"open {uri}", daemon=True).start()
    done.wait(timeout)
    with lock:
        if got:
            return got[0]
        if failed:
            raise failed[0]
        gave_up.set()
    return None


def open_connection(
    uri: str | None = None, *, host: str | None = None, timeout: float | None = None
) -> libvirt.virConnect:
    """A connection to ``uri`` (None: ``$LIBVIRT_DEFAULT_URI``, else libvirt's default);
    ``host``: the inventory's name for it, which errors then name. Gives up after
    ``timeout`` seconds (default: :func:`connect_timeout`)."""
    uri = default_uri(uri)
    where = f"host {host} ({uri})" if host else f"libvirt at {uri or 'the default URI'}"
    hint = (
        f"is {host} up, and its libvirtd listening? (`ozone list --all-hosts` shows which "
        "hosts answer)"
        if host
        else "is libvirtd running? scripts/setup-host starts it; -c URI picks another host"
    )
    seconds = connect_timeout() if timeout is None else timeout
    try:
        conn = _open_within(uri, seconds)
    except libvirt.libvirtError as err:
        message = (err.get_error_message() or str(err)).strip()
        raise ConnectionFailed(f"cannot connect to {where}: {message}", hint=hint) from None
    if conn is None:
        raise ConnectionFailed(
            f"cannot connect to {where}: no answer within {seconds:g} s",
            hint=f"{hint}; ${CONNECT_TIMEOUT_ENV} sets the wait",
        )
    return conn


def domain_metadata(dom: libvirt.virDomain, *, defined: bool = False) -> OzoneMetadata | None:
    """ozone's facts about a domain (None for a domain ozone did not make): those of the
    running VM (what QEMU was started with), or with ``defined`` those of its definition,
    which a redefine changes at once (a transient domain has only the first)."""
    from .metadata import OZONE_NS, parse_metadata

    kind = libvirt.VIR_DOMAIN_METADATA_ELEMENT
    try:
        if defined:
            try:
                return parse_metadata(
                    dom.metadata(kind, OZONE_NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
                )
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                    raise  # (OPERATION_INVALID: a transient domain has no definition)
        return parse_metadata(dom.metadata(kind, OZONE_NS, 0))
    except libvirt.libvirtError as err:
        if err.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_NO_DOMAIN):
            return None
        raise translate(err, name=dom.name()) from None


@contextlib.contextmanager
def connect(uri: str | None = None, *, host: str | None = None) -> Iterator[libvirt.virConnect]:
    conn = open_connection(uri, host=host)
    try:
        yield conn
    finally:
        close_quietly(conn)


def close_quietly(conn: libvirt.virConnect) -> None:
    """Close a connection that may have broken already."""
    with best_effort():
        conn.close()


def is_local(conn: libvirt.virConnect) -> bool:
    """Does the hypervisor run on this machine (so host paths and ports are ours)?"""
    uri = conn.getURI()
    scheme, _, rest = uri.partition("://")
    host = rest.split("/", 1)[0]
    return ("+" not in scheme or scheme.endswith(("+unix", "+ext"))) and host in ("", "localhost")


def host_uuid(conn: libvirt.virConnect) -> str:
    """The host's UUID (from its capabilities): what tells two hosts apart, whatever URIs
    reach them."""
    from xml.etree import ElementTree

    caps = ElementTree.fromstring(call(conn.getCapabilities))
    return caps.findtext("host/uuid") or call(conn.getURI)


def host_facts(conn: libvirt.virConnect) -> HostFacts:
    """Facts the domain XML depends on, read from the connection and the environment."""
    from lxml import etree

    from .domain_xml import HostFacts

    caps = etree.fromstring(call(conn.getCapabilities).encode())
    arch = caps.findall("guest/arch[@name='x86_64']")
    kvm = any(a.find("domain[@type='kvm']") is not None for a in arch)
    machines = frozenset(
        name
        for a in arch
        for m in a.iter("machine")
        for name in (m.text, m.get("canonical"))
        if name
    )
    uri = conn.getURI()
    session = uri.startswith("qemu:///session") and os.getuid() != 0
    log_dir = Path.home() / ".cache/libvirt/qemu/log" if session else Path("/var/log/libvirt/qemu")
    if not is_local(conn):  # a pool of ozone's there, read back through libvirt
        from .hostpaths import LOGS_DIR

        log_dir = LOGS_DIR
    # the user libvirt runs QEMU as, for each domain type (none in a session: ourselves)
    labels = {
        label.get("type"): label.text
        for model in caps.iterfind("host/secmodel")
        if model.findtext("model") == "dac"
        for label in model.iterfind("baselabel")
        if label.text
    }
    override = accel_override()
    qemu_label = labels.get("qemu") or labels.get("kvm")
    qmp_dir = None
    if is_local(conn):
        from .state import qmp_folder

        qmp_dir = qmp_folder(session=session)
    return HostFacts(
        kvm=kvm,
        log_dir=log_dir,
        accel_override=override,
        machines=machines,
        qmp_dir=qmp_dir,
        qemu_label=qemu_label,
    )


def local_host_facts() -> HostFacts:
    """Best guess without a connection (for `ozone xml`)."""
    from .domain_xml import HostFacts
    from .state import VIRTIOFSD_RO, qmp_folder

    kvm = os.path.exists("/dev/kvm")
    qmp_dir = qmp_folder(session=os.getuid() != 0)
    guard = VIRTIOFSD_RO if os.getuid() == 0 else None  # what define installs as root
    return HostFacts(kvm=kvm, accel_override=accel_override(), qmp_dir=qmp_dir, virtiofsd_ro=guard)


def accel_override() -> str | None:
    from .errors import UsageError

    value = os.environ.get("OZONE_ACCEL") or None
    if value is not None and value not in ("auto", "kvm", "tcg"):
        raise UsageError(
            f"OZONE_ACCEL={value!r} is not valid", hint="use auto, kvm or tcg (or unset it)"
        )
    return value
