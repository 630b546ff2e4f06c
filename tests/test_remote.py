"""Every command over a remote URI: a second libvirt host on this machine (its own mount
namespace, reached over qemu+tcp; see scripts/second-host). What belongs to the VM's host
(disks, copies of the ISO and kernels, images, seeds, serial logs) is made there through
libvirt's storage API and is absent from this machine's file system; what ozone wrote here
(a config's folder, its disk paths) is never where that host's files go."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import (
    GUEST_DIR,
    PREFIX,
    READY_LINE,
    REPO,
    on_second_host,
    ozone_env,
    run_ozone,
    wait_until,
)

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest]

VMS = Path("/var/lib/ozone/vms")
FILES = Path("/var/lib/ozone/files")


def there(uri: str, *args: str, env: dict[str, str] | None = None, timeout: float = 180):
    """`ozone -c URI ARGS…` on the second host."""
    return run_ozone("-c", uri, *args, env=env, timeout=timeout)


def virsh_there(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=60, check=False
    )


def has_file_there(path: Path | str) -> bool:
    return on_second_host("test", "-f", str(path)).returncode == 0


def copy_of_the_iso(uri: str, name: str) -> str:
    sources = virsh_there(uri, "domblklist", name).stdout.split()
    return next(word for word in sources if word.startswith(str(FILES)))


def forget_there(uri: str, name: str) -> None:
    virsh_there(uri, "destroy", name)
    virsh_there(uri, "undefine", name, "--managed-save", "--snapshots-metadata")
    for path in (VMS / f"{name}-disk.qcow2",):
        virsh_there(uri, "vol-delete", str(path))


@pytest.fixture(scope="module")
def remote_vm(second_host: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tiny guest with a disk of its own, defined and started over the remote URI."""
    folder = tmp_path_factory.mktemp("remote")
    name = f"{PREFIX}remote"
    config = {
        "name": name,
        "memory": "256MiB",
        "disks": [{"path": "disk.qcow2", "size": "64MiB"}],
        "cdrom": str(GUEST_DIR / "ozone-guest.iso"),
        "boot": ["cdrom", "disk"],
        "network": "user",
    }
    (folder / f"{name}.json").write_text(json.dumps(config))
    try:
        proc = there(second_host, "define", str(folder / f"{name}.json"))
        assert proc.returncode == 0, proc.stderr
        yield name
    finally:
        forget_there(second_host, name)


def test_define_makes_the_disk_and_copies_the_iso_on_that_host_only(second_host, remote_vm):
    disk = VMS / f"{remote_vm}-disk.qcow2"
    assert has_file_there(disk)
    assert not disk.exists()  # this machine's /var/lib/ozone is not that host's
    iso = copy_of_the_iso(second_host, remote_vm)
    assert Path(iso).name.startswith("ozone-guest-") and has_file_there(iso)
    assert not Path(iso).exists()
    # QEMU's there, and nobody else's: a copied file may be private
    assert on_second_host("stat", "-c", "%a %U", iso).stdout.split() == ["400", "libvirt-qemu"]
    # the ISO's copy has the ISO's bytes
    digest = on_second_host("sha256sum", iso).stdout.split()[0]
    local = subprocess.run(
        ["sha256sum", str(GUEST_DIR / "ozone-guest.iso")], capture_output=True, text=True
    ).stdout.split()[0]
    assert digest == local
    # nothing changed: a second define leaves the definition alone, and diff is empty
    config = json.loads(there(second_host, "status", remote_vm, "--json").stdout)["source"]
    again = there(second_host, "define", str(config), "--json")
    assert json.loads(again.stdout)["changed"] is False, again.stdout + again.stderr
    diff = there(second_host, "diff", remote_vm)
    assert (diff.returncode, diff.stdout) == (0, ""), diff.stdout + diff.stderr


