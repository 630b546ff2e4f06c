"""A real distro guest from the README's "Real guests" section: examples/debian.yaml, a
Debian 12 systemd image built by ozone from Debian packages and configured by cloud-init on
first boot. Everything `ozone` promises is checked on it: cloud-init's effects (once, also
after a reboot), exec with util-linux/coreutils/dash, cp, snapshots, agent shutdown, the
boot cache, and the image store's bookkeeping."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .conftest import PREFIX, REPO, WORK_ROOT, ozone_cmd, ozone_env, remove_domain, run_ozone

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest]

STORE = Path(os.environ.get("OZONE_IMAGE_DIR", REPO / "build" / "images"))
EXAMPLE = REPO / "examples" / "debian.yaml"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE1hZGVCeU96b25lVGVzdHM0VGhlRGViaWFuR3Vlc3Q test@ozone"


def env() -> dict[str, str]:
    return ozone_env(OZONE_IMAGE_DIR=str(STORE))


def oz(*args: str, timeout: float = 300, input: bytes | None = None):
    return run_ozone(*args, env=env(), timeout=timeout, input=input)


def oz_bytes(*args: str, input: bytes | None = None, timeout: float = 120):
    return subprocess.run(
        ozone_cmd(*args), input=input, capture_output=True, env=env(), timeout=timeout, check=False
    )


def sh(name: str, script: str, *, user: str | None = None) -> str:
    options = ("-u", user) if user else ()
    proc = oz_bytes("exec", *options, name, "--", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode()


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    path = WORK_ROOT / f"real-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def image(libvirtd: str) -> dict:
    """The example's image, built unless the store has it (`make test` builds it first)."""
    proc = oz("image", "build", str(EXAMPLE), "--json", timeout=1200)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return json.loads(proc.stdout)


def config_for(workdir: Path, suffix: str, **changes: object) -> tuple[str, Path]:
    data = yaml.safe_load(EXAMPLE.read_text())
    name = f"{PREFIX}{suffix}"
    data["name"] = name
    data["cloud_init"]["users"][0]["ssh_authorized_keys"] = [KEY]
    # counts its runs: cloud-init runs runcmd once per instance, not per boot
    data["cloud_init"]["runcmd"].append("echo ran >> /var/lib/runcmd-count")
    data.update(changes)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return name, path


def seed_of(path: Path) -> Path:
    """The cloud-init seed a config gets (from the XML ozone makes for it)."""
    from lxml import etree

    root = etree.fromstring(oz("xml", str(path)).stdout.encode())
    (source,) = root.xpath("devices/disk[readonly]/source/@file")
    return Path(source)


def remove_vm(name: str, path: Path) -> None:
    seed = seed_of(path)
    oz("undefine", name, "--remove-storage", "--force")
    remove_domain(name)
    (STORE / f"{name}.root.qcow2").unlink(missing_ok=True)
    assert seed.name.startswith("seed-")
    seed.unlink(missing_ok=True)  # seeds stay with undefine (shared); this one is the test's


# first in the file: it boots its own throwaway VMs before the module's VM exists
def test_run_cold_then_warm_from_the_boot_cache(image, workdir):
    _name, path = config_for(workdir, "debrun")
    script = "gcc --version | head -1; id -un dev; cat /var/lib/runcmd-count; cloud-init status"
    try:
        began = time.monotonic()
        cold = oz(
            "-v", "run", str(path), "--boot-timeout", "600", "--", "sh", "-c", script, timeout=900
        )
        cold_s = time.monotonic() - began
        assert cold.returncode == 0, cold.stderr
        assert "boot cache miss" in cold.stderr
        lines = cold.stdout.splitlines()
        assert lines[0].startswith("gcc (Debian"), cold.stdout
        assert lines[1:] == ["dev", "ran", "status: done"], cold.stdout
        began = time.monotonic()
        warm = oz("-v", "run", str(path), "--", "sh", "-c", script, timeout=300)
        warm_s = time.monotonic() - began
        assert warm.returncode == 0, warm.stderr
        assert "boot cache hit" in warm.stderr
        assert warm.stdout == cold.stdout  # the same booted, cloud-init-ed guest
        print(f"\nozone run on Debian: cold {cold_s:.1f} s, warm {warm_s:.1f} s")
        # the cache key covers the image and the seed: another seed is another entry
        entries = json.loads(oz("cache", "list", "--json").stdout)
        mine = [e for e in entries if e["config"] == str(path)]
        assert len(mine) == 1
        files = mine[0]["files"]
        assert image["path"] in files
        assert any(Path(f).name.startswith("seed-") for f in files)
    finally:
        oz("cache", "clear", str(path))
        seed_of(path).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def debian(image, workdir) -> Iterator[str]:
    name, path = config_for(workdir, "deb")
    try:
        proc = oz("define", str(path))
        assert proc.returncode == 0, proc.stderr
        proc = oz("start", name, "--wait", "--timeout", "600", timeout=660)
        assert proc.returncode == 0, proc.stderr
        yield name
    finally:
        remove_vm(name, path)
    assert image["path"] and Path(image["path"]).is_file()  # never removed with the VM


