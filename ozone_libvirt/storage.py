"""Disk images on the local host: create qcow2 images (optionally over a backing image)
with qemu-img, and remove the ones ozone created."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import OzoneError

if TYPE_CHECKING:
    from .config import Disk


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


def create_disk(disk: Disk) -> None:
    """Create ``disk.path`` (which must not exist) as a qcow2/raw image."""
    args = ["create", "-q", "-f", disk.format]
    if disk.backing is not None:
        backing_format = str(image_info(disk.backing).get("format", "raw"))
        args += ["-b", str(disk.backing), "-F", backing_format]
    args.append(str(disk.path))
    if disk.size is not None:
        args.append(str(disk.size))
    _qemu_img(*args)
    disk.path.chmod(0o644)


def remove_files(paths: list[Path]) -> list[Path]:
    removed = []
    for path in paths:
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue
    return removed
