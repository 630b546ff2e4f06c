"""Programs and files inside a real guest (TCG) through the guest agent: `ozone exec`,
`ozone cp`, `ozone clock`, `start --wait`, and the Python API."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import (
    GUEST_DIR,
    guest_sh,
    leftovers,
    oz_exec,
    ozone_cmd,
    ozone_env,
    run_ozone,
    running_guest,
    serial_text,
    virsh,
    wait_until,
)

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest]

MiB = 1 << 20
BIG = 16 * MiB  # past every chunk and message limit between here and the guest


@pytest.fixture(scope="module")
def guest(libvirtd: str, guest_image: Path) -> Iterator[str]:
    """One running guest shared by this module's tests (booting costs seconds under TCG)."""
    with running_guest("exec") as name:
        yield name


# --- exit status ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "code"),
    [("true", 0), ("exit 3", 3), ("kill -9 $$", 128 + 9), ("kill -TERM $$", 128 + 15)],
)
def test_exit_status_is_passed_through(guest, script, code):
    proc = oz_exec(guest, "sh", "-c", script)
    assert proc.returncode == code, proc.stderr


def test_missing_program_exits_127_like_a_shell(guest):
    proc = oz_exec(guest, "no-such-program")
    assert proc.returncode == 127
    assert b"no-such-program: command not found" in proc.stderr


def test_timeout_kills_the_program_and_exits_124(guest):
    marker = f"sleep {600 + os.getpid() % 300}"
    began = time.monotonic()
    proc = oz_exec(guest, "sh", "-c", f"{marker} & wait", options=("--timeout", "2"))
    assert proc.returncode == 124, proc.stderr
    assert time.monotonic() - began < 20
    assert b"ran out of time after 2 s" in proc.stderr
    assert marker not in guest_sh(guest, "ps -o args"), "the guest program was left running"


