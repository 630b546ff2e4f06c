"""Snapshots and saved state on a real libvirtd with a real guest (TCG)."""

from __future__ import annotations

import json

import pytest

from .conftest import run_ozone, virsh

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest]


def ok(*args: str) -> str:
    proc = run_ozone(*args)
    assert proc.returncode == 0, f"ozone {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def as_json(*args: str):
    return json.loads(ok(*args, "--json"))


def guest(name: str, script: str) -> str:
    return ok("exec", name, "--", "sh", "-c", script)


@pytest.fixture
def running(vms):
    """A running guest with a qcow2 disk (snapshots live inside qcow2 images)."""
    name, path = vms.config({"disks": [{"path": f"{vms.name()}.qcow2", "size": "64MiB"}]})
    ok("define", str(path))
    ok("start", name, "--wait", "--timeout", "120")
    return name


def test_snapshot_round_trip_undoes_a_guest_visible_change(running):
    name = running
    guest(name, "echo before > /tmp/state; printf BEFORE | dd of=/dev/vda conv=notrunc 2>/dev/null")
    first = as_json("snapshot", "create", name, "first", "--description", "clean")
    assert first["state"] == "running" and first["memory"] is True

    guest(name, "echo after > /tmp/state; printf AFTER! | dd of=/dev/vda conv=notrunc 2>/dev/null")
    second = as_json("snapshot", "create", name, "second")
    assert second["parent"] == "first"

    listed = as_json("snapshot", "list", name)
    assert [s["name"] for s in listed] == ["first", "second"]
    assert all(s["created"] > 0 and s["state"] == "running" for s in listed)
    assert listed[0]["parent"] is None

    reverted = as_json("snapshot", "revert", name, "first")
    assert reverted["state"] == "running"
    assert reverted["clock"] == "synced"
    assert virsh("domstate", name).strip() == "running"
    assert guest(name, "cat /tmp/state; head -c 6 /dev/vda") == "before\nBEFORE"
    assert abs(as_json("clock", name)["offset_s"]) < 5

    ok("snapshot", "delete", name, "second")
    assert [s["name"] for s in as_json("snapshot", "list", name)] == ["first"]
    ok("snapshot", "delete", name, "first")
    assert as_json("snapshot", "list", name) == []


def test_shut_off_snapshot_is_disk_only(running):
    name = running
    ok("stop", name, "--force")
    snap = as_json("snapshot", "create", name, "cold")
    assert snap["state"] == "shutoff" and snap["memory"] is False
    as_json("snapshot", "revert", name, "cold")
    assert virsh("domstate", name).strip() == "shut off"


def test_snapshot_errors(running, vms):
    proc = run_ozone("snapshot", "revert", running, "nope")
    assert proc.returncode == 1
    assert f"{running} has no snapshot 'nope'" in proc.stderr

    ok("snapshot", "create", running, "dup")
    proc = run_ozone("snapshot", "create", running, "dup")
    assert proc.returncode == 1 and "already has a snapshot 'dup'" in proc.stderr

    diskless, path = vms.config()  # an ISO only: nowhere to keep a snapshot
    ok("define", str(path))
    ok("start", diskless, "--wait")
    proc = run_ozone("snapshot", "create", diskless, "x")
    assert proc.returncode == 1
    assert f"error: cannot snapshot {diskless}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_save_and_resume_keep_running_processes(running):
    name = running
    pid = guest(name, "sleep 1000 >/dev/null 2>&1 & echo $!; echo kept > /tmp/memory").strip()
    saved = as_json("save", name)
    assert saved["state"] == "saved"
    assert as_json("status", name)["state"] == "saved"
    assert {v["name"]: v["state"] for v in as_json("list")}[name] == "saved"
    assert virsh("domstate", name).strip() == "shut off"

    started = as_json("start", name)
    assert started["action"] == "restored"
    assert started["clock"] == "synced"
    assert guest(name, f"kill -0 {pid} && cat /tmp/memory") == "kept\n"
    assert abs(as_json("clock", name)["offset_s"]) < 5


def test_save_of_a_stopped_vm_is_refused(vms):
    name, path = vms.config()
    ok("define", str(path))
    proc = run_ozone("save", name)
    assert proc.returncode == 1
    assert "is not running" in proc.stderr
