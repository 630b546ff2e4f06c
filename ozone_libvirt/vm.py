"""VM lifecycle on a libvirt connection: define, start, stop, destroy, undefine, list, status.

Every function takes an open ``virConnect`` and returns plain data; nothing here prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import libvirt

from . import domain_xml as dx
from .agent import Agent
from .connection import (
    call,
    domain_metadata,
    find_domain,
    find_network,
    host_facts,
    if_exists,
    is_local,
    libvirt_errors,
    lookup,
)
from .errors import (
    ConfigError,
    ConflictError,
    ConnectionFailed,
    NotFoundError,
    OzoneError,
    StateError,
    TimeoutExpired,
)
from .inventory import STATE_NAMES as STATE_NAMES
from .inventory import VMInfo as VMInfo
from .inventory import _has_managed_save
from .inventory import info as info
from .inventory import is_active as is_active
from .inventory import list_vms as list_vms
from .inventory import state_name as state_name
from .metadata import Forward, QmpEndpoint
from .qmp import tcp_port_free
from .results import ClockSync, StartResult
from .state import ensure_qmp_folder, host_lock
from .storage import (
    backing_chain,
    create_disk,
    image_format,
    parse_label,
    remove_files,
    unreadable_by,
    why_not_deletable,
)

if TYPE_CHECKING:
    from . import images
    from .config import Disk, VMConfig
    from .hostpaths import HostPaths

POLL = 0.05


@dataclass(frozen=True)
class DefineResult:
    name: str
    uuid: str
    created: bool  # False: an existing domain was updated in place
    qmp: str | None
    disks_created: tuple[str, ...] = ()
    images_made: tuple[str, ...] = ()  # base images and seeds, now
    restart_needed: bool = False  # the domain runs: changes apply at its next start
    notes: tuple[str, ...] = ()  # things the user should know
    forwards: tuple[str, ...] = ()  # PROTO:HOST:PORT:GUESTPORT
    changed: bool = True  # False: the definition already matched the config, left alone


@dataclass(frozen=True)
class StopResult:
    name: str
    method: str  # how it stopped: agent | acpi | forced | none (was not running)
    seconds: float
    requested: str | None = None  # the clean shutdown asked for first: agent | acpi


# --- lookups ---------------------------------------------------------------------------


find = find_domain
metadata = domain_metadata


def config_to_define(conn: libvirt.virConnect, name: str) -> Path | None:
    """`ozone start NAME` defines the VM first when libvirt has no VM of that name and a
    config of that name (or that path) exists: that config, else None."""
    if find(conn, name) is not None:
        return None
    from .config import find_config

    try:
        return find_config(name)
    except OzoneError:
        return None  # no such config: `start` then says there is no such VM


def wait_for(condition: Callable[[], bool], *, timeout: float, interval: float = POLL) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass. True if it held."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


# --- define ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Neighbours:
    """What the other domains on a host hold: their QMP endpoints and their files."""

    qmp: dict[str, str]  # endpoint → VM name
    files: dict[Path, list[str]]  # file → its uses, e.g. "web (disk)", "ci (backing image)"
    # the same, by (device, inode) where the file is on this host: another path to a file
    # (a symlinked folder, a hard link) is the same file
    inodes: dict[tuple[int, int], list[str]] = field(default_factory=dict)
    # the host ports other VMs hold (forwards and QMP TCP endpoints), with their VM's name
    ports: list[tuple[Forward, str]] = field(default_factory=list)

    def port_owner(self, forward: Forward) -> str | None:
        return next((name for other, name in self.ports if forward.overlaps(other)), None)

    def without(self, name: str) -> Neighbours:
        """What the domains other than ``name`` hold."""
        mine = f"{name} ("

        def others(uses: list[str]) -> list[str]:
            return [u for u in uses if not u.startswith(mine)]

        return Neighbours(
            qmp={e: n for e, n in self.qmp.items() if n != name},
            files={p: o for p, u in self.files.items() if (o := others(u))},
            inodes={i: o for i, u in self.inodes.items() if (o := others(u))},
            ports=[(f, n) for f, n in self.ports if n != name],
        )

    def uses(self, path: Path) -> list[str]:
        found = list(self.files.get(path, []))
        identity = _identity(path)
        for use in self.inodes.get(identity, []) if identity else []:
            if use not in found:
                found.append(use)
        return found


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def neighbours(
    conn: libvirt.virConnect, *, except_name: str | None = None, local: bool = True
) -> Neighbours:
    """One look at every domain libvirt knows, running or not (one XML each): QMP endpoints
    from ozone's metadata, disk images with their backing chains (from the live XML of
    running domains and, on this host, from the images' own headers)."""
    qmp: dict[str, str] = {}
    files: dict[Path, list[str]] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    ports: list[tuple[Forward, str]] = []
    domains = []
    for dom in call(conn.listAllDomains, 0):
        name = dom.name()
        if name == except_name:
            continue
        xml = if_exists(dom.XMLDesc, 0, name=name)
        if xml is None:
            continue  # went away while we looked
        meta = dx.parse_metadata(xml)
        if meta and meta.qmp:
            qmp[meta.qmp] = name
        if meta:
            ports += [(f, name) for f in meta.forwards]
            endpoint = meta.qmp_endpoint
            if endpoint and endpoint.kind == "tcp" and endpoint.host and endpoint.port:
                ports.append((Forward("tcp", endpoint.host, endpoint.port, 0), name))
        domains.append((name, dx.files_of(xml)))
    chains = {}
    if not local:  # another host's: its storage pools know the backing images
        from .hostfiles import backing_chains

        disks = [u.path for _name, uses in domains for u in uses if u.role == "disk"]
        chains = backing_chains(conn, disks)
    for name, file_uses in domains:
        seen: set[Path] = set()
        for use in file_uses:
            uses = [(use.role, use.path)]
            if use.role == "disk":
                chain = backing_chain(use.path) if local else chains.get(use.path, [])
                uses += [("backing image", p) for p in chain]
            for role, path in uses:
                if path in seen:
                    continue
                seen.add(path)
                files.setdefault(path, []).append(f"{name} ({role})")
                identity = _identity(path) if local else None
                if identity:
                    inodes.setdefault(identity, []).append(f"{name} ({role})")
    return Neighbours(qmp, files, inodes, ports)


