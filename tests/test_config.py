"""Config loading and validation: pure, no libvirt."""

from __future__ import annotations

import json
import os
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
        ("tcp", "tcp"),
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


# --- hostile and broken files: one-line ConfigError (exit 2), fast, never a traceback -------


def refused(tmp_path: Path, text: str | bytes, suffix: str = ".yaml") -> ConfigError:
    """Write ``text`` as a config file and return the ConfigError that loading it raises."""
    path = tmp_path / f"w{suffix}"
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogatepass")
    path.write_bytes(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert len(message.splitlines()) == 1, message
    return info.value


def laughs(field: str) -> str:
    """The "billion laughs": 9 levels of 9 aliases each, 10**9 strings when expanded."""
    levels = ["&a [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"&{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return f"name: w\ncdrom: x.iso\n{field}: [{', '.join(levels)}]\n"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("field", ["disks", "boot", "accel", "network", "description"])
def test_alias_bomb_is_refused_at_once(tmp_path, field):
    text = laughs(field)
    assert len(text) < 400
    err = refused(tmp_path, text)
    assert "more than 10000 values" in str(err)
    assert "line 3" in str(err)


@pytest.mark.timeout(10)
def test_aliases_within_bounds_still_work(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text(
        "name: w\ncdrom: &iso x.iso\ndisks: [{path: a.qcow2, size: &s 1GiB}]\ndescription: *iso\n"
    )
    assert load_config(path).description == "x.iso"


@pytest.mark.timeout(10)
def test_aliases_cannot_nest_deeper_than_the_bound(tmp_path):
    """Each anchor nests 28 levels above an alias of the previous one; a `<<` merge makes
    the constructor start from the last one, so it would recurse 280 levels deep."""
    chain = [f"&a{i} " + "[" * 28 + (f"*a{i - 1}" if i else "x") + "]" * 28 for i in range(10)]
    text = "name: w\ncdrom: x\nboot: {defs: [" + ", ".join(chain) + "], <<: {z: *a9}}\n"
    assert len(text) < 700
    assert "nested more than 32 levels deep" in str(refused(tmp_path, text))


@pytest.mark.timeout(10)
def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    assert "contains itself" in str(refused(tmp_path, "name: w\ncdrom: x\nboot: &a [*a]\n"))


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("suffix", "text"),
    [
        (".json", "[" * 100_000 + "]" * 100_000),
        (".json", '{"a": ' * 100_000),
        (".yaml", "[" * 100_000),
        (".yaml", "- " * 100_000 + "x"),
        (".yaml", "".join(" " * i + "a:\n" for i in range(100))),
    ],
    ids=["json-list", "json-object", "yaml-flow", "yaml-block", "yaml-indent"],
)
def test_deep_nesting_is_refused(tmp_path, suffix, text):
    assert "nested more than 32 levels deep" in str(refused(tmp_path, text, suffix))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_long_list_is_refused_as_soon_as_it_is_long(tmp_path, suffix):
    text = '{"name": "w", "cdrom": "x", "boot": [' + '"disk", ' * 100_000 + "]}"
    assert "more than 10000 values" in str(refused(tmp_path, text, suffix))


def test_huge_file_is_refused_before_parsing(tmp_path):
    text = '{"name": "w", "cdrom": "x"}' + " " * (1024**2)
    assert "bigger than 1MiB" in str(refused(tmp_path, text, ".json"))


@pytest.mark.timeout(10)
def test_fifo_device_and_directory_are_not_config_files(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")
    folder = tmp_path / "folder.json"
    folder.mkdir()
    for path in (fifo, zero, folder):
        with pytest.raises(ConfigError, match="not a regular file"):
            load_config(path)
        with pytest.raises(ConfigError, match="not a regular file"):
            find_config(str(path))


def test_a_path_with_a_nul_is_a_config_error():
    with pytest.raises(ConfigError, match="not a valid path"):
        load_config("/tmp/w\x00.json")


def test_config_that_is_not_utf8(tmp_path):
    assert "is not UTF-8" in str(refused(tmp_path, b'{"name": "w\xff"}', ".json"))


# every string a config takes, as (data, field): each must refuse control characters
STRING_FIELDS = [
    ({"name": "{}", "cdrom": "x"}, "name"),
    ({"name": "w", "cdrom": "x", "description": "{}"}, "description"),
    ({"name": "w", "cdrom": "x", "machine": "{}"}, "machine"),
    ({"name": "w", "cdrom": "{}"}, "cdrom"),
    ({"name": "w", "kernel": "{}"}, "kernel"),
    ({"name": "w", "kernel": "k", "initrd": "{}"}, "initrd"),
    ({"name": "w", "kernel": "k", "cmdline": "{}"}, "cmdline"),
    ({"name": "w", "cdrom": "x", "serial_log": "{}"}, "serial_log"),
    ({"name": "w", "disks": ["{}"]}, "disks[0].path"),
    ({"name": "w", "disks": [{"path": "a", "backing": "{}"}]}, "disks[0].backing"),
    ({"name": "w", "cdrom": "x", "network": "bridge:{}"}, "network.source"),
    ({"name": "w", "cdrom": "x", "network": {"mac": "{}"}}, "network.mac"),
    ({"name": "w", "cdrom": "x", "qmp": "unix:{}"}, "qmp"),
    ({"name": "w", "cdrom": "x", "qmp": "tcp:{}:4444"}, "qmp"),
    ({"name": "w", "cdrom": "x", "stage_dir": "/{}"}, "stage_dir"),
]


def with_value(data: dict, value: str) -> dict:
    """``data`` with its "{}" placeholder replaced by ``value``."""
    return json.loads(json.dumps(data).replace("{}", json.dumps(value)[1:-1]))


@pytest.mark.parametrize(("data", "field"), STRING_FIELDS, ids=[f for _, f in STRING_FIELDS])
@pytest.mark.parametrize(
    "char", ["\x00", "\x01", "\x1b", "\x7f", "\x85", "\ud800", "\udfff", "\ufffe"]
)
def test_every_string_refuses_what_xml_cannot_carry(data, field, char):
    err = error_of(with_value(data, f"a{char}b"))
    assert err.field == field
    assert f"U+{ord(char):04X}" in str(err)
    assert len(str(err).splitlines()) == 1


@pytest.mark.parametrize(("data", "field"), STRING_FIELDS, ids=[f for _, f in STRING_FIELDS])
def test_one_line_values_refuse_a_trailing_newline(data, field):
    if field in ("description", "cmdline"):
        assert parse(with_value(data, "free\ntext\twith breaks\n"))  # free text may
        return
    err = error_of(with_value(data, "b0\n"))
    assert err.field == field
    assert "one line" in str(err) or "not valid" in str(err)


def test_control_characters_through_json_and_yaml_files(tmp_path):
    err = refused(tmp_path, '{"name": "w", "cdrom": "x", "description": "a\\u0001b"}', ".json")
    assert ": description: contains the control character U+0001" in str(err)
    err = refused(tmp_path, '{"name": "w", "cdrom": "x", "description": "\\ud800"}', ".json")
    assert "lone surrogate" in str(err)
    err = refused(tmp_path, 'name: w\ncdrom: x\ndescription: "a\\x01b"\n')
    assert ": description: contains the control character U+0001" in str(err)
    err = refused(tmp_path, "name: w\ncdrom: x\ndescription: a\x01b\n")  # raw, not escaped
    assert "line 3, column 15" in str(err)


@pytest.mark.parametrize(
    ("suffix", "text"),
    [
        (".json", '{"name": "w", "cdrom": "x", "vcpus": ' + "1" * 5000 + "}"),
        (".json", '{"name": "w", "cdrom": "x", "memory": ' + "9" * 400 + ".5}"),
        (".json", '{"name": "w", "cdrom": "x", "memory": 1' + "0" * 5000 + "e-5000}"),
        (".yaml", "name: w\ncdrom: x\nvcpus: " + "1" * 5000 + "\n"),
        (".yaml", "name: w\ncdrom: x\nmemory: " + "9" * 400 + ".5\n"),
        (".yaml", "name: w\ncdrom: x\nvcpus: 1" + ":1" * 5000 + "\n"),  # YAML 1.1 base 60
    ],
    ids=["json-int", "json-float", "json-exponent", "yaml-int", "yaml-float", "yaml-base60"],
)
def test_numbers_too_long_to_convert_are_refused(tmp_path, suffix, text):
    assert "a number of" in str(refused(tmp_path, text, suffix))


@pytest.mark.parametrize(
    "value",
    [
        "9" * 400 + ".5",
        "1" * 5000 + "MiB",
        "1." + "5" * 5000 + "GiB",
        "\uff15\uff11\uff12MiB",  # fullwidth 512
        "\u0665\u0661\u0662",  # Arabic-Indic 512
        "512²",
        "512 MiB\n",
        " 512\tMiB",
    ],
)
def test_sizes_are_ascii_numbers_of_sane_length(value):
    err = error_of({"name": "w", "cdrom": "x", "memory": value})
    assert err.field == "memory"
    assert "is not a size" in str(err)
    assert len(str(err)) < 300


@pytest.mark.parametrize(
    "value",
    [float("inf"), float("-inf"), float("nan"), 10**5000, -(10**5000), 1e300],
    ids=["inf", "-inf", "nan", "5000-digits", "-5000-digits", "1e300"],
)
def test_sizes_that_are_huge_or_not_numbers(value):
    err = error_of({"name": "w", "cdrom": "x", "memory": value})
    assert err.field == "memory"
    assert len(str(err)) < 300


def test_sizes_are_exact():
    assert parse_size("0.5KiB", where="m") == 512
    assert parse_size(1.5, where="m") == 1536 * 1024
    assert parse_size("16TiB", where="m") == 16 * 1024**4
    # a fraction of a byte is an error, never rounded away (it was: 1153433 bytes)
    for fraction in ("1.1MiB", 1.1, "0.001KiB", "1.0000000001GB"):
        with pytest.raises(ConfigError, match="is not a whole number of bytes"):
            parse_size(fraction, where="m")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("name: w\ncdrom: x\n[1, 2]: 3\n", "a key must be a name, not a list"),
        ("name: w\ncdrom: x\n? {a: 1}\n: 3\n", "a key must be a name, not a list or an object"),
        ("name: w\ncdrom: x\n1: 3\n", "a key must be a name, got number 1"),
        ("name: w\ncdrom: x\nyes: 3\n", "a key must be a name, got boolean true"),
        ("name: w\ncdrom: x\nvcpus: 0b_\n", "'0b_' is not a valid int"),
        ("name: w\ncdrom: x\nvcpus: !!int abc\n", "'abc' is not a valid int"),
        ("name: w\ncdrom: x\nvcpus: !!float abc\n", "'abc' is not a valid float"),
        ("name: w\ncdrom: x\nagent: !!bool maybe\n", "'maybe' is not a valid bool"),
        ("name: w\ncdrom: x\ndescription: !!timestamp x\n", "tag '!!timestamp' is not allowed"),
        ("name: w\ncdrom: x\ndescription: !!binary aGk=\n", "tag '!!binary' is not allowed"),
        ("name: w\ncdrom: x\nboot: !!set {disk: null}\n", "tag '!!set' is not allowed"),
        ("name: w\ncdrom: x\nnetwork: !!map [1]\n", "tag '!!map' is not allowed"),
        ("name: !!python/object:os.system x\n", "tag '!!python/object:os.system' is not"),
        ("name: !local x\n", "tag '!local' is not allowed"),
        ("name: w\ncdrom: x\ncdrom: y\n", "duplicate key 'cdrom'"),
        ("name: w\ncdrom: *nowhere\n", "found undefined alias"),
        ("name: w\n\tcdrom: x\n", "line 2"),
    ],
)
def test_yaml_oddities_are_config_errors_with_a_line(tmp_path, text, words):
    err = refused(tmp_path, text)
    assert words in str(err)
    assert "line " in str(err)


def test_yaml_dates_and_equals_signs_are_strings_as_in_json(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("name: w\ncdrom: x\ndescription: 2024-13-45\ncmdline: =\nkernel: k\n")
    cfg = load_config(path)
    assert (cfg.description, cfg.cmdline) == ("2024-13-45", "=")


@pytest.mark.parametrize(
    "text",
    [
        "root:$6$secretsaltsecretsalt$secrethashsecrethashsecrethash:19000:0:99999:7:::\n"
        "daemon:*:19000:0:99999:7:::\n",
        "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n",
        "SECRET_TOKEN=secrethashsecrethashsecrethash\n",
        "- secrethashsecrethashsecrethash\n",
        "secrethashsecrethashsecrethash: 1\nmore: 2\n",
    ],
    ids=["shadow", "passwd", "env", "list", "mapping"],
)
def test_a_file_that_is_not_a_config_is_never_echoed(tmp_path, text):
    """A config path can be a symlink to a file the user should not read (ozone may run
    with more rights than its user): the error names the file, never its content."""
    system_file = tmp_path / "system-file"
    system_file.write_text(text)
    config = tmp_path / "w.yaml"
    config.symlink_to(system_file)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    err = info.value
    assert str(err).startswith(f"{config}: (top level): ")
    assert "secret" not in str(err) + (err.hint or "")
    assert "daemon" not in str(err) + (err.hint or "")


def test_errors_show_only_a_short_excerpt_of_a_value():
    long = "x" * 10_000 + "SECRET"
    for data in (
        {"name": long, "cdrom": "x"},
        {"name": "w", "cdrom": "x", "accel": long},
        {"name": "w", "cdrom": "x", "memory": long},
        {"name": "w", "cdrom": "x", "qmp": long},
        {"name": "w", "cdrom": "x", long: 1},
        {"name": "w", "cdrom": "x", "network": {long: 1}},
    ):
        err = error_of(data)
        assert "SECRET" not in str(err) + (err.hint or "")
        assert len(str(err)) < 300
        assert len(err.field or "") < 60


# --- files the config names must be regular files --------------------------------------------


@pytest.mark.parametrize("special", ["dir", "/dev/null", "dangling"])
@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "w", "cdrom": "{}"}, "cdrom"),
        ({"name": "w", "kernel": "{}"}, "kernel"),
        ({"name": "w", "kernel": "k.img", "initrd": "{}"}, "initrd"),
        ({"name": "w", "disks": [{"path": "o.qcow2", "backing": "{}"}]}, "disks[0].backing"),
        ({"name": "w", "disks": ["{}"]}, "disks[0].path"),
        ({"name": "w", "disks": [{"path": "{}", "size": "1GiB"}]}, "disks[0].path"),
        ({"name": "w", "cdrom": "x.iso", "serial_log": "{}"}, "serial_log"),
    ],
)
def test_host_paths_must_be_regular_files(tmp_path, special, data, field):
    """QEMU would use a directory or /dev/null as a disk; the log daemon would rotate
    (rename) a device; a dangling symlink would be followed to wherever it points."""
    (tmp_path / "k.img").write_bytes(b"k")
    (tmp_path / "x.iso").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    target = {"dir": tmp_path / "folder", "dangling": tmp_path / "dangling"}.get(special, special)
    cfg = parse(with_value(data, str(target)), source=tmp_path / "w.json")
    with pytest.raises(ConfigError) as info:
        check_host_paths(cfg)
    assert info.value.field == field
    expected = {
        "dir": "is a directory, not a regular file",
        "/dev/null": "is a character device, not a regular file",
        "dangling": "is a symlink to a missing file",
    }
    assert expected[special] in str(info.value)


