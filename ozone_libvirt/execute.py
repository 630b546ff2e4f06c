"""Run a program in the guest like running it locally: streamed stdout/stderr, stdin, exit
code, timeout, through nothing but the QEMU guest agent.

qemu-ga's own ``guest-exec`` capture returns output only when the program has exited, and
libvirt refuses replies over a few MiB. So the program runs under a small POSIX-shell
wrapper (:func:`wrapper`) that sends its stdout and stderr to files in a private folder in the
guest (the *stage*):

* a program that ends quickly with little output costs exactly what a bare ``guest-exec`` +
  ``guest-exec-status`` loop costs: at exit the wrapper prints a header line and the whole
  (small) output on its own stdout/stderr, which come back in the final ``guest-exec-status``;
* a program that runs longer is streamed: the host opens both files and reads what is new on
  every poll, then drops a ``stream`` marker so that the wrapper, at exit, leaves the output
  to the open handles instead of capturing it again;
* a quick program with a lot of output leaves its files behind ("kept"), the host reads them
  and removes them.

The header (``OZONE-EXEC RC OUT_SIZE ERR_SIZE MODE [full KIB]``) carries the exact output
sizes, so a short read is an error, never silent truncation; ``full`` says the stage ran out
of space, so the output may be incomplete (ozone then exits 125 instead of passing a
truncated success off as real). stdin travels as numbered chunk files that a feeder loop in
the wrapper cats into a FIFO, announced on a control FIFO: the agent only ever writes to
regular files (its non-blocking writes to a pipe could lose data), and the host keeps at most
:data:`STDIN_WINDOW` chunks outstanding so the stage never holds much of it.

Other users of the guest: the stage is a folder the wrapper creates with ``mkdir`` (mode 0700,
root's) under a random name that appears on no command line (it travels in the wrapper's
environment), inside a folder that only root can write or that is sticky (``/var/tmp`` by
default). Every file ozone makes in the guest lives in it: qemu-ga creates files mode 0666
whatever the umask, and follows symlinks, so no file of ours may ever sit where another user
can reach it or plant one first. With ``--user`` the program's own output files and stdin FIFO
are handed to that user (it may reopen /dev/stdout), the folder stays root's.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import math
import queue
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import libvirt

from .agent import READ_CHUNK, Agent
from .connection import if_exists
from .errors import (
    AgentCommandFailed,
    ConnectionLost,
    ExecFailed,
    ExecTimeout,
    Interrupted,
    OzoneError,
    RequestTooLarge,
    StateError,
    UsageError,
)
from .state import Lease

Sink = Callable[[bytes], Any]

DEFAULT_STAGE = "/var/tmp"  # on disk on most distributions, unlike a small tmpfs /tmp
STAGE_FOLDER = ".ozone-exec"  # ozone's own folder in the stage (root's, 0700)
STAGE_RE = re.compile(r"/[A-Za-z0-9._+@=,/-]*", re.ASCII)
CAPTURE_LIMIT = 256 << 10  # each stream up to this size comes back in guest-exec-status
STREAM_AFTER = 0.1  # seconds a program runs before its output is streamed
FIRST_POLL = 0.75  # first guest-exec-status after this share of a short run's usual time
POLL_MIN = 0.002
POLL_MAX = 0.05  # longest pause between polls while nothing happens
STDIN_CHUNK = 1 << 20
STDIN_WINDOW = 4
KILL_WAIT = 10.0
RECONNECT_WAIT = 30.0  # after losing libvirt: how long to try to reach the VM again
# Linux takes at most 128 KiB in one argument (MAX_ARG_STRLEN, with its NUL) and about
# 2 MiB in all (a quarter of the stack limit); ozone passes up to 1 MiB, through a file in
# the stage when it is more than one agent request carries
ARG_MAX_ONE = (128 << 10) - 1
ARGS_MAX_TOTAL = 1 << 20

# The wrapper is put together from these parts for each run, only with the parts that run
# needs: under TCG the guest's shell costs about 0.5 ms per command it reads, so the common
# path (no cwd, user or stdin) is kept short. Arguments: LIMIT CWD USER -- ARGV; the stage
# folder comes in OZONE_P (never on a command line), OZONE_ARGS=1 says the host made it and
# put the argv and environment in its "args" file.
_HEAD = """unset OZONE_EXEC
p=$OZONE_P
unset OZONE_P OZONE_ARGS
P=$PATH PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
n=$1 c=$2 u=$3 k=
shift 4
umask 077
fail() {
  printf 'OZONE-EXEC 125 0 0 failed %s\\n' "$*"
  [ -n "$k" ] && rm -rf -- "$p"
  exit 125
}
"""
# The stage S (s) holds a folder of ozone's, S/.ozone-exec (q: root's, 0700), and each run gets a
# folder inside it. Nobody else can enter that folder or create anything in it, so the host,
# which opens paths in a run's folder until it sees the run end, can never meet a file,
# symlink or FIFO another user put there, even after the run's folder is gone. S itself must
# be root's and not writable by others unless sticky, as every folder above it must be
# (checked for a stage other than the default, with _ANCESTORS): then nobody else can move
# S/.ozone-exec away. Should S/.ozone-exec be another user's, root removes it and makes its
# own.
_STAGE = """q=${p%/*}
s=${q%/*}
[ -d "$s" ] || fail "stage: the guest has no folder $s"
[ -O "$s" ] || fail "stage: $s is not root's"
if [ ! -k "$s" ]; then
  w() { m=$1; }
  w $(ls -ldL -- "$s")
  case $m in ?????w* | ????????w*) fail "stage: others can write in $s" ;; esac
fi
ANCESTORS[ -d "$q" ] || mkdir -m 700 -- "$q" 2>/dev/null
if [ -h "$q" ] || [ ! -O "$q" ]; then
  rm -rf -- "$q"
  mkdir -m 700 -- "$q" || fail "stage: cannot make $q"
fi
"""
# every folder on the way to the stage, as named and as resolved: root's, and not writable
# by others unless sticky (a symlink on the way must be root's)
_ANCESTORS = """r=$(cd -P -- "$s" && pwd -P) || fail "stage: cannot enter $s"
a() {
  set --
  for x in "$s" "$r"; do
    while [ -n "$x" ]; do set -- "$@" "$x"; x=${x%/*}; done
  done
  ls -ldn -- / "$@" | while read -r m _ o _; do
    [ "$o" = 0 ] || exit 1
    case $m in l*) ;; d????????[tT]*) ;; d????w* | d???????w*) exit 1 ;; d*) ;; *) exit 1 ;; esac
  done
}
a || fail "stage: a folder on the way to $s is not root's, or others can write in it"
"""
# the folder records the guest's boot in a file's name (made in one step, unlike a file's
# content): a crash can bring back a folder removed just before it (the file system's journal
# had not yet recorded the removal), and each run removes the folders of other boots, and
# those with no boot at all (brought back half-removed) once they are a minute old (_SWEEP)
_MKDIR = """mkdir -- "$p" 2>/dev/null || fail "stage: $(mkdir -- "$p" 2>&1)"
k=1
read -r b </proc/sys/kernel/random/boot_id && : >"$p/boot-$b"
"""
_ARGS = """q=${p%/*}
s=${q%/*}
[ -d "$p" ] && [ ! -h "$p" ] && [ -O "$p" ] || fail "stage: $p is not ozone's"
k=1
read -r b </proc/sys/kernel/random/boot_id
. "$p/args"
P=$PATH PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
"""
# appending: a program that reopens /dev/stdout with > truncates the file (as it would
# locally); its later writes then land at the new end, not at a stale offset after a hole
_FILES = """command exec 3>>"$p/out" 4>>"$p/err" 6>&2 2>/dev/null ||
  fail "stage: cannot create files in $s"
"""
_SWEEP = """stale() {
  [ "$1" != "$d/boot-$b" ] && { [ -e "$1" ] || [ -n "$(find "$d" -maxdepth 0 -mmin +1)" ]; }
}
for d in "$q"/*; do
  [ "$d" != "$p" ] && [ -d "$d" ] && [ ! -h "$d" ] && stale "$d"/boot-* && rm -rf -- "$d"
done
"""
_CWD = """cd -- "$c" || fail "cannot change to directory $c"
"""
# runuser (util-linux) where there is one, else su: util-linux su reads options after the
# user name as its own, so the program's arguments come after --
_USER = """id -u -- "$u" >/dev/null || fail "no user $u"
chown -- "$u" "$p/out" "$p/err" FIFO || fail "cannot hand the output files to $u"
if command -v runuser >/dev/null; then
  set -- "$(command -v runuser)" -u "$u" -- "$@"
else
  set -- "$(command -v su)" -s /bin/sh -c 'exec "$0" "$@"' -- "$u" "$@"
fi
"""
_EXEC = """(umask 022; PATH=$P
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
_FIFOS = """mkfifo -m 600 "$p/ctl" "$p/in" || fail "stage: cannot make FIFOs in $p"
"""
_RUN_STDIN = (
    """(
  exec 3>&- 4>&- 6>&- 5<>"$p/ctl" >"$p/in"
  while read -r i <&5 && [ "$i" != eof ]; do
    cat -- "$p/in.$i" || break
    rm -f -- "$p/in.$i"
  done
) &
f=$!
"""
    + _EXEC
    + """ <"$p/in" >&3 2>&4 3>&- 4>&- 6>&-
r=$?
kill "$f"
"""
)
# After the program: can the stage still take a byte (appended to the boot file, which then
# needs a block of its own)? (A full one made the program's writes
# fail: its output may be incomplete.) A user's writes stop at the reserved blocks, which
# root may still use: for --user, df says whether any room is left for users. The output is
# measured and read through the wrapper's own descriptors, which hold it even if the program
# removed the files.
_TAIL = """m=captured
[ -e "$p/stream" ] && m=streamed
x=
printf x >>"$p/boot-$b" || { [ -d "$p" ] && x=full; }
ROOM
if [ -n "$x" ]; then
  set -- $(df -Pk -- "$p")
  x="full ${11:-0}"
fi
o=/proc/$$/fd/3 e=/proc/$$/fd/4
if [ -s $o ] || [ -s $e ]; then
  set -- $(wc -c $o $e)
  if [ $m = captured ] && { [ "$1" -gt "$n" ] || [ "$3" -gt "$n" ]; }; then m=kept; fi
  printf 'OZONE-EXEC %d %d %d %s %s\\n' "$r" "$1" "$3" $m "$x"
  if [ $m = captured ]; then
    [ "$1" = 0 ] || cat $o
    [ "$3" = 0 ] || cat $e >&6
  fi
  [ $m = kept ] && exit "$r"
else
  printf 'OZONE-EXEC %d 0 0 %s %s\\n' "$r" $m "$x"
fi
exec rm -rf -- "$p"
"""
_ROOM = """if [ -z "$x" ]; then
  set -- $(df -Pk -- "$p")
  [ "${11:-1}" = 0 ] && x=full
fi"""


def stage_checks(*, ancestors: bool) -> str:
    """The shell that checks the stage and makes ozone's folder in it (see _STAGE)."""
    return _STAGE.replace("ANCESTORS", _ANCESTORS if ancestors else "")


def wrapper(
    *, cwd: bool, user: bool, stdin: bool, argfile: bool = False, ancestors: bool = False
) -> str:
    """The shell program that runs one command (see the module docs). Its last act is to
    become `rm` (one fork fewer in the guest), so its own exit status means nothing: the
    program's is in the header. ``ancestors``: check the folders above the stage too (a
    stage other than the default)."""
    return "".join(
        [
            _HEAD,
            _ARGS if argfile else stage_checks(ancestors=ancestors) + _MKDIR,
            _FILES,
            _SWEEP,
            _CWD if cwd else "",
            _FIFOS if stdin else "",
            _USER.replace(" FIFO", ' "$p/in"' if stdin else "") if user else "",
            _RUN_STDIN if stdin else _RUN,
            _TAIL.replace("ROOM", _ROOM if user else ""),
        ]
    )


def prepare(*, ancestors: bool) -> str:
    """Make a run's folder (for a run whose arguments go in a file): the wrapper's checks."""
    head = 'p=$1 k=\nfail() {\n  printf "%s\\n" "$*"\n  exit 1\n}\n'
    return head + stage_checks(ancestors=ancestors) + _MKDIR


# The environment every guest program starts with (qemu-ga's own is replaced, so that values
# given with --env travel in the environment, never on a command line that `ps` shows).
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
}
CLEANUP = '[ -d "$1" ] && [ ! -h "$1" ] && [ -O "$1" ] && exec rm -rf -- "$1"; exit 0'
# signal every process below the wrapper (collected before any of them dies), and with
# KILL the wrapper too: INT goes to the program, like Ctrl-C at a terminal, and the wrapper
# lives on to report how it ended
KILL = r"""
grep -q ozone-exec /proc/"$2"/cmdline 2>/dev/null || exit 0  # gone (the pid may be reused)
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

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


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


@dataclass(frozen=True)
class ExecOptions:
    """How to run a program (everything but the program and where its output goes)."""

    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    stdin: IO[bytes] | bytes | None = None
    timeout: float | None = None  # seconds; None: no limit
    stage_dir: str | None = None  # the guest folder to stage output in (DEFAULT_STAGE)


@dataclass
class _Header:
    exit_code: int
    sizes: tuple[int, int]
    mode: str  # captured | streamed | kept | failed
    message: str = ""

    @property
    def full(self) -> str | None:
        """KiB left in a stage that ran full (None: it did not)."""
        words = self.message.split()
        if self.mode == "failed" or not words or words[0] != "full":
            return None
        return words[1] if len(words) > 1 else "?"


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
        header.message = fields[5].strip()
    return header, rest


def check_argv(argv: list[str], env: Mapping[str, str] | None) -> list[str]:
    """Refuse what cannot reach a guest program; return the environment assignments."""
    if not argv:
        raise UsageError("no command given", hint="put it after --, e.g. `ozone exec web -- ls /`")
    merged = dict(BASE_ENV)
    for key, value in (env or {}).items():
        if not _ENV_NAME.fullmatch(key):
            raise UsageError(
                f"{key!r} is not a valid environment variable name",
                hint="use letters, digits and _, not starting with a digit (--env NAME=VALUE)",
            )
        merged[key] = value
    assignments = [f"{key}={value}" for key, value in merged.items()]
    total = 0
    for i, text in enumerate((*argv, *assignments)):
        if "\0" in text:
            raise UsageError("arguments and environment values cannot contain NUL bytes")
        size = len(text.encode(errors="surrogateescape"))
        total += size + 1
        if size > ARG_MAX_ONE:
            what = f"argument {i + 1}" if i < len(argv) else f"--env {text.split('=', 1)[0]}"
            raise UsageError(
                f"{what} is {size} bytes; Linux takes at most {ARG_MAX_ONE} in one",
                hint="pass large data on stdin (-i) or in a file (ozone cp)",
            )
    if total > ARGS_MAX_TOTAL:
        raise UsageError(
            f"the command line and environment are {total} bytes; ozone passes at most "
            f"{ARGS_MAX_TOTAL} (Linux's own limit is about 2 MiB)",
            hint="pass large data on stdin (-i) or in a file (ozone cp)",
        )
    return assignments


def check_options(options: ExecOptions) -> str:
    """Refuse impossible options up front; returns the stage folder to use."""
    timeout = options.timeout
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise UsageError(f"timeout {timeout:g} is not a number of seconds above 0")
    stage = options.stage_dir or DEFAULT_STAGE
    if not STAGE_RE.fullmatch(stage) or stage == "/" or "//" in stage or "/." in stage:
        raise UsageError(
            f"stage folder {stage!r} is not a plain absolute guest path",
            hint="use letters, digits and . _ + @ = , - in an absolute path, e.g. /var/tmp",
        )
    return stage.rstrip("/")


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


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

    def __init__(self, agent: Agent, folder: str, source: IO[bytes] | bytes) -> None:
        self.agent = agent
        self.folder = folder
        self.ctl: int | None = None
        self.next_chunk = 0
        self.outstanding: collections.deque[int] = collections.deque()
        self.done = False
        self.error: str | None = None  # reading the host's stdin failed
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
        except (OSError, ValueError) as err:  # the program must not take half its input
            self.error = str(getattr(err, "strerror", None) or err)
        self.chunks.put(b"")

    def step(self) -> bool:
        """Deliver at most one chunk; True if it did something."""
        if self.done:
            return False
        if self.ctl is None:
            try:  # r+ never creates the file: wait for the wrapper's FIFO
                self.ctl = self.agent.open(f"{self.folder}/ctl", "r+")
            except AgentCommandFailed:
                return False
        while len(self.outstanding) >= STDIN_WINDOW:
            if self.agent.exists(f"{self.folder}/in.{self.outstanding[0]}"):
                return False  # the program has not read that far yet
            self.outstanding.popleft()
        try:
            piece = self.chunks.get_nowait()
        except queue.Empty:
            return False
        if not piece:
            if self.error is not None:
                raise ExecFailed(f"cannot read the standard input: {self.error}")
            self._announce("eof")
            self.done = True
            return True
        k = self.next_chunk
        self.next_chunk += 1
        handle = self.agent.open(f"{self.folder}/in.{k}", "w")
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


def run(
    agent: Agent,
    argv: list[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    user: str | None = None,
    stdin: IO[bytes] | bytes | None = None,
    timeout: float | None = None,
    stage_dir: str | None = None,
    stdout: Sink,
    stderr: Sink,
) -> int:
    """Run ``argv`` in the guest, handing its output to ``stdout``/``stderr`` as it arrives.
    Returns its exit status (128+N when a signal N killed it)."""
    options = ExecOptions(
        env=env or {}, cwd=cwd, user=user, stdin=stdin, timeout=timeout, stage_dir=stage_dir
    )
    return _Run(agent, argv, options, stdout=stdout, stderr=stderr).run()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM off while the block runs (a clean-up); act on them afterwards."""
    with _signals_recorded() as caught:
        yield
    if caught:
        raise Interrupted(caught[-1])


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
    """One program run: spawn the wrapper, poll it, move output and stdin, finish or clean
    up. The loop's jobs each have their own method."""

    def __init__(
        self, agent: Agent, argv: list[str], options: ExecOptions, *, stdout: Sink, stderr: Sink
    ) -> None:
        self.agent = agent
        self.argv = argv
        self.options = options
        self.assignments = check_argv(argv, options.env)
        self.stage = check_options(options)
        self.folder = f"{self.stage}/{STAGE_FOLDER}/{secrets.token_hex(12)}"
        self.outputs = (
            _Output(agent, f"{self.folder}/out", stdout),
            _Output(agent, f"{self.folder}/err", stderr),
        )
        self.feeder: _StdinFeeder | None = None
        self.marker = False
        self.pid = 0
        self.exited = False
        self.deadline: float | None = None
        self.signals_seen = 0
        self.too_late = False  # to stream: the wrapper ended as we began
        self.final: dict[str, Any] | None = None  # the wrapper's last status, seen early
        self.unfinished = False  # the program may still run, or its folder remain
        self.lease: Lease | None = None

    @property
    def command(self) -> str:
        return " ".join(self.argv)

    # --- the outcome -----------------------------------------------------------------------

    def run(self) -> int:
        """Run it; whatever happens, leave nothing in the guest (or, when that cannot be
        known, a lease that lets `ozone gc` finish the job)."""
        self.lease = Lease.take(
            "exec",
            uri=self.agent.uri,
            uuid=self.agent.dom.UUIDString(),
            vm=self.agent.name,
            path=self.folder,
        )
        try:
            return self._outcome()
        finally:
            if not self.unfinished:
                self.lease.release()

    def _outcome(self) -> int:
        try:
            return self._run()
        except ExecTimeout:
            raise
        except ConnectionLost:
            raise self._after_lost_connection() from None
        except OzoneError as err:
            if self.pid and not self.exited:
                if self._vm_went_away(err):
                    raise ExecFailed(
                        f"{self.agent.name} stopped while `{self.command}` was running"
                    ) from None
                self._abandon(self.agent)
            elif self.pid:
                with contextlib.suppress(OzoneError):
                    self._cleanup(self.agent, force=True)
            if isinstance(err, UsageError | ExecFailed):
                raise
            raise ExecFailed(err.message, hint=err.hint) from None

    def _abandon(self, agent: Agent) -> None:
        """After a failure halfway: kill the program and remove its files, as far as the
        agent still lets us."""
        with contextlib.suppress(OzoneError):
            self._kill("KILL", agent)
        for output in self.outputs:
            with contextlib.suppress(OzoneError):
                output.close()
        with contextlib.suppress(OzoneError):
            self._cleanup(agent, force=True)

    def _vm_went_away(self, err: OzoneError) -> bool:
        """After a failed agent call: is the VM stopping? A destroy in progress first shows
        as an agent that does not answer, so wait (up to 3 s) until either the VM is gone or
        its agent answers again. ozone's own failures (a bad option, the wrapper's refusal)
        need no look at all."""
        if isinstance(err, StateError):
            return True
        if isinstance(err, UsageError | ExecFailed | AgentCommandFailed):
            return False
        give_up = time.monotonic() + 3.0
        stopped = (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED)
        try:
            while True:
                state = if_exists(self.agent.dom.state, name=self.agent.name)
                if state is None or state[0] in stopped:
                    return True  # (None: a transient domain that stopped is gone)
                if self.agent.answers(timeout=1) or time.monotonic() >= give_up:
                    return False
                time.sleep(0.1)
        except OzoneError:
            return False  # libvirt itself went away: the VM is not known to have stopped

    def _after_lost_connection(self) -> ExecFailed:
        """libvirt went away under us (a libvirtd restart, say) while the VM may run on:
        reconnect, and stop the program we can no longer follow; or say it may still run."""
        uri = self.agent.uri
        hint = "is libvirtd running? scripts/setup-host starts it"
        if not self.pid:
            return ExecFailed(
                f"lost the connection to libvirt at {uri} before `{self.command}` started",
                hint=hint,
            )
        try:
            agent = self.agent.reconnect(timeout=RECONNECT_WAIT)
        except StateError:
            return ExecFailed(
                f"lost the connection to libvirt at {uri} while `{self.command}` ran, and "
                f"{self.agent.name} has stopped since"
            )
        if agent is None:
            self.unfinished = True
            return ExecFailed(
                f"lost the connection to libvirt at {uri} while `{self.command}` ran and "
                f"could not reconnect within {RECONNECT_WAIT:g} s: the program may still be "
                f"running in {self.agent.name} (guest pid {self.pid})",
                hint=hint,
            )
        try:
            # libvirt reconnects to the guest agent in its own time after a restart
            deadline = time.monotonic() + RECONNECT_WAIT
            while not agent.answers(timeout=2) and time.monotonic() < deadline:
                time.sleep(0.25)
            if not self.exited:
                self._kill("KILL", agent)
            with contextlib.suppress(OzoneError):
                self._cleanup(agent, force=True)
        except OzoneError as err:
            self.unfinished = True
            return ExecFailed(
                f"lost the connection to libvirt at {uri} while `{self.command}` ran; after "
                f"reconnecting, ozone could not stop it ({err.message}): it may still be "
                f"running in {self.agent.name} (guest pid {self.pid})",
                hint=hint,
            )
        finally:
            agent.close_connection()
        return ExecFailed(
            f"lost the connection to libvirt at {uri} while `{self.command}` ran (did "
            f"libvirtd restart?); reconnected and stopped the program in {self.agent.name}",
            hint="its output may be incomplete: run it again",
        )

    # --- running ---------------------------------------------------------------------------

    def _spawn(self) -> int:
        opts = self.options
        args = ["-c", 'eval "$OZONE_EXEC"', "ozone-exec", str(CAPTURE_LIMIT)]
        args += [opts.cwd or "", opts.user or "", "--"]
        parts = {"cwd": bool(opts.cwd), "user": bool(opts.user), "stdin": opts.stdin is not None}
        ancestors = self.stage != DEFAULT_STAGE
        env = [f"OZONE_P={self.folder}"]
        script = wrapper(**parts, ancestors=ancestors)
        with contextlib.suppress(RequestTooLarge):
            return self.agent.spawn(
                "/bin/sh",
                [*args, *self.argv],
                env=[*self.assignments, *env, f"OZONE_EXEC={script}"],
            )
        # too big for one agent request: the argv and environment go in a file in the stage
        prepared = self.agent.script(prepare(ancestors=ancestors), self.folder)
        if prepared.exit_code != 0:
            problem = prepared.stdout.decode(errors="replace").strip()
            raise ExecFailed(self._stage_problem(problem), hint=_OTHER_STAGE_HINT)
        lines = ["set -- " + " ".join(_shell_quote(a) for a in self.argv)]
        lines += [f"export {_shell_quote(a)}" for a in self.assignments]
        handle = self.agent.open(f"{self.folder}/args", "w")
        try:
            self.agent.write(handle, "\n".join(lines).encode(errors="surrogateescape") + b"\n")
        finally:
            self.agent.close(handle)
        script = wrapper(**parts, argfile=True)
        env += [f"PATH={BASE_ENV['PATH']}", "OZONE_ARGS=1", f"OZONE_EXEC={script}"]
        return self.agent.spawn("/bin/sh", args, env=env)

    def _stage_problem(self, message: str) -> str:
        return f"cannot stage the program's output in {self.agent.name}:{self.stage}: " + (
            message.removeprefix("stage: ")
        )

    def _run(self) -> int:
        with _signals_recorded() as signals:
            began = time.monotonic()
            if self.options.timeout is not None:
                self.deadline = began + self.options.timeout
            self.pid = self._spawn()
            if self.lease is not None:
                self.lease.update(wrapper_pid=self.pid)
            if self.options.stdin is not None:
                self.feeder = _StdinFeeder(self.agent, self.folder, self.options.stdin)
            # every status poll also costs the guest CPU time (qemu-ga wakes up and answers),
            # which on a one-vCPU TCG guest slows the program down: the first poll comes when
            # a short program has about finished (learnt from the previous runs on this
            # agent), the next after 2 ms, then 25% further apart each
            spawned = time.monotonic()
            time.sleep(FIRST_POLL * self.agent.short_run)
            polls = 0
            delay = POLL_MIN
            streaming = False
            while True:
                self._act_on_signals(signals)
                status = self.final or self.agent.status(self.pid)
                polls += 1
                if status.get("exited"):
                    self.exited = True
                    break
                if any(output.closed for output in self.outputs):
                    self._stop("KILL")  # like a local program that gets SIGPIPE
                    return 128 + signal.SIGPIPE
                self._check_deadline()
                if not streaming and time.monotonic() - began >= STREAM_AFTER:
                    streaming = self._start_streaming()
                busy = self._move_data(streaming)
                delay = POLL_MIN if busy else min(delay * 1.25, POLL_MAX)
                if not busy:
                    pause = delay if self.deadline is None else self.deadline - time.monotonic()
                    time.sleep(max(min(pause, delay), 0.0))
            if not streaming and self.feeder is None:  # learn how long a short run takes
                if polls == 1:  # done at the first look: look earlier next time
                    self.agent.short_run = max(0.002, self.agent.short_run * 0.8)
                else:
                    took = min(time.monotonic() - spawned, 0.05)
                    self.agent.short_run = 0.7 * self.agent.short_run + 0.3 * took
            return self._finish(status)

    def _act_on_signals(self, signals: list[int]) -> None:
        """Ctrl-C: like at a terminal, the program gets SIGINT; a second one, or SIGTERM,
        kills it and ozone stops (exit 130 or 143)."""
        if len(signals) <= self.signals_seen:
            return
        self.signals_seen = len(signals)
        if self.signals_seen == 1 and signals[0] == signal.SIGINT:
            self._kill("INT", self.agent)
            return
        self._stop("KILL")
        raise Interrupted(signals[-1])

    def _check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self._stop("KILL")
            raise ExecTimeout(
                f"`{self.command}` ran out of time after {self.options.timeout:g} s "
                f"and was killed in {self.agent.name}"
            )

    def _move_data(self, streaming: bool) -> bool:
        """One round of output and stdin; True if anything moved."""
        busy = False
        if streaming:
            busy = self.outputs[0].pump() | self.outputs[1].pump()
        if self.feeder is not None:
            try:
                busy = self.feeder.step() or busy
            except AgentCommandFailed as err:
                status = self.agent.status(self.pid)
                if status.get("exited"):  # it ended (and took its folder): nothing to feed
                    self.final = status
                    self.feeder.done = True
                    return True
                raise ExecFailed(
                    f"cannot stage stdin in {self.agent.name}:{self.stage}: "
                    + err.detail.rsplit(": ", 1)[-1],
                    hint=_STAGE_HINT,
                ) from None
        return busy

    def _start_streaming(self) -> bool:
        """Open both output files and drop the marker that tells the wrapper to leave the
        output to us. False: not yet (the files are not there), or never (the wrapper has
        ended and taken its folder with it: the output comes in its final status)."""
        if self.too_late:
            return False
        out, err = self.outputs
        if out.handle is None and not out.open():
            return False
        if err.handle is None and not err.open():
            return False
        try:
            handle = self.agent.open(f"{self.folder}/stream", "w")
        except AgentCommandFailed:
            self.too_late = True
            for output in self.outputs:
                output.close()
            return False
        self.agent.close(handle)
        self.marker = True
        return True

    # --- the end ---------------------------------------------------------------------------

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
            self._cleanup(self.agent, force=self.marker)
            if header.message.startswith("stage: "):
                raise ExecFailed(self._stage_problem(header.message), hint=_OTHER_STAGE_HINT)
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
        self._cleanup(
            self.agent, force=header.mode == "kept" or (self.marker and header.mode != "streamed")
        )
        if header.full is not None:
            raise ExecFailed(
                f"the guest folder {self.stage} in {self.agent.name} is full ({header.full} KiB "
                f"free): the output of `{self.command}` may be incomplete",
                hint=_STAGE_HINT,
            )
        return header.exit_code

    def _stop(self, sig: str) -> None:
        """Kill the program and take what output there is (a timeout, Ctrl-C, a closed
        pipe)."""
        self._kill(sig, self.agent)
        self._finish_without_header()

    def _finish_without_header(self) -> None:
        """The wrapper died (killed, timed out): take what output there is, remove the files."""
        for output in self.outputs:
            try:
                output.drain(None)
            finally:
                output.close()
        self._cleanup(self.agent, force=True)

    def _cleanup(self, agent: Agent, *, force: bool) -> None:
        if self.feeder is not None:
            self.feeder.close()
            force = True
        if force:
            agent.script(CLEANUP, self.folder)

    def _kill(self, sig: str, agent: Agent) -> None:
        """Signal the wrapper, the program and everything the program started."""
        agent.script(KILL, sig, str(self.pid))
        if sig == "KILL":
            give_up = time.monotonic() + KILL_WAIT
            while not agent.status(self.pid).get("exited"):
                if time.monotonic() >= give_up:
                    raise ExecFailed(f"`{self.command}` did not die in {agent.name}")
                time.sleep(0.02)
            self.exited = True


_STAGE_HINT = (
    "free some space there, or stage the output elsewhere: --stage-dir DIR, or "
    '"stage_dir" in the VM\'s config'
)
_OTHER_STAGE_HINT = (
    "stage it in another guest folder (root's, or sticky like /tmp): --stage-dir DIR, or "
    '"stage_dir" in the VM\'s config'
)


def run_in(
    conn: libvirt.virConnect,
    name: str,
    argv: list[str],
    *,
    sync_clock: bool = False,
    stage_dir: str | None = None,
    **options: Any,
) -> int:
    """`ozone exec`: run ``argv`` in the VM ``name`` (see :func:`run`), staging its output
    in ``stage_dir``, else in the folder the VM's config names, else in /var/tmp."""
    from .connection import domain_metadata, lookup

    dom = lookup(conn, name)
    if stage_dir is None:
        meta = domain_metadata(dom, defined=True)
        stage_dir = meta.stage_dir if meta else None
    agent = Agent(dom)
    if sync_clock:
        agent.set_time()
    return run(agent, argv, stage_dir=stage_dir, **options)
