"""Run a program in the guest like running it locally: streamed stdout/stderr, stdin, exit
code, timeout, through nothing but the QEMU guest agent.

qemu-ga's own ``guest-exec`` capture returns output only when the program has exited, and
libvirt refuses replies over a few MiB. So the program runs under a small POSIX-shell
wrapper (:data:`WRAPPER`) that sends its stdout and stderr to files in the guest's /tmp:

* a program that ends quickly with little output costs exactly what a bare ``guest-exec`` +
  ``guest-exec-status`` loop costs: at exit the wrapper prints a header line and the whole
  (small) output on its own stdout/stderr, which come back in the final ``guest-exec-status``;
* a program that runs longer is streamed: the host opens both files and reads what is new on
  every poll, then drops a ``.stream`` marker so that the wrapper, at exit, leaves the output
  to the open handles instead of capturing it again;
* a quick program with a lot of output leaves its files behind ("kept"), the host reads them
  and removes them.

The header (``OZONE-EXEC RC OUT_SIZE ERR_SIZE MODE``) carries the exact output sizes, so a
short read is an error, never silent truncation. stdin travels as numbered chunk files that a
feeder loop in the wrapper cats into a FIFO, announced on a control FIFO: the agent only ever
writes to regular files (its non-blocking writes to a pipe could lose data), and the host keeps
at most :data:`STDIN_WINDOW` chunks outstanding so the guest's /tmp never holds much of it.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import queue
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import libvirt

from .agent import READ_CHUNK, Agent
from .errors import (
    AgentCommandFailed,
    ExecFailed,
    ExecTimeout,
    OzoneError,
    StateError,
    UsageError,
)

Sink = Callable[[bytes], Any]

GUEST_TMP = "/tmp"
CAPTURE_LIMIT = 256 << 10  # each stream up to this size comes back in guest-exec-status
STREAM_AFTER = 0.1  # seconds a program runs before its output is streamed
FIRST_POLL = 0.75  # first guest-exec-status after this share of a short run's usual time
POLL_MIN = 0.002
POLL_MAX = 0.05  # longest pause between polls while nothing happens
STDIN_CHUNK = 1 << 20
STDIN_WINDOW = 4
KILL_WAIT = 10.0

# The wrapper is put together from these parts for each run, only with the parts that run
# needs: under TCG the guest's shell costs about 0.5 ms per command it reads, so the common
# path (no cwd, user or stdin) is kept to a few lines. Arguments: PREFIX LIMIT CWD USER -- ARGV.
_HEAD = """unset OZONE_EXEC
P=$PATH PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
p=$1 n=$2 c=$3 u=$4
shift 5
set -C
command exec 3>"$p.out" 4>"$p.err" 6>&2 2>/dev/null || {
  printf 'OZONE-EXEC 125 0 0 failed cannot create %s\\n' "$p.out"
  exit 125
}
"""
_FAIL = """fail() {
  printf 'OZONE-EXEC 125 0 0 failed %s\\n' "$*"
  rm -f -- "$p.out" "$p.err" "$p.ctl" "$p.in"
  exit 125
}
"""
_CWD = """cd -- "$c" || fail "cannot change to directory $c"
"""
_USER = """id -u -- "$u" >/dev/null || fail "no user $u"
set -- "$(command -v su)" -s /bin/sh "$u" -c 'exec "$0" "$@"' "$@"
"""
_EXEC = """(PATH=$P
command -v -- "$1" >/dev/null || {
  printf '%s: command not found\\n' "$1" >&2
  exit 127
}; exec "$@")"""
_RUN = (
    _EXEC
    + """ </dev/null >&3 2>&4 3>&- 4>&- 6>&-
r=$?
"""
)
_RUN_STDIN = (
    """mkfifo -m 600 "$p.ctl" "$p.in" || fail "cannot make FIFOs $p.ctl, $p.in"
(
  exec 3>&- 4>&- 6>&- 5<>"$p.ctl" >"$p.in"
  while read -r k <&5 && [ "$k" != eof ]; do
    cat -- "$p.in.$k" || break
    rm -f -- "$p.in.$k"
  done
) &
f=$!
"""
    + _EXEC
    + """ <"$p.in" >&3 2>&4 3>&- 4>&- 6>&-
