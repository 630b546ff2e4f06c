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
LIVE_FIELDS = frozenset({"description"})


@dataclass(frozen=True)
class Held:
    """What libvirt holds for a VM name: ozone's records in its persistent definition and,
    when it runs, in its live one (None: no such record, e.g. defined by an older ozone)."""

    name: str
    ours: bool  # the domain carries ozone's metadata
    running: bool
    hash: str | None = None  # the persistent definition's config digest
    record: Mapping[str, Any] | None = None  # its normalised config
    live_hash: str | None = None  # what the running VM was started with
    live_record: Mapping[str, Any] | None = None
    source: str | None = None  # the config file it was defined from
    missing: tuple[str, ...] = ()  # files of the definition that are gone (its disks)


@dataclass(frozen=True)
class Desired:
    """A config as the planner sees it: its name, file, digest and normalised fields."""

    name: str
    source: str | None
    hash: str
    record: Mapping[str, Any]


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


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...] = field(default_factory=tuple)

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
    """The top-level fields that differ (every field of ``after`` when nothing was recorded)."""
    if before is None:
        return [FieldChange("(config)", None, "changed")]
    keys = list(after) + [k for k in before if k not in after]
    return [
        FieldChange(k, before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)
    ]


def plan_one(desired: Desired, held: Held | None) -> Step:
    """The action for one config, given what libvirt holds under its name."""
    src = desired.source
    if held is None:
        return Step(desired.name, "create", src, define=True, reason="no VM of that name")
    if not held.ours:
        # the executor refuses it with the same words as define; planned to be reported
        return Step(desired.name, "change", src, define=True, reason="a domain not made by ozone")
    define = held.hash != desired.hash or bool(held.missing)
    if not held.running:
        if not define:
            return Step(desired.name, "unchanged", src)
        changes = field_changes(held.record, desired.record)
        reason = "missing: " + ", ".join(held.missing) if held.missing else "the config changed"
        return Step(desired.name, "change", src, tuple(changes), define=True, reason=reason)
    live_hash = held.live_hash if held.live_hash is not None else held.hash
    live_record = held.live_record if held.live_hash is not None else held.record
    if live_hash == desired.hash and not define:
        return Step(desired.name, "unchanged", src, running=True)
    changes = field_changes(live_record, desired.record)
    if live_hash != desired.hash and any(c.field not in LIVE_FIELDS for c in changes):
        return Step(
            desired.name,
            "restart-needed",
            src,
            tuple(changes),
            running=True,
            define=define,
            reason="it is running",
        )
    return Step(desired.name, "change", src, tuple(changes), running=True, define=True)


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
        if name in names or not h.ours or h.source is None:
            continue
        if h.source.rpartition("/")[0] in folders:
            reason = f"no config in {h.source.rpartition('/')[0]} names it"
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
    if field_name == "memory" and isinstance(value, int):
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


def describe(step: Step, record: Mapping[str, Any] | None = None, width: int = 8) -> str:
    """One line of the plan: ``~ web      change  memory 1GiB -> 2GiB (restart needed: …)``."""
    word = "change" if step.action == "restart-needed" else step.action
    head = f"{_MARKS[step.action]} {step.name.ljust(width)} {word.ljust(7)}"
    if step.action == "create":
        return f"{head} {_what(record or {})}".rstrip()
    if step.action == "unchanged":
        return f"{head}{' (running)' if step.running else ''}".rstrip()
    if step.action == "prune":
        return f"{head} {step.reason}{' (running: stopped with --restart)' if step.running else ''}"
    fields = (
        ", ".join(
            c.field
            if c.before is None and c.field == "(config)"
            else f"{c.field} {_shown(c.field, c.before)} -> {_shown(c.field, c.after)}"
            for c in step.changes
        )
        or step.reason
    )
    if step.action == "restart-needed":
        fields += f" (restart needed: {step.reason})"
    elif step.running:
        fields += " (applied live)"
    return f"{head} {fields}"
