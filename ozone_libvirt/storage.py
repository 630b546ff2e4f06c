"""Disk images on the local host: create qcow2 images (optionally over a backing image) with
qemu-img, read backing chains from qcow2 headers, tell which files may be deleted, and remove
the ones ozone created. Which *domains* use an image is asked of libvirt, in :mod:`.vm`.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import OzoneError

if TYPE_CHECKING:
    from .config import Disk

QCOW2_MAGIC = b"QFI\xfb"
ISO9660_MAGIC = b"CD001"  # at byte 32769 (sector 16, after the type byte)
MAX_CHAIN = 32  # backing files followed at most (a loop or a silly chain stops here)


def _qemu_img(*args: str) -> str:
    exe = shutil.which("qemu-img")
    if exe is None:
        raise OzoneError(
            "qemu-img is not installed", hint="install qemu-utils (scripts/setup-host does)"
        )
    proc = subprocess.run([exe, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise OzoneError(f"qemu-img {args[0]} failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


def image_info(path: Path) -> dict[str, object]:
    return dict(json.loads(_qemu_img("info", "--output=json", "-U", str(path))))


def image_format(path: Path) -> str:
    return str(image_info(path).get("format", "raw"))


def create_disk(disk: Disk, *, owner: tuple[int, int] | None = None) -> None:
    """Create ``disk.path`` (which must not exist) as a qcow2/raw image, mode 0600: a disk
    holds the guest's data, and libvirt gives QEMU access while the VM runs. ``owner``
    (uid, gid): hand the file to QEMU's user for good (VMs that libvirt does not relabel)."""
    args = ["create", "-q", "-f", disk.format]
    if disk.backing is not None:
        args += ["-b", str(disk.backing), "-F", image_format(disk.backing)]
    args.append(str(disk.path))
    if disk.size is not None:
        args.append(str(disk.size))
    _qemu_img(*args)
    disk.path.chmod(0o600)
    if owner is not None:
        os.chown(disk.path, *owner)


def backing_file_of(path: Path) -> Path | None:
    """The backing file a qcow2 image names in its header (None: not qcow2, or none). Reads
    regular files only: a FIFO or a device named by some domain must not hang ozone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as image:
            header = image.read(20)
            if len(header) < 20 or header[:4] != QCOW2_MAGIC:
                return None
            offset, size = struct.unpack(">QI", header[8:20])
            if not offset or not 0 < size <= 4096:
                return None
            image.seek(offset)
            name = image.read(size).decode("utf-8", errors="surrogateescape")
    except OSError:
        return None
    finally:
        os.close(fd)
    if "://" in name or name.startswith("json:"):
        return None  # a network or JSON backing spec, not a file of this host
    backing = Path(name)
    return backing if backing.is_absolute() else Path(os.path.normpath(path.parent / backing))


def backing_chain(path: Path) -> list[Path]:
    """The files below ``path`` in its backing chain, nearest first."""
    chain: list[Path] = []
    current = backing_file_of(path)
    while current is not None and current not in chain and len(chain) < MAX_CHAIN:
        chain.append(current)
        current = backing_file_of(current)
    return chain


def why_not_deletable(path: Path) -> str | None:
    """Why ozone must not delete ``path`` as a disk image (None: it may)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"cannot look at it ({err.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISREG(info.st_mode):
        return "it is not a regular file"
    if info.st_nlink > 1:
        return "it has other hard links"
    if path.suffix.lower() == ".iso" or _is_iso9660(path):
        return "it is an ISO image"
    return None


def _is_iso9660(path: Path) -> bool:
    try:
        with path.open("rb") as image:
            image.seek(32769)
            return image.read(5) == ISO9660_MAGIC
    except OSError:
        return False


def remove_files(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Delete what exists of ``paths``: (removed, [(path, why not)])."""
    removed, failed = [], []
    for path in paths:
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue
        except OSError as err:
            failed.append((path, err.strerror or str(err)))
    return removed, failed


def parse_label(label: str | None) -> tuple[int, int] | None:
    """libvirt's DAC label "+64055:+64055" → (uid, gid)."""
    if not label:
        return None
    user, _, group = label.partition(":")
    try:
        return int(user.lstrip("+")), int(group.lstrip("+"))
    except ValueError:
        return None


def unreadable_by(path: Path, owner: tuple[int, int]) -> str | None:
    """Why the user ``owner`` (uid, gid, with that user's other groups) cannot read
    ``path`` (None: it can). Looks at mode bits, not ACLs."""
    import grp
    import pwd

    uid, gid = owner
    if uid == 0:
        return None
    try:
        user = pwd.getpwuid(uid).pw_name
        groups = set(os.getgrouplist(user, gid))
    except KeyError:
        user, groups = str(uid), {gid}

    def allowed(info: os.stat_result, bits: tuple[int, int, int]) -> bool:
        if info.st_uid == uid:
            return bool(info.st_mode & bits[0])
        if info.st_gid in groups:
            return bool(info.st_mode & bits[1])
        return bool(info.st_mode & bits[2])

    try:
        for folder in reversed(path.parents):
            if not allowed(folder.stat(), (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)):
                return f"user {user} cannot enter folder {folder}"
        info = path.stat()
    except OSError as err:
        return f"cannot look at it ({err.strerror})"
    if not allowed(info, (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)):
        try:
            owner_name = pwd.getpwuid(info.st_uid).pw_name
            group_name = grp.getgrgid(info.st_gid).gr_name
        except KeyError:
            owner_name, group_name = str(info.st_uid), str(info.st_gid)
        mode = stat.S_IMODE(info.st_mode)
        return f"user {user} cannot read it ({owner_name}:{group_name}, mode {mode:04o})"
    return None
