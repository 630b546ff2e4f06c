"""Where a config's files go on a host that is not this machine (hostpaths.py, pure)."""

from __future__ import annotations

from pathlib import Path

from ozone_libvirt.config import parse_config
from ozone_libvirt.hostpaths import FILES_DIR, IMAGES_DIR, VMS_DIR, place
from ozone_libvirt.images import resolve


def digest(path: Path) -> str:
    return f"d{len(str(path)):03d}"  # any stable name will do: the content's, in ozone


def placed(data: dict, store: Path | None = None):
    config = parse_config(data, source=Path("/home/me/vms/web.json"))
    resolved = resolve(config, store=store, vm_key="ssh-ed25519 AAAA key") if store else None
    return place(resolved.config if resolved else config, resolved, digest=digest)


def test_disks_are_made_there_and_read_only_files_copied_by_content():
    p = placed(
        {
            "name": "web",
            "disks": [
                {"path": "data.qcow2", "size": "1GiB"},
                {"path": "/srv/prepared.qcow2"},
                {"path": "/srv/ro.img", "format": "raw", "readonly": True},
                {"path": "over.qcow2", "backing": "/srv/base.qcow2"},
            ],
            "cdrom": "/srv/boot.iso",
        }
    )
    disks = [d.path for d in p.config.disks]
    assert disks == [
        VMS_DIR / "web-data.qcow2",
        VMS_DIR / "web-prepared.qcow2",
        FILES_DIR / f"ro-{digest(Path('/srv/ro.img'))}.img",
        VMS_DIR / "web-over.qcow2",
    ]
    assert p.config.disks[3].backing == FILES_DIR / f"base-{digest(Path('/srv/base.qcow2'))}.qcow2"
    assert p.config.cdrom == FILES_DIR / f"boot-{digest(Path('/srv/boot.iso'))}.iso"
    kinds = {t.target.name: (t.kind, t.source, t.capacity, t.mode) for t in p.transfers}
    assert kinds["web-data.qcow2"] == ("create", None, 1 << 30, "0600")
    assert kinds["web-prepared.qcow2"] == ("upload", Path("/srv/prepared.qcow2"), None, "0600")
    assert kinds[p.config.cdrom.name] == ("upload", Path("/srv/boot.iso"), None, "0400")
    assert kinds["web-over.qcow2"][0] == "create"
    # the disk names carry the VM's: two VMs' disk.qcow2 never meet there
    other = placed({"name": "db", "disks": [{"path": "data.qcow2", "size": "1GiB"}]})
    assert other.config.disks[0].path == VMS_DIR / "db-data.qcow2"


def test_the_same_config_gives_the_same_paths_and_one_copy_per_file():
    data = {"name": "web", "cdrom": "/srv/boot.iso", "kernel": "/srv/boot.iso"}
    first, second = placed(data), placed(data)
    assert first.config == second.config and first.transfers == second.transfers
    assert len(first.transfers) == 1  # the same file, named twice: copied once


def test_an_image_and_seed_keep_their_store_names_in_the_store_there(tmp_path):
    p = placed(
        {
            "name": "web",
            "image": {"debian": "bookworm", "size": "4GiB"},
            "cloud_init": {"hostname": "web"},
        },
        store=tmp_path,
    )
    root, seed = p.config.disks[0], p.config.disks[-1]
    assert root.path == IMAGES_DIR / "web.root.qcow2"
    assert root.backing is not None and root.backing.parent == IMAGES_DIR
    assert p.config.kernel is not None and p.config.kernel.parent == IMAGES_DIR
    assert seed.path.parent == IMAGES_DIR and seed.path.name.startswith("seed-")
    kinds = {t.target.name: t for t in p.transfers}
    assert kinds[seed.path.name].kind == "seed" and kinds[seed.path.name].mode == "0400"
    assert kinds[root.backing.name].mode == "0444"  # images never change
    assert kinds["web.root.qcow2"].kind == "create" and kinds["web.root.qcow2"].capacity == 4 << 30
    # what made the image goes last, as in the store here
    assert p.transfers[-1].target.suffix == ".json"
