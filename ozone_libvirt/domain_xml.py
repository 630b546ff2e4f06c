"""Config → libvirt domain XML, and ozone's metadata back out of domain XML.

Pure translation: no libvirt import, no I/O. Facts about the host (is KVM usable, where
libvirt keeps logs) and decisions made elsewhere (the QMP endpoint, an existing UUID) come in
as values. XML is built with lxml, never by formatting strings.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lxml import etree
from lxml.builder import ElementMaker

from .errors import ConfigError, ConflictError
from .metadata import OZONE_NS, OZONE_PREFIX, Forward, OzoneMetadata, QmpEndpoint, parse_metadata

if TYPE_CHECKING:
    from .config import VMConfig

__all__ = ["OZONE_NS", "OzoneMetadata", "QmpEndpoint", "parse_metadata"]

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
AGENT_CHANNEL = "org.qemu.guest_agent.0"

# `qmp: tcp` picks a loopback port in this range, below Linux's ephemeral port range so
# outgoing connections never hold it. The first choice is derived from the VM name, so
# `ozone xml` is deterministic; `define` moves on to the next free one on a clash.
QMP_PORT_BASE = 24000
QMP_PORT_COUNT = 6000
# the same for the loopback port forwarded to a guest's ssh port (22)
SSH_PORT_BASE = 21000
SSH_PORT_COUNT = 3000
# QEMU ids of the user-mode NIC ozone adds when it forwards ports (libvirt's are netN)
NETDEV_ID = "ozone-net0"
QEMU_NIC_MODELS = {"virtio": "virtio-net-pci", "e1000": "e1000", "e1000e": "e1000e",
                   "rtl8139": "rtl8139"}  # fmt: skip

E = ElementMaker()
Q = ElementMaker(namespace=QEMU_NS, nsmap={"qemu": QEMU_NS})
O = ElementMaker(namespace=OZONE_NS, nsmap={OZONE_PREFIX: OZONE_NS})  # noqa: E741


@dataclass(frozen=True)
class HostFacts:
    """What the XML depends on besides the config."""

    kvm: bool = False  # is KVM usable on the host libvirt runs on
    log_dir: Path = Path("/var/log/libvirt/qemu")  # where libvirt's QEMU logs live
    accel_override: str | None = None  # OZONE_ACCEL: auto|kvm|tcg
    machines: frozenset[str] = frozenset()  # x86_64 machine types QEMU offers (empty: unknown)
    # the folder for `qmp: auto` sockets, private to QEMU's user (None: none can be made
    # here, e.g. on a remote host, and `auto` means no passthrough endpoint)
    qmp_dir: Path | None = None
    # the user:group libvirt runs QEMU as (DAC label "+UID:+GID"), when known
    qemu_label: str | None = None
    # ozone's virtiofsd wrapper that makes a share read-only on the host (None: none
    # installed; a read-only share is then only mounted read-only by the guest)
    virtiofsd_ro: Path | None = None


def preferred_qmp_port(name: str, attempt: int = 0) -> int:
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")
    return QMP_PORT_BASE + (digest + attempt) % QMP_PORT_COUNT


def preferred_ssh_port(name: str, attempt: int = 0) -> int:
    digest = int.from_bytes(hashlib.sha256(b"ssh:" + name.encode()).digest()[:4], "big")
    return SSH_PORT_BASE + (digest + attempt) % SSH_PORT_COUNT


def planned_forwards(config: VMConfig) -> tuple[Forward, ...]:
    """The host ports QEMU forwards to the guest before any clash with other VMs is looked
    at: the config's ``ports`` and, unless one of them already reaches the guest's port 22
    on loopback, a loopback port of ozone's choosing for ssh. Only on user networking."""
    if config.network.type != "user":
        return ()
    forwards = [p.forward for p in config.ports]
    if not any(f.is_ssh for f in forwards):
        ssh = Forward("tcp", "127.0.0.1", preferred_ssh_port(config.name), 22, auto=True)
        forwards.insert(0, ssh)
    return tuple(forwards)


