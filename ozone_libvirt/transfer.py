"""`ozone cp`: files between the host and a guest, through the agent's guest-file-* calls.

A copy is written under a temporary name next to its destination and renamed into place when
complete (with the source's permission bits), so a failed copy never leaves a half-written
file where the destination was.

Into a guest, the temporary file lives in a folder of its own that the guest makes with
``mkdir`` (mode 0700, root's) in the destination folder: qemu-ga creates files mode 0666 and
follows symlinks, so no other guest user may ever reach the file while it is written, nor
plant a link where it goes. Onto the host, it is ``.NAME.ozone-part-*``, made with O_EXCL
and mode 0600, and locked (flock) while the copy runs.

What an interrupted copy leaves (ozone killed with SIGKILL, a guest that crashed) carries
its owner in its name or in its lock, and the next copy into the same folder removes it when
that owner is gone; `ozone gc` removes it too, through the lease each copy holds
(:mod:`.state`).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .agent import READ_CHUNK, WRITE_CHUNK, Agent
from .errors import AgentCommandFailed, NotFoundError, OzoneError, UsageError
from .state import Lease

Progress = Callable[[int], None]

GUEST_PART = re.compile(
    r"\.ozone-cp-(?P<guest>[0-9a-f]{8})-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}",
    re.ASCII,
)
HOST_PART = ".ozone-part-"
STALE_AFTER = 10.0  # seconds: a host part file younger than this is never judged stale

# Where will a file named $2 land if copied to $1 in the guest? The copy is written in a
# private folder ($3 names it) in the nearest folder at or above the destination's, on its
# file system, that no other user can change (root's, and not writable by others unless
# sticky): nobody but root can then move that private folder or put a link in it, and the
# finished file reaches its destination by one rename on the same file system. Prints the
# target, the private folder, then the other copies' folders beside it; or a message, exit 1.
_PREPARE = r"""
t=$1 n=$2 g=$3
mine() { [ -h "$1" ] || return 0; set -- $(ls -ldn -- "$1"); [ "$3" = 0 ]; }
x=$t
while [ -n "$x" ]; do  # no symlink of another user's on the way (nor at the end)
  x=${x%/}
  mine "$x" || { echo "$x is a symlink of another user's"; exit 1; }
  x=${x%/*}
done
case $t in */) t=$t$n ;; *) [ -d "$t" ] && t=$t/$n ;; esac
mine "$t" || { echo "$t is a symlink of another user's"; exit 1; }
d=${t%/*}
[ -n "$d" ] || d=/
[ -d "$d" ] || { echo "no directory $d"; exit 1; }
[ -d "$t" ] && { echo "$t is a directory"; exit 1; }
a=$(cd -P -- "$d" && pwd -P) || { echo "cannot enter $d"; exit 1; }
v=$(stat -c %d -- "$a")
while :; do
  set -- $(stat -c '%d %u %a' -- "$a")
  [ "$1" = "$v" ] || { echo "no folder above $d on its file system is root's alone"; exit 1; }
  [ "$2" = 0 ] && { [ $((0$3 & 01000)) != 0 ] || [ $((0$3 & 022)) = 0 ]; } && break
  [ "$a" = / ] && { echo "no folder above $d is root's alone"; exit 1; }
  a=${a%/*}
  [ -n "$a" ] || a=/
done
[ "$a" = / ] && a=
read -r b </proc/sys/kernel/random/boot_id
w=$a/.ozone-cp-${b%%-*}-$g
umask 077
mkdir -- "$w" 2>/dev/null || { mkdir -- "$w" 2>&1 | sed 's/.*: //'; exit 1; }
printf '%s\n%s\n' "$t" "$w"
for x in "$a"/.ozone-cp-*; do
  [ "$x" != "$w" ] && [ -d "$x" ] && [ ! -h "$x" ] && [ -O "$x" ] && printf '%s\n' "${x##*/}"