def resolve_qmp(
    config: VMConfig,
    facts: dx.HostFacts,
    used: dict[str, str],
    *,
    previous: QmpEndpoint | None,
    local: bool,
) -> QmpEndpoint | None:
    """:func:`.domain_xml.choose_qmp`, looking (on this host) whether a port is free. Runs
    under the host's "define" lock, so two defines never pick one port."""
    port_free = _loopback_port_free if local else None
    return dx.choose_qmp(config, facts, used=used, previous=previous, port_free=port_free)


def _loopback_port_free(port: int) -> bool:
    return tcp_port_free("127.0.0.1", port)


def resolve_forwards(
    config: VMConfig, around: Neighbours, *, previous: tuple[Forward, ...], local: bool
) -> tuple[Forward, ...]:
    """The host ports the VM forwards: the config's (no other VM may hold one) and the ssh
    forward, which keeps its previous port or takes a free loopback one. Runs under the
    host's "define" lock, so two defines never pick one port."""
    forwards = []
    for forward in dx.planned_forwards(config):
        if forward.auto:
            forwards.append(forward)
            continue
        owner = around.port_owner(forward)
        if owner:
            index = [p.forward for p in config.ports].index(forward)
            raise ConfigError(
                f"host port {forward.host}:{forward.port}/{forward.protocol} is already "
                f"forwarded to VM {owner!r}",
                file=str(config.source) if config.source else None,
                field=f"ports[{index}]",
                hint="each host port reaches one VM: pick another one",
            )
        forwards.append(forward)
    for i, forward in enumerate(forwards):
        if not forward.auto:
            continue
        kept = next((f for f in previous if f.auto and f.guest == forward.guest), None)
        clash = kept is not None and any(kept.overlaps(f) for f in forwards if not f.auto)
        if kept is not None and not clash and not around.port_owner(kept):
            forwards[i] = kept  # still ours, listening or not: the VM may be running
            continue
        forwards[i] = _free_ssh_forward(config.name, around, forwards, local=local)
    return tuple(forwards)


def _free_ssh_forward(
    name: str, around: Neighbours, forwards: list[Forward], *, local: bool, avoid: int = 0
) -> Forward:
    """A loopback port for the ssh forward: no other VM's, none of the VM's own other
    ``forwards``, and (on this host) nobody listens on it."""
    mine = [f for f in forwards if not f.auto]
    for attempt in range(dx.SSH_PORT_COUNT):
        port = dx.preferred_ssh_port(name, attempt)
        candidate = Forward("tcp", "127.0.0.1", port, 22, auto=True)
        taken = around.port_owner(candidate) or any(candidate.overlaps(f) for f in mine)
        if port != avoid and not taken and not (local and not tcp_port_free("127.0.0.1", port)):
            return candidate
    raise ConflictError("no free loopback port left for ssh")  # pragma: no cover


def with_share_guard(config: VMConfig, facts: dx.HostFacts) -> dx.HostFacts:
    """``facts`` with ozone's read-only virtiofsd wrapper, installed on this host, when the
    config shares a folder read-only (and ozone runs as root: else the guest's mount guards)."""
    if not any(s.readonly for s in config.shares):
        return facts
    from .state import install_virtiofsd_ro

    return dataclasses.replace(facts, virtiofsd_ro=install_virtiofsd_ro())


def _qmp_folder_ready(facts: dx.HostFacts) -> bool:
    """Make the private folder of `qmp: auto` sockets (mode 0700, QEMU's user)."""
    return facts.qmp_dir is not None and ensure_qmp_folder(
        facts.qmp_dir, parse_label(facts.qemu_label)
    )


def _check_network(conn: libvirt.virConnect, config: VMConfig) -> None:
    net = config.network
    if net.type != "network" or net.source is None:
        return
    if find_network(conn, net.source) is not None:
        return
    names = sorted(call(conn.listNetworks) + call(conn.listDefinedNetworks))
    raise ConfigError(
        f"libvirt has no network named {net.source!r}",
        file=str(config.source) if config.source else None,
        field="network.source",
        hint=("networks here: " + ", ".join(names)) if names else "`virsh net-list --all`",
    )


