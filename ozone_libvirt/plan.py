"""The planner of `ozone apply`: configs and what libvirt holds → one action per VM.

Pure: no libvirt, no I/O. :mod:`.converge` gathers what libvirt holds into :class:`Held`
values and carries a plan out.

Each VM's action is one of

- ``create``: no domain of that name;
- ``change``: the config differs from the domain's; it is redefined in place, and a running
  VM takes the change at once (only fields in :data:`LIVE_FIELDS` qualify);
- ``restart-needed``: the VM runs with a config other than the file's; it is redefined and
  takes the change at its next start (``--restart``: now);
- ``unchanged``: nothing to do;
- ``prune``: an ozone VM defined from a file in an applied folder that no longer names it.

A change is found by comparing the config's digest with the one ozone recorded in the
domain's metadata (the persistent definition's, and a running VM's live one), and described
field by field from the normalised config ozone records beside it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal["create", "change", "restart-needed", "unchanged", "prune"]
ACTIONS: tuple[Action, ...] = ("create", "change", "restart-needed", "unchanged", "prune")

# top-level config fields a running VM takes without a restart: the rest need one
LIVE_FIELDS = frozenset({"description", "source"})


@dataclass(frozen=True)
class Held:
    """What libvirt holds for a VM name: ozone's records in its persistent definition and,
    when it runs, in its live one (None: no such record, e.g. defined by an older ozone)."""

    name: str
    ours: bool  # the domain carries ozone's metadata
    running: bool
    hash: str | None = None  # the persistent definition's config digest
    record: Mapping[str, Any] | None = None  # its normalised config
    xml_hash: str | None = None  # the digest of the definition ozone wrote
    live_hash: str | None = None  # what the running VM was started with
    live_record: Mapping[str, Any] | None = None
    live_xml_hash: str | None = None
    source: str | None = None  # the config file it was defined from
    source_dir: str | None = None  # that file's folder, symlinks resolved
    missing: tuple[str, ...] = ()  # files of the definition that are gone (its disks)
    keeps: tuple[str, ...] = ()  # what undefining it would lose: saved state, snapshots


@dataclass(frozen=True)
class Desired:
    """A config as the planner sees it: its name, file, digests and normalised fields.
    ``xml_hash``: the digest of the definition a define would write now (None: not known,
    e.g. no VM of that name exists)."""

    name: str
    source: str | None
    hash: str
    record: Mapping[str, Any]
    xml_hash: str | None = None


@dataclass(frozen=True)
class FieldChange:
    field: str
    before: Any  # None: not recorded (an older ozone defined the VM)
    after: Any


@dataclass(frozen=True)
class Step:
    """What apply does for one VM, and why."""

    name: str
    action: Action
    config: str | None  # the config file (None: a prune)
    changes: tuple[FieldChange, ...] = ()
    running: bool = False
    define: bool = False  # the persistent definition is rewritten
    reason: str = ""
    what: str = ""  # a created VM: "2 vCPUs, 4GiB, image debian:bookworm"


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...] = field(default_factory=tuple)
    counts: Mapping[Action, int] = field(init=False)  # how many steps take each action

    def __post_init__(self) -> None:
        object.__setattr__(self, "counts", {a: self.count(a) for a in ACTIONS})

    def count(self, action: Action) -> int:
        return sum(1 for s in self.steps if s.action == action)

    @property
    def changes_anything(self) -> bool:
        return any(s.action != "unchanged" for s in self.steps)

    def summary(self) -> str:
        """``plan: 1 to create, 1 to change (restart needed), 3 unchanged``"""
        words: dict[Action, str] = {
            "create": "to create",
            "change": "to change",
            "restart-needed": "to change (restart needed)",
            "prune": "to prune",
            "unchanged": "unchanged",
        }  # in this order
        parts = [f"{self.count(a)} {text}" for a, text in words.items() if self.count(a)]
        return "plan: " + (", ".join(parts) if parts else "no VMs")


def field_changes(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> list[FieldChange]:
    """The fields that differ, by path (``memory``, ``disks[1].size``); one ``(config)``
    change when nothing was recorded (an older ozone defined the VM)."""
    if before is None:
        return [FieldChange("(config)", None, "changed")]
    changes: list[FieldChange] = []

    def walk(path: str, old: Any, new: Any) -> None:
        if isinstance(old, dict) and isinstance(new, dict):
            for key in list(new) + [k for k in old if k not in new]:
                walk(f"{path}.{key}" if path else key, old.get(key), new.get(key))
        elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
            for i, (a, b) in enumerate(zip(old, new, strict=True)):
                walk(f"{path}[{i}]", a, b)
        elif old != new:
            changes.append(FieldChange(path, old, new))

    walk("", dict(before), dict(after))
    return changes


def _top(change: FieldChange) -> str:
    return change.field.split(".")[0].split("[")[0]


DRIFT = "ozone makes another definition now (the host or ozone changed): `ozone diff` shows it"


def plan_one(desired: Desired, held: Held | None) -> Step:
    """The action for one config, given what libvirt holds under its name."""
    name, src = desired.name, desired.source
    if held is None:
        what = _what(desired.record)
        return Step(name, "create", src, define=True, reason="no VM of that name", what=what)
    if not held.ours:
        # the executor refuses it with the same words as define; planned to be reported
        return Step(name, "change", src, define=True, reason="a domain not made by ozone")
    moved = [FieldChange("source", held.source, src)] if held.source != src else []
    changed = held.hash != desired.hash
    drift = not changed and desired.xml_hash is not None and held.xml_hash != desired.xml_hash
    define = changed or drift or bool(moved) or bool(held.missing)
    if held.missing:
        reason = "missing: " + ", ".join(held.missing)
    else:
        reason = DRIFT if drift else "the config changed"
    if not held.running:
        if not define:
            return Step(name, "unchanged", src)
        changes = (field_changes(held.record, desired.record) if changed else []) + moved
        return Step(name, "change", src, tuple(changes), define=True, reason=reason)
    started = held.live_hash is not None
    live_hash = held.live_hash if started else held.hash
    live_record = held.live_record if started else held.record
    live_xml = held.live_xml_hash if started else held.xml_hash
    live_changed = live_hash != desired.hash
    live_drift = not live_changed and desired.xml_hash is not None and live_xml != desired.xml_hash
    changes = (field_changes(live_record, desired.record) if live_changed else []) + moved
    if held.missing or live_drift or any(_top(c) not in LIVE_FIELDS for c in changes):
        if held.missing or live_drift:
            why = (reason if held.missing else DRIFT) + "; it is running"
        else:
            why = "it is running"
        return Step(name, "restart-needed", src, tuple(changes), True, define, why)
    if not define and not changes:
        return Step(name, "unchanged", src, running=True)
    return Step(name, "change", src, tuple(changes), running=True, define=True, reason=reason)


def plan(
    desired: Sequence[Desired],
    held: Mapping[str, Held],
    *,
    prune_in: Sequence[str] = (),
) -> Plan:
    """One step per config, in the configs' order; then, for each folder in ``prune_in``,
    a prune of every ozone VM defined from a file in it that no config names any more."""
    steps = [plan_one(d, held.get(d.name)) for d in desired]
    names = {d.name for d in desired}
    folders = {f.rstrip("/") or "/" for f in prune_in}
    for name in sorted(held):
        h = held[name]
        if name in names or not h.ours or h.source_dir not in folders:
            continue
        reason = f"no config in {h.source_dir} names it"
        if h.keeps:
            reason += f"; it has {' and '.join(h.keeps)}, which pruning would lose"
        steps.append(Step(name, "prune", None, running=h.running, reason=reason))
    return Plan(tuple(steps))


def parse_record(text: str | None) -> dict[str, Any] | None:
    """The normalised config ozone recorded in a domain's metadata (None if unreadable)."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


