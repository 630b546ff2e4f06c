"""`ozone ssh`: the system's ssh client, pointed at a VM with the right user, address, port,
key and a known_hosts file of the VM's own.

On user-mode networking the guest's port 22 is reached through the loopback port QEMU
forwards to it (kept in the domain metadata); on a libvirt network or bridge, at the guest's
address. On a remote libvirt host (``qemu+ssh://``) the forwarded port is on that host's
loopback: ssh jumps through the host.

Each VM has its own key pair, made by ozone at define (``STATE/ssh/NAME``, 0700, the
invoking user's) and authorised through the VM's cloud-init seed; ssh also offers the user's
own keys. The VM's known_hosts file fills on first contact, under an alias that holds the
domain's UUID (a VM made again under the same name is another host).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import libvirt

from .connection import call, domain_metadata, is_local, lookup
from .errors import OzoneError, StateError, UsageError
from .inventory import is_active
from .state import private_dir, state_dir

KEY_FILE = "id_ed25519"
PROBE_TIMEOUT = 10.0


def key_dir(name: str) -> Path:
    return state_dir() / "ssh" / name


def vm_public_key(name: str, *, create: bool) -> str | None:
    """The public half of the VM's own key pair, made first when ``create`` (None: there is
    none, or ssh-keygen is missing)."""
    folder = key_dir(name)
    public = folder / f"{KEY_FILE}.pub"
    with contextlib.suppress(OSError):
        return public.read_text().strip()
    keygen = shutil.which("ssh-keygen")
    if not create or keygen is None:
        return None
    parent = private_dir(state_dir() / "ssh")
    # made in a private temporary folder, then renamed into place in one step: a second
    # define that races this one keeps whichever pair landed first
    temp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=parent))
    keygen_args = ["-q", "-t", "ed25519", "-N", "", "-C", f"ozone-{name}"]
    try:
        subprocess.run(
            [keygen, *keygen_args, "-f", str(temp / KEY_FILE)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=True,
            timeout=60,
        )
        with contextlib.suppress(OSError):  # another define made it first
            temp.rename(folder)
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    with contextlib.suppress(OSError):
        return public.read_text().strip()
    return None


def forget(name: str) -> None:
    """Remove the VM's key pair and known hosts (at undefine)."""
    shutil.rmtree(key_dir(name), ignore_errors=True)
    (state_dir() / "ssh" / f"{name}.known_hosts").unlink(missing_ok=True)


@dataclass(frozen=True)
class Target:
    """Where and how `ozone ssh` connects."""

    name: str
    user: str
    host: str
    port: int
    jump: str | None  # ssh's -J: the remote libvirt host the forwarded port is on
    options: list[str]  # ssh and its options, up to the host
    command: list[str]  # what to run there (none: a login shell)

    @property
    def argv(self) -> list[str]:
        """The whole ssh command line."""
        return [*self.options, self.host, *(["--", *self.command] if self.command else [])]


def target(
    conn: libvirt.virConnect,
    name: str,
    command: Sequence[str] = (),
    *,
    user: str | None = None,
    options: Sequence[str] = (),
) -> Target:
    """The ssh command line for ``name`` (running), with ``command`` to run, if any."""
    dom = lookup(conn, name)
    if not is_active(dom):
        raise StateError(f"{name} is not running", hint=f"`ozone start {name} --wait`")
    meta = domain_metadata(dom)
    if meta is None:
        raise StateError(f"{name} was not made by ozone", hint=f"`ozone define {name}`")
    client = shutil.which("ssh")
    if client is None:
        raise OzoneError(
            "the ssh client is not installed", hint="install it: apt-get install openssh-client"
        )
    forward = meta.ssh_forward
    jump = None
    if forward is not None:
        host, port = forward.host, forward.port
        if not is_local(conn):
            jump = _jump_host(conn)
    elif _on_user_networking(call(dom.XMLDesc, 0, name=name)):
        raise StateError(
            f"{name} has no ssh port forward (it was defined before ozone made them)",
            hint=f"`ozone define {name}` again, then restart it",
        )
    else:
        host, port = _guest_address(conn, name), 22
    login = user or meta.ssh_user or "root"
    folder = key_dir(name)
    # the caller's options first: for each option ssh keeps the first value it is given
    argv = [client, "-p", str(port), "-l", login, *options]
    if jump:
        argv += ["-J", jump]
    key = folder / KEY_FILE
    if key.is_file():
        argv += ["-i", str(key)]  # ssh still offers the user's own keys after it
    if folder.is_dir():
        known = folder / "known_hosts"
    else:
        known = private_dir(state_dir() / "ssh") / f"{name}.known_hosts"
    argv += [
        "-o", f"UserKnownHostsFile={known}",
        "-o", "StrictHostKeyChecking=accept-new",
        "-o", f"HostKeyAlias=ozone-{dom.UUIDString()}",
        "-o", "CheckHostIP=no",
        # also bounds the wait for the server's greeting: QEMU's user networking accepts a
        # connection to a forwarded port even when nothing in the guest answers, and holds it
        "-o", "ConnectTimeout=30",
    ]  # fmt: skip
    return Target(name, login, host, port, jump, argv, list(command))


