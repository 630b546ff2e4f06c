"""`ozone ip`: a guest's network addresses, asked the way that works for its network: the
guest agent first (every network type, user-mode networking included: nothing else knows
those addresses), else libvirt's DHCP leases (libvirt networks), else the host's ARP table
(bridges). Loopback interfaces and addresses are left out.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import libvirt

from .connection import call, lookup
from .errors import ConnectionFailed, OzoneError, StateError
from .inventory import is_active

SOURCES = (
    ("agent", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT),
    ("lease", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE),
    ("arp", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP),
)


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str | None
    addresses: list[str] = field(default_factory=list)  # "ADDRESS/PREFIX"


@dataclass(frozen=True)
class Addresses:
    name: str
    source: str  # agent | lease | arp
    interfaces: list[Interface]


def parse(raw: dict[str, Any]) -> list[Interface]:
    """libvirt's ``interfaceAddresses`` answer, without loopback, sorted by interface."""
    found = []
    for name, info in sorted(raw.items()):
        if name == "lo":
            continue
        addresses = []
        for entry in info.get("addrs") or []:
            text = str(entry.get("addr", ""))
            try:
                address = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError:
                continue
            if address.is_loopback:
                continue
            addresses.append(f"{text}/{entry.get('prefix', 0)}")
        if addresses:
            found.append(Interface(name=name, mac=info.get("hwaddr") or None, addresses=addresses))
    return found


def guest_addresses(
    conn: libvirt.virConnect, name: str, *, order: tuple[str, ...] = ("agent", "lease", "arp")
) -> Addresses:
    """The VM's addresses, from the first source (in ``order``) that knows any."""
    dom = lookup(conn, name)
    if not is_active(dom):
        raise StateError(f"{name} is not running", hint=f"`ozone start {name}`")
    reasons = []
    for source, flag in sorted(
        (s for s in SOURCES if s[0] in order), key=lambda s: order.index(s[0])
    ):
        try:
            raw = call(dom.interfaceAddresses, flag, 0, name=name)
        except ConnectionFailed:
            raise
        except OzoneError as err:
            if not is_active(dom):
                raise
            reasons.append(f"{source}: {err.message}")  # this source knows none: the next
            continue
        interfaces = parse(raw or {})
        if interfaces:
            return Addresses(name=name, source=source, interfaces=interfaces)
        reasons.append(f"{source}: none")
    raise OzoneError(
        f"no address of {name} is known (" + "; ".join(reasons)[:300] + ")",
        hint="on user-mode networking only the guest agent knows the guest's addresses: "
        f"`ozone wait {name}`, and check that the guest configured its network",
    )
