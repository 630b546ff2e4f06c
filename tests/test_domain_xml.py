"""Config → domain XML: pure, no libvirt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lxml import etree

from ozone_libvirt import domain_xml as dx
from ozone_libvirt.config import VMConfig, parse_config
from ozone_libvirt.errors import ConfigError

FACTS = dx.HostFacts(kvm=False, log_dir=Path("/logs"), qmp_dir=Path("/var/lib/ozone/qmp"))
TCP_4444 = dx.QmpEndpoint("tcp", host="127.0.0.1", port=4444)


def build(
    data: dict,
    *,
    facts: dx.HostFacts = FACTS,
    qmp: dx.QmpEndpoint | None = TCP_4444,
    uuid: str | None = None,
    **kwargs,
) -> etree._Element:
    cfg = parse_config({"name": "w", **data}, source=Path("/vms/w.json"))
    return dx.build_domain(cfg, facts=facts, qmp_endpoint=qmp, uuid=uuid, **kwargs)


def test_memory_vcpus_machine_and_type():
    root = build({"memory": "3GiB", "vcpus": 3, "machine": "pc", "cdrom": "x.iso"})
    assert root.get("type") == "qemu"
    assert root.findtext("memory") == str(3 * 1024 * 1024)
    assert root.find("memory").get("unit") == "KiB"
    assert root.findtext("vcpu") == "3"
    assert root.find("os/type").get("machine") == "pc"


@pytest.mark.parametrize(
    ("accel", "kvm", "override", "expected"),
    [
        ("auto", True, None, "kvm"),
        ("auto", False, None, "qemu"),
        ("tcg", True, None, "qemu"),
        ("kvm", True, None, "kvm"),
        ("auto", True, "tcg", "qemu"),
        ("kvm", True, "tcg", "qemu"),
    ],
)
def test_accel(accel, kvm, override, expected):
    facts = dx.HostFacts(kvm=kvm, accel_override=override)
    root = build({"accel": accel, "cdrom": "x.iso"}, facts=facts)
    assert root.get("type") == expected
    assert (root.find("cpu") is not None) == (expected == "kvm")


def test_kvm_without_kvm_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        build({"accel": "kvm", "cdrom": "x.iso"}, facts=dx.HostFacts(kvm=False))
    assert info.value.field == "accel"


def test_disks_cdrom_and_boot_order():
    root = build(
        {
            "disks": [
                {"path": "a.qcow2", "size": "1G"},
                {"path": "b.raw", "format": "raw", "bus": "sata", "size": "1G"},
            ],
            "cdrom": "d.iso",
        }
    )
    disks = root.findall("devices/disk")
    assert [(d.get("device"), d.find("target").get("dev")) for d in disks] == [
        ("disk", "vda"),
        ("disk", "sda"),
        ("cdrom", "sdb"),
    ]
    assert disks[0].find("source").get("file") == "/vms/a.qcow2"
    assert disks[1].find("driver").get("type") == "raw"
    assert disks[2].find("readonly") is not None
    assert [b.get("dev") for b in root.findall("os/boot")] == ["cdrom", "hd"]


def test_kernel_boot_has_no_boot_devices():
    root = build({"kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "console=ttyS0"})
    assert root.findtext("os/kernel") == "/vms/vmlinuz"
    assert root.findtext("os/initrd") == "/vms/initrd.img"
    assert root.findtext("os/cmdline") == "console=ttyS0"
    assert root.findall("os/boot") == []


def test_qmp_passthrough_and_metadata():
    root = build({"cdrom": "x.iso", "stage_dir": "/srv/stage"}, qmp=TCP_4444)
    args = [a.get("value") for a in root.iter(f"{{{dx.QEMU_NS}}}arg")]
    assert args == ["-qmp", "tcp:127.0.0.1:4444,server=on,wait=off"]
    meta = dx.parse_metadata(etree.tostring(root))
    assert meta == dx.OzoneMetadata(
        source="/vms/w.json",
        hash=meta.hash,
        qmp_endpoint=TCP_4444,
        stage_dir="/srv/stage",
        config=meta.config,
        xml_hash=meta.xml_hash,
    )
    record = json.loads(meta.config)  # what `ozone apply` compares, field by field
    assert (record["name"], record["cdrom"], record["stage_dir"]) == (
        "w",
        "/vms/x.iso",
        "/srv/stage",
    )
    assert "kernel" not in record  # unset fields are left out
    assert meta.qmp == "tcp:127.0.0.1:4444"
    assert meta.hash.startswith("sha256:")


@pytest.mark.parametrize(
    ("qmp", "planned"),
    [
        ("auto", "unix:/var/lib/ozone/qmp/w.sock"),
        ("off", None),
        ("unix:/run/x.sock", "unix:/run/x.sock"),
        ("tcp:127.0.0.1:4444", "tcp:127.0.0.1:4444"),
        ("tcp", f"tcp:127.0.0.1:{dx.preferred_qmp_port('w')}"),
    ],
)
def test_qmp_endpoints_from_the_config_alone(qmp, planned):
    cfg = parse_config({"name": "w", "cdrom": "x.iso", "qmp": qmp}, source=Path("/vms/w.json"))
    endpoint = dx.choose_qmp(cfg, FACTS)
    assert (str(endpoint) if endpoint else None) == planned
    assert (endpoint is not None and endpoint.auto) == (qmp == "tcp")


def test_auto_qmp_without_a_private_folder_is_off():
    cfg = parse_config({"name": "w", "cdrom": "x.iso"}, source=Path("/vms/w.json"))
    assert dx.choose_qmp(cfg, dx.HostFacts()) is None


def _qmp_config(qmp: object) -> VMConfig:
    return parse_config({"name": "w", "cdrom": "x.iso", "qmp": qmp}, source=Path("/vms/w.json"))


def test_an_explicit_qmp_endpoint_another_vm_holds_is_a_config_error():
    with pytest.raises(ConfigError, match="QMP endpoint of VM 'other'"):
        dx.choose_qmp(
            _qmp_config("tcp:127.0.0.1:4444"), FACTS, used={"tcp:127.0.0.1:4444": "other"}
        )
    socket = f"unix:{FACTS.qmp_dir}/w.sock"
    with pytest.raises(ConfigError, match="qmp"):
        dx.choose_qmp(_qmp_config("auto"), FACTS, used={socket: "other"})


def test_a_chosen_qmp_port_stays_unless_another_vm_took_it():
    cfg = _qmp_config("tcp")
    first = dx.choose_qmp(cfg, FACTS)
    kept = dx.QmpEndpoint("tcp", host="127.0.0.1", port=24999, auto=True)
    assert dx.choose_qmp(cfg, FACTS, previous=kept) == kept
    moved = dx.choose_qmp(cfg, FACTS, previous=kept, used={str(kept): "other"})
    assert moved == first
    assert dx.choose_qmp(cfg, FACTS, used={str(first): "other"}) != first


def test_a_qmp_port_someone_listens_on_is_skipped():
    cfg = _qmp_config("tcp")
    first = dx.choose_qmp(cfg, FACTS)
    assert first is not None
    taken = dx.choose_qmp(cfg, FACTS, port_free=lambda port: port != first.port)
    assert taken is not None
    assert taken.port == dx.preferred_qmp_port("w", 1)
    assert taken.auto


def test_moving_a_chosen_port_rewrites_argument_and_metadata():
    auto = dx.QmpEndpoint("tcp", host="127.0.0.1", port=24001, auto=True)
    moved = dx.QmpEndpoint("tcp", host="127.0.0.1", port=24002, auto=True)
    text = dx.with_qmp_endpoint(dx.to_string(build({"cdrom": "x.iso"}, qmp=auto)), moved)
    root = etree.fromstring(text.encode())
    args = [a.get("value") for a in root.iter(f"{{{dx.QEMU_NS}}}arg")]
    assert args == ["-qmp", "tcp:127.0.0.1:24002,server=on,wait=off"]
    assert dx.parse_metadata(text).qmp_endpoint == moved


def test_read_only_images_keep_their_owner():
    """libvirt chowns read-only images to QEMU's user and never gives them back: the cdrom
    and named backing images say relabel='no'; a throwaway VM relabels nothing."""
    root = build(
        {"cdrom": "x.iso", "disks": [{"path": "o.qcow2", "backing": "base.img"}]},
        backing_formats={Path("/vms/base.img"): "raw"},
    )
    cdrom, disk = root.find("devices/disk[@device='cdrom']"), root.find("devices/disk")
    assert cdrom.find("source/seclabel").attrib == {"model": "dac", "relabel": "no"}
    store = disk.find("backingStore")
    assert store.find("format").get("type") == "raw"
    assert store.find("source").get("file") == "/vms/base.img"
    assert store.find("source/seclabel").get("relabel") == "no"
    assert root.find("seclabel") is None
    run = build({"cdrom": "x.iso"}, run_as="+64055:+64055")
    assert run.find("devices/disk/source/seclabel") is None  # libvirt refuses both at once
    label = run.find("seclabel")
    assert (label.get("type"), label.get("relabel"), label.findtext("label")) == (
        "static",
        "no",
        "+64055:+64055",
    )


def test_qmp_off_has_no_commandline():
    root = build({"cdrom": "x.iso", "qmp": "off"}, qmp=None)
    assert root.find(f"{{{dx.QEMU_NS}}}commandline") is None
    assert dx.parse_metadata(etree.tostring(root)).qmp is None


def test_xml_metacharacters_are_escaped_not_injected():
    nasty = "</description><devices><hostdev/></devices> & \"quotes\" 'single'"
    root = build({"cdrom": "x.iso", "description": nasty, "cmdline": nasty, "kernel": "k"})
    text = dx.to_string(root)
    again = etree.fromstring(text.encode())
    assert again.findtext("description") == nasty
    assert again.findtext("os/cmdline") == nasty
    assert again.find(".//hostdev") is None


def test_paths_with_quotes_survive():
    root = build({"cdrom": 'it\'s "odd" <dir>/x.iso'})
    again = etree.fromstring(dx.to_string(root).encode())
    src = again.find("devices/disk/source").get("file")
    assert src == '/vms/it\'s "odd" <dir>/x.iso'


def test_agent_channel_serial_log_network():
    root = build({"cdrom": "x.iso", "network": "bridge:br0"})
    text = dx.to_string(root)
    assert dx.has_agent_channel(text)
    assert dx.serial_log_of(text) == "/logs/w-serial.log"
    assert root.find("devices/interface").get("type") == "bridge"
    assert root.find("devices/interface/source").get("bridge") == "br0"
    root = build({"cdrom": "x.iso", "agent": False, "network": "none", "serial_log": "s.log"})
    text = dx.to_string(root)
    assert not dx.has_agent_channel(text)
    assert dx.serial_log_of(text) == "/vms/s.log"
    assert root.find("devices/interface") is None


def test_uuid_is_kept():
    root = build({"cdrom": "x.iso"}, uuid="0b4b0b3e-6a39-4a3a-9e2a-3f5f0e0f9c11")
    assert root.findtext("uuid") == "0b4b0b3e-6a39-4a3a-9e2a-3f5f0e0f9c11"


def test_disk_images_of_skips_cdroms_and_readonly():
    text = dx.to_string(build({"cdrom": "x.iso", "disks": [{"path": "a.qcow2", "size": "1G"}]}))
    assert dx.disk_images_of(text) == ["/vms/a.qcow2"]


def test_files_of_names_every_file_and_how_it_is_used():
    data = {"cdrom": "x.iso", "kernel": "k", "disks": [{"path": "o.qcow2", "backing": "b.img"}]}
    text = dx.to_string(build(data, backing_formats={Path("/vms/b.img"): "qcow2"}))
    assert [(u.role, str(u.path)) for u in dx.files_of(text)] == [
        ("kernel", "/vms/k"),
        ("disk", "/vms/o.qcow2"),
        ("backing image", "/vms/b.img"),
        ("cdrom", "/vms/x.iso"),
    ]


def test_preferred_qmp_port_is_stable_and_in_range():
    port = dx.preferred_qmp_port("web")
    assert port == dx.preferred_qmp_port("web")
    assert dx.QMP_PORT_BASE <= port < dx.QMP_PORT_BASE + dx.QMP_PORT_COUNT
    assert dx.preferred_qmp_port("web", 1) != port


def test_domain_xml_module_does_not_import_libvirt():
    import subprocess
    import sys

    code = "import sys, ozone_libvirt.domain_xml, ozone_libvirt.config; print('libvirt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