def test_host_paths_that_are_regular_files_or_can_be_made_pass(tmp_path):
    for name in ("x.iso", "k.img", "base.qcow2", "disk.qcow2", "serial.log"):
        (tmp_path / name).write_bytes(b"data")
    (tmp_path / "link.iso").symlink_to(tmp_path / "x.iso")
    data = {
        "name": "w",
        "cdrom": "link.iso",
        "kernel": "k.img",
        "initrd": "k.img",
        "serial_log": "serial.log",
        "disks": [
            "disk.qcow2",
            {"path": "new.qcow2", "size": "1GiB"},
            {"path": "overlay.qcow2", "backing": "base.qcow2"},
        ],
    }
    check_host_paths(parse(data, source=tmp_path / "w.json"))
    data["serial_log"] = "new.log"
    check_host_paths(parse(data, source=tmp_path / "w.json"))


# --- QMP endpoints cannot smuggle options into QEMU's command line ---------------------------


@pytest.mark.parametrize(
    ("qmp", "source", "words"),
    [
        ("unix:/tmp/q.sock,logfile=/etc/x", SRC, "contains a comma"),
        ("unix:q.sock", Path("/srv/my,vms/w.json"), "contains a comma"),
        ({"endpoint": "tcp:1.2.3.4,x=y:4444", "allow_remote": True}, SRC, "not an endpoint"),
        ({"endpoint": "tcp:fe80::1%eth0,x=y:4444", "allow_remote": True}, SRC, "not an endpoint"),
        ({"endpoint": "tcp:host name:4444", "allow_remote": True}, SRC, "not an endpoint"),
        ({"endpoint": "tcp::4444", "allow_remote": True}, SRC, "not an endpoint"),
        ({"endpoint": "tcp:a..b:4444", "allow_remote": True}, SRC, "not an endpoint"),
        ("tcp:127.0.0.1:\uff14\uff14\uff14\uff14", SRC, "not an endpoint"),
        ("tcp:127.0.0.1:4444²", SRC, "not an endpoint"),
        ("tcp:127.0.0.1:4444\n", SRC, "one line"),
    ],
)
def test_qmp_endpoints_cannot_inject_options(qmp, source, words):
    err = error_of({"name": "w", "cdrom": "x", "qmp": qmp}, source=source)
    assert (err.field or "").startswith("qmp")
    assert words in str(err)


