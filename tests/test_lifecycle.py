"""define / start / stop / destroy / undefine against a real libvirtd with real QEMU guests
(TCG), driven through the `ozone` command line as a user would."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess

import pytest
from lxml import etree

from .conftest import READY_LINE, run_ozone, serial_text, virsh, wait_ready_line

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest]


def qmp_execute(endpoint: str, command: str) -> object:
    """Ask QMP directly with QEMU's own client library: independent of libvirt and ozone."""
    from qemu.qmp import QMPClient

    async def go() -> object:
        client = QMPClient("ozone-test")
        if endpoint.startswith("tcp:"):
            host, _, port = endpoint[4:].rpartition(":")
            await asyncio.wait_for(client.connect((host, int(port))), 10)
        else:
            await asyncio.wait_for(client.connect(endpoint[5:]), 10)
        try:
            return await client.execute(command)
        finally:
            await client.disconnect()

    return asyncio.run(go())


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def as_json(*args: str) -> dict:
    return json.loads(ok(run_ozone(*args, "--json")).stdout)


def define(path) -> dict:
    return as_json("define", str(path))


def test_define_makes_an_ordinary_libvirt_domain(vms, workdir):
    name, path = vms.config(
        {"memory": "300MiB", "vcpus": 2, "disks": [{"path": "root.qcow2", "size": "64MiB"}]}
    )
    result = define(path)
    assert result["created"] is True
    assert (workdir / "root.qcow2").exists()

    root = etree.fromstring(virsh("dumpxml", name).encode())
    assert root.get("type") == "qemu"  # OZONE_ACCEL=tcg on these machines
    assert "q35" in root.find("os/type").get("machine")
    assert root.findtext("memory") == str(300 * 1024)
    assert root.find("memory").get("unit") == "KiB"
    assert root.findtext("vcpu") == "2"
    assert [b.get("dev") for b in root.findall("os/boot")] == ["cdrom", "hd"]
    disk, cdrom = root.findall("devices/disk")
    assert disk.find("driver").get("type") == "qcow2"
    assert disk.find("source").get("file") == str(workdir / "root.qcow2")
    assert cdrom.get("device") == "cdrom"
    assert cdrom.find("source").get("file") == str(vms.guest / "ozone-guest.iso")
    meta = virsh("metadata", name, "https://ozone-vm.dev/xmlns/libvirt-domain/1")
    assert str(path) in meta
    assert result["qmp"] in meta
    assert "sha256:" in meta
    assert virsh("domstate", name).strip() == "shut off"


def test_start_list_and_qmp_passthrough(vms):
    name, path = vms.config()
    endpoint = define(path)["qmp"]
    assert endpoint == f"unix:/var/lib/ozone/qmp/{name}.sock"  # "auto": private to root
    ok(run_ozone("start", name))
    wait_ready_line(name)

    listed = {v["name"]: v for v in as_json("list")}
    assert listed[name]["state"] == "running"
    assert listed[name]["qmp"] == endpoint
    assert listed[name]["memory"] == 256 * 1024**2
    running = virsh("list", "--name").split()
    assert name in running

    # an independent QMP client on the VM's own endpoint
    assert qmp_execute(endpoint, "query-status")["status"] == "running"
    # and through libvirt's monitor passthrough
    assert as_json("qmp", name, "query-status")["status"] == "running"
    name_reply = json.loads(ok(run_ozone("qmp", name, "query-name")).stdout)
    assert name_reply == {"name": name}


def test_two_running_vms_have_their_own_qmp_endpoints(vms):
    (a, pa), (b, pb) = vms.config({"qmp": "tcp"}), vms.config(fmt="yaml")
    ea, eb = define(pa)["qmp"], define(pb)["qmp"]
    assert ea != eb
    ok(run_ozone("start", a))
    ok(run_ozone("start", b))
    assert qmp_execute(ea, "query-name") == {"name": a}
    assert qmp_execute(eb, "query-name") == {"name": b}


def test_unix_socket_qmp_and_direct_kernel_boot(vms):
    sock = f"/var/lib/libvirt/qemu/{vms.name()}.qmp"
    name, path = vms.config(
        {
            "kernel": str(vms.guest / "vmlinuz"),
            "initrd": str(vms.guest / "initrd.img"),
            "cmdline": "console=ttyS0",
            "qmp": f"unix:{sock}",
            "network": "none",
        },
        tiny=False,
    )
    assert define(path)["qmp"] == f"unix:{sock}"
    ok(run_ozone("start", name))
    wait_ready_line(name)
    assert qmp_execute(f"unix:{sock}", "query-status")["status"] == "running"


