"""The VM config schema, declared once: a table of fields (kind, bounds, default, doc).

It drives three things: the config checker (:mod:`.config`: the keys each level allows, the
defaults, the simple types and ranges), :func:`json_schema` (JSON Schema draft 2020-12, for
editors and other tools) and :func:`reference_markdown` (the README's config reference).

Pure data and string building: cheap to import (no libvirt, no yaml, no lxml).
Regenerate the README section with ``make readme``.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .catalogue import CATALOGUE
from .units import format_size

Kind = Literal[
    "string", "text", "integer", "boolean", "choice", "size", "path", "guest_dir", "object",
    "list",
]  # fmt: skip

MiB = 1024**2
GiB = 1024**3
TiB = 1024**4


@dataclass(frozen=True)
class Field:
    """One key of a config object.

    Simple kinds are checked by the checker's generic code from these attributes alone;
    ``check`` names the checker method for the rest (shorthands, cross-field rules)."""

    key: str
    kind: Kind
    title: str  # a short label (JSON Schema ``title``)
    doc: str = ""  # what it does, for the README and JSON Schema ``description``
    default: Any = None  # as a config writes it; None: the key has no default
    default_doc: str | None = None  # the README's default column, where a value cannot say
    required: bool = False
    missing: str = ""  # the checker's message when a required key is missing
    hint: str | None = None  # and its hint
    choices: tuple[str, ...] = ()
    pattern: str | None = None  # a Python regex, anchored with \A...\Z
    expected: str | None = None  # what an error message says was expected
    low: int | None = None  # integers: the bounds; sizes: in bytes
    high: int | None = None
    max_items: int | None = None  # lists
    what: str = ""  # lists: what messages call the items ("expected a list of disks")
    fields: tuple[Field, ...] = ()  # objects: their keys
    of: Field | None = None  # lists: their items
    short: Mapping[str, Any] | None = None  # JSON Schema of a shorthand form (a string...)
    json_extra: Mapping[str, Any] | None = None  # JSON Schema rules beyond the fields
    check: str | None = None  # the checker method for what the table cannot say

    @property
    def description(self) -> str:
        more = self.doc or self.expected
        return f"{self.title}: {more}" if more else self.title


def keys(fields: tuple[Field, ...]) -> tuple[str, ...]:
    return tuple(f.key for f in fields)


def field(section: Field, key: str) -> Field:
    """The field ``key`` of an object (or of a list's items)."""
    return next(f for f in item_fields(section) if f.key == key)


def item_fields(section: Field) -> tuple[Field, ...]:
    """The keys of a list's items (``disks[0].path``) or of an object (``network.type``)."""
    return section.of.fields if section.of is not None else section.fields


# --- patterns: Python regexes, anchored with \A...\Z (never `$`, which also matches before a
# trailing newline); character classes spelled out in ASCII (\d matches other scripts' digits)

NAME = r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"
HOST_NAME = NAME  # a host's name in the hosts file (see hosts.py)
HOST_NAME_DOC = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
AUTO_HOST = "auto"
MACHINE = r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"
MAC = r"\A(?:[0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}\Z"
IFNAME = r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z"
HOST_LABEL = r"\A[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z"
SUITE = r"\A[a-z][a-z0-9-]{1,31}\Z"
PACKAGE = r"\A[a-z0-9][a-z0-9+.-]{0,99}\Z"  # a Debian package name
USER = r"\A[a-z_][a-z0-9_-]{0,31}\Z"
SHA256 = r"\A[0-9a-fA-F]{64}\Z"
SHA512 = r"\A[0-9a-fA-F]{128}\Z"
SSH_KEY = r"\A(?:ssh-|ecdsa-|sk-)[A-Za-z0-9@.-]+ [A-Za-z0-9+/=]+(?: [ -~]*)?\Z"
MODE = r"\A0?[0-7]{3,4}\Z"
OWNER = r"\A[a-z_][a-z0-9_-]{0,31}(?::[a-z_][a-z0-9_-]{0,31})?\Z"
URL = r"\A(?:https?|file)://[!-~]+\Z"
# a guest folder a share is mounted on (once normalised): it becomes a systemd mount unit's
# Where= and an fstab field, where spaces, commas and backslashes would need escaping
GUEST_MOUNT = r"\A(?:/[A-Za-z0-9_.@+-]+)+\Z"
# folders a share must not be mounted on (it would hide them in the guest)
SYSTEM_FOLDERS = (
    "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32",
    "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp",
    "/usr", "/var", "/usr/local", "/var/lib", "/var/log", "/var/tmp",
)  # fmt: skip

# Bounds the checker and the schema share
MIN_MEMORY = 32 * MiB
MAX_MEMORY = 16 * TiB
MAX_VCPUS = 512
MAX_DISKS = 20
MAX_LIST = 256  # packages, users, files, commands
MAX_PORTS = 64
MAX_SHARES = 16
MAX_PATH_CHARS = 4096  # PATH_MAX

ACCELS = ("auto", "kvm", "tcg")
BOOT_DEVICES = ("cdrom", "disk", "network")
DISK_FORMATS = ("qcow2", "raw")
DISK_BUSES = ("virtio", "sata", "scsi")
NETWORK_TYPES = ("user", "none", "network", "bridge")
NIC_MODELS = ("virtio", "e1000", "e1000e", "rtl8139")
GRAPHICS = ("none", "vnc")


# --- JSON Schema forms of what the checker's code decides --------------------------------

# what no string holds (as the checker says, but for lone surrogates, which JSON text and
# ECMA 262 regexes treat apart); free text may hold tabs and line breaks
_NONCHARS = r"\x7f-\x9f\ufffe\uffff"
_CONTROLS = f"\\x00-\\x1f{_NONCHARS}"
_LINE = f"^[^{_CONTROLS}]*$"
_TEXT = f"^[^\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f{_NONCHARS}]*$"
_PATH = f"^[^{_CONTROLS}]*[^\\s{_CONTROLS}][^{_CONTROLS}]*$"  # not blank
_GUEST_DIR = f"^/[^{_CONTROLS}]*[^/.\\s{_CONTROLS}][^{_CONTROLS}]*$"  # absolute, not / itself
# A number of MiB, or a string: a number with a unit. The checker takes any decimal that comes
# to a whole number of bytes; the schema takes eighths (.5, .25, .125, ...), which always do
# (except in bytes), so whatever it accepts the checker parses ("1.1MiB" fails both).
_EIGHTH = 0.125
_SIZE = (
    r"^ *[0-9]{1,20}(?:\.(?:0|5|25|75|125|375|625|875)0{0,17})? *(?:[KkMmGgTt](?:[Ii]?[Bb])?)? *$"
    r"|^ *[0-9]{1,20}(?:\.0{1,20})? *[Bb] *$"
)
_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_HOST_PORT = (  # 1024-65535: QEMU runs unprivileged
    r"(?:102[4-9]|10[3-9][0-9]|1[1-9][0-9]{2}|[2-9][0-9]{3}|[1-5][0-9]{4}|6[0-4][0-9]{3}"
    r"|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
)
_IPV4 = r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}"
_LOOPBACK_V4 = r"127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}"
_LOOPBACK = f"(?:{_LOOPBACK_V4}|localhost|::1|\\[::1\\])"
_ANY_HOST = r"(?:[A-Za-z0-9.-]+|[0-9A-Fa-f:.]+|\[[0-9A-Fa-f:.]+\])"
_UNIX = f"unix:[^,{_CONTROLS}]*[^,\\s{_CONTROLS}][^,{_CONTROLS}]*"


