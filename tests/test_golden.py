"""Every config in examples/ has its domain XML in xml/. The XML is rendered as if the
repository lived at /srv/ozone on a host with working KVM, so the files do not depend on
where the checkout is. Regenerate with `make xml` (pytest --regenerate-output)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ozone_libvirt import domain_xml as dx
from ozone_libvirt import images
from ozone_libvirt.config import parse_config, read_config_data

from .conftest import REPO

EXAMPLES = sorted(p for p in (REPO / "examples").iterdir() if p.suffix in (".json", ".yaml"))
GOLDEN_ROOT = Path("/srv/ozone")
GOLDEN_STORE = images.SYSTEM_STORE
GOLDEN_FACTS = dx.HostFacts(
    kvm=True,
    log_dir=Path("/var/log/libvirt/qemu"),
    qmp_dir=Path("/var/lib/ozone/qmp"),
    virtiofsd_ro=Path("/var/lib/ozone/libexec/virtiofsd-ro"),
)


def render(example: Path) -> str:
    cfg = parse_config(read_config_data(example), source=GOLDEN_ROOT / "examples" / example.name)
    cfg = images.resolve(cfg, store=GOLDEN_STORE).config  # configs with an image
    formats = {d.backing: "qcow2" for d in cfg.disks if d.backing}  # as define finds them
    root = dx.build_domain(
        cfg,
        facts=GOLDEN_FACTS,
        qmp_endpoint=dx.choose_qmp(cfg, GOLDEN_FACTS),
        backing_formats=formats,
        forwards=dx.planned_forwards(cfg),
    )
    return dx.to_string(root)


def golden_path(example: Path) -> Path:
    return REPO / "xml" / f"{example.stem}.xml"


def test_there_are_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_golden_xml(example, request):
    actual = render(example)
    golden = golden_path(example)
    if request.config.getoption("--regenerate-output"):
        golden.write_text(actual)
    assert golden.exists(), f"{golden} is missing: run `make xml` and review it"
    assert golden.read_text() == actual, f"{golden} is stale: run `make xml` and review the diff"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_golden_xml_passes_libvirt_schema(example):
    validator = shutil.which("virt-xml-validate")
    assert validator, "virt-xml-validate is missing: install libvirt-clients and libxml2-utils"
    proc = subprocess.run(
        [validator, str(golden_path(example)), "domain"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_no_orphan_golden_files():
    stems = {p.stem for p in EXAMPLES}
    orphans = [p.name for p in (REPO / "xml").glob("*.xml") if p.stem not in stems]
    assert not orphans, f"xml/ has files for no example: {orphans}"
