"""The one JSON encoder of --json output: library results keep the shape the CLI always
printed (optional fields absent until set, tuples as arrays, paths as strings)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ozone_libvirt import output
from ozone_libvirt.metadata import QmpEndpoint
from ozone_libvirt.results import ClockSync, RevertResult, SaveResult, StartResult
from ozone_libvirt.vm import DefineResult, StopResult


def test_optional_fields_are_absent_until_set():
    booted = StartResult("web", "running", "booted")
    assert output.to_json(booted) == {"name": "web", "state": "running", "action": "booted"}
    restored = booted.with_clock(ClockSync("synced", 1.5))
    waited = dataclasses.replace(restored, ready_seconds=2.0)
    assert output.to_json(waited) == {
        "name": "web",
        "state": "running",
        "action": "booted",
        "clock": "synced",
        "clock_offset_s": 1.5,
        "ready_seconds": 2.0,
    }
    unsynced = RevertResult("web", "s1", "running").with_clock(ClockSync("not synced (x)"))
    assert output.to_json(unsynced) == {
        "name": "web",
        "snapshot": "s1",
        "state": "running",
        "clock": "not synced (x)",
    }


def test_plain_none_fields_stay_as_null():
    assert output.to_json(StopResult("web", "none", 0.0)) == {
        "name": "web",
        "method": "none",
        "seconds": 0.0,
        "requested": None,
    }
    defined = output.to_json(DefineResult("web", "u", True, None, notes=("n",)))
    assert defined["qmp"] is None
    assert defined["notes"] == ["n"]
    assert defined["disks_created"] == []


def test_tuples_named_tuples_paths_and_nesting():
    data = {
        "results": [SaveResult("web", "saved", 1.0)],
        "where": Path("/srv/x"),
        "endpoint": QmpEndpoint("tcp", host="127.0.0.1", port=4444),
        "pair": (1, "a"),
    }
    assert json.loads(output.json_text(data)) == {
        "results": [{"name": "web", "state": "saved", "seconds": 1.0}],
        "where": "/srv/x",
        "endpoint": {
            "kind": "tcp",
            "host": "127.0.0.1",
            "port": 4444,
            "path": None,
            "auto": False,
        },
        "pair": [1, "a"],
    }


def test_results_are_frozen():
    result = StartResult("web", "running", "booted")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.state = "paused"  # type: ignore[misc]
