"""Config loading and validation: pure, no libvirt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ozone_libvirt.config import (
    check_host_paths,
    find_config,
    load_config,
    parse_config,
    parse_size,
)
from ozone_libvirt.errors import ConfigError
from ozone_libvirt.units import format_size

SRC = Path("/srv/vms/web.json")


def parse(data: dict, source: Path = SRC):
    return parse_config(data, source=source)


def error_of(data: object, source: Path = SRC) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source=source)
    return info.value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (512, 512 * 1024**2),
        ("512", 512 * 1024**2),
        ("512MiB", 512 * 1024**2),
        ("512M", 512 * 1024**2),
        ("2GiB", 2 * 1024**3),
        ("2G", 2 * 1024**3),
        ("2GB", 2 * 1000**3),
        ("1.5GiB", 1536 * 1024**2),
        ("4096KiB", 4 * 1024**2),
        ("1TiB", 1024**4),
        ("100 MiB", 100 * 1024**2),
    ],
)
def test_sizes(text, expected):
    assert parse_size(text, where="memory") == expected


@pytest.mark.parametrize("bad", ["-512MiB", "lots", "12XB", "", True, None, [1]])
def test_bad_sizes(bad):
    with pytest.raises(ConfigError) as info:
        parse_size(bad, where="memory")
    assert "memory" in str(info.value)


def test_format_size():
    assert format_size(512 * 1024**2) == "512MiB"
    assert format_size(3 * 1024**3) == "3GiB"
    assert format_size(1000) == "1000B"


def test_minimal_config_gets_defaults():
    cfg = parse({"name": "web", "cdrom": "debian.iso"})
    assert cfg.memory == 512 * 1024**2
    assert cfg.vcpus == 1
    assert cfg.machine == "q35"
    assert cfg.accel == "auto"
    assert cfg.agent is True
    assert cfg.network.type == "user"
    assert cfg.qmp.kind == "auto"
    assert cfg.boot == ("cdrom",)
    assert cfg.cdrom == Path("/srv/vms/debian.iso")  # relative to the config's folder


def test_memory_reaches_the_config():
    """The original Ozone passed an empty -m: the memory in the file must arrive."""
    cfg = parse({"name": "web", "memory": "2GiB", "vcpus": 3, "cdrom": "x.iso"})
    assert cfg.memory == 2 * 1024**3
    assert cfg.vcpus == 3


def test_default_boot_order_is_cdrom_then_disk():
    cfg = parse({"name": "web", "cdrom": "d.iso", "disks": [{"path": "a.qcow2", "size": "1G"}]})
    assert cfg.boot == ("cdrom", "disk")
    assert cfg.disks[0].path == Path("/srv/vms/a.qcow2")
    assert cfg.disks[0].size == 1024**3


def test_disk_shorthand_and_backing():
    cfg = parse(
        {
            "name": "w",
            "disks": ["root.qcow2", {"path": "/abs/data.qcow2", "backing": "../base.qcow2"}],
        }
    )
    assert cfg.disks[0].path == Path("/srv/vms/root.qcow2")
    assert cfg.disks[1].backing == Path("/srv/base.qcow2")


@pytest.mark.parametrize(
    ("value", "kind", "source"),
    [
        ("user", "user", None),
        ("none", "none", None),
        ("network:default", "network", "default"),
        ("bridge:br0", "bridge", "br0"),
        ({"type": "bridge", "source": "virbr1", "mac": "52:54:00:AA:bb:cc"}, "bridge", "virbr1"),
    ],
)
def test_network_forms(value, kind, source):
    cfg = parse({"name": "w", "cdrom": "x.iso", "network": value})
    assert cfg.network.type == kind
    assert cfg.network.source == source


@pytest.mark.parametrize(
    ("value", "endpoint"),
    [
        ("auto", "auto"),
        ("off", "off"),
        (False, "off"),
        ("tcp:127.0.0.1:4444", "tcp:127.0.0.1:4444"),
        ("tcp:localhost:4444", "tcp:localhost:4444"),
        ("unix:qmp.sock", "unix:/srv/vms/qmp.sock"),
        ({"endpoint": "tcp:0.0.0.0:4444", "allow_remote": True}, "tcp:0.0.0.0:4444"),
    ],
)
def test_qmp_forms(value, endpoint):
    assert parse({"name": "w", "cdrom": "x.iso", "qmp": value}).qmp.endpoint == endpoint


def test_hash_ignores_formatting_but_not_content():
    a = parse({"name": "w", "cdrom": "x.iso", "memory": "1GiB"})
    b = parse({"cdrom": "x.iso", "memory": 1024, "name": "w"})
    c = parse({"name": "w", "cdrom": "x.iso", "memory": "2GiB"})
    assert a.hash == b.hash
    assert a.hash != c.hash


def test_json_and_yaml_give_the_same_config(tmp_path):
    data = {
        "name": "w",
        "memory": "1GiB",
        "vcpus": 2,
        "cdrom": "x.iso",
        "disks": [{"path": "a.qcow2", "size": "2GiB"}],
        "qmp": "tcp:127.0.0.1:4444",
    }
    (tmp_path / "w.json").write_text(json.dumps(data))
    import yaml

    (tmp_path / "w.yaml").write_text(yaml.safe_dump(data))
    assert load_config(tmp_path / "w.json").to_dict() == load_config(tmp_path / "w.yaml").to_dict()


# --- errors: each names the field and says what was expected -------------------------------


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"name": "w", "cdrom": "x", "memroy": "1G"}, "memroy", "did you mean 'memory'"),
        ({"name": "w", "cdrom": "x", "vcpus": "two"}, "vcpus", "whole number"),
        ({"name": "w", "cdrom": "x", "vcpus": 0}, "vcpus", "between 1 and"),
        ({"name": "w", "cdrom": "x", "memory": "-1GiB"}, "memory", "not a size"),
        ({"name": "w", "cdrom": "x", "memory": "1MiB"}, "memory", "between"),
        ({"name": "../../etc/passwd", "cdrom": "x"}, "name", "letters, digits"),
        ({"name": "web<script>", "cdrom": "x"}, "name", "not valid"),
        ({"cdrom": "x"}, "name", "missing"),
        ({"name": "w", "cdrom": "x", "accel": "kmv"}, "accel", "did you mean 'kvm'"),
        ({"name": "w", "cdrom": "x", "initrd": "i"}, "initrd", "needs a kernel"),
        ({"name": "w", "disks": ["a.qcow2"], "boot": ["cdrom"]}, "boot[0]", "no cdrom"),
        ({"name": "w", "cdrom": "x", "qmp": "tcp:0.0.0.0:4444"}, "qmp", "no authentication"),
        ({"name": "w", "cdrom": "x", "qmp": "tcp:127.0.0.1:99999"}, "qmp", "out of range"),
        ({"name": "w", "cdrom": "x", "qmp": "udp:1"}, "qmp", "not a QMP endpoint"),
        ({"name": "w", "cdrom": "x", "network": "bridge"}, "network.source", "needs its name"),
        (
            {"name": "w", "cdrom": "x", "network": {"type": "user", "mac": "zz"}},
            "network.mac",
            "MAC address",
        ),
        ({"name": "w", "disks": [{"size": "1G"}]}, "disks[0].path", "missing"),
        (
            {"name": "w", "disks": [{"path": "a", "sise": "1G"}]},
            "disks[0].sise",
            "did you mean 'size'",
        ),
        ({"name": "w", "disks": [{"path": "a", "format": "vmdk"}]}, "disks[0].format", "one of"),
        (
            {"name": "w", "disks": [{"path": "a", "format": "raw", "backing": "b"}]},
            "disks[0].backing",
            "qcow2",
        ),
        ({"name": "w", "disks": ["a", "a"]}, "disks[1].path", "same image"),
        ({"name": "w", "disks": "a.qcow2"}, "disks", "list"),
        ({"name": "w"}, "disks", "nothing to boot"),
        ({"name": "w", "cdrom": "x", "agent": "yes"}, "agent", "true or false"),
        ({"name": "w", "cdrom": ""}, "cdrom", "empty"),
        ({"name": "w", "cdrom": "x", "graphics": "sdl"}, "graphics", "one of"),
    ],
)
def test_config_errors_name_the_field(data, field, words):
    err = error_of(data)
    assert err.field == field
    assert str(SRC) in str(err)
    assert words in str(err) + (err.hint or "")


def test_top_level_must_be_an_object():
    assert "expected an object" in str(error_of(["name", "w"]))


def test_json_syntax_error_has_line_and_column(tmp_path):
    path = tmp_path / "w.json"
    path.write_text('{\n  "name": "w",\n  "memory": 512,,\n}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line 3, column 17" in str(info.value)


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("name: w\nmemory: [512\ncdrom: x.iso\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line 3, column" in str(info.value)


@pytest.mark.parametrize(
    ("suffix", "text"),
    [
        (".json", '{"name": "w", "name": "v", "cdrom": "x"}'),
        (".yaml", "name: w\ncdrom: x\nname: v\n"),
    ],
)
def test_duplicate_keys_are_errors(tmp_path, suffix, text):
    path = tmp_path / f"w{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "duplicate key 'name'" in str(info.value)


def test_missing_config_file():
    with pytest.raises(ConfigError) as info:
        load_config("/nonexistent/w.json")
    assert "no such file" in str(info.value)


def test_check_host_paths(tmp_path):
    cfg = parse({"name": "w", "cdrom": "missing.iso"}, source=tmp_path / "w.json")
    with pytest.raises(ConfigError) as info:
        check_host_paths(cfg)
    assert info.value.field == "cdrom"
    cfg = parse({"name": "w", "disks": ["none.qcow2"]}, source=tmp_path / "w.json")
    with pytest.raises(ConfigError) as info:
        check_host_paths(cfg)
    assert info.value.field == "disks[0].path"
    assert "size" in (info.value.hint or "")
    cfg = parse(
        {"name": "w", "disks": [{"path": "no/dir/x.qcow2", "size": "1G"}]},
        source=tmp_path / "w.json",
    )
    with pytest.raises(ConfigError) as info:
        check_host_paths(cfg)
    assert "folder" in str(info.value)


# --- lookup by name --------------------------------------------------------------------------


def test_find_config_on_search_path(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (second / "web.yaml").write_text("name: web\ncdrom: x.iso\n")
    monkeypatch.setenv("OZONE_CONFIG_PATH", f"{first}:{second}")
    assert find_config("web") == second / "web.yaml"
    (first / "web.json").write_text('{"name": "web", "cdrom": "x.iso"}')
    assert find_config("web") == first / "web.json"  # earlier folders win
    (first / "web.yml").write_text("name: web\n")
    with pytest.raises(ConfigError, match="more than one"):
        find_config("web")
    with pytest.raises(ConfigError, match="no config named 'db'"):
        find_config("db")
    with pytest.raises(ConfigError, match="not a VM name"):
        find_config("we b")


def test_find_config_by_path(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{}")
    assert find_config(str(path)) == path
    with pytest.raises(ConfigError, match="no such config file"):
        find_config(str(tmp_path / "nope.json"))


def test_default_search_path_is_vms_then_user_config(monkeypatch, tmp_path):
    monkeypatch.delenv("OZONE_CONFIG_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vms").mkdir()
    (tmp_path / "vms" / "web.json").write_text("{}")
    assert find_config("web") == tmp_path / "vms" / "web.json"