def test_cloud_init_did_its_work(debian):
    out = sh(debian, "cloud-init status; hostname; getent passwd dev; cat /etc/motd")
    status, hostname, passwd, motd = out.splitlines()
    assert status == "status: done"
    assert hostname == "debian"
    assert passwd.startswith("dev:x:1000:1000:") and passwd.endswith(":/home/dev:/bin/bash")
    assert motd == "hello from ozone"
    keys = sh(debian, "cat ~/.ssh/authorized_keys", user="dev")
    assert KEY in keys
    assert sh(debian, "sudo -n id -u", user="dev") == "0\n"  # sudo: true
    assert sh(debian, "test -f /var/lib/first-boot-done && cat /var/lib/runcmd-count") == "ran\n"
    # the file system grew to the 8 GiB disk, DHCP gave the user-net address
    assert int(sh(debian, "df --output=size -B1G / | tail -1")) >= 7
    assert "10.0.2.15/24" in sh(debian, "ip -br -4 addr show")
    # `ozone ip` asks the agent: on user-mode networking nothing else knows the address
    proc = oz("ip", debian, "--json")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["source"] == "agent"
    addresses = [a for i in found["interfaces"] for a in i["addresses"]]
    assert "10.0.2.15/24" in addresses
    assert not [a for a in addresses if a.startswith(("127.", "::1/"))]


def test_exec_on_a_debian_userland(debian):
    assert sh(debian, "id -u", user="dev") == "1000\n"
    proc = oz_bytes("exec", "-u", "dev", debian, "--", "id", "-u")  # options of its own
    assert (proc.returncode, proc.stdout) == (0, b"1000\n"), proc.stderr
    proc = oz_bytes(
        "exec",
        "-w",
        "/usr/share",
        "-e",
        "GREETING=hi there",
        debian,
        "--",
        "sh",
        "-c",
        'pwd; echo "$GREETING"',
    )
    assert proc.stdout == b"/usr/share\nhi there\n", proc.stderr
    proc = oz_bytes("exec", "-i", debian, "--", "sha256sum", input=b"x" * 300_000)
    assert proc.stdout.split()[0].decode() == hashlib.sha256(b"x" * 300_000).hexdigest()
    assert oz_bytes("exec", debian, "--", "sh", "-c", "exit 7").returncode == 7
    assert oz_bytes("exec", debian, "--", "sh", "-c", 'kill -TERM "$$"').returncode == 143
    proc = oz_bytes("exec", "--timeout", "2", debian, "--", "sleep", "30")
    assert proc.returncode == 124, proc.stderr
    assert sh(debian, "pgrep -x sleep || echo none") == "none\n"  # the timeout killed it


def test_cp_both_ways_as_the_user(debian, tmp_path):
    data = os.urandom(1 << 20)
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    proc = oz_bytes("cp", str(source), f"{debian}:/home/dev/in.bin")
    assert proc.returncode == 0, proc.stderr
    sh(debian, "chown dev:dev /home/dev/in.bin")
    assert sh(debian, "stat -c %U:%s /home/dev/in.bin") == f"dev:{len(data)}\n"
    back = tmp_path / "out.bin"
    proc = oz_bytes("cp", f"{debian}:/home/dev/in.bin", str(back))
    assert proc.returncode == 0, proc.stderr
    assert back.read_bytes() == data


def test_image_store_knows_the_vm_and_keeps_its_image(debian, image):
    listed = {i["id"]: i for i in json.loads(oz("image", "list", "--json").stdout)}
    assert debian in listed[image["id"]]["used_by"]
    proc = oz("image", "rm", image["id"])
    assert proc.returncode == 1 and debian in proc.stderr, proc.stderr
    assert Path(image["path"]).is_file()


def test_snapshot_revert(debian):
    assert oz("snapshot", "create", debian, "before").returncode == 0
    sh(debian, "echo changed > /root/after-snapshot; sync")
    proc = oz("snapshot", "revert", debian, "before")
    assert proc.returncode == 0, proc.stderr
    assert sh(debian, "test -e /root/after-snapshot && echo there || echo gone") == "gone\n"
    assert oz("snapshot", "delete", debian, "before").returncode == 0


def test_agent_shutdown_and_the_next_boot_keeps_the_instance(debian, workdir):
    """The guest stops through its agent (systemd and dbus answer qemu-ga's shutdown), and
    the instance cloud-init keys its once-per-instance work by (runcmd) is the one in the
    seed that a define of the unchanged config keeps attaching: a next boot is the same
    instance and runs runcmd no more. (Booting it again here would cost ~90 s of CI for
    cloud-init's own rule.)"""
    import io

    import pycdlib

    seen = sh(debian, "cat /var/lib/cloud/data/instance-id").strip()
    assert seen.startswith("ozone-")
    proc = oz("stop", debian, "--json", timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["method"] == "agent"
    path = workdir / f"{debian}.yaml"
    again = oz("define", str(path), "--json")
    assert json.loads(again.stdout)["changed"] is False, again.stdout + again.stderr
    iso, meta = pycdlib.PyCdlib(), io.BytesIO()
    iso.open(str(seed_of(path)))
    try:
        iso.get_file_from_iso_fp(meta, rr_path="/meta-data")
    finally:
        iso.close()
    assert json.loads(meta.getvalue())["instance-id"] == seen