def _body(pattern: str) -> str:
    return pattern.removeprefix(r"\A").removesuffix(r"\Z")


def _js(pattern: str) -> str:
    """A Python regex anchored with \\A...\\Z as a JSON Schema (ECMA 262) one."""
    return f"^{_body(pattern)}$"


def _qmp_endpoint(host: str) -> str:
    return f"\\A(?:auto|off|tcp|tcp:{host}:{_PORT}|{_UNIX})\\Z"


def _forward(host: str) -> str:
    return f"\\A(?:(?:tcp|udp):)?(?:{host}:)?{_HOST_PORT}:{_PORT}\\Z"


# a share's guest folder, as the checker takes it once normalised: no . or .. parts, not
# under /proc, /sys, /dev, not a system folder
_SHARE_GUEST = {
    "pattern": "^(?!/(?:proc|sys|dev)(?:/|$))(?:/(?!\\.\\.?(?:/|$))[A-Za-z0-9_.@+-]+)+$",
    "maxLength": 255,
    "not": {"enum": list(SYSTEM_FOLDERS)},
}
_ALLOW_REMOTE = {"properties": {"allow_remote": {"const": True}}, "required": ["allow_remote"]}
_OFF = {"enum": [False, None]}


# --- the table ---------------------------------------------------------------------------


