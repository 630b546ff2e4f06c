"""One schema, two uses: the table in ozone_libvirt/schema.py drives the config checker, the
JSON Schema and the README's config reference. Pure: no libvirt.

The checker and the JSON Schema must agree: every example and every good config passes both,
every bad config fails both. What JSON Schema cannot say (files on the host, the host's QEMU
and libvirt networks, size ranges written as strings, most rules relating two fields) is
listed in CHECKER_ONLY, each with why."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from hypothesis import given

from ozone_libvirt import schema
from ozone_libvirt.config import parse_config, parse_size, read_config_data
from ozone_libvirt.errors import ConfigError

from .conftest import REPO
from .test_bad_config import CASES
from .test_config_fuzz import FUZZ, documents

EXAMPLES = sorted(p for p in (REPO / "examples").iterdir() if p.suffix in (".json", ".yaml"))
VALIDATOR = jsonschema.Draft202012Validator(schema.json_schema())

BASE = {
    "name": "web",
    "memory": "256MiB",
    "cdrom": "ok.iso",
    "disks": [{"path": "root.qcow2", "size": "64MiB"}],
}


def config(overrides: dict[str, Any]) -> dict[str, Any]:
    """BASE with ``overrides`` (a None value removes the key), as test_bad_config builds them."""
    data = {**BASE, **overrides}
    return {k: v for k, v in data.items() if v is not None}


def checker_accepts(data: object) -> bool:
    try:
        parse_config(data)
    except ConfigError:
        return False
    return True


def test_the_json_schema_is_a_valid_draft_2020_12_schema():
    document = schema.json_schema()
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(document)
    assert document["required"] == ["name"]  # memory has a default (512MiB), as in the checker
    assert document["additionalProperties"] is False
    assert json.loads(json.dumps(document)) == document  # plain JSON data


def test_python_m_ozone_libvirt_schema_prints_the_json_schema():
    proc = subprocess.run(
        [sys.executable, "-m", "ozone_libvirt.schema", "--json"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    assert json.loads(proc.stdout) == schema.json_schema()


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_passes_the_json_schema_and_the_checker(example):
    data = read_config_data(example)
    assert not list(VALIDATOR.iter_errors(data))
    assert checker_accepts(data)


GOOD = [
    {"name": "a", "cdrom": "x.iso"},
    config({"memory": 2048, "vcpus": 4, "accel": "tcg", "graphics": "vnc", "agent": False}),
    config({"memory": "1.5GiB", "machine": "pc", "description": "two\nlines"}),
    config({"memory": "100 MiB", "boot": "disk"}),
    config({"memory": 256.5, "disks": [{"path": "a.qcow2", "size": 1.25}]}),
    config({"memory": "2GB", "boot": ["cdrom", "disk", "network"]}),
    config({"disks": ["a.qcow2", {"path": "b.img", "format": "raw", "bus": "sata"}]}),
    config({"disks": [{"path": "o.qcow2", "backing": "base.qcow2", "readonly": True}]}),
    config({"cdrom": None, "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "quiet"}),
    config({"network": "bridge:br0"}),
    config({"network": {"type": "network", "source": "default", "mac": "52:54:00:AA:bb:01"}}),
    config({"network": {"model": "e1000e"}}),
    config({"qmp": "tcp"}),
    config({"qmp": "tcp:127.0.0.1:4444"}),
    config({"qmp": "unix:/var/lib/libvirt/qemu/web.qmp"}),
    config({"qmp": False}),
    config({"qmp": None}),
    config({"qmp": {"endpoint": "tcp:0.0.0.0:4444", "allow_remote": True}}),
    config({"ports": ["8080:80", 2222, "udp:5353:53", "127.0.0.1:8443:443"]}),
    config({"ports": [{"forward": "0.0.0.0:8080:80", "allow_remote": True}]}),
    config({"network": {"model": "e1000"}, "ports": ["8080:80"]}),
    config({"network": "bridge:br0", "ports": []}),
    config({"shares": [{"host": "src", "guest": "/srv/src", "readonly": True}]}),
    config({"stage_dir": "/var/tmp/ozone", "serial_log": "web.log"}),
    config({"disks": None, "cdrom": None, "image": "debian-12"}),
    config({"image": {"debian": "bookworm", "packages": ["vim"], "size": "4GiB"}}),
    config({"image": {"url": "https://example.org/x.qcow2", "sha256": "a" * 64}}),
    config({"image": {"name": "ubuntu-24.04", "size": 8192}}),
    config(
        {
            "cloud_init": {
                "hostname": "web-1",
                "users": ["dev", {"name": "ops", "sudo": True, "groups": ["adm"]}],
                "ssh_authorized_keys": ["ssh-ed25519 AAAAC3Nza me@host"],
                "packages": ["nginx"],
                "write_files": [{"path": "/etc/motd", "content": "hi\n", "permissions": "644"}],
                "runcmd": ["echo hi", ["touch", "/tmp/x"]],
                "user_data": "user-data.yaml",
            }
        }
    ),
]


@pytest.mark.parametrize("data", GOOD, ids=range(len(GOOD)))
def test_good_configs_pass_both(data):
    assert not list(VALIDATOR.iter_errors(data))
    assert checker_accepts(data)


# test_bad_config's cases that only `ozone define` on a real host refuses: parse_config
# accepts them, and so does the schema
NEEDS_THE_HOST = {
    "missing-iso",  # the ISO must exist
    "missing-disk-no-size",  # the disk must exist (or have a size)
    "missing-backing",  # the backing image must exist
    "disk-folder-missing",  # a new disk's folder must exist
    "unknown-libvirt-network",  # libvirt must know the network
    "unknown-machine",  # the host's QEMU must offer the machine type
}
# a rule relating two fields, which the schema leaves to the checker
CROSS_FIELD_CASES = {"boot-missing-device"}

BAD = [
    *((case_id, config(overrides)) for case_id, overrides, _, _ in CASES),
    ("top-level-list", []),
    ("top-level-string", "web"),
    ("empty-object", {}),
    ("no-name", config({"name": None})),
    ("name-number", config({"name": 5})),
    ("name-empty", config({"name": ""})),
    ("name-leading-dash", config({"name": "-web"})),
    ("name-too-long", config({"name": "a" * 65})),
    ("name-trailing-space", config({"name": "web "})),
    ("unknown-top-key", config({"vcpu": 2})),
    ("key-wrong-case", config({"Memory": "1GiB"})),
    ("size-not-whole-bytes", config({"memory": "1.1MiB"})),
    ("size-fraction-of-a-byte", config({"memory": "33554432.5B"})),
    ("size-unknown-unit", config({"memory": "12XB"})),
    ("size-words", config({"memory": "lots"})),
    ("size-boolean", config({"memory": True})),
    ("size-list", config({"memory": [512]})),
    ("memory-below-minimum", config({"memory": 16})),
    ("memory-above-maximum", config({"memory": 17 * 1024**2})),
    ("vcpus-negative", config({"vcpus": -2})),
    ("vcpus-too-many", config({"vcpus": 513})),
    ("vcpus-fraction", config({"vcpus": 1.5})),
    ("vcpus-boolean", config({"vcpus": True})),
    ("accel-upper-case", config({"accel": "KVM"})),
    ("graphics-unknown", config({"graphics": "spice"})),
    ("agent-string", config({"agent": "yes"})),
    ("description-control-char", config({"description": "a\x00b"})),
    ("disks-not-a-list", config({"disks": "root.qcow2"})),
    ("disks-too-many", config({"disks": [f"d{i}.qcow2" for i in range(21)]})),
    ("disk-no-path", config({"disks": [{"size": "1GiB"}]})),
    ("disk-format-unknown", config({"disks": [{"path": "a", "format": "vmdk"}]})),
    ("disk-bus-unknown", config({"disks": [{"path": "a", "bus": "ide"}]})),
    ("disk-readonly-string", config({"disks": [{"path": "a", "readonly": "no"}]})),
    ("disk-unknown-key", config({"disks": [{"path": "a", "sze": "1GiB"}]})),
    ("disk-size-not-whole-bytes", config({"disks": [{"path": "a", "size": "1.1MiB"}]})),
    ("disk-size-zero", config({"disks": [{"path": "a", "size": 0}]})),
    ("cdrom-empty", config({"cdrom": ""})),
    ("cdrom-number", config({"cdrom": 5})),
    ("cdrom-line-break", config({"cdrom": "a\nb.iso"})),
    ("boot-empty", config({"boot": []})),
    ("boot-unknown-device", config({"boot": ["floppy"]})),
    ("boot-twice", config({"boot": ["cdrom", "cdrom"]})),
    ("cmdline-without-kernel", config({"cmdline": "console=ttyS0"})),
    ("nothing-to-boot", config({"cdrom": None, "disks": []})),
    ("network-unknown-type", config({"network": "wifi"})),
    ("network-bad-model", config({"network": {"model": "ne2k"}})),
    ("network-bad-source", config({"network": {"type": "bridge", "source": "br 0"}})),
    ("network-unknown-key", config({"network": {"tpye": "user"}})),
    ("qmp-no-port", config({"qmp": "tcp:127.0.0.1"})),
    ("qmp-true", config({"qmp": True})),
    ("qmp-unknown-scheme", config({"qmp": "telnet:127.0.0.1:4444"})),
    ("qmp-remote-not-allowed", config({"qmp": {"endpoint": "tcp:0.0.0.0:4444"}})),
    ("qmp-allow-remote-string", config({"qmp": {"endpoint": "tcp", "allow_remote": "yes"}})),
    ("serial-log-empty", config({"serial_log": ""})),
    ("stage-dir-relative", config({"stage_dir": "relative/dir"})),
    ("stage-dir-root", config({"stage_dir": "/"})),
    ("ports-not-a-list", config({"ports": "8080:80"})),
    ("port-privileged", config({"ports": ["80:80"]})),
    ("port-guest-out-of-range", config({"ports": ["8080:70000"]})),
    ("port-remote-not-allowed", config({"ports": ["0.0.0.0:8080:80"]})),
    ("port-unknown-protocol", config({"ports": ["sctp:8080:80"]})),
    ("port-unknown-key", config({"ports": [{"forward": "8080:80", "allow": True}]})),
    ("share-no-guest", config({"shares": [{"host": "src"}]})),
    ("share-guest-relative", config({"shares": [{"host": "src", "guest": "srv"}]})),
    ("share-on-a-system-folder", config({"shares": [{"host": "a", "guest": "/etc"}]})),
    ("share-under-proc", config({"shares": [{"host": "a", "guest": "/proc/x"}]})),
    ("share-dot-dot", config({"shares": [{"host": "a", "guest": "/srv/../etc"}]})),
    ("share-space-in-guest", config({"shares": [{"host": "a", "guest": "/srv/my site"}]})),
    ("size-number-not-whole-bytes", config({"memory": 256.1})),
    ("path-non-character", config({"cdrom": "x\uffff.iso"})),
    ("ports-on-a-bridge", config({"network": "bridge:br0", "ports": ["8080:80"]})),
    ("ports-without-network", config({"network": {"type": "none"}, "ports": [8080]})),
    ("share-unknown-key", config({"shares": [{"host": "s", "guest": "/srv/s", "rw": True}]})),
    ("image-not-in-catalogue", config({"image": "debian-99"})),
    ("image-bad-suite", config({"image": {"debian": "Bookworm"}})),
    ("image-ftp-url", config({"image": {"url": "ftp://x/y", "sha256": "a" * 64}})),
    ("image-size-below-minimum", config({"image": {"debian": "bookworm", "size": 512}})),
    ("image-no-kind", config({"image": {}})),
    ("image-two-kinds", config({"image": {"debian": "bookworm", "url": "https://x/y"}})),
    ("qmp-unix-path-with-comma", config({"qmp": "unix:/var/lib/a,b"})),
    ("image-short-checksum", config({"image": {"url": "https://x/y", "sha256": "abc"}})),
    ("cloud-init-not-an-object", config({"cloud_init": "yes"})),
    ("cloud-init-unknown-key", config({"cloud_init": {"hostnme": "x"}})),
    ("hostname-underscore", config({"cloud_init": {"hostname": "a_b"}})),
    ("user-upper-case", config({"cloud_init": {"users": ["Root"]}})),
    ("user-no-name", config({"cloud_init": {"users": [{"sudo": True}]}})),
    ("user-sudo-string", config({"cloud_init": {"users": [{"name": "a", "sudo": "yes"}]}})),
    ("file-no-content", config({"cloud_init": {"write_files": [{"path": "/etc/x"}]}})),
    (
        "file-bad-mode",
        config(
            {"cloud_init": {"write_files": [{"path": "/x", "content": "", "permissions": "9"}]}}
        ),
    ),
    ("runcmd-empty-command", config({"cloud_init": {"runcmd": [[]]}})),
    ("package-upper-case", config({"cloud_init": {"packages": ["Vim"]}})),
    ("ssh-key-not-a-key", config({"cloud_init": {"ssh_authorized_keys": ["not a key"]}})),
]
BOTH = [
    (case_id, data) for case_id, data in BAD if case_id not in NEEDS_THE_HOST | CROSS_FIELD_CASES
]


def test_at_least_50_bad_configs_are_checked_by_both():
    assert len(BOTH) >= 50
    assert len({case_id for case_id, _ in BAD}) == len(BAD)


@pytest.mark.parametrize("data", [d for _, d in BOTH], ids=[i for i, _ in BOTH])
def test_bad_configs_fail_both(data):
    assert not checker_accepts(data)
    assert not VALIDATOR.is_valid(data)


# Refused by the checker, accepted by the JSON Schema, which cannot say why. If the schema
# learns one of these, move it to BAD.
CHECKER_ONLY = [
    # a size written as a string: its range is arithmetic, not a pattern
    ("memory-string-below-minimum", config({"memory": "16MiB"})),
    ("memory-not-whole-kib", config({"memory": "33554433B"})),
    ("image-size-string-below-minimum", config({"image": {"name": "debian-12", "size": "1MiB"}})),
    # rules that relate two fields
    *((case_id, config(o)) for case_id, o, _, _ in CASES if case_id in CROSS_FIELD_CASES),
    ("backing-needs-qcow2", config({"disks": [{"path": "o", "backing": "b", "format": "raw"}]})),
    ("same-disk-twice", config({"disks": ["a.qcow2", "./a.qcow2"]})),
    ("boot-disk-without-disks", config({"disks": None, "boot": ["disk"]})),
    ("same-host-port-twice", config({"ports": ["8080:80", "8080:81"]})),
    ("network-source-for-user", config({"network": {"type": "user", "source": "br0"}})),
    ("network-bridge-without-source", config({"network": {"type": "bridge"}})),
    ("image-debian-with-checksum", config({"image": {"debian": "bookworm", "sha256": "a" * 64}})),
    ("image-url-without-checksum", config({"image": {"url": "https://x/y"}})),
    ("user-twice", config({"cloud_init": {"users": ["dev", "dev"]}})),
    ("share-guest-twice", config({"shares": [{"host": "a", "guest": "/srv/a"}] * 2})),
    # values the checker examines beyond a pattern
    ("port-address-not-ipv4", config({"ports": ["127.0.0.999:8080:80"]})),
]


@pytest.mark.parametrize("data", [d for _, d in CHECKER_ONLY], ids=[i for i, _ in CHECKER_ONLY])
def test_what_the_schema_cannot_say_is_left_to_the_checker(data):
    assert not checker_accepts(data)
    assert VALIDATOR.is_valid(data)


# what the checker says of the configs in CHECKER_ONLY
CHECKER_ONLY_MESSAGES = (
    "must be between", "whole number of KiB", "boots from", "a backing image needs",
    "the same image as", "is already forwarded", "takes no source", "needs its name",
    "takes no checksum", "needs exactly one of sha256", "is listed twice", "is already shares[",
    "is not an IPv4 address",
)  # fmt: skip


@FUZZ
@given(documents())
def test_the_schema_and_the_checker_agree_on_the_fuzz_corpus(document):
    """test_config_fuzz's documents: the checker accepts what the schema accepts (but for
    CHECKER_ONLY's rules), and the schema what the checker accepts."""
    try:
        parse_config(document)
    except ConfigError as err:
        if VALIDATOR.is_valid(document):
            assert any(words in str(err) for words in CHECKER_ONLY_MESSAGES), err
    else:
        assert not list(VALIDATOR.iter_errors(document))