def _check_disks_unshared(config: VMConfig, around: Neighbours) -> None:
    """A writable disk that another VM also uses (as its disk, or as a backing image it
    reads), or a backing image that another VM writes, would be corrupted: refuse, naming
    the other VM."""
    file = str(config.source) if config.source else None
    for i, disk in enumerate(config.disks):
        others = around.uses(disk.path)
        if disk.readonly:  # read by many (a cloud-init seed): only a writer is a problem
            others = [u for u in others if u.endswith("(disk)")]
        if others:
            raise ConfigError(
                f"{disk.path} is already used by VM " + ", ".join(others),
                file=file,
                field=f"disks[{i}].path",
                hint="two VMs writing one image corrupt it: give this VM its own disk, "
                'or an overlay over a shared base ("backing")',
            )
        backing = around.uses(disk.backing) if disk.backing else []
        writers = [u for u in backing if u.endswith("(disk)")]
        if writers:
            raise ConfigError(
                f"{disk.backing} is the disk of VM " + ", ".join(writers),
                file=file,
                field=f"disks[{i}].backing",
                hint="a backing image must not change under its overlays: copy it, or stop "
                "using it as that VM's disk",
            )


def _readable_inputs(config: VMConfig, facts: dx.HostFacts) -> dict[Path, str]:
    """Check that QEMU can read the read-only files libvirt is told not to relabel (the
    cdrom, the backing images) and return each backing image's format."""
    owner = parse_label(facts.qemu_label)
    file = str(config.source) if config.source else None
    formats = {}
    inputs = [("cdrom", config.cdrom)] + [
        (f"disks[{i}].backing", d.backing) for i, d in enumerate(config.disks)
    ]
    inputs += [(f"disks[{i}].path", d.path) for i, d in enumerate(config.disks) if d.readonly]
    for where, path in inputs:
        if path is None:
            continue
        chain = [path]
        if where.endswith(".backing"):
            formats[path] = image_format(path)
            chain += backing_chain(path)
        for image in chain:
            reason = unreadable_by(image, owner) if owner is not None else None
            if reason:
                raise ConfigError(
                    f"QEMU cannot read {image}: {reason}",
                    file=file,
                    field=where,
                    hint="ozone never changes the owner of a shared read-only image: make it "
                    f"readable (chmod o+r {image}) or move it to /var/lib/libvirt/images",
                )
    return formats


def define(
    conn: libvirt.virConnect,
    config: VMConfig,
    *,
    report: Callable[[str], None] = lambda _text: None,
    progress: Callable[[int, int | None], None] | None = None,
) -> DefineResult:
    """Create the domain for ``config``, or update it in place (same UUID).

    Builds or downloads the config's image and writes its cloud-init seed (both shared and
    kept: the store's), then creates missing disk images and removes them again if libvirt
    refuses the domain, so a failed define leaves nothing of the VM's behind.
    """
    from . import ssh

    new_key = config.uses_cloud_init and ssh.vm_public_key(config.name, create=False) is None
    try:
        return _define(conn, config, report=report, progress=progress)
    except BaseException:
        dom = find(conn, config.name) if new_key else None
        if new_key and (dom is None or metadata(dom) is None):
            ssh.forget(config.name)  # made for this define, which made no VM of ozone's
        raise


