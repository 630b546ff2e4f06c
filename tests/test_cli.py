"""CLI behaviour that needs no guest: lookup by name, `xml`, import budget, usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from .conftest import REPO, ozone_env, run_ozone


def test_xml_by_name_on_the_config_path(tmp_path):
    (tmp_path / "web.yaml").write_text("name: web\nmemory: 1GiB\nvcpus: 2\ncdrom: d.iso\n")
    proc = run_ozone("xml", "web", env=ozone_env(OZONE_CONFIG_PATH=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    root = etree.fromstring(proc.stdout.encode())
    assert root.findtext("name") == "web"
    assert root.findtext("memory") == str(1024 * 1024)
    assert root.findtext("vcpu") == "2"
    assert root.get("type") == "qemu"  # OZONE_ACCEL=tcg


def test_python_dash_m_works():
    proc = subprocess.run(
        [sys.executable, "-m", "ozone_libvirt", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0
    assert "define" in proc.stdout


def test_bad_ozone_accel_is_a_usage_error():
    proc = run_ozone(
        "xml", str(REPO / "examples" / "demo.json"), "--json", env=ozone_env(OZONE_ACCEL="fast")
    )
    assert proc.returncode == 2
    assert "OZONE_ACCEL" in proc.stderr + proc.stdout


def test_unknown_option_is_exit_2():
    assert run_ozone("list", "--bogus").returncode == 2


def test_commands_that_read_no_config_do_not_import_the_validator():
    code = (
        "import sys\n"
        "from ozone_libvirt import cli\n"
        "try:\n"
        "    cli.app(args=['-c', 'test:///default', 'list', '--all'], prog_name='ozone')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('ozone_libvirt', 'yaml')))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "ozone_libvirt.inventory" in loaded  # it did list
    for heavy in ("ozone_libvirt.config", "yaml", "ozone_libvirt.vm", "ozone_libvirt.domain_xml"):
        assert heavy not in loaded, f"`ozone list` imported {heavy}"


def test_version():
    import tomllib

    from ozone_libvirt import __version__

    proc = run_ozone("--version")
    assert (proc.returncode, proc.stdout) == (0, f"ozone {__version__}\n"), proc.stderr
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert __version__ == declared  # the package and its metadata say the same


COMPLETE = """
eval "$(ozone --show-completion bash)"
COMP_WORDS=(ozone "$@")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
_ozone_completion ozone
printf '%s\\n' "${COMPREPLY[@]}"
"""


def complete(*words: str, cwd: Path | None = None, **env: str) -> list[str]:
    """What bash completes for `ozone WORDS…` (the last word being typed), through the
    script `ozone --show-completion bash` prints, as an interactive bash would run it."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    proc = subprocess.run(
        ["bash", "-c", COMPLETE, "complete", *words],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=ozone_env(PATH=path, **env),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return proc.stdout.split()


@pytest.mark.libvirtd
def test_bash_completes_vm_and_config_names(vms, tmp_path):
    name, _path = vms.config({"cdrom": "/dev/null"}, tiny=False)
    (tmp_path / "vms").mkdir()
    (tmp_path / "vms" / "alpha.yaml").write_text("name: alpha\n")
    (tmp_path / "vms" / "beta.json").write_text("{}")
    subprocess.run(
        ["virsh", "-c", "qemu:///system", "define", "/dev/stdin"],
        input=f"<domain type='qemu'><name>{name}</name><memory>65536</memory><os>"
        "<type arch='x86_64'>hvm</type></os></domain>",
        text=True,
        check=True,
        capture_output=True,
    )
    assert complete("status", name[:-1]) == [name]
    assert complete("start", name) == [name]
    assert complete("define", "al", cwd=tmp_path) == ["alpha"]
    assert complete("define", "vms/", cwd=tmp_path) == ["vms/alpha.yaml", "vms/beta.json"]
    assert complete("status", "ozt-nothing-like-this") == []
    # no libvirt to ask: nothing offered, and nothing printed
    assert complete("status", "x", LIBVIRT_DEFAULT_URI="qemu+tcp://127.0.0.1:1/system") == []
