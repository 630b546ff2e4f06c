"""ozone's own files on this host: its state folder, cross-process locks, the private folder
of QMP sockets, and *leases* that let `ozone gc` find what a killed ozone left behind.

A lease is a small JSON file in ``STATE/leases`` that a process holds an ``flock`` on for as
long as something it made is in use (a half-copied file, say). The kernel drops the lock when
the process dies, however it dies, so "lease file not locked" means "its owner is gone": what
the lease names is debris. Nothing here talks to libvirt.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import OzoneError

SYSTEM_STATE = Path("/var/lib/ozone")
VIRTIOFSD_RO = SYSTEM_STATE / "libexec" / "virtiofsd-ro"


def state_dir() -> Path:
    """``/var/lib/ozone`` for root, else ``$XDG_STATE_HOME/ozone`` (``OZONE_STATE_DIR`` wins)."""
    if os.environ.get("OZONE_STATE_DIR"):
        return Path(os.environ["OZONE_STATE_DIR"])
    if os.geteuid() == 0:
        return SYSTEM_STATE
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local/state")
    return Path(xdg) / "ozone"


def private_dir(path: Path, *, mode: int = 0o700) -> Path:
    """Make (or check) a folder of ours: owned by us, ``mode``, never through a symlink."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=mode)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise OzoneError(
            f"{path} is not a folder of this user's",
            hint="ozone keeps its state there: remove whatever is in the way",
        )
    if stat.S_IMODE(info.st_mode) != mode:
        path.chmod(mode)
    return path


# --- locks --------------------------------------------------------------------------------


@contextlib.contextmanager
def host_lock(name: str, *, report: Callable[[str], None] | None = None) -> Iterator[None]:
    """An exclusive lock shared by every ozone process of this user on this host (e.g.
    around choosing a QMP port and defining the domain that takes it). ``report`` hears
    when another process holds it and this one waits."""
    folder = private_dir(state_dir() / "locks")
    fd = os.open(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if report is not None:
                report("waiting for another ozone")
            fcntl.flock(fd, fcntl.LOCK_EX)  # that one ends, or dies and drops the lock
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def host_lock_if_free(name: str) -> Iterator[bool]:
    """:func:`host_lock` without waiting: True (held for the block) when no process holds
    it, also when it was never made (nothing of that name ever ran); False when one does."""
    try:
        fd = os.open(state_dir() / "locks" / f"{name}.lock", os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


# --- QMP sockets ---------------------------------------------------------------------------


def qmp_folder(*, session: bool) -> Path:
    """Where `qmp: auto` sockets live: a folder only QEMU's user (and root) can enter."""
    if session:
        return state_dir() / "qmp"
    return SYSTEM_STATE / "qmp"


def install_virtiofsd_ro() -> Path | None:
    """Install ozone's read-only virtiofsd wrapper (``data/virtiofsd-ro``) where libvirt,
    which runs it as root, may: ``/var/lib/ozone/libexec``, root's all the way, 0755. Its
    path, or None when there is none: this process is not root and root never installed it
    (read-only shares are then only mounted read-only by the guest)."""
    from importlib.resources import files

    text = (files(__package__) / "data" / "virtiofsd-ro").read_bytes()
    if os.geteuid() != 0:
        return VIRTIOFSD_RO if _installed(text) else None
    folder = VIRTIOFSD_RO.parent
    for path in (SYSTEM_STATE, folder):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o755)
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
            raise OzoneError(
                f"{path} is not a folder only root can change",
                hint="libvirt runs ozone's virtiofsd wrapper from there as root: remove it "
                "(ozone makes it anew), or share no folder read-only",
            )
    target = VIRTIOFSD_RO
    if _installed(text):
        return target
    temp = folder / f".virtiofsd-ro.{secrets.token_hex(4)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text)
        os.chmod(temp, 0o755)  # whatever the umask
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target


def _installed(text: bytes) -> bool:
    """The wrapper is in place: ``text``, root's, 0755, in folders only root can change."""
    try:
        for folder in (SYSTEM_STATE, VIRTIOFSD_RO.parent):
            info = folder.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
                return False
        info = VIRTIOFSD_RO.lstat()
        ours = stat.S_ISREG(info.st_mode) and info.st_uid == 0
        return ours and stat.S_IMODE(info.st_mode) == 0o755 and VIRTIOFSD_RO.read_bytes() == text
    except OSError:
        return False


def ensure_qmp_folder(folder: Path, owner: tuple[int, int] | None) -> bool:
    """Make the QMP socket folder: mode 0700, owned by the user QEMU runs as (``owner``,
    uid and gid; None: ourselves). False when this process cannot make it so (not root)."""
    uid, gid = owner if owner is not None else (os.geteuid(), os.getegid())
    try:
        folder.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode):
            raise OzoneError(f"{folder} is not a folder", hint="remove it; ozone makes it anew")
        if (info.st_uid, info.st_gid) != (uid, gid):
            os.chown(folder, uid, gid, follow_symlinks=False)
        if stat.S_IMODE(info.st_mode) != 0o700:
            folder.chmod(0o700)
    except PermissionError:
        return False
    return True


# --- leases --------------------------------------------------------------------------------


@dataclass
class Lease:
    """Held (locked) while what it describes is in use; removed when that is cleaned up."""

    path: Path
    data: dict[str, Any]
    handle: IO[str] | None = field(default=None, repr=False)

    @classmethod
    def take(cls, kind: str, **data: Any) -> Lease:
        folder = private_dir(state_dir() / "leases")
        path = folder / f"{kind}-{secrets.token_hex(8)}.json"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        handle = os.fdopen(fd, "w+")
        fcntl.flock(handle, fcntl.LOCK_EX)
        lease = cls(path, {"kind": kind, "pid": os.getpid(), **data}, handle)
        lease.save()
        return lease

    def save(self) -> None:
        assert self.handle is not None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(json.dumps(self.data))
        self.handle.flush()

    def update(self, **data: Any) -> None:
        self.data.update(data)
        self.save()

    def release(self) -> None:
        """What the lease covered is gone: drop the lease."""
        self.path.unlink(missing_ok=True)
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def stale_leases(kind: str | None = None) -> Iterator[Lease]:
    """Leases whose owner died (nobody holds their lock). Each is yielded locked by us:
    release() it once its debris is gone, or leave it for the next look."""
    folder = state_dir() / "leases"
    if not folder.is_dir():
        return
    for path in sorted(folder.glob(f"{kind or '*'}-*.json")):
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        handle = os.fdopen(fd, "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()  # its owner lives
            continue
        try:
            data: Any = json.loads(handle.read() or "{}")
        except ValueError:
            data = None
        if not isinstance(data, dict) or "kind" not in data:
            handle.close()  # being written right now, or not ours to judge
            continue
        lease = Lease(path, data, handle)
        try:
            yield lease
        finally:
            if lease.handle is not None:
                lease.handle.close()
