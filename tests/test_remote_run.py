"""`ozone run` and its boot cache over a remote URI: the second libvirt host of this machine
(scripts/second-host, reached over qemu+tcp, with its own /var/lib/ozone), real guests (TCG).

What ozone writes on this machine is invisible there, so a run that works at all went
through libvirt; the tests also look into the second host's file system (on_second_host)
to see that the overlays and saved states are there, and not here."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import GUEST_DIR, on_second_host, run_ozone

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest]

RUNS = "/var/lib/ozone/runs"
CACHE = "/var/lib/ozone/cache"
LOGS = "/var/lib/ozone/logs"


def remote_virsh(uri: str, *args: str) -> str:
    proc = subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def listing(folder: str) -> list[str]:
    """The files of a folder of the second host."""
    proc = on_second_host("ls", "-A", folder)
    return proc.stdout.split() if proc.returncode == 0 else []


def local_files(folder: str) -> list[Path]:
    return [p for p in Path(folder).rglob("*") if p.is_file()]


@pytest.fixture
def remote(second_host, vms, workdir, run_env) -> Iterator[tuple[str, Path, dict[str, str]]]:
    """A config with a base disk (the runs put overlays over it) and an environment that
    runs ozone against the second host. Afterwards, also when the test failed, the boot
    cache entries of that host and the config's domains there are removed."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(workdir / "base.qcow2"), "16M"], check=True
    )
    name, path = vms.config({"disks": ["base.qcow2"]})
    env = dict(run_env, LIBVIRT_DEFAULT_URI=second_host)
    yield name, path, env
    run_ozone("cache", "clear", env=env)
    for domain in remote_virsh(second_host, "list", "--all", "--name").split():
        if domain.startswith(name):
            subprocess.run(["virsh", "-c", second_host, "destroy", domain], capture_output=True)


def ozone_run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_ozone("-v", "run", *args, env=env, timeout=300)


def test_run_cold_then_warm_keeps_overlays_and_saved_state_on_the_other_host(remote, second_host):
    _name, path, env = remote
    cold = ozone_run(env, str(path), "--", "cat", "/proc/version")
    assert cold.returncode == 0, cold.stderr
    assert "boot cache miss" in cold.stderr and cold.stdout.startswith("Linux version")
    saved = listing(CACHE)
    key = json.loads(run_ozone("cache", "list", "--json", env=env).stdout)[0]["key"]
    assert sorted(saved) == [f"{key}-slot0-disk0.qcow2", f"{key}-slot0.save"]

    # a warm run: its overlay is on the other host while it runs, and nothing is here
    child = subprocess.Popen(
        [sys.executable, "-m", "ozone_libvirt", "-v", "run", str(path), "--",
         "sh", "-c", "echo started; sleep 4; exit 7"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline() == b"started\n"
        (run_dir,) = Path(env["OZONE_RUN_DIR"]).iterdir()
        assert listing(RUNS) == [f"{run_dir.name}-disk0.qcow2"]
        assert sorted(p.name for p in run_dir.iterdir()) == ["lock", "owner.json"]
        assert child.wait(timeout=120) == 7
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.stderr is not None and "boot cache hit" in child.stderr.read().decode()

    # nothing of the runs is left there, nor here; the cache's files are there only
    assert listing(RUNS) == []
    assert not [d for d in remote_virsh(second_host, "list", "--all", "--name").split() if d]
    assert list(Path(env["OZONE_RUN_DIR"]).iterdir()) == []
    here = [p.name for p in local_files(env["OZONE_CACHE_DIR"])]
    assert not [f for f in here if f.endswith((".save", ".qcow2"))], here

    (entry,) = json.loads(run_ozone("cache", "list", "--json", env=env).stdout)
    assert entry["host"] == second_host and entry["slots"] == 1
    assert entry["config"] == str(path) and entry["bytes"] > 1 << 20  # the state's size there
    assert second_host in run_ozone("cache", "list", env=env).stdout  # a HOST column

    # clearing this machine's cache leaves the other host's entry; clearing that host's goes
    local = dict(env, LIBVIRT_DEFAULT_URI="qemu:///system")
    assert json.loads(run_ozone("cache", "clear", "--json", env=local).stdout) == {"removed": []}
    cleared = json.loads(run_ozone("cache", "clear", "--json", env=env).stdout)
    assert cleared == {"removed": [key]}
    assert listing(CACHE) == []
    assert json.loads(run_ozone("cache", "list", "--json", env=env).stdout) == []


def test_a_killed_run_is_reaped_on_its_host(remote, second_host):
    name, path, env = remote
    child = subprocess.Popen(
        [sys.executable, "-m", "ozone_libvirt", "run", "--no-cache", str(path), "--",
         "sh", "-c", "echo started; sleep 120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline() == b"started\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    (domain,) = remote_virsh(second_host, "list", "--name").split()
    assert domain.startswith(f"{name}-run-")
    (run_dir,) = Path(env["OZONE_RUN_DIR"]).iterdir()
    assert listing(RUNS) == [f"{run_dir.name}-disk0.qcow2"]
    assert f"{domain}-serial.log" in listing(LOGS)

    # a run on this machine leaves it (it is another host's), `ozone gc` opens that host
    local = dict(env, LIBVIRT_DEFAULT_URI="qemu:///system")
    dry = json.loads(run_ozone("gc", "--dry-run", "--json", env=local).stdout)
    assert f"VM {domain}" in dry["removed"] and str(run_dir) in dry["removed"]
    assert listing(RUNS) == [f"{run_dir.name}-disk0.qcow2"]
    gc = json.loads(run_ozone("gc", "--json", env=env).stdout)
    assert f"VM {domain}" in gc["removed"]
    assert f"{RUNS}/{run_dir.name}-disk0.qcow2 on {second_host}" in gc["removed"]
    assert remote_virsh(second_host, "list", "--all", "--name").split() == []
    assert listing(RUNS) == [] and f"{domain}-serial.log" not in listing(LOGS)
    assert list(Path(env["OZONE_RUN_DIR"]).iterdir()) == []


def test_a_run_uses_an_iso_kept_on_that_host_and_leaves_nothing_there(
    remote, second_host, tmp_path
):
    """A run's ISO that is not on this machine but on the VM's host is used where it is;
    a run without the cache passes the exit code through and leaves nothing on either host."""
    name, _path, env = remote
    kept = f"/var/lib/libvirt/images/{name}-kept.iso"
    assert on_second_host("cp", str(GUEST_DIR / "ozone-guest.iso"), kept).returncode == 0
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({"name": name, "memory": "256MiB", "cdrom": kept,
                                  "network": "none"}))  # fmt: skip
    try:
        proc = ozone_run(env, "--no-cache", str(config), "--", "sh", "-c", "echo hi; exit 3")
        assert (proc.returncode, proc.stdout) == (3, "hi\n"), proc.stderr
        assert "boot cache" not in proc.stderr
        assert listing(RUNS) == [] and listing(CACHE) == []
        assert not [log for log in listing(LOGS) if log.startswith(f"{name}-run-")]
        assert remote_virsh(second_host, "list", "--all", "--name").split() == []
        assert list(Path(env["OZONE_RUN_DIR"]).iterdir()) == []
    finally:
        on_second_host("rm", "-f", kept)