def _define(
    conn: libvirt.virConnect,
    config: VMConfig,
    *,
    report: Callable[[str], None],
    progress: Callable[[int, int | None], None] | None,
) -> DefineResult:
    from . import images, imagestore, ssh
    from .config import check_host_paths, check_shares

    local = is_local(conn)
    facts = host_facts(conn)
    # what can be checked before an image is built or downloaded, is
    if local:
        check_shares(config)
    if config.ports:
        around = neighbours(conn, except_name=config.name)
        resolve_forwards(config, around, previous=(), local=False)  # a clash, before a build
    vm_key = ssh.vm_public_key(config.name, create=True) if config.uses_cloud_init else None
    resolved = images.resolve(config, vm_key=vm_key)
    config = resolved.config
    dx.domain_type(config, facts)  # refuses kvm where there is none, before any change
    dx.check_machine(config, facts)
    _check_network(conn, config)
    if resolved.ref is not None and local:
        imagestore.check_overlay(config, config.disks[0])
    made = imagestore.ensure(conn, resolved, report=report, progress=progress, local=local)
    formats: dict[Path, str] = {}
    host_paths = None
    if not local:  # the files go to the VM's host, through libvirt
        from . import hostfiles
        from .hostpaths import place

        host_paths = place(
            config, resolved, digest=hostfiles.file_digest, there=kept_there(conn, resolved)
        )
        made += hostfiles.bring_inputs(
            conn,
            host_paths,
            resolved,
            qemu=parse_label(facts.qemu_label),
            report=report,
            progress=progress,
        )
        config = host_paths.config
    if local:
        check_host_paths(config)
        formats = _readable_inputs(config, facts)
        facts = with_share_guard(config, facts)
    notes = []
    if any(s.readonly for s in config.shares) and facts.virtiofsd_ro is None:
        notes.append(
            "a read-only share is only mounted read-only by the guest, whose root can remount "
            "it: `ozone define` the VM as root once, which installs ozone's read-only virtiofsd"
        )
    if any(not s.readonly for s in config.shares):
        notes.append(
            "the guest's root has root's power over a read-write share's files (virtiofsd runs "
            "as root and keeps the guest's owners and modes, setuid bits included): share only "
            "folders you would hand to the guest's root"
        )
    if config.qmp.kind == "auto" and not (local and _qmp_folder_ready(facts)):
        facts = dataclasses.replace(facts, qmp_dir=None)
        notes.append(
            "no private QMP socket on this host (ozone makes one when it runs as root on "
            "the VM's host); `ozone qmp` reaches QMP through libvirt"
        )
    with host_lock("define"):
        existing = find(conn, config.name)
        previous_qmp = None
        previous_forwards: tuple[Forward, ...] = ()
        uuid = None
        if existing is not None:
            meta = metadata(existing)
            if meta is None:
                raise ConflictError(
                    f"a domain named {config.name!r} exists and was not made by ozone",
                    hint="pick another name, or `virsh undefine` that domain if it is unwanted",
                )
            previous_qmp = meta.qmp_endpoint
            previous_forwards = meta.forwards
            uuid = existing.UUIDString()
        around = neighbours(conn, except_name=config.name, local=local)
        _check_disks_unshared(config, around)
        qmp = resolve_qmp(config, facts, around.qmp, previous=previous_qmp, local=local)
        forwards = resolve_forwards(config, around, previous=previous_forwards, local=local)
        root = dx.build_domain(
            config,
            facts=facts,
            qmp_endpoint=qmp,
            uuid=uuid,
            backing_formats=formats,
            forwards=forwards,
        )
        overlay = config.disks[0] if resolved.ref is not None and local else None
        if overlay is not None:
            virtual = imagestore.check_overlay(config, overlay)  # again: a define may have run
            note = imagestore.grow_overlay(
                conn,
                config,
                overlay,
                virtual,
                running=existing is not None and is_active(existing),
            )
            if note:
                notes.append(note)
        dom, created = _define_with_disks(
            conn,
            config,
            dx.to_string(root),
            overlay=overlay,
            host_paths=host_paths,
            running=existing is not None and is_active(existing),
        )
    if qmp is not None and qmp.kind == "tcp":
        notes.append(f"QMP on {qmp} is open to every local user: `qmp: auto` is private")
    return DefineResult(
        name=config.name,
        uuid=dom.UUIDString(),
        created=existing is None,
        qmp=str(qmp) if qmp else None,
        disks_created=tuple(str(p) for p in created),
        images_made=tuple(str(p) for p in made),
        restart_needed=existing is not None and is_active(existing),
        notes=tuple(notes),
        forwards=tuple(str(f) for f in forwards),
    )


def desired_xml(
    conn: libvirt.virConnect, config: VMConfig, *, around: Neighbours | None = None
) -> str:
    """The domain XML a define of ``config`` would write now, changing nothing: no image is
    built, no key made, no folder made or wrapper installed (what a define by this user
    would make is taken as made); the VM keeps its UUID, QMP endpoint and forwarded ports.
    ``around``: what the other domains hold, when the caller has asked already."""
    from . import images, ssh
    from .state import VIRTIOFSD_RO

    local = is_local(conn)
    facts = host_facts(conn)
    key = ssh.vm_public_key(config.name, create=False) if config.uses_cloud_init else None
    config = placed(conn, images.resolve(config, vm_key=key))
    formats: dict[Path, str] = {}
    root = os.geteuid() == 0
    if local:
        with contextlib.suppress(OzoneError):  # e.g. an image not built yet
            formats = _readable_inputs(config, facts)
        if any(s.readonly for s in config.shares) and (root or VIRTIOFSD_RO.is_file()):
            facts = dataclasses.replace(facts, virtiofsd_ro=VIRTIOFSD_RO)
    ready = local and facts.qmp_dir is not None and (root or facts.qmp_dir.is_dir())
    if config.qmp.kind == "auto" and not ready:
        facts = dataclasses.replace(facts, qmp_dir=None)
    existing = find(conn, config.name)
    meta = metadata(existing) if existing is not None else None
    if around is None:
        around = neighbours(conn, except_name=config.name, local=local)
    previous_qmp = meta.qmp_endpoint if meta else None
    qmp = resolve_qmp(config, facts, around.qmp, previous=previous_qmp, local=local)
    previous = meta.forwards if meta else ()
    forwards = resolve_forwards(config, around, previous=previous, local=local)
    uuid = existing.UUIDString() if existing is not None else None
    built = dx.build_domain(
        config, facts=facts, qmp_endpoint=qmp, uuid=uuid, backing_formats=formats, forwards=forwards
    )
    return dx.to_string(built)


def placed(conn: libvirt.virConnect, resolved: images.Resolved) -> VMConfig:
    """The resolved config with the paths its files have on the VM's host: on another
    machine, :func:`.hostpaths.place`'s (a file missing here keeps its path: define
    says so)."""
    if is_local(conn):
        return resolved.config
    from .hostfiles import file_digest
    from .hostpaths import place

    there = kept_there(conn, resolved)
    try:
        return place(resolved.config, resolved, digest=file_digest, there=there).config
    except OSError:
        return resolved.config


def kept_there(
    conn: libvirt.virConnect, resolved: images.Resolved, config: VMConfig | None = None
) -> frozenset[Path]:
    """The files the config names that are not on this machine but on the VM's host (an
    ISO kept there): used in place. Asked through a pool of their folder (a transient one
    when the host has none: nothing is left there). ``config``: the resolved config as the
    caller changed it."""
    from .hostfiles import present_on
    from .hostpaths import inputs_not_here

    missing = inputs_not_here(config or resolved.config, resolved)
    return frozenset(present_on(conn, missing)) if missing else frozenset()