def config_record(config: VMConfig) -> dict[str, object]:
    """The normalised config as ozone records it in the metadata, for `ozone apply` to say
    which fields changed: cloud-init's content (which may hold secrets, and is long) only as
    its digest; fields that are unset (null or empty) left out. The config's
    :attr:`~.VMConfig.hash` covers it all."""

    def compact(value: object) -> object:
        if isinstance(value, dict):
            return {k: compact(v) for k, v in value.items() if v is not None and v != []}
        if isinstance(value, list):
            return [compact(v) for v in value]
        return value

    data = config.to_dict()
    if data.get("cloud_init") is not None:
        text = json.dumps(data["cloud_init"], sort_keys=True, separators=(",", ":"))
        data["cloud_init"] = "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]
    record = compact(data)
    assert isinstance(record, dict)
    return record


def ssh_user(config: VMConfig) -> str | None:
    """Who `ozone ssh` logs in as: the first user the config's cloud-init makes (None: root)."""
    users = config.cloud_init.users if config.cloud_init else ()
    return users[0].name if users else None


def share_tag(index: int) -> str:
    """The virtio-fs tag of ``shares[index]``: what the guest mounts."""
    return f"share{index}"


def check_machine(config: VMConfig, facts: HostFacts) -> None:
    if not facts.machines or config.machine in facts.machines:
        return
    close = difflib.get_close_matches(config.machine, sorted(facts.machines), n=3)
    raise ConfigError(
        f"QEMU on this host has no machine type {config.machine!r}",
        file=str(config.source) if config.source else None,
        field="machine",
        hint=("did you mean " + " or ".join(repr(c) for c in close) + "?")
        if close
        else "`virsh capabilities` lists the machine types; q35 and pc always exist",
    )


def domain_type(config: VMConfig, facts: HostFacts) -> str:
    """libvirt domain type: ``kvm`` or ``qemu`` (TCG)."""
    accel = facts.accel_override or config.accel
    if accel == "kvm" and not facts.kvm:
        raise ConfigError(
            "KVM is not available on this host",
            file=str(config.source) if config.source else None,
            field="accel" if not facts.accel_override else None,
            hint='use "accel": "tcg" (or "auto"), or OZONE_ACCEL=tcg',
        )
    if accel == "kvm" or (accel == "auto" and facts.kvm):
        return "kvm"
    return "qemu"


def serial_log_path(config: VMConfig, facts: HostFacts) -> Path:
    return config.serial_log or facts.log_dir / f"{config.name}-serial.log"


def choose_qmp(
    config: VMConfig,
    facts: HostFacts,
    *,
    used: Mapping[str, str] | None = None,
    previous: QmpEndpoint | None = None,
    port_free: Callable[[int], bool] | None = None,
) -> QmpEndpoint | None:
    """The one place a VM's QMP endpoint is chosen (by `define`, `ozone xml`, the goldens):
    from its config, the host's ``facts``, the endpoints other VMs hold (``used``: endpoint
    → VM name) and the VM's ``previous`` endpoint. An explicit endpoint must not clash;
    ``tcp`` keeps the previous port ozone chose, or takes the first free one from the port
    the VM's name prefers (``port_free`` says whether nobody listens on a loopback port;
    None: do not look). With nothing else known it is what the config alone gives."""
    used = used or {}
    qmp = config.qmp
    if qmp.kind == "off":
        return None
    if qmp.kind == "auto":
        if facts.qmp_dir is None:
            return None  # no private socket folder: QMP only through libvirt
        planned = QmpEndpoint("unix", path=str(facts.qmp_dir / f"{config.name}.sock"))
    elif qmp.kind == "unix":
        planned = QmpEndpoint("unix", path=str(qmp.path))
    elif qmp.port is not None:
        planned = QmpEndpoint("tcp", host=qmp.host or "127.0.0.1", port=qmp.port)
    elif previous and previous.auto and str(previous) not in used:
        return previous
    else:
        return free_qmp_port(config.name, used, port_free=port_free)
    owner = used.get(str(planned))
    if owner:
        raise ConfigError(
            f"{planned} is already the QMP endpoint of VM {owner!r}",
            file=str(config.source) if config.source else None,
            field="qmp",
            hint='every VM needs its own endpoint; "auto" gives each a private socket',
        )
    return planned