def _bool(key: str, title: str, default: bool, doc: str = "") -> Field:
    return Field(key, "boolean", title, doc, default=default)


def _list(
    key: str, title: str, of: Field, *, what: str, doc: str = "", max_items: int = MAX_LIST,
    check: str | None = None,
) -> Field:  # fmt: skip
    return Field(
        key, "list", title, doc, default=(), of=of, max_items=max_items, what=what, check=check
    )


def _strings(
    key: str, title: str, pattern: str, expected: str, *, what: str, check: str | None = None
) -> Field:
    item = Field("item", "string", expected, pattern=pattern, expected=expected)
    return _list(key, title, item, what=what, check=check)


def _allow_remote(what: str) -> Field:
    return _bool(
        "allow_remote", f"let {what} listen beyond loopback", False,
        "needed for an address other machines can reach",
    )  # fmt: skip


PACKAGES = _strings(
    "packages", "Debian packages to install", PACKAGE, "a Debian package name",
    what="package names", check="packages",
)  # fmt: skip
SSH_KEYS = _strings(
    "ssh_authorized_keys", "ssh public keys to authorize", SSH_KEY,
    "an ssh public key line like 'ssh-ed25519 AAAA... comment'", what="ssh public keys",
    check="ssh_keys",
)  # fmt: skip

DISK = Field(
    "disk", "object", "a disk (a path, or an object)", check="disk",
    short={"type": "string", "minLength": 1, "maxLength": MAX_PATH_CHARS, "pattern": _PATH},
    fields=(
        Field("path", "path", "the disk image", required=True,
              missing="every disk needs a path"),
        Field("size", "size", "its size", "created at this size when it is missing",
              low=MiB, high=64 * TiB),
        Field("backing", "path", "a backing image",
              "the disk is a qcow2 overlay over it (created when missing)"),
        Field("format", "choice", "the image format", default="qcow2", choices=DISK_FORMATS,
              doc="a backing image needs qcow2"),
        Field("bus", "choice", "the disk bus", default="virtio", choices=DISK_BUSES),
        _bool("readonly", "attach it read-only", False),
    ),
)  # fmt: skip

NETWORK = Field(
    "network", "object", "the network", default="user", check="network",
    doc="`user` (QEMU user-mode NAT, needs nothing on the host), `none`, `network:NAME` (a "
    "libvirt network), `bridge:BR` (a host bridge), or an object",
    short={"type": "string", "pattern": f"^(?:user|none|(?:network|bridge):{_body(IFNAME)})$"},
    fields=(
        Field("type", "choice", "the kind of network", default="user", choices=NETWORK_TYPES),
        Field("source", "string", "the libvirt network or host bridge",
              "required for network and bridge, refused for user and none",
              pattern=IFNAME, expected="a network or bridge name"),
        Field("model", "choice", "the NIC model", default="virtio", choices=NIC_MODELS),
        Field("mac", "string", "the MAC address", default_doc="libvirt picks one",
              pattern=MAC, expected="a MAC address like 52:54:00:12:34:56"),
    ),
)  # fmt: skip

# QMP and port forwards beyond loopback only when the config says so explicitly
_LOOPBACK_QMP = {"type": "string", "pattern": _js(_qmp_endpoint(_LOOPBACK))}
_LOOPBACK_FORWARD = {"type": "string", "pattern": _js(_forward(_LOOPBACK_V4))}

