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

# Where will a file named $2 land if copied to $1 in the guest? Make the private folder the
# copy is written in ($3 names it) next to it, and list the other copies' folders there.
# Prints the target, the folder, then those names; or a message and exits 1.
_PREPARE = r"""
t=$1
case $t in */) t=$t$2 ;; *) [ -d "$t" ] && t=$t/$2 ;; esac
d=${t%/*}
[ -n "$d" ] || d=/
[ -d "$d" ] || { echo "no directory $d"; exit 1; }
[ -d "$t" ] && { echo "$t is a directory"; exit 1; }
read -r b </proc/sys/kernel/random/boot_id
w=$d/.ozone-cp-${b%%-*}-$3
umask 077
mkdir -- "$w" 2>/dev/null || { mkdir -- "$w" 2>&1 | sed 's/.*: //'; exit 1; }
printf '%s\n%s\n' "$t" "$w"
for x in "$d"/.ozone-cp-*; do
  [ "$x" != "$w" ] && [ -d "$x" ] && [ ! -h "$x" ] && [ -O "$x" ] && printf '%s\n' "${x##*/}"
done
exit 0
"""
# chmod and rename the finished file into place; remove the stale folders named after --
_FINISH = r"""
m=$1 w=$2 t=$3
shift 4
d=${t%/*}
[ -n "$d" ] || d=/
for x in "$@"; do
  [ -d "$d/$x" ] && [ ! -h "$d/$x" ] && [ -O "$d/$x" ] && rm -rf -- "$d/$x"
done
chmod "$m" "$w/data" && mv -f -- "$w/data" "$t" && exec rmdir -- "$w"
rm -rf -- "$w"
exit 1
"""
_DISCARD = 'rm -rf -- "$1"'
# mode (octal) and size of a regular file, or a message
_STAT = r"""
[ -e "$1" ] || { echo "no such file"; exit 1; }
[ -d "$1" ] && { echo "is a directory"; exit 1; }
[ -f "$1" ] || { echo "not a regular file"; exit 1; }
[ -r "$1" ] || { echo "not readable"; exit 1; }
stat -L -c '%a %s' "$1"
"""


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
        if "path" in lease.data:
            with contextlib.suppress(OzoneError):
                agent.script(_DISCARD, lease.data["path"])
        if isinstance(err, OSError):
            lease.release()
            raise OzoneError(f"cannot read {source}: {err.strerror}") from None
        if not isinstance(err, OzoneError) or agent.answers(timeout=1):
            lease.release()  # else the guest may hold debris: gc, or the next cp, removes it
        raise
    lease.release()
    return CopyResult(str(source), f"{agent.name}:{target}", sent)


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
    described = agent.script(_STAT, source)
    if described.exit_code != 0:
        message = described.stdout.decode().strip() or described.stderr.decode().strip()
        if message == "no such file":
            raise NotFoundError(f"no such file: {where}")
        raise OzoneError(f"cannot read {where}: {message}")
    mode_text, size_text = described.stdout.decode().split()
    mode, size = int(mode_text, 8) & 0o777, int(size_text)  # never setuid on the host
    target = Path(destination)
    if str(destination).endswith("/") or target.is_dir():
        if not target.is_dir():
            raise NotFoundError(f"cannot write {destination}: no such directory")
        target = target / os.path.basename(source)
    if not target.parent.is_dir():
        raise NotFoundError(f"cannot write {target}: no directory {target.parent}")
    remove_stale_host_parts(target.parent)
    temporary = target.with_name(f".{target.name}{HOST_PART}{secrets.token_hex(4)}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        raise OzoneError(f"cannot write {target}: {err.strerror}") from None
    lease: Lease | None = None
    received = 0
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until the copy ends: the file is not debris
        lease = Lease.take("cp-host", path=str(temporary))
        try:
            handle = agent.open(source, "r")
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
