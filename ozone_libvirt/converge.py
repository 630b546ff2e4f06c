"""`ozone apply` and `ozone diff`: configs against what libvirt holds.

:func:`load` reads configs (files, names, folders), :func:`make_plan` asks libvirt what it
holds and hands both to the pure planner (:mod:`.plan`), :func:`execute` carries a plan out
with bounded concurrency: one failed step never stops the others, and nothing running is
stopped without ``restart``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import libvirt

from . import domain_xml as dx
from .connection import call, if_exists, lookup
from .errors import ConfigError, NotFoundError, OzoneError, StateError
from .metadata import OZONE_NS, OZONE_PREFIX, parse_metadata
from .plan import Desired, Held, Plan, Step, parse_record, plan

if TYPE_CHECKING:
    from .config import VMConfig
    from .vm import DefineResult, Neighbours

Report = Callable[[str, str], None]  # (VM name, what happens)
Say = Callable[[str], None]  # what happens to one VM
Progress = Callable[[int, int | None], None] | None  # bytes done, of how many


def _quiet(_text: str) -> None:
    pass


# --- reading configs ---------------------------------------------------------------------


@dataclass(frozen=True)
class Configs:
    configs: tuple[VMConfig, ...]
    folders: tuple[str, ...]  # the folders given: `--prune` looks in these


def load(targets: Sequence[str]) -> Configs:
    """Every config the targets name: a folder gives each ``*.json|yaml|yml`` in it, a path
    or a name (on OZONE_CONFIG_PATH) one file. All are checked before anything changes; two
    configs of one VM name are an error."""
    from .completion import CONFIG_SUFFIXES
    from .config import find_config, load_config

    paths: list[Path] = []
    folders: list[str] = []
    for target in targets:
        folder = Path(target).expanduser()
        if folder.is_dir():
            try:
                found = sorted(
                    p
                    for p in folder.iterdir()
                    if p.suffix in CONFIG_SUFFIXES and not p.name.startswith(".")
                )
            except OSError as err:
                raise ConfigError(f"cannot read the folder {target}: {err.strerror}") from None
            if not found:
                raise ConfigError(
                    f"no config in {target} (looked for *.json, *.yaml, *.yml)",
                    hint="pass a folder of VM configs, a config file or a config name",
                )
            paths += [p.absolute() for p in found]
            folders.append(os.path.realpath(folder))
        else:
            paths.append(find_config(target))
    configs: list[VMConfig] = []
    seen: dict[str, Path] = {}
    for path in {os.path.realpath(p): p for p in paths}.values():  # one file, read once
        config = load_config(path)
        if config.name in seen:
            raise ConfigError(
                f"VM {config.name!r} is named by two configs: {seen[config.name]} and {path}",
                file=str(path),
                field="name",
                hint="each VM has one config: rename or remove one of them",
            )
        seen[config.name] = path
        configs.append(config)
    return Configs(tuple(configs), tuple(folders))


def desired(
    config: VMConfig,
    conn: libvirt.virConnect | None = None,
    around: Neighbours | None = None,
) -> Desired:
    """What the planner compares: the config as define resolves it (its image and seed) and,
    given what the other VMs on the host hold (``around``), the digest of the definition a
    define would write now."""
    from .images import resolve
    from .ssh import vm_public_key

    key = vm_public_key(config.name, create=False) if config.uses_cloud_init else None
    resolved = resolve(config, vm_key=key)
    if conn is not None:
        from .vm import placed

        resolved = dataclasses.replace(resolved, config=placed(conn, resolved))
    source = str(config.source) if config.source else None
    xml_hash = None
    if conn is not None and around is not None:
        from .vm import desired_xml

        meta = parse_metadata(desired_xml(conn, config, around=around.without(config.name)))
        xml_hash = meta.xml_hash if meta else None
    record = dx.config_record(resolved.config)
    return Desired(config.name, source, resolved.config.hash, record, xml_hash)


# --- what libvirt holds --------------------------------------------------------------------


def _xml(dom: libvirt.virDomain, flags: int) -> str | None:
    xml = if_exists(dom.XMLDesc, flags, name=dom.name())
    return None if xml is None else str(xml)  # (None: undefined meanwhile)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # not ours to look into (another user's folder): taken as there
        return True


def held_state(dom: libvirt.virDomain, *, local: bool) -> Held | None:
    """ozone's records in a domain's persistent and live definitions."""
    name = dom.name()
    inactive = _xml(dom, libvirt.VIR_DOMAIN_XML_INACTIVE)
    if inactive is None:
        return None
    meta = parse_metadata(inactive)
    if meta is None:
        return Held(name, ours=False, running=False)
    running = bool(call(dom.isActive, name=name))
    live = parse_metadata(_xml(dom, 0)) if running else None
    missing: tuple[str, ...] = ()
    # a file the definition names is gone: define makes (or copies) what it can again
    if local:
        missing = tuple(str(u.path) for u in dx.files_of(inactive) if not _exists(u.path))
    else:
        from .hostfiles import exists

        conn = dom.connect()
        uses = dx.files_of(inactive)
        missing = tuple(str(u.path) for u in uses if exists(conn, u.path) is False)
    keeps = []
    if call(dom.hasManagedSaveImage, 0, name=name):
        keeps.append("saved state")
    if call(dom.snapshotNum, 0, name=name):
        keeps.append("snapshots")
    folder = os.path.realpath(os.path.dirname(meta.source)) if meta.source else None
    return Held(
        name,
        ours=True,
        running=running,
        hash=meta.hash,
        record=parse_record(meta.config),
        xml_hash=meta.xml_hash,
        live_hash=live.hash if live else None,
        live_record=parse_record(live.config) if live else None,
        live_xml_hash=live.xml_hash if live else None,
        source=meta.source,
        source_dir=folder,
        missing=missing,
        keeps=tuple(keeps),
    )


def make_plan(conn: libvirt.virConnect, configs: Configs, *, prune: bool = False) -> Plan:
    """Ask libvirt what it holds for each config's VM (and, with ``prune``, for every ozone
    VM defined from an applied folder) and plan. For a VM that exists the planner also
    learns the definition a define would write now (see :data:`.plan.DRIFT`)."""
    from . import vm
    from .connection import is_local

    local = is_local(conn)
    names = {c.name for c in configs.configs}
    held: dict[str, Held] = {}
    for dom in call(conn.listAllDomains, 0):
        # `ozone run`'s throwaway VMs are transient: never planned, never pruned
        if dom.name() in names or (prune and call(dom.isPersistent, name=dom.name())):
            state = held_state(dom, local=local)
            if state is not None:
                held[state.name] = state
    around = vm.neighbours(conn, local=local) if held else None
    wanted = [desired(c, conn, around if c.name in held else None) for c in configs.configs]
    return plan(wanted, held, prune_in=configs.folders if prune else ())


# --- carrying a plan out -----------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    """`ozone apply`: the plan, whether it was carried out, and each step's result."""

    plan: Plan
    applied: bool
    results: tuple[StepResult, ...] = ()


