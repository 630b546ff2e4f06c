"""`ozone ip`: parsing libvirt's answer (pure), and the command against libvirt's test driver.
The real guest's user-net address is checked in tests/test_real_guest.py."""

from __future__ import annotations

import json

import libvirt
import pytest

from ozone_libvirt.addresses import Interface, guest_addresses, parse
from ozone_libvirt.errors import NotFoundError, StateError

from .conftest import run_ozone


def test_parse_leaves_out_loopback_and_keeps_the_rest():
    raw = {
        "lo": {"hwaddr": "00:00:00:00:00:00", "addrs": [{"addr": "127.0.0.1", "prefix": 8}]},
        "enp1s0": {
            "hwaddr": "52:54:00:12:34:56",
            "addrs": [
                {"type": 0, "addr": "10.0.2.15", "prefix": 24},
                {"type": 1, "addr": "fe80::5054:ff:fe12:3456%enp1s0", "prefix": 64},
                {"type": 0, "addr": "not an address", "prefix": 1},
            ],
        },
        "dummy0": {"hwaddr": None, "addrs": [{"addr": "::1", "prefix": 128}]},
        "eth1": {"hwaddr": "52:54:00:00:00:01", "addrs": None},
    }
    assert parse(raw) == [
        Interface(
            name="enp1s0",
            mac="52:54:00:12:34:56",
            addresses=["10.0.2.15/24", "fe80::5054:ff:fe12:3456%enp1s0/64"],
        )
    ]


def test_ip_on_the_test_driver_json():
    proc = run_ozone("-c", "test:///default", "ip", "test", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["source"] == "agent"
    assert data["interfaces"][0]["addresses"] == ["192.168.122.3/24"]


def test_ip_of_a_stopped_or_missing_vm():
    conn = libvirt.open("test:///default")
    try:
        conn.lookupByName("test").destroy()
        with pytest.raises(StateError, match="test is not running"):
            guest_addresses(conn, "test")
        with pytest.raises(NotFoundError):
            guest_addresses(conn, "nosuch")
    finally:
        conn.close()
    proc = run_ozone("-c", "test:///default", "ip", "nosuch")
    assert proc.returncode == 1 and proc.stderr.startswith("error: no VM named 'nosuch'")
