"""What the library's calls return: frozen dataclasses, never dicts. The CLI's one encoder,
:func:`.output.to_json`, turns any of them into its ``--json`` document."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

# a field with this metadata is left out of the JSON document while it is None
OMIT_NONE = "omit_none"
_OMITTED_WHILE_NONE = MappingProxyType({OMIT_NONE: True})


def optional() -> Any:
    """A field that is None by default and then absent from the JSON document."""
    return dataclasses.field(default=None, metadata=_OMITTED_WHILE_NONE)


@dataclass(frozen=True)
class ClockSync:
    """A guest clock set from the host's after a resume or restore (best effort)."""

    clock: str  # "synced", or "not synced (why)"
    clock_offset_s: float | None = optional()  # how far off it was, when synced


@dataclass(frozen=True)
class StartResult:
    name: str
    state: str
    action: str  # booted | restored | resumed | none (it was running)
    clock: str | None = optional()  # after a resume or restore: see ClockSync
    clock_offset_s: float | None = optional()
    ready_seconds: float | None = optional()  # when the caller waited for the guest agent

    def with_clock(self, sync: ClockSync) -> StartResult:
        return dataclasses.replace(self, clock=sync.clock, clock_offset_s=sync.clock_offset_s)


@dataclass(frozen=True)
class RevertResult:
    name: str
    snapshot: str
    state: str
    clock: str | None = optional()  # a running VM's: see ClockSync
    clock_offset_s: float | None = optional()

    def with_clock(self, sync: ClockSync) -> RevertResult:
        return dataclasses.replace(self, clock=sync.clock, clock_offset_s=sync.clock_offset_s)


@dataclass(frozen=True)
class SaveResult:
    name: str
    state: str  # "saved"
    seconds: float