_REFUSED_CONFIG = (
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    libvirt.VIR_ERR_XML_ERROR,
    libvirt.VIR_ERR_XML_DETAIL,
)


def _define_with_disks(
    conn: libvirt.virConnect,
    config: VMConfig,
    xml: str,
    *,
    overlay: Disk | None = None,
    host_paths: HostPaths | None = None,
    running: bool = False,
) -> tuple[libvirt.virDomain, list[Path]]:
    """Create the missing disks, then the domain; if libvirt refuses it, remove the disks
    again (a failed define leaves nothing behind). ``overlay``: the boot disk over the
    config's image, made as a volume of the image store's pool. ``host_paths``: the VM's
    host is another machine, where its disks are made as volumes."""
    if host_paths is not None:
        from . import hostfiles

        created = hostfiles.make_disks(conn, host_paths, running=running)
        try:
            return _define_xml(conn, config, xml), created
        except BaseException:
            hostfiles.remove(conn, created)
            raise
    created = []
    try:
        for disk in config.disks:
            if disk == overlay and not disk.path.exists() and disk.backing is not None:
                from .imagestore import create_overlay

                create_overlay(conn, disk.path.parent, disk.path, disk.backing, disk.size)
                created.append(disk.path)
            elif not disk.path.exists():
                create_disk(disk)
                created.append(disk.path)
        dom = _define_xml(conn, config, xml)
    except BaseException:
        remove_files(created)
        raise
    return dom, created


def _define_xml(conn: libvirt.virConnect, config: VMConfig, xml: str) -> libvirt.virDomain:
    def refused(err: libvirt.libvirtError) -> OzoneError | None:
        if err.get_error_code() not in _REFUSED_CONFIG:
            return None
        return ConfigError(
            f"libvirt refused the VM: {err.get_error_message()}",
            file=str(config.source) if config.source else None,
        )

    with libvirt_errors(name=config.name, explain=refused):
        return conn.defineXML(xml)


# --- start / stop ----------------------------------------------------------------------


def _prepare_qmp(conn: libvirt.virConnect, dom: libvirt.virDomain, *, restoring: bool) -> None:
    """Before QEMU starts on this host: its private socket folder must exist, and a TCP port
    must be free (one ozone chose moves to a free port; one the config names is a conflict)."""
    meta = metadata(dom)
    endpoint = meta.qmp_endpoint if meta else None
    if endpoint is None:
        return
    if endpoint.kind == "unix":
        folder = Path(endpoint.path or "/").parent
        facts = None if folder.is_dir() else host_facts(conn)
        if facts is not None and facts.qmp_dir == folder:
            _qmp_folder_ready(facts)
        return
    if tcp_port_free(endpoint.host or "127.0.0.1", endpoint.port or 0):
        return
    if endpoint.auto and not restoring:
        _move_qmp_port(conn, dom, endpoint)
        return
    raise ConflictError(
        f"QMP port {endpoint.host}:{endpoint.port} of {dom.name()!r} is already in use by "
        "another program",
        hint='stop that program, or give the VM another endpoint ("qmp": "auto") and '
        "`ozone define` it again",
    )


def _move_qmp_port(conn: libvirt.virConnect, dom: libvirt.virDomain, old: QmpEndpoint) -> None:
    """Another program took the port ozone chose: redefine the VM on a free one."""
    with host_lock("define"):
        used = neighbours(conn, except_name=dom.name(), local=True).qmp
        endpoint = dx.free_qmp_port(
            dom.name(), used, port_free=_loopback_port_free, avoid=old.port or 0
        )
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        xml = dx.with_qmp_endpoint(call(dom.XMLDesc, flags, name=dom.name()), endpoint)
        call(conn.defineXML, xml, name=dom.name())


def _prepare_forwards(conn: libvirt.virConnect, dom: libvirt.virDomain, *, restoring: bool) -> None:
    """Before QEMU starts on this host: every host port it forwards must be free. The ssh
    port ozone chose moves to a free one; a port the config names is a conflict."""
    meta = metadata(dom)
    for forward in meta.forwards if meta else ():
        if tcp_port_free(forward.host, forward.port, protocol=forward.protocol):
            continue
        if forward.auto and not restoring:
            _move_ssh_port(conn, dom, forward)
            continue
        raise ConflictError(
            f"host port {forward.host}:{forward.port}/{forward.protocol}, which {dom.name()!r} "
            f"forwards to its port {forward.guest}, is in use by another program",
            hint="stop that program (`ss -ltnup` shows it), or change the VM's ports and "
            "`ozone define` it again",
        )


def _move_ssh_port(conn: libvirt.virConnect, dom: libvirt.virDomain, old: Forward) -> None:
    """Another program took the ssh port ozone chose: redefine the VM on a free one."""
    with host_lock("define"):
        around = neighbours(conn, except_name=dom.name(), local=True)
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        xml = call(dom.XMLDesc, flags, name=dom.name())
        meta = dx.parse_metadata(xml)
        forwards = list(meta.forwards if meta else ())
        moved = _free_ssh_forward(dom.name(), around, forwards, local=True, avoid=old.port)
        forwards[forwards.index(old)] = moved
        call(conn.defineXML, dx.with_forwards(xml, forwards), name=dom.name())


