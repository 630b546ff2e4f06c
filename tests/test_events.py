"""`ozone events`: libvirt's lifecycle and agent events as lines, on a real libvirtd with the
tiny guest; the mapping of libvirt's codes to names is pure."""

from __future__ import annotations

import itertools
import json
import queue
import signal
import subprocess
import threading
import time
from typing import Any

import libvirt
import pytest

from ozone_libvirt.events import agent_event, lifecycle_event

from .conftest import ozone_cmd, ozone_env, run_ozone


def test_lifecycle_codes_have_names():
    assert lifecycle_event(
        libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED
    ) == ("started", "booted")
    assert lifecycle_event(
        libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED
    ) == ("stopped", "saved")
    assert lifecycle_event(
        libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST
    ) == ("shutdown", "guest")
    assert lifecycle_event(
        libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_RESTORED
    ) == ("started", "restored")
    assert lifecycle_event(
        libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED
    ) == ("paused", "migrated")
    assert lifecycle_event(99, 3) == ("event-99", "3")  # a newer libvirt's: shown, not lost
    assert lifecycle_event(libvirt.VIR_DOMAIN_EVENT_CRASHED, 42) == ("crashed", "42")
    assert agent_event(
        libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED,
        libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_REASON_CHANNEL,
    ) == ("agent-connected", "channel")


class Stream:
    """`ozone events --json` running in the background, its lines in a queue."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            ozone_cmd("events", "--json", *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ozone_env(),
            # Ctrl-C as on a terminal: a background job (CI's, say) inherits SIGINT ignored
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def wait_for(self, name: str, event: str, *, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {event} event of {name} within {timeout} s")
            try:
                item = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if item["name"] == name and item["event"] == event:
                return item

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc.kill()


@pytest.mark.libvirtd
@pytest.mark.guest
def test_events_of_a_guest_started_and_destroyed(vms):
    name, path = vms.config()
    assert run_ozone("define", str(path)).returncode == 0
    stream = Stream(name)
    try:
        # until the stream listens: define it again, each time with another description (an
        # unchanged config is left alone, which makes no event)
        deadline = time.monotonic() + 60
        for attempt in itertools.count():
            data = json.loads(path.read_text())
            path.write_text(json.dumps({**data, "description": f"attempt {attempt}"}))
            assert run_ozone("define", str(path)).returncode == 0
            try:
                stream.wait_for(name, "defined", timeout=1)
                break
            except pytest.fail.Exception:
                assert time.monotonic() < deadline, "ozone events never reported a define"
        assert run_ozone("start", name).returncode == 0
        started = stream.wait_for(name, "started", timeout=60)
        assert started["reason"] == "booted" and len(started["uuid"]) == 36
        assert stream.wait_for(name, "agent-connected", timeout=120)["reason"] == "channel"
        assert run_ozone("destroy", name).returncode == 0
        assert stream.wait_for(name, "stopped", timeout=60)["reason"] == "destroyed"
    finally:
        code = stream.stop()
    assert code == 143  # SIGTERM ends it, as a shell reports it
    assert "Traceback" not in (stream.proc.stderr.read() if stream.proc.stderr else "")


@pytest.mark.libvirtd
def test_events_timeout_and_a_missing_vm(libvirtd):
    began = time.monotonic()
    proc = run_ozone("events", "--timeout", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert 1 <= time.monotonic() - began < 30
    proc = run_ozone("events", "ozt-no-such-vm")
    assert proc.returncode == 1
    assert "ozt-no-such-vm" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_ozone("events", "--timeout", "0")
    assert proc.returncode == 2
