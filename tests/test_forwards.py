"""Port forwards, shares and `ozone ssh` without a Debian guest: the config's checks, the
domain XML and metadata they make (pure), and on a real libvirtd with the tiny busybox guest
(no sshd): ssh ports unique per VM, a port taken at start, the ssh port moving away from
another program, ssh's message when nothing answers. test_guest_access.py has the rest."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from ozone_libvirt import cloudinit
from ozone_libvirt import domain_xml as dx
from ozone_libvirt.config import parse_config
from ozone_libvirt.errors import ConfigError
from ozone_libvirt.metadata import Forward, parse_metadata

from .conftest import PREFIX, guest_sh, run_ozone, virsh

FACTS = dx.HostFacts(qmp_dir=Path("/var/lib/ozone/qmp"))
Q = "{http://libvirt.org/schemas/domain/qemu/1.0}"


def config(**data: object):
    return parse_config({"name": "web", "cdrom": "x.iso", **data}, source=Path("/vms/web.json"))


def refusal(**data: object) -> str:
    with pytest.raises(ConfigError) as caught:
        config(**data)
    return str(caught.value)


# --- config -----------------------------------------------------------------------------------


def test_port_forms():
    ports = config(
        ports=["8080:80", "127.0.0.2:8443:443", "udp:5353:53", 9000, {"forward": "tcp:8081:81"}]
    ).ports
    assert [str(p.forward) for p in ports] == [
        "tcp:127.0.0.1:8080:80",
        "tcp:127.0.0.2:8443:443",
        "udp:127.0.0.1:5353:53",
        "tcp:127.0.0.1:9000:9000",
        "tcp:127.0.0.1:8081:81",
    ]
    remote = config(ports=[{"forward": "0.0.0.0:8080:80", "allow_remote": True}]).ports[0]
    assert (remote.host, remote.allow_remote) == ("0.0.0.0", True)


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        (["0.0.0.0:8080:80"], "ports[0]: a forward from 0.0.0.0 is reachable from other machines"),
        (["80:80"], "ports[0]: host port 80 is out of range 1024-65535"),
        (["8080:0"], "ports[0]: guest port 0 is out of range 1-65535"),
        (["8080:70000"], "guest port 70000 is out of range"),
        (["8080"], "is not a port forward"),
        (["sctp:8080:80"], "protocol 'sctp' is not tcp or udp"),
        (["[::1]:8080:80"], "forwards from IPv4 addresses only"),
        (["localhost:8080:80"], "is not an IPv4 address"),
        (["8080:80", "127.0.0.1:8080:81"], "ports[1]: host port 8080/tcp is already forwarded by"),
        (
            [{"forward": "0.0.0.0:8080:80", "allow_remote": True}, "8080:81"],
            "ports[1]: host port 8080/tcp is already forwarded by ports[0]",
        ),
        ([{"forward": "8080:80", "allow": True}], "ports[0].allow"),
        ("8080:80", "ports: expected a list of port forwards"),
    ],
)
def test_bad_ports(ports, expected):
    assert expected in refusal(ports=ports)


def test_same_port_for_tcp_and_udp_and_other_addresses_is_fine():
    ports = config(ports=["8080:80", "udp:8080:80", "127.0.0.2:8080:80"]).ports
    assert len(ports) == 3


def test_ports_need_user_networking():
    message = refusal(network="network:default", ports=["8080:80"])
    assert "ports: ports are forwarded by QEMU's user networking" in message


@pytest.mark.parametrize(
    ("shares", "expected"),
    [
        ([{"host": "/srv"}], "shares[0].guest: missing"),
        ([{"guest": "/srv"}], "shares[0].host: missing"),
        ([{"host": "/srv", "guest": "srv"}], "is not absolute"),
        ([{"host": "/srv", "guest": "/"}], "must not be / itself"),
        ([{"host": "/srv", "guest": "/srv/my site"}], "may hold letters, digits"),
        ([{"host": "/srv", "guest": "/srv/a,b"}], "may hold letters, digits"),
        ([{"host": "/a", "guest": "/x"}, {"host": "/b", "guest": "/x/"}], "already shares[0]"),
        ([{"host": "/a", "guest": "/x", "readonly": "yes"}], "shares[0].readonly"),
        ([{"host": "/a", "guest": "/x", "mode": "ro"}], "shares[0].mode"),
        ([{"host": "/a", "guest": "/srv/../etc"}], "no '..' in a share's guest folder"),
        ([{"host": "/a", "guest": "/etc"}], "/etc is a system folder"),
        ([{"host": "/a", "guest": "/usr/local/"}], "/usr/local is a system folder"),
        ([{"host": "/a", "guest": "/proc/x"}], "/proc/x is a system folder"),
        ([{"host": "/a", "guest": "/x" * 200}], "at most 255 characters"),
        ([{"host": "/a,b", "guest": "/x"}], "contains a comma"),
        ([{"host": "~ozt-no-such-user/x", "guest": "/x"}], "names a user this host does not have"),
    ],
)
def test_bad_shares(shares, expected):
    assert expected in refusal(shares=shares)


def test_a_missing_share_folder_is_named(tmp_path):
    from ozone_libvirt.config import check_shares

    (tmp_path / "file").write_text("")
    for host, expected in [
        (tmp_path / "nothere", "does not exist"),
        (tmp_path / "file", "is not a folder"),
    ]:
        with pytest.raises(ConfigError, match=expected) as caught:
            check_shares(config(shares=[{"host": str(host), "guest": "/srv/site"}]))
        assert "shares[0].host" in str(caught.value)


def test_the_read_only_wrapper_refuses_arguments_it_cannot_read_safely():
    wrapper = Path(cloudinit.__file__).parent / "data" / "virtiofsd-ro"
    for args, expected in [
        (["--fd=3", "-o", "source=/a,,b"], "a comma in a shared folder's path"),
        (["--fd=3", "-o", "source=/a,source=/b"], "more than one source"),
        (["--fd=3"], "no '-o source=FOLDER'"),
    ]:
        proc = subprocess.run(["sh", str(wrapper), *args], capture_output=True, text=True)
        assert proc.returncode == 1 and expected in proc.stderr, proc.stderr


# --- domain XML and metadata ------------------------------------------------------------------


def test_user_networking_gets_an_ssh_forward_and_the_config_ports():
    cfg = config(ports=["8080:80", "udp:5353:53"])
    forwards = dx.planned_forwards(cfg)
    assert forwards[0] == Forward("tcp", "127.0.0.1", dx.preferred_ssh_port("web"), 22, True)
    assert [str(f) for f in forwards[1:]] == ["tcp:127.0.0.1:8080:80", "udp:127.0.0.1:5353:53"]
    root = dx.build_domain(cfg, facts=FACTS, qmp_endpoint=None, forwards=forwards)
    assert root.find("devices/interface") is None  # the NIC is QEMU's own
    args = [a.get("value") for a in root.iter(f"{Q}arg")]
    netdev = args[args.index("-netdev") + 1]
    assert netdev == (
        f"user,id=ozone-net0,hostfwd=tcp:127.0.0.1:{forwards[0].port}-:22,"
        "hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp:127.0.0.1:5353-:53"
    )
    device = json.loads(args[args.index("-device") + 1])
    assert device["driver"] == "virtio-net-pci" and device["netdev"] == "ozone-net0"
    meta = parse_metadata(dx.to_string(root))
    assert meta is not None and meta.forwards == forwards
    assert meta.ssh_forward == forwards[0]


def test_a_config_port_to_22_is_the_ssh_forward():
    cfg = config(ports=["2222:22"])
    assert [str(f) for f in dx.planned_forwards(cfg)] == ["tcp:127.0.0.1:2222:22"]


def test_other_networks_get_no_forwards_and_keep_libvirts_interface():
    cfg = config(network="network:default")
    assert dx.planned_forwards(cfg) == ()
    root = dx.build_domain(cfg, facts=FACTS, qmp_endpoint=None, forwards=())
    assert root.find("devices/interface").get("type") == "network"


def test_with_forwards_moves_a_port_in_the_command_line_and_the_metadata():
    cfg = config(ports=["8080:80"])
    forwards = dx.planned_forwards(cfg)
    xml = dx.to_string(dx.build_domain(cfg, facts=FACTS, qmp_endpoint=None, forwards=forwards))
    moved = (forwards[0]._replace(port=21999), forwards[1])
    again = dx.with_forwards(xml, moved)
    meta = parse_metadata(again)
    assert meta is not None and meta.forwards == moved
    assert "hostfwd=tcp:127.0.0.1:21999-:22,hostfwd=tcp:127.0.0.1:8080-:80" in again


def test_shares_are_virtiofs_with_shared_memory_and_say_how_the_guest_mounts_them():
    cfg = config(
        shares=[
            {"host": "/srv/a", "guest": "/srv/a"},
            {"host": "b", "guest": "/b", "readonly": True},
        ]
    )
    xml = dx.to_string(dx.build_domain(cfg, facts=FACTS, qmp_endpoint=None))
    root = etree.fromstring(xml.encode())
    assert root.find("memoryBacking/source").get("type") == "memfd"
    assert root.find("memoryBacking/access").get("mode") == "shared"
    fs = root.findall("devices/filesystem")
    assert [f.find("driver").get("type") for f in fs] == ["virtiofs", "virtiofs"]
    assert [f.find("source").get("dir") for f in fs] == ["/srv/a", "/vms/b"]
    assert [(s.tag, s.guest, s.readonly) for s in dx.shares_of(xml)] == [
        ("share0", "/srv/a", False),
        ("share1", "/b", True),
    ]
    assert dx.shares_of(xml)[1].fstab == "share1 /b virtiofs ro,nofail 0 0"


def test_mount_unit_names_are_systemds():
    for folder in ["/srv/site", "/srv/my-site", "/home/dev/.cache", "/a/b@c+d/e_f.g"]:
        escaped = subprocess.run(
            ["systemd-escape", "--path", "--suffix=mount", folder],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert cloudinit.mount_unit_name(folder) == escaped


def test_the_seed_mounts_shares_and_authorises_the_vms_key():
    cfg = config(
        cloud_init={"users": [{"name": "dev"}]},
        shares=[{"host": "/srv", "guest": "/srv/site", "readonly": True}],
    )
    doc = cloudinit.cloud_config(
        cfg.cloud_init,
        hostname="web",
        default_keys=(),
        install_agent=False,
        vm_key="ssh-ed25519 AAAA ozone-web",
        shares=cfg.shares,
    )
    assert doc["users"][0]["ssh_authorized_keys"] == ["ssh-ed25519 AAAA ozone-web"]
    (unit,) = doc["write_files"]
    assert unit["path"] == "/etc/systemd/system/srv-site.mount"
    assert "What=share0\nWhere=/srv/site\nType=virtiofs\nOptions=ro\n" in unit["content"]
    assert doc["runcmd"][-1] == ["systemctl", "enable", "--now", "srv-site.mount"]
    no_users = cloudinit.cloud_config(
        config(cloud_init={}).cloud_init,
        hostname="web",
        default_keys=(),
        install_agent=False,
        vm_key="ssh-ed25519 AAAA ozone-web",
    )
    # `ozone ssh` logs in as root then: cloud-init must not lock root's key away
    assert no_users["ssh_authorized_keys"] == ["ssh-ed25519 AAAA ozone-web"]
    assert no_users["disable_root"] is False


# --- a real libvirtd, the tiny guest ----------------------------------------------------------


def ssh_port(name: str) -> int:
    proc = run_ozone("status", name, "--json")
    assert proc.returncode == 0, proc.stderr
    return int(json.loads(proc.stdout)["ssh"].rsplit(":", 1)[1])


@pytest.mark.libvirtd
@pytest.mark.guest
def test_ssh_ports_differ_and_move_away_from_another_program(vms):
    first, path1 = vms.config()
    second, path2 = vms.config()
    for path in (path1, path2):
        assert run_ozone("define", str(path)).returncode == 0
    taken = ssh_port(first)
    assert ssh_port(second) != taken
    assert run_ozone("define", str(path1)).returncode == 0  # defined again: the port stays
    assert ssh_port(first) == taken
    proc = run_ozone("ssh", second)
    assert proc.returncode == 1 and f"{second} is not running" in proc.stderr, proc.stderr
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        proc = run_ozone("start", first, "--wait")
        assert proc.returncode == 0, proc.stderr
        moved = ssh_port(first)
        assert moved not in (taken, ssh_port(second))
        listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{moved} " in listening
    # the guest has no sshd: ozone ssh says so, with ssh's status
    proc = run_ozone("ssh", "-o", "ConnectTimeout=3", first, "--", "true")  # (else 30 s)
    assert proc.returncode == 255
    assert f"no ssh server answers on {first}'s port 22 (through 127.0.0.1:{moved})" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.libvirtd
@pytest.mark.guest
def test_start_reports_a_forwarded_port_taken_by_another_program(vms):
    with socket.socket(type=socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        port = squatter.getsockname()[1]
        name, path = vms.config({"ports": [f"udp:{port}:53"]})
        assert run_ozone("define", str(path)).returncode == 0
        proc = run_ozone("start", name)
        assert proc.returncode == 1, proc.stderr
        assert (
            f"host port 127.0.0.1:{port}/udp, which {name!r} forwards to its port 53, is in "
            "use by another program" in proc.stderr
        )
        assert "Traceback" not in proc.stderr
    assert virsh("domstate", name).strip() == "shut off"


@pytest.fixture
def network(libvirtd: str, tmp_path: Path) -> Iterator[str]:
    """An isolated libvirt network of the test's own (a bridge, no DHCP, no DNS)."""
    name = f"{PREFIX}net"
    xml = tmp_path / "net.xml"
    xml.write_text(
        f"<network><name>{name}</name><bridge name='oztbr{os.getpid() % 100000}'/>"
        "<dns enable='no'/><ip address='192.168.250.1' netmask='255.255.255.0'/></network>"
    )
    virsh("net-create", str(xml))  # transient: gone once destroyed
    try:
        yield name
    finally:
        virsh("net-destroy", name, check=False)


@pytest.mark.libvirtd
@pytest.mark.guest
def test_ssh_on_a_libvirt_network_goes_to_the_guests_address(vms, network):
    name, path = vms.config({"network": f"network:{network}"})
    assert run_ozone("define", str(path)).returncode == 0
    proc = run_ozone("start", name, "--wait")
    assert proc.returncode == 0, proc.stderr
    # the tiny guest configures no NIC itself: give it an address the agent then reports
    guest_sh(name, "ip link set eth0 up && ip addr add 192.168.250.2/24 dev eth0")
    assert json.loads(run_ozone("status", name, "--json").stdout)["ssh"] is None  # no forward
    proc = run_ozone("ssh", name, "--", "true")
    assert proc.returncode == 255
    assert f"no ssh server answers on {name}'s port 22 (through 192.168.250.2:22)" in proc.stderr