def start(conn: libvirt.virConnect, name: str) -> StartResult:
    """Start (or resume from saved state) a defined VM. Idempotent."""
    dom = lookup(conn, name)
    if is_active(dom):
        state = state_name(dom)
        if state == "paused":
            call(dom.resume, name=name)
            return StartResult(name, "running", "resumed").with_clock(sync_clock(dom))
        return StartResult(name, state, "none")
    restored = _has_managed_save(dom)
    local = is_local(conn)
    for attempt in range(3):
        if local:
            _prepare_qmp(conn, dom, restoring=restored)
            _prepare_forwards(conn, dom, restoring=restored)
        try:
            with libvirt_errors(name=name, explain=_port_taken(name)):
                dom.create()
            break
        except ConflictError:
            # the port was free a moment ago: another program took it in between
            if local and attempt < 2 and _ports_are_auto(dom):
                continue
            raise
    state = state_name(dom)
    if restored:
        return StartResult(name, state, "restored").with_clock(sync_clock(dom))
    return StartResult(name, state, "booted")


def _port_taken(name: str) -> Callable[[libvirt.libvirtError], OzoneError | None]:
    """Explains QEMU's failure to listen on a host port the VM forwards (one it listens on
    for QMP is a :class:`ConflictError` of :func:`translate` already)."""

    def explain(err: libvirt.libvirtError) -> OzoneError | None:
        message = err.get_error_message() or ""
        if "host forwarding rule" not in message:
            return None
        rule = re.search(r"forwarding rule '([^']{1,100})'", message)
        return ConflictError(
            f"QEMU could not listen on a host port {name} forwards"
            + (f" ({rule.group(1)})" if rule else ""),
            hint="another program took it: stop it (`ss -ltnup` shows it), or change "
            "the VM's ports and `ozone define` it again",
        )

    return explain


def _ports_are_auto(dom: libvirt.virDomain) -> bool:
    """Every TCP port the VM listens on is one ozone chose (and may move)."""
    meta = metadata(dom)
    if meta is None:
        return False
    qmp = meta.qmp_endpoint
    return (qmp is None or qmp.kind != "tcp" or qmp.auto) and all(f.auto for f in meta.forwards)


def sync_clock(dom: libvirt.virDomain, *, timeout: float = 5) -> ClockSync:
    """After a resume or a restore the guest's clock is behind by the time it was stopped:
    set it from the host's through the agent (best effort: a guest without agent keeps
    its clock, and says so)."""
    if not dx.has_agent_channel(call(dom.XMLDesc, 0, name=dom.name())):
        return ClockSync("not synced (no guest agent channel)")
    agent = Agent(dom)
    if not wait_for(lambda: agent.answers(timeout=1), timeout=timeout, interval=0.05):
        return ClockSync("not synced (the guest agent did not answer)")
    try:
        offset = agent.set_time()
    except ConnectionFailed:
        raise  # libvirt went away: that is no answer about the clock
    except OzoneError as err:
        return ClockSync(f"not synced ({err.message})")
    return ClockSync("synced", round(offset, 3))


def wait_agent(
    conn: libvirt.virConnect,
    name: str,
    *,
    timeout: float,
    report: Callable[[str], None] = lambda _text: None,
) -> float:
    """Wait until the guest agent answers and, on a VM with a cloud-init seed, until
    cloud-init has finished (its users, files and commands are there); returns seconds
    waited. ``report`` hears what is waited for."""
    dom = lookup(conn, name)
    xml = call(dom.XMLDesc, 0, name=name)
    if not dx.has_agent_channel(xml):
        raise StateError(
            f"{name} has no guest agent channel",
            hint='set "agent": true in its config and `ozone define` it again',
        )
    meta = dx.parse_metadata(xml)
    return wait_for_guest(
        dom,
        timeout=timeout,
        cloud_init=meta is not None and meta.cloud_init,
        report=report,
        hint=f"`ozone start {name}`",
    )


# `cloud-init status --wait` returns once cloud-init is done (or failed); the report is
# then `status: done|error|disabled` plus detail lines
_CLOUD_INIT_WAIT = (
    "command -v cloud-init >/dev/null || { echo 'status: absent'; exit 0; }; "
    "cloud-init status --wait >/dev/null 2>&1; cloud-init status --long 2>&1"
)


def wait_for_guest(
    dom: libvirt.virDomain,
    *,
    timeout: float,
    cloud_init: bool,
    interval: float = 0.1,
    report: Callable[[str], None] = lambda _text: None,
    hint: str | None = None,
) -> float:
    """:func:`wait_for_agent`, then (``cloud_init``) for cloud-init to finish; returns the
    seconds waited. ``report`` hears what is waited for."""
    began = time.monotonic()
    if cloud_init and not Agent(dom).answers(timeout=1):
        report("the guest agent (on a first boot, cloud-init may be installing it)")
    else:
        report("the guest agent")
    wait_for_agent(dom, timeout=timeout, interval=interval, hint=hint)
    if cloud_init:
        report("cloud-init to finish")
        left = max(1.0, timeout - (time.monotonic() - began))
        try:
            _wait_cloud_init(dom, timeout=left)
        except TimeoutExpired:
            raise TimeoutExpired(
                f"cloud-init in {dom.name()} did not finish within {timeout:g} s",
                hint=f"`ozone exec {dom.name()} -- cloud-init status --long` shows where it is",
            ) from None
    return time.monotonic() - began