done
exit 0
"""
# chmod the finished file and put it in place with one rename that replaces whatever the
# name is, a symlink included, and never follows it (GNU mv -T; busybox has no -T: a hard
# link, ln -n, does the same); remove the stale folders named after --
_FINISH = r"""
m=$1 w=$2 t=$3
shift 4
a=${w%/*}
for x in "$@"; do
  [ -d "$a/$x" ] && [ ! -h "$a/$x" ] && [ -O "$a/$x" ] && rm -rf -- "$a/$x"
done
chmod "$m" "$w/data" || { rm -rf -- "$w"; exit 1; }
if mv -fT -- "$w/data" "$t" 2>/dev/null || { ln -fn -- "$w/data" "$t" && rm -f -- "$w/data"; }
then
  exec rmdir -- "$w"
fi
rm -rf -- "$w"
exit 1
"""
_DISCARD = '[ -d "$1" ] && [ ! -h "$1" ] && [ -O "$1" ] && exec rm -rf -- "$1"; exit 0'
# Hold the source open (a FIFO swapped in blocks this shell, never qemu-ga): the host reads
# the very file this shell opened, through /proc/PID/fd/3, and learns its mode and size from
# it, so nobody can swap another file in between.
_HOLD = r"""
[ -d "$1" ] && { echo "is a directory"; exit 1; }
exec 3<"$1" || exit 1
[ -f /proc/$$/fd/3 ] || { echo "not a regular file"; exit 1; }
exec sleep 600
"""
_DESCRIBE = r"""
grep -q '^sleep' /proc/"$1"/comm 2>/dev/null || exit 1
stat -L -c '%a %s' /proc/"$1"/fd/3
"""
_RELEASE = 'grep -q "^sleep" /proc/"$1"/comm 2>/dev/null && kill "$1"; exit 0'
# a holder still opening its file: it is the shell of _HOLD, blocked in open()
KILL_HOLDER = 'grep -q \'exec 3<\' /proc/"$1"/cmdline 2>/dev/null && kill -9 "$1"; exit 0'
HOLD_WAIT = 10.0  # seconds the source may take to open (a FIFO never opens)


@dataclass(frozen=True)
class CopyResult:
    source: str
    destination: str
    bytes: int


def parse_location(text: str) -> tuple[str | None, str]:
    """``NAME:/path`` -> (NAME, /path); a host path -> (None, path). A colon only counts
    when what follows it is an absolute path, so host files with colons still work."""
    name, sep, path = text.partition(":")
    if sep and name and "/" not in name and path.startswith("/"):
        return name, path
    return None, text


def _guest_error(err: AgentCommandFailed) -> str:
    # qemu-ga says e.g. "failed to open file '/x' (mode: 'w'): Permission denied"
    return err.detail.rsplit(": ", 1)[-1]


# --- who owns a leftover -------------------------------------------------------------------


def _host_boot() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text()[:8]


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot): with its pid, it names one process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if len(fields) > 19 else None


def owner_tag() -> str:
    """This process, as the owner of a copy in progress: host boot, pid, start time, and a
    random part so two copies of one process differ."""
    pid = os.getpid()
    return f"{_host_boot()}-{pid}-{_start_time(pid) or 0}-{secrets.token_hex(4)}"


def stale_guest_parts(names: list[str], guest_boot: str) -> list[str]:
    """The copies' folders (names in a guest folder) whose owner is gone: made in an earlier
    boot of the guest, or by a process of this host that no longer runs. Folders another
    host's ozone made are left alone: nothing here can tell whether it still copies."""
    stale = []
    host_boot = _host_boot()
    for name in names:
        match = GUEST_PART.fullmatch(name)
        if match is None:
            continue
        if match["guest"] != guest_boot or (
            match["host"] == host_boot and _start_time(int(match["pid"])) != match["start"]
        ):
            stale.append(name)
    return stale


def remove_stale_host_parts(folder: Path) -> list[Path]:
    """Remove ``.NAME.ozone-part-*`` files in ``folder`` that no copy holds any more (their
    lock is free) and that are ours and not brand new."""
    removed = []
    for path in folder.glob(f".*{HOST_PART}*"):
        with contextlib.suppress(OSError):
            info = path.lstat()
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                continue
            if time.time() - info.st_mtime < STALE_AFTER:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a copy is writing it
            finally:
                os.close(fd)
            path.unlink()
            removed.append(path)
    return removed


# --- host → guest --------------------------------------------------------------------------


def copy_to_guest(
    agent: Agent, source: Path, destination: str, *, progress: Progress | None = None
) -> CopyResult:
    try:
        info = source.stat()
    except FileNotFoundError:
        raise NotFoundError(f"no such file: {source}") from None
    except OSError as err:
        raise OzoneError(f"cannot read {source}: {err.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise UsageError(
            f"{source} is a directory",
            hint=f"copy a tar archive: tar -C {source} -c . | "
            f"ozone exec -i {agent.name} -- tar -C DEST -x",
        )
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{source} is not a regular file")
    if "\n" in destination or "\n" in source.name:
        raise UsageError("file names with a line break cannot be copied into a guest")
    where = f"{agent.name}:{destination}"
    tag = owner_tag()
    lease = Lease.take("cp-guest", uri=agent.uri, uuid=agent.dom.UUIDString(), vm=agent.name)
    try:
        prepared = agent.script(_PREPARE, destination, source.name, tag)
        lines = prepared.stdout.decode(errors="surrogateescape").splitlines()
        if prepared.exit_code != 0 or len(lines) < 2:
            raise OzoneError(f"cannot write {where}: {' '.join(lines) or 'no reply'}")
        target, folder, others = lines[0], lines[1], lines[2:]
        lease.update(path=folder)
        stale = stale_guest_parts(others, folder.rsplit("/.ozone-cp-", 1)[1][:8])
        sent = _send(agent, source, f"{folder}/data", progress)
        mode = format(stat.S_IMODE(info.st_mode), "o")
        finished = agent.script(_FINISH, mode, folder, target, "--", *stale)
        if finished.exit_code != 0:
            detail = finished.stderr.decode(errors="replace").strip()
            raise OzoneError(f"cannot write {agent.name}:{target}: {detail}")
    except BaseException as err:
        if _discarded(agent, lease.data.get("path")):
            lease.release()  # else the guest may hold debris: gc, or the next cp, removes it
        if isinstance(err, OSError):
            raise OzoneError(f"cannot read {source}: {err.strerror}") from None
        raise
    lease.release()
    return CopyResult(str(source), f"{agent.name}:{target}", sent)


def _discarded(agent: Agent, folder: str | None) -> bool:
    """Remove a copy's private folder in the guest; False if that could not be done."""
    if folder is None:
        return True
    try:
        return agent.script(_DISCARD, folder).exit_code == 0
    except OzoneError:
        return False


def _send(agent: Agent, source: Path, path: str, progress: Progress | None) -> int:
    try:
        handle = agent.open(path, "w")
    except AgentCommandFailed as err:
        raise OzoneError(f"cannot write {agent.name}:{path}: {_guest_error(err)}") from None
    sent = 0
    try:
        with source.open("rb") as src:
            while piece := src.read(WRITE_CHUNK * 8):
                agent.write(handle, piece)
                sent += len(piece)
                if progress:
                    progress(len(piece))
    finally:
        with contextlib.suppress(OzoneError):
            agent.close(handle)
    return sent


# --- guest → host --------------------------------------------------------------------------


def copy_from_guest(
    agent: Agent, source: str, destination: str | Path, *, progress: Progress | None = None
) -> CopyResult:
    where = f"{agent.name}:{source}"
    target = Path(destination)
    if str(destination).endswith("/") or target.is_dir():
        if not target.is_dir():
            raise NotFoundError(f"cannot write {destination}: no such directory")
        target = target / os.path.basename(source)
    if not target.parent.is_dir():
        raise NotFoundError(f"cannot write {target}: no directory {target.parent}")
    holder, mode, size = _hold(agent, source)
    try:
        return _receive(agent, holder, where, target, mode, size, progress)
    finally:
        with contextlib.suppress(OzoneError):
            agent.script(_RELEASE, str(holder))
        with contextlib.suppress(OzoneError):
            agent.status(holder)  # qemu-ga keeps an ended process until asked


def _hold(agent: Agent, source: str) -> tuple[int, int, int]:
    """Open ``source`` in a guest process that keeps it open; returns that process's pid and
    the file's permission bits (never setuid on the host) and size, read from the open file."""
    where = f"{agent.name}:{source}"
    pid = agent.spawn("/bin/sh", ["-c", _HOLD, "ozone", source])
    give_up = time.monotonic() + HOLD_WAIT
    while True:
        status = agent.status(pid)
        if status.get("exited"):
            out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
            err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
            message = (out or err).strip().rsplit(": ", 1)[-1]
            if message.lower().startswith("no such file"):
                raise NotFoundError(f"no such file: {where}")
            raise OzoneError(f"cannot read {where}: {message or 'it cannot be opened'}")
        described = agent.script(_DESCRIBE, str(pid))
        if described.exit_code == 0:
            mode_text, size_text = described.stdout.decode().split()
            return pid, int(mode_text, 8) & 0o777, int(size_text)
        if time.monotonic() >= give_up:
            with contextlib.suppress(OzoneError):
                agent.script(KILL_HOLDER, str(pid))
            raise OzoneError(
                f"cannot read {where}: opening it did not finish in {HOLD_WAIT:g} s "
                "(a FIFO, or a device that waits?)"
            )
        time.sleep(0.02)


def _receive(
    agent: Agent,
    holder: int,
    where: str,
    target: Path,
    mode: int,
    size: int,
    progress: Progress | None,
) -> CopyResult:
    """Read the held file into a part file beside ``target``, then rename it into place."""
    remove_stale_host_parts(target.parent)
    temporary = target.with_name(f".{target.name}{HOST_PART}{secrets.token_hex(4)}")
    lease = Lease.take("cp-host", path=str(temporary))  # before the file: gc always sees it
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        lease.release()
        raise OzoneError(f"cannot write {target}: {err.strerror}") from None
    received = 0
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until the copy ends: the file is not debris
        try:
            handle = agent.open(f"/proc/{holder}/fd/3", "r")
        except AgentCommandFailed as err:
            raise OzoneError(f"cannot read {where}: {_guest_error(err)}") from None
        with os.fdopen(fd, "wb", closefd=False) as out:
            try:
                while True:
                    data, eof = agent.read(handle, READ_CHUNK)
                    out.write(data)
                    received += len(data)
                    if progress and data:
                        progress(len(data))
                    if eof or not data:
                        break
            finally:
                with contextlib.suppress(OzoneError):
                    agent.close(handle)
        if received != size:
            raise OzoneError(f"{where} changed while it was copied ({size} -> {received} bytes)")
        os.fchmod(fd, mode)
        os.replace(temporary, target)
    except BaseException as err:
        _discard_host_part(temporary, fd, lease)
        if isinstance(err, OSError):
            raise OzoneError(f"cannot write {target}: {err.strerror}") from None
        raise
    os.close(fd)
    lease.release()
    return CopyResult(where, str(target), received)


def _discard_host_part(path: Path, fd: int, lease: Lease | None) -> None:
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        os.close(fd)
    if lease is not None:
        lease.release()
