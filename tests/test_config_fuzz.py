"""Property-based fuzzing of the config loader (hypothesis): whatever a config file holds,
`load_config` either returns a config that builds a well-formed domain XML, or raises a
ConfigError whose message is one line naming the file. Never another exception, never a
hang, never a file left behind.

Reproducible and bounded for CI: derandomized, no example database, a fixed number of
examples. Each test prints how many examples loaded and how many were refused (`pytest -s`);
`--hypothesis-show-statistics` shows the same as events.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from lxml import etree

from ozone_libvirt.config import (
    CLOUD_INIT_KEYS,
    CLOUD_USER_KEYS,
    DISK_KEYS,
    IMAGE_KEYS,
    NETWORK_KEYS,
    PORT_KEYS,
    QMP_KEYS,
    SHARE_KEYS,
    TOP_KEYS,
    WRITE_FILE_KEYS,
    load_config,
)
from ozone_libvirt.domain_xml import HostFacts, build_domain, to_string
from ozone_libvirt.errors import ConfigError

FUZZ = settings(
    max_examples=800,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- values ---------------------------------------------------------------------------------

HOSTILE_TEXT = [
    "", " ", "\n", "web\n", "a\x00b", "a\x01b", "\x1b[31m", "\x7f", "a\x85", "a\u2028b",
    "\ud800", "x\udfff", "\ufffe", "\uffff", "\ufeff",
    "\uff15\uff11\uff12MiB", "\u0665\u0661\u0662", "512\u00b2", "9" * 400 + ".5", "1" * 5000,
    "1e999", "NaN", "-1", "0", "512", "512MiB", "1.5GiB", "2G", "64TiB", "100 MiB", "0x10",
    "q35", "pc", "kvm", "tcg", "auto", "off", "none", "user", "vnc", "virtio", "sata", "scsi",
    "raw", "qcow2", "cdrom", "disk", "network", "e1000",
    "tcp:127.0.0.1:4444", "tcp:[::1]:4444", "tcp:::1:4444", "tcp:0.0.0.0:4444",
    "tcp:fe80::1%eth0,x=y:4444", "tcp:1.2.3.4,x=y:1", "tcp:localhost:99999", "tcp:a..b:1",
    "unix:/tmp/q.sock", "unix:q.sock,logfile=/x", "unix:", "unix:q.sock\n",
    "bridge:br0", "network:default", "bridge:br0\n", "bridge:", "network:a b",
    "52:54:00:12:34:56", "52:54:00:12:34:56\n", "52:54:00:12:34",
    "/dev/null", "/", "//", "..", "~", "~root/x", "/var/tmp", "var/tmp", "/a/../..", "/a\nb",
    "x.iso", "a.qcow2", "disks/a.qcow2", "/abs/b.qcow2", "a,b.qcow2",
    "2024-13-45", "=", "<<", "&a", "*a", "!!binary", "'", '"', "<x/>", "]]>", "&amp;", "%",
    "\u00fcn\u00efc\u00f6d\u00e9", "\U0001f600", "\t", "\r\n", "a" * 300,
]  # fmt: skip

text = st.one_of(
    st.sampled_from(HOSTILE_TEXT),
    st.text(st.characters(exclude_categories=()), max_size=24),  # surrogates and controls too
    st.lists(st.sampled_from(HOSTILE_TEXT), min_size=2, max_size=3).map("".join),
)
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 32, 512, 1024, 2**31, 2**63, 10**30]),
    st.floats(),  # nan and infinities included
)
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
ALL_KEYS = (
    TOP_KEYS + DISK_KEYS + NETWORK_KEYS + QMP_KEYS + IMAGE_KEYS + CLOUD_INIT_KEYS
    + CLOUD_USER_KEYS + WRITE_FILE_KEYS
)  # fmt: skip
keys = st.one_of(st.sampled_from(ALL_KEYS), text)
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)),
    max_leaves=6,
)

# --- documents: valid configs built from the real keys, then spoiled -----------------------

sizes = st.sampled_from([512, 1024, "1GiB", "256MiB", "2G", 1.5, "0.5GiB", "64MiB", "10GiB"])
paths = st.sampled_from(["x.iso", "a.qcow2", "/abs/b.qcow2", "images/k", "~/x.img", "../up"])
disk = st.one_of(
    paths,
    st.fixed_dictionaries(
        {"path": paths},
        optional={
            "size": sizes,
            "format": st.sampled_from(["qcow2", "raw"]),
            "bus": st.sampled_from(["virtio", "sata", "scsi"]),
        },
    ),
)
network = st.one_of(
    st.sampled_from(["user", "none", "network:default", "bridge:br0"]),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["network", "bridge"]), "source": st.just("virbr1")},
        optional={
            "model": st.sampled_from(["virtio", "e1000"]),
            "mac": st.sampled_from(["52:54:00:12:34:56", "52:54:00:AA:bb:cc"]),
        },
    ),
)
endpoints = st.sampled_from(
    ["auto", "off", "tcp:127.0.0.1:4444", "tcp:[::1]:4445", "unix:qmp.sock", "unix:/run/q.s"]
)
VALID: dict[str, st.SearchStrategy[Any]] = {
    "name": st.sampled_from(["web", "w", "a.b_c-d", "x" * 64]),
    "description": st.sampled_from(["a test VM", "tab\tand\nnewline", "\u00e9t\u00e9 \U0001f600"]),
    "host": st.sampled_from(["rack2", "auto", "a.b_c-d"]),
    "memory": sizes,
    "vcpus": st.integers(min_value=1, max_value=8),
    "machine": st.sampled_from(["q35", "pc", "pc-q35-8.2"]),
    "accel": st.sampled_from(["auto", "tcg"]),
    "disks": st.lists(disk, max_size=3, unique_by=lambda d: d if isinstance(d, str) else d["path"]),
    "cdrom": paths,
    "boot": st.sampled_from([["cdrom"], "cdrom", ["cdrom", "network"]]),
    "kernel": paths,
    "initrd": paths,
    "cmdline": st.sampled_from(["console=ttyS0", "root=/dev/vda rw\n"]),
    "serial_log": paths,
    "agent": st.booleans(),
    "network": network,
    "qmp": st.one_of(
        endpoints,
        st.just(False),
        st.builds(lambda e, r: {"endpoint": e, "allow_remote": r}, endpoints, st.booleans()),
    ),
    "graphics": st.sampled_from(["none", "vnc"]),
    "stage_dir": st.sampled_from(["/var/tmp", "/tmp/", "//srv//stage/../out"]),
    "image": st.one_of(
        st.sampled_from(["debian-12", "ubuntu-24.04"]),
        st.fixed_dictionaries(
            {"debian": st.sampled_from(["bookworm", "trixie"])},
            optional={"packages": st.just(["gcc", "git"]), "size": sizes},
        ),
        st.fixed_dictionaries(
            {"url": st.just("https://example.org/x.qcow2"), "sha256": st.just("ab" * 32)},
            optional={"size": sizes},
        ),
    ),
    "cloud_init": st.fixed_dictionaries(
        {},
        optional={
            "hostname": st.sampled_from(["build", "a-b"]),
            "users": st.just([{"name": "dev", "sudo": True}, "ops"]),
            "packages": st.just(["git"]),
            "write_files": st.just(
                [{"path": "/etc/motd", "content": "hi\n", "permissions": "0644"}]
            ),
            "runcmd": st.just([["touch", "/x"], "echo hi"]),
            "ssh_authorized_keys": st.just(["ssh-ed25519 AAAAC3Nza dev@x"]),
        },
    ),
    "ports": st.lists(
        st.sampled_from(
            [
                "8080:80",
                "udp:5353:53",
                "127.0.0.2:8443:443",
                9000,
                {"forward": "0.0.0.0:9001:90", "allow_remote": True},
            ]
        ),
        max_size=3,
        unique_by=str,
    ),
    "shares": st.lists(
        st.fixed_dictionaries(
            {"host": paths, "guest": st.sampled_from(["/srv/site", "/b/c.d", "//x/../y"])},
            optional={"readonly": st.booleans()},
        ),
        max_size=2,
    ),
}
assert set(VALID) == set(TOP_KEYS)

# hostile values for a key: anything at all, or the key's own structure with hostile parts
HOSTILE: dict[str, st.SearchStrategy[Any]] = {
    "disks": st.lists(
        st.fixed_dictionaries(
            {"path": st.one_of(paths, text)},
            optional={k: scalars for k in DISK_KEYS if k != "path"},
        ),
        min_size=1,
        max_size=2,
    ),
    "network": st.fixed_dictionaries({}, optional={k: scalars for k in NETWORK_KEYS}),
    "qmp": st.fixed_dictionaries({"endpoint": text}, optional={"allow_remote": scalars}),
    "ports": st.lists(
        st.one_of(
            text, scalars, st.fixed_dictionaries({}, optional={k: scalars for k in PORT_KEYS})
        ),
        max_size=3,
    ),
    "shares": st.lists(
        st.fixed_dictionaries({}, optional={k: st.one_of(scalars, text) for k in SHARE_KEYS}),
        max_size=2,
    ),
    "image": st.fixed_dictionaries({}, optional={k: scalars for k in IMAGE_KEYS}),
    "cloud_init": st.fixed_dictionaries(
        {},
        optional={
            "users": st.lists(
                st.fixed_dictionaries({}, optional={k: anything for k in CLOUD_USER_KEYS}),
                max_size=2,
            ),
            "write_files": st.lists(
                st.fixed_dictionaries({}, optional={k: scalars for k in WRITE_FILE_KEYS}),
                max_size=2,
            ),
            **{k: anything for k in CLOUD_INIT_KEYS if k not in ("users", "write_files")},
        },
    ),
}


@st.composite
def documents(draw: st.DrawFn) -> Any:
    doc = draw(
        st.fixed_dictionaries(
            {"name": VALID["name"], "cdrom": VALID["cdrom"]},
            optional={k: v for k, v in VALID.items() if k not in ("name", "cdrom")},
        )
    )
    if "initrd" in doc or "cmdline" in doc:
        doc.setdefault("kernel", "vmlinuz")
    for key in draw(st.lists(st.sampled_from((*TOP_KEYS, None)), max_size=3, unique=True)):
        if key is None:
            doc[draw(keys)] = draw(scalars)  # an unknown (or odd) key
        else:  # a hostile value where a valid one belongs
            doc[key] = draw(st.one_of(scalars, HOSTILE.get(key, anything), anything))
    return draw(st.one_of(st.just(doc), st.just(doc), st.just(doc), anything))


@st.composite
def config_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """A document written as JSON or YAML the way a person or a tool might write it."""
    doc = draw(documents())
    suffix = draw(st.sampled_from([".json", ".yaml", ".yml"]))
    if suffix == ".json":
        out = json.dumps(
            doc, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 2]))
        )
    else:
        out = yaml.safe_dump(
            doc,
            allow_unicode=draw(st.booleans()),
            default_flow_style=draw(st.sampled_from([None, True, False])),
            sort_keys=False,
        )
    return suffix, out.encode("utf-8", "surrogatepass")


# Pieces of JSON and YAML syntax, including the tricky parts (anchors, aliases, tags, merge
# keys, escapes, directives, numbers the YAML 1.1 grammar accepts but Python cannot convert)
TOKENS = [
    "{", "}", "[", "]", ":", ": ", ",", " ", "\n", "  ", "- ", "? ", '"', "'", "\\", "\\u",
    "d800", "\\x01", "&a ", "*a", "&b ", "*b", "<<: ", "<<: *a", "{<<: *b, ", "[[[[", "]]]]",
    "!!binary ", "!!set ", "!!int ", "!!float ", "!!bool ", "!!timestamp ", "!!map ", "!!seq ",
    "!!str ", "!!null ", "!!merge ",
    "!!python/object:os.system ", "!x ", "%YAML 1.1\n", "---\n", "...\n", "#", "|", ">",
    "name: w\n", "cdrom: x.iso\n", '"name": "w"', '"cdrom": "x.iso"', "name", "cdrom", "disks",
    "memory", "qmp", "stage_dir", "1", "0x", "0b_", "0o7", "1:2", "9" * 50, ".inf", ".nan", "-",
    "+", "1e999", "NaN", "Infinity", "2024-13-45", "=", "~", "null", "true", "yes", "\t",
    "\x01", "\x85", "\u2028", "\ufeff", "\u00e9", "\x00", "\uff15",
]  # fmt: skip

raw_files = st.tuples(
    st.sampled_from([".json", ".yaml", ".yml"]),
    st.one_of(
        st.binary(max_size=200),
        st.text(st.characters(exclude_categories=()), max_size=200).map(
            lambda t: t.encode("utf-8", "surrogatepass")
        ),
        st.lists(st.sampled_from(TOKENS), max_size=40).map(
            lambda parts: "".join(parts).encode("utf-8", "surrogatepass")
        ),
    ),
)

# --- the property ---------------------------------------------------------------------------


def load_or_refuse(suffix: str, content: bytes, base: Path) -> str:
    """Write one config file to a fresh folder and load it; check the outcome is allowed and
    that nothing but the config is left in the folder. Returns "loaded" or "refused"."""
    with tempfile.TemporaryDirectory(dir=base) as folder:
        path = Path(folder) / f"fuzz{suffix}"
        path.write_bytes(content)
        try:
            cfg = load_config(path)
        except ConfigError as err:
            outcome = "refused"
            message = str(err)
            assert message.startswith(f"{path}: "), message
            assert len(message.splitlines()) == 1, message
            assert len(message) < len(str(path)) + 400, message  # only short excerpts
        else:
            outcome = "loaded"
            try:
                xml = to_string(build_domain(cfg, facts=HostFacts(), qmp_endpoint=None))
            except ConfigError as err:  # e.g. KVM asked for on a host without it
                outcome = "refused"
                assert len(str(err).splitlines()) == 1
            else:
                etree.fromstring(xml.encode())  # well-formed: libvirt can read it back
            assert cfg.hash.startswith("sha256:")
            if cfg.qmp.kind in ("tcp", "unix"):  # becomes `-qmp ENDPOINT,server=on,wait=off`
                assert "," not in cfg.qmp.endpoint
        assert os.listdir(folder) == [path.name]
    event(outcome)
    return outcome


def fuzz(strategy: st.SearchStrategy[tuple[str, bytes]], base: Path) -> Counter[str]:
    counts: Counter[str] = Counter()

    @FUZZ
    @given(strategy)
    def example(case: tuple[str, bytes]) -> None:
        counts[load_or_refuse(*case, base)] += 1

    example()
    assert not list(base.iterdir())
    return counts


def report(what: str, counts: Counter[str]) -> None:
    total = sum(counts.values())
    print(
        f"\nconfig fuzz, {what}: {total} examples, "
        f"{counts['loaded']} loaded, {counts['refused']} refused"
    )


@pytest.mark.timeout(120)
def test_config_documents_load_or_are_refused_in_one_line(tmp_path):
    counts = fuzz(config_files(), tmp_path)
    report("JSON/YAML documents", counts)
    assert counts["loaded"] >= 100  # the generator reaches valid configs, not only errors
    assert counts["refused"] >= 100


@pytest.mark.timeout(120)
def test_random_text_and_bytes_are_refused_in_one_line(tmp_path):
    counts = fuzz(raw_files, tmp_path)
    report("raw text and bytes", counts)
    assert counts["refused"] >= 100