def test_start_exec_cp_logs_qmp_on_that_host(second_host, remote_vm, tmp_path):
    proc = there(second_host, "start", remote_vm, "--wait", "--timeout", "120")
    assert proc.returncode == 0, proc.stderr
    run = there(second_host, "exec", remote_vm, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (run.returncode, run.stdout, run.stderr) == (3, "out\n", "err\n")
    # cp both ways
    data = os.urandom(300_000)
    (tmp_path / "in.bin").write_bytes(data)
    up = there(second_host, "cp", str(tmp_path / "in.bin"), f"{remote_vm}:/tmp/in.bin")
    assert up.returncode == 0, up.stderr
    down = there(second_host, "cp", f"{remote_vm}:/tmp/in.bin", str(tmp_path / "back.bin"))
    assert down.returncode == 0, down.stderr
    assert (tmp_path / "back.bin").read_bytes() == data
    # the serial log is on that host, read back through libvirt
    status = json.loads(there(second_host, "status", remote_vm, "--json").stdout)
    assert status["serial_log"] == f"/var/lib/ozone/logs/{remote_vm}-serial.log"
    assert has_file_there(status["serial_log"]) and not Path(status["serial_log"]).exists()
    wait_until(
        lambda: READY_LINE in there(second_host, "logs", remote_vm).stdout,
        timeout=60,
        what="the ready line in the remote serial log",
    )
    tail = there(second_host, "logs", remote_vm, "-n", "1")
    assert tail.returncode == 0 and tail.stdout.count("\n") <= 1
    # QMP through libvirt's monitor passthrough
    qmp = there(second_host, "qmp", remote_vm, "query-status")
    assert qmp.returncode == 0, qmp.stderr
    assert json.loads(qmp.stdout)["status"] == "running"
    clock = there(second_host, "clock", remote_vm)
    assert clock.returncode == 0, clock.stderr


def test_snapshot_on_that_host(second_host, remote_vm):
    proc = there(second_host, "start", remote_vm, "--wait", "--timeout", "120")
    assert proc.returncode == 0, proc.stderr
    assert (
        there(second_host, "exec", remote_vm, "--", "sh", "-c", "echo one > /root/mark").returncode
        == 0
    )
    made = there(second_host, "snapshot", "create", remote_vm, "s1")
    assert made.returncode == 0, made.stderr
    assert (
        there(second_host, "exec", remote_vm, "--", "sh", "-c", "echo two > /root/mark").returncode
        == 0
    )
    back = there(second_host, "snapshot", "revert", remote_vm, "s1")
    assert back.returncode == 0, back.stderr
    mark = there(second_host, "exec", remote_vm, "--", "cat", "/root/mark")
    assert mark.stdout == "one\n"
    gone = there(second_host, "snapshot", "delete", remote_vm, "s1")
    assert gone.returncode == 0, gone.stderr


def test_undefine_removes_the_disk_there_and_keeps_the_shared_iso(second_host, tmp_path):
    name = f"{PREFIX}remote-rm"
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({
        "name": name, "memory": "256MiB", "disks": [{"path": "disk.qcow2", "size": "32MiB"}],
        "cdrom": str(GUEST_DIR / "ozone-guest.iso"), "network": "none",
    }))  # fmt: skip
    try:
        assert there(second_host, "define", str(config)).returncode == 0
        disk = VMS / f"{name}-disk.qcow2"
        assert has_file_there(disk)
        iso = copy_of_the_iso(second_host, name)
        gone = there(second_host, "undefine", name, "--remove-storage")
        assert gone.returncode == 0, gone.stderr
        assert str(disk) in gone.stdout + gone.stderr
        assert not has_file_there(disk)
        assert has_file_there(iso)  # a copy other VMs may use: never a disk of one VM
        assert virsh_there(second_host, "domstate", name).returncode != 0
    finally:
        forget_there(second_host, name)