@pytest.mark.parametrize(
    ("value", "endpoint"),
    [
        ({"endpoint": "tcp:[::1]:4444"}, "tcp:[::1]:4444"),
        ({"endpoint": "tcp:::1:4444"}, "tcp:[::1]:4444"),
        (
            {"endpoint": "tcp:vm-host.example.com:4444", "allow_remote": True},
            "tcp:vm-host.example.com:4444",
        ),
        ({"endpoint": "tcp:[2001:db8::1]:4444", "allow_remote": True}, "tcp:[2001:db8::1]:4444"),
    ],
)
def test_qmp_hosts_that_are_addresses_or_names(value, endpoint):
    assert parse({"name": "w", "cdrom": "x", "qmp": value}).qmp.endpoint == endpoint


def test_find_config_refuses_a_name_with_a_newline(tmp_path, monkeypatch):
    (tmp_path / "web.json").write_text('{"name": "web", "cdrom": "x.iso"}')
    monkeypatch.setenv("OZONE_CONFIG_PATH", str(tmp_path))
    assert find_config("web") == tmp_path / "web.json"
    with pytest.raises(ConfigError, match="not a VM name"):
        find_config("web\n")


# --- stage_dir --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "normalised"),
    [("/var/tmp", "/var/tmp"), ("/var/tmp/", "/var/tmp"), ("//srv//x/../y/.", "/srv/y")],
)
def test_stage_dir_is_an_absolute_normalised_guest_folder(value, normalised):
    cfg = parse({"name": "w", "cdrom": "x", "stage_dir": value})
    assert cfg.stage_dir == normalised
    assert cfg.to_dict()["stage_dir"] == normalised
    assert cfg.hash != parse({"name": "w", "cdrom": "x"}).hash
    assert parse({"name": "w", "cdrom": "x"}).stage_dir is None


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("var/tmp", "not absolute"),
        ("", "empty"),
        ("/", "must not be / itself"),
        ("//", "must not be / itself"),
        ("/a/..", "must not be / itself"),
        ("/var/tmp\n", "one line"),
        ("/var\x00/tmp", "U+0000"),
        ("/var\x1b[31m", "U+001B"),
        (17, "expected an absolute guest folder"),
        (["/tmp"], "expected an absolute guest folder"),
    ],
)
def test_stage_dir_refusals(value, words):
    err = error_of({"name": "w", "cdrom": "x", "stage_dir": value})
    assert err.field == "stage_dir"
    assert words in str(err)


def test_stage_dir_typo_is_suggested():
    err = error_of({"name": "w", "cdrom": "x", "stagedir": "/tmp"})
    assert "did you mean 'stage_dir'" in (err.hint or "")
