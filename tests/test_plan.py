"""The planner of `ozone apply` (pure): configs and what libvirt holds → one action per VM."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ozone_libvirt import domain_xml as dx
from ozone_libvirt.config import parse_config
from ozone_libvirt.plan import LIVE_FIELDS, Desired, FieldChange, Held, describe, plan, plan_one


def top(change: FieldChange) -> str:
    return change.field.split(".")[0].split("[")[0]


BASE = {"name": "web", "memory": "1GiB", "cdrom": "/srv/boot.iso"}

# each field of a config, changed: (overrides before, overrides after)
PAIRS = {
    "memory": ({}, {"memory": "2GiB"}),
    "vcpus": ({}, {"vcpus": 2}),
    "machine": ({}, {"machine": "pc"}),
    "accel": ({}, {"accel": "tcg"}),
    "disks": ({}, {"disks": [{"path": "/srv/web.qcow2", "size": "1GiB"}]}),
    "cdrom": ({}, {"cdrom": "/srv/other.iso"}),
    "boot": ({}, {"boot": ["cdrom", "disk"], "disks": [{"path": "/srv/w.qcow2", "size": "1GiB"}]}),
    "kernel": ({}, {"kernel": "/srv/vmlinuz", "cdrom": None}),
    "cmdline": (
        {"kernel": "/srv/vmlinuz", "cdrom": None},
        {"kernel": "/srv/vmlinuz", "cdrom": None, "cmdline": "console=ttyS0"},
    ),
    "initrd": (
        {"kernel": "/srv/vmlinuz", "cdrom": None},
        {"kernel": "/srv/vmlinuz", "cdrom": None, "initrd": "/srv/initrd"},
    ),
    "serial_log": ({}, {"serial_log": "/srv/web.log"}),
    "agent": ({}, {"agent": False}),
    "network": ({}, {"network": "none"}),
    "qmp": ({}, {"qmp": "off"}),
    "graphics": ({}, {"graphics": "vnc"}),
    "description": ({}, {"description": "the web server"}),
    "stage_dir": ({}, {"stage_dir": "/var/tmp/ozone"}),
    "ports": ({}, {"ports": ["8080:80"]}),
    "shares": ({}, {"shares": [{"host": "/srv/site", "guest": "/srv/www", "readonly": True}]}),
    "cloud_init": ({}, {"cloud_init": {"packages": ["nginx"]}}),
}


def desired(overrides: dict[str, object]) -> Desired:
    data = {k: v for k, v in {**BASE, **overrides}.items() if v is not None}
    config = parse_config(data, source=Path("/srv/vms/web.json"))
    return Desired(config.name, str(config.source), config.hash, dx.config_record(config))


def held(of: Desired, *, running: bool, live: Desired | None = None) -> Held:
    return Held(
        of.name,
        ours=True,
        running=running,
        hash=of.hash,
        record=of.record,
        live_hash=(live or of).hash if running else None,
        live_record=(live or of).record if running else None,
        source=of.source,
    )


@pytest.mark.parametrize("field", sorted(PAIRS))
def test_each_field_changes_in_place_or_needs_a_restart(field):
    before, after = (desired(o) for o in PAIRS[field])
    assert before.hash != after.hash
    stopped = plan_one(after, held(before, running=False))
    assert (stopped.action, stopped.define, stopped.running) == ("change", True, False)
    assert field in {top(c) for c in stopped.changes}
    running = plan_one(after, held(before, running=True))
    wanted = "change" if field in LIVE_FIELDS else "restart-needed"
    assert (running.action, running.define, running.running) == (wanted, True, True)
    assert field in {top(c) for c in running.changes}
    if field in ("memory", "vcpus", "description"):
        change = next(c for c in running.changes if c.field == field)
        assert (change.before, change.after) == (before.record.get(field), after.record.get(field))


def test_the_table_covers_every_field_of_a_config():
    # where a VM lives (host) is not what it is: see the next test
    leave_out = {"name", "image", "source", "host"}
    fields = {f.name for f in dataclasses.fields(parse_config(BASE))} - leave_out
    assert fields <= set(PAIRS), f"no before/after pair for {sorted(fields - set(PAIRS))}"


@pytest.mark.parametrize("host", ["rack2", "auto"])
def test_naming_a_host_in_a_config_changes_no_vm(host):
    before, after = desired({}), desired({"host": host})
    assert after.hash == before.hash and after.record == before.record
    for running in (False, True):
        assert plan_one(after, held(before, running=running)).action == "unchanged"


def test_unchanged_create_and_a_foreign_domain():
    same = desired({})
    assert plan_one(same, held(same, running=False)).action == "unchanged"
    running = plan_one(same, held(same, running=True))
    assert (running.action, running.running) == ("unchanged", True)
    create = plan_one(same, None)
    assert (create.action, create.define) == ("create", True)
    foreign = plan_one(same, Held("web", ours=False, running=False))
    assert (foreign.action, foreign.define) == ("change", True)  # define refuses it, reported


def test_a_change_defined_but_not_restarted_still_needs_the_restart():
    before, after = desired({}), desired({"memory": "2GiB"})
    # a previous apply redefined it: the persistent definition is new, the running VM is not
    step = plan_one(after, held(after, running=True, live=before))
    assert (step.action, step.define) == ("restart-needed", False)
    assert [(c.field, c.before, c.after) for c in step.changes] == [("memory", 1 << 30, 2 << 30)]


def test_a_missing_disk_is_made_again():
    same = desired({})
    gone = dataclasses.replace(held(same, running=False), missing=("web.qcow2",))
    step = plan_one(same, gone)
    assert (step.action, step.define) == ("change", True)
    assert "web.qcow2" in step.reason


def test_a_vm_defined_by_an_older_ozone_has_no_record():
    before, after = desired({}), desired({"vcpus": 2})
    old = dataclasses.replace(held(before, running=False), record=None)
    step = plan_one(after, old)
    assert step.action == "change"
    assert [c.field for c in step.changes] == ["(config)"]


def test_prune_only_ozone_vms_from_an_applied_folder():
    web = desired({})
    gone = Held("old", ours=True, running=True, source="/srv/vms/old.json", source_dir="/srv/vms")
    elsewhere = Held("db", ours=True, running=False, source_dir="/srv/other")
    saved = Held("sv", ours=True, running=False, source_dir="/srv/vms", keeps=("saved state",))
    foreign = Held("virt", ours=False, running=False)
    holds = {
        "web": held(web, running=False),
        "old": gone,
        "db": elsewhere,
        "virt": foreign,
        "sv": saved,
    }
    assert [s.action for s in plan([web], holds).steps] == ["unchanged"]
    pruned = plan([web], holds, prune_in=["/srv/vms/"])
    assert [(s.name, s.action, s.running) for s in pruned.steps] == [
        ("web", "unchanged", False),
        ("old", "prune", True),
        ("sv", "prune", False),
    ]
    assert "saved state, which pruning would lose" in pruned.steps[2].reason  # refused, said
    assert pruned.summary() == "plan: 2 to prune, 1 unchanged"


def test_plan_lines():
    before, after = desired({}), desired({"memory": "2GiB", "vcpus": 2})
    step = plan_one(after, held(before, running=True))
    assert describe(step, width=5) == (
        "~ web   change  memory 1GiB -> 2GiB, vcpus 1 -> 2 (restart needed: it is running)"
    )
    create = plan_one(after, None)
    assert describe(create, width=5) == "+ web   create  2 vCPUs, 2GiB, cdrom boot.iso"
    steps = plan([after, desired({"name": "db"})], {"web": held(before, running=True)})
    assert steps.summary() == "plan: 1 to create, 1 to change (restart needed)"


def test_ozone_would_write_another_definition_under_the_same_config():
    # e.g. KVM came or went, or a newer ozone writes other XML: the digests of the definition
    # ozone wrote and of the one it would write now differ
    now = dataclasses.replace(desired({}), xml_hash="sha256:new")
    stopped = dataclasses.replace(held(desired({}), running=False), xml_hash="sha256:old")
    step = plan_one(now, stopped)
    assert (step.action, step.define, step.changes) == ("change", True, ())
    assert "ozone diff" in step.reason
    running = dataclasses.replace(
        stopped,
        running=True,
        live_hash=now.hash,
        live_record=now.record,
        live_xml_hash="sha256:old",
    )
    step = plan_one(now, running)
    assert (step.action, step.define) == ("restart-needed", True)
    # redefined without a restart: still needed, until the VM starts with the new definition
    redefined = dataclasses.replace(running, xml_hash="sha256:new")
    assert plan_one(now, redefined).action == "restart-needed"
    restarted = dataclasses.replace(redefined, live_xml_hash="sha256:new")
    assert plan_one(now, restarted).action == "unchanged"


def test_a_moved_config_file_is_recorded_even_while_running():
    web = desired({})
    moved = dataclasses.replace(web, source="/srv/new/web.json")
    for running in (False, True):
        step = plan_one(moved, held(web, running=running))
        assert (step.action, step.define) == ("change", True)
        assert [(c.field, c.before, c.after) for c in step.changes] == [
            ("source", "/srv/vms/web.json", "/srv/new/web.json")
        ]


def test_a_running_vm_whose_disk_is_gone_needs_a_restart():
    web = desired({})
    gone = dataclasses.replace(held(web, running=True), missing=("/srv/web.qcow2",))
    step = plan_one(web, gone)
    assert (step.action, step.define) == ("restart-needed", True)
    assert step.reason == "missing: /srv/web.qcow2; it is running"


def test_nested_fields_are_named_by_their_path():
    disk = {"path": "/srv/web.qcow2", "size": "64MiB"}
    before = desired({"disks": [disk]})
    after = desired({"disks": [{**disk, "size": "128MiB", "bus": "sata"}]})
    step = plan_one(after, held(before, running=False))
    assert (
        describe(step, width=3)
        == "~ web change  disks[0].size 64MiB -> 128MiB, disks[0].bus virtio -> sata"
    )
