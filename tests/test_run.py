"""`ozone run` and its boot cache on a real libvirtd with real guests (TCG)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import GUEST_DIR, remove_domain, run_ozone, virsh

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest]


@pytest.fixture
def env(run_env: dict[str, str]) -> dict[str, str]:
    return run_env


@pytest.fixture
def config(vms, workdir: Path, env) -> Iterator[tuple[str, Path]]:
    """A config with its own copy of the ISO (so that touching it touches nothing else) and
    a base disk that runs must never write. Afterwards, also when the test failed, the VMs
    its runs made (NAME-run…) and their logs are removed."""
    iso = workdir / "guest.iso"
    shutil.copy(GUEST_DIR / "ozone-guest.iso", iso)
    iso.chmod(0o644)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(workdir / "base.qcow2"), "16M"], check=True
    )
    (workdir / "base.qcow2").chmod(0o644)
    name, path = vms.config({"cdrom": str(iso), "disks": ["base.qcow2"]})
    yield name, path
    for domain in virsh("list", "--all", "--name", check=False).split():
        if domain.startswith(f"{name}-run"):
            remove_domain(domain)
    for log in Path("/var/log/libvirt/qemu").glob(f"{name}-run*"):
        log.unlink(missing_ok=True)


def stop(child: subprocess.Popen[bytes]) -> None:
    """End a child `ozone run` the way a user would (SIGTERM: it cleans up), then for sure."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def ozone_run(env, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_ozone("-v", "run", *args, env=env, timeout=timeout)


def leftovers(name: str, env: dict[str, str]) -> list[str]:
    domains = [d for d in virsh("list", "--all", "--name").split() if d.startswith(f"{name}-")]
    runs = os.listdir(env["OZONE_RUN_DIR"])
    return domains + runs


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_exit_status_output_and_cache_hit_miss_invalidation(config, workdir, env):
    name, path = config
    first = ozone_run(env, str(path), "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert "boot cache miss" in first.stderr
    assert first.returncode == 7, first.stderr
    assert first.stdout == "out\n" and "err\n" in first.stderr
    assert "boot cache miss" in first.stderr
    assert leftovers(name, env) == []

    second = ozone_run(env, str(path), "--", "cat", "/proc/uptime")
    assert second.returncode == 0, second.stderr
    assert "boot cache hit" in second.stderr
    entries = json.loads(run_ozone("cache", "list", "--json", env=env).stdout)
    assert len(entries) == 1 and entries[0]["config"] == str(path) and entries[0]["slots"] == 1
    old_key = entries[0]["key"]

    os.utime(workdir / "guest.iso")  # a new ISO (same bytes, new mtime): the state is stale
    third = ozone_run(env, str(path), "--", "true")
    assert third.returncode == 0, third.stderr
    assert "boot cache miss" in third.stderr
    entries = json.loads(run_ozone("cache", "list", "--json", env=env).stdout)
    assert len(entries) == 1 and entries[0]["key"] != old_key and entries[0]["slots"] == 1

    cleared = json.loads(run_ozone("cache", "clear", str(path), "--json", env=env).stdout)
    assert len(cleared["removed"]) == 1
    assert json.loads(run_ozone("cache", "list", "--json", env=env).stdout) == []
    assert leftovers(name, env) == []


def test_runs_never_write_the_base_disk(config, workdir, env):
    name, path = config
    base = workdir / "base.qcow2"
    before = md5(base)
    write = "head -c 65536 /dev/urandom | dd of=/dev/vda conv=notrunc,fsync 2>/dev/null; sync"
    for _ in range(2):  # a miss (boot, save) then a hit (restore)
        proc = ozone_run(env, str(path), "--", "sh", "-c", write)
        assert proc.returncode == 0, proc.stderr
    assert "boot cache hit" in proc.stderr
    assert md5(base) == before
    # the cached state stayed valid: the writes went to each run's own overlay
    again = ozone_run(env, str(path), "--", "sh", "-c", "head -c 8 /dev/vda | od -An -tx1")
    assert "boot cache hit" in again.stderr
    assert again.stdout.split() == ["00"] * 8
    assert leftovers(name, env) == []


def test_nothing_left_after_timeout_no_cache_and_sigint(config, env):
    name, path = config
    proc = ozone_run(env, "--timeout", "2", str(path), "--", "sleep", "60")
    assert proc.returncode == 124, proc.stderr
    assert leftovers(name, env) == []

    proc = ozone_run(env, "--no-cache", str(path), "--", "sh", "-c", "exit 3")
    assert proc.returncode == 3, proc.stderr
    assert "boot cache" not in proc.stderr
    assert leftovers(name, env) == []

    child = subprocess.Popen(
        [sys.executable, "-m", "ozone_libvirt", "run", str(path), "--", "sh", "-c",
         "echo started; sleep 60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )  # fmt: skip
    try:
        assert child.stdout.readline() == b"started\n"
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=60) == 128 + signal.SIGINT, child.stderr.read()
    finally:
        stop(child)
    assert leftovers(name, env) == []


def test_three_runs_at_once(config, env):
    name, path = config
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "ozone_libvirt", "run", str(path), "--", "echo", f"run {i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for i in range(3)
    ]
    outputs = []
    try:
        for child in children:
            out, err = child.communicate(timeout=600)
            assert child.returncode == 0, err
            outputs.append(out)
    finally:
        for child in children:
            stop(child)
    assert sorted(outputs) == [b"run 0\n", b"run 1\n", b"run 2\n"]
    assert leftovers(name, env) == []
    # each took a slot of its own, so the next three all restore
    entries = json.loads(run_ozone("cache", "list", "--json", env=env).stdout)
    assert entries[0]["slots"] == 3


def test_run_by_vm_name_and_keep(config, env):
    name, path = config
    assert run_ozone("define", str(path)).returncode == 0
    proc = ozone_run(env, "--keep", name, "--", "hostname")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ozone-guest\n"
    kept = [d for d in virsh("list", "--name").split() if d.startswith(f"{name}-run")]
    assert len(kept) == 1  # the config fixture removes it afterwards
    assert len(os.listdir(env["OZONE_RUN_DIR"])) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("no-such-config", "--", "true"), "no-such-config"),
        (("{path}",), "no command given"),
    ],
)
def test_run_errors(config, env, args, message):
    name, path = config
    began = time.monotonic()
    proc = ozone_run(env, *(a.format(path=path) for a in args))
    assert proc.returncode == 125
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - began < 30
    assert leftovers(name, env) == []


def test_stdin_through_run_and_sigterm_cleans_up(config, env):
    name, path = config
    proc = subprocess.run(
        [sys.executable, "-m", "ozone_libvirt", "run", "-i", str(path), "--", "md5sum"],
        input=b"through the boot cache\n" * 1000,
        capture_output=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout.split()[0].decode()
        == hashlib.md5(b"through the boot cache\n" * 1000).hexdigest()
    )

    child = subprocess.Popen(
        [sys.executable, "-m", "ozone_libvirt", "run", str(path), "--", "sh", "-c",
         "echo started; sleep 60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )  # fmt: skip
    try:
        assert child.stdout.readline() == b"started\n"
        child.terminate()
        assert child.wait(timeout=60) == 143, child.stderr.read()  # 128 + SIGTERM
    finally:
        stop(child)
    assert leftovers(name, env) == []
