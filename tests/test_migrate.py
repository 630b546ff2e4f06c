"""`ozone migrate` between two real libvirt hosts: qemu:///system and the second host
(scripts/second-host: its own libvirtd, file system and host UUID, over qemu+tcp).

The guests boot from the test ISO, which is at the same path on both hosts (the build
folder is shared); /var/lib/libvirt and /var/lib/ozone are the second host's own, so a
copied disk and ozone's QMP socket folder must get there through libvirt.
"""

from __future__ import annotations

import json
import pwd
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ozone_libvirt import migrate as mig
from ozone_libvirt.errors import UsageError
from ozone_libvirt.metadata import Forward, OzoneMetadata, QmpEndpoint, parse_metadata

from .conftest import (
    GUEST_DIR,
    PREFIX,
    URI,
    WORK_ROOT,
    domain_exists,
    on_second_host,
    remove_domain,
    run_ozone,
    running_guest,
    virsh,
)

ISO = str(GUEST_DIR / "ozone-guest.iso")


def virsh_on(uri: str, *args: str, check: bool = True) -> str:
    proc = subprocess.run(
        ["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=60, check=False
    )
    if check:
        assert proc.returncode == 0, f"virsh -c {uri} {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def exists_on(uri: str, name: str) -> bool:
    return (
        subprocess.run(["virsh", "-c", uri, "domstate", name], capture_output=True).returncode == 0
    )


def remove_on(uri: str, name: str) -> None:
    for args in (["destroy", name], ["undefine", name, "--nvram", "--managed-save"]):
        subprocess.run(["virsh", "-c", uri, *args], capture_output=True, check=False)


def ozone_on(uri: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return run_ozone("-c", uri, *args, timeout=timeout)


def home(name: str, there: str) -> None:
    """Bring the guest back to qemu:///system if a failed test left it on the second host."""
    if exists_on(there, name) and not domain_exists(name):
        virsh_on(there, "migrate", "--live", "--persistent", "--undefinesource", name, URI)


@pytest.fixture(scope="module")
def guest(libvirtd: str, second_host: str, guest_image: Path) -> Iterator[str]:
    """One tiny running guest for the module (no network: its forwarded ssh port would be
    the same port on both hosts, which share this machine's network), removed from both
    hosts afterwards, also on failure."""
    name = f"{PREFIX}mig"
    try:
        with running_guest("mig", memory="256MiB", network="none"):
            yield name
    finally:
        remove_on(second_host, name)
        remove_domain(name)


@pytest.fixture
def at_home(guest: str, second_host: str) -> Iterator[str]:
    home(guest, second_host)
    yield guest
    home(guest, second_host)


pytestmark = [pytest.mark.libvirtd, pytest.mark.guest]


def test_live_migration_there_and_back_keeps_uuid_metadata_and_qmp(
    at_home: str, second_host: str
) -> None:
    name = at_home
    before = json.loads(run_ozone("status", name, "--json").stdout)
    inactive_before = virsh("dumpxml", "--inactive", name)
    proc = run_ozone("migrate", name, second_host, "--live", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["uuid"], result["uri"], result["mode"]) == (before["uuid"], second_host, "live")
    assert result["state"] == "running" and result["bytes_copied"] > 0
    assert not domain_exists(name)  # it left the source: still one VM
    assert ozone_on(second_host, "exec", name, "--", "true").returncode == 0
    there = json.loads(ozone_on(second_host, "status", name, "--json").stdout)
    assert (there["uuid"], there["qmp"], there["persistent"]) == (
        before["uuid"],
        before["qmp"],
        True,
    )
    assert there["source"] == before["source"] and there["config_hash"] == before["config_hash"]
    # its definition there is the one it had, ozone's metadata and all
    inactive_there = virsh_on(second_host, "dumpxml", "--inactive", name)
    assert parse_metadata(inactive_there) == parse_metadata(inactive_before) is not None
    # ozone's private QMP socket folder was made there, QEMU's own
    assert on_second_host("test", "-S", before["qmp"].removeprefix("unix:")).returncode == 0
    reply = ozone_on(second_host, "qmp", name, "query-status")
    assert reply.returncode == 0 and json.loads(reply.stdout)["running"] is True

    back = ozone_on(second_host, "migrate", name, URI, "--live")
    assert back.returncode == 0, back.stderr
    assert back.stdout.startswith(f"Migrated {name} to {URI} in ")
    assert not exists_on(second_host, name)
    proc = run_ozone("exec", name, "--", "cat", "/proc/uptime")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(run_ozone("status", name, "--json").stdout)["uuid"] == before["uuid"]


def test_copy_storage_moves_a_vm_with_a_local_disk(
    libvirtd: str, second_host: str, guest_image: Path
) -> None:
    folder = WORK_ROOT / f"mig-{uuid.uuid4().hex[:8]}"
    disk = folder / "data.qcow2"
    name = f"{PREFIX}migdisk"
    disks = [{"path": str(disk), "size": "32MiB"}]
    folder.mkdir(parents=True, mode=0o755)
    try:
        with running_guest("migdisk", memory="256MiB", network="none", disks=disks):
            marker = "ozone-was-here"
            script = f"echo {marker} | dd of=/dev/vda conv=fsync 2>/dev/null"
            assert run_ozone("exec", name, "--", "sh", "-c", script).returncode == 0
            proc = run_ozone("migrate", name, second_host, "--live", "--copy-storage")
            assert proc.returncode == 0, proc.stderr
            assert f"the source host keeps {disk}" in proc.stderr
            # the copy is in the second host's own file system, made there by libvirt
            assert on_second_host("test", "-f", str(disk)).returncode == 0
            read = ozone_on(second_host, "exec", name, "--", "head", "-c", "14", "/dev/vda")
            assert read.returncode == 0 and read.stdout == marker
            assert not domain_exists(name)
    finally:
        remove_on(second_host, name)
        remove_domain(name)
        on_second_host("rm", "-rf", str(folder))
        shutil.rmtree(folder, ignore_errors=True)


def test_a_vm_of_that_name_on_the_destination_is_refused_before_anything_moves(
    at_home: str, second_host: str, tmp_path: Path
) -> None:
    name = at_home
    xml = tmp_path / "other.xml"
    xml.write_text(
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64'>hvm</type></os></domain>"
    )
    virsh_on(second_host, "define", str(xml))
    theirs = virsh_on(second_host, "domuuid", name)
    try:
        proc = run_ozone("migrate", name, second_host, "--live")
        assert proc.returncode == 1
        assert proc.stderr.startswith(
            f"error: {second_host} has a VM named {name!r} already: nothing was moved\n"
        )
        assert virsh("domstate", name).strip() == "running"
        assert virsh_on(second_host, "domuuid", name) == theirs  # untouched
        assert virsh_on(second_host, "domstate", name).strip() == "shut off"
    finally:
        remove_on(second_host, name)


def test_a_qmp_endpoint_held_on_the_destination_is_refused_naming_its_vm(
    at_home: str, second_host: str, tmp_path: Path
) -> None:
    name = at_home
    qmp = json.loads(run_ozone("status", name, "--json").stdout)["qmp"]
    other = f"{PREFIX}holder"
    xml = tmp_path / "holder.xml"
    xml.write_text(
        f"<domain type='qemu'><name>{other}</name><memory unit='MiB'>64</memory>"
        "<metadata><ozone:vm xmlns:ozone='https://ozone-vm.dev/xmlns/libvirt-domain/1'>"
        f"<ozone:qmp>{qmp}</ozone:qmp></ozone:vm></metadata>"
        "<os><type arch='x86_64'>hvm</type></os></domain>"
    )
    virsh_on(second_host, "define", str(xml))
    try:
        proc = run_ozone("migrate", name, second_host, "--live", "--json")
        assert proc.returncode == 1
        err = json.loads(proc.stdout)["error"]
        assert err["code"] == "conflict"
        assert f"is that of VM {other!r} on {second_host}" in err["message"]
        assert virsh("domstate", name).strip() == "running"
        assert not exists_on(second_host, name)
    finally:
        remove_on(second_host, other)


def test_an_unreachable_destination_fails_in_one_line_naming_it(at_home: str) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dest = f"qemu+tcp://127.0.0.1:{port}/system"
    proc = run_ozone("migrate", at_home, dest, "--live")
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(f"error: cannot connect to libvirt at {dest}: ")
    assert "Connection refused" in lines[0]
    assert [line for line in lines if not line.startswith("hint: ")] == lines[:1]
    assert virsh("domstate", at_home).strip() == "running"


def test_a_move_past_its_timeout_is_aborted_and_the_vm_runs_on_at_the_source(
    at_home: str, second_host: str
) -> None:
    proc = run_ozone("migrate", at_home, second_host, "--live", "--timeout", "0.2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "did not finish within 0.2 s and was aborted" in proc.stderr
    assert virsh("domstate", at_home).strip() == "running"
    assert not exists_on(second_host, at_home)  # ozone returned after it was gone there
    assert run_ozone("exec", at_home, "--", "true").returncode == 0


def test_a_stopped_vm_moves_its_definition(
    libvirtd: str, second_host: str, tmp_path: Path, guest_image: Path
) -> None:
    name = f"{PREFIX}migoff"
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({"name": name, "memory": "256MiB", "cdrom": ISO}))
    try:
        assert run_ozone("define", str(config)).returncode == 0
        uuid_before = virsh("domuuid", name).strip()
        refused = run_ozone("migrate", name, second_host, "--live")
        assert refused.returncode == 1 and "is not running: --live" in refused.stderr
        proc = run_ozone("migrate", name, second_host, "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["mode"] == "offline"
        assert virsh_on(second_host, "domuuid", name).strip() == uuid_before
        assert virsh_on(second_host, "domstate", name).strip() == "shut off"
        assert not domain_exists(name)
    finally:
        remove_on(second_host, name)
        remove_domain(name)


# --- pure decisions ---------------------------------------------------------------------


def test_resolve_host_takes_uris_and_inventory_names(tmp_path, monkeypatch) -> None:
    from ozone_libvirt.errors import ConfigError

    assert mig.resolve_host("qemu+ssh://rack2/system") == (
        "qemu+ssh://rack2/system",
        "qemu+ssh://rack2/system",
    )
    hosts = tmp_path / "hosts.yaml"
    monkeypatch.setenv("OZONE_HOSTS", str(hosts))
    with pytest.raises(ConfigError, match="no hosts file"):
        mig.resolve_host("rack2")
    hosts.write_text("hosts:\n  rack2: qemu+ssh://root@rack2/system\n")
    assert mig.resolve_host("rack2") == ("rack2", "qemu+ssh://root@rack2/system")
    with pytest.raises(UsageError, match="no host named 'rack3'") as err:
        mig.resolve_host("rack3")
    assert "rack2" in (err.value.hint or "")


def test_clash_names_the_vm_that_holds_a_port_on_the_destination() -> None:
    meta = OzoneMetadata(
        source=None,
        hash=None,
        qmp_endpoint=QmpEndpoint("tcp", host="127.0.0.1", port=4444),
        forwards=(Forward("tcp", "127.0.0.1", 2222, 22, auto=True),),
    )
    free = mig.Destination(label="rack2", same_name=None, same_uuid=None)
    assert mig.clash("web", "u1", meta, free) is None
    ssh_taken = mig.Destination(
        "rack2", None, None, ports=[(Forward("tcp", "0.0.0.0", 2222, 80), "db")]
    )
    assert "held by VM 'db' on rack2" in (mig.clash("web", "u1", meta, ssh_taken) or "")
    qmp_taken = mig.Destination("rack2", None, None, qmp={"tcp:127.0.0.1:4444": "db"})
    assert "QMP endpoint of web, is that of VM 'db'" in (
        mig.clash("web", "u1", meta, qmp_taken) or ""
    )
    same = mig.Destination("rack2", same_name="u1", same_uuid="web")
    assert "is on rack2 already" in (mig.clash("web", "u1", meta, same) or "")


def test_flags_keep_one_persistent_vm() -> None:
    import libvirt

    live = mig.migration_flags(running=True, persistent=True, live=True, copy_storage=True)
    for flag in ("LIVE", "PERSIST_DEST", "UNDEFINE_SOURCE", "NON_SHARED_DISK"):
        assert live & getattr(libvirt, f"VIR_MIGRATE_{flag}")
    offline = mig.migration_flags(running=False, persistent=True, live=False, copy_storage=False)
    assert offline & libvirt.VIR_MIGRATE_OFFLINE and not offline & libvirt.VIR_MIGRATE_LIVE


def test_needs_lists_what_is_not_copied() -> None:
    xml = (
        "<domain><devices>"
        "<disk type='file' device='disk'><source file='/v/a.qcow2'/></disk>"
        "<disk type='file' device='cdrom'><source file='/srv/x.iso'/><readonly/></disk>"
        "</devices></domain>"
    )
    meta = OzoneMetadata(None, None, QmpEndpoint("unix", path="/var/lib/ozone/qmp/w.sock"))
    copying = mig.needs(xml, meta, copy_storage=True)
    assert [str(u.path) for u in copying.present] == ["/srv/x.iso"]
    assert copying.copied == (Path("/v/a.qcow2"),)
    assert copying.socket_folder == Path("/var/lib/ozone/qmp")
    shared = mig.needs(xml, meta, copy_storage=False)
    assert sorted(str(u.path) for u in shared.present) == ["/srv/x.iso", "/v/a.qcow2"]


def test_a_vm_defined_on_the_second_host_moves_here_and_back_with_its_iso_copied(
    second_host: str, tmp_path: Path
) -> None:
    """Its ISO is ozone's copy in the second host's /var/lib/ozone/files, which this host
    lacks: migrate copies it (same path) before the move, then the VM moves back."""
    name = f"{PREFIX}mig-remote"
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({"name": name, "memory": "256MiB", "cdrom": ISO,
                                  "network": "none"}))  # fmt: skip
    copy = None
    try:
        assert ozone_on(second_host, "define", str(config)).returncode == 0
        started = ozone_on(second_host, "start", name, "--wait", "--timeout", "120")
        assert started.returncode == 0, started.stderr
        sources = virsh_on(second_host, "domblklist", name).split()
        copy = next(word for word in sources if "/files/" in word)
        assert not Path(copy).exists()  # only the second host has it
        proc = ozone_on(second_host, "migrate", name, URI, "--live", "--json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert copy in json.loads(proc.stdout)["made_on_destination"]
        made = Path(copy).stat()  # QEMU's, and nobody else's (a copy may be private)
        assert made.st_mode & 0o777 == 0o400 and made.st_uid == pwd.getpwnam("libvirt-qemu").pw_uid
        assert run_ozone("exec", name, "--", "true").returncode == 0
        back = run_ozone("migrate", name, second_host, "--live")
        assert back.returncode == 0, back.stderr
        assert ozone_on(second_host, "exec", name, "--", "true").returncode == 0
    finally:
        remove_on(second_host, name)
        remove_domain(name)
        if copy is not None:
            virsh("vol-delete", copy, check=False)


def test_the_python_api_moves_a_vm_and_goes_on_there(at_home: str, second_host: str) -> None:
    from ozone_libvirt import VM

    with VM(at_home) as here:
        moved = here.migrate(second_host, live=True)
    assert (moved.uri, moved.state) == (second_host, "running")
    with VM(at_home, uri=moved.uri) as there:
        assert there.exec(["echo", "moved"], check=True).stdout == b"moved\n"