r=$?
kill "$f"
"""
)
_TAIL = """m=captured
[ -e "$p.stream" ] && m=streamed
if [ -s "$p.out" ] || [ -s "$p.err" ]; then
  set -- $(wc -c "$p.out" "$p.err")
  if [ $m = captured ] && { [ "$1" -gt "$n" ] || [ "$3" -gt "$n" ]; }; then m=kept; fi
  printf 'OZONE-EXEC %d %d %d %s\\n' "$r" "$1" "$3" $m
  if [ $m = captured ]; then
    [ "$1" = 0 ] || cat -- "$p.out"
    [ "$3" = 0 ] || cat -- "$p.err" >&6
  fi
  [ $m = kept ] && exit "$r"
else
  printf 'OZONE-EXEC %d 0 0 %s\\n' "$r" $m
fi
exec rm -f -- "$p.out" "$p.err" "$p.stream" FIFOS
"""


def wrapper(*, cwd: bool, user: bool, stdin: bool) -> str:
    """The shell program that runs one command (see the module docs). Its last act is to
    become `rm` (one fork fewer in the guest), so its own exit status means nothing: the
    program's is in the header."""
    fifos = '"$p.ctl" "$p.in"' if stdin else ""
    return "".join(
        [
            _HEAD,
            _FAIL if cwd or user or stdin else "",
            _CWD if cwd else "",
            _USER if user else "",
            _RUN_STDIN if stdin else _RUN,
            _TAIL.replace(" FIFOS", " " + fifos if fifos else ""),
        ]
    )


# The environment every guest program starts with (qemu-ga's own is replaced, so that values
# given with --env travel in the environment, never on a command line that `ps` shows).
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
}
CLEANUP = 'rm -f -- "$1.out" "$1.err" "$1.stream" "$1.ctl" "$1.in" "$1".in.*'
# signal every process below the wrapper (collected before any of them dies), and with
# KILL the wrapper too: INT goes to the program, like Ctrl-C at a terminal, and the wrapper
# lives on to report how it ended
KILL = r"""
l=
w() {
  for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do
    l="$l $c"
    w "$c"
  done
}
w "$2"
[ "$1" = KILL ] && l="$2 $l"
[ -n "$l" ] && kill -"$1" $l 2>/dev/null
exit 0
"""

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass
class ExecResult:
    """What a guest program did. ``stdout``/``stderr`` are None when they were streamed."""

    argv: list[str]
    exit_code: int
    stdout: bytes | None
    stderr: bytes | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class _Header:
    exit_code: int
    sizes: tuple[int, int]
    mode: str  # captured | streamed | kept | failed
    message: str = ""


def _parse_header(data: bytes) -> tuple[_Header | None, bytes]:
    line, newline, rest = data.partition(b"\n")
    fields = line.decode(errors="replace").split(" ", 5)
    if not newline or len(fields) < 5 or fields[0] != "OZONE-EXEC":
        return None, data
    try:
        header = _Header(int(fields[1]), (int(fields[2]), int(fields[3])), fields[4])
    except ValueError:
        return None, data
    if len(fields) > 5:
        header.message = fields[5]
    return header, rest