@dataclass(frozen=True)
class StepResult:
    name: str
    action: str
    ok: bool
    done: str  # what apply did: defined, redefined, restarted, undefined, nothing
    error: OzoneError | None = None
    define: DefineResult | None = None


def execute(
    conn: libvirt.virConnect,
    the_plan: Plan,
    configs: Configs,
    *,
    restart: bool = False,
    jobs: int = 4,
    stop_timeout: float = 60,
    report: Report = lambda _name, _text: None,
) -> list[StepResult]:
    """Carry out every step that changes something, ``jobs`` at a time; the results come in
    the plan's order. A step that fails is reported and the others go on."""
    by_name = {c.name: c for c in configs.configs}
    todo = [s for s in the_plan.steps if s.action != "unchanged"]
    lock = threading.Lock()

    def said(name: str) -> Callable[[str], None]:
        def say(text: str) -> None:
            with lock:
                report(name, text)

        return say

    def run(step: Step) -> StepResult:
        try:
            return _carry_out(
                conn, step, by_name.get(step.name), restart, stop_timeout, said(step.name)
            )
        except OzoneError as err:
            return StepResult(step.name, step.action, False, "failed", error=err)
        except Exception as err:  # one step's surprise is its own failure, not the others'
            failure = OzoneError(f"{type(err).__name__}: {err}")
            return StepResult(step.name, step.action, False, "failed", error=failure)

    results: dict[str, StepResult] = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        for result in pool.map(run, todo):
            results[result.name] = result
    finally:  # Ctrl-C: no step that has not begun begins; those under way end
        pool.shutdown(wait=True, cancel_futures=True)
    return [
        results.get(s.name) or StepResult(s.name, s.action, True, "nothing") for s in the_plan.steps
    ]


