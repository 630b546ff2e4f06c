"""The Python API for programs that embed ozone: one :class:`VM` object per libvirt domain.

from ozone_libvirt import VM

with VM("demo") as vm:
    vm.start(wait=60)
    result = vm.exec(["uname", "-r"], check=True)
    print(result.stdout.decode())
    vm.push("build/app.tar", "/tmp/")
    vm.stop()
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import libvirt

from . import execute, transfer, vm
from . import migrate as migrate_
from .agent import Agent
from .connection import domain_metadata, lookup, open_connection
from .errors import ExecTimeout, ExitError
from .execute import ExecResult
from .results import StartResult


def _sink(stream: IO[bytes] | None) -> execute.Sink:
    """Write each piece of output and flush it, so that it is seen as it arrives."""
    assert stream is not None
    flush = getattr(stream, "flush", None)

    def write(data: bytes) -> None:
        stream.write(data)
        if flush is not None:
            flush()

    return write


class VM:
    """A libvirt domain managed by ozone. Opens its own connection unless given one."""

    def __init__(
        self, name: str, *, uri: str | None = None, conn: libvirt.virConnect | None = None
    ) -> None:
        self.name = name
        self._own = conn is None
        self.conn = conn if conn is not None else open_connection(uri)
        self._agent: Agent | None = None
        self._stage: str | None = None

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self.conn.close()

    @property
    def agent(self) -> Agent:
        if self._agent is None:
            self._agent = Agent(lookup(self.conn, self.name))
        return self._agent

    def _stage_dir(self) -> str | None:
        """The VM's own stage folder (read once: the VM's config rarely changes under us)."""
        if self._stage is None:
            meta = domain_metadata(self.agent.dom, defined=True)
            self._stage = (meta.stage_dir if meta else None) or ""
        return self._stage or None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, *, wait: float | None = None) -> StartResult:
        """Boot (or resume) the VM; with ``wait``, return once its guest agent answers."""
        result = vm.start(self.conn, self.name)
        if wait is not None:
            vm.wait_agent(self.conn, self.name, timeout=wait)
        return result

    def wait(self, timeout: float = 60) -> float:
        return vm.wait_agent(self.conn, self.name, timeout=timeout)

    def stop(self, *, timeout: float = 60, force: bool = False) -> vm.StopResult:
        return vm.stop(self.conn, self.name, timeout=timeout, force=force)

    def status(self) -> vm.VMStatus:
        return vm.status(self.conn, self.name)

    # --- programs and files --------------------------------------------------------------

    def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: IO[bytes] | bytes | None = None,
        timeout: float | None = None,
        stdout: IO[bytes] | None = None,
        stderr: IO[bytes] | None = None,
        check: bool = False,
        stage_dir: str | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the guest. Output goes to the ``stdout``/``stderr`` file objects
        as it arrives when given, else it is captured into the result. Raises
        :class:`ExitError` for a non-zero status when ``check``, :class:`ExecTimeout` (with
        the output so far) when ``timeout`` runs out. Output is staged in ``stage_dir`` in
        the guest while the program runs (default: the VM's ``stage_dir``, else /var/tmp)."""
        began = time.monotonic()
        out_buffer = io.BytesIO() if stdout is None else None
        err_buffer = io.BytesIO() if stderr is None else None
        out_sink = _sink(stdout if stdout is not None else out_buffer)
        err_sink = _sink(stderr if stderr is not None else err_buffer)
        try:
            code = execute.run(
                self.agent,
                list(argv),
                env=env,
                cwd=cwd,
                user=user,
                stdin=stdin,
                timeout=timeout,
                stage_dir=stage_dir or self._stage_dir(),
                stdout=out_sink,
                stderr=err_sink,
            )
        except ExecTimeout as err:
            err.stdout = out_buffer.getvalue() if out_buffer else None
            err.stderr = err_buffer.getvalue() if err_buffer else None
            raise
        result = ExecResult(
            list(argv),
            code,
            out_buffer.getvalue() if out_buffer else None,
            err_buffer.getvalue() if err_buffer else None,
            time.monotonic() - began,
        )
        if check and code != 0:
            raise ExitError(result)
        return result

    def push(self, source: str | Path, destination: str) -> transfer.CopyResult:
        """Copy a host file into the guest (``destination`` ending in / means a directory)."""
        return transfer.copy_to_guest(self.agent, Path(source), destination)

    def pull(self, source: str, destination: str | Path) -> transfer.CopyResult:
        """Copy a guest file to the host."""
        return transfer.copy_from_guest(self.agent, source, destination)

    def migrate(
        self, host: str, *, live: bool = False, copy_storage: bool = False, timeout: float = 600
    ) -> migrate_.MigrateResult:
        """Move the VM to ``host`` (an inventory name or a libvirt URI). This object still
        speaks to the host it came from: open ``VM(name, uri=result.uri)`` to go on there."""
        label, uri = migrate_.resolve_host(host)
        self._agent = None  # the domain left this host
        return migrate_.migrate(
            self.conn,
            self.name,
            uri,
            live=live,
            copy_storage=copy_storage,
            host=label,
            timeout=timeout,
        )

    def sync_clock(self) -> float:
        """Set the guest's clock from the host's; returns how far off it was (seconds)."""
        return self.agent.set_time()