def test_an_image_and_cloud_init_vm_gets_its_image_and_seed_there(second_host, tmp_path):
    """The Debian example over the remote URI: the base image, its kernel, the seed and the
    overlay are volumes of that host's store; `image list` there shows the image in use and
    `image rm` refuses it. (Booting it is proven on this host by test_apply/test_guest_access:
    the XML differs only in the paths.)"""
    store = os.environ.get("OZONE_IMAGE_DIR", str(REPO / "build" / "images"))
    env = ozone_env(OZONE_IMAGE_DIR=store)
    name = f"{PREFIX}remote-deb"
    text = (REPO / "examples" / "debian.yaml").read_text()
    config = tmp_path / f"{name}.yaml"
    config.write_text(text.replace("name: debian\n", f"name: {name}\n"))
    try:
        proc = there(second_host, "define", str(config), "--json", env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr
        xml = virsh_there(second_host, "dumpxml", name).stdout
        sources = virsh_there(second_host, "domblklist", name).stdout
        overlay = f"/var/lib/ozone/images/{name}.root.qcow2"
        assert overlay in sources and has_file_there(overlay)
        seed = next(w for w in sources.split() if "/seed-" in w)
        assert has_file_there(seed)
        mode = on_second_host("stat", "-c", "%a", seed).stdout.strip()
        assert mode == "400"  # it may hold secrets
        kernel = xml.split("<kernel>")[1].split("</kernel>")[0]
        assert kernel.startswith("/var/lib/ozone/images/") and has_file_there(kernel)
        listed = json.loads(there(second_host, "image", "list", "--json", env=env).stdout)
        ours = [i for i in listed if name in i["used_by"]]
        assert len(ours) == 1, listed
        refused = there(second_host, "image", "rm", ours[0]["id"], env=env)
        assert refused.returncode == 1 and name in refused.stderr
        again = there(second_host, "define", str(config), "--json", env=env)
        assert json.loads(again.stdout)["changed"] is False, again.stdout + again.stderr
    finally:
        there(second_host, "undefine", name, "--remove-storage", env=env)
        forget_there(second_host, name)


# --- errors --------------------------------------------------------------------------------


def test_an_unreachable_host_is_one_line_naming_it(tmp_path):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"qemu+tcp://127.0.0.1:{port}/system"
    proc = run_ozone("-c", uri, "list")
    assert proc.returncode == 1
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: ") and f"127.0.0.1:{port}" in first, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_disk_bigger_on_that_host_than_the_config_asks_is_refused(
    second_host, remote_vm, tmp_path
):
    del remote_vm  # (it made ozone-vms, where the disk goes)
    name = f"{PREFIX}remote-big"
    disk = VMS / f"{name}-disk.qcow2"
    made = virsh_there(second_host, "vol-create-as", "ozone-vms", disk.name, "128M",
                       "--format", "qcow2")  # fmt: skip
    assert made.returncode == 0, made.stderr
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({
        "name": name, "memory": "256MiB", "disks": [{"path": "disk.qcow2", "size": "64MiB"}],
        "cdrom": str(GUEST_DIR / "ozone-guest.iso"), "network": "none",
    }))  # fmt: skip
    try:
        proc = there(second_host, "define", str(config))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        first = proc.stderr.splitlines()[0]
        assert "128 MiB" in first and "127.0.0.1" in first, proc.stderr
        assert virsh_there(second_host, "domstate", name).returncode != 0  # nothing defined
        assert has_file_there(disk)  # and the disk that was there is left as it was
        # a bigger size grows it (the VM is off)
        config.write_text(config.read_text().replace('"64MiB"', '"256MiB"'))
        grown = there(second_host, "define", str(config))
        assert grown.returncode == 0, grown.stderr
        info = virsh_there(second_host, "vol-info", str(disk), "--bytes").stdout
        assert f"{256 << 20} bytes" in info, info
    finally:
        forget_there(second_host, name)