def _on_user_networking(xml: str) -> bool:
    """The guest is on QEMU's user-mode network: not reachable from the host at its address."""
    from lxml import etree

    from .domain_xml import NETDEV_ID

    root = etree.fromstring(xml.encode())
    return root.find("devices/interface[@type='user']") is not None or NETDEV_ID in xml


def _jump_host(conn: libvirt.virConnect) -> str:
    uri = urllib.parse.urlsplit(call(conn.getURI))
    if not uri.scheme.endswith("+ssh") or not uri.hostname:
        raise OzoneError(
            "the VM's forwarded ssh port is on its libvirt host's loopback, which ozone "
            "reaches by ssh to that host",
            hint="connect with a qemu+ssh://HOST/system URI",
        )
    host = uri.hostname
    if uri.username:
        host = f"{uri.username}@{host}"
    return f"{host}:{uri.port}" if uri.port else host


def _guest_address(conn: libvirt.virConnect, name: str) -> str:
    from .addresses import guest_addresses

    # the host's view first: a guest (its agent) must not choose where ssh connects
    found = guest_addresses(conn, name, order=("lease", "arp", "agent"))
    for interface in found.interfaces:
        for entry in interface.addresses:
            address = entry.split("/", 1)[0]
            if ":" not in address:
                return address
    return found.interfaces[0].addresses[0].split("/", 1)[0]


def run(t: Target) -> int:
    """Run ssh (in the foreground, on this terminal) and return its exit status."""
    with _ignoring_interrupts():
        return subprocess.run(t.argv, check=False).returncode


@contextlib.contextmanager
def _ignoring_interrupts() -> Iterator[None]:
    """Ctrl-C belongs to ssh (and the program it runs), not to ozone waiting for it."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield None
    finally:
        signal.signal(signal.SIGINT, previous)


def diagnose(t: Target) -> OzoneError | None:
    """After ssh failed to connect (status 255): why, when ozone can tell. No ssh server
    answering, or one that takes none of the keys offered."""
    if t.jump is None and not _answers_ssh(t.host, t.port):
        return OzoneError(
            f"no ssh server answers on {t.name}'s port 22 (through {t.host}:{t.port})",
            hint="the guest needs openssh-server (add it to image.packages), running; "
            f"a VM that just started may still be booting: `ozone wait {t.name}`",
        )
    probe = [*t.options, "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", t.host, "true"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if "Permission denied" in done.stderr:
        return OzoneError(
            f"{t.name} takes no key of ours for user {t.user}",
            hint="ozone's key for the VM reaches it through cloud-init (a cloud_init section "
            "in its config, then `ozone define` and a fresh disk); or add your public key to "
            f"~{t.user}/.ssh/authorized_keys in the guest; `ozone ssh -l USER` for another user",
        )
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in done.stderr:
        known = next(a for a in t.options if a.startswith("UserKnownHostsFile="))
        return OzoneError(
            f"{t.name}'s host key is not the one ssh saw there before",
            hint=f"if the VM was made again, remove {known.split('=', 1)[1]}",
        )
    return None


def _answers_ssh(host: str, port: int) -> bool:
    """Does an ssh server greet on host:port? (QEMU's user networking accepts a connection
    to a forwarded port even when nothing listens in the guest, then closes it.)"""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as sock:
            sock.settimeout(PROBE_TIMEOUT)
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def check_user(user: str) -> str:
    from .config import USER_RE

    if not USER_RE.fullmatch(user):
        raise UsageError(f"{user!r} is not a user name", hint="e.g. -l root")
    return user