def test_stop_through_the_agent(vms):
    name, path = vms.config()
    define(path)
    ok(run_ozone("start", name, "--wait", "--timeout", "90"))
    result = as_json("stop", name, "--timeout", "60")
    assert result["method"] == "agent"
    assert virsh("domstate", name).strip() == "shut off"
    # stopping a stopped VM is fine
    assert as_json("stop", name)["method"] == "none"


def test_stop_forces_off_a_guest_that_ignores_shutdown(vms):
    name, path = vms.config({"agent": False})  # the tiny guest ignores ACPI
    define(path)
    ok(run_ozone("start", name))
    wait_ready_line(name)
    result = as_json("stop", name, "--timeout", "2")
    assert result["method"] == "forced"
    assert result["requested"] == "acpi"
    assert virsh("domstate", name).strip() == "shut off"


def test_destroy_then_undefine_keeps_the_disk(vms, workdir):
    name, path = vms.config({"disks": [{"path": "keep.qcow2", "size": "32MiB"}]})
    define(path)
    ok(run_ozone("start", name))
    assert as_json("destroy", name)["was_running"] is True
    assert virsh("domstate", name).strip() == "shut off"
    refused = run_ozone("undefine", "nosuch-vm-xyz")
    assert refused.returncode == 1
    assert "no VM named 'nosuch-vm-xyz'" in refused.stderr
    assert as_json("undefine", name)["removed"] == []
    assert (workdir / "keep.qcow2").exists()
    assert (
        subprocess.run(
            ["virsh", "-c", "qemu:///system", "domstate", name], capture_output=True
        ).returncode
        != 0
    )


def test_undefine_remove_storage_never_touches_iso_or_backing(vms, workdir):
    base = workdir / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "32M"], check=True)
    iso = vms.guest / "ozone-guest.iso"
    name, path = vms.config({"disks": [{"path": "overlay.qcow2", "backing": "base.qcow2"}]})
    define(path)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", "-U", str(workdir / "overlay.qcow2")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["backing-filename"] == str(base)
    removed = as_json("undefine", name, "--remove-storage")["removed"]
    assert removed == [str(workdir / "overlay.qcow2")]
    assert base.exists()
    assert iso.exists()


def test_redefine_keeps_uuid_and_changes_memory(vms, workdir):
    name, path = vms.config({"memory": "256MiB"})
    first = define(path)
    data = json.loads(path.read_text())
    data["memory"] = "384MiB"
    path.write_text(json.dumps(data))
    second = define(path)
    assert second["created"] is False
    assert second["uuid"] == first["uuid"]
    assert second["qmp"] == first["qmp"]  # auto keeps its port
    root = etree.fromstring(virsh("dumpxml", name).encode())
    assert root.findtext("memory") == str(384 * 1024)
    assert root.findtext("uuid") == first["uuid"]


def test_start_reports_a_qmp_port_taken_by_another_program(vms):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        name, path = vms.config({"qmp": f"tcp:127.0.0.1:{port}"})
        define(path)
        proc = run_ozone("start", name)
        assert proc.returncode == 1
        assert f"127.0.0.1:{port}" in proc.stderr
        assert "already in use" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert virsh("domstate", name).strip() == "shut off"


def test_start_without_name_and_without_terminal_is_a_usage_error(libvirtd):
    proc = run_ozone("start")
    assert proc.returncode == 2
    assert "give a NAME" in proc.stderr


def test_logs_show_the_serial_console(vms):
    name, path = vms.config()
    define(path)
    ok(run_ozone("start", name))
    wait_ready_line(name)
    out = ok(run_ozone("logs", name, "--lines", "50")).stdout
    assert READY_LINE in out
    assert READY_LINE in serial_text(name)
    status = as_json("status", name)
    assert status["state"] == "running"
    assert status["serial_log"].endswith(f"{name}-serial.log")
    assert as_json("stop", name, "--force")["method"] == "forced"
    assert virsh("domstate", name).strip() == "shut off"


def test_start_with_a_config_path_defines_and_starts_the_vm_it_names(vms):
    name, path = vms.config()
    proc = run_ozone("start", str(path))
    assert proc.returncode == 0, proc.stderr
    assert f"defined {name} from {path}" in proc.stderr
    assert proc.stdout.startswith(f"Started {name}")
    assert virsh("domstate", name).strip() == "running"
