"""Asking many hosts at once: `ozone list --all-hosts`, and where ``host: auto`` puts a VM.

Every host is asked in a thread of its own over a connection of its own (libvirt-python
lets go of the GIL while it waits), with a bounded connect (:func:`.connection.open_connection`):
one host that is down, refuses or never answers costs its own row, not the others' answers.
The rules are pure and live in :mod:`.hosts`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import libvirt

from .connection import call, connect, find_domain, libvirt_errors, refused_with
from .errors import ConflictError, OzoneError
from .hosts import Capacity, Host, Inventory, Placement, place

if TYPE_CHECKING:
    from .config import VMConfig
    from .inventory import VMInfo

T = TypeVar("T")


@dataclass(frozen=True)
class Answer(Generic[T]):
    """One host's answer: its value, or the error that stopped it."""

    host: Host
    value: T | None = None
    error: OzoneError | None = None


ANSWER_TIMEOUT = 120.0  # seconds a connected host has to answer (a hung daemon never does)


def ask_all(
    hosts: Sequence[Host],
    question: Callable[[libvirt.virConnect, Host], T],
    *,
    timeout: float = ANSWER_TIMEOUT,
) -> list[Answer[T]]:
    """Ask every host ``question`` at once, one thread and one connection each; the
    answers in the hosts' order. An ozone error (no connection, a refused call) is that
    host's answer, and so is silence past the connect timeout plus ``timeout`` seconds
    (its thread is left behind: a call libvirt never answers cannot be taken back);
    anything else is a bug, raised here once every host is done."""
    import time

    from .connection import connect_timeout
    from .errors import ConnectionFailed

    silent = ConnectionFailed(
        f"connected, but no answer within {timeout:g} s",
        hint="is its libvirtd hung? `virsh -c URI list` asks it again",
    )
    answers: list[Answer[T]] = [Answer(h, error=silent) for h in hosts]
    crashed: list[BaseException] = []

    def ask(index: int, host: Host) -> None:
        try:
            with connect(host.uri, host=host.name) as conn, libvirt_errors(uri=host.uri):
                answers[index] = Answer(host, value=question(conn, host))
        except OzoneError as err:
            answers[index] = Answer(host, error=err)
        except BaseException as err:  # re-raised below, in the caller's thread
            crashed.append(err)

    threads = [
        threading.Thread(target=ask, args=(i, h), name=f"ask {h.name}", daemon=True)
        for i, h in enumerate(hosts)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + connect_timeout() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if crashed:
        raise crashed[0]
    return list(answers)


# --- ozone list --all-hosts --------------------------------------------------------------


@dataclass(frozen=True)
class HostError:
    """A host that did not answer `ozone list --all-hosts`, and why."""

    host: str
    uri: str
    code: str
    message: str
    hint: str | None


@dataclass(frozen=True)
class Everywhere:
    """Every host's VMs (each with its ``host``), and the hosts that did not answer."""

    vms: tuple[VMInfo, ...]
    errors: tuple[HostError, ...]


def list_everywhere(inventory: Inventory, *, all_domains: bool = False) -> Everywhere:
    """`ozone list` on every host of the inventory at once: the VMs in the hosts' order,
    each host's by name."""
    from .inventory import list_vms

    answers = ask_all(
        inventory.hosts, lambda conn, host: list_vms(conn, all_domains=all_domains, host=host.name)
    )
    vms = [vm for a in answers if a.value for vm in a.value]
    errors = [
        HostError(a.host.name, a.host.uri, a.error.code, a.error.message, a.error.hint)
        for a in answers
        if a.error is not None
    ]
    return Everywhere(tuple(vms), tuple(errors))


# --- host: auto ----------------------------------------------------------------------------


def capacity(conn: libvirt.virConnect, host: str) -> Capacity:
    """What ``host`` could give a new VM: its free memory (with the buffers and page cache
    its kernel gives back), its CPUs and the vCPUs its running VMs hold."""
    stats: dict[str, int] = {}
    if not refused_with(
        lambda: stats.update(conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0)),
        code=libvirt.VIR_ERR_NO_SUPPORT,
    ):
        free = sum(stats.get(k, 0) for k in ("free", "buffers", "cached")) * 1024
    else:  # a driver without node memory stats (the test driver): its free pages
        free = int(call(conn.getFreeMemory))
    cpus = int(call(conn.getInfo)[2])
    running = call(
        conn.getAllDomainStats,
        libvirt.VIR_DOMAIN_STATS_VCPU,
        libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE,
    )
    vcpus = sum(int(st.get("vcpu.current", 0)) for _dom, st in running)
    return Capacity(host, free, cpus, vcpus)


def locate(inventory: Inventory, config: VMConfig) -> Placement:
    """Where a config with ``host: auto`` goes: the host that has a VM of its name already
    (so a second define updates it rather than making another), else the host
    :func:`.hosts.place` picks. Every host is asked at once; one that does not answer is
    left out, with a note."""

    def look(conn: libvirt.virConnect, host: Host) -> tuple[bool, Capacity]:
        return find_domain(conn, config.name) is not None, capacity(conn, host.name)

    answers = ask_all(inventory.hosts, look)
    holders = [a.host.name for a in answers if a.value is not None and a.value[0]]
    if len(holders) > 1:
        raise ConflictError(
            f"{config.name} is defined on more than one host: {', '.join(holders)}",
            hint="name the one you mean: --host NAME, or host: NAME in its config",
        )
    unreachable = {a.host.name: a.error.message for a in answers if a.error is not None}
    notes = tuple(
        f"{host} did not answer, so ozone cannot tell whether {config.name} is there: {why}"
        for host, why in unreachable.items()
    )
    if holders:
        rule = f"{config.name} is on {holders[0]} already: not placed again"
        return Placement(holders[0], rule, found=True, notes=notes)
    capacities = [a.value[1] for a in answers if a.value is not None]
    placed = place(
        capacities,
        name=config.name,
        memory=config.memory,
        vcpus=config.vcpus,
        unreachable=unreachable,
    )
    return dataclasses.replace(placed, notes=notes)
