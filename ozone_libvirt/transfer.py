"""`ozone cp`: files between the host and a guest, through the agent's guest-file-* calls.

A copy lands under a temporary name next to its destination and is renamed into place when
complete (with the source's permission bits), so a failed copy never leaves a half-written
file where the destination was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .agent import READ_CHUNK, WRITE_CHUNK, Agent
from .errors import AgentCommandFailed, NotFoundError, OzoneError, UsageError

Progress = Callable[[int], None]

# Where will a file named $2 land if copied to $1 in the guest? Prints the path, or fails
# with a message. A trailing slash or an existing directory means "into that directory".
_RESOLVE_TARGET = r"""
t=$1
case $t in */) t=$t$2 ;; *) [ -d "$t" ] && t=$t/$2 ;; esac
d=${t%/*}
[ -n "$d" ] || d=/
[ -d "$d" ] || { echo "no directory $d"; exit 1; }
[ -d "$t" ] && { echo "$t is a directory"; exit 1; }
printf '%s\n' "$t"
"""
# chmod and rename the finished temporary file into place
_FINISH = r"""chmod "$1" "$2" && mv -f "$2" "$3" || { rm -f "$2"; exit 1; }"""
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
    resolved = agent.script(_RESOLVE_TARGET, destination, source.name)
    where = f"{agent.name}:{destination}"
    if resolved.exit_code != 0:
        raise OzoneError(f"cannot write {where}: {resolved.stdout.decode().strip()}")
    target = resolved.stdout.decode().rstrip("\n")
    temporary = f"{target}.ozone-part-{secrets.token_hex(4)}"
    try:
        handle = agent.open(temporary, "w")
    except AgentCommandFailed as err:
        raise OzoneError(f"cannot write {agent.name}:{target}: {_guest_error(err)}") from None
    sent = 0
    try:
        try:
            with source.open("rb") as src:
                while piece := src.read(WRITE_CHUNK * 8):
                    agent.write(handle, piece)
                    sent += len(piece)
                    if progress:
                        progress(len(piece))
        finally:
            agent.close(handle)
        mode = format(stat.S_IMODE(info.st_mode), "o")
        finished = agent.script(_FINISH, mode, temporary, target)
        if finished.exit_code != 0:
            detail = finished.stderr.decode(errors="replace").strip()
            raise OzoneError(f"cannot write {agent.name}:{target}: {detail}")
    except BaseException as err:
        with contextlib.suppress(OzoneError):
            agent.script('rm -f -- "$1"', temporary)
        if isinstance(err, OSError):
            raise OzoneError(f"cannot read {source}: {err.strerror}") from None
        raise
    return CopyResult(str(source), f"{agent.name}:{target}", sent)


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
    temporary = target.with_name(f".{target.name}.ozone-part-{secrets.token_hex(4)}")
    try:
        handle = agent.open(source, "r")
    except AgentCommandFailed as err:
        raise OzoneError(f"cannot read {where}: {_guest_error(err)}") from None
    received = 0
    try:
        try:
            with temporary.open("wb") as out:
                while True:
                    data, eof = agent.read(handle, READ_CHUNK)
                    out.write(data)
                    received += len(data)
                    if progress and data:
                        progress(len(data))
                    if eof or not data:
                        break
        finally:
            agent.close(handle)
        if received != size:
            raise OzoneError(f"{where} changed while it was copied ({size} -> {received} bytes)")
        temporary.chmod(mode)
        os.replace(temporary, target)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        raise OzoneError(f"cannot write {target}: {err.strerror}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return CopyResult(where, str(target), received)
