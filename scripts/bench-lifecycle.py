#!/usr/bin/env python3
"""Benchmark: `ozone define/start/list` against `virsh define/start/list`, whole process,
same run, same machine. Prints a table of medians and the ratio ozone/virsh.

    .venv/bin/python scripts/bench-lifecycle.py [--runs 15] [--domains 1000]

Needs a running libvirtd at qemu:///system (scripts/setup-host) and the guest ISO
(scripts/build-guest-iso). Everything it creates is named ozbench-* and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import libvirt

ROOT = Path(__file__).resolve().parents[1]
URI = "qemu:///system"
OZONE = [sys.executable, "-m", "ozone_libvirt"]
ENV = {
    **os.environ,
    "LIBVIRT_DEFAULT_URI": URI,
    "OZONE_ACCEL": os.environ.get("OZONE_ACCEL", "tcg"),
}
WORK = Path("/var/lib/libvirt/images/ozone-bench")


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, env=ENV, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.decode().strip()}")


def timed(cmd: list[str], runs: int, before: Callable[[], None] | None = None) -> list[float]:
    times = []
    for _ in range(runs):
        if before:
            before()
        t0 = time.perf_counter()
        run(cmd)
        times.append(time.perf_counter() - t0)
    return times


def quiet(*cmd: str) -> None:
    subprocess.run(list(cmd), capture_output=True, env=ENV, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--domains", type=int, default=1000)
    args = parser.parse_args()
    libvirt.registerErrorHandler(lambda *_: None, None)
    iso = ROOT / "build" / "guest" / "ozone-guest.iso"
    if not iso.exists():
        raise SystemExit(f"{iso} is missing: run scripts/build-guest-iso")
    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=WORK))
    work.chmod(0o755)
    cfg = work / "ozbench-vm.json"
    cfg.write_text(json.dumps({"name": "ozbench-vm", "memory": "256MiB", "cdrom": str(iso)}))
    conn = libvirt.open(URI)
    rows: list[tuple[str, float, str, float]] = []
    try:
        # define: ozone reads + validates the config, checks QMP clashes, defines
        run([*OZONE, "define", str(cfg)])
        xml_path = work / "ozbench-vm.xml"
        xml_path.write_text(
            subprocess.run(
                ["virsh", "-c", URI, "dumpxml", "--inactive", "ozbench-vm"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        oz = timed([*OZONE, "define", str(cfg)], args.runs)
        vs = timed(["virsh", "-c", URI, "define", str(xml_path)], args.runs)
        rows.append(("ozone define", statistics.median(oz), "virsh define", statistics.median(vs)))

        # start (returns when QEMU runs); destroyed before every run
        def off() -> None:
            quiet("virsh", "-c", URI, "destroy", "ozbench-vm")

        oz = timed([*OZONE, "start", "ozbench-vm"], args.runs, before=off)
        vs = timed(["virsh", "-c", URI, "start", "ozbench-vm"], args.runs, before=off)
        off()
        rows.append(("ozone start", statistics.median(oz), "virsh start", statistics.median(vs)))

        # list, with N extra (non-ozone) domains defined
        template = (
            "<domain type='qemu'><name>ozbench-{i}</name><memory unit='MiB'>64</memory>"
            "<os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"
        )
        t0 = time.perf_counter()
        for i in range(args.domains):
            conn.defineXML(template.format(i=i))
        print(
            f"defined {args.domains} domains in {time.perf_counter() - t0:.1f} s", file=sys.stderr
        )
        for label, extra in (("ozone list", []), ("ozone list --all", ["--all"])):
            oz = timed([*OZONE, "list", *extra], args.runs)
            vs = timed(["virsh", "-c", URI, "list", "--all"], args.runs)
            rows.append(
                (
                    f"{label} ({args.domains + 1} domains)",
                    statistics.median(oz),
                    "virsh list --all",
                    statistics.median(vs),
                )
            )
    finally:
        for dom in conn.listAllDomains(0):
            if dom.name().startswith("ozbench-"):
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
        conn.close()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nmedians of {args.runs} runs, whole process, qemu:///system, TCG\n")
    print(f"| {'ozone':<32} | {'median':>8} | {'virsh':<18} | {'median':>8} | {'ratio':>5} |")
    print(f"|{'-' * 34}|{'-' * 10}|{'-' * 20}|{'-' * 10}|{'-' * 7}|")
    for oz_label, oz_t, vs_label, vs_t in rows:
        print(
            f"| {oz_label:<32} | {oz_t * 1000:6.0f}ms | {vs_label:<18} | {vs_t * 1000:6.0f}ms "
            f"| {oz_t / vs_t:4.1f}x |"
        )


if __name__ == "__main__":
    main()
