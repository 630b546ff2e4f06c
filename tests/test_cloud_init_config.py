"""The `image` and `cloud_init` config keys, the NoCloud seed made from them and how a config
with an image resolves to disks: pure, no libvirt."""

from __future__ import annotations

import email
import io
import json
import shutil
import subprocess
from pathlib import Path

import pycdlib
import pytest
import yaml

from ozone_libvirt import cloudinit, images
from ozone_libvirt.catalogue import CATALOGUE
from ozone_libvirt.config import parse_config
from ozone_libvirt.errors import ConfigError

SRC = Path("/srv/vms/build.yaml")
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBx7 dev@laptop"
STORE = Path("/srv/images")


def parse(data: dict):
    return parse_config({"name": "build", **data}, source=SRC)


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return str(info.value) + " | " + (info.value.hint or "")


ISSUE_EXAMPLE = {
    "memory": "2GiB",
    "vcpus": 2,
    "image": {
        "debian": "bookworm",
        "packages": ["build-essential", "git", "python3"],
        "size": "8GiB",
    },
    "cloud_init": {
        "hostname": "build",
        "users": [{"name": "dev", "ssh_authorized_keys": [KEY], "sudo": True}],
        "write_files": [{"path": "/etc/motd", "content": "hello\n"}],
        "runcmd": [["touch", "/var/lib/first-boot-done"]],
    },
}


def test_the_issue_example_parses():
    cfg = parse(ISSUE_EXAMPLE)
    assert cfg.image is not None and cfg.image.debian == "bookworm"
    assert cfg.image.packages == ("build-essential", "git", "python3")
    assert cfg.image.size == 8 * 1024**3
    assert cfg.cloud_init is not None
    assert cfg.cloud_init.users[0].name == "dev" and cfg.cloud_init.users[0].sudo
    assert cfg.cloud_init.runcmd == (("touch", "/var/lib/first-boot-done"),)
    assert cfg.boot == ("disk",)


def test_image_forms():
    assert parse({"image": "debian-12"}).image.url == CATALOGUE["debian-12"].url
    cfg = parse({"image": {"name": "ubuntu-24.04", "size": "10GiB"}})
    assert cfg.image.checksum_url == CATALOGUE["ubuntu-24.04"].checksum_url
    cfg = parse({"image": {"url": "https://example.org/x.qcow2", "sha256": "AB" * 32}})
    assert cfg.image.sha256 == "ab" * 32


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"image": {"debian": "bookworm", "url": "https://x/y"}}, "image: needs exactly one of"),
        ({"image": {}}, "image: needs exactly one of debian, url or name"),
        ({"image": {"url": "https://x/y.qcow2"}}, "needs exactly one of sha256, sha512 or checksum_url"),
        ({"image": {"url": "https://x/y", "sha256": "12"}}, "image.sha256: '12' is not valid; expected 64 hex"),
        ({"image": {"url": "ftp://x/y", "sha256": "a" * 64}}, "image.url: 'ftp://x/y' is not valid"),
        ({"image": {"debian": "bookworm", "pakages": []}}, "did you mean 'packages'?"),
        ({"image": {"debian": "bookworm", "packages": ["Bad Name"]}}, "image.packages[0]"),
        ({"image": {"debian": "bookworm", "sha256": "a" * 64}}, "built from packages takes no checksum"),
        ({"image": "debian-21"}, "image: expected one of debian-12"),
        ({"image": {"debian": "bookworm", "size": "100MiB"}}, "image.size: must be between 1GiB"),
        ({"image": {"url": "https://x/y", "sha256": "a" * 64, "packages": []}}, "only an image built"),
        ({"image": "debian-12", "cloud_init": {"hostnme": "x"}}, "did you mean 'hostname'?"),
        ({"image": "debian-12", "cloud_init": {"hostname": "a_b"}}, "is not a host name"),
        ({"image": "debian-12", "cloud_init": {"users": [{"name": "Dev"}]}}, "cloud_init.users[0].name"),
        ({"image": "debian-12", "cloud_init": {"users": ["dev", "dev"]}}, "'dev' is listed twice"),
        ({"image": "debian-12", "cloud_init": {"users": [{"name": "dev", "ssh_authorized_keys": ["hello"]}]}},
         "cloud_init.users[0].ssh_authorized_keys[0]"),
        ({"image": "debian-12", "cloud_init": {"write_files": [{"path": "etc/x", "content": ""}]}},
         "cloud_init.write_files[0].path: 'etc/x' is not absolute"),
        ({"image": "debian-12", "cloud_init": {"write_files": [{"path": "/x", "content": "", "permissions": 644}]}},
         "cloud_init.write_files[0].permissions"),
        ({"image": "debian-12", "cloud_init": {"runcmd": [[]]}}, "cloud_init.runcmd[0]: an empty command"),
        ({"image": "debian-12", "cloud_init": {"runcmd": ["a\nb"]}}, "cloud_init.runcmd[0]: contains a line break"),
        ({"image": "debian-12", "cloud_init": {"users": "dev"}}, "cloud_init.users: expected a list of users"),
    ],
)  # fmt: skip
def test_bad_image_and_cloud_init(data, expected):
    assert expected in error_of(data)


