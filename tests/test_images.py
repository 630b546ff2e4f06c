"""The image store against the real libvirtd: images pulled from a local HTTP server (never
the internet) and verified, the store as a libvirt pool, the four ways a download fails,
`image list/rm`, and a VM booted from a pulled image on an overlay that undefine removes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ozone_libvirt.images import pool_name

from .conftest import PREFIX, REPO, WORK_ROOT, oz_exec, ozone_env, remove_domain, run_ozone, virsh
from .mirror import Server, _no_proxy_from_the_host, server

__all__ = ["_no_proxy_from_the_host", "server"]  # fixtures, used by name

pytestmark = [pytest.mark.libvirtd]

DEBIAN_DIR = Path(os.environ.get("OZONE_DEBIAN_DIR", REPO / "build" / "debian"))


@pytest.fixture(scope="module")
def image_bytes() -> bytes:
    """A real bootable image to serve: the Debian test guest's disk (~90 MB)."""
    path = DEBIAN_DIR / "debian.qcow2"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run scripts/build-debian-image")
    return path.read_bytes()


@pytest.fixture
def store(libvirtd: str) -> Iterator[Path]:
    """An image store of the test's own (and its own pool and state folder), removed after."""
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    path = WORK_ROOT / f"store-{os.getpid()}-{os.urandom(3).hex()}"
    state = path.parent / f"state-{path.name}"
    try:
        yield path
    finally:
        pool = pool_name(path)
        virsh("pool-destroy", pool, check=False)
        virsh("pool-undefine", pool, check=False)
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


def env_for(store: Path, **extra: str) -> dict[str, str]:
    return ozone_env(
        OZONE_IMAGE_DIR=str(store),
        OZONE_STATE_DIR=str(store.parent / f"state-{store.name}"),
        **extra,
    )


def ozone(store: Path, *args: str, timeout: float = 300, **extra: str):
    return run_ozone(*args, env=env_for(store, **extra), timeout=timeout)


def gets(server: Server, path: str) -> int:
    return sum(1 for s in server.state.seen if s.path.endswith(path))


def files_in(store: Path) -> list[str]:
    return sorted(os.listdir(store)) if store.exists() else []


