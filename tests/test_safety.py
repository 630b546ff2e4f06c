"""Other users, faults and leftovers, on a real libvirtd with real guests (TCG): what the
README's "Safety" section promises. Each test is a hole once found by attacking ozone.

The tiny guest has a second user, `ozone` (uid 1000); tests play it with `exec -u ozone`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import (
    GUEST_DIR,
    URI,
    domain_exists,
    guest_sh,
    leftovers,
    oz_exec,
    ozone_cmd,
    ozone_env,
    remove_domain,
    run_ozone,
    running_guest,
    transfers_despite_a_planter,
    virsh,
    wait_until,
)

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest]

MiB = 1 << 20


@pytest.fixture(scope="module")
def guest(libvirtd: str, guest_image: Path) -> Iterator[str]:
    with running_guest("safety") as name:
        yield name


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def as_json(*args: str, env: dict[str, str] | None = None) -> object:
    return json.loads(ok(run_ozone(*args, "--json", env=env)).stdout)


# --- other users in the guest ----------------------------------------------------------------


def test_other_guest_users_cannot_reach_a_programs_stdin_or_output(guest):
    """The stage is a root folder of mode 0700 (not files of mode 0666 in /tmp): user
    `ozone` can neither list it, read the program's stdin or output, nor add to it."""
    script = r"""
d=$(readlink /proc/$$/fd/1); d=${d%/*}
ls -ld "$d" | cut -c1-10
su -s /bin/sh ozone -c "ls $d; cat $d/in; cat $d/out; echo evil >$d/in.9" 2>&1 |
  sed 's/.*: //' | sort -u
cat
"""
    proc = oz_exec(guest, "sh", "-c", script, options=("-i",), input=b"secret stdin\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == "drwx------"
    assert lines[1:-1] == ["Permission denied"]
    assert lines[-1] == "secret stdin"


def test_a_programs_user_owns_its_output_and_stdin(guest):
    """With -u the program's own files are its user's (it may reopen them), the folder is
    still root's."""
    script = "stat -L -c %u /proc/$$/fd/0 /proc/$$/fd/1 /proc/$$/fd/2 | sort -u; id -u"
    proc = oz_exec(guest, "sh", "-c", script, options=("-i", "-u", "ozone"), input=b"")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == ["1000", "1000"]


def test_planted_symlinks_never_redirect_roots_writes(guest, tmp_path):
    transfers_despite_a_planter(guest, tmp_path, attacker="ozone")


def test_a_copy_into_a_users_folder_is_staged_where_only_root_can_write(guest, tmp_path):
    """The owner of /home/ozone could move a folder of root's out of it and put one of theirs
    in its place: the copy is written in /home (root's) and renamed into /home/ozone."""
    source = tmp_path / "payload"
    source.write_bytes(os.urandom(8 * MiB))
    source.chmod(0o640)
    child = subprocess.Popen(ozone_cmd("cp", str(source), f"{guest}:/home/ozone/"), env=ozone_env())
    try:
        wait_until(
            lambda: guest_sh(guest, "ls -A /home | grep '^[.]ozone-cp-' || true"),
            timeout=60,
            what="the copy's folder in /home",
        )
        assert ".ozone-cp-" not in guest_sh(guest, "ls -A /home/ozone")
        assert child.wait(timeout=120) == 0
    finally:
        child.kill()
    listing = guest_sh(guest, "ls -ln /home/ozone/payload; md5sum </home/ozone/payload")
    assert listing.split()[0] == "-rw-r-----" and listing.split()[2] == "0"
    assert listing.split()[-2] == hashlib.md5(source.read_bytes()).hexdigest()
    assert (
        guest_sh(guest, "rm /home/ozone/payload; ls -A /home | grep -c ozone-cp || true") == "0\n"
    )


def test_a_copy_never_follows_another_users_symlink(guest, tmp_path):
    guest_sh(guest, "echo 0 >/proc/sys/fs/protected_symlinks")
    try:
        guest_sh(guest, "ln -s /etc /tmp/evil", user="ozone")
        source = tmp_path / "payload"
        source.write_text("x\n")
        for target in ("/tmp/evil", "/tmp/evil/"):
            proc = run_ozone("cp", str(source), f"{guest}:{target}")
            assert proc.returncode == 1, proc.stderr
            assert "is a symlink of another user's" in proc.stderr
        assert "payload" not in guest_sh(guest, "ls /etc")
    finally:
        guest_sh(guest, "rm -f /tmp/evil; echo 1 >/proc/sys/fs/protected_symlinks")


def test_a_stage_folder_that_cannot_be_used_fails_fast_with_125(guest):
    for stage, words in (
        ("/nonexistent", "has no folder /nonexistent"),
        ("/home/ozone", "/home/ozone is not root's"),
    ):
        began = time.monotonic()
        proc = oz_exec(guest, "echo", "hi", options=("--stage-dir", stage))
        assert proc.returncode == 125
        assert words in proc.stderr.decode()
        assert "--stage-dir" in proc.stderr.decode()
        assert time.monotonic() - began < 30, "a refused stage must never hang"


def test_a_full_stage_folder_is_an_error_not_a_silent_success(guest):
    guest_sh(
        guest,
        "mkdir -p /srv/small && mount -t tmpfs -o size=64k,mode=1777 tmpfs /srv/small && "
        "dd if=/dev/zero of=/srv/small/fill bs=4k count=64 2>/dev/null; true",
    )
    try:
        for command in (["uname", "-r"], ["echo", "hello"]):
            proc = oz_exec(guest, *command, options=("--stage-dir", "/srv/small"))
            assert proc.returncode == 125, proc.stdout
            assert b"/srv/small" in proc.stderr and b"is full (0 KiB free)" in proc.stderr
        proc = oz_exec(guest, "cat", options=("-i", "--stage-dir", "/srv/small"), input=b"x")
        assert proc.returncode == 125
        assert b"cannot stage stdin in" in proc.stderr
        guest_sh(guest, "rm /srv/small/fill")
        proc = oz_exec(guest, "echo", "hello", options=("--stage-dir", "/srv/small"))
        assert (proc.returncode, proc.stdout) == (0, b"hello\n")
    finally:
        guest_sh(guest, "umount /srv/small; rmdir /srv/small")


def test_the_stage_folder_comes_from_the_config(vms):
    name, path = vms.config({"stage_dir": "/run"})
    ok(run_ozone("define", str(path)))
    ok(run_ozone("start", name, "--wait"))
    where = oz_exec(name, "sh", "-c", "readlink /proc/$$/fd/1")
    assert where.stdout.decode().startswith("/run/.ozone-exec/"), where
    where = oz_exec(name, "sh", "-c", "readlink /proc/$$/fd/1", options=("--stage-dir", "/tmp"))
    assert where.stdout.decode().startswith("/tmp/.ozone-exec/")


# --- faults -----------------------------------------------------------------------------------


def restart_libvirtd() -> None:
    pid = int(Path("/run/libvirtd.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=30, what="libvirtd to stop")
    repo = Path(__file__).resolve().parents[1]
    subprocess.run(
        [str(repo / "scripts/setup-host")],
        env={**os.environ, "SKIP_APT": "1"},
        capture_output=True,
        check=True,
        timeout=120,
    )


def test_a_libvirtd_restart_during_exec_is_not_called_a_stopped_vm(guest):
    marker = f"sleep {700 + os.getpid() % 200}"
    proc = subprocess.Popen(
        ozone_cmd("exec", guest, "--", "sh", "-c", f"echo started; {marker}; echo done"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ozone_env(),
    )
    try:
        assert proc.stdout.readline() == b"started\n"
        restart_libvirtd()
        assert proc.wait(timeout=120) == 125
        message = proc.stderr.read().decode()
    finally:
        proc.kill()
    assert "lost the connection to libvirt" in message
    assert "stopped the program" in message and "stopped while" not in message
    assert virsh("domstate", guest).strip() == "running"
    assert marker not in guest_sh(guest, "ps -o args"), "the guest program was left running"
    assert leftovers(guest) == []


def test_a_command_line_too_big_for_one_agent_request_goes_through_a_file(guest):
    args = [f"{i:04d}" + "y" * 996 for i in range(300)]
    proc = oz_exec(guest, "sh", "-c", 'echo $#; printf %s "${300}" | wc -c', "x", *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [b"300", b"1000"]
    assert oz_exec(guest, "echo", "next").stdout == b"next\n"  # the agent is fine after it
    assert leftovers(guest) == []


def test_failures_right_after_spawn_do_not_wait_for_the_vm(guest, monkeypatch):
    from ozone_libvirt import VM, execute
    from ozone_libvirt.errors import ExecFailed

    slept: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(execute.time, "sleep", lambda s: (slept.append(s), real_sleep(s)))
    with VM(guest, uri=URI) as vm:
        for options in ({"user": "nosuchuser"}, {"cwd": "/nonexistent"}):
            with pytest.raises(ExecFailed):
                vm.exec(["true"], **options)
    assert sum(slept) < 0.5, f"waited {sum(slept):.2f} s in all"


@pytest.mark.parametrize("timeout", ["0", "-1", "nan"])
def test_a_timeout_must_be_a_positive_number(guest, timeout):
    proc = oz_exec(guest, "true", options=("--timeout", timeout))
    assert proc.returncode == 2
    assert b"not a number of seconds above 0" in proc.stderr
    assert proc.stderr.count(b"\n") == 2  # error and hint, no traceback


# --- QMP on the host -----------------------------------------------------------------------


def test_auto_qmp_is_a_socket_only_root_and_qemu_can_open(vms):
    from .test_lifecycle import qmp_execute

    name, path = vms.config()
    endpoint = as_json("define", str(path))["qmp"]
    sock = Path(f"/var/lib/ozone/qmp/{name}.sock")
    assert endpoint == f"unix:{sock}"
    folder = sock.parent.stat()
    assert stat.S_IMODE(folder.st_mode) == 0o700
    assert folder.st_uid == int(subprocess.check_output(["id", "-u", "libvirt-qemu"]))
    ok(run_ozone("start", name))
    wait_until(sock.exists, timeout=30, what="QEMU's QMP socket")
    assert qmp_execute(endpoint, "query-name") == {"name": name}
    probe = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])"
    refused = subprocess.run(
        ["runuser", "-u", "nobody", "--", "python3", "-c", probe, str(sock)],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "PermissionError" in refused.stderr
    assert as_json("status", name)["warnings"] == []


def test_tcp_qmp_is_there_when_asked_for_with_a_warning(vms):
    name, path = vms.config({"qmp": "tcp"})
    endpoint = as_json("define", str(path))["qmp"]
    assert endpoint.startswith("tcp:127.0.0.1:")
    status = as_json("status", name)
    assert status["qmp"] == endpoint
    assert "every local user can reach it" in status["warnings"][0]
    shown = run_ozone("status", name)
    assert "warning: QMP on tcp:127.0.0.1:" in shown.stderr


def colliding_names(count: int) -> list[str]:
    """VM names whose preferred QMP port is the same (they would all want one port)."""
    from ozone_libvirt import domain_xml as dx

    by_port: dict[int, list[str]] = {}
    i = 0
    while True:
        name = f"ozt{os.getpid()}-q{i}"
        names = by_port.setdefault(dx.preferred_qmp_port(name), [])
        names.append(name)
        if len(names) == count:
            return names
        i += 1


def test_concurrent_defines_never_share_a_tcp_port(vms):
    names = colliding_names(6)
    paths = [vms.config({"name": n, "qmp": "tcp"})[1] for n in names]
    children = [
        subprocess.Popen(
            ozone_cmd("define", str(p), "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ozone_env(),
        )
        for p in paths
    ]
    endpoints = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        endpoints.append(json.loads(out)["qmp"])
    assert len(set(endpoints)) == len(endpoints), endpoints


def test_start_moves_a_chosen_port_that_another_program_took(vms):
    name, path = vms.config({"qmp": "tcp"})
    first = as_json("define", str(path))["qmp"]
    port = int(first.rsplit(":", 1)[1])
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        ok(run_ozone("start", name))
        moved = as_json("status", name)["qmp"]
    assert moved != first and moved.startswith("tcp:127.0.0.1:")
    assert json.loads(ok(run_ozone("qmp", name, "query-name")).stdout) == {"name": name}


# --- storage ------------------------------------------------------------------------------------


def define_raw(name: str, disks: list[tuple[str, str]]) -> None:
    """A domain made with virsh (not ozone): disks as (file, device)."""
    devices = "".join(
        f"<disk type='file' device='{device}'>"
        f"<driver name='qemu' type='{'qcow2' if file.endswith('.qcow2') else 'raw'}'/>"
        f"<source file='{file}'/><target dev='vd{chr(97 + i)}' bus='virtio'/></disk>"
        for i, (file, device) in enumerate(disks)
    )
    xml = (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os>"
        f"<devices>{devices}</devices></domain>"
    )
    subprocess.run(["virsh", "-c", URI, "define", "/dev/stdin"], input=xml.encode(), check=True)


def test_two_vms_never_get_one_disk(vms, workdir):
    first, path_a = vms.config({"disks": [{"path": "shared.qcow2", "size": "16MiB"}]})
    ok(run_ozone("define", str(path_a)))
    second, path_b = vms.config({"disks": ["shared.qcow2"]})
    proc = run_ozone("define", str(path_b))
    assert proc.returncode == 2
    assert f"is already used by VM {first} (disk)" in proc.stderr
    assert not domain_exists(second)


def test_remove_storage_refuses_disks_other_vms_need(vms, workdir):
    base = workdir / "base.qcow2"
    name, path = vms.config({"disks": [{"path": "base.qcow2", "size": "16MiB"}]})
    ok(run_ozone("define", str(path)))
    overlay = workdir / "other.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay)],
        check=True,
    )
    other = vms.name()
    define_raw(other, [(str(overlay), "disk")])
    proc = run_ozone("undefine", name, "--remove-storage")
    assert proc.returncode == 1
    assert f"VM {other} (backing image) uses it" in proc.stderr
    assert "nothing was changed" in proc.stderr
    assert base.exists() and domain_exists(name)


@pytest.mark.parametrize("kind", ["iso", "device"])
def test_remove_storage_refuses_isos_and_device_nodes(vms, workdir, kind):
    if kind == "iso":
        target = workdir / "copy.iso"
        target.write_bytes((GUEST_DIR / "ozone-guest.iso").read_bytes()[: 40 * 1024])
    else:
        target = Path("/dev/null")
    name = vms.name()
    define_raw(name, [(str(target), "disk")])
    proc = run_ozone("undefine", name, "--remove-storage")
    assert proc.returncode == 1
    assert ("it is an ISO image" if kind == "iso" else "not a regular file") in proc.stderr
    assert target.exists() and domain_exists(name)
    if kind == "device":
        assert stat.S_ISCHR(target.stat().st_mode)


# --- what a crash leaves --------------------------------------------------------------------------


@pytest.fixture
def run_config(vms, workdir: Path) -> Iterator[tuple[str, Path]]:
    iso = workdir / "guest.iso"
    iso.write_bytes((GUEST_DIR / "ozone-guest.iso").read_bytes())
    iso.chmod(0o644)
    base = workdir / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    base.chmod(0o640)
    os.chown(base, 0, int(subprocess.check_output(["id", "-g", "libvirt-qemu"])))
    name, path = vms.config({"cdrom": str(iso), "disks": ["base.qcow2"]})
    yield name, path
    for domain in virsh("list", "--all", "--name", check=False).split():
        if domain.startswith(f"{name}-run"):
            remove_domain(domain)


def run_leftovers(name: str, env: dict[str, str]) -> list[str]:
    domains = [d for d in virsh("list", "--all", "--name").split() if d.startswith(f"{name}-")]
    return domains + os.listdir(env["OZONE_RUN_DIR"])


def started_run(path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """An `ozone run` whose program has started (and sleeps)."""
    child = subprocess.Popen(
        ozone_cmd("run", "--no-cache", str(path), "--", "sh", "-c", "echo ready; sleep 300"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    if child.stdout.readline() != b"ready\n":
        child.kill()
        pytest.fail(f"ozone run did not start: {child.communicate()[1].decode()}")
    return child


def test_gc_removes_what_a_killed_run_left(run_config, run_env):
    name, path = run_config
    child = started_run(path, run_env)
    child.kill()
    child.wait()
    left = run_leftovers(name, run_env)
    assert len(left) == 2, left  # its VM and its overlay folder
    dry = as_json("gc", "--dry-run", env=run_env)
    assert any(left[0] in item for item in dry["removed"])
    assert run_leftovers(name, run_env) == left, "--dry-run removed something"
    done = as_json("gc", env=run_env)
    assert done["dry_run"] is False and len(done["removed"]) >= 2
    assert run_leftovers(name, run_env) == []


def test_the_next_run_reaps_a_killed_run_and_sigterm_exits_143(run_config, run_env):
    name, path = run_config
    child = started_run(path, run_env)
    child.kill()
    child.wait()
    assert len(run_leftovers(name, run_env)) == 2
    second = started_run(path, run_env)
    try:
        assert len(run_leftovers(name, run_env)) == 2, "the dead run's VM is still there"
        second.terminate()
        assert second.wait(timeout=120) == 143
    finally:
        second.kill()
    assert run_leftovers(name, run_env) == []


def test_runs_keep_the_owner_and_mode_of_base_images(run_config, run_env, workdir):
    _name, path = run_config
    before = {p: p.stat() for p in (workdir / "base.qcow2", workdir / "guest.iso")}
    for extra in (["--no-cache"], []):
        ok(run_ozone("run", *extra, str(path), "--", "true", env=run_env))
    for image, info in before.items():
        now = image.stat()
        assert (now.st_uid, now.st_gid, now.st_mode) == (info.st_uid, info.st_gid, info.st_mode)


def test_a_failed_cache_fill_leaves_no_empty_entry(run_config, run_env):
    name, path = run_config
    proc = run_ozone("run", "--boot-timeout", "1", str(path), "--", "true", env=run_env)
    assert proc.returncode == 125
    assert as_json("cache", "list", env=run_env) == []
    assert os.listdir(run_env["OZONE_CACHE_DIR"]) == []
    assert run_leftovers(name, run_env) == []


def test_gc_closes_the_stdin_of_a_program_a_killed_exec_left(guest):
    """`ozone exec -i` killed: its program waits for more stdin forever. gc closes its stdin;
    the program ends, and its run folder goes."""
    child = subprocess.Popen(
        ozone_cmd("exec", "-i", guest, "--", "sh", "-c", "echo started; cat >/dev/null; echo eof"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=ozone_env(),
    )
    assert child.stdout.readline() == b"started\n"
    child.kill()
    child.wait()
    assert len(leftovers(guest)) == 1
    first = as_json("gc")
    assert any("its program still runs" in item for item in first["kept"]), first
    wait_until(lambda: not leftovers(guest), timeout=30, what="the program to end")
    second = as_json("gc")
    assert not any(guest in item for item in second["kept"]), second


def host_parts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".ozone-part-" in p.name)


def test_an_interrupted_copy_out_is_cleaned_up(guest, tmp_path):
    guest_sh(guest, "head -c 33554432 /dev/urandom >/tmp/big")
    try:
        for sig, code in ((signal.SIGTERM, 143), (signal.SIGKILL, -9)):
            child = subprocess.Popen(
                ozone_cmd("cp", f"{guest}:/tmp/big", str(tmp_path / "big")),
                stderr=subprocess.PIPE,
                env=ozone_env(),
            )
            wait_until(lambda: host_parts(tmp_path), timeout=60, what="the copy to begin")
            child.send_signal(sig)
            assert child.wait(timeout=60) == code
            if sig == signal.SIGTERM:
                assert host_parts(tmp_path) == [], "SIGTERM must clean up"
        stale = host_parts(tmp_path)
        assert len(stale) == 1  # SIGKILL leaves one
        as_json("gc", "--dry-run")
        assert host_parts(tmp_path) == stale
        # the next copy into that folder removes it (once it is older than a moment)
        part = tmp_path / stale[0]
        os.utime(part, (time.time() - 60, time.time() - 60))
        ok(run_ozone("cp", f"{guest}:/etc/passwd", str(tmp_path / "passwd")))
        assert host_parts(tmp_path) == []
    finally:
        guest_sh(guest, "rm -f /tmp/big")


def test_gc_removes_a_copy_killed_halfway(guest, tmp_path):
    guest_sh(guest, "head -c 16777216 /dev/urandom >/tmp/big2")
    try:
        child = subprocess.Popen(
            ozone_cmd("cp", f"{guest}:/tmp/big2", str(tmp_path / "big")), env=ozone_env()
        )
        wait_until(lambda: host_parts(tmp_path), timeout=60, what="the copy to begin")
        child.kill()
        child.wait()
        assert len(host_parts(tmp_path)) == 1
        result = as_json("gc")
        assert any(".ozone-part-" in item for item in result["removed"])
        assert host_parts(tmp_path) == []
    finally:
        guest_sh(guest, "rm -f /tmp/big2")


def test_a_copy_in_killed_halfway_is_removed_by_the_next_copy(guest, tmp_path):
    source = tmp_path / "payload"
    source.write_bytes(os.urandom(16 * MiB))
    child = subprocess.Popen(ozone_cmd("cp", str(source), f"{guest}:/tmp/"), env=ozone_env())
    wait_until(lambda: leftovers(guest, "/tmp"), timeout=60, what="the copy's folder in the guest")
    child.kill()
    child.wait()
    assert len(leftovers(guest, "/tmp")) == 1
    small = tmp_path / "small"
    small.write_text("hello\n")
    ok(run_ozone("cp", str(small), f"{guest}:/tmp/"))
    assert leftovers(guest, "/tmp") == []
    assert guest_sh(guest, "cat /tmp/small; rm -f /tmp/small /tmp/payload") == "hello\n"


# --- set-up ---------------------------------------------------------------------------------------


def test_setup_host_starts_libvirtd_when_only_an_impostor_runs(tmp_path):
    """setup-host asks qemu:///system, not the process table: another program called
    libvirtd (a second libvirt host, say) must not stop it from starting the real one."""
    impostor = tmp_path / "libvirtd"
    impostor.write_bytes(Path("/bin/sleep").read_bytes())
    impostor.chmod(0o755)
    fake = subprocess.Popen([str(impostor), "600"])
    try:
        pid = int(Path("/run/libvirtd.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=30, what="libvirtd to stop")
        restart_libvirtd_only = subprocess.run(
            [str(Path(__file__).resolve().parents[1] / "scripts/setup-host")],
            env={**os.environ, "SKIP_APT": "1"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert restart_libvirtd_only.returncode == 0, restart_libvirtd_only.stderr
    finally:
        fake.kill()
        fake.wait()
    assert subprocess.run(["virsh", "-c", URI, "version"], capture_output=True).returncode == 0