def test_a_fraction_of_a_byte_is_an_error():
    with pytest.raises(ConfigError) as info:
        parse_size("1.1MiB", where="memory")
    assert "not a whole number of bytes" in str(info.value)
    assert parse_size("1.5GiB", where="memory") == 1536 * 1024**2


# --- the schema's keys are the checker's keys, at every level ---------------------------


def some(extra: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if v is not None}


# where each object of a config is, and a config that holds it (``extra`` added to it; a
# None value leaves the key out)
LEVELS = {
    "": lambda extra: config(extra),
    "disks[]": lambda extra: config({"disks": [{"path": "a.qcow2", **some(extra)}]}),
    "network": lambda extra: config({"network": {**some(extra)}}),
    "qmp": lambda extra: config({"qmp": {**some(extra)}}),
    "ports[]": lambda extra: config({"ports": [{"forward": "8080:80", **some(extra)}]}),
    "shares[]": lambda extra: config({"shares": [{"host": "s", "guest": "/srv/s", **some(extra)}]}),
    "image": lambda extra: config({"image": {"debian": "bookworm", **some(extra)}}),
    "cloud_init": lambda extra: config({"cloud_init": {**some(extra)}}),
    "cloud_init.users[]": lambda extra: config(
        {"cloud_init": {"users": [{"name": "a", **some(extra)}]}}
    ),
    "cloud_init.write_files[]": lambda extra: config(
        {"cloud_init": {"write_files": [{"path": "/x", "content": "", **some(extra)}]}}
    ),
}


