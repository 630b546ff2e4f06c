"""The QEMU guest agent (qemu-ga), reached through libvirt's agent passthrough.

:class:`Agent` sends one command and returns its ``return`` value; every failure becomes an
ozone error that says what went wrong in terms of the VM (not running, no agent channel, agent
not answering, the guest refused). Higher layers (:mod:`.execute`, :mod:`.transfer`) build
programs and file copies out of these calls.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import libvirt
import libvirt_qemu

from .connection import (
    call,
    close_quietly,
    find_domain_by_uuid,
    libvirt_errors,
    open_connection,
    translate_agent_error,
)
from .errors import (
    AgentCommandFailed,
    ConnectionFailed,
    OzoneError,
    RequestTooLarge,
    StateError,
    TimeoutExpired,
)

DEFAULT_TIMEOUT = 10  # seconds for one agent command (libvirt waits this long for the reply)
# Sizes that the agent and libvirt accept in one call (measured, see ENVIRONMENT.md):
# a reply over ~4 MiB fails in libvirt's RPC; requests of 215 KB and more sometimes stall
# qemu-ga until the call times out (and the next call with it), 210 KB never did in our runs.
READ_CHUNK = 1 << 20
WRITE_CHUNK = 128 << 10  # 175 KB of JSON once in base64
REQUEST_MAX = 176 << 10


@dataclass(frozen=True)
class ScriptResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


class Agent:
    """One VM's guest agent."""

    def __init__(self, dom: libvirt.virDomain, *, owns_connection: bool = False) -> None:
        self.dom = dom
        self.name: str = dom.name()
        # how long a short program run takes here (seconds), learnt by execute.run
        self.short_run = 0.02
        self._owns_connection = owns_connection

    @property
    def uri(self) -> str:
        """The connection's URI (known locally: it still answers when the connection broke)."""
        return str(self.dom.connect().getURI())

    def call(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: int = 0
    ) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        text = json.dumps(request)
        if len(text) > REQUEST_MAX:
            raise RequestTooLarge(
                f"{command} request of {len(text)} bytes is more than the guest agent takes "
                f"({REQUEST_MAX})"
            )
        with libvirt_errors(explain=lambda err: translate_agent_error(err, self.dom, command)):
            reply = libvirt_qemu.qemuAgentCommand(self.dom, text, timeout or DEFAULT_TIMEOUT, 0)
        return json.loads(reply).get("return")

    def reconnect(self, *, timeout: float) -> Agent | None:
        """After the libvirt connection broke: the same VM's agent over a new connection
        (which the returned Agent owns), or None if libvirt does not answer within
        ``timeout``. Raises StateError if the VM is gone or stopped."""
        uri, uuid = self.uri, self.dom.UUIDString()
        give_up = time.monotonic() + timeout
        while True:
            try:
                conn = open_connection(uri)
                try:
                    dom = find_domain_by_uuid(conn, uuid, name=self.name)
                    active = dom is not None and bool(call(dom.isActive, name=self.name))
                except OzoneError:
                    close_quietly(conn)
                    raise
            except OzoneError:  # libvirt does not answer yet (or not yet for this)
                if time.monotonic() >= give_up:
                    return None
                time.sleep(0.25)
                continue
            if not active:
                close_quietly(conn)
                gone = "is gone" if dom is None else "is not running"
                raise StateError(f"{self.name} {gone}")
            agent = Agent(dom, owns_connection=True)
            agent.short_run = self.short_run
            return agent

    def close_connection(self) -> None:
        if self._owns_connection:
            close_quietly(self.dom.connect())

    def answers(self, *, timeout: int = 2) -> bool:
        try:
            self.call("guest-ping", timeout=timeout)
        except ConnectionFailed:
            raise  # libvirt went away: that says nothing about the agent
        except OzoneError:
            return False
        return True

    # --- files ---------------------------------------------------------------------------

    def open(self, path: str, mode: str) -> int:
        return int(self.call("guest-file-open", {"path": path, "mode": mode}))

    def read(self, handle: int, count: int = READ_CHUNK) -> tuple[bytes, bool]:
        """Up to ``count`` bytes, and whether the read hit end of file."""
        reply = self.call("guest-file-read", {"handle": handle, "count": count})
        return base64.b64decode(reply.get("buf-b64", "")), bool(reply.get("eof"))

    def write(self, handle: int, data: bytes) -> None:
        """Write all of ``data`` (in chunks the agent accepts)."""
        for start in range(0, len(data), WRITE_CHUNK):
            piece = data[start : start + WRITE_CHUNK]
            reply = self.call(
                "guest-file-write",
                {"handle": handle, "buf-b64": base64.b64encode(piece).decode()},
            )
            if reply.get("count") != len(piece):
                raise AgentCommandFailed(
                    "guest-file-write",
                    f"wrote {reply.get('count')} of {len(piece)} bytes",
                    name=self.name,
                )

    def flush(self, handle: int) -> None:
        self.call("guest-file-flush", {"handle": handle})

    def close(self, handle: int) -> None:
        self.call("guest-file-close", {"handle": handle})

    def exists(self, path: str) -> bool:
        try:
            handle = self.open(path, "r")
        except AgentCommandFailed:
            return False
        self.close(handle)
        return True

    # --- processes -------------------------------------------------------------------------

    def spawn(
        self, path: str, args: list[str], *, env: list[str] | None = None, capture: bool = True
    ) -> int:
        request: dict[str, Any] = {"path": path, "arg": args, "capture-output": capture}
        if env is not None:
            request["env"] = env
        return int(self.call("guest-exec", request)["pid"])

    def status(self, pid: int) -> dict[str, Any]:
        return dict(self.call("guest-exec-status", {"pid": pid}))

    def script(self, script: str, *args: str, timeout: float = 30) -> ScriptResult:
        """Run a short shell script of ozone's own (``sh -c SCRIPT ozone ARGS``) to completion,
        with its output captured: for small jobs like stat, chmod, rm and kill."""
        pid = self.spawn("/bin/sh", ["-c", script, "ozone", *args])
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            status = self.status(pid)
            if status.get("exited"):
                break
            if time.monotonic() >= deadline:
                raise TimeoutExpired(f"a helper command in {self.name} took over {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        code = status.get("exitcode")
        if code is None:
            code = 128 + int(status.get("signal", 0))
        return ScriptResult(
            int(code),
            base64.b64decode(status.get("out-data", "")),
            base64.b64decode(status.get("err-data", "")),
        )

    # --- clock -----------------------------------------------------------------------------

    def clock_offset(self) -> float:
        """How far the guest's clock is from the host's, in seconds (negative: behind)."""
        return (int(self.call("guest-get-time")) - time.time_ns()) / 1e9

    def set_time(self, *, report_offset: bool = True) -> float:
        """Set the guest's clock to the host's; returns how far off it was, in seconds
        (0.0 when not ``report_offset``, which saves an agent call)."""
        before = self.clock_offset() if report_offset else 0.0
        try:
            self.call("guest-set-time", {"time": time.time_ns()})
        except AgentCommandFailed as err:
            # the system clock is set first; only copying it to the RTC (hwclock -w) failed
            if "hwclock" not in err.detail:
                raise
        return before