QMP = Field(
    "qmp", "object", "QMP passthrough", default="auto", check="qmp",
    doc="`auto` (a unix socket in `/var/lib/ozone/qmp`, a folder only root and QEMU's user can "
    "enter), `tcp` (a free loopback port ozone picks, kept across redefines, moved at start "
    "if another program took it), `tcp:127.0.0.1:PORT`, `unix:/PATH`, `off`, or an object",
    short={"anyOf": [_LOOPBACK_QMP, _OFF]},
    json_extra={
        "if": {"not": _ALLOW_REMOTE},
        "then": {"properties": {"endpoint": {"anyOf": [_LOOPBACK_QMP, _OFF]}}},
    },
    fields=(
        Field("endpoint", "string", "where QEMU serves QMP", default="auto", short=_OFF,
              pattern=_qmp_endpoint(_ANY_HOST),
              doc="as the string form; any host with allow_remote"),
        _allow_remote("QMP"),
    ),
)  # fmt: skip

PORT = Field(
    "port", "object", "a port forward", check="port",
    short={"anyOf": [{"type": "integer", "minimum": 1024, "maximum": 65535}, _LOOPBACK_FORWARD]},
    json_extra={"if": {"not": _ALLOW_REMOTE},
                "then": {"properties": {"forward": _LOOPBACK_FORWARD}}},
    fields=(
        Field("forward", "string", "[tcp:|udp:][ADDRESS:]HOSTPORT:GUESTPORT", required=True,
              missing='e.g. {"forward": "0.0.0.0:8080:80", ...}', pattern=_forward(_IPV4)),
        _allow_remote("the forward"),
    ),
)  # fmt: skip

SHARE = Field(
    "share", "object", "a shared folder", check="share",
    fields=(
        Field("host", "path", "the host folder", required=True,
              missing="e.g. {host: ./src, guest: /srv/src, readonly: true}"),
        Field("guest", "guest_dir", "the guest folder it is mounted on",
              "not a system folder such as /etc or /usr", required=True,
              missing="e.g. {host: ./src, guest: /srv/src, readonly: true}",
              json_extra=_SHARE_GUEST),
        _bool("readonly", "mount it read-only", False),
    ),
)  # fmt: skip

IMAGE = Field(
    "image", "object", "the boot disk from the image store", check="image",
    doc="built from Debian packages (`debian`), downloaded (`url` with a checksum), or a "
    "catalogue name (" + ", ".join(f"`{n}`" for n in CATALOGUE) + "); the VM boots from a "
    "qcow2 overlay over it. Exactly one of debian, url, name",
    short={"enum": list(CATALOGUE)},
    json_extra={"oneOf": [{"required": [k]} for k in ("debian", "url", "name")]},
    fields=(
        Field("debian", "string", "a Debian suite to build the image from", pattern=SUITE,
              expected="a Debian suite like bookworm or trixie"),
        PACKAGES,
        Field("mirror", "string", "the Debian mirror", default_doc="`http://deb.debian.org/debian`",
              pattern=URL,
              expected="a Debian mirror URL like http://deb.debian.org/debian"),
        Field("url", "string", "where to download the image", pattern=URL,
              expected="an http://, https:// or file:// URL"),
        Field("sha256", "string", "the download's SHA-256", pattern=SHA256,
              expected="64 hexadecimal digits"),
        Field("sha512", "string", "the download's SHA-512", pattern=SHA512,
              expected="128 hexadecimal digits"),
        Field("checksum_url", "string", "a checksum file published beside the image",
              pattern=URL, expected="an http://, https:// or file:// URL"),
        Field("name", "choice", "a catalogue image", choices=tuple(CATALOGUE)),
        Field("size", "size", "the boot disk's size", default_doc="the image's", low=GiB,
              high=64 * TiB),
    ),
)  # fmt: skip

CLOUD_USER = Field(
    "user", "object", "a user (a name, or an object)", check="cloud_user",
    short={"type": "string", "pattern": _js(USER)},
    fields=(
        Field("name", "string", "the user name", required=True,
              missing="every user needs a name", pattern=USER,
              expected="a user name like dev (lower case letters, digits, '_', '-')"),
        SSH_KEYS,
        _bool("sudo", "passwordless sudo", False),
        _bool("lock_passwd", "lock the password", True),
        Field("shell", "guest_dir", "the login shell"),
        _strings("groups", "supplementary groups", USER, "a group name", what="groups"),
    ),
)  # fmt: skip

