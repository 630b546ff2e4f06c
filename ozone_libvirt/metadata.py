"""ozone's facts about a VM, kept in its domain's ``<metadata>`` under ozone's namespace.

Pure: parsing only. :mod:`.domain_xml` writes the element, :func:`.connection.domain_metadata`
reads it from libvirt.
"""

from __future__ import annotations

from typing import NamedTuple

OZONE_NS = "https://ozone-vm.dev/xmlns/libvirt-domain/1"
OZONE_PREFIX = "ozone"
_FIELDS = ("source", "hash", "qmp", "stage-dir", "cloud-init", "ssh-user", "config", "xml-hash")


class OzoneMetadata(NamedTuple):
    source: str | None  # the config file the VM was defined from
    hash: str | None  # of the normalised config
    qmp_endpoint: QmpEndpoint | None  # the QMP passthrough endpoint given to QEMU
    stage_dir: str | None = None  # the guest folder `ozone exec` stages output in
    cloud_init: bool = False  # the VM has a cloud-init seed: ready is when cloud-init is done
    forwards: tuple[Forward, ...] = ()  # host ports QEMU forwards to the guest
    ssh_user: str | None = None  # who `ozone ssh` logs in as (None: root)
    config: str | None = None  # the normalised config, as JSON (what `ozone apply` compares)
    xml_hash: str | None = None  # of the definition ozone wrote (without this element)

    @property
    def qmp(self) -> str | None:
        return str(self.qmp_endpoint) if self.qmp_endpoint else None

    @property
    def ssh_forward(self) -> Forward | None:
        """The loopback forward to the guest's port 22, if the VM has one."""
        return next((f for f in self.forwards if f.is_ssh), None)


def parse_metadata(xml: str | bytes | None) -> OzoneMetadata | None:
    """ozone's metadata from a domain XML, or from the ``<ozone:vm>`` element alone (which
    is what ``virDomainGetMetadata`` returns). With the expat parser alone: no tree, no
    ElementTree import (`ozone exec` and `ozone list` read metadata on every run)."""
    if not xml:
        return None
    import pyexpat

    parser = pyexpat.ParserCreate(namespace_separator=" ")
    path: list[str] = []  # element names from the root down, namespace dropped
    vm_depth: int | None = None
    texts: dict[str, str] = {}
    port_auto = False
    forwards: list[list[str]] = []  # [text, auto] of each <forward>

    def start(name: str, attrs: dict[str, str]) -> None:
        nonlocal vm_depth, port_auto
        namespace, _, tag = name.rpartition(" ")
        path.append(tag)
        at_vm = path in (["vm"], ["domain", "metadata", "vm"])
        if vm_depth is None and at_vm and namespace in ("", OZONE_NS):
            vm_depth = len(path)
        elif vm_depth is not None and len(path) == vm_depth + 1 and tag in _FIELDS:
            texts.setdefault(tag, "")
            port_auto = port_auto or (tag == "qmp" and attrs.get("port") == "auto")
        elif vm_depth is not None and len(path) == vm_depth + 1 and tag == "forward":
            forwards.append(["", attrs.get("port", "")])

    def end(_name: str) -> None:
        nonlocal vm_depth
        if vm_depth is not None and len(path) == vm_depth:
            vm_depth = -1  # done: later elements of that name are not ours
        path.pop()

    def data(text: str) -> None:
        if vm_depth is not None and vm_depth > 0 and len(path) == vm_depth + 1:
            tag = path[-1]
            if tag == "forward" and forwards:
                forwards[-1][0] += text
            elif tag in texts:
                texts[tag] += text

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = data
    parser.Parse(xml, True)
    if vm_depth is None:
        return None
    qmp = texts.get("qmp")
    return OzoneMetadata(
        source=texts.get("source") or None,
        hash=texts.get("hash") or None,
        qmp_endpoint=QmpEndpoint.parse(qmp, auto=port_auto) if qmp else None,
        stage_dir=texts.get("stage-dir") or None,
        cloud_init="cloud-init" in texts,
        forwards=tuple(
            f for text, auto in forwards if (f := Forward.parse(text, auto=auto == "auto"))
        ),
        ssh_user=texts.get("ssh-user") or None,
        config=texts.get("config") or None,
        xml_hash=texts.get("xml-hash") or None,
    )


class Forward(NamedTuple):
    """A host port QEMU's user networking forwards to a guest port, as given to QEMU.
    ``auto``: ozone chose the host port (the ssh forward; it may move when another program
    takes it); the metadata records this as ``port="auto"``."""

    protocol: str  # "tcp" | "udp"
    host: str  # IPv4 address
    port: int
    guest: int
    auto: bool = False

    def __str__(self) -> str:
        return f"{self.protocol}:{self.host}:{self.port}:{self.guest}"

    @classmethod
    def parse(cls, text: str, *, auto: bool = False) -> Forward | None:
        """``PROTO:HOST:PORT:GUESTPORT`` as written in the metadata (None if not that)."""
        parts = text.split(":")
        if len(parts) != 4 or parts[0] not in ("tcp", "udp"):
            return None
        if not all(p.isascii() and p.isdigit() and len(p) <= 5 for p in parts[2:]):
            return None
        return cls(parts[0], parts[1], int(parts[2]), int(parts[3]), auto)

    @property
    def is_ssh(self) -> bool:
        return self.protocol == "tcp" and self.guest == 22 and self.host.startswith("127.")

    def overlaps(self, other: Forward) -> bool:
        """Both would listen on one host socket (0.0.0.0 covers every address)."""
        return (
            self.protocol == other.protocol
            and self.port == other.port
            and (self.host == other.host or "0.0.0.0" in (self.host, other.host))
        )

    def hostfwd(self) -> str:
        """The value of a ``hostfwd`` option of QEMU's ``-netdev user``."""
        return f"{self.protocol}:{self.host}:{self.port}-:{self.guest}"


class QmpEndpoint(NamedTuple):
    """Where QEMU serves a VM's QMP passthrough: a loopback (or, when a config says so, any)
    TCP port, or a unix socket. ``auto``: ozone chose the TCP port (and may move it when
    another program takes it); the metadata records this as ``port="auto"``."""

    kind: str  # "tcp" | "unix"
    host: str | None = None
    port: int | None = None
    path: str | None = None
    auto: bool = False

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    @classmethod
    def parse(cls, text: str, *, auto: bool = False) -> QmpEndpoint | None:
        """``tcp:HOST:PORT`` or ``unix:PATH`` as written in the metadata (None if neither)."""
        kind, _, rest = text.partition(":")
        if kind == "unix" and rest:
            return cls("unix", path=rest)
        host, _, port = rest.rpartition(":")
        if kind == "tcp" and host and port.isascii() and port.isdigit():
            return cls("tcp", host=host.strip("[]"), port=int(port), auto=auto)
        return None

    def qemu_arg(self) -> str:
        """The value of QEMU's ``-qmp`` option."""
        return f"{self},server=on,wait=off"
