"""`ozone events`: libvirt's domain lifecycle and guest-agent events, as they happen.

libvirt delivers events through an event loop that must be registered before the connection
is opened (:func:`prepare`); :func:`follow` then runs it, handing each event to a callback as
an :class:`Event`, until a timeout, Ctrl-C or the connection's end. The mapping of libvirt's
event and detail codes to names is pure (:func:`lifecycle_event`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt

from .connection import best_effort, call, lookup, lost_connection

# libvirt's lifecycle events, and the reason (detail) names of each, in libvirt's order
# (virDomainEventType and the virDomainEvent*DetailType enums)
_LIFECYCLE: list[tuple[str, tuple[str, ...]]] = [
    ("defined", ("added", "updated", "renamed", "from-snapshot")),
    ("undefined", ("removed", "renamed")),
    ("started", ("booted", "migrated", "restored", "from-snapshot", "wakeup", "recreated")),
    (
        "paused",
        (
            "paused",
            "migrated",
            "io-error",
            "watchdog",
            "restored",
            "from-snapshot",
            "api-error",
            "postcopy",
            "postcopy-failed",
        ),
    ),
    (
        "resumed",
        ("unpaused", "migrated", "from-snapshot", "postcopy", "postcopy-failed"),
    ),
    (
        "stopped",
        ("shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from-snapshot"),
    ),
    ("shutdown", ("finished", "guest", "host")),
    ("pmsuspended", ("memory", "disk")),
    ("crashed", ("panicked", "crashloaded")),
]
_AGENT_STATE = {1: "agent-connected", 2: "agent-disconnected"}
_AGENT_REASON = {0: "unknown", 1: "domain-started", 2: "channel"}


@dataclass(frozen=True)
class Event:
    time: float  # seconds since the epoch, when ozone received it
    name: str  # the domain's
    uuid: str
    event: str  # started, stopped, shutdown, paused, …, agent-connected, agent-disconnected
    reason: str  # booted, destroyed, guest, …

    def line(self) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.time))
        return f"{stamp} {self.name} {self.event} ({self.reason})"


def lifecycle_event(event: int, detail: int) -> tuple[str, str]:
    """libvirt's lifecycle event and detail codes as names (unknown codes as numbers)."""
    if 0 <= event < len(_LIFECYCLE):
        name, reasons = _LIFECYCLE[event]
        return name, reasons[detail] if 0 <= detail < len(reasons) else str(detail)
    return f"event-{event}", str(detail)


def agent_event(state: int, reason: int) -> tuple[str, str]:
    return _AGENT_STATE.get(state, f"agent-{state}"), _AGENT_REASON.get(reason, str(reason))


def prepare() -> None:
    """Register libvirt's default event loop: before the connection is opened."""
    libvirt.virEventRegisterDefaultImpl()


def follow(
    conn: libvirt.virConnect,
    handle: Callable[[Event], None],
    *,
    name: str | None = None,
    timeout: float | None = None,
    ready: Callable[[], None] = lambda: None,
) -> None:
    """Hand every lifecycle and agent event of the domain ``name`` (None: every domain) to
    ``handle`` until ``timeout`` seconds pass (None: until interrupted) or libvirt closes
    the connection (an error then). ``ready`` is called once the callbacks are registered."""
    dom = lookup(conn, name) if name else None
    closed: list[int] = []

    def on_lifecycle(_c: Any, d: libvirt.virDomain, event: int, detail: int, _o: Any) -> None:
        handle(Event(time.time(), d.name(), d.UUIDString(), *lifecycle_event(event, detail)))

    def on_agent(_c: Any, d: libvirt.virDomain, state: int, reason: int, _o: Any) -> None:
        handle(Event(time.time(), d.name(), d.UUIDString(), *agent_event(state, reason)))

    register = conn.domainEventRegisterAny
    ids = [
        call(register, dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None),
        call(register, dom, libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, on_agent, None),
    ]
    call(conn.registerCloseCallback, lambda _c, reason, _o: closed.append(reason), None)
    deadline = None if timeout is None else time.monotonic() + timeout
    # a timer wakes the loop every 200 ms, so the deadline is seen without an event
    timer = libvirt.virEventAddTimeout(200, lambda _t, _o: None, None)
    try:
        ready()
        while not closed and (deadline is None or time.monotonic() < deadline):
            libvirt.virEventRunDefaultImpl()
    finally:
        libvirt.virEventRemoveTimeout(timer)
        for callback_id in ids:
            with best_effort():  # on a closed connection they are gone already
                conn.domainEventDeregisterAny(callback_id)
    if closed:
        raise lost_connection(None)