USERS = _list("users", "users to create", CLOUD_USER, what="users", check="users")

WRITE_FILE = Field(
    "file", "object", "a file to write", check="write_file",
    fields=(
        Field("path", "guest_dir", "where in the guest", required=True,
              missing="every file needs a path"),
        Field("content", "text", "its content", required=True,
              missing="every file needs a content"),
        Field("permissions", "string", "its mode", pattern=MODE,
              expected='an octal mode in quotes like "0644"'),
        Field("owner", "string", "its owner", pattern=OWNER, expected="USER or USER:GROUP"),
        _bool("append", "append to the file rather than replace it", False),
    ),
)  # fmt: skip

_COMMAND = Field(
    "command", "string", "a shell command line, or a list of arguments",
    short={"type": "array", "minItems": 1,
           "items": {"type": "string", "pattern": _TEXT}},
    pattern=r"\A[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*\Z",
    expected="a shell command", check="command",
)  # fmt: skip

CLOUD_INIT = Field(
    "cloud_init", "object", "first-boot configuration through a NoCloud seed",
    check="cloud_init",
    fields=(
        Field("hostname", "string", "the guest's host name", pattern=HOST_LABEL,
              expected="a host name", check="hostname", doc="1-63 letters, digits and `-`"),
        USERS,
        SSH_KEYS,
        PACKAGES,
        _list("write_files", "files to write", WRITE_FILE, what="files"),
        _list("runcmd", "commands to run on the first boot", _COMMAND, what="commands"),
        Field("user_data", "path", "a user-data file of yours, added as is"),
    ),
)  # fmt: skip

MEMORY = Field(
    "memory", "size", "guest RAM", "a whole number of KiB", default="512MiB", low=MIN_MEMORY,
    high=MAX_MEMORY,
)  # fmt: skip
DISKS = _list(
    "disks", "disks", DISK, what="disks", max_items=MAX_DISKS, check="disks",
    doc="the first is the boot disk (after the image's, with `image`); a path, or an object",
)  # fmt: skip
PORTS = _list(
    "ports", "host ports forwarded to guest ports", PORT, what="port forwards",
    max_items=MAX_PORTS, check="ports",
    doc='on user-mode networking: `"8080:80"`, `"127.0.0.1:8080:80"`, `"udp:5353:53"`, '
    'or an object (see "Working in a guest")',
)  # fmt: skip
SHARES = _list(
    "shares", "host folders mounted in the guest through virtio-fs", SHARE, what="shares",
    max_items=MAX_SHARES, check="shares",
)  # fmt: skip

BOOT = Field(
    "boot", "list", "boot order", check="boot", default_doc="the cdrom, then the disk",
    doc="from `cdrom`, `disk`, `network`; by default the cdrom first if there is one (like "
    "Ozone's `-boot d`), then the disk if there is one",
    of=Field("device", "choice", "a boot device", choices=BOOT_DEVICES),
    max_items=len(BOOT_DEVICES), what="boot devices",
    short={"type": "string", "enum": list(BOOT_DEVICES)}, json_extra={"minItems": 1},
)  # fmt: skip