def test_ctrl_c_interrupts_the_guest_program(guest):
    marker = f"sleep {300 + os.getpid() % 300}"
    proc = subprocess.Popen(
        ozone_cmd("exec", guest, "--", "sh", "-c", f"echo started; exec {marker}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ozone_env(),
    )
    try:
        assert proc.stdout.readline() == b"started\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 128 + signal.SIGINT
    finally:
        proc.kill()
    assert marker not in guest_sh(guest, "ps -o args")


# --- output --------------------------------------------------------------------------------


def test_stdout_and_stderr_stay_apart(guest):
    proc = oz_exec(guest, "sh", "-c", "echo to-out; echo to-err >&2; printf 'no newline'")
    assert proc.returncode == 0
    assert proc.stdout == b"to-out\nno newline"
    assert proc.stderr == b"to-err\n"


def test_output_streams_while_the_program_runs(guest):
    proc = subprocess.Popen(
        ozone_cmd("exec", guest, "--", "sh", "-c", "echo first; sleep 6; echo second"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ozone_env(),
    )
    try:
        assert proc.stdout.readline() == b"first\n"
        first_seen = time.monotonic()
        assert proc.poll() is None, "the first line only arrived when the program had ended"
        assert proc.stdout.readline() == b"second\n"
        assert time.monotonic() - first_seen > 3
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


# 16 MiB crosses every size limit on the way: the 256 KiB that comes back in guest-exec-status
# (64 times), the 1 MiB reads, libvirt's ~4 MiB RPC message and 10 MiB agent reply
def test_16_mib_of_output_arrives_intact(guest):
    script = (
        f"head -c {BIG} /dev/urandom >/tmp/big && md5sum </tmp/big >&2 && cat /tmp/big; "
        "rc=$?; rm -f /tmp/big; exit $rc"
    )
    proc = subprocess.Popen(
        ozone_cmd("exec", guest, "--", "sh", "-c", script),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ozone_env(),
    )
    digest, size = hashlib.md5(), 0
    while chunk := proc.stdout.read(MiB):
        digest.update(chunk)
        size += len(chunk)
    assert proc.wait(timeout=300) == 0
    assert size == BIG
    assert proc.stderr.read().split()[0].decode() == digest.hexdigest()


def test_env_cwd_and_user_are_honoured(guest):
    proc = oz_exec(
        guest,
        "sh",
        "-c",
        'echo "$GREETING|$EMPTY|$(pwd)|$(id -un)|$HOME"',
        options=("--env", "GREETING=hello world", "-e", "EMPTY=", "--cwd", "/etc", "-u", "ozone"),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"hello world||/etc|ozone|/home/ozone\n"


def test_env_values_never_appear_on_a_command_line(guest):
    proc = oz_exec(guest, "sh", "-c", "ps -o args", options=("-e", "SECRET=hunter2-xyz"))
    assert proc.returncode == 0
    assert b"hunter2-xyz" not in proc.stdout


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--cwd", "/no/such/dir"), b"cannot change to directory /no/such/dir"),
        (("--user", "nobody-here"), b"no user nobody-here"),
        (("--env", "1BAD=x"), b"not a valid environment variable name"),
    ],
)
def test_bad_exec_options_fail_with_125(guest, options, message):
    proc = oz_exec(guest, "true", options=options)
    assert proc.returncode == 125
    assert message in proc.stderr
    assert b"Traceback" not in proc.stderr


def test_no_command_is_an_error(guest):
    proc = subprocess.run(
        ozone_cmd("exec", guest), capture_output=True, env=ozone_env(), timeout=60, check=False
    )
    assert proc.returncode == 125
    assert b"no command given" in proc.stderr


# --- stdin ---------------------------------------------------------------------------------


def test_16_mib_of_stdin_round_trips_through_md5sum(guest, tmp_path):
    data = tmp_path / "input.bin"
    digest = hashlib.md5()
    with data.open("wb") as f:
        for _ in range(BIG // MiB):
            chunk = os.urandom(MiB)
            digest.update(chunk)
            f.write(chunk)
    with data.open("rb") as stdin:
        proc = subprocess.run(
            ozone_cmd("exec", "-i", guest, "--", "md5sum"),
            stdin=stdin,
            capture_output=True,
            env=ozone_env(),
            timeout=600,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0].decode() == digest.hexdigest()


def test_stdin_from_a_pipe_and_early_exit(guest):
    proc = subprocess.run(
        ozone_cmd("exec", "-i", guest, "--", "head", "-n", "2"),
        input=b"one\ntwo\nthree\n" * 1000,
        capture_output=True,
        env=ozone_env(),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"one\ntwo\n"


def test_without_i_the_program_reads_nothing(guest):
    proc = subprocess.run(
        ozone_cmd("exec", guest, "--", "cat"),
        input=b"must not arrive",
        capture_output=True,
        env=ozone_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    assert proc.stdout == b""


# --- files ---------------------------------------------------------------------------------


# 16 MiB: 128 writes of 128 KiB in, 16 reads of 1 MiB back, past libvirt's 4 and 10 MiB limits
def test_cp_16_mib_both_ways_with_mode(guest, tmp_path):
    source = tmp_path / "payload.bin"
    with source.open("wb") as f:
        for _ in range(BIG // MiB):
            f.write(os.urandom(MiB))
    source.chmod(0o751)
    want = hashlib.md5(source.read_bytes()).hexdigest()

    try:
        proc = run_ozone("cp", str(source), f"{guest}:/tmp/", timeout=600)
        assert proc.returncode == 0, proc.stderr
        listing = guest_sh(
            guest, "md5sum /tmp/payload.bin; stat -c %a /tmp/payload.bin; ls -a /tmp"
        )
        assert listing.split()[0] == want
        assert listing.split()[2] == "751"
        assert "ozone-part" not in listing

        back = tmp_path / "back.bin"
        proc = run_ozone("cp", f"{guest}:/tmp/payload.bin", str(back), timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert hashlib.md5(back.read_bytes()).hexdigest() == want
        assert back.stat().st_mode & 0o777 == 0o751
    finally:
        guest_sh(guest, "rm -f /tmp/payload.bin")


@pytest.mark.parametrize(
    ("source", "destination", "message"),
    [
        ("{guest}:/no/such/file", "{tmp}/x", "no such file: {guest}:/no/such/file"),
        ("{tmp}/missing", "{guest}:/tmp/", "no such file: {tmp}/missing"),
        ("{tmp}/present", "{guest}:/no/such/dir/x", "no directory /no/such/dir"),
        ("{tmp}/present", "{guest}:/proc/x", "cannot write {guest}:/proc/x"),
        ("{guest}:/etc/hostname", "{tmp}/no/dir/", "no such directory"),
        ("{tmp}/present", "{tmp}/elsewhere", "one side of cp must be NAME:/path"),
    ],
)
def test_cp_errors_are_clear_and_leave_nothing(guest, tmp_path, source, destination, message):
    (tmp_path / "present").write_text("x")
    fill = {"guest": guest, "tmp": str(tmp_path)}
    proc = run_ozone("cp", source.format(**fill), destination.format(**fill))
    assert proc.returncode == (2 if "one side" in message else 1)
    assert message.format(**fill) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["present"]
    assert "ozone-part" not in guest_sh(guest, "ls -a /tmp /proc 2>/dev/null")


# --- readiness, clock, failures ------------------------------------------------------------


def test_clock_sync_sets_the_guest_clock(guest):
    guest_sh(guest, "date -s '2001-01-01 00:00:00' >/dev/null")
    try:
        before = json.loads(run_ozone("clock", guest, "--json").stdout)
        assert before["offset_s"] < -365 * 24 * 3600
        synced = run_ozone("clock", guest, "--sync", "--json")
        assert synced.returncode == 0, synced.stderr
        assert json.loads(synced.stdout)["synced"] is True
        after = json.loads(run_ozone("clock", guest, "--json").stdout)
        assert abs(after["offset_s"]) < 5
    finally:
        run_ozone("clock", guest, "--sync")


def test_exec_sync_clock_sets_the_clock_first(guest):
    guest_sh(guest, "date -s '2001-01-01 00:00:00' >/dev/null")
    try:
        proc = oz_exec(guest, "date", "+%Y", options=("--sync-clock",))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.decode().strip() == time.strftime("%Y", time.gmtime())
    finally:
        run_ozone("clock", guest, "--sync")


def test_exec_against_a_stopped_vm_fails_fast(vms):
    name, path = vms.config()
    assert run_ozone("define", str(path)).returncode == 0
    began = time.monotonic()
    proc = oz_exec(name, "true")
    assert proc.returncode == 125
    assert f"{name} is not running".encode() in proc.stderr
    assert time.monotonic() - began < 10


def test_exec_against_a_vm_without_agent_channel(vms):
    name, path = vms.config({"agent": False})
    assert run_ozone("define", str(path)).returncode == 0
    assert run_ozone("start", name).returncode == 0
    proc = oz_exec(name, "true")
    assert proc.returncode == 125
    assert b"has no guest agent channel" in proc.stderr


def test_vm_destroyed_mid_run_fails_fast(vms):
    name, path = vms.config()
    assert run_ozone("define", str(path)).returncode == 0
    assert run_ozone("start", name, "--wait").returncode == 0
    proc = subprocess.Popen(
        ozone_cmd("exec", name, "--", "sh", "-c", "echo running; sleep 60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ozone_env(),
    )
    try:
        assert proc.stdout.readline() == b"running\n"
        virsh("destroy", name)
        destroyed = time.monotonic()
        assert proc.wait(timeout=30) == 125
        assert time.monotonic() - destroyed < 15
        assert f"{name} stopped while".encode() in proc.stderr.read()
    finally:
        proc.kill()


def test_start_wait_timeout_shows_the_console(vms):
    name, path = vms.config(
        {
            "kernel": str(GUEST_DIR / "vmlinuz"),
            "initrd": str(GUEST_DIR / "initrd.img"),
            "cmdline": "console=ttyS0 ozone.agent=0",
        },
        tiny=False,
    )
    assert run_ozone("define", str(path)).returncode == 0
    # the guest never starts its agent: a wait that runs out after it has printed its
    # banner shows it (`start --wait` and `wait` share the wait)
    assert run_ozone("start", name).returncode == 0
    banner = "guest agent not started (ozone.agent=0)"
    wait_until(lambda: banner in serial_text(name), timeout=90, what="the guest's banner")
    proc = run_ozone("wait", name, "--timeout", "2")
    assert proc.returncode == 1
    assert "did not answer within 2 s" in proc.stderr
    assert banner in proc.stderr


def test_wait_on_a_starting_vm(vms):
    name, path = vms.config()
    assert run_ozone("define", str(path)).returncode == 0
    assert run_ozone("start", name).returncode == 0
    proc = run_ozone("wait", name, "--timeout", "120", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ready_seconds"] > 0
    assert oz_exec(name, "true").returncode == 0


# --- the Python API, and each way output comes back ----------------------------------------


def test_api_exec_capture_check_and_stdin(guest):
    from ozone_libvirt import VM, ExitError

    with VM(guest, uri="qemu:///system") as vm:
        result = vm.exec(["sh", "-c", "cat; echo err >&2"], stdin=b"in\x00bytes")
        assert (result.exit_code, result.stdout, result.stderr) == (0, b"in\x00bytes", b"err\n")
        with pytest.raises(ExitError) as caught:
            vm.exec(["sh", "-c", "exit 7"], check=True)
        assert caught.value.result.exit_code == 7
        sink = io.BytesIO()
        streamed = vm.exec(["echo", "to a file"], stdout=sink)
        assert streamed.stdout is None and sink.getvalue() == b"to a file\n"


@pytest.mark.parametrize("mode", ["captured", "streamed", "kept"])
def test_each_way_output_comes_back(guest, monkeypatch, mode):
    """Force each of the wrapper's three endings and check nothing is lost or left behind."""
    from ozone_libvirt import VM, execute

    size = 300000
    monkeypatch.setattr(execute, "STREAM_AFTER", 0 if mode == "streamed" else 3600)
    if mode == "kept":  # quick program, output over the capture limit
        monkeypatch.setattr(execute, "CAPTURE_LIMIT", 1000)
    elif mode == "captured":
        size = 100000
    seen: list[str] = []
    parse = execute._parse_header

    def spy(data: bytes):
        header, rest = parse(data)
        seen.append(header.mode if header else "none")
        return header, rest

    monkeypatch.setattr(execute, "_parse_header", spy)
    script = f"head -c {size} /dev/urandom | tee /tmp/ozt-out | md5sum >&2; cat /tmp/ozt-out"
    with VM(guest, uri="qemu:///system") as vm:
        result = vm.exec(["sh", "-c", script + "; rm /tmp/ozt-out"])
        assert result.exit_code == 0
        assert seen == [mode]
        assert len(result.stdout) == size
        assert result.stderr.split()[0].decode() == hashlib.md5(result.stdout).hexdigest()
    wait_until(lambda: not leftovers(guest), timeout=10, what="ozone's files gone from /tmp")


# --- edges found in review -----------------------------------------------------------------


def test_a_closed_pipe_stops_the_guest_program(guest):
    marker = f"yes ozt{os.getpid()}"
    proc = subprocess.Popen(
        ozone_cmd("exec", guest, "--", "sh", "-c", marker),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ozone_env(),
    )
    try:
        line = f"ozt{os.getpid()}\n".encode()
        assert proc.stdout.read(len(line)) == line
        proc.stdout.close()  # like `| head -c 10`
        assert proc.wait(timeout=60) == 128 + signal.SIGPIPE
        assert b"Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
    assert marker not in guest_sh(guest, "ps -o args")
    wait_until(lambda: not leftovers(guest), timeout=10, what="ozone's files gone from /tmp")


def test_the_programs_path_does_not_break_the_wrapper(guest):
    proc = oz_exec(guest, "/bin/sh", "-c", "echo $PATH", options=("-e", "PATH=/nowhere"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"/nowhere\n"
    assert oz_exec(guest, "qemu-ga", "-V", options=("-e", "PATH=/nowhere")).returncode == 127


def test_stdin_held_by_a_background_child_does_not_hang(guest):
    began = time.monotonic()
    proc = subprocess.run(
        ozone_cmd(
            "exec",
            "-i",
            guest,
            "--",
            "sh",
            "-c",
            "sleep 30 <&0 & echo $! >/tmp/ozt-bg; head -c 5",
        ),
        input=b"x" * 300000,
        capture_output=True,
        env=ozone_env(),
        timeout=60,
        check=False,
    )
    try:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == b"xxxxx"
        assert time.monotonic() - began < 20
    finally:
        guest_sh(guest, 'kill "$(cat /tmp/ozt-bg)"; rm -f /tmp/ozt-bg')


def test_cp_refuses_what_is_not_a_regular_file(guest, tmp_path):
    proc = run_ozone("cp", f"{guest}:/dev/zero", str(tmp_path / "zero"))
    assert proc.returncode == 1
    assert "not a regular file" in proc.stderr
    assert list(tmp_path.iterdir()) == []