# --- as a person reads it ------------------------------------------------------------------

_MARKS = {"create": "+", "change": "~", "restart-needed": "~", "unchanged": " ", "prune": "-"}


def _shown(field_name: str, value: Any) -> str:
    if value is None:
        return "(unset)"
    if field_name.endswith(("memory", "size")) and isinstance(value, int):
        return size_text(value)
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 40 else text[:39] + "…"


def size_text(num_bytes: int) -> str:
    """Bytes in the largest binary unit that divides them: 2GiB, 1536MiB, 100B."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes and num_bytes % factor == 0:
            return f"{num_bytes // factor}{unit}"
    return f"{num_bytes}B"


def _what(record: Mapping[str, Any]) -> str:
    """``2 vCPUs, 4GiB, image debian:bookworm`` — what a created VM is."""
    vcpus = record.get("vcpus", 1)
    parts = [f"{vcpus} vCPU{'s' if vcpus != 1 else ''}", _shown("memory", record.get("memory"))]
    image = record.get("image") or {}
    if image.get("debian"):
        parts.append(f"image debian:{image['debian']}")
    elif image.get("name") or image.get("url"):
        parts.append(f"image {image.get('name') or str(image['url']).rsplit('/', 1)[-1]}")
    elif record.get("kernel"):
        parts.append("kernel " + str(record["kernel"]).rsplit("/", 1)[-1])
    elif record.get("cdrom"):
        parts.append("cdrom " + str(record["cdrom"]).rsplit("/", 1)[-1])
    return ", ".join(parts)


def describe(step: Step, width: int = 8) -> str:
    """One line of the plan: ``~ web      change  memory 1GiB -> 2GiB (restart needed: …)``."""
    word = "change" if step.action == "restart-needed" else step.action
    head = f"{_MARKS[step.action]} {step.name.ljust(width)} {word.ljust(7)}"
    if step.action == "create":
        return f"{head} {step.what}".rstrip()
    if step.action == "unchanged":
        return f"{head}{' (running)' if step.running else ''}".rstrip()
    if step.action == "prune":
        return f"{head} {step.reason}{' (running: stopped with --restart)' if step.running else ''}"
    fields = ", ".join(
        c.field
        if c.before is None and c.field == "(config)"
        else f"{c.field} {_shown(c.field, c.before)} -> {_shown(c.field, c.after)}"
        for c in step.changes
    )
    if step.action == "restart-needed":
        return f"{head} {fields + ' ' if fields else ''}(restart needed: {step.reason})"
    return f"{head} {fields or step.reason}{' (applied live)' if step.running else ''}"