TOP = (
    Field("name", "string", "the libvirt domain name", required=True,
          missing="every VM needs a name", hint='e.g. "name": "web"', pattern=NAME,
          expected="1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
          doc="1-64 letters, digits, `.`, `_`, `-`"),
    Field("description", "text", "free text, shown by virt-manager"),
    Field("host", "string", "the libvirt host the VM lives on", pattern=HOST_NAME,
          expected=f"a host name from the hosts file, or {AUTO_HOST!r}",
          default_doc="`-c`/`--host`, else `$LIBVIRT_DEFAULT_URI`",
          doc="a name from the hosts file (`~/.config/ozone/hosts.yaml`), or `auto`: the host "
          "with the most free memory that fits the VM, or the one it is defined on already "
          "(see \"Many hosts\"); `-c` and `--host` override it. Not part of the VM's "
          "definition: changing it moves nothing"),
    MEMORY,
    Field("vcpus", "integer", "virtual CPUs", default=1, low=1, high=MAX_VCPUS),
    Field("machine", "string", "the QEMU machine type", default="q35", pattern=MACHINE,
          expected="a QEMU machine type like q35 or pc",
          doc="checked against what the host's QEMU offers"),
    Field("accel", "choice", "the accelerator", default="auto", choices=ACCELS,
          doc="`auto` (KVM when libvirt reports it, else TCG), `kvm`, `tcg`; `OZONE_ACCEL` "
          "overrides it"),
    DISKS,
    Field("cdrom", "path", "an ISO attached as a SATA cdrom"),
    Field("kernel", "path", "a kernel for direct boot (no bootloader, no ISO needed)"),
    Field("initrd", "path", "the initrd for direct kernel boot", doc="needs `kernel`"),
    Field("cmdline", "text", "the kernel command line", doc="needs `kernel`"),
    IMAGE,
    CLOUD_INIT,
    BOOT,
    Field("serial_log", "path", "the file that receives the serial console",
          default_doc="libvirt's log folder",
          doc="by default `/var/log/libvirt/qemu/NAME-serial.log`"),
    _bool("agent", "the QEMU guest agent channel", True, "`org.qemu.guest_agent.0`"),
    NETWORK,
    QMP,
    Field("graphics", "choice", "graphics", default="none", choices=GRAPHICS,
          doc="`vnc` listens on 127.0.0.1"),
    Field("stage_dir", "guest_dir", "where `ozone exec` stages output in the guest",
          default_doc="`/var/tmp`", doc="while the program runs (see Safety)"),
    PORTS,
    SHARES,
)  # fmt: skip

_USER_NETWORK = {
    "anyOf": [{"const": "user"}, {"type": "object", "properties": {"type": {"const": "user"}}}]
}
CONFIG = Field(
    "config", "object", "ozone VM config",
    "one VM: a libvirt domain declared in JSON or YAML; relative paths are relative to the "
    "file's folder",
    fields=TOP,
    json_extra={
        # direct kernel boot: the initrd and command line go with a kernel
        "dependentRequired": {"initrd": ["kernel"], "cmdline": ["kernel"]},
        # ports are forwarded by QEMU's user networking: none on another network
        "if": {"required": ["network"], "properties": {"network": {"not": _USER_NETWORK}}},
        "then": {"properties": {"ports": {"maxItems": 0}}},
        # something to boot from (disks, then, not empty)
        "anyOf": [
            {"required": ["image"]},
            {"required": ["disks"], "properties": {"disks": {"minItems": 1}}},
            {"required": ["cdrom"]},
            {"required": ["kernel"]},
        ],
    },
)  # fmt: skip


# --- JSON Schema ---------------------------------------------------------------------------


