"""Shared fixtures.

Integration tests talk to a real libvirtd at qemu:///system and boot real QEMU guests under
TCG from the image scripts/build-guest-iso builds. `make test` sets both up; a missing piece
is a test failure with a hint, never a silent skip.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
GUEST_DIR = Path(os.environ.get("OZONE_GUEST_DIR", REPO / "build" / "guest"))
URI = "qemu:///system"
# QEMU runs as libvirt-qemu: test images live where it can reach them
WORK_ROOT = Path("/var/lib/libvirt/images/ozone-tests")
READY_LINE = "OZONE-GUEST-READY"
PREFIX = f"ozt{os.getpid()}-"
_counter = itertools.count(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regenerate-output",
        action="store_true",
        help="rewrite the golden files in xml/ from examples/ instead of comparing",
    )


def ozone_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"LIBVIRT_DEFAULT_URI": URI, "OZONE_ACCEL": "tcg"})
    env.update(extra)
    return env


def run_ozone(
    *args: str, input: bytes | None = None, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `ozone` command line in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "ozone_libvirt", *args],
        capture_output=True,
        text=True,
        input=input.decode() if input is not None else None,
        timeout=timeout,
        env=env or ozone_env(),
        check=False,
    )


def ozone_json(*args: str, timeout: float = 180) -> Any:
    proc = run_ozone(*args, "--json", timeout=timeout)
    assert proc.returncode == 0, f"ozone {' '.join(args)} failed: {proc.stdout}{proc.stderr}"
    return json.loads(proc.stdout)


def virsh(*args: str, check: bool = True) -> str:
    proc = subprocess.run(
        ["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=60, check=False
    )
    if check:
        assert proc.returncode == 0, f"virsh {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def wait_until(condition: Callable[[], Any], *, timeout: float, what: str) -> Any:
    """Poll until ``condition`` returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def domain_exists(name: str) -> bool:
    return (
        subprocess.run(
            ["virsh", "-c", URI, "domstate", name], capture_output=True, check=False
        ).returncode
        == 0
    )


def remove_domain(name: str) -> None:
    subprocess.run(["virsh", "-c", URI, "destroy", name], capture_output=True, check=False)
    subprocess.run(
        ["virsh", "-c", URI, "undefine", name, "--managed-save", "--snapshots-metadata", "--nvram"],
        capture_output=True,
        check=False,
    )
    from ozone_libvirt.ssh import forget

    forget(name)  # the VM's ssh key, made when a config has cloud-init


@pytest.fixture(scope="session")
def libvirtd() -> str:
    proc = subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(
            f"libvirtd does not answer at {URI}: {proc.stderr.strip()} (run scripts/setup-host)"
        )
    return URI


SECOND_HOST = REPO / "scripts" / "second-host"


