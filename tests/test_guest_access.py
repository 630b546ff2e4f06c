"""Reaching into a real Debian guest like a dev box (README "Working in a guest"): `ozone
ssh` with the VM's own key and with a key made here, a guest service through a forwarded
port, host folders shared read-write and read-only through virtio-fs, `ozone ip`.

The VM is examples/debian.yaml's (the same image, built once per run) with ports and shares.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .conftest import GUEST_DIR, PREFIX, REPO, WORK_ROOT, ozone_cmd, ozone_env, wait_until
from .test_real_guest import remove_vm

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest]

STORE = Path(os.environ.get("OZONE_IMAGE_DIR", REPO / "build" / "images"))
EXAMPLE = REPO / "examples" / "debian.yaml"
STATE = Path("/var/lib/ozone")  # the tests run as root


def oz(*args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess[str]:
    env = ozone_env(OZONE_IMAGE_DIR=str(STORE), **extra)
    return subprocess.run(
        ozone_cmd(*args), capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def sh(name: str, script: str) -> str:
    proc = oz("exec", name, "--", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Box:
    name: str
    config: Path
    port: int  # the host port forwarded to the guest's port 8000
    key: Path  # a private key made by the test, authorised for dev
    shared: Path  # shared read-write, at /srv/rw
    published: Path  # shared read-only, at /srv/ro


@pytest.fixture(scope="module")
def box(libvirtd: str) -> Iterator[Box]:
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    work = WORK_ROOT / f"access-{uuid.uuid4().hex[:8]}"
    work.mkdir(mode=0o755)
    shared, published = work / "rw", work / "ro"
    shared.mkdir(mode=0o755)
    published.mkdir(mode=0o755)
    (published / "index.html").write_text("served from the host\n")
    key = work / "id_test"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    name = f"{PREFIX}access"
    data = yaml.safe_load(EXAMPLE.read_text())
    data["name"] = name
    data["cloud_init"]["users"][0]["ssh_authorized_keys"] = [
        key.with_suffix(".pub").read_text().strip()
    ]
    port = free_port()
    data["ports"] = [f"127.0.0.1:{port}:8000"]
    data["shares"] = [
        {"host": str(shared), "guest": "/srv/rw"},
        {"host": str(published), "guest": "/srv/ro", "readonly": True},
    ]
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(data))
    try:
        proc = oz("define", str(config))
        assert proc.returncode == 0, proc.stderr
        proc = oz("start", name, "--wait", "--timeout", "600", timeout=660)
        assert proc.returncode == 0, proc.stderr
        yield Box(name, config, port, key, shared, published)
    finally:
        remove_vm(name, config)
        shutil.rmtree(work, ignore_errors=True)
    assert not (STATE / "ssh" / name).exists()  # undefine forgets the VM's key


def test_ssh_logs_in_as_the_cloud_init_user_with_the_vms_own_key(box):
    proc = oz("ssh", box.name, "--", "id", "-un")
    assert (proc.returncode, proc.stdout) == (0, "dev\n"), proc.stderr
    known = STATE / "ssh" / box.name / "known_hosts"
    assert len(known.read_text().splitlines()) == 1  # filled on first contact
    assert known.parent.stat().st_mode & 0o777 == 0o700  # the VM's folder: no one else's
    proc = oz("ssh", box.name, "--", "exit 7")  # the exit status is ssh's (the command's)
    assert proc.returncode == 7, proc.stderr
    assert "Permanently added" not in proc.stderr  # known now: no new entry
    status = json.loads(oz("status", box.name, "--json").stdout)
    host, port = status["ssh"].split(":")
    assert host == "127.0.0.1" and int(port) != box.port


def test_ssh_with_a_key_made_by_the_test(box, tmp_path):
    # a state folder without the VM's key: only the test's key can log in
    state = str(tmp_path / "state")
    proc = oz("ssh", "-i", str(box.key), box.name, "--", "id", "-un", OZONE_STATE_DIR=state)
    assert (proc.returncode, proc.stdout) == (0, "dev\n"), proc.stderr
    proc = oz("ssh", box.name, "--", "true", OZONE_STATE_DIR=state)
    assert proc.returncode == 255
    assert f"{box.name} takes no key of ours for user dev" in proc.stderr, proc.stderr


def test_a_guest_service_through_a_forwarded_port(box):
    sh(box.name, "cd /srv/ro && nohup python3 -m http.server 8000 >/dev/null 2>&1 &")

    def fetch() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{box.port}/index.html", timeout=5) as r:
                return r.read().decode()
        except OSError:
            return None

    assert wait_until(fetch, timeout=60, what="the guest's web server") == "served from the host\n"


def test_host_folders_shared_both_ways_and_read_only(box):
    (box.shared / "from-host.txt").write_text("written on the host\n")
    assert sh(box.name, "cat /srv/rw/from-host.txt") == "written on the host\n"
    sh(box.name, "echo written in the guest > /srv/rw/from-guest.txt; sync")
    assert (box.shared / "from-guest.txt").read_text() == "written in the guest\n"
    assert sh(box.name, "cat /srv/ro/index.html") == "served from the host\n"
    proc = oz("exec", box.name, "--", "sh", "-c", "echo x > /srv/ro/new.txt")
    assert proc.returncode != 0 and "Read-only file system" in proc.stderr, proc.stderr
    # systemd mounts them in parallel: in either order
    mounts = sorted(sh(box.name, "findmnt -rn -t virtiofs -o TARGET,SOURCE,OPTIONS").splitlines())
    assert [m.split()[:2] for m in mounts] == [["/srv/ro", "share1"], ["/srv/rw", "share0"]]
    assert mounts[0].split()[2].startswith("ro,") and mounts[1].split()[2].startswith("rw,")
    # read-only on the host: the guest's root cannot remount its way past it
    proc = oz(
        "exec",
        box.name,
        "--",
        "sh",
        "-c",
        "mount -o remount,rw /srv/ro && echo x > /srv/ro/new.txt",
    )
    assert proc.returncode != 0 and "Read-only file system" in proc.stderr, proc.stderr
    assert not (box.published / "new.txt").exists()
    shares = json.loads(oz("status", box.name, "--json").stdout)["shares"]
    assert [(s["guest"], s["readonly"], s["enforced_by"], s["via"]) for s in shares] == [
        ("/srv/rw", False, None, "virtio-fs"),
        ("/srv/ro", True, "host", "virtio-fs"),
    ]
    assert shares[1]["fstab"] == "share1 /srv/ro virtiofs ro,nofail 0 0"


def test_ip_lists_the_user_net_address(box):
    proc = oz("ip", box.name, "--json")
    assert proc.returncode == 0, proc.stderr
    addresses = [a for i in json.loads(proc.stdout)["interfaces"] for a in i["addresses"]]
    assert "10.0.2.15/24" in addresses


def test_a_second_vm_gets_its_own_ssh_port_and_not_a_taken_host_port(box, tmp_path):
    base = {"memory": "256MiB", "cdrom": str(GUEST_DIR / "ozone-guest.iso")}
    other = f"{PREFIX}access2"
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps({**base, "name": other, "ports": [f"{box.port}:80"]}))
    proc = oz("define", str(clash))
    assert proc.returncode == 2, proc.stderr
    assert (
        f"ports[0]: host port 127.0.0.1:{box.port}/tcp is already forwarded to VM "
        f"'{box.name}'" in proc.stderr
    )
    assert oz("status", other).returncode != 0  # nothing was defined
    fine = tmp_path / "fine.json"
    fine.write_text(json.dumps({**base, "name": other}))
    try:
        assert oz("define", str(fine)).returncode == 0
        ours = json.loads(oz("status", box.name, "--json").stdout)["ssh"]
        theirs = json.loads(oz("status", other, "--json").stdout)["ssh"]
        assert theirs and ours and theirs != ours
    finally:
        oz("undefine", other)


def test_saving_a_vm_with_shares_is_refused_with_the_reason(box):
    for args in (("snapshot", "create", box.name, "s1"), ("save", box.name)):
        proc = oz(*args)
        assert proc.returncode == 1, proc.stderr
        assert "shares host folders (virtio-fs), and QEMU cannot save" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert json.loads(oz("status", box.name, "--json").stdout)["state"] == "running"