def test_nothing_to_boot_mentions_image():
    assert "give an image, disks, a cdrom or a kernel" in error_of({})


# --- the seed ---------------------------------------------------------------------------


def user_data_of(files: dict[str, bytes]) -> dict:
    text = files["user-data"].decode()
    assert text.startswith("#cloud-config\n")
    return yaml.safe_load(text)


def test_seed_from_the_issue_example():
    cfg = parse(ISSUE_EXAMPLE)
    files = cloudinit.seed_files(cfg, default_keys=("ssh-rsa AAAA other@host",))
    doc = user_data_of(files)
    assert doc["hostname"] == "build"
    assert doc["users"] == [
        {
            "name": "dev",
            "shell": "/bin/bash",
            "lock_passwd": True,
            "ssh_authorized_keys": [KEY],
            "sudo": "ALL=(ALL) NOPASSWD:ALL",
        }
    ]
    assert "ssh_authorized_keys" not in doc  # the config names its users: no default keys
    assert doc["write_files"] == [{"path": "/etc/motd", "content": "hello\n"}]
    assert doc["runcmd"] == [["touch", "/var/lib/first-boot-done"]]
    meta = yaml.safe_load(files["meta-data"])
    assert meta["local-hostname"] == "build"
    assert meta["instance-id"].startswith("ozone-")
    # the same config gives the same seed; another config another instance
    assert cloudinit.seed_files(cfg) == cloudinit.seed_files(cfg)
    other = parse({**ISSUE_EXAMPLE, "cloud_init": {"hostname": "other"}})
    assert (
        yaml.safe_load(cloudinit.seed_files(other)["meta-data"])["instance-id"]
        != meta["instance-id"]
    )


def test_seed_without_users_gives_the_invoking_users_keys_to_the_default_user(tmp_path):
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "id_ed25519.pub").write_text(KEY + "\n")
    (tmp_path / ".ssh" / "id_rsa.pub").write_text("not a key\n")
    (tmp_path / ".ssh" / "id_ed25519").write_text("PRIVATE\n")
    keys = cloudinit.default_ssh_keys(tmp_path)
    assert keys == (KEY,)
    cfg = parse({"image": "debian-12", "cloud_init": {}})
    doc = user_data_of(cloudinit.seed_files(cfg, default_keys=keys))
    assert doc["ssh_authorized_keys"] == [KEY]
    assert "users" not in doc
    assert doc["hostname"] == "build"  # the VM's name


def test_seed_of_a_pulled_image_installs_the_agent():
    cfg = parse({"image": "debian-12"})
    doc = user_data_of(cloudinit.seed_files(cfg, install_agent=True))
    assert doc["packages"] == ["qemu-guest-agent"]
    assert doc["runcmd"][0] == ["systemctl", "start", "qemu-guest-agent"]