@contextlib.contextmanager
def another_host(name: str) -> Iterator[tuple[str, dict[str, str]]]:
    """A libvirt host of its own on this machine (scripts/second-host: its own libvirtd in
    its own mount namespace, its own host UUID) named ``name``, on a free port (another test
    run may have one too): its URI and the environment that names it (for `stop`, `run`).
    Stopped afterwards, with everything it held."""
    import socket

    env = dict(os.environ, SECOND_HOST=name)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.run(
        [str(SECOND_HOST), "start", str(port)], capture_output=True, text=True, env=env, timeout=60
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/second-host start failed: {proc.stderr.strip()}")
    try:
        yield proc.stdout.strip(), env
    finally:
        subprocess.run([str(SECOND_HOST), "stop"], capture_output=True, env=env, timeout=60)


@pytest.fixture(scope="session")
def second_host(libvirtd: str) -> Iterator[str]:
    """Another libvirt host on this machine, reached over qemu+tcp, for the session."""
    with another_host(f"ozt{os.getpid()}") as (uri, _env):
        yield uri


def on_second_host(*command: str) -> subprocess.CompletedProcess[str]:
    """Run a command in the second host's file system."""
    env = dict(os.environ, SECOND_HOST=f"ozt{os.getpid()}")
    return subprocess.run(
        [str(SECOND_HOST), "run", *command], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.fixture(scope="session")
def guest_image() -> Path:
    iso = GUEST_DIR / "ozone-guest.iso"
    for path in (iso, GUEST_DIR / "vmlinuz", GUEST_DIR / "initrd.img"):
        if not path.is_file():
            pytest.fail(f"{path} is missing: run scripts/build-guest-iso")
    return GUEST_DIR


@pytest.fixture
def workdir() -> Iterator[Path]:
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    WORK_ROOT.chmod(0o755)
    path = WORK_ROOT / uuid.uuid4().hex[:12]
    path.mkdir(mode=0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class VMFactory:
    """Writes VM configs into a work folder and removes every domain it named afterwards."""

    workdir: Path
    guest: Path | None
    names: list[str] = field(default_factory=list)

    def name(self) -> str:
        name = f"{PREFIX}{next(_counter)}"
        self.names.append(name)
        return name

    def config(
        self, overrides: dict[str, Any] | None = None, *, fmt: str = "json", tiny: bool = True
    ) -> tuple[str, Path]:
        """A config for a tiny guest (256 MiB, booting the test ISO), with overrides."""
        data: dict[str, Any] = {"name": self.name(), "memory": "256MiB"}
        if tiny:
            assert self.guest is not None
            data["cdrom"] = str(self.guest / "ozone-guest.iso")
        data.update(overrides or {})
        if data["name"] not in self.names:
            self.names.append(data["name"])
        return data["name"], self.write(data, fmt=fmt, stem=data["name"])

    def write(self, data: Any, *, fmt: str = "json", stem: str | None = None) -> Path:
        path = self.workdir / f"{stem or uuid.uuid4().hex[:8]}.{fmt}"
        if fmt == "json":
            path.write_text(json.dumps(data, indent=2))
        else:
            import yaml

            path.write_text(yaml.safe_dump(data))
        return path

    def cleanup(self) -> None:
        for name in self.names:
            remove_domain(name)


@pytest.fixture
def vms(libvirtd: str, workdir: Path, request: pytest.FixtureRequest) -> Iterator[VMFactory]:
    guest = None
    if request.node.get_closest_marker("guest"):
        guest = request.getfixturevalue("guest_image")
    factory = VMFactory(workdir=workdir, guest=guest)
    yield factory
    factory.cleanup()


@pytest.fixture(scope="session", autouse=True)
def _sweep_leftovers() -> Iterator[None]:
    """Whatever a crashed test left, remove this run's domains at the end of the session."""
    yield
    with contextlib.suppress(Exception):
        names = subprocess.run(
            ["virsh", "-c", URI, "list", "--all", "--name"], capture_output=True, text=True
        ).stdout.split()
        for name in names:
            if name.startswith(PREFIX):
                remove_domain(name)


def serial_text(name: str) -> str:
    path = Path(f"/var/log/libvirt/qemu/{name}-serial.log")
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_ready_line(name: str, timeout: float = 90) -> None:
    wait_until(
        lambda: READY_LINE in serial_text(name),
        timeout=timeout,
        what=f"{READY_LINE} on the serial console of {name}",
    )


# --- guests and programs in them -------------------------------------------------------------


def ozone_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ozone_libvirt", *args]


def boot(name: str, workdir: Path, **overrides: object) -> None:
    config = {"name": name, "memory": "512MiB", "cdrom": str(GUEST_DIR / "ozone-guest.iso")}
    config.update(overrides)
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config))
    proc = run_ozone("define", str(path))
    assert proc.returncode == 0, proc.stderr
    proc = run_ozone("start", name, "--wait", "--timeout", "120")
    assert proc.returncode == 0, proc.stderr


@contextlib.contextmanager
def running_guest(suffix: str, **overrides: object) -> Iterator[str]:
    """A tiny guest booted for a module's tests, removed afterwards (also on failure)."""
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    workdir = WORK_ROOT / f"{suffix}-{uuid.uuid4().hex[:8]}"
    workdir.mkdir(mode=0o755)
    name = f"{PREFIX}{suffix}"
    try:
        boot(name, workdir, **overrides)
        yield name
    finally:
        remove_domain(name)
        shutil.rmtree(workdir, ignore_errors=True)


def oz_exec(
    guest: str, *command: str, options: tuple[str, ...] = (), **kw: Any
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ozone_cmd("exec", *options, guest, "--", *command),
        capture_output=True,
        env=ozone_env(),
        timeout=kw.pop("timeout", 120),
        check=False,
        **kw,
    )


def guest_sh(guest: str, script: str, *, user: str | None = None) -> str:
    proc = oz_exec(guest, "sh", "-c", script, options=("-u", user) if user else ())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode()


# the run folder of the exec that looks (its stdout is a file in it)
_OWN_RUN = "o=$(readlink /proc/$$/fd/1); o=${o%/*}; o=${o##*/}"


def leftovers(guest: str, folders: str = "/var/tmp /tmp") -> list[str]:
    """What ozone left in the guest's staging places: run folders (but that of the exec
    that looks) and copies' folders."""
    script = (
        f'{_OWN_RUN}; for d in {folders}; do ls -A $d/.ozone-exec 2>/dev/null | grep -vx "$o";'
        " ls -A $d | grep '^[.]ozone-cp-'; done | sort -u || true"
    )
    return guest_sh(guest, script).split()


# a user plants a link to /root/victim at every name ozone uses in each ozone folder it can
# see, tries to make folders of its own where ozone's go, and plants links next to ozone's
# folders (as the old flat names were), for up to 60 s
PLANTER = r"""
end=$(($(date +%s) + 60))
while [ "$(date +%s)" -lt $end ]; do
  for d in /tmp/.ozone-* /var/tmp/.ozone-* /tmp/.ozone-exec/* /var/tmp/.ozone-exec/*; do
    [ -d "$d" ] && [ ! -h "$d" ] || continue
    for f in in in.0 in.1 ctl out err stream data args probe; do
      ln -s /root/victim "$d/$f"
      ln -s /root/victim "$d.$f"
    done
    mkdir "$d/x" "${d%/*}/planted"
  done 2>/dev/null
  sleep 0.02 2>/dev/null || usleep 20000
done
"""


def transfers_despite_a_planter(guest: str, tmp_path: Path, *, attacker: str) -> None:
    """With fs.protected_symlinks=0, `attacker` runs PLANTER while root streams 3 MiB of stdin
    into a program and copies a file into /tmp: both arrive intact, /root/victim (root's)
    stays as it was, and nothing is left behind."""
    guest_sh(
        guest, "echo 0 >/proc/sys/fs/protected_symlinks; umask 077; echo precious >/root/victim"
    )
    planter = subprocess.Popen(
        ozone_cmd("exec", "-u", attacker, guest, "--", "sh", "-c", PLANTER),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ozone_env(),
    )
    data = os.urandom(3 << 20)
    digest = hashlib.md5(data).hexdigest()
    try:
        proc = oz_exec(guest, "md5sum", options=("-i",), input=data)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split()[0].decode() == digest
        source = tmp_path / "payload"
        source.write_bytes(data)
        copied = run_ozone("cp", str(source), f"{guest}:/tmp/")
        assert copied.returncode == 0, copied.stderr
        assert guest_sh(guest, "md5sum </tmp/payload; rm /tmp/payload").split()[0] == digest
    finally:
        planter.kill()
        planter.wait()
        # every process (procps wants -A; busybox lists them all and knows no -A)
        ps = "{ ps -A -o pid,user 2>/dev/null || ps -o pid,user; }"
        pids = f"{ps} | awk '$2 == \"{attacker}\" {{print $1}}'"
        guest_sh(guest, f"kill $({pids}) 2>/dev/null; true")
        wait_until(
            lambda: not guest_sh(guest, pids).split(),
            timeout=30,
            what="the planter to stop",
        )
        guest_sh(guest, f"find /tmp /var/tmp -maxdepth 1 -user {attacker} -exec rm -rf {{}} +")
    assert guest_sh(guest, "cat /root/victim; echo 1 >/proc/sys/fs/protected_symlinks") == (
        "precious\n"
    )
    guest_sh(guest, "rm -f /root/victim")
    assert leftovers(guest) == []


@pytest.fixture
def run_env(workdir: Path) -> dict[str, str]:
    """A boot cache and run folder of this test's own (for `ozone run`)."""
    cache, runs = workdir / "cache", workdir / "runs"
    for folder in (cache, runs):
        folder.mkdir(mode=0o755)
    return ozone_env(OZONE_CACHE_DIR=str(cache), OZONE_RUN_DIR=str(runs))
