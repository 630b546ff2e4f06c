"""The host inventory: the libvirt hosts ozone knows by name (`--host NAME`, a config's
``host``, `ozone list --all-hosts`), and the rule that places a VM whose host is ``auto``.

Pure: reading and checking the hosts file, choosing a host from facts passed in as values.
Asking the hosts themselves (in parallel, with bounded waits) is :mod:`.fleet`'s job.

The hosts file (``~/.config/ozone/hosts.yaml``, or the file ``$OZONE_HOSTS`` names; YAML or
JSON, checked like a VM config)::

    hosts:
      local: qemu:///system
      rack2: qemu+ssh://root@rack2/system
      rack3: {uri: "qemu+tcp://10.0.0.3/system"}
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import schema
from .errors import ConfigError, OzoneError, UsageError
from .units import format_size

HOSTS_ENV = "OZONE_HOSTS"
DEFAULT_HOSTS_FILE = "~/.config/ozone/hosts.yaml"
AUTO = schema.AUTO_HOST  # a config's host (or --host) that asks ozone to place the VM
HOST_NAME_RE = re.compile(schema.HOST_NAME)
# a libvirt URI: a driver (with an optional +transport), then what the driver takes
URI_RE = re.compile(r"\A[a-z][a-z0-9]*(?:\+[a-z0-9]+)?://[!-~]*\Z")
MAX_URI_CHARS = 1024
MAX_HOSTS = 256
HOST_KEYS = ("uri",)  # the object form of a host: room for more per-host settings
EXAMPLE = "hosts: {local: qemu:///system, rack2: qemu+ssh://root@rack2/system}"
GiB = 1024**3
MEMORY_STEP = 256 * 1024**2  # free memory closer than this is a tie (it moves all the time)


@dataclass(frozen=True)
class Host:
    name: str
    uri: str


@dataclass(frozen=True)
class Inventory:
    """The hosts file's hosts, in its order."""

    hosts: tuple[Host, ...]
    source: Path

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hosts)

    def find(self, name: str) -> Host | None:
        return next((h for h in self.hosts if h.name == name), None)

    def unknown(self, name: str) -> tuple[str, str]:
        """The message and hint for a host name the file does not list."""
        close = difflib.get_close_matches(name, self.names, n=1, cutoff=0.6)
        known = "known hosts: " + ", ".join(self.names)
        hint = f"did you mean {close[0]!r}? {known}" if close else known
        return f"no host named {name[:64]!r} in {_shown(self.source)}", hint

    def get(self, name: str) -> Host:
        """The host ``--host NAME`` names (a usage error when the file does not list it)."""
        found = self.find(name)
        if found is None:
            message, hint = self.unknown(name)
            raise UsageError(f"--host: {message}", hint=hint)
        return found


def hosts_file() -> Path:
    """Where the inventory is: ``$OZONE_HOSTS``, else ``~/.config/ozone/hosts.yaml``."""
    return Path(os.environ.get(HOSTS_ENV) or DEFAULT_HOSTS_FILE).expanduser()


def _shown(path: Path) -> str:
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home) :] if home != "/" and text.startswith(home + "/") else text


def missing_file(path: Path, *, wanted: str) -> ConfigError:
    """No hosts file, but ``wanted`` needs one (``--host rack2``, ``--all-hosts``...)."""
    named = f" (${HOSTS_ENV})" if os.environ.get(HOSTS_ENV) else ""
    return ConfigError(
        f"{wanted} needs the host inventory, and there is no hosts file at {_shown(path)}{named}",
        hint=f"write one, e.g. `{EXAMPLE}` (YAML), or point ${HOSTS_ENV} at yours",
    )


def load_inventory(path: Path | None = None, *, wanted: str) -> Inventory:
    """Read and check the hosts file (``wanted``: what needs it, for the missing-file error)."""
    from .config import read_config_data

    path = (path or hosts_file()).absolute()
    if not path.exists() and not path.is_symlink():
        raise missing_file(path, wanted=wanted)
    return parse_inventory(read_config_data(path), source=path)


