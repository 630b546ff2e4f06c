"""exec, cp and storage on a real distribution guest: Debian 12 with systemd, util-linux and
users `builder` (1000) and `other` (1001), built by scripts/build-debian-image. What the
busybox test guest would forgive (busybox su, /tmp on tmpfs, no /dev/stderr, no reserved
blocks) is proven here."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import (
    PREFIX,
    REPO,
    WORK_ROOT,
    guest_sh,
    leftovers,
    oz_exec,
    ozone_cmd,
    ozone_env,
    remove_domain,
    run_ozone,
    transfers_despite_a_planter,
    virsh,
    wait_until,
)

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest]

DEBIAN_DIR = Path(os.environ.get("OZONE_DEBIAN_DIR", REPO / "build" / "debian"))
MiB = 1 << 20


@pytest.fixture(scope="module")
def debian(libvirtd: str) -> Iterator[str]:
    """One Debian guest for this module: an overlay over the built image (never written)."""
    image = DEBIAN_DIR / "debian.qcow2"
    for path in (image, DEBIAN_DIR / "vmlinuz", DEBIAN_DIR / "initrd.img"):
        if not path.is_file():
            pytest.fail(f"{path} is missing: run scripts/build-debian-image")
    workdir = WORK_ROOT / f"debian-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True, mode=0o755)
    name = f"{PREFIX}debian"
    config = {
        "name": name,
        "memory": "1GiB",
        "vcpus": 2,
        "kernel": str(DEBIAN_DIR / "vmlinuz"),
        "initrd": str(DEBIAN_DIR / "initrd.img"),
        "cmdline": "root=/dev/vda rw console=ttyS0",
        "disks": [{"path": "root.qcow2", "backing": str(image)}],
        "network": "none",
    }
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config))
    before = image.stat()
    try:
        proc = run_ozone("define", str(path))
        assert proc.returncode == 0, proc.stderr
        proc = run_ozone("start", name, "--wait", "--timeout", "300", timeout=360)
        assert proc.returncode == 0, proc.stderr
        # the agent answers before boot has finished: wait for systemd to settle
        wait_until(
            lambda: (
                oz_exec(name, "systemctl", "is-system-running").stdout.strip()
                in (b"running", b"degraded")
            ),
            timeout=180,
            what="systemd to finish booting",
        )
        yield name
    finally:
        remove_domain(name)
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    after = image.stat()
    assert (after.st_uid, after.st_mode) == (before.st_uid, before.st_mode), (
        "the base image's owner or mode changed"
    )


def test_systemd_runs_and_exit_status_and_streams_pass_through(debian):
    assert oz_exec(debian, "systemctl", "is-system-running").stdout.strip() == b"running"
    proc = oz_exec(debian, "bash", "-c", "echo out; echo err >&2; exit 7")
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, b"out\n", b"err\n")


def test_user_programs_keep_their_own_options_util_linux(debian):
    """util-linux su would read `id -u`'s -u as its own: the program's options stay its own."""
    proc = oz_exec(debian, "id", "-u", options=("-u", "builder"))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"1000\n", b"")
    proc = oz_exec(
        debian,
        "bash",
        "-c",
        'echo "$HOME $(pwd)"; echo to-stderr >/dev/stderr; echo again >&2',
        options=("-u", "builder", "-w", "/tmp"),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"/home/builder /tmp\n"
    assert proc.stderr.endswith(b"again\n")


def test_output_is_staged_in_var_tmp_on_disk(debian):
    where = guest_sh(
        debian, 'readlink /proc/$$/fd/1; findmnt -no FSTYPE -T "$(readlink /proc/$$/fd/1)"'
    )
    path, fstype = where.split()
    assert path.startswith("/var/tmp/.ozone-exec/") and path.endswith("/out")
    assert fstype == "ext4"


def test_other_users_cannot_reach_a_users_staged_io(debian):
    """builder's program owns its output and stdin (it may reopen them); the folders are
    root's, mode 0700, and user `other` reaches nothing in them."""
    script = "stat -L -c '%U %a' /proc/$$/fd/1 /proc/$$/fd/0; readlink /proc/$$/fd/1"
    proc = oz_exec(debian, "bash", "-c", script, options=("-i", "-u", "builder"), input=b"x")
    assert proc.returncode == 0, proc.stderr
    out, stdin, where = proc.stdout.decode().splitlines()
    assert (out, stdin) == ("builder 600", "builder 600")
    assert where.startswith("/var/tmp/.ozone-exec/")
    assert guest_sh(debian, "stat -c '%U %a' /var/tmp/.ozone-exec") == "root 700\n"
    probe = r"""
d=$(readlink /proc/$$/fd/1); d=${d%/*}
runuser -u other -- sh -c "ls ${d%/*}; ls $d; cat $d/out; echo evil >$d/in.0" 2>&1 |
  sed 's/.*: //' | sort -u
"""
    proc = oz_exec(debian, "bash", "-c", probe)
    assert proc.stdout.decode().split("\n")[:-1] == ["Permission denied"]