def _wait_cloud_init(dom: libvirt.virDomain, *, timeout: float) -> None:
    name = dom.name()
    result = Agent(dom).script(_CLOUD_INIT_WAIT, timeout=timeout)
    text = result.stdout.decode(errors="replace")
    fields = dict(
        line.split(":", 1) for line in text.splitlines() if ":" in line and not line[0].isspace()
    )
    state = fields.get("status", "").strip()
    if state == "error":
        detail = " ".join(text.split("detail:", 1)[-1].split())[:200]
        raise StateError(
            f"cloud-init in {name} ended in error: {detail or 'no detail'}",
            hint=f"`ozone exec {name} -- cloud-init status --long`, and its log "
            "/var/log/cloud-init.log, say more",
        )


def wait_for_agent(
    dom: libvirt.virDomain, *, timeout: float, interval: float = 0.1, hint: str | None = None
) -> float:
    """Poll until ``dom``'s guest agent answers; returns seconds waited. Fails at once when
    the VM stops (with ``hint``), and when ``timeout`` runs out."""
    name = dom.name()
    agent = Agent(dom)
    began = time.monotonic()

    def ready() -> bool:
        if not is_active(dom):
            raise StateError(f"{name} is not running", hint=hint)
        return agent.answers(timeout=1)

    if not wait_for(ready, timeout=timeout, interval=interval):
        raise TimeoutExpired(f"the guest agent of {name} did not answer within {timeout:g} s")
    return time.monotonic() - began


def stop(
    conn: libvirt.virConnect, name: str, *, timeout: float = 60, force: bool = False
) -> StopResult:
    """Shut the VM down: through the guest agent if it answers, else by ACPI power button;
    after ``timeout`` seconds (or at once with ``force``) pull the plug."""
    dom = lookup(conn, name)
    began = time.monotonic()
    if not is_active(dom):
        return StopResult(name, "none", 0.0)
    requested = None
    if not force:
        requested = _request_shutdown(dom)
        if wait_for(lambda: not is_active(dom), timeout=timeout):
            return StopResult(name, requested, time.monotonic() - began, requested)
    with contextlib.suppress(StateError, NotFoundError):
        call(dom.destroy, name=name)  # it may have stopped by itself in the meantime
    if not wait_for(lambda: not is_active(dom), timeout=10):
        raise TimeoutExpired(f"{name} is still running after a forced stop")
    return StopResult(name, "forced", time.monotonic() - began, requested)


def _request_shutdown(dom: libvirt.virDomain) -> str:
    name = dom.name()
    if Agent(dom).answers(timeout=1):
        try:
            call(dom.shutdownFlags, libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT, name=name)
            return "agent"
        except ConnectionFailed:
            raise
        except OzoneError:
            pass  # e.g. the guest's shutdown command failed: try ACPI
    try:
        call(dom.shutdownFlags, libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN, name=name)
    except (StateError, NotFoundError):
        if is_active(dom):
            raise  # (else it stopped by itself in the meantime)
    return "acpi"


def destroy(conn: libvirt.virConnect, name: str) -> bool:
    """Force off at once. Returns False if it was not running."""
    dom = lookup(conn, name)
    if not is_active(dom):
        return False
    call(dom.destroy, name=name)
    return True


def undefine(
    conn: libvirt.virConnect, name: str, *, remove_storage: bool = False, force: bool = False
) -> list[str]:
    """Remove the domain definition; with ``remove_storage`` also its writable disk images.
    Before deleting anything it checks every image: a regular file with no other hard link,
    not an ISO, used by no other VM (as its disk or anywhere in a backing chain, under any
    path). If one fails, nothing changes. Returns the files removed."""
    dom = lookup(conn, name)
    active = is_active(dom)
    local = is_local(conn)
    if active and not force:
        raise StateError(f"{name} is running", hint=f"`ozone stop {name}` first, or pass --force")
    with host_lock("define"):  # no define may take up a disk between the check and the delete
        images: list[Path] = []
        if remove_storage:
            xml = call(dom.XMLDesc, libvirt.VIR_DOMAIN_XML_INACTIVE, name=name)
            images = [use.path for use in dx.files_of(xml) if use.role == "disk"]
            _check_deletable(conn, name, images, local=local)
        if active:
            call(dom.destroy, name=name)
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        )
        ours = metadata(dom) is not None
        call(dom.undefineFlags, flags, name=name)
        removed, failed = remove_files(images) if local else _remove_volumes(conn, images)
    if ours and local:  # keys are per name: a remote VM's may be a local one's
        from .ssh import forget

        forget(name)
    if failed:
        raise OzoneError(
            f"undefined {name}, but could not delete "
            + ", ".join(f"{path} ({reason})" for path, reason in failed),
        )
    return [str(p) for p in removed]


def _check_deletable(
    conn: libvirt.virConnect, name: str, images: list[Path], *, local: bool
) -> None:
    around = neighbours(conn, except_name=name, local=local)
    problems = []
    for image in images:
        reason = why_not_deletable(image) if local else _why_not_deletable_there(conn, image)
        users = around.uses(image) if reason is None else []
        if users:
            reason = "VM " + ", ".join(users) + " uses it"
        if reason:
            problems.append(f"{image} ({reason})")
    if problems:
        raise ConflictError(
            "not deleting " + "; ".join(problems) + ": nothing was changed",
            hint=f"`ozone undefine {name}` without --remove-storage keeps the disks",
        )