def _carry_out(
    conn: libvirt.virConnect,
    step: Step,
    config: VMConfig | None,
    restart: bool,
    stop_timeout: float,
    say: Callable[[str], None],
) -> StepResult:
    from . import vm

    if step.action == "prune":
        if "would lose" in step.reason:
            raise StateError(
                f"{step.name} not pruned: {step.reason.partition('; it has ')[2]}",
                hint=f"`ozone undefine {step.name}` removes it with them",
            )
        if step.running and not restart:
            raise StateError(
                f"{step.name} is running: not pruned",
                hint="`ozone apply --prune --restart` stops it first, or `ozone stop` it",
            )
        if step.running:
            say("stopping")
            vm.stop(conn, step.name, timeout=stop_timeout)
        say("undefining")
        vm.undefine(conn, step.name)
        return StepResult(step.name, step.action, True, "undefined")
    assert config is not None
    defined = (
        carry_out_define(conn, step, config, report=say, progress=None) if step.define else None
    )
    if step.action == "change" and step.running:
        return StepResult(step.name, step.action, True, "changed live", define=defined)
    if step.action == "restart-needed" and restart:
        if not vm.is_active(lookup(conn, step.name)):  # stopped meanwhile: left so
            return StepResult(step.name, step.action, True, "redefined", define=defined)
        say("stopping")
        vm.stop(conn, step.name, timeout=stop_timeout)
        say("starting")
        vm.start(conn, step.name)
        return StepResult(step.name, step.action, True, "restarted", define=defined)
    done = "defined" if step.action == "create" else "redefined" if defined else "nothing"
    return StepResult(step.name, step.action, True, done, define=defined)


def carry_out_define(
    conn: libvirt.virConnect, step: Step, config: VMConfig, *, report: Say, progress: Progress
) -> DefineResult:
    """Define the VM of a planned step; a running VM whose change needs no restart takes it."""
    from . import vm

    report("defining")
    result = vm.define(conn, config, report=report, progress=progress)
    if step.action == "change" and step.running:
        _apply_live(conn, step.name)
        result = dataclasses.replace(result, restart_needed=False)
    return result


def define(
    conn: libvirt.virConnect, config: VMConfig, *, report: Say = _quiet, progress: Progress = None
) -> DefineResult:
    """`ozone define`: apply of one config. Defined when new or changed; else left as it is
    (its definition byte for byte), and the result says so (``changed`` false)."""
    from . import vm
    from .connection import is_local
    from .plan import plan_one

    local = is_local(conn)
    dom = vm.find(conn, config.name)
    held = held_state(dom, local=local) if dom is not None else None
    around = vm.neighbours(conn, local=local) if held is not None and held.ours else None
    step = plan_one(desired(config, conn, around), held)
    if step.define:
        return carry_out_define(conn, step, config, report=report, progress=progress)
    assert dom is not None
    meta = vm.metadata(dom)
    assert meta is not None
    return vm.DefineResult(
        name=config.name,
        uuid=dom.UUIDString(),
        created=False,
        qmp=meta.qmp,
        restart_needed=step.action == "restart-needed",
        forwards=tuple(str(f) for f in meta.forwards),
        changed=False,
    )


def _apply_live(conn: libvirt.virConnect, name: str) -> None:
    """A running VM takes its new description, and ozone's records, without a restart."""
    dom = call(conn.lookupByName, name, name=name)
    xml = call(dom.XMLDesc, libvirt.VIR_DOMAIN_XML_INACTIVE, name=name)
    description = dx.description_of(xml)
    live = libvirt.VIR_DOMAIN_AFFECT_LIVE
    call(
        dom.setMetadata,
        libvirt.VIR_DOMAIN_METADATA_DESCRIPTION,
        description,
        None,
        None,
        live,
        name=name,
    )
    ours = call(
        dom.metadata,
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        OZONE_NS,
        libvirt.VIR_DOMAIN_AFFECT_CONFIG,
        name=name,
    )
    call(
        dom.setMetadata,
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        ours,
        OZONE_PREFIX,
        OZONE_NS,
        live,
        name=name,
    )


# --- diff --------------------------------------------------------------------------------


def diff(conn: libvirt.virConnect, target: str) -> str:
    """The unified diff of the domain XML libvirt holds for a VM against the one its config
    makes (``target``: a config name or path, or a VM name, whose config is the file it was
    defined from)."""
    from . import vm
    from .completion import CONFIG_SUFFIXES
    from .config import find_config, load_config

    dom = None if "/" in target or target.endswith(CONFIG_SUFFIXES) else vm.find(conn, target)
    meta = vm.metadata(dom) if dom is not None else None
    if meta is not None and meta.source is not None:  # a VM: the file it was defined from
        path = Path(meta.source)
        if not path.is_file():
            raise ConfigError(
                f"{target} was defined from {path}, which is gone",
                hint="pass the config to compare with: `ozone diff PATH`",
            )
    else:
        path = find_config(target)
    config = load_config(path)
    if vm.find(conn, config.name) is None:
        raise NotFoundError(f"no VM named {config.name!r}", hint=f"`ozone apply {path}` creates it")
    held = vm.dumpxml(conn, config.name, inactive=True)
    ours = vm.desired_xml(conn, config)
    return dx.xml_diff(
        held, ours, held_label=f"{config.name} (libvirt)", ours_label=f"{path} (config)"
    )
