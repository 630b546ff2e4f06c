"""Many hosts: the hosts file, `--host`, `list --all-hosts`, a config's `host` and
`host: auto` placement.

The first part needs no libvirtd (the hosts file, the placement rule with facts passed in,
libvirt's in-process test driver, a refused port and a silent listener); the second drives
the real CLI against qemu:///system, the session's second host and a third host of this
module's own, which a test stops."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ozone_libvirt import fleet
from ozone_libvirt.config import parse_config
from ozone_libvirt.connection import open_connection
from ozone_libvirt.domain_xml import config_record
from ozone_libvirt.errors import ConfigError, ConnectionFailed, UsageError
from ozone_libvirt.hosts import (
    Capacity,
    Host,
    Inventory,
    NoRoom,
    load_inventory,
    place,
    wanted_host,
)

from .conftest import PREFIX, SECOND_HOST, URI, another_host, ozone_env, run_ozone

GiB = 1024**3
MiB = 1024**2
REFUSED = "qemu+tcp://127.0.0.1:1/system"  # nothing listens on port 1


def write_hosts(folder: Path, hosts: dict[str, object], *, name: str = "hosts.yaml") -> Path:
    path = folder / name
    path.write_text(json.dumps({"hosts": hosts}))  # JSON is YAML too
    return path


def hosts_env(path: Path, **extra: str) -> dict[str, str]:
    return ozone_env(OZONE_HOSTS=str(path), **extra)


# --- the hosts file ------------------------------------------------------------------------


def test_a_host_is_a_uri_or_an_object_with_one_and_the_files_order_is_kept(tmp_path):
    path = tmp_path / "hosts.yaml"
    path.write_text(
        "hosts:\n"
        "  rack2: qemu+ssh://root@rack2/system\n"
        "  local: qemu:///system\n"
        "  rack3: {uri: 'qemu+tcp://10.0.0.3/system'}\n"
    )
    inventory = load_inventory(path, wanted="test")
    assert inventory.hosts == (
        Host("rack2", "qemu+ssh://root@rack2/system"),
        Host("local", "qemu:///system"),
        Host("rack3", "qemu+tcp://10.0.0.3/system"),
    )
    assert inventory.source == path


def test_a_json_hosts_file_works_too(tmp_path):
    path = write_hosts(tmp_path, {"local": "qemu:///system"}, name="hosts.json")
    assert load_inventory(path, wanted="test").names == ("local",)


BAD_FILES = [
    # (id, file text, field path in the message, words in the message or hint)
    ("empty", "", "(top level)", "expected an object"),
    ("a-list", "- qemu:///system\n", "(top level)", "expected an object"),
    ("typo-top-key", "host:\n  local: qemu:///system\n", "host", "did you mean 'hosts'"),
    ("no-hosts-key", "{}\n", "hosts", "missing"),
    ("no-hosts", "hosts: {}\n", "hosts", "lists no host"),
    ("hosts-a-list", "hosts: [qemu:///system]\n", "hosts", "expected an object"),
    ("name-with-space", "hosts:\n  rack 2: qemu:///system\n", "hosts.rack 2", "letters, digits"),
    ("name-auto", "hosts:\n  auto: qemu:///system\n", "hosts.auto", "not a host name"),
    ("uri-a-number", "hosts:\n  rack2: 42\n", "hosts.rack2", "expected a libvirt URI"),
    ("uri-null", "hosts:\n  rack2:\n", "hosts.rack2", "expected a libvirt URI"),
    ("uri-no-scheme", "hosts:\n  rack2: rack2\n", "hosts.rack2", "not valid"),
    ("uri-with-space", "hosts:\n  rack2: 'qemu+ssh://a b/system'\n", "hosts.rack2", "not valid"),
    ("object-typo", "hosts:\n  rack2: {uir: qemu:///system}\n", "hosts.rack2.uir", "'uri'"),
    ("object-no-uri", "hosts:\n  rack2: {}\n", "hosts.rack2.uri", "missing"),
    ("uri-a-list", "hosts:\n  rack2: {uri: [a]}\n", "hosts.rack2.uri", "expected a libvirt"),
    ("yaml-syntax", "hosts:\n  rack2: [qemu\n", "line", "invalid YAML"),
    ("duplicate", "hosts:\n  a: qemu:///system\n  a: test:///default\n", "line 3", "duplicate"),
    ("a-tag", "hosts: !!python/object:os.system {}\n", "line 1", "not allowed"),
]


@pytest.mark.parametrize(
    ("text", "where", "words"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_a_bad_hosts_file_is_one_line_naming_the_file_and_field(tmp_path, text, where, words):
    path = tmp_path / "hosts.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_inventory(path, wanted="test")
    err = caught.value
    said = f"{err.message} {err.hint or ''}"
    assert err.message.startswith(f"{path}: "), err.message
    assert where in err.message and words in said, said
    assert "\n" not in err.message and err.exit_code == 2


def test_a_missing_hosts_file_says_where_ozone_looked_and_how_to_write_one(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_inventory(tmp_path / "nope.yaml", wanted="--host rack2")
    assert "--host rack2 needs the host inventory" in caught.value.message
    assert str(tmp_path / "nope.yaml") in caught.value.message
    assert "hosts: {" in (caught.value.hint or "")


def test_an_unknown_host_name_lists_the_known_ones():
    inventory = Inventory((Host("local", "qemu:///system"), Host("rack2", "x://")), Path("/h"))
    with pytest.raises(UsageError) as caught:
        inventory.get("rakc2")
    assert "no host named 'rakc2' in /h" in caught.value.message
    assert caught.value.hint == "did you mean 'rack2'? known hosts: local, rack2"


def test_connect_beats_host_beats_the_configs_host():
    assert wanted_host(connect="qemu:///x", host="a", config_host="b") is None
    assert wanted_host(connect=None, host="a", config_host="b") == "a"
    assert wanted_host(connect=None, host=None, config_host="b") == "b"
    assert wanted_host(connect=None, host=None, config_host=None) is None


# --- a config's host ------------------------------------------------------------------------


def test_a_configs_host_is_not_part_of_its_definition():
    """Where a VM lives is not what it is: `host` stays out of the digest and the record
    apply compares, so adding it (or `auto`) shows no existing VM as changed."""
    plain = parse_config({"name": "web", "cdrom": "/srv/web.iso"})
    placed = parse_config({"name": "web", "cdrom": "/srv/web.iso", "host": "auto"})
    named = parse_config({"name": "web", "cdrom": "/srv/web.iso", "host": "rack2"})
    assert (placed.host, named.host, plain.host) == ("auto", "rack2", None)
    assert plain.hash == placed.hash == named.hash
    assert config_record(plain) == config_record(named)
    assert "host" not in config_record(named)


@pytest.mark.parametrize("value", ["rack 2", "", 7, "../x"])
def test_a_bad_configs_host_names_the_field(value):
    with pytest.raises(ConfigError) as caught:
        parse_config({"name": "web", "cdrom": "/srv/web.iso", "host": value})
    assert caught.value.message.startswith("host: ")


# --- the placement rule ---------------------------------------------------------------------


def cap(host: str, free_gib: float, cpus: int = 8, running: int = 0) -> Capacity:
    return Capacity(host, int(free_gib * GiB), cpus, running)


def test_the_host_with_the_most_free_memory_wins_and_says_so():
    placed = place([cap("rack1", 4), cap("rack2", 11.2), cap("rack3", 8)], name="web",
                   memory=2 * GiB, vcpus=2)  # fmt: skip
    assert (placed.host, placed.rule) == ("rack2", "placed on rack2: 11.2 GiB free")


def test_a_host_without_room_for_the_memory_or_the_vcpus_is_left_out():
    facts = [cap("big", 64, cpus=2), cap("small", 3), cap("fits", 8)]
    assert place(facts, name="web", memory=4 * GiB, vcpus=4).host == "fits"


def test_free_memory_within_256_mib_is_a_tie_then_spare_cpus_then_the_name():
    near = [cap("b", 10), Capacity("a", 10 * GiB + 100 * MiB, 8, 6), cap("c", 10, running=2)]
    assert place(near, name="web", memory=GiB, vcpus=1).host == "b"  # 8 spare CPUs
    same = [cap("b", 10), cap("a", 10)]
    assert place(same, name="web", memory=GiB, vcpus=1).host == "a"


def test_unreachable_hosts_are_noted():
    placed = place([cap("rack1", 4)], name="web", memory=GiB, vcpus=1,
                   unreachable={"rack2": "connection refused"})  # fmt: skip
    assert placed.host == "rack1"
    assert placed.notes == ("rack2 left out: connection refused",)


def test_no_room_anywhere_is_one_line_naming_each_hosts_free_memory():
    with pytest.raises(NoRoom) as caught:
        place([cap("rack1", 1.5), cap("rack2", 0.5)], name="web", memory=2 * GiB, vcpus=1,
              unreachable={"rack3": "refused"})  # fmt: skip
    message = caught.value.message
    assert message.startswith("no host has room for web (2GiB, 1 vCPU): ")
    assert "rack1 1.5 GiB free" in message and "rack2 0.5 GiB free" in message
    assert "rack3 did not answer" in message and caught.value.exit_code == 1


# --- asking hosts, without libvirtd: the test driver, a refused port, a silent listener ------


def test_one_host_refusing_does_not_stop_the_others_answers():
    inventory = Inventory((Host("gone", REFUSED), Host("test", "test:///default")), Path("/h"))
    found = fleet.list_everywhere(inventory, all_domains=True)
    assert [(v.host, v.name) for v in found.vms] == [("test", "test")]
    (error,) = found.errors
    assert (error.host, error.uri, error.code) == ("gone", REFUSED, "connection")
    assert error.message.startswith(f"cannot connect to host gone ({REFUSED}): ")
    assert "Connection refused" in error.message


def test_auto_finds_the_host_that_has_the_vm_already():
    inventory = Inventory((Host("gone", REFUSED), Host("test", "test:///default")), Path("/h"))
    config = parse_config({"name": "test", "cdrom": "/srv/x.iso", "host": "auto"})
    placed = fleet.locate(inventory, config)
    assert (placed.host, placed.found) == ("test", True)
    assert placed.rule == "test is on test already: not placed again"
    assert placed.notes[0].startswith("gone did not answer, so ozone cannot tell")


def test_auto_weighs_the_hosts_that_answer_and_names_those_that_did_not():
    """The test driver says it has 3 MiB free: no room for a VM there."""
    inventory = Inventory((Host("gone", REFUSED), Host("test", "test:///default")), Path("/h"))
    config = parse_config({"name": f"{PREFIX}new", "cdrom": "/srv/x.iso", "memory": "64MiB"})
    with pytest.raises(NoRoom) as caught:
        fleet.locate(inventory, config)
    assert caught.value.message == (
        f"no host has room for {PREFIX}new (64MiB, 1 vCPU): test 0.0 GiB free, 16 CPUs; "
        "gone did not answer"
    )


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A port that takes TCP connections and never says a word (a stuck daemon, a
    firewall that drops the packets after the handshake)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def test_a_host_that_never_answers_costs_the_connect_timeout_not_for_ever():
    with silent_listener() as port:
        uri = f"qemu+tcp://127.0.0.1:{port}/system"
        began = time.monotonic()
        with pytest.raises(ConnectionFailed) as caught:
            open_connection(uri, host="silent", timeout=1)
        took = time.monotonic() - began
    assert caught.value.message == f"cannot connect to host silent ({uri}): no answer within 1 s"
    assert took < 5


def test_a_host_that_connects_and_then_hangs_is_its_own_error_row(monkeypatch):
    """A daemon that hangs after the connection is made (stopped, deadlocked) must not
    hold the others: past the answer timeout its row says so."""
    import threading

    monkeypatch.setenv("OZONE_CONNECT_TIMEOUT", "1")
    release = threading.Event()
    inventory = Inventory(
        (Host("hung", "test:///default"), Host("ok", "test:///default")), Path("/h")
    )

    def question(conn, host):
        if host.name == "hung":
            release.wait(30)  # never answers within the test's timeout
        return conn.getHostname()

    began = time.monotonic()
    try:
        answers = fleet.ask_all(inventory.hosts, question, timeout=0.5)
    finally:
        release.set()
    assert time.monotonic() - began < 5
    assert answers[1].value and answers[1].error is None
    assert answers[0].value is None and "no answer within 0.5 s" in answers[0].error.message


# --- the command line, without libvirtd --------------------------------------------------------


def test_list_all_hosts_has_a_host_column_a_row_for_a_host_that_failed_and_exits_1(tmp_path):
    with silent_listener() as port:
        silent = f"qemu+tcp://127.0.0.1:{port}/system"
        path = write_hosts(tmp_path, {"test": "test:///default", "gone": REFUSED, "mute": silent})
        began = time.monotonic()
        proc = run_ozone(
            "list", "--all-hosts", "--all", env=hosts_env(path, OZONE_CONNECT_TIMEOUT="2")
        )
        took = time.monotonic() - began
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["HOST", "NAME", "STATE", "VCPUS", "MEMORY", "QMP"]
    assert lines[1].split()[:3] == ["test", "test", "running"]
    assert re.match(r"gone +- +error: cannot connect to host gone \(.*Connection refused", lines[2])
    assert re.match(r"mute +- +error: .*no answer within 2 s$", lines[3]), lines[3]
    assert took < 10  # the silent host costs its own 2 s, not the others'


def test_list_all_hosts_json_has_a_host_per_vm_and_the_errors(tmp_path):
    path = write_hosts(tmp_path, {"gone": REFUSED, "test": "test:///default"})
    proc = run_ozone("list", "--all-hosts", "--all", "--json", env=hosts_env(path))
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert [(v["host"], v["name"]) for v in data["vms"]] == [("test", "test")]
    assert [(e["host"], e["uri"], e["code"]) for e in data["errors"]] == [
        ("gone", REFUSED, "connection")
    ]


def test_list_json_on_one_host_has_no_host_key():
    proc = run_ozone("-c", "test:///default", "list", "--all", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "host" not in json.loads(proc.stdout)[0]


def test_host_picks_from_the_inventory_and_a_refused_host_is_one_line_exit_1(tmp_path):
    path = write_hosts(tmp_path, {"test": "test:///default", "gone": REFUSED})
    proc = run_ozone("--host", "test", "list", "--all", env=hosts_env(path))
    assert (proc.returncode, proc.stdout.split()[5:7]) == (0, ["test", "running"]), proc.stderr
    proc = run_ozone("--host", "gone", "list", env=hosts_env(path))
    assert proc.returncode == 1
    first = proc.stderr.splitlines()[0]
    assert first.startswith(f"error: cannot connect to host gone ({REFUSED}): ")


USAGE = [
    # (id, arguments, words on stderr)
    ("connect-and-host", ["-c", "test:///default", "--host", "test", "list"], "give one"),
    ("unknown-host", ["--host", "tset", "list"], "did you mean 'test'? known hosts: test, gone"),
    ("auto-without-config", ["--host", "auto", "list"], "--host auto places a VM from its config"),
    ("all-hosts-and-host", ["--host", "test", "list", "--all-hosts"], "no --connect or --host"),
]


@pytest.mark.parametrize(("args", "words"), [c[1:] for c in USAGE], ids=[c[0] for c in USAGE])
def test_bad_host_options_are_usage_errors(tmp_path, args, words):
    path = write_hosts(tmp_path, {"test": "test:///default", "gone": REFUSED})
    proc = run_ozone(*args, env=hosts_env(path))
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr


def test_host_without_a_hosts_file_says_where_it_looked(tmp_path):
    proc = run_ozone("--host", "rack2", "list", env=hosts_env(tmp_path / "none.yaml"))
    assert proc.returncode == 2
    assert f"no hosts file at {tmp_path / 'none.yaml'}" in proc.stderr


def test_a_config_naming_a_host_the_inventory_lacks_names_the_file_and_field(tmp_path):
    config = tmp_path / "web.json"
    config.write_text(json.dumps({"name": "web", "cdrom": "/dev/null", "host": "rakc2"}))
    path = write_hosts(tmp_path, {"rack2": REFUSED})
    proc = run_ozone("define", str(config), env=hosts_env(path))
    assert proc.returncode == 2
    assert f"error: {config}: host: no host named 'rakc2'" in proc.stderr
    assert "did you mean 'rack2'?" in proc.stderr
    proc = run_ozone("define", str(config), env=hosts_env(tmp_path / "none.yaml"))
    assert proc.returncode == 2 and f"{config}: host rakc2 needs the host inventory" in proc.stderr


def test_apply_of_configs_on_two_hosts_is_a_usage_error_naming_them(tmp_path):
    folder = tmp_path / "vms"
    folder.mkdir()
    for name, host in (("web", "rack1"), ("db", "rack2")):
        (folder / f"{name}.json").write_text(
            json.dumps({"name": name, "cdrom": "/dev/null", "host": host})
        )
    path = write_hosts(tmp_path, {"rack1": REFUSED, "rack2": REFUSED})
    proc = run_ozone("apply", str(folder), env=hosts_env(path))
    assert proc.returncode == 2
    assert "more than one host (db on rack2, web on rack1)" in proc.stderr, proc.stderr


# --- real hosts ---------------------------------------------------------------------------------


def virsh_on(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=60, check=False
    )


def defined_on(uri: str, name: str) -> bool:
    return virsh_on(uri, "domstate", name).returncode == 0


@pytest.fixture
def cleanup_on() -> Iterator[list[tuple[str, str]]]:
    """(URI, name) pairs whose domains are removed after the test, also when it fails."""
    made: list[tuple[str, str]] = []
    yield made
    for uri, name in made:
        virsh_on(uri, "destroy", name)
        virsh_on(uri, "undefine", name, "--managed-save", "--snapshots-metadata", "--nvram")


@pytest.fixture
def third_host(libvirtd: str) -> Iterator[tuple[str, dict[str, str]]]:
    """A libvirt host of this test's own, which the test may stop; stopped afterwards in
    any case."""
    with another_host(f"ozh{os.getpid()}") as host:
        yield host


def tiny_config(folder: Path, guest: Path, name: str, **extra: object) -> Path:
    path = folder / f"{name}.json"
    data = {"name": name, "memory": "128MiB", "cdrom": str(guest / "ozone-guest.iso"), **extra}
    path.write_text(json.dumps(data))
    return path


@pytest.mark.libvirtd
def test_list_all_hosts_across_three_daemons_then_one_stopped(
    second_host, third_host, guest_image, tmp_path, cleanup_on
):
    third, third_env = third_host
    hosts = {"local": URI, "two": second_host, "three": third}
    path = write_hosts(tmp_path, hosts)
    names = {}
    for host, uri in hosts.items():
        name = names[host] = f"{PREFIX}hosts-{host}"
        cleanup_on.append((uri, name))
        config = tiny_config(tmp_path, guest_image, name)
        proc = run_ozone("--host", host, "define", str(config), env=hosts_env(path))
        assert proc.returncode == 0, proc.stderr
        assert defined_on(uri, name)
    proc = run_ozone("list", "--all-hosts", env=hosts_env(path))
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[:3] for line in proc.stdout.splitlines()[1:]]
    for host, name in names.items():
        assert [host, name, "shut"] in rows, proc.stdout

    subprocess.run([str(SECOND_HOST), "stop"], capture_output=True, env=third_env, timeout=60)
    proc = run_ozone("list", "--all-hosts", env=hosts_env(path))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    rows = [line.split()[:3] for line in lines]
    for host in ("local", "two"):  # the hosts that answer are listed still
        assert [host, names[host], "shut"] in rows, proc.stdout
    (row,) = [line for line in lines if line.startswith("three")]
    assert re.match(rf"three +- +error: cannot connect to host three \({re.escape(third)}\): ", row)
    assert "Connection refused" in row
    data = json.loads(run_ozone("list", "--all-hosts", "--json", env=hosts_env(path)).stdout)
    assert {v["name"]: v["host"] for v in data["vms"] if v["name"] in names.values()} == {
        names["local"]: "local",
        names["two"]: "two",
    }
    assert [e["host"] for e in data["errors"]] == ["three"]


@pytest.mark.libvirtd
def test_host_auto_places_a_vm_says_where_and_a_second_define_finds_it_there(
    second_host, guest_image, tmp_path, cleanup_on
):
    hosts = {"local": URI, "two": second_host, "gone": REFUSED}
    path = write_hosts(tmp_path, hosts)
    name = f"{PREFIX}auto"
    cleanup_on += [(URI, name), (second_host, name)]
    config = tiny_config(tmp_path, guest_image, name, host="auto")
    proc = run_ozone("define", str(config), env=hosts_env(path))
    assert proc.returncode == 0, proc.stderr
    placed = re.search(r"^placed on (local|two): [0-9.]+ GiB free$", proc.stderr, re.M)
    assert placed, proc.stderr
    assert f"note: gone did not answer, so ozone cannot tell whether {name} is there" in proc.stderr
    host = placed.group(1)
    other = "two" if host == "local" else "local"
    assert defined_on(hosts[host], name) and not defined_on(hosts[other], name)

    proc = run_ozone("define", str(config), "--json", env=hosts_env(path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["host"], result["created"]) == (host, False)
    assert result["placement"]["found"] is True
    assert result["placement"]["rule"] == f"{name} is on {host} already: not placed again"
    assert not defined_on(hosts[other], name)  # no second copy

    plain = tiny_config(tmp_path, guest_image, name)  # no host: --host after the command
    proc = run_ozone("define", str(plain), "--host", "auto", env=hosts_env(path))
    assert proc.returncode == 0 and f"{name} is on {host} already" in proc.stderr, proc.stderr


@pytest.mark.libvirtd
def test_host_auto_with_no_room_anywhere_lists_each_hosts_free_memory(
    second_host, guest_image, tmp_path, cleanup_on
):
    path = write_hosts(tmp_path, {"local": URI, "two": second_host})
    name = f"{PREFIX}huge"
    cleanup_on += [(URI, name), (second_host, name)]
    config = tiny_config(tmp_path, guest_image, name, host="auto", memory="16TiB")
    proc = run_ozone("define", str(config), env=hosts_env(path))
    assert proc.returncode == 1
    assert re.match(
        rf"error: no host has room for {name} \(16TiB, 1 vCPU\): "
        r"local [0-9.]+ GiB free, \d+ CPUs; two [0-9.]+ GiB free, \d+ CPUs$",
        proc.stderr.splitlines()[0],
    ), proc.stderr
    assert not defined_on(URI, name) and not defined_on(second_host, name)


@pytest.mark.libvirtd
def test_a_configs_host_picks_where_it_is_defined_and_host_overrides_it(
    second_host, guest_image, tmp_path, cleanup_on
):
    path = write_hosts(tmp_path, {"local": URI, "two": second_host})
    name = f"{PREFIX}named"
    cleanup_on += [(URI, name), (second_host, name)]
    config = tiny_config(tmp_path, guest_image, name, host="two")
    proc = run_ozone("define", str(config), "--json", env=hosts_env(path))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["host"] == "two" and "placement" not in proc.stdout
    assert defined_on(second_host, name) and not defined_on(URI, name)
    proc = run_ozone("--host", "local", "define", str(config), env=hosts_env(path))
    assert proc.returncode == 0, proc.stderr
    assert defined_on(URI, name)
    virsh_on(URI, "undefine", name)
    proc = run_ozone("-c", URI, "define", str(config), env=hosts_env(tmp_path / "none.yaml"))
    assert proc.returncode == 0, proc.stderr  # -c needs no inventory
    assert defined_on(URI, name)
