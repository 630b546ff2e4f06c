"""`ozone run`: a throwaway VM from a config, one command in it, nothing left behind; and
the boot cache that makes it start in a fraction of a boot.

The boot cache keeps, per config, the saved state (libvirt save image) of a guest taken right
after its agent first answered, together with the disk overlays it ran on. An entry's key
covers everything that state depends on: the config, the QEMU and libvirt versions, the
machine type and accelerator, and the identity (size, mtime, inode) of the ISO, kernel,
initrd, BIOS, QEMU binary and base disks. Change any of them and the key changes: a miss.

A save image restores only under the name and UUID it was saved with (libvirt checks both),
so an entry has a few *slots*, each a save image of its own under its own name; a run locks
one slot, and runs of the same config at once use different slots (or, when all are busy,
boot without the cache). The slot's overlays are never written after the save: each run puts
a fresh qcow2 overlay over them, so a memory image is never paired with a disk that changed
after it was taken, and the config's base disks are never written at all.

On another host (a remote URI) all of this happens there: the config's files are copied
there, the overlays, save images and serial logs are volumes of ozone's pools there, and
the key names that host and its files as it sees them (:mod:`.runhost`).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
from lxml import etree

from . import domain_xml as dx
from . import execute
from .agent import Agent
from .cache import SLOTS, Slot, acquire_slot, clear_cache, key_digest, prune_entry
from .config import Disk, Qmp, VMConfig, check_host_paths
from .connection import (
    best_effort,
    call,
    connect,
    domain_metadata,
    find_domain,
    host_facts,
    if_exists,
    is_local,
)
from .errors import OzoneError, StateError
from .rundir import RunDir, reap_runs
from .runhost import Kind, LocalFiles, disk_kinds, files_for
from .vm import is_active, wait_for_guest

Report = Callable[[str], None]


def config_of(config_or_name: str, *, uri: str | None = None, host: str | None = None) -> VMConfig:
    """What `ozone run` runs: a config file by path or name, or else the config an ozone VM
    of that name (on ``uri``, the inventory's ``host``) was defined from."""
    from .config import find_config, load_config

    try:
        return load_config(find_config(config_or_name))
    except OzoneError as not_a_config:
        with connect(uri, host=host) as conn:
            dom = find_domain(conn, config_or_name)
            meta = domain_metadata(dom) if dom is not None else None
        if meta is None or not meta.source:
            raise not_a_config from None
        return load_config(meta.source)


# --- the key -------------------------------------------------------------------------------


# what ozone itself puts in a saved state (2: throwaway VMs are never relabelled)
CACHE_FORMAT = 2


def cache_key(
    conn: libvirt.virConnect,
    config: VMConfig,
    facts: dx.HostFacts,
    files: LocalFiles | None = None,
) -> dict[str, Any]:
    """Everything a saved boot state depends on (``files``: where the run's files are, which
    names the files the key covers and tells what they are)."""
    # the name stays in: a slot's saved state comes back only under its own name
    generic = dataclasses.replace(config, qmp=Qmp(kind="off"), source=None)
    files = files or files_for(conn, facts)
    return {
        "format": CACHE_FORMAT,
        "config": generic.hash,
        "qemu": call(conn.getVersion),
        "libvirt": call(conn.getLibVersion),
        "machine": config.machine,
        "type": dx.domain_type(config, facts),
        **files.key_parts(config),
    }


# --- booting, saving, restoring ------------------------------------------------------------


def _overlays(
    files: LocalFiles, config: VMConfig, kinds: list[Kind], target: Callable[[int], Path]
) -> list[Disk]:
    """qcow2 overlays (at ``target(index)``) over the config's disks, owned by QEMU's user
    (a throwaway VM is never relabelled: see :func:`_transient`)."""
    disks = []
    for i, (disk, kind) in enumerate(zip(config.disks, kinds, strict=True)):
        if kind == "as-is":  # read in place (a cloud-init seed)
            disks.append(disk)
            continue
        path = target(i)
        if kind == "overlay":
            # the image's boot disk may be bigger than the image (its size)
            size = disk.size if i == 0 and config.image is not None else None
            files.overlay(path, backing=disk.path, size=size)
        else:
            assert disk.size is not None
            files.blank(path, disk.size)
        disks.append(Disk(path=path, format="qcow2", bus=disk.bus))
    return disks


def _transient(
    conn: libvirt.virConnect,
    config: VMConfig,
    facts: dx.HostFacts,
    name: str,
    disks: list[Disk],
    run_dir: RunDir,
) -> libvirt.virDomain:
    """Start a transient domain for ``config`` under ``name`` on ``disks``. QEMU runs as its
    usual user, but libvirt changes no file's owner: libvirt chowns the read-only images of
    a VM (the config's base disks, its ISO) to QEMU's user at start and never gives them
    back, and a base image must keep its owner and mode."""
    run_config = dataclasses.replace(
        config,
        name=name,
        disks=tuple(disks),
        qmp=Qmp(kind="off"),
        serial_log=None,
        description=run_dir.mark,
    )
    uuid = str(uuidlib.uuid4())
    xml = dx.to_string(
        dx.build_domain(
            run_config, facts=facts, qmp_endpoint=None, uuid=uuid, run_as=facts.qemu_label
        )
    )
    run_dir.expect(name, uuid)
    return call(conn.createXML, xml, 0, name=name)


def _set_clock(dom: libvirt.virDomain, *, timeout: float) -> None:
    """Set a restored guest's clock, which stopped when its state was saved (the first agent
    command after the restore: it also tells that the agent answers)."""
    agent = Agent(dom)
    give_up = time.monotonic() + timeout
    while True:
        try:
            agent.set_time(report_offset=False)
            return
        except OzoneError:
            if time.monotonic() >= give_up or not is_active(dom):
                raise
            time.sleep(0.05)


def fill(
    conn: libvirt.virConnect,
    slot: Slot,
    config: VMConfig,
    facts: dx.HostFacts,
    *,
    boot_timeout: float,
    run_dir: RunDir,
    files: LocalFiles | None = None,
    kinds: list[Kind] | None = None,
) -> None:
    """Boot the config under the slot's name, wait for its agent, save its state."""
    files = files or files_for(conn, facts)
    files.empty_slot(slot)
    disks = _overlays(files, config, kinds or disk_kinds(config), slot.disk)
    dom = _transient(conn, config, facts, slot.domain_name, disks, run_dir)
    try:
        # a guest with cloud-init is saved once cloud-init is done: every run gets its users
        wait_for_guest(dom, timeout=boot_timeout, cloud_init=config.uses_cloud_init, interval=0.05)
        files.save(dom, slot)  # the transient domain ends here
    except BaseException:
        with best_effort():  # the failure may have ended the domain already
            dom.destroy()
        raise
    meta: dict[str, Any] = {
        "name": slot.domain_name,
        "created": time.time(),
        "disks": {str(d.path): files.identity(d.path) for d in disks if not d.readonly},
    }
    if files.remote:  # what the host holds, as it was saved (and its size, for `cache list`)
        from .hostfiles import info

        meta["state"] = files.identity(slot.state)
        held = [info(conn, p) for p in (slot.state, *(d.path for d in disks if not d.readonly))]
        meta["bytes"] = sum(h.physical for h in held if h is not None)
    slot.meta.write_text(json.dumps(meta, indent=2))


def restore(
    conn: libvirt.virConnect,
    slot: Slot,
    run_dir: RunDir,
    facts: dx.HostFacts,
    files: LocalFiles | None = None,
) -> libvirt.virDomain:
    """Start the slot's saved state on fresh overlays over the slot's disks."""
    files = files or files_for(conn, facts)
    meta = json.loads(slot.meta.read_text())
    slot_disks = [Path(p) for p in meta["disks"]]
    mapping = {}
    for i, base in enumerate(slot_disks):
        target = files.run_disk(run_dir, i)
        files.overlay(target, backing=base)
        mapping[str(base)] = str(target)
    xml = call(conn.saveImageGetXMLDesc, str(slot.state), libvirt.VIR_DOMAIN_XML_SECURE)
    root = etree.fromstring(xml.encode())
    for source in root.iterfind("devices/disk/source"):
        file = source.get("file")
        if file is not None and file in mapping:
            source.set("file", mapping[file])
    description = root.find("description")
    if description is None:
        description = etree.SubElement(root, "description")
    description.text = run_dir.mark
    dxml = etree.tostring(root, encoding="unicode")
    name = root.findtext("name") or slot.domain_name
    run_dir.expect(name, root.findtext("uuid") or "")
    call(conn.restoreFlags, str(slot.state), dxml, libvirt.VIR_DOMAIN_SAVE_RUNNING)
    return call(conn.lookupByName, name, name=name)


# --- ozone run -----------------------------------------------------------------------------


@dataclass
class RunOptions:
    keep: bool = False
    use_cache: bool = True
    boot_timeout: float = 120
    report: Report = lambda _text: None


def run(
    conn: libvirt.virConnect,
    config: VMConfig,
    argv: list[str],
    options: RunOptions,
    **exec_options: Any,
) -> int:
    """Start a throwaway VM from ``config`` (restored from the boot cache when it can be),
    run ``argv`` in it as :func:`execute.run` does, remove the VM and its overlays (also on
    errors, timeouts and Ctrl-C). Returns the program's exit status."""
    from . import images, imagestore

    execute.check_argv(argv, exec_options.get("env"))
    exec_options["stage_dir"] = exec_options.get("stage_dir") or config.stage_dir
    execute.check_options(execute.ExecOptions(timeout=exec_options.get("timeout")))
    report = options.report
    resolved = images.resolve(config, for_run=True)
    imagestore.ensure(conn, resolved, report=report, local=is_local(conn))
    config = resolved.config
    facts = host_facts(conn)
    dx.check_machine(config, facts)
    if is_local(conn):  # (another host: each file is copied, or found there, by bring)
        check_host_paths(dataclasses.replace(config, disks=()))
    files = files_for(conn, facts)
    kinds = disk_kinds(config)
    config = files.bring(config, resolved, kinds, report)  # (another host: its paths there)
    if config.shares:
        from .config import check_shares
        from .vm import with_share_guard

        check_shares(config)
        facts = with_share_guard(config, facts)
        if options.use_cache:
            report("no boot cache: QEMU cannot save the state of a VM with shares (virtio-fs)")
            options = dataclasses.replace(options, use_cache=False)
    skipped: list[str] = []
    for leftover in reap_runs(conn, skipped=skipped):
        report(f"removed {leftover}, left by a run that died")
    for note in skipped:
        report(f"left {note}")
    slot = None
    parts: dict[str, Any] = {}
    dom: libvirt.virDomain | None = None
    began = time.monotonic()
    run_dir: RunDir | None = None
    try:
        run_dir = RunDir.create(config, conn)
        if options.use_cache:
            parts = cache_key(conn, config, facts, files)
            slot = acquire_slot(conn, config, parts)
            if slot is None:
                report(f"all {SLOTS} boot cache slots of {config.name} are busy: booting")
        if slot is not None:
            if not slot.valid(conn):
                report(f"boot cache miss for {config.name}: booting and saving its state")
                try:
                    fill(
                        conn,
                        slot,
                        config,
                        facts,
                        boot_timeout=options.boot_timeout,
                        run_dir=run_dir,
                        files=files,
                        kinds=kinds,
                    )
                except BaseException:
                    slot.release()
                    prune_entry(slot.entry, conn)  # an entry with no state is no entry
                    slot = None
                    raise
                clear_cache(conn, config=str(config.source), except_key=key_digest(parts))
            else:
                report(f"boot cache hit for {config.name}")
            try:
                dom = restore(conn, slot, run_dir, facts, files)
            except OzoneError as err:
                # e.g. a host change the key does not cover: drop the state, boot this time
                report(f"cannot restore the boot cache ({err.message}): booting")
                slot.meta.unlink(missing_ok=True)
                slot.release()
                slot = None
                files.drop_overlays(run_dir)
            else:
                _set_clock(dom, timeout=30)
        if dom is None:
            name = f"{config.name[:40]}-run-{secrets.token_hex(3)}"
            disks = _overlays(files, config, kinds, lambda i: files.run_disk(run_dir, i))
            dom = _transient(conn, config, facts, name, disks, run_dir)
            wait_for_guest(
                dom, timeout=options.boot_timeout, cloud_init=config.uses_cloud_init, interval=0.05
            )
        report(f"{dom.name()} ready in {time.monotonic() - began:.2f} s")
        return execute.run(Agent(dom), argv, **exec_options)
    except OSError as err:
        raise OzoneError(f"{err.filename or 'ozone run'}: {err.strerror}") from None
    finally:
        with execute.signals_deferred():  # a second Ctrl-C must not stop the clean-up
            if run_dir is not None:
                if options.keep and dom is not None:
                    run_dir.keep()
                    report(f"kept {dom.name()} running (its disks are {files.where(run_dir)})")
                else:
                    _discard(dom, run_dir, files)
            if slot is not None:
                slot.release()


def _discard(dom: libvirt.virDomain | None, run_dir: RunDir, files: LocalFiles) -> None:
    """Remove the run's VM, its overlays and (a one-off name's) logs, and its folder."""
    name = None
    if dom is not None:
        name = dom.name()
        try:
            if_exists(dom.destroy, name=name)  # (a transient domain that ended is gone)
        except StateError:
            if is_active(dom):
                raise
    files.discard(run_dir, name)
    run_dir.unlock()
