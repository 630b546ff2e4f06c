"""Bad configs, through `ozone define` against a real libvirtd: each gives exit 2, one clear
message naming the field, and leaves nothing behind (no domain, no disk image)."""

from __future__ import annotations

import json
import socket

import pytest

from .conftest import domain_exists, run_ozone

pytestmark = pytest.mark.libvirtd

ISO_CONTENT = b"\0" * 4096


def config_with(workdir, overrides: dict, name: str) -> dict:
    (workdir / "ok.iso").write_bytes(ISO_CONTENT)
    data = {
        "name": name,
        "memory": "256MiB",
        "cdrom": "ok.iso",
        "disks": [{"path": "root.qcow2", "size": "64MiB"}],
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


CASES = [
    # (id, overrides, field named in the message, words in message or hint)
    ("unknown-key", {"memroy": "1GiB"}, "memroy", "did you mean 'memory'"),
    ("wrong-type", {"vcpus": "four"}, "vcpus", "whole number"),
    ("negative-memory", {"memory": "-512MiB"}, "memory", "not a size"),
    ("zero-vcpus", {"vcpus": 0}, "vcpus", "between 1"),
    ("missing-iso", {"cdrom": "missing.iso"}, "cdrom", "does not exist"),
    ("non-loopback-qmp", {"qmp": "tcp:0.0.0.0:4444"}, "qmp", "no authentication"),
    ("traversal-name", {"name": "../../etc/passwd"}, "name", "letters, digits"),
    ("xml-in-name", {"name": "web'/><x a='"}, "name", "not valid"),
    ("typo-accel", {"accel": "kmv"}, "accel", "did you mean 'kvm'"),
    ("missing-disk-no-size", {"disks": ["absent.qcow2"]}, "disks[0].path", "does not exist"),
    (
        "missing-backing",
        {"disks": [{"path": "o.qcow2", "backing": "nope.qcow2"}]},
        "disks[0].backing",
        "does not exist",
    ),
    (
        "disk-folder-missing",
        {"disks": [{"path": "no/such/dir/x.qcow2", "size": "1G"}]},
        "disks[0].path",
        "folder",
    ),
    ("initrd-without-kernel", {"initrd": "initrd.img"}, "initrd", "needs a kernel"),
    ("boot-missing-device", {"cdrom": None, "boot": ["cdrom", "disk"]}, "boot[0]", "no cdrom"),
    ("bad-mac", {"network": {"type": "user", "mac": "52:54:00"}}, "network.mac", "MAC address"),
    (
        "unknown-libvirt-network",
        {"network": "network:no-such-net"},
        "network.source",
        "no network named",
    ),
    ("unknown-machine", {"machine": "q53"}, "machine", "did you mean"),
    ("qmp-port-out-of-range", {"qmp": "tcp:127.0.0.1:70000"}, "qmp", "out of range"),
]


@pytest.mark.parametrize(
    ("overrides", "field", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_config_is_refused_and_leaves_nothing(vms, workdir, overrides, field, words):
    name = vms.name()
    data = config_with(workdir, overrides, name)
    path = vms.write(data)
    before = sorted(p.name for p in workdir.iterdir())

    proc = run_ozone("define", str(path), "--json")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    error = json.loads(proc.stdout)["error"]
    assert error["code"] == "bad-config"
    text = error["message"] + " " + (error["hint"] or "")
    assert str(path) in error["message"]
    if field:
        assert f": {field}: " in error["message"]
    assert words in text
    assert not domain_exists(name)
    assert not domain_exists(data["name"]) if isinstance(data["name"], str) else True
    assert sorted(p.name for p in workdir.iterdir()) == before  # no disk image left

    human = run_ozone("define", str(path))
    assert human.returncode == 2
    lines = human.stderr.strip().splitlines()
    assert lines[0].startswith("error: ")
    assert all(line.startswith(("error: ", "hint: ")) for line in lines)
    assert "Traceback" not in human.stderr


@pytest.mark.parametrize(
    ("suffix", "text", "where"),
    [
        (".json", '{\n  "name": "x",\n  "memory": 512,,\n}', "line 3, column 17"),
        (".yaml", "name: x\nmemory: [512\ncdrom: x.iso\n", "line 3, column"),
    ],
)
def test_syntax_errors_have_line_and_column(libvirtd, workdir, suffix, text, where):
    path = workdir / f"broken{suffix}"
    path.write_text(text)
    proc = run_ozone("define", str(path))
    assert proc.returncode == 2
    assert where in proc.stderr
    assert str(path) in proc.stderr


def test_duplicate_qmp_endpoint_is_refused(vms, workdir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"tcp:127.0.0.1:{port}"
    first = vms.write(config_with(workdir, {"qmp": endpoint, "disks": None}, vms.name()))
    assert run_ozone("define", str(first)).returncode == 0
    second_name = vms.name()
    second = vms.write(config_with(workdir, {"qmp": endpoint, "disks": None}, second_name))
    proc = run_ozone("define", str(second), "--json")
    assert proc.returncode == 2
    error = json.loads(proc.stdout)["error"]
    assert ": qmp: " in error["message"]
    assert "already the QMP endpoint" in error["message"]
    assert not domain_exists(second_name)


def test_missing_config_file_and_unknown_name(libvirtd, tmp_path):
    proc = run_ozone("define", str(tmp_path / "nope.json"))
    assert proc.returncode == 2
    assert "no such config file" in proc.stderr
    env_proc = run_ozone("define", "no-such-vm-config")
    assert env_proc.returncode == 2
    assert "no config named 'no-such-vm-config'" in env_proc.stderr
    assert "OZONE_CONFIG_PATH" in env_proc.stderr


def test_unreachable_libvirt_is_one_line(tmp_path):
    proc = run_ozone("-c", "qemu+unix:///system?socket=/nonexistent/sock", "list")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: cannot connect to libvirt")
    assert "Traceback" not in proc.stderr
    proc = run_ozone("-c", "qemu+unix:///system?socket=/nonexistent/sock", "list", "--json")
    assert json.loads(proc.stdout)["error"]["code"] == "connection"
