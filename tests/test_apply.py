"""`ozone apply` and `ozone diff` against the real libvirtd, with a real tiny guest."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from .conftest import URI, domain_exists, run_ozone, virsh

pytestmark = pytest.mark.libvirtd


def apply(*args: str) -> tuple[int, dict]:
    proc = run_ozone("apply", *args, "--json")
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def actions(doc: dict) -> dict[str, str]:
    return {s["name"]: s["action"] for s in doc["plan"]["steps"]}


def held(name: str) -> str:
    return virsh("dumpxml", "--inactive", name)


def result(doc: dict, name: str) -> dict:
    return next(r for r in doc["results"] if r["name"] == name)


def live_memory_kib(name: str) -> int:
    match = re.search(r"<memory unit='KiB'>(\d+)</memory>", virsh("dumpxml", name))
    assert match, name
    return int(match.group(1))


def edit(path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.guest
def test_a_folder_converges_and_a_second_apply_changes_nothing(vms, workdir):
    folder = workdir / "vms"
    folder.mkdir()
    vms.workdir = folder
    made = [vms.config() for _ in range(3)]
    (a, a_path), (b, b_path), (c, c_path) = made

    # without --yes and without a terminal: the plan, and nothing changed
    proc = run_ozone("apply", str(folder))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "plan: 3 to create"
    assert all(f"+ {n}" in proc.stdout for n, _ in made), proc.stdout
    assert "--yes" in proc.stderr
    assert not any(domain_exists(n) for n, _ in made)

    code, doc = apply(str(folder), "--yes")
    assert code == 0
    assert actions(doc) == {a: "create", b: "create", c: "create"}
    assert doc["applied"] and all(r["ok"] and r["done"] == "defined" for r in doc["results"])
    before = {n: held(n) for n, _ in made}

    code, doc = apply(str(folder), "--yes")
    assert (code, set(actions(doc).values())) == (0, {"unchanged"})
    assert {n: held(n) for n, _ in made} == before  # byte-identical: nothing was redefined
    assert run_ozone("diff", a).stdout == ""

    # memory of a running VM: restart needed, and not done without --restart
    start = run_ozone("start", a, "--wait", "--timeout", "120")
    assert start.returncode == 0, start.stderr
    edit(a_path, memory="320MiB")
    edit(b_path, memory="320MiB")
    diff = run_ozone("diff", str(a_path))
    assert diff.returncode == 0, diff.stderr
    assert '-  <memory unit="KiB">262144</memory>' in diff.stdout, diff.stdout
    assert '+  <memory unit="KiB">327680</memory>' in diff.stdout, diff.stdout
    assert "address" not in diff.stdout  # what libvirt adds by itself is left out

    proc = run_ozone("apply", str(folder), "--yes")
    assert proc.returncode == 0, proc.stderr
    assert f"~ {a} change  memory 256MiB -> 320MiB (restart needed: it is running)" in proc.stdout
    assert f"~ {b} change  memory 256MiB -> 320MiB" in proc.stdout
    assert live_memory_kib(a) == 256 * 1024  # still running with what it was started with
    assert "327680" in held(a) and "327680" in held(b)
    code, doc = apply(str(folder), "--yes")  # still needed: the running VM has the old memory
    assert actions(doc) == {a: "restart-needed", b: "unchanged", c: "unchanged"}
    assert doc["plan"]["steps"][0]["changes"] == [
        {"field": "memory", "before": 256 << 20, "after": 320 << 20}
    ]

    code, doc = apply(str(folder), "--yes", "--restart")
    assert code == 0 and result(doc, a)["done"] == "restarted", doc
    assert virsh("domstate", a).strip() == "running"
    assert live_memory_kib(a) == 320 * 1024

    # the description reaches a running VM without a restart
    edit(a_path, description="web server")
    code, doc = apply(str(folder), "--yes")
    assert actions(doc)[a] == "change" and result(doc, a)["done"] == "changed live"
    assert "<description>web server</description>" in virsh("dumpxml", a)

    # --prune: the VM whose config is gone goes (its disk-less definition only)
    c_path.unlink()
    code, doc = apply(str(folder), "--yes")
    assert c not in actions(doc) and domain_exists(c)  # without --prune it stays
    code, doc = apply(str(folder), "--yes", "--prune")
    assert actions(doc)[c] == "prune" and code == 0
    assert not domain_exists(c)
    # a running VM is pruned only with --restart (its clean stop goes through the agent:
    # the busybox guest ignores ACPI, and a stop would wait out its 60 s)
    assert run_ozone("wait", a, "--timeout", "120").returncode == 0
    a_path.unlink()
    code, doc = apply(str(folder), "--yes", "--prune")
    assert code == 1 and actions(doc)[a] == "prune"
    assert "running" in result(doc, a)["error"]["message"]
    assert domain_exists(a)
    code, doc = apply(str(folder), "--yes", "--prune", "--restart")
    assert code == 0 and not domain_exists(a)


@pytest.mark.guest
def test_one_failing_step_among_several(vms, workdir):
    folder = workdir / "vms"
    folder.mkdir()
    vms.workdir = folder
    good1, _ = vms.config()
    taken, _ = vms.config()
    good2, _ = vms.config()
    # a domain of that name that ozone did not make: its define is refused
    subprocess.run(
        ["virsh", "-c", URI, "define", "/dev/stdin"],
        input=f"<domain type='qemu'><name>{taken}</name><memory>65536</memory><os>"
        "<type arch='x86_64'>hvm</type></os></domain>",
        text=True,
        check=True,
        capture_output=True,
    )
    code, doc = apply(str(folder), "--yes", "--jobs", "2")
    assert code == 1
    results = {r["name"]: r for r in doc["results"]}
    assert results[good1]["ok"] and results[good2]["ok"]
    assert not results[taken]["ok"]
    assert "not made by ozone" in results[taken]["error"]["message"]
    assert domain_exists(good1) and domain_exists(good2)
    proc = run_ozone("apply", str(folder), "--yes")
    assert proc.returncode == 1
    assert (
        f"error: {taken}: a domain named" in proc.stderr
        and "applied: 0 changed, 1 failed" in proc.stderr
    )


def test_a_bad_config_in_the_folder_changes_nothing(vms, workdir):
    folder = workdir / "vms"
    folder.mkdir()
    vms.workdir = folder
    good, _ = vms.config({"cdrom": "/dev/null"}, tiny=False)
    _bad, bad_path = vms.config({"cdrom": "/dev/null", "vcpus": "many"}, tiny=False)
    proc = run_ozone("apply", str(folder), "--yes")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {bad_path}: vcpus:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not domain_exists(good)
    # two configs of one VM
    (folder / "copy.json").write_text((folder / f"{good}.json").read_text())
    bad_path.unlink()
    proc = run_ozone("apply", str(folder), "--yes")
    assert proc.returncode == 2 and "is named by two configs" in proc.stderr
    assert not domain_exists(good)


def test_diff_of_a_vm_that_does_not_exist(vms):
    name, path = vms.config({"cdrom": "/dev/null"}, tiny=False)
    proc = run_ozone("diff", str(path))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: no VM named {name!r}",
        f"hint: `ozone apply {path}` creates it",
    ]


@pytest.mark.guest
def test_define_is_apply_of_one_file(vms):
    name, path = vms.config()
    first = run_ozone("define", str(path), "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["changed"] is True
    before = held(name)
    again = run_ozone("define", str(path))
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"Unchanged: {name} ("), again.stdout
    assert held(name) == before
    edit(path, vcpus=2)
    changed = json.loads(run_ozone("define", str(path), "--json").stdout)
    assert (changed["changed"], changed["created"]) == (True, False)
    assert "<vcpu placement='static'>2</vcpu>" in held(name)


def test_a_cloud_init_image_vm_is_unchanged_on_the_second_apply(vms, workdir):
    """The Debian example (an image from the store, a cloud-init seed with the VM's own ssh
    key): what the planner resolves is what define recorded, and diff finds nothing."""
    import os
    from pathlib import Path

    from .conftest import REPO, ozone_env

    store = os.environ.get("OZONE_IMAGE_DIR", str(REPO / "build" / "images"))
    env = ozone_env(OZONE_IMAGE_DIR=store)
    name = vms.name()
    text = (REPO / "examples" / "debian.yaml").read_text()
    path = workdir / f"{name}.yaml"
    path.write_text(text.replace("name: debian\n", f"name: {name}\n"))
    try:
        first = run_ozone("apply", str(path), "--yes", "--json", env=env, timeout=900)
        assert first.returncode == 0, first.stdout + first.stderr
        assert actions(json.loads(first.stdout)) == {name: "create"}
        again = run_ozone("apply", str(path), "--json", env=env)
        assert actions(json.loads(again.stdout)) == {name: "unchanged"}, again.stdout
        diff = run_ozone("diff", name, env=env)
        assert (diff.returncode, diff.stdout) == (0, ""), diff.stdout + diff.stderr
    finally:
        run_ozone("undefine", name, "--remove-storage", env=env)
        Path(store, f"{name}.root.qcow2").unlink(missing_ok=True)
