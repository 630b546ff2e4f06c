"""ozone's facts about a VM, kept in its domain's ``<metadata>`` under ozone's namespace.

Pure: parsing only (with the standard library's ElementTree, which `ozone exec` can afford
to import; lxml costs it 50 ms). :mod:`.domain_xml` writes the element,
:func:`.connection.domain_metadata` reads it from libvirt.
"""

from __future__ import annotations

from dataclasses import dataclass

OZONE_NS = "https://ozone-vm.dev/xmlns/libvirt-domain/1"
OZONE_PREFIX = "ozone"


@dataclass(frozen=True)
class OzoneMetadata:
    source: str | None  # the config file the VM was defined from
    hash: str | None  # of the normalised config
    qmp_endpoint: QmpEndpoint | None  # the QMP passthrough endpoint given to QEMU
    stage_dir: str | None = None  # the guest folder `ozone exec` stages output in

    @property
    def qmp(self) -> str | None:
        return str(self.qmp_endpoint) if self.qmp_endpoint else None


def parse_metadata(xml: str | bytes | None) -> OzoneMetadata | None:
    """ozone's metadata from a domain XML, or from the ``<ozone:vm>`` element alone (which
    is what ``virDomainGetMetadata`` returns)."""
    if not xml:
        return None
    from xml.etree import ElementTree

    root = ElementTree.fromstring(xml)
    ns = f"{{{OZONE_NS}}}"
    vm = root if root.tag in ("vm", ns + "vm") else root.find(f"metadata/{ns}vm")
    if vm is None:
        return None
    prefix = ns if vm.tag.startswith("{") else ""

    def text(tag: str) -> str | None:
        el = vm.find(prefix + tag)
        return el.text if el is not None else None

    qmp = vm.find(prefix + "qmp")
    endpoint = None
    if qmp is not None and qmp.text:
        endpoint = QmpEndpoint.parse(qmp.text, auto=qmp.get("port") == "auto")
    return OzoneMetadata(
        source=text("source"), hash=text("hash"), qmp_endpoint=endpoint, stage_dir=text("stage-dir")
    )


@dataclass(frozen=True)
class QmpEndpoint:
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
        if kind == "tcp" and host and port.isdigit():
            return cls("tcp", host=host.strip("[]"), port=int(port), auto=auto)
        return None

    def qemu_arg(self) -> str:
        """The value of QEMU's ``-qmp`` option."""
        return f"{self},server=on,wait=off"