def test_symlinks_planted_by_another_user_are_never_followed(debian, tmp_path):
    transfers_despite_a_planter(debian, tmp_path, attacker="other")


def test_cp_both_ways_with_modes(debian, tmp_path):
    source = tmp_path / "tool"
    source.write_bytes(os.urandom(8 * MiB))
    source.chmod(0o750)
    assert run_ozone("cp", str(source), f"{debian}:/usr/local/bin/").returncode == 0
    assert guest_sh(debian, "stat -c %a /usr/local/bin/tool").strip() == "750"
    back = tmp_path / "back"
    assert run_ozone("cp", f"{debian}:/usr/local/bin/tool", str(back)).returncode == 0
    assert back.read_bytes() == source.read_bytes()
    assert oct(back.stat().st_mode & 0o777) == "0o750"
    guest_sh(debian, "rm /usr/local/bin/tool")


def test_a_users_full_disk_is_reported_even_where_root_still_has_room(debian):
    """ext4 keeps blocks for root: a user's writes fail while root's still work. The stage
    check must look from the user's side."""
    guest_sh(
        debian,
        "modprobe loop; truncate -s 24M /var/tmp/small.img && mkfs.ext4 -qF -m 20 /var/tmp/small.img"
        " && mkdir -p /mnt/small && mount -o loop /var/tmp/small.img /mnt/small"
        " && chmod 1777 /mnt/small",
    )
    try:
        oz_exec(
            debian,
            "dd",
            "if=/dev/zero",
            "of=/mnt/small/fill",
            "bs=1M",
            options=("-u", "builder"),
        )
        proc = oz_exec(debian, "echo", "hi", options=("-u", "builder", "--stage-dir", "/mnt/small"))
        assert proc.returncode == 125, proc
        assert b"/mnt/small" in proc.stderr and b"is full" in proc.stderr
        proc = oz_exec(debian, "echo", "hi", options=("--stage-dir", "/mnt/small"))
        assert (proc.returncode, proc.stdout) == (0, b"hi\n")  # root's writes still work
    finally:
        guest_sh(debian, "umount /mnt/small; rm -f /var/tmp/small.img")


def test_a_copy_cut_by_a_guest_crash_is_removed_by_the_next_copy(debian, tmp_path):
    source = tmp_path / "payload"
    source.write_bytes(os.urandom(16 * MiB))
    child = subprocess.Popen(ozone_cmd("cp", str(source), f"{debian}:/var/tmp/"), env=ozone_env())
    try:
        wait_until(
            lambda: leftovers(debian, "/var/tmp"), timeout=120, what="the copy's guest folder"
        )
        guest_sh(debian, "sync")  # the copy's folder is on the disk, not just in memory
        virsh("destroy", debian)  # the guest dies mid-copy
        assert child.wait(timeout=60) == 1
    finally:
        child.kill()
    assert run_ozone("start", debian, "--wait", "--timeout", "300", timeout=360).returncode == 0
    left = leftovers(debian, "/var/tmp")
    assert len([f for f in left if f.startswith(".ozone-cp-")]) == 1  # on disk: it survived
    small = tmp_path / "small"
    small.write_text("hello\n")
    assert run_ozone("cp", str(small), f"{debian}:/var/tmp/").returncode == 0
    assert guest_sh(debian, "cat /var/tmp/small; rm /var/tmp/small") == "hello\n"
    # the journal may also have brought back stage folders of execs that ended just before
    # the crash, some half-removed: a run removes those of other boots at once, empty ones
    # once they are a minute old (here, made to look it)
    guest_sh(debian, "touch -d '2 minutes ago' /var/tmp/.ozone-exec-* 2>/dev/null; true")
    assert leftovers(debian, "/var/tmp") == []
