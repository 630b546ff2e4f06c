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
    LibvirtFailure,
    NotFoundError,
    OzoneError,
    StateError,
    TimeoutExpired,
)

if TYPE_CHECKING:
    from .domain_xml import HostFacts

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


def translate(
    err: libvirt.libvirtError, *, name: str | None = None, uri: str | None = None
) -> OzoneError:
    """Map a libvirt error to ozone's hierarchy by its error code (never by message text,
    except to add a hint for well-known causes)."""
    code = err.get_error_code()
    message = (err.get_error_message() or str(err)).strip()
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
    try:
        active = bool(dom.isActive())
    except libvirt.libvirtError:
        active = False
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


def call(fn: Callable[..., T], *args: Any, name: str | None = None, **kwargs: Any) -> T:
    """Run one libvirt call, translating its error."""
    try:
        return fn(*args, **kwargs)
    except libvirt.libvirtError as err:
        raise translate(err, name=name) from None


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    return call(conn.lookupByName, name, name=name)


def default_uri(uri: str | None = None) -> str | None:
    return uri or os.environ.get("LIBVIRT_DEFAULT_URI") or None


def open_connection(uri: str | None = None) -> libvirt.virConnect:
    uri = default_uri(uri)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise translate(err, uri=uri) from None
    if conn is None:  # pragma: no cover - older bindings
        raise ConnectionFailed(f"cannot connect to libvirt at {uri or 'the default URI'}")
    return conn


@contextlib.contextmanager
def connect(uri: str | None = None) -> Iterator[libvirt.virConnect]:
    conn = open_connection(uri)
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def is_local(conn: libvirt.virConnect) -> bool:
    """Does the hypervisor run on this machine (so host paths and ports are ours)?"""
    uri = conn.getURI()
    scheme, _, rest = uri.partition("://")
    host = rest.split("/", 1)[0]
    return ("+" not in scheme or scheme.endswith(("+unix", "+ext"))) and host in ("", "localhost")


def host_facts(conn: libvirt.virConnect) -> HostFacts:
    """Facts the domain XML depends on, read from the connection and the environment."""
    from lxml import etree

    from .domain_xml import HostFacts

    caps = etree.fromstring(call(conn.getCapabilities).encode())
    arch = caps.xpath("guest[arch/@name='x86_64']/arch")
    kvm = any(a.find("domain[@type='kvm']") is not None for a in arch)
    machines = frozenset(
        name
        for a in arch
        for m in a.iter("machine")
        for name in (m.text, m.get("canonical"))
        if name
    )
    uri = conn.getURI()
    if uri.startswith("qemu:///session") and os.getuid() != 0:
        log_dir = Path.home() / ".cache/libvirt/qemu/log"
    else:
        log_dir = Path("/var/log/libvirt/qemu")
    return HostFacts(kvm=kvm, log_dir=log_dir, accel_override=accel_override(), machines=machines)


def local_host_facts() -> HostFacts:
    """Best guess without a connection (for `ozone xml`)."""
    from .domain_xml import HostFacts

    kvm = os.path.exists("/dev/kvm")
    return HostFacts(kvm=kvm, accel_override=accel_override())


def accel_override() -> str | None:
    from .errors import UsageError

    value = os.environ.get("OZONE_ACCEL") or None
    if value is not None and value not in ("auto", "kvm", "tcg"):
        raise UsageError(
            f"OZONE_ACCEL={value!r} is not valid", hint="use auto, kvm or tcg (or unset it)"
        )
    return value