def test_a_pool_name_taken_for_another_folder_is_one_line(second_host, tmp_path):
    """A storage pool ozone needs (here: the one for a read-only disk's copy folder) exists
    on that host for another folder: define says so, naming the host, and makes nothing."""
    name = f"{PREFIX}remote-pool"
    held = virsh_there(second_host, "pool-dumpxml", "ozone-files")  # (made by an earlier test)
    virsh_there(second_host, "pool-destroy", "ozone-files")
    virsh_there(second_host, "pool-undefine", "ozone-files")
    taken = virsh_there(second_host, "pool-define-as", "ozone-files", "dir", "--target", "/srv")
    assert taken.returncode == 0, taken.stderr
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({
        "name": name, "memory": "256MiB", "cdrom": str(GUEST_DIR / "ozone-guest.iso"),
        "network": "none",
    }))  # fmt: skip
    try:
        proc = there(second_host, "define", str(config))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        first = proc.stderr.splitlines()[0]
        assert "ozone-files" in first and "127.0.0.1" in first, proc.stderr
        assert virsh_there(second_host, "domstate", name).returncode != 0
    finally:
        virsh_there(second_host, "pool-undefine", "ozone-files")
        if held.returncode == 0:  # give it back as it was, for the tests after this one
            subprocess.run(
                ["virsh", "-c", second_host, "pool-define", "/dev/stdin"],
                input=held.stdout, capture_output=True, text=True, check=False,
            )  # fmt: skip
            virsh_there(second_host, "pool-start", "ozone-files")
        forget_there(second_host, name)


def test_gc_there_removes_unused_copies_and_leaves_this_machine_alone(second_host, remote_vm):
    """`ozone -c URI gc` sweeps that host's copies no VM uses (made over 10 minutes ago), never
    one in use, and never a file of this machine's (its QMP sockets, its store's seeds)."""
    unused = FILES / f"unused-{os.getpid()}.iso"
    made = virsh_there(second_host, "vol-create-as", "ozone-files", unused.name, "1M")
    assert made.returncode == 0, made.stderr
    in_use = copy_of_the_iso(second_host, remote_vm)
    for path in (unused, in_use):
        assert on_second_host("touch", "-d", "1 hour ago", str(path)).returncode == 0
    proc = there(second_host, "gc", "--json")
    assert proc.returncode == 0, proc.stderr
    removed = json.loads(proc.stdout)["removed"]
    assert any(str(unused) in r for r in removed), removed
    assert not has_file_there(unused)
    assert has_file_there(in_use)
    assert all("127.0.0.1" in r for r in removed if "/var/lib/ozone/" in r), removed


def test_an_iso_kept_on_that_host_is_used_where_it_is(second_host, tmp_path):
    """A config naming a file that is not on this machine but on the VM's host uses it in
    place (no copy), and asking leaves no pool behind."""
    name = f"{PREFIX}remote-kept"
    kept = f"/var/lib/libvirt/images/{name}.iso"  # the second host's own folder
    assert on_second_host("cp", str(GUEST_DIR / "ozone-guest.iso"), kept).returncode == 0
    assert not Path(kept).exists()
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({"name": name, "memory": "256MiB", "cdrom": kept,
                                  "network": "none"}))  # fmt: skip
    pools = virsh_there(second_host, "pool-list", "--all", "--name").stdout
    try:
        proc = there(second_host, "define", str(config))
        assert proc.returncode == 0, proc.stderr
        assert kept in virsh_there(second_host, "domblklist", name).stdout
        assert virsh_there(second_host, "pool-list", "--all", "--name").stdout == pools
        again = there(second_host, "define", str(config), "--json")
        assert json.loads(again.stdout)["changed"] is False, again.stdout + again.stderr
        started = there(second_host, "start", name, "--wait", "--timeout", "120")
        assert started.returncode == 0, started.stderr
        assert there(second_host, "exec", name, "--", "true").returncode == 0
    finally:
        forget_there(second_host, name)
        on_second_host("rm", "-f", kept)