def _kind_schema(f: Field) -> dict[str, Any]:
    """The JSON Schema of a field's value, without title and description."""
    if f.kind in ("string", "text"):
        pattern = _js(f.pattern) if f.pattern else _TEXT if f.kind == "text" else _LINE
        return {"type": "string", "pattern": pattern}
    if f.kind == "integer":
        return {"type": "integer", "minimum": f.low, "maximum": f.high}
    if f.kind == "boolean":
        return {"type": "boolean"}
    if f.kind == "choice":
        return {"type": "string", "enum": list(f.choices)}
    if f.kind == "size":
        assert f.low is not None and f.high is not None
        # numbers are MiB; the pattern applies to strings only, the bounds to numbers only
        return {
            "type": ["number", "string"],
            "minimum": -(-f.low // MiB),  # rounded up: never below the checker
            "maximum": f.high // MiB,
            "multipleOf": _EIGHTH,
            "pattern": _SIZE,
        }
    if f.kind == "path":
        return {"type": "string", "minLength": 1, "maxLength": MAX_PATH_CHARS, "pattern": _PATH}
    if f.kind == "guest_dir":
        return {"type": "string", "pattern": _GUEST_DIR}
    if f.kind == "list":
        assert f.of is not None
        items = _field_schema(f.of)
        out = {"type": "array", "items": items, "maxItems": f.max_items}
        return out | ({"uniqueItems": True} if f.of.kind == "choice" else {})
    properties = {sub.key: _field_schema(sub) for sub in f.fields}
    required = [sub.key for sub in f.fields if sub.required]
    return {
        "type": "object",
        "properties": properties,
        **({"required": required} if required else {}),
        "additionalProperties": False,
    }


def _field_schema(f: Field) -> dict[str, Any]:
    out: dict[str, Any] = {"title": f.title, "description": f.description}
    if f.default is not None:
        out["default"] = list(f.default) if isinstance(f.default, tuple) else f.default
    body = {k: v for k, v in _kind_schema(f).items() if v is not None} | dict(f.json_extra or {})
    return out | ({"anyOf": [f.short, body]} if f.short is not None else body)


def json_schema() -> dict[str, Any]:
    """The config's JSON Schema (draft 2020-12). What it accepts, the checker accepts too,
    but for what JSON Schema cannot say (tests/test_schema.py lists it): files and networks
    on the host, the range of a size written as a string, most rules relating two fields."""
    document = {"$schema": "https://json-schema.org/draft/2020-12/schema", **_field_schema(CONFIG)}
    return copy.deepcopy(document)  # the caller's own: it shares no dict with the table


# --- the README's config reference ---------------------------------------------------------

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
REGENERATE = "python -m ozone_libvirt.schema --update-readme README.md"


def _type_doc(f: Field) -> str:
    if f.kind == "choice":
        return " \\| ".join(f"`{c}`" for c in f.choices)
    if f.kind == "integer":
        return f"integer {f.low}-{f.high}"
    if f.kind == "size":
        assert f.low is not None and f.high is not None
        return f"size {format_size(f.low)}-{format_size(f.high)}"
    if f.kind == "list":
        assert f.of is not None
        return f"list of {_type_doc(f.of) if f.of.kind == 'choice' else f.what}"
    if f.kind == "object":
        return "string or object" if f.short is not None else "object"
    return {"guest_dir": "guest folder", "text": "text"}.get(f.kind, f.kind)


def _default_doc(f: Field) -> str:
    if f.required:
        return "required"
    if f.default_doc is not None:
        return f.default_doc
    if f.default is None:
        return "none"
    shown = f.default if isinstance(f.default, str) else json.dumps(f.default)
    return f"`{shown}`"


def _table(fields: tuple[Field, ...], prefix: str = "") -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in fields:
        meaning = f.description.replace("|", "\\|")  # not a column
        rows.append(f"| `{prefix}{f.key}` | {_type_doc(f)} | {_default_doc(f)} | {meaning} |")
    return rows


def sections(fields: tuple[Field, ...], path: str) -> list[tuple[str, Field]]:
    """The objects under ``fields``, depth first, with their field paths."""
    found: list[tuple[str, Field]] = []
    for f in fields:
        obj = f.of if f.of is not None else f
        if not obj.fields:
            continue
        where = f"{path}{f.key}" + ("[]" if f.kind == "list" else "")
        found.append((where, obj))
        found += sections(obj.fields, where + ".")
    return found


def reference_markdown() -> str:
    """The README's config reference, between its markers, generated from the table."""
    lines = [
        START,
        f"<!-- generated from ozone_libvirt/schema.py: do not edit; run `{REGENERATE}` -->",
        "",
        *_table(TOP),
    ]
    for where, obj in sections(TOP, ""):
        lines += ["", f"`{where}`: {obj.title}", "", *_table(obj.fields, where + ".")]
    return "\n".join([*lines, END])


def update_readme(text: str) -> str:
    """``text`` (a README) with its config reference regenerated."""
    before, start, rest = text.partition(START)
    _, end, after = rest.partition(END)
    if not start or not end:
        raise ValueError(f"no {START} ... {END} section")
    return before + reference_markdown() + after


def main(argv: list[str]) -> int:
    if argv[:1] == ["--markdown"]:
        print(reference_markdown())
    elif argv[:1] == ["--json"]:
        print(json.dumps(json_schema(), indent=2))
    elif argv[:1] == ["--update-readme"] and len(argv) == 2:
        path = Path(argv[1])
        path.write_text(update_readme(path.read_text()))
    else:
        print(
            "usage: python -m ozone_libvirt.schema --markdown | --json | --update-readme FILE",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