def _why_not_deletable_there(conn: libvirt.virConnect, path: Path) -> str | None:
    """:func:`.storage.why_not_deletable` for a file of another host, as its storage pool
    sees it."""
    from .hostfiles import info

    held = info(conn, path)
    if held is None:
        return None
    if held.type != "file":
        return f"it is not a regular file (a {held.type} volume)"
    if path.suffix.lower() == ".iso":
        return "it is an ISO image"
    return None


def _remove_volumes(
    conn: libvirt.virConnect, paths: list[Path]
) -> tuple[list[Path], list[tuple[Path, str]]]:
    from .hostfiles import delete

    removed, failed = [], []
    for path in paths:
        try:
            if delete(conn, path):
                removed.append(path)
        except OzoneError as err:
            failed.append((path, err.message))
    return removed, failed


# --- list / status ---------------------------------------------------------------------


@dataclass(frozen=True)
class ShareStatus:
    host: str
    guest: str | None  # where the guest mounts it (None: not a share of ozone's)
    readonly: bool
    enforced_by: str | None  # a read-only share's guard: "host" or "guest mount"
    via: str = "virtio-fs"
    fstab: str | None = None  # the guest's /etc/fstab line for it


@dataclass(frozen=True)
class VMStatus(VMInfo):
    """One VM in full: what `ozone list` shows of it, and its devices and warnings."""

    serial_log: str | None = None
    disks: tuple[str, ...] = ()
    agent_channel: bool = False
    autostart: bool = False
    ssh: str | None = None  # HOST:PORT of the loopback forward to its ssh
    ports: tuple[str, ...] = ()  # the forwards its config asks for
    shares: tuple[ShareStatus, ...] = ()
    warnings: tuple[str, ...] = ()


def status(conn: libvirt.virConnect, name: str) -> VMStatus:
    dom = lookup(conn, name)
    xml = call(dom.XMLDesc, 0, name=name)
    meta = dx.parse_metadata(xml)  # the XML holds it: no second call for the metadata
    base = info(dom, meta, with_meta=meta is not None)
    forward = meta.ssh_forward if meta else None
    shares = tuple(
        ShareStatus(s.host, s.guest, s.readonly, s.enforced_by, fstab=s.fstab)
        for s in dx.shares_of(xml)
    )
    warnings = qmp_warnings(meta.qmp_endpoint if meta else None)
    if any(s.enforced_by == "guest mount" for s in shares):
        warnings.append(
            "a read-only share is only mounted read-only by the guest, whose root can remount "
            "it: `ozone define` it again as root, which installs ozone's read-only virtiofsd"
        )
    return VMStatus(
        **dataclasses.asdict(base),
        serial_log=dx.serial_log_of(xml),
        disks=tuple(dx.disk_images_of(xml)),
        agent_channel=dx.has_agent_channel(xml),
        autostart=bool(call(dom.autostart, name=name)),
        ssh=f"{forward.host}:{forward.port}" if forward else None,
        ports=tuple(str(f) for f in meta.forwards if not f.auto) if meta else (),
        shares=shares,
        warnings=tuple(warnings),
    )


def qmp_warnings(endpoint: QmpEndpoint | None) -> list[str]:
    """QMP has no authentication: say so when an endpoint is open to other users."""
    if endpoint is None or endpoint.kind != "tcp":
        return []
    return [
        f"QMP on {endpoint} has no authentication and every local user can reach it: "
        '"qmp": "auto" gives the VM a private socket instead'
    ]


def dumpxml(conn: libvirt.virConnect, name: str, *, inactive: bool = False) -> str:
    dom = lookup(conn, name)
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
    return str(call(dom.XMLDesc, flags, name=name))


@dataclass(frozen=True)
class SerialLog:
    """A VM's serial log on its host: a file here, or a volume there read through libvirt."""

    conn: libvirt.virConnect
    path: Path
    local: bool

    def size(self) -> int | None:
        """Its length now; None when there is none yet (the VM never ran)."""
        if self.local:
            try:
                return self.path.stat().st_size
            except FileNotFoundError:
                return None
            except PermissionError:
                raise self._unreadable() from None
        from .hostfiles import info

        held = info(self.conn, self.path)
        return held.physical if held is not None else None

    def read(self, offset: int = 0) -> bytes:
        """Its bytes from ``offset`` (b"" when there is no log)."""
        if self.local:
            try:
                with self.path.open("rb") as handle:
                    handle.seek(offset)
                    return handle.read()
            except FileNotFoundError:
                return b""
            except PermissionError:
                raise self._unreadable() from None
        from .hostfiles import download

        if self.size() is None:
            return b""
        return download(self.conn, self.path, offset=offset)

    def _unreadable(self) -> OzoneError:
        return OzoneError(f"cannot read {self.path}: permission denied", hint="run as root")


def serial_log(conn: libvirt.virConnect, name: str) -> SerialLog:
    xml = dumpxml(conn, name)
    log = dx.serial_log_of(xml)
    if not log:
        raise NotFoundError(
            f"{name} has no serial log file", hint="ozone VMs log their serial port"
        )
    return SerialLog(conn, Path(log), is_local(conn))