def free_qmp_port(
    name: str,
    used: Mapping[str, str],
    *,
    port_free: Callable[[int], bool] | None = None,
    avoid: int = 0,
) -> QmpEndpoint:
    """A loopback port for VM ``name``'s ``qmp: tcp``: the first from the one its name
    prefers that is not ``avoid``, no other VM's (``used``), and ``port_free``."""
    for attempt in range(QMP_PORT_COUNT):
        port = preferred_qmp_port(name, attempt)
        endpoint = QmpEndpoint("tcp", host="127.0.0.1", port=port, auto=True)
        if port == avoid or str(endpoint) in used:
            continue
        if port_free is None or port_free(port):
            return endpoint
    raise ConflictError("no free loopback port left for QMP")  # pragma: no cover


def _disk_targets(config: VMConfig) -> tuple[list[str], str]:
    """Target device names for the disks (vda, vdb / sda, sdb …) and for the cdrom."""
    vd = sd = 0
    names = []
    for disk in config.disks:
        if disk.bus == "virtio":
            names.append("vd" + chr(ord("a") + vd))
            vd += 1
        else:
            names.append("sd" + chr(ord("a") + sd))
            sd += 1
    return names, "sd" + chr(ord("a") + sd)


def build_domain(
    config: VMConfig,
    *,
    facts: HostFacts,
    qmp_endpoint: QmpEndpoint | None,
    uuid: str | None = None,
    backing_formats: Mapping[Path, str] | None = None,
    run_as: str | None = None,
    forwards: Sequence[Forward] = (),
) -> etree._Element:
    """The libvirt domain XML for ``config``.

    ``qmp_endpoint`` is the resolved QMP endpoint, or None for no QMP passthrough; ``uuid``
    keeps an existing domain's identity on redefine. ``backing_formats`` (the image format
    of each disk's backing image, where known) lets the XML name the backing images, so that
    libvirt never changes their owner: it chowns read-only images to QEMU's user when a VM
    starts and never gives them back. With ``run_as`` ("+UID:+GID") QEMU runs as that user
    and libvirt relabels no file at all (throwaway VMs, whose own files ozone chowns).
    ``forwards``: the host ports QEMU's user networking forwards to the guest (the NIC is
    then QEMU's own, given on its command line: libvirt 9.0 has no port forwards on a
    user-mode interface); none: libvirt's user-mode interface.
    """
    dtype = domain_type(config, facts)
    qemu_args: list[str] = []
    if qmp_endpoint:
        qemu_args += ["-qmp", qmp_endpoint.qemu_arg()]
    if forwards and config.network.type == "user":
        qemu_args += _user_nic_args(config, forwards)
    else:
        forwards = ()
    nsmap = {"qemu": QEMU_NS} if qemu_args else None
    root = etree.Element("domain", nsmap=nsmap, type=dtype)
    root.append(E.name(config.name))
    if uuid:
        root.append(E.uuid(uuid))
    if config.description:
        root.append(E.description(config.description))

    meta = O.vm(O.hash(config.hash))
    if config.source:
        meta.insert(0, O.source(str(config.source)))
    if qmp_endpoint:
        qmp_el = O.qmp(str(qmp_endpoint))
        if qmp_endpoint.auto:
            qmp_el.set("port", "auto")
        meta.append(qmp_el)
    if config.stage_dir:
        meta.append(O("stage-dir", config.stage_dir))
    if config.uses_cloud_init:
        meta.append(O("cloud-init", "nocloud"))
    meta.extend(_forward_element(f) for f in forwards)
    user = ssh_user(config)
    if user:
        meta.append(O("ssh-user", user))
    for i, share in enumerate(config.shares):  # how the guest mounts it: fstab's fields
        meta.append(O.share(f"{share_tag(i)} {share.guest} {'ro' if share.readonly else 'rw'}"))
    meta.append(O.config(json.dumps(config_record(config), separators=(",", ":"))))
    root.append(E.metadata(meta))

    kib = str(config.memory // 1024)
    root.append(E.memory(kib, unit="KiB"))
    root.append(E.currentMemory(kib, unit="KiB"))
    if config.shares:  # virtiofsd maps the guest's memory: it must be shared
        root.append(E.memoryBacking(E.source(type="memfd"), E.access(mode="shared")))
    root.append(E.vcpu(str(config.vcpus), placement="static"))

    os_el = E.os(E.type("hvm", arch="x86_64", machine=config.machine))
    if config.kernel:
        os_el.append(E.kernel(str(config.kernel)))
        if config.initrd:
            os_el.append(E.initrd(str(config.initrd)))
        if config.cmdline:
            os_el.append(E.cmdline(config.cmdline))
    else:
        for dev in config.boot:
            os_el.append(E.boot(dev={"disk": "hd"}.get(dev, dev)))
    root.append(os_el)
    root.append(E.features(E.acpi(), E.apic()))
    if dtype == "kvm":
        root.append(E.cpu(mode="host-passthrough", check="none"))
    root.append(E.clock(offset="utc"))
    root.append(E.on_poweroff("destroy"))
    root.append(E.on_reboot("restart"))
    root.append(E.on_crash("destroy"))

    # a domain-level label covers every file: libvirt refuses per-file ones beside it
    devices = _devices(config, facts, backing_formats or {}, keep_owners=run_as is None)
    interface = devices.find("interface")
    if forwards and interface is not None:
        devices.remove(interface)
    root.append(devices)
    if run_as:
        root.append(
            E.seclabel(E.label(run_as), type="static", model="dac", relabel="no"),
        )
    if qemu_args:
        root.append(Q.commandline(*(Q.arg(value=a) for a in qemu_args)))
    # what `ozone apply` compares to find a definition ozone would now write otherwise (the
    # host or ozone changed) under an unchanged config
    meta.append(O("xml-hash", definition_digest(root)))
    return root


def definition_digest(root: etree._Element) -> str:
    """The digest of a definition ozone writes, without its UUID (libvirt picks one for a
    new VM, which redefines keep)."""
    copy = etree.fromstring(etree.tostring(root))
    for element in copy.findall("uuid"):
        copy.remove(element)
    return "sha256:" + hashlib.sha256(etree.tostring(copy, encoding="utf-8")).hexdigest()


def _forward_element(forward: Forward) -> etree._Element:
    element: etree._Element = O.forward(str(forward))
    if forward.auto:
        element.set("port", "auto")  # ozone chose it, and may move it
    return element


def _user_nic_args(config: VMConfig, forwards: Sequence[Forward]) -> list[str]:
    """QEMU options for a user-mode NIC with host port forwards. Its MAC is the config's,
    else one derived from the VM name (libvirt picks a random one for its own NICs)."""
    mac = config.network.mac or "52:54:00:" + ":".join(
        f"{b:02x}" for b in hashlib.sha256(b"mac:" + config.name.encode()).digest()[:3]
    )
    netdev = ",".join(["user", f"id={NETDEV_ID}", *(f"hostfwd={f.hostfwd()}" for f in forwards)])
    # JSON, like libvirt's own -device options: QEMU makes devices given in the older syntax
    # before all JSON ones, and this NIC would take a PCI slot libvirt assigned
    device = {"driver": QEMU_NIC_MODELS[config.network.model], "netdev": NETDEV_ID, "mac": mac}
    return ["-netdev", netdev, "-device", json.dumps(device, separators=(",", ":"))]


def _kept_owner(wanted: bool) -> list[etree._Element]:
    """Inside a ``<source>``: libvirt must not chown this file (it would never give it back)."""
    return [E.seclabel(model="dac", relabel="no")] if wanted else []


def _devices(
    config: VMConfig, facts: HostFacts, backing_formats: Mapping[Path, str], *, keep_owners: bool
) -> etree._Element:
    devices: etree._Element = E.devices()
    targets, cdrom_target = _disk_targets(config)
    for disk, target in zip(config.disks, targets, strict=True):
        # a read-only disk (a cloud-init seed) is shared and never written: owner kept
        driver = E.driver(name="qemu", type=disk.format)
        if not disk.readonly:
            driver.set("discard", "unmap")
        element = E.disk(
            driver,
            E.source(*_kept_owner(keep_owners and disk.readonly), file=str(disk.path)),
            type="file",
            device="disk",
        )
        backing_format = backing_formats.get(disk.backing) if disk.backing else None
        if backing_format:
            # the rest of the chain, if any, libvirt finds itself (and keeps its owners too)
            element.append(
                E.backingStore(
                    E.format(type=backing_format),
                    E.source(*_kept_owner(keep_owners), file=str(disk.backing)),
                    type="file",
                )
            )
        element.append(E.target(dev=target, bus=disk.bus))
        if disk.readonly:
            element.append(E.readonly())
        devices.append(element)
    if config.cdrom:
        devices.append(
            E.disk(
                E.driver(name="qemu", type="raw"),
                E.source(*_kept_owner(keep_owners), file=str(config.cdrom)),
                E.target(dev=cdrom_target, bus="sata"),
                E.readonly(),
                type="file",
                device="cdrom",
            )
        )
    if any(d.bus == "scsi" for d in config.disks):
        devices.append(E.controller(type="scsi", index="0", model="virtio-scsi"))

    net = config.network
    if net.type != "none":
        iface = E.interface(type=net.type)
        if net.mac:
            iface.append(E.mac(address=net.mac))
        if net.type == "network":
            iface.append(E.source(network=net.source or ""))
        elif net.type == "bridge":
            iface.append(E.source(bridge=net.source or ""))
        iface.append(E.model(type=net.model))
        devices.append(iface)

    for i, share in enumerate(config.shares):
        fs = E.filesystem(E.driver(type="virtiofs", queue="1024"), type="mount")
        fs.set("accessmode", "passthrough")
        # libvirt 9.0 refuses <readonly/> on virtio-fs: ozone's wrapper of virtiofsd makes
        # the folder read-only on the host (and the guest mounts it read-only)
        if share.readonly and facts.virtiofsd_ro is not None:
            fs.append(E.binary(path=str(facts.virtiofsd_ro)))
        fs.append(E.source(dir=str(share.host)))
        fs.append(E.target(dir=share_tag(i)))
        devices.append(fs)
    devices.append(
        E.serial(
            E.log(file=str(serial_log_path(config, facts)), append="off"),
            E.target(port="0"),
            type="pty",
        )
    )
    devices.append(E.console(E.target(type="serial", port="0"), type="pty"))
    if config.agent:
        devices.append(E.channel(E.target(type="virtio", name=AGENT_CHANNEL), type="unix"))
    if config.graphics == "vnc":
        devices.append(E.graphics(type="vnc", port="-1", autoport="yes", listen="127.0.0.1"))
    devices.append(E.rng(E.backend("/dev/urandom", model="random"), model="virtio"))
    return devices


def to_string(root: etree._Element) -> str:
    return etree.tostring(root, pretty_print=True, encoding="unicode")


# --- reading back ---------------------------------------------------------------------------


def serial_log_of(xml: str) -> str | None:
    """The serial log file a domain XML names, if any."""
    root = etree.fromstring(xml.encode())
    log = root.find("devices/serial/log")
    return log.get("file") if log is not None else None


@dataclass(frozen=True)
class FileUse:
    """A file a domain uses, and how: ``disk`` (written), ``read-only disk``, ``cdrom``,
    ``backing image`` (read under an overlay), ``kernel``, ``initrd``."""

    role: str
    path: Path


def files_of(xml: str) -> list[FileUse]:
    """Every file a domain XML names: its disks, cdroms, kernel, initrd and (in the XML of a
    running domain, or where ozone wrote it) the backing images under its disks."""
    root = etree.fromstring(xml.encode())
    uses = []

    def add(role: str, name: str | None) -> None:
        if name:
            uses.append(FileUse(role, Path(os.path.normpath(name))))

    for tag in ("kernel", "initrd"):
        add(tag, root.findtext(f"os/{tag}"))
    for disk in root.iterfind("devices/disk"):
        source = disk.find("source")
        if source is None:
            continue
        if disk.get("device", "disk") == "cdrom":
            role = "cdrom"
        elif disk.find("readonly") is not None or disk.find("shareable") is not None:
            role = "read-only disk"
        else:
            role = "disk"
        add(role, source.get("file") or source.get("dev"))
        for store in disk.iterfind(".//backingStore/source"):
            add("backing image", store.get("file"))
    return uses


def disk_images_of(xml: str) -> list[str]:
    """Files of the domain's writable disks (not cdroms, not read-only or shareable ones)."""
    return [str(use.path) for use in files_of(xml) if use.role == "disk"]


def with_qmp_endpoint(xml: str, endpoint: QmpEndpoint) -> str:
    """A domain XML of ozone's with its QMP passthrough moved to ``endpoint``."""
    root = etree.fromstring(xml.encode())
    args = root.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")
    for flag, value in itertools.pairwise(args):
        if flag.get("value") == "-qmp":
            value.set("value", endpoint.qemu_arg())
    for qmp in root.iterfind(f"metadata/{{{OZONE_NS}}}vm/{{{OZONE_NS}}}qmp"):
        qmp.text = str(endpoint)
        if endpoint.auto:
            qmp.set("port", "auto")
    return etree.tostring(root, encoding="unicode")


def with_forwards(xml: str, forwards: Sequence[Forward]) -> str:
    """A domain XML of ozone's with its port forwards replaced by ``forwards`` (the same
    forwards, one of them on another host port)."""
    root = etree.fromstring(xml.encode())
    args = root.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")
    for flag, value in itertools.pairwise(args):
        if flag.get("value") == "-netdev" and f"id={NETDEV_ID}" in (value.get("value") or ""):
            options = [
                o for o in (value.get("value") or "").split(",") if not o.startswith("hostfwd=")
            ]
            value.set("value", ",".join(options + [f"hostfwd={f.hostfwd()}" for f in forwards]))
    vm = root.find(f"metadata/{{{OZONE_NS}}}vm")
    if vm is not None:
        old = vm.findall(f"{{{OZONE_NS}}}forward")
        at = list(vm).index(old[0]) if old else len(vm)
        for element in old:
            vm.remove(element)
        for i, forward in enumerate(forwards):
            vm.insert(at + i, _forward_element(forward))
    return etree.tostring(root, encoding="unicode")


@dataclass(frozen=True)
class ShareInfo:
    host: str
    tag: str
    guest: str | None  # where the guest mounts it (None: not a share of ozone's)
    readonly: bool
    enforced_by: str | None = None  # a read-only share's guard: "host" or "guest mount"

    @property
    def fstab(self) -> str | None:
        """The guest's /etc/fstab line for it (images without cloud-init)."""
        if self.guest is None:
            return None
        return f"{self.tag} {self.guest} virtiofs {'ro' if self.readonly else 'rw'},nofail 0 0"


def shares_of(xml: str) -> list[ShareInfo]:
    """The virtio-fs folders a domain XML shares, with where ozone's guest mounts them."""
    root = etree.fromstring(xml.encode())
    mounts = {}
    for element in root.iterfind(f"metadata/{{{OZONE_NS}}}vm/{{{OZONE_NS}}}share"):
        fields = (element.text or "").split()
        if len(fields) == 3:
            mounts[fields[0]] = (fields[1], fields[2] == "ro")
    found = []
    for fs in root.iterfind("devices/filesystem"):
        tag = fs.find("target")
        source = fs.find("source")
        if tag is None or source is None:
            continue
        guest, readonly = mounts.get(tag.get("dir", ""), (None, fs.find("readonly") is not None))
        binary = fs.find("binary")
        host_ro = binary is not None and (binary.get("path") or "").endswith("/virtiofsd-ro")
        guard = ("host" if host_ro else "guest mount") if readonly else None
        found.append(ShareInfo(source.get("dir", ""), tag.get("dir", ""), guest, readonly, guard))
    return found


def has_agent_channel(xml: str) -> bool:
    root = etree.fromstring(xml.encode())
    return any(t.get("name") == AGENT_CHANNEL for t in root.findall("devices/channel/target"))


# what libvirt adds to a domain by itself (addresses, default controllers and devices, the
# CPU model TCG runs): `ozone diff` leaves these out where the config's XML has none
_LIBVIRT_ADDS = frozenset(
    {"address", "alias", "audio", "boot", "controller", "cpu", "emulator", "input", "listen",
     "log", "mac", "memballoon", "model", "resource", "uuid", "video"}
)  # fmt: skip


def _key(element: etree._Element, ordinal: int) -> tuple[object, ...]:
    """How a child pairs with its counterpart: controllers by type and index, any other
    element by its tag and place among its kind."""
    if element.tag == "controller":
        return ("controller", element.get("type"), element.get("index"))
    return (element.tag, ordinal)


def _keyed(parent: etree._Element) -> dict[tuple[object, ...], etree._Element]:
    counts: dict[object, int] = {}
    keyed = {}
    for child in parent:
        if isinstance(child.tag, str):
            counts[child.tag] = counts.get(child.tag, -1) + 1
            keyed[_key(child, counts[child.tag])] = child
    return keyed


def _project(held: etree._Element, ours: etree._Element) -> None:
    """Strip from ``held`` what libvirt added to ``ours``: attributes ours lacks, and child
    elements of a kind libvirt adds that have no counterpart in ours. held's other extra
    children (a device added with `virsh edit`) stay."""
    for key in [k for k in held.attrib if k not in ours.attrib]:
        del held.attrib[key]
    machine, wanted = held.get("machine"), ours.get("machine")
    if held.tag == "type" and machine and wanted and machine.startswith(f"pc-{wanted}-"):
        held.set("machine", wanted)  # libvirt names the versioned machine type: q35 → pc-q35-7.2
    if wanted == "pc" and machine and machine.startswith("pc-i440fx-"):
        held.set("machine", wanted)
    for child in list(held):
        if not isinstance(child.tag, str):
            held.remove(child)
    mine = _keyed(ours)
    for pair, child in _keyed(held).items():
        if pair in mine:
            _project(child, mine[pair])
        elif str(child.tag) in _LIBVIRT_ADDS:
            held.remove(child)


def _canonical(root: etree._Element) -> str:
    for el in root.iter():
        if isinstance(el.tag, str):
            items = sorted(el.attrib.items())
            el.attrib.clear()
            el.attrib.update(items)
        el.tail = None
        if len(el) and el.text is not None and not el.text.strip():
            el.text = None
    return to_string(root)


def xml_diff(held: str, ours: str, *, held_label: str, ours_label: str) -> str:
    """A unified diff of the domain XML libvirt holds against the one a config makes, without
    what libvirt adds by itself ("" when they agree)."""
    parser = etree.XMLParser(remove_blank_text=True, remove_comments=True)
    held_root = etree.fromstring(held.encode(), parser)
    ours_root = etree.fromstring(ours.encode(), parser)
    _project(held_root, ours_root)
    lines = difflib.unified_diff(
        _canonical(held_root).splitlines(keepends=True),
        _canonical(ours_root).splitlines(keepends=True),
        fromfile=held_label,
        tofile=ours_label,
    )
    return "".join(lines)


def description_of(xml: str) -> str | None:
    """A domain's ``<description>``."""
    root = etree.fromstring(xml.encode())
    text = root.findtext("description")
    return text or None