def schema_object(document: dict[str, Any], where: str) -> dict[str, Any]:
    """The JSON Schema of the object at ``where`` (``cloud_init.users[]``)."""

    def objects(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if "properties" in node:
            yield node
        for branch in node.get("anyOf", []):
            yield from objects(branch)

    def as_object(node: dict[str, Any]) -> dict[str, Any]:
        return next(objects(node))

    node = document
    for part in filter(None, where.split(".")):
        node = as_object(node)["properties"][part.removesuffix("[]")]
        if part.endswith("[]"):
            node = node["items"]
    return as_object(node)


def checker_keys(where: str) -> set[str]:
    """The keys the checker accepts at ``where``, as its error lists them for a key far from
    all of them."""
    with pytest.raises(ConfigError) as info:
        parse_config(LEVELS[where]({"zzzzzzzzzz": 1}))
    assert info.value.hint.startswith("valid keys: "), info.value
    return set(info.value.hint.removeprefix("valid keys: ").split(", "))


def test_every_object_of_the_schema_is_probed():
    assert set(LEVELS) == {"", *(where for where, _ in schema.sections(schema.TOP, ""))}


@pytest.mark.parametrize("where", LEVELS)
def test_the_schema_and_the_checker_accept_the_same_keys(where):
    properties = schema_object(schema.json_schema(), where)["properties"]
    assert set(properties) == checker_keys(where)
    assert schema_object(schema.json_schema(), where)["additionalProperties"] is False


@pytest.mark.parametrize("where", LEVELS)
def test_defaults_in_the_table_are_the_checkers_defaults(where):
    """A default written out changes nothing; each default passes the schema."""
    document = schema.json_schema()
    for key, prop in schema_object(document, where)["properties"].items():
        assert prop["title"] and prop["description"], key
        if "default" not in prop:
            continue
        written = LEVELS[where]({key: prop["default"]})
        assert VALIDATOR.is_valid(written), (where, key)
        assert parse_config(written) == parse_config(LEVELS[where]({key: None})), (where, key)


# --- the README -------------------------------------------------------------------------


def test_readme_config_reference_is_generated_from_the_table():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index(schema.START) : readme.index(schema.END) + len(schema.END)]
    assert section == schema.reference_markdown(), (
        f"README.md's config reference differs from ozone_libvirt/schema.py: run `{schema.REGENERATE}`"
    )
    for where in LEVELS:
        for key in schema_object(schema.json_schema(), where)["properties"]:
            assert f"| `{where}.{key}` |" in section or f"| `{key}` |" in section


def test_the_schema_module_is_cheap_to_import():
    code = "import sys, ozone_libvirt.schema; print(sorted({'libvirt', 'yaml', 'lxml', 'ozone_libvirt.config'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_ozone_schema_prints_it():
    from .conftest import run_ozone

    proc = run_ozone("schema")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == schema.json_schema()