def parse_inventory(data: object, *, source: Path) -> Inventory:
    """Check a hosts document: ``hosts``, a mapping of names to URIs (or to ``{uri: ...}``).
    Errors name the file and the field path, like a VM config's."""
    from .config import _Checker, _label, _show

    check = _Checker(source)
    top = check.mapping(data, "(top level)")
    check.keys(top, ("hosts",), "")
    if "hosts" not in top:
        raise check.fail("hosts", "missing; the hosts file lists hosts by name", f"e.g. {EXAMPLE}")
    listed = check.mapping(top["hosts"], "hosts")
    if not listed:
        raise check.fail("hosts", "lists no host", f"e.g. {EXAMPLE}")
    if len(listed) > MAX_HOSTS:
        raise check.fail("hosts", f"{len(listed)} hosts (at most {MAX_HOSTS})")
    hosts = []
    for key, value in listed.items():
        where = f"hosts.{_label(key)}"
        name = check.string(key, where, pattern=HOST_NAME_RE, expected=schema.HOST_NAME_DOC)
        if name == AUTO:
            raise check.fail(
                where, f"{AUTO!r} is not a host name: a config's `host: {AUTO}` asks ozone to "
                "place the VM", "name the host otherwise",
            )  # fmt: skip
        uri: object = value
        if isinstance(value, dict):
            check.keys(value, HOST_KEYS, where)
            if "uri" not in value:
                raise check.fail(f"{where}.uri", "missing; the libvirt URI of the host")
            uri, where = value["uri"], f"{where}.uri"
        expected = "a libvirt URI like qemu+ssh://root@rack2/system"
        text = check.string(uri, where, expected=expected)
        if len(text) > MAX_URI_CHARS or not URI_RE.fullmatch(text):
            raise check.fail(where, f"{_show(text)} is not valid; expected {expected}")
        hosts.append(Host(name, text))
    return Inventory(tuple(hosts), source)


def wanted_host(*, connect: str | None, host: str | None, config_host: str | None) -> str | None:
    """The inventory host a command talks to: none when ``-c URI`` names one, else
    ``--host``, else the config's ``host`` (None: ``$LIBVIRT_DEFAULT_URI`` or libvirt's)."""
    if connect is not None:
        return None
    return host or config_host


# --- placement ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Capacity:
    """What a host could give a new VM, as it told us."""

    host: str
    free_memory: int  # bytes: free, plus buffers and page cache the kernel gives back
    cpus: int  # logical CPUs
    vcpus_running: int  # vCPUs of the VMs running there

    @property
    def spare_cpus(self) -> int:
        return self.cpus - self.vcpus_running


@dataclass(frozen=True)
class Placement:
    """Where ``host: auto`` put a VM, and why (``rule``: the line ozone prints)."""

    host: str
    rule: str
    found: bool = False  # a VM of that name was there already: nothing was placed
    notes: tuple[str, ...] = ()  # hosts left out, and why


class NoRoom(OzoneError):
    """No host ``auto`` may use can take the VM."""

    code = "no-room"


def gib(num_bytes: int) -> str:
    return f"{num_bytes / GiB:.1f} GiB"


def place(
    capacities: Sequence[Capacity],
    *,
    name: str,
    memory: int,
    vcpus: int,
    unreachable: Mapping[str, str] | None = None,
) -> Placement:
    """The rule of ``host: auto``: a host fits when its free memory is at least the VM's
    memory and it has at least as many CPUs as the VM has vCPUs; of those, the one with the
    most free memory wins (closer than 256 MiB is a tie), then the one with the most CPUs
    not taken by running VMs' vCPUs, then the first name. ``unreachable``: hosts that did
    not answer (name → why), named in the notes or in the error."""
    notes = tuple(f"{host} left out: {why}" for host, why in (unreachable or {}).items())
    fits = [c for c in capacities if c.free_memory >= memory and c.cpus >= vcpus]
    if not fits:
        want = f"{name} ({format_size(memory)}, {vcpus} vCPU{'s' if vcpus != 1 else ''})"
        seen = [f"{c.host} {gib(c.free_memory)} free, {c.cpus} CPUs" for c in capacities]
        seen += [f"{host} did not answer" for host in unreachable or {}]
        raise NoRoom(
            f"no host has room for {want}: " + "; ".join(seen),
            hint="free memory on a host, lower the VM's memory or vcpus, or name its host",
        )
    best = min(fits, key=lambda c: (-(c.free_memory // MEMORY_STEP), -c.spare_cpus, c.host))
    return Placement(best.host, f"placed on {best.host}: {gib(best.free_memory)} free", notes=notes)