def test_user_data_file_is_a_second_mime_part():
    cfg = parse({"image": "debian-12", "cloud_init": {"hostname": "h"}})
    files = cloudinit.seed_files(cfg, user_data=b"#!/bin/sh\necho hi > /tmp/x\n")
    message = email.message_from_bytes(files["user-data"])
    assert message.is_multipart()
    parts = [p for p in message.walk() if not p.is_multipart()]
    assert [p.get_content_type() for p in parts] == ["text/cloud-config", "text/x-shellscript"]
    assert parts[1].get_payload(decode=True) == b"#!/bin/sh\necho hi > /tmp/x\n"
    assert "list(append)" in parts[1]["Merge-Type"]


def test_seed_iso_is_a_cidata_volume(tmp_path):
    files = cloudinit.seed_files(parse(ISSUE_EXAMPLE))
    data = cloudinit.make_iso(files)
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    for name, content in files.items():
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path="/" + name)
        assert out.getvalue() == content
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, joliet_path="/" + name)
        assert out.getvalue() == content
    iso.close()
    # what cloud-init's ds-identify looks for: a file system labelled cidata (blkid)
    blkid = shutil.which("blkid") or "/sbin/blkid"
    path = tmp_path / "seed.iso"
    path.write_bytes(data)
    label = subprocess.run(
        [blkid, "-o", "value", "-s", "LABEL", str(path)], capture_output=True, text=True
    )
    assert label.stdout.strip() == "cidata", label


# --- resolving a config with an image ----------------------------------------------------


def test_resolve_debian_image_with_cloud_init(monkeypatch):
    monkeypatch.setattr(cloudinit, "default_ssh_keys", lambda home=None: ())
    cfg = parse({**ISSUE_EXAMPLE, "disks": [{"path": "/srv/data.qcow2", "size": "1GiB"}]})
    res = images.resolve(cfg, store=STORE)
    ref = images.image_ref(cfg.image, cloud_init=True)
    assert ref.id.startswith("debian-bookworm-")
    root, data, seed = res.config.disks
    assert root.path == STORE / "build.root.qcow2" and root.backing == STORE / f"{ref.id}.qcow2"
    assert root.size == 8 * 1024**3
    assert data.path == Path("/srv/data.qcow2")
    assert seed.readonly and seed.format == "raw" and seed.path.name.startswith("seed-")
    assert res.config.kernel == STORE / f"{ref.id}.vmlinuz"
    assert res.config.initrd == STORE / f"{ref.id}.initrd"
    assert res.config.cmdline == "root=/dev/vda rw console=ttyS0"
    run = images.resolve(cfg, store=STORE, for_run=True)
    assert run.config.disks[0].path == STORE / f"{ref.id}.qcow2"
    assert run.config.disks[0].backing is None
    # cloud-init or not is part of what the image is
    assert images.image_ref(cfg.image, cloud_init=False).id != ref.id


def test_resolve_pulled_image_boots_its_own_loader(monkeypatch):
    monkeypatch.setattr(cloudinit, "default_ssh_keys", lambda home=None: ())
    cfg = parse({"image": {"url": "https://example.org/os/disk-1.qcow2", "sha512": "a" * 128}})
    res = images.resolve(cfg, store=STORE)
    assert res.ref.id.startswith("disk-1-")
    assert res.config.kernel is None and res.config.boot == ("disk",)
    assert [d.readonly for d in res.config.disks] == [False, True]  # the seed installs the agent


def test_resolve_leaves_plain_configs_alone():
    cfg = parse({"disks": ["/srv/a.qcow2"]})
    assert images.resolve(cfg, store=STORE).config is cfg


def test_image_ids_depend_on_the_spec_only():
    a = parse({"image": {"debian": "bookworm", "packages": ["git", "gcc"]}}).image
    b = parse({"image": {"debian": "bookworm", "packages": ["gcc", "git"], "size": "9GiB"}}).image
    c = parse({"image": {"debian": "trixie", "packages": ["gcc", "git"]}}).image
    ids = [images.image_ref(x, cloud_init=False).id for x in (a, b, c)]
    assert ids[0] == ids[1] != ids[2]
    assert json.dumps(images.image_ref(a, cloud_init=False).spec)  # JSON data