def test_pull_verifies_stores_read_only_and_the_pool_shows_it(store, server, image_bytes):
    url = server.add("/images/test-cloud.qcow2", image_bytes)
    sums = f"{hashlib.sha512(image_bytes).hexdigest()}  test-cloud.qcow2\n"
    sums_url = server.add("/images/SHA512SUMS", sums.encode())
    proc = ozone(store, "image", "pull", url, "--checksum-url", sums_url, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["made"] is True and result["id"].startswith("test-cloud-")
    disk = Path(result["path"])
    assert disk.parent == store and disk.read_bytes() == image_bytes
    assert disk.stat().st_mode & 0o777 == 0o444 and disk.stat().st_uid == 0
    volumes = virsh("vol-list", pool_name(store))
    assert disk.name in volumes
    # a second pull finds it: no second download
    proc = ozone(store, "image", "pull", url, "--checksum-url", sums_url, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["made"] is False
    assert gets(server, "/images/test-cloud.qcow2") == 1
    listed = json.loads(ozone(store, "image", "list", "--json").stdout)
    assert [(i["id"], i["source"], i["used_by"]) for i in listed] == [(result["id"], url, [])]
    assert listed[0]["bytes"] >= len(image_bytes) // 2
    text = ozone(store, "image", "list").stdout
    assert text.splitlines()[0].split() == ["IMAGE", "SOURCE", "SIZE", "USED", "BY", "AGE"]


def test_two_pulls_at_once_download_once(store, server, image_bytes):
    url = server.add("/images/once.qcow2", image_bytes)
    digest = hashlib.sha256(image_bytes).hexdigest()
    cmd = [
        sys.executable,
        "-m",
        "ozone_libvirt",
        "image",
        "pull",
        url,
        "--sha256",
        digest,
        "--json",
    ]
    procs = [
        subprocess.Popen(cmd, env=env_for(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out + err
        results.append(json.loads(out))
    assert sorted(r["made"] for r in results) == [False, True]
    assert gets(server, "/images/once.qcow2") == 1
    assert [f for f in files_in(store) if f.endswith(".qcow2")] == [Path(results[0]["path"]).name]


@pytest.mark.parametrize("failure", ["404", "checksum", "truncate", "stall"])
def test_failed_pulls_say_why_in_one_line_and_leave_nothing(store, server, image_bytes, failure):
    data = image_bytes[: 4 << 20]
    modes = {"404": "404", "checksum": "range", "truncate": "truncate", "stall": "stall"}
    url = server.add("/images/bad.qcow2", data, modes[failure])
    digest = hashlib.sha256(data if failure != "checksum" else b"other").hexdigest()
    proc = ozone(
        store, "image", "pull", url, "--sha256", digest, OZONE_STALL_TIMEOUT="1", timeout=60
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2, proc.stderr
    expected = {
        "404": "HTTP 404",
        "checksum": "checksum mismatch",
        "truncate": "ended after",
        "stall": "stalled",
    }[failure]
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr
    assert files_in(store) == [], "a failed pull left files in the store"
    if failure in ("truncate", "stall"):  # kept outside the store, for the next pull to resume
        server.state.modes["/images/bad.qcow2"] = ["range"]
        server.state.release.set()
        proc = ozone(store, "image", "pull", url, "--sha256", digest, "--json", timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert any((s.headers.get("Range") or "").startswith("bytes=") for s in server.state.seen)


def test_raw_images_become_qcow2_and_overlays_are_refused(store, server, tmp_path):
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "16M"], check=True)
    data = raw.read_bytes()
    url = server.add("/disk.img", data)
    proc = ozone(
        store, "image", "pull", url, "--sha256", hashlib.sha256(data).hexdigest(), "--json"
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", json.loads(proc.stdout)["path"]],
            capture_output=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2" and info["virtual-size"] == 16 << 20
    # a qcow2 that names a backing file would make QEMU read a host file of its choosing,
    # one with an external data file would make it open that file read-write
    for name, options, words in [
        ("sneaky", ["-b", "/etc/shadow", "-F", "raw"], "names a backing file"),
        ("datafile", ["-o", f"data_file={tmp_path / 'outside.raw'}"], "external data file"),
    ]:
        image = tmp_path / f"{name}.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", *options, str(image), "1M"], check=True
        )
        data = image.read_bytes()
        url = server.add(f"/{name}.qcow2", data)
        proc = ozone(store, "image", "pull", url, "--sha256", hashlib.sha256(data).hexdigest())
        assert proc.returncode == 1 and words in proc.stderr, proc.stderr
        assert not [f for f in files_in(store) if f.startswith(name)]


def test_pull_usage_errors(store):
    for args, words in [
        (("image", "pull", "https://example.org/x.qcow2"), "exactly one of --sha256"),
        (("image", "pull", "debian-21"), "neither a URL nor an image name"),
        (("image", "pull", "https://example.org/x.qcow2", "--sha256", "12"), "64 hexadecimal"),
        (("image", "pull", "debian-12", "--sha256", "a" * 64), "comes from the catalogue"),
        (("image", "rm", "nosuchimage"), "no image 'nosuchimage'"),
        (("image", "rm", ""), "no image ''"),
    ]:
        proc = ozone(store, *args)
        assert proc.returncode in (1, 2) and words in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


@pytest.mark.guest
def test_vm_on_a_pulled_image_and_what_rm_and_undefine_remove(store, server, image_bytes, tmp_path):
    url = server.add("/images/vm-base.qcow2", image_bytes)
    name = f"{PREFIX}pulled"
    config = {
        "name": name,
        "memory": "1GiB",
        "vcpus": 2,
        "image": {"url": url, "sha256": hashlib.sha256(image_bytes).hexdigest(), "size": "5GiB"},
        # the test image has no boot loader: boot its kernel (a cloud image boots its own)
        "kernel": str(DEBIAN_DIR / "vmlinuz"),
        "initrd": str(DEBIAN_DIR / "initrd.img"),
        "cmdline": "root=/dev/vda rw console=ttyS0",
        "network": "none",
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    try:
        proc = ozone(store, "define", str(path), "--json")
        assert proc.returncode == 0, proc.stderr
        base = next(store.glob("vm-base-*.qcow2"))
        overlay = store / f"{name}.root.qcow2"
        volumes = virsh("vol-list", pool_name(store))
        assert overlay.name in volumes and base.name in volumes
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", str(overlay)],
                capture_output=True,
                check=True,
            ).stdout
        )
        assert info["backing-filename"] == str(base) and info["virtual-size"] == 5 << 30
        assert info["format-specific"]["data"]["compat"] == "1.1"
        # defined again: a bigger size grows the disk, a smaller one and another image are
        # refused before anything is downloaded
        config["image"]["size"] = "6GiB"
        path.write_text(json.dumps(config))
        proc = ozone(store, "define", str(path))
        assert proc.returncode == 0 and "grew the boot disk to 6144 MiB" in proc.stderr, proc.stderr
        config["image"]["size"] = "4GiB"
        path.write_text(json.dumps(config))
        proc = ozone(store, "define", str(path))
        assert proc.returncode == 2 and "disks do not shrink" in proc.stderr, proc.stderr
        other = server.add("/images/other.qcow2", image_bytes)
        config["image"] = {**config["image"], "url": other, "size": "6GiB"}
        path.write_text(json.dumps(config))
        proc = ozone(store, "define", str(path))
        assert proc.returncode == 1 and "cannot change its image" in proc.stderr, proc.stderr
        assert gets(server, "/images/other.qcow2") == 0
        # the image is in use: rm refuses, naming the VM
        proc = ozone(store, "image", "rm", base.stem)
        assert proc.returncode == 1 and name in proc.stderr, proc.stderr
        assert base.exists()
        listed = json.loads(ozone(store, "image", "list", "--json").stdout)
        assert listed[0]["used_by"] == [name]
        proc = ozone(store, "start", name, "--wait", "--timeout", "300", timeout=360)
        assert proc.returncode == 0, proc.stderr
        proc = oz_exec(name, "sh", "-c", "df --output=size -B1G / | tail -1")
        assert proc.returncode == 0, proc.stderr
        assert int(proc.stdout) >= 4  # systemd-growfs grew the file system to the disk
        ozone(store, "destroy", name)
        proc = ozone(store, "undefine", name, "--remove-storage")
        assert proc.returncode == 0, proc.stderr
        assert not overlay.exists() and base.exists()  # only the overlay goes
        seeds = list(store.glob("seed-*.iso"))
        assert seeds, "a pulled image gets a seed that installs the agent"
        proc = ozone(store, "image", "rm", base.stem, "--json")
        assert proc.returncode == 0, proc.stderr
        assert not base.exists() and not list(store.glob("vm-base-*"))
        assert base.name not in virsh("vol-list", pool_name(store))
    finally:
        remove_domain(name)


def test_gc_removes_what_dead_builds_left_and_unused_seeds(store):
    store.mkdir(parents=True, mode=0o755)
    dead_build = store / ".build-debian-bookworm-0123456789ab-x1y2z3"
    (dead_build / "rootfs").mkdir(parents=True)
    old_seed = store / "seed-00112233445566ff.iso"
    old_seed.write_bytes(b"seed")
    young_seed = store / "seed-ffeeddccbbaa0099.iso"
    young_seed.write_bytes(b"seed")
    os.utime(old_seed, (1_000_000_000, 1_000_000_000))
    proc = ozone(store, "gc", "--json")
    assert proc.returncode == 0, proc.stderr
    removed = json.loads(proc.stdout)["removed"]
    assert str(dead_build) in removed and str(old_seed) in removed
    assert not dead_build.exists() and not old_seed.exists()
    assert young_seed.exists()  # may belong to a define under way
