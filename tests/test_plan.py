"""The planner of `ozone apply` (pure): configs and what libvirt holds → one action per VM."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ozone_libvirt import domain_xml as dx
from ozone_libvirt.config import parse_config
from ozone_libvirt.plan import LIVE_FIELDS, Desired, Held, describe, plan, plan_one

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
    assert field in [c.field for c in stopped.changes]
    running = plan_one(after, held(before, running=True))
    wanted = "change" if field in LIVE_FIELDS else "restart-needed"
    assert (running.action, running.define, running.running) == (wanted, True, True)
    change = next(c for c in running.changes if c.field == field)
    assert change.before == before.record.get(field)
    assert change.after == after.record.get(field)


def test_the_table_covers_every_field_of_a_config():
    fields = {f.name for f in dataclasses.fields(parse_config(BASE))} - {"name", "image", "source"}
    assert fields <= set(PAIRS), f"no before/after pair for {sorted(fields - set(PAIRS))}"


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
    gone = Held("old", ours=True, running=True, hash="h", source="/srv/vms/old.json")
    elsewhere = Held("db", ours=True, running=False, hash="h", source="/srv/other/db.json")
    foreign = Held("virt", ours=False, running=False)
    holds = {"web": held(web, running=False), "old": gone, "db": elsewhere, "virt": foreign}
    assert [s.action for s in plan([web], holds).steps] == ["unchanged"]
    pruned = plan([web], holds, prune_in=["/srv/vms/"])
    assert [(s.name, s.action, s.running) for s in pruned.steps] == [
        ("web", "unchanged", False),
        ("old", "prune", True),
    ]
    assert pruned.summary() == "plan: 1 to prune, 1 unchanged"


def test_plan_lines():
    before, after = desired({}), desired({"memory": "2GiB", "vcpus": 2})
    step = plan_one(after, held(before, running=True))
    assert describe(step, after.record, width=5) == (
        "~ web   change  memory 1GiB -> 2GiB, vcpus 1 -> 2 (restart needed: it is running)"
    )
    create = plan_one(after, None)
    assert (
        describe(create, after.record, width=5) == "+ web   create  2 vCPUs, 2GiB, cdrom boot.iso"
    )
    steps = plan([after, desired({"name": "db"})], {"web": held(before, running=True)})
    assert steps.summary() == "plan: 1 to create, 1 to change (restart needed)"
