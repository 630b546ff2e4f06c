"""The Vagrantfile is valid (checked offline by vagrant itself)."""

from __future__ import annotations

import shutil
import subprocess

from .conftest import REPO


def test_vagrantfile_validates(tmp_path):
    vagrant = shutil.which("vagrant")
    assert vagrant, "vagrant is missing: scripts/setup-host --test installs it"
    shutil.copy(REPO / "Vagrantfile", tmp_path / "Vagrantfile")
    proc = subprocess.run(
        [vagrant, "validate"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validated successfully" in proc.stdout