class _Output:
    """One of the program's output files in the guest, and how much of it the host has."""

    def __init__(self, agent: Agent, path: str, sink: Sink) -> None:
        self.agent = agent
        self.path = path
        self.sink = sink
        self.offset = 0
        self.handle: int | None = None
        self.closed = False

    def open(self) -> bool:
        try:
            self.handle = self.agent.open(self.path, "r")
        except AgentCommandFailed:
            return False
        return True

    def deliver(self, data: bytes) -> None:
        if not data:
            return
        self.offset += len(data)
        if self.closed:
            return
        try:
            self.sink(data)
        except BrokenPipeError:
            self.closed = True  # nobody reads any more (`ozone exec … | head`)

    def pump(self, *, max_calls: int = 8) -> bool:
        """Read what is new; True if anything was."""
        if self.handle is None:
            return False
        got = False
        for _ in range(max_calls):
            data, _eof = self.agent.read(self.handle, READ_CHUNK)
            self.deliver(data)
            got = got or bool(data)
            if len(data) < READ_CHUNK:
                break
        return got

    def drain(self, size: int | None) -> None:
        """Read up to ``size`` bytes in all (to end of file when None), opening the file if
        it is not open yet."""
        if self.handle is None and (size is None or self.offset < size):
            if not self.open():
                if size is None:
                    return
                raise ExecFailed(f"the program's output file {self.path} vanished in the guest")
            if self.offset:  # a fresh handle starts at 0
                self.agent.call(
                    "guest-file-seek", {"handle": self.handle, "offset": self.offset, "whence": 0}
                )
        while self.handle is not None and (size is None or self.offset < size):
            data, eof = self.agent.read(self.handle, READ_CHUNK)
            if size is not None:
                data = data[: size - self.offset]
            self.deliver(data)
            if not data and eof:
                break
        # more than `size` is fine: a child left running may write after the wrapper measured
        if size is not None and self.offset < size:
            raise ExecFailed(
                f"the program wrote {size} bytes to {self.path} but only {self.offset} arrived"
            )

    def close(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            self.agent.close(handle)


class _StdinFeeder:
    """Moves the host's stdin into the guest program as chunk files (see module docs)."""

    def __init__(self, agent: Agent, prefix: str, source: IO[bytes] | bytes) -> None:
        self.agent = agent
        self.prefix = prefix
        self.ctl: int | None = None
        self.next_chunk = 0
        self.outstanding: collections.deque[int] = collections.deque()
        self.done = False
        self.chunks: queue.Queue[bytes] = queue.Queue(maxsize=2)
        if isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
            pieces: Iterable[bytes] = (
                data[i : i + STDIN_CHUNK] for i in range(0, len(data), STDIN_CHUNK)
            )
            self._thread = threading.Thread(target=self._fill, args=(pieces,), daemon=True)
        else:
            self._thread = threading.Thread(target=self._read, args=(source,), daemon=True)
        self._thread.start()

    def _fill(self, pieces: Iterable[bytes]) -> None:
        for piece in pieces:
            self.chunks.put(piece)
        self.chunks.put(b"")

    def _read(self, source: IO[bytes]) -> None:
        read = getattr(source, "read1", None) or source.read
        try:
            while True:
                piece = read(STDIN_CHUNK)
                if not piece:
                    break
                self.chunks.put(piece)
        except (OSError, ValueError):
            pass  # closed or unreadable stdin ends the input
        self.chunks.put(b"")

    def step(self) -> bool:
        """Deliver at most one chunk; True if it did something."""
        if self.done:
            return False
        if self.ctl is None:
            try:  # r+ never creates the file: wait for the wrapper's FIFO
                self.ctl = self.agent.open(f"{self.prefix}.ctl", "r+")
            except AgentCommandFailed:
                return False
        while len(self.outstanding) >= STDIN_WINDOW:
            if self.agent.exists(f"{self.prefix}.in.{self.outstanding[0]}"):
                return False  # the program has not read that far yet
            self.outstanding.popleft()
        try:
            piece = self.chunks.get_nowait()
        except queue.Empty:
            return False
        if not piece:
            self._announce("eof")
            self.done = True
            return True
        k = self.next_chunk
        self.next_chunk += 1
        handle = self.agent.open(f"{self.prefix}.in.{k}", "w")
        try:
            self.agent.write(handle, piece)
        finally:
            self.agent.close(handle)
        self._announce(str(k))
        self.outstanding.append(k)
        return True

    def _announce(self, line: str) -> None:
        assert self.ctl is not None
        self.agent.write(self.ctl, line.encode() + b"\n")
        self.agent.flush(self.ctl)

    def close(self) -> None:
        if self.ctl is not None:
            ctl, self.ctl = self.ctl, None
            self.agent.close(ctl)


def check_argv(argv: list[str], env: Mapping[str, str] | None) -> list[str]:
    if not argv:
        raise UsageError("no command given", hint="put it after --, e.g. `ozone exec web -- ls /`")
    merged = dict(BASE_ENV)
    for key, value in (env or {}).items():
        if not _ENV_NAME.match(key):
            raise UsageError(
                f"{key!r} is not a valid environment variable name",
                hint="use letters, digits and _, not starting with a digit (--env NAME=VALUE)",
            )
        merged[key] = value
    assignments = [f"{key}={value}" for key, value in merged.items()]
    for text in (*argv, *assignments):
        if "\0" in text:
            raise UsageError("arguments and environment values cannot contain NUL bytes")
    return assignments


def run(
    agent: Agent,
    argv: list[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    user: str | None = None,
    stdin: IO[bytes] | bytes | None = None,
    timeout: float | None = None,
    stdout: Sink,
    stderr: Sink,
) -> int:
    """Run ``argv`` in the guest, handing its output to ``stdout``/``stderr`` as it arrives.
    Returns its exit status (128+N when a signal N killed it)."""
    return _Run(agent, argv, env, cwd, user, stdin, timeout, stdout, stderr).run()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM off while the block runs (a clean-up); act on them afterwards."""
    with _signals_recorded() as caught:
        yield
    if caught:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_recorded() -> Iterator[list[int]]:
    """While a program runs, SIGINT and SIGTERM are noted (and acted on between agent calls)
    instead of interrupting ozone halfway through handing over a piece of output."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, _frame: caught.append(signum))
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Run:
    def __init__(
        self,
        agent: Agent,
        argv: list[str],
        env: Mapping[str, str] | None,
        cwd: str | None,
        user: str | None,
        stdin: IO[bytes] | bytes | None,
        timeout: float | None,
        stdout: Sink,
        stderr: Sink,
    ) -> None:
        self.agent = agent
        self.argv = argv
        self.assignments = check_argv(argv, env)
        self.cwd = cwd
        self.user = user
        self.stdin = stdin
        self.timeout = timeout
        self.prefix = f"{GUEST_TMP}/.ozone-exec-{secrets.token_hex(6)}"
        self.outputs = (
            _Output(agent, f"{self.prefix}.out", stdout),
            _Output(agent, f"{self.prefix}.err", stderr),
        )
        self.feeder: _StdinFeeder | None = None
        self.marker = False
        self.pid = 0

    @property
    def command(self) -> str:
        return " ".join(self.argv)

    def run(self) -> int:
        try:
            return self._run()
        except ExecTimeout:
            raise
        except OzoneError as err:
            gone = bool(self.pid) and (isinstance(err, StateError) or self._vm_went_away())
            if self.pid and not gone:
                self._abandon()
            if isinstance(err, UsageError | ExecFailed):
                raise
            if gone:
                raise ExecFailed(
                    f"{self.agent.name} stopped while `{self.command}` was running"
                ) from None
            raise ExecFailed(err.message, hint=err.hint) from None

    def _abandon(self) -> None:
        """After a failure halfway: kill the program and remove its files, as far as the
        agent still lets us."""
        with contextlib.suppress(OzoneError):
            self._kill("KILL")
        for output in self.outputs:
            with contextlib.suppress(OzoneError):
                output.close()
        with contextlib.suppress(OzoneError):
            self._cleanup(force=True)

    def _vm_went_away(self, *, within: float = 3.0) -> bool:
        """After a failed agent call: is the VM stopping? (A destroy in progress first shows
        as an agent that does not answer.)"""
        give_up = time.monotonic() + within
        while True:
            try:
                if not self.agent.dom.isActive():
                    return True
            except libvirt.libvirtError:
                return True
            if time.monotonic() >= give_up:
                return False
            time.sleep(0.1)

    def _spawn(self) -> int:
        args = [
            "-c",
            'eval "$OZONE_EXEC"',
            "ozone-exec",
            self.prefix,
            str(CAPTURE_LIMIT),
            self.cwd or "",
            self.user or "",
            "--",
            *self.argv,
        ]
        script = wrapper(cwd=bool(self.cwd), user=bool(self.user), stdin=self.stdin is not None)
        env = [*self.assignments, f"OZONE_EXEC={script}"]
        return self.agent.spawn("/bin/sh", args, env=env)

    def _run(self) -> int:
        with _signals_recorded() as signals:
            began = time.monotonic()
            deadline = began + self.timeout if self.timeout else None
            self.pid = self._spawn()
            if self.stdin is not None:
                self.feeder = _StdinFeeder(self.agent, self.prefix, self.stdin)
            # every status poll also costs the guest CPU time (qemu-ga wakes up and answers),
            # which on a one-vCPU TCG guest slows the program down: the first poll comes when
            # a short program has about finished (learnt from the previous runs on this
            # agent), the next after 2 ms, then 25% further apart each
            spawned = time.monotonic()
            time.sleep(FIRST_POLL * self.agent.short_run)
            polls = 0
            delay = POLL_MIN
            streaming = False
            forwarded = 0
            while True:
                if len(signals) > forwarded:
                    # Ctrl-C: like at a terminal, the program gets SIGINT; a second one, or
                    # SIGTERM, kills it and ozone stops
                    forwarded = len(signals)
                    if forwarded == 1 and signals[0] == signal.SIGINT:
                        self._kill("INT")
                    else:
                        self._kill("KILL")
                        self._finish_without_header()
                        raise KeyboardInterrupt
                status = self.agent.status(self.pid)
                polls += 1
                if status.get("exited"):
                    break
                if any(output.closed for output in self.outputs):
                    self._kill("KILL")  # like a local program that gets SIGPIPE
                    self._finish_without_header()
                    return 128 + signal.SIGPIPE
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    self._kill("KILL")
                    self._finish_without_header()
                    raise ExecTimeout(
                        f"`{self.command}` ran out of time after {self.timeout:g} s "
                        f"and was killed in {self.agent.name}"
                    )
                if not streaming and now - began >= STREAM_AFTER:
                    streaming = self._start_streaming()
                busy = False
                if streaming:
                    busy = self.outputs[0].pump() | self.outputs[1].pump()
                if self.feeder is not None:
                    busy = self.feeder.step() or busy
                delay = POLL_MIN if busy else min(delay * 1.25, POLL_MAX)
                if not busy:
                    pause = delay if deadline is None else min(delay, deadline - now)
                    time.sleep(max(pause, 0.0))
            if not streaming and self.feeder is None:  # learn how long a short run takes
                if polls == 1:  # done at the first look: look earlier next time
                    self.agent.short_run = max(0.002, self.agent.short_run * 0.8)
                else:
                    took = min(time.monotonic() - spawned, 0.05)
                    self.agent.short_run = 0.7 * self.agent.short_run + 0.3 * took
            return self._finish(status)

    def _start_streaming(self) -> bool:
        out, err = self.outputs
        if out.handle is None and not out.open():
            return False
        if err.handle is None and not err.open():
            return False
        handle = self.agent.open(f"{self.prefix}.stream", "w")
        self.agent.close(handle)
        self.marker = True
        return True

    def _finish(self, status: dict[str, Any]) -> int:
        header, out_data = _parse_header(base64.b64decode(status.get("out-data", "")))
        err_data = base64.b64decode(status.get("err-data", ""))
        if header is None:
            code = status.get("exitcode")
            self._finish_without_header()
            if code is None:
                return 128 + int(status.get("signal", 0))
            raise ExecFailed(
                f"the command wrapper failed in {self.agent.name} (status {code})"
                + (f": {err_data.decode(errors='replace').strip()}" if err_data else ""),
            )
        if header.mode == "failed":
            self._cleanup(force=self.marker)
            raise ExecFailed(f"cannot run `{self.command}` in {self.agent.name}: {header.message}")
        for output, size, captured in zip(
            self.outputs, header.sizes, (out_data, err_data), strict=True
        ):
            if header.mode == "captured":
                if len(captured) != size:
                    raise ExecFailed(
                        f"the program wrote {size} bytes but {len(captured)} came back"
                    )
                output.deliver(captured[output.offset :])
            else:
                output.drain(size)
            output.close()
        self._cleanup(force=header.mode == "kept" or (self.marker and header.mode != "streamed"))
        return header.exit_code

    def _finish_without_header(self) -> None:
        """The wrapper died (killed, timed out): take what output there is, remove the files."""
        for output in self.outputs:
            try:
                output.drain(None)
            finally:
                output.close()
        self._cleanup(force=True)

    def _cleanup(self, *, force: bool) -> None:
        if self.feeder is not None:
            self.feeder.close()
            force = True
        if force:
            self.agent.script(CLEANUP, self.prefix)

    def _kill(self, sig: str) -> None:
        """Signal the wrapper, the program and everything the program started."""
        self.agent.script(KILL, sig, str(self.pid))
        if sig == "KILL":
            give_up = time.monotonic() + KILL_WAIT
            while not self.agent.status(self.pid).get("exited"):
                if time.monotonic() >= give_up:
                    raise ExecFailed(f"`{self.command}` did not die in {self.agent.name}")
                time.sleep(0.02)
