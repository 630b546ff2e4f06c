"""VM config files: load (JSON or YAML), validate, normalise, find by name.

Pure: no libvirt, no side effects beyond reading the config file (and, in
:func:`check_host_paths`, looking at the files it names). Every error is a
:class:`~ozone_libvirt.errors.ConfigError` naming the file, the field path
(``disks[0].size``), what was expected and, for typos, the closest valid key.

Config files may be hostile or broken (a symlink to a system file, a YAML alias bomb, a
number with 5000 digits): every such file gives a one-line ConfigError, fast, and an error
never echoes more than a short excerpt of a value.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import ipaddress
import json
import math
import os
import posixpath
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from . import schema
from .completion import CONFIG_SUFFIXES, config_search_path
from .errors import ConfigError
from .metadata import Forward
from .schema import Field
from .units import format_size

if TYPE_CHECKING:
    import yaml


# The schema's table (schema.py) declares the keys, kinds, bounds and patterns; the checker
# compiles the patterns its own code uses. Patterns are anchored with \A...\Z and applied
# with fullmatch, never `$`, which also matches before a trailing newline.
NAME_RE = re.compile(schema.NAME)
SSH_KEY_RE = re.compile(schema.SSH_KEY)
USER_RE = re.compile(schema.USER)
_HOST_LABEL_RE = re.compile(schema.HOST_LABEL)
_PORT_RE = re.compile(r"\A[0-9]{1,5}\Z")
BOOT_DEVICES = schema.BOOT_DEVICES

# Bounds on the file itself, checked before anything else looks at its values. A VM config
# is a few hundred bytes, a few levels deep and a few hundred values (keys count too).
MAX_FILE_BYTES = 1024**2
MAX_DEPTH = 32
MAX_NODES = 10_000
MAX_NUMBER_CHARS = 40  # longer numbers would hit Python's int-digits limit or overflow
MAX_PATH_CHARS = schema.MAX_PATH_CHARS
EXCERPT_CHARS = 40  # errors show at most this much of a value

# libvirt's unit conventions: K/KiB = 1024, KB = 1000 (and so on up).
_UNITS = {
    "": 1024**2,  # a bare number is MiB
    "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}  # fmt: skip
_SIZE_RE = re.compile(r"\A *([0-9]{1,20}(?:\.[0-9]{1,20})?) *([A-Za-z]{0,3}) *\Z")

# Characters no config string may hold: those XML 1.0 cannot carry (C0 controls, lone
# surrogates, U+FFFE/U+FFFF; lxml refuses them when it builds the domain XML) and the other
# controls (DEL, C1). Free text (description, cmdline) may also hold tabs and line breaks.
_CONTROLS = "\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff"
_FORBIDDEN_IN_TEXT = re.compile(f"[{_CONTROLS}]")
_FORBIDDEN_IN_LINE = re.compile(f"[\t\n\r{_CONTROLS}]")

# the keys each level of a config takes
TOP_KEYS = schema.keys(schema.TOP)
DISK_KEYS = schema.keys(schema.DISK.fields)
IMAGE_KEYS = schema.keys(schema.IMAGE.fields)
CLOUD_INIT_KEYS = schema.keys(schema.CLOUD_INIT.fields)
CLOUD_USER_KEYS = schema.keys(schema.CLOUD_USER.fields)
WRITE_FILE_KEYS = schema.keys(schema.WRITE_FILE.fields)
NETWORK_KEYS = schema.keys(schema.NETWORK.fields)
QMP_KEYS = schema.keys(schema.QMP.fields)
PORT_KEYS = schema.keys(schema.PORT.fields)
SHARE_KEYS = schema.keys(schema.SHARE.fields)
MAX_LIST = schema.MAX_LIST

# QEMU runs as an unprivileged user: it cannot listen below Linux's default
# net.ipv4.ip_unprivileged_port_start
LOWEST_HOST_PORT = 1024
_SYSTEM_FOLDERS = frozenset(schema.SYSTEM_FOLDERS)
_GUEST_MOUNT_RE = re.compile(schema.GUEST_MOUNT)


@dataclass(frozen=True)
class Disk:
    path: Path
    size: int | None = None  # bytes; create the image when it is missing
    backing: Path | None = None
    format: str = "qcow2"
    bus: str = "virtio"
    readonly: bool = False


@dataclass(frozen=True)
class Image:
    """The VM's boot disk comes from ozone's image store: an image built from Debian packages
    (``debian``: a suite), or downloaded (``url`` with a checksum; ``name``: from the
    catalogue). The VM boots from a qcow2 overlay over it, ``size`` big when given."""

    debian: str | None = None
    packages: tuple[str, ...] = ()
    mirror: str | None = None
    url: str | None = None
    sha256: str | None = None
    sha512: str | None = None
    checksum_url: str | None = None
    name: str | None = None  # the catalogue name the url and checksum_url came from
    size: int | None = None


@dataclass(frozen=True)
class CloudUser:
    name: str
    ssh_authorized_keys: tuple[str, ...] = ()
    sudo: bool = False
    lock_passwd: bool = True
    shell: str | None = None
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class WriteFile:
    path: str
    content: str
    permissions: str | None = None
    owner: str | None = None
    append: bool = False


@dataclass(frozen=True)
class CloudInit:
    """What cloud-init does on the VM's first boot (a NoCloud seed ozone makes)."""

    hostname: str | None = None
    users: tuple[CloudUser, ...] = ()
    ssh_authorized_keys: tuple[str, ...] = ()  # for the image's default user
    packages: tuple[str, ...] = ()
    write_files: tuple[WriteFile, ...] = ()
    runcmd: tuple[str | tuple[str, ...], ...] = ()
    user_data: Path | None = None  # a user-data file of the user's, added as is


@dataclass(frozen=True)
class Network:
    type: Literal["user", "none", "network", "bridge"] = "user"
    source: str | None = None  # libvirt network name or host bridge
    model: str = "virtio"
    mac: str | None = None


@dataclass(frozen=True)
class PortForward:
    """A host port QEMU's user networking forwards to a guest port."""

    protocol: Literal["tcp", "udp"]
    host: str  # the host address QEMU listens on (127.0.0.1 unless allow_remote)
    port: int  # on the host
    guest: int  # in the guest
    allow_remote: bool = False

    @property
    def forward(self) -> Forward:
        return Forward(self.protocol, self.host, self.port, self.guest)


@dataclass(frozen=True)
class Share:
    """A host folder the guest mounts through virtio-fs."""

    host: Path
    guest: str  # the guest folder it is mounted on
    readonly: bool = False


@dataclass(frozen=True)
class Qmp:
    """Where the config asks QEMU to serve QMP: ``auto`` (a private unix socket of ozone's),
    ``off``, ``unix`` (its path), ``tcp`` (its host and port; port None: ozone picks a free
    loopback port at define). The concrete endpoint is a :class:`.metadata.QmpEndpoint`."""

    kind: Literal["auto", "off", "tcp", "unix"] = "auto"
    host: str | None = None
    port: int | None = None
    path: Path | None = None
    allow_remote: bool = False

    @property
    def endpoint(self) -> str:
        """The config's QMP setting as written in a config."""
        if self.kind == "tcp" and self.port is None:
            return "tcp"
        if self.kind == "tcp":
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        if self.kind == "unix":
            return f"unix:{self.path}"
        return self.kind


@dataclass(frozen=True)
class VMConfig:
    name: str
    memory: int  # bytes
    vcpus: int = 1
    machine: str = "q35"
    accel: str = "auto"
    disks: tuple[Disk, ...] = ()
    cdrom: Path | None = None
    boot: tuple[str, ...] = ()
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    serial_log: Path | None = None  # None: a per-VM log in libvirt's log directory
    agent: bool = True
    network: Network = field(default_factory=Network)
    qmp: Qmp = field(default_factory=Qmp)
    graphics: str = "none"
    description: str | None = None
    stage_dir: str | None = None  # guest folder for `ozone exec` output (None: ozone's default)
    image: Image | None = None
    cloud_init: CloudInit | None = None
    ports: tuple[PortForward, ...] = ()
    shares: tuple[Share, ...] = ()
    source: Path | None = None  # the file this config came from
    # the inventory host it lives on, or "auto": where the VM is, not what it is, so left
    # out of the normalised config (its digest and record): changing it moves nothing
    host: str | None = None

    @property
    def uses_cloud_init(self) -> bool:
        """The VM gets a cloud-init seed: for its ``cloud_init`` section, or to install the
        guest agent in a downloaded cloud image (which lacks it)."""
        return self.cloud_init is not None or (self.image is not None and not self.image.debian)

    def to_dict(self) -> dict[str, Any]:
        """The normalised config as plain JSON data (absolute paths, sizes in bytes), without
        where it came from and where it lives (``source``, ``host``)."""

        def conv(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, tuple):
                return [conv(v) for v in value]
            if hasattr(value, "__dataclass_fields__"):
                return {k: conv(getattr(value, k)) for k in value.__dataclass_fields__}
            return value

        data: dict[str, Any] = conv(self)
        del data["source"], data["host"]
        return data

    @property
    def hash(self) -> str:
        """A stable digest of the normalised config (not of the file's formatting)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


# --- showing values in errors --------------------------------------------------------------


def _show(value: object) -> str:
    """A value as an error message may show it: a string quoted, escaped and cut to a short
    excerpt (a config can be a symlink to a file its reader should not see); anything else
    as :func:`_describe` puts it."""
    if not isinstance(value, str):
        return _describe(value)
    cut = repr(value[:EXCERPT_CHARS])
    return cut + "..." if len(value) > EXCERPT_CHARS else cut


def _kind(value: object) -> str:
    """The type of a value in the config's terms, without its content."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _describe(value: object) -> str:
    """What a value is, for "expected X, got Y"."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int) and abs(value) >= 10**18:
        return "a number too large to show"  # str() refuses past 4300 digits
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {_show(value)}"
    return _kind(value)


def _label(key: object) -> str:
    """A key as it appears in a field path (``disks[0].KEY``): as is when it is short and
    printable, else shown like a value, so a field path is always one short line."""
    if isinstance(key, str) and key.isprintable() and 0 < len(key) <= EXCERPT_CHARS:
        return key
    return _show(key)


def _file_name(path: Path | str | None) -> str | None:
    """The config file's name for error messages (escaped if it holds control characters)."""
    if path is None:
        return None
    text = str(path)
    return text if text.isprintable() else repr(text)


def _one_line(text: str, limit: int = 80) -> str:
    """A parser's message made one short line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _forbidden_char(text: str, *, multiline: bool) -> str | None:
    """Why ``text`` cannot be a config string, or None: the one check every string takes."""
    found = (_FORBIDDEN_IN_TEXT if multiline else _FORBIDDEN_IN_LINE).search(text)
    if found is None:
        return None
    char = found.group()
    where = f"U+{ord(char):04X} at character {found.start() + 1}"
    if char in "\t\n\r":
        return f"contains a line break or tab ({where}); this value must be one line"
    if "\ud800" <= char <= "\udfff":
        return f"contains a lone surrogate ({where}), which is not a character"
    if char in "\ufffe\uffff":
        return f"contains the non-character {where}"
    return f"contains the control character {where}"


# --- sizes ---------------------------------------------------------------------------------


def parse_size(value: object, *, where: str, file: str | None = None) -> int:
    """Parse ``512``, ``"512MiB"``, ``"2G"``, ``"1.5GiB"`` into bytes (bare numbers are MiB)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(
            f"expected a size like 512MiB or 2GiB, got {_describe(value)}", file=file, field=where
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"expected a size, got {_describe(value)}", file=file, field=where)
    if not isinstance(value, str):
        numerator, denominator = value.as_integer_ratio()  # exact: no rounding, no overflow
        return _whole_bytes(numerator * _UNITS[""], denominator, value, where, file)
    m = _SIZE_RE.fullmatch(value)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ConfigError(
            f"{_show(value)} is not a size; use a number of MiB or a number with a unit "
            "(B, KiB, MiB, GiB, TiB; KB, MB, GB are powers of 1000)",
            file=file,
            field=where,
        )
    whole, _, fraction = m.group(1).partition(".")
    numerator = int(whole + fraction) * _UNITS[unit]
    return _whole_bytes(numerator, 10 ** len(fraction), value, where, file)


def _whole_bytes(
    numerator: int, denominator: int, value: object, where: str, file: str | None
) -> int:
    """numerator / denominator bytes, which must be a whole number ("1.1MiB" is not)."""
    size, rest = divmod(numerator, denominator)
    if rest:
        raise ConfigError(
            f"{_show(value) if isinstance(value, str) else _describe(value)} is not a whole "
            f"number of bytes (about {size} and a fraction)",
            file=file,
            field=where,
            hint='give it in a smaller unit, e.g. "1126KiB" rather than "1.1MiB"',
        )
    return size


# --- reading files -------------------------------------------------------------------------


def load_config(path: str | Path) -> VMConfig:
    """Read and validate one config file (``.json``, ``.yaml`` or ``.yml``)."""
    path = Path(path).expanduser().absolute()
    data = read_config_data(path)
    return parse_config(data, source=path)


def read_config_data(path: Path) -> Any:
    shown = _file_name(path)
    if path.suffix not in CONFIG_SUFFIXES:
        raise ConfigError(
            "unknown config file type",
            file=shown,
            hint="name the file NAME.json, NAME.yaml or NAME.yml",
        )
    text = _read_text(path, shown)
    if path.suffix == ".json":
        return _parse_json(text, shown)
    return _parse_yaml(text, shown)


def _read_text(path: Path, shown: str | None) -> str:
    """The file's text: a regular file of at most MAX_FILE_BYTES of UTF-8. Refused before
    reading: a FIFO (would block), a device like /dev/zero (endless), anything huge."""
    try:
        # O_NONBLOCK: opening a FIFO does not wait for a writer (the fstat below refuses it)
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError("no such file", file=shown) from None
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror}", file=shown) from None
    except ValueError:  # a NUL in the path
        raise ConfigError("cannot read: not a valid path", file=shown) from None
    too_big = f"bigger than {format_size(MAX_FILE_BYTES)}; a VM config is a few hundred bytes"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError("not a regular file", file=shown)
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigError(too_big, file=shown)
        data = b""
        while len(data) <= MAX_FILE_BYTES:  # the file may have grown since the fstat
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror}", file=shown) from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(too_big, file=shown)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"byte {err.start + 1} is not UTF-8: {err.reason}", file=shown) from None


class _Shape:
    """The one place that bounds a document's shape: nesting depth, the number of values
    (keys count, and so do the values an alias repeats) and the length of numbers. Fed by
    the JSON pre-scan and by the YAML composer, before any value is constructed, so nothing
    downstream (construction, validation, hashing, error messages) meets a huge document."""

    def __init__(self, shown: str | None, locate: Callable[[Any], str]) -> None:
        self.shown = shown
        self.locate = locate  # a position in the document → "line L, column C: "
        self.depth = 0
        self.values = 0

    def fail(self, at: object, message: str) -> ConfigError:
        return ConfigError(self.locate(at) + message, file=self.shown)

    def enter(self, at: object) -> None:
        self.depth += 1
        self.nested(self.depth, at)

    def nested(self, depth: int, at: object) -> None:
        if depth > MAX_DEPTH:
            raise self.fail(at, f"nested more than {MAX_DEPTH} levels deep")

    def leave(self) -> None:
        self.depth = max(self.depth - 1, 0)

    def add(self, values: int, at: object) -> None:
        """Count values as they are read, so a long list is refused as soon as it is long."""
        self.values += values
        if self.values > MAX_NODES:
            raise self.fail(
                at,
                f"more than {MAX_NODES} values (counting what aliases repeat); "
                "a VM config has a few hundred",
            )

    def number(self, text: str, at: object) -> None:
        if len(text) > MAX_NUMBER_CHARS:
            raise self.fail(at, f"a number of {len(text)} characters (at most {MAX_NUMBER_CHARS})")


def _position(text: str, offset: int) -> str:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return f"line {line}, column {column}: "


# JSON tokens for the shape pre-scan: a string (the closing quote optional, so an unterminated
# string ends the scan instead of making it rescan: linear time), a bracket, or a bare value.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]+|\\.)*"?|[\[{]|[\]}]|[^\s\[\]{}",:]+', re.DOTALL)


def _parse_json(text: str, shown: str | None) -> Any:
    # The json module recurses per level and converts numbers of any length: bound the shape
    # first (a 100000-deep list would raise RecursionError, 5000 digits ValueError).
    shape = _Shape(shown, functools.partial(_position, text))
    for token in _JSON_TOKEN.finditer(text):
        first, at = token.group()[0], token.start()
        if first in "]}":
            shape.leave()
            continue
        shape.add(1, at)
        if first in "[{":
            shape.enter(at)
        elif first in "-0123456789":
            shape.number(token.group(), at)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise ConfigError(f"invalid JSON: duplicate key {_show(key)}", file=shown)
            result[key] = value
        return result

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"line {err.lineno}, column {err.colno}: invalid JSON: {err.msg}", file=shown
        ) from None


def _yaml_where(mark: yaml.error.Mark | None) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""


def _parse_yaml(text: str, shown: str | None) -> Any:
    import yaml

    try:
        loader = _yaml_loader()(text, _Shape(shown, _yaml_where))  # checks the characters first
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = _one_line(err.problem or err.context or "syntax error")
        raise ConfigError(f"{_yaml_where(mark)}invalid YAML: {problem}", file=shown) from None
    except yaml.reader.ReaderError as err:
        raise ConfigError(
            f"{_position(text, err.position)}invalid YAML: {err.reason} (U+{err.character:04X})",
            file=shown,
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML: {_one_line(str(err))}", file=shown) from None


@functools.cache
def _yaml_loader() -> type[Any]:
    """PyYAML's safe loader, made safe for hostile documents (built on first use: commands
    that read no YAML do not import yaml)."""
    import yaml
    from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

    prefix = "tag:yaml.org,2002:"
    # The tags a VM config uses; `!!binary`, `!!set`, `!!timestamp`, `!!python/…` and local
    # tags are refused with their line. Plain scalars resolve only to these, so `2024-01-01`
    # and `=` stay strings, as they are in JSON.
    scalar_tags = {prefix + t for t in ("str", "int", "float", "bool", "null", "merge")}
    allowed = {
        ScalarNode: scalar_tags,
        SequenceNode: {prefix + "seq"},
        MappingNode: {prefix + "map"},
    }

    class Loader(yaml.SafeLoader):
        def __init__(self, stream: str, shape: _Shape) -> None:
            super().__init__(stream)
            self.shape = shape
            # id(node) → (values in it, levels it nests), what its aliases repeat included
            self.expanded: dict[int, tuple[int, int]] = {}

        def compose_node(self, parent: Node | None, index: int) -> Node | None:
            # Aliases are allowed, but what they repeat counts: values are counted as they
            # are composed, an alias adding the size of the node it repeats, and a node nests
            # as deep as what its aliases repeat (each node's size and depth are computed
            # once, from its children's). So a "billion laughs" document is refused within
            # MAX_NODES steps, and a chain of aliases cannot nest deeper than MAX_DEPTH (the
            # constructor recurses through aliases, and `<<` merges reorder it). Refusing
            # aliases outright would be as safe; the bounds cost as little and keep valid
            # YAML valid.
            event = self.peek_event()  # type: ignore[no-untyped-call]
            where = event.start_mark
            if isinstance(event, yaml.AliasEvent):
                node = super().compose_node(parent, index)
                if id(node) not in self.expanded:  # its anchor is still being composed
                    raise self.shape.fail(where, f"alias *{_label(event.anchor)} contains itself")
                self.shape.add(self.expanded[id(node)][0], where)
                return node
            self.shape.add(1, where)
            self.shape.enter(where)
            node = super().compose_node(parent, index)
            self.shape.leave()
            if node is None:
                return None
            if node.tag not in allowed[type(node)]:
                tag = _show(node.tag.replace(prefix, "!!"))
                raise self.shape.fail(
                    where,
                    f"the tag {tag} is not allowed here (a config holds only strings, "
                    "numbers, booleans, null, lists and objects)",
                )
            if isinstance(node, ScalarNode) and node.tag in (prefix + "int", prefix + "float"):
                self.shape.number(node.value, where)
            children: list[Node] = []
            if isinstance(node, SequenceNode):
                children = node.value
            elif isinstance(node, MappingNode):
                children = [n for pair in node.value for n in pair]
            below = [self.expanded[id(child)] for child in children]
            depth = 1 + max((levels for _, levels in below), default=0)
            self.shape.nested(depth, where)
            self.expanded[id(node)] = (1 + sum(values for values, _ in below), depth)
            return node

    def construct_mapping(loader: Loader, node: MappingNode) -> dict[str, Any]:
        loader.flatten_mapping(node)  # `<<` merge keys; a tag that is not !!map never gets here
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            where = key_node.start_mark
            if not isinstance(key_node, ScalarNode):
                raise loader.shape.fail(where, "a key must be a name, not a list or an object")
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise loader.shape.fail(where, f"a key must be a name, got {_describe(key)}")
            if key in result:
                raise loader.shape.fail(where, f"duplicate key {_show(key)}")
            result[key] = loader.construct_object(value_node, deep=True)
        return result

    def checked(construct: Any) -> Any:
        """A scalar constructor whose conversion errors are YAML errors with a line."""

        def run(loader: Loader, node: Node) -> Any:
            try:
                return construct(loader, node)
            except (ValueError, LookupError, ArithmeticError):
                kind = node.tag.rpartition(":")[2]
                raise yaml.constructor.ConstructorError(
                    None, None, f"{_show(node.value)} is not a valid {kind}", node.start_mark
                ) from None

        return run

    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag in scalar_tags]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_constructor(prefix + "map", construct_mapping)
    for tag in ("int", "float", "bool"):
        Loader.add_constructor(
            prefix + tag, checked(yaml.SafeLoader.yaml_constructors[prefix + tag])
        )
    return Loader


# --- validation ----------------------------------------------------------------------------


class _Checker:
    """Validates one config document; knows the file name and the base directory.

    What each level of a config takes (keys, kinds, bounds, patterns, defaults) comes from
    the table in :mod:`.schema`; the methods the table names check shorthands and the rules
    that relate fields, and :meth:`relations` those that relate sections."""

    def __init__(self, source: Path | None) -> None:
        self.source = source
        self.file = _file_name(source)
        self.base = source.parent if source else Path.cwd()

    def fail(self, where: str, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(message, file=self.file, field=where, hint=hint)

    def keys(self, data: Mapping[object, Any], allowed: tuple[str, ...], where: str) -> None:
        for key in data:
            if key in allowed:
                continue
            path = f"{where}.{_label(key)}" if where else _label(key)
            close = []
            if isinstance(key, str) and len(key) <= 64:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else "valid keys: " + ", ".join(allowed)
            raise self.fail(path, f"unknown key {_show(key)}", hint)

    def mapping(self, value: object, where: str) -> Mapping[object, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected an object, got {_describe(value)}")
        return value

    def string(
        self,
        value: object,
        where: str,
        *,
        pattern: re.Pattern[str] | None = None,
        expected: str | None = None,
        multiline: bool = False,
    ) -> str:
        """Every string a config takes comes through here: one check of its characters."""
        if not isinstance(value, str):
            raise self.fail(where, f"expected {expected or 'a string'}, got {_describe(value)}")
        problem = _forbidden_char(value, multiline=multiline)
        if problem:
            raise self.fail(where, problem)
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(where, f"{_show(value)} is not valid; expected {expected}")
        return value

    def choice(self, value: object, where: str, choices: tuple[str, ...]) -> str:
        if isinstance(value, str) and value in choices:
            return value
        close = []
        if isinstance(value, str) and len(value) <= 64:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else None
        expected = "one of " + ", ".join(choices)
        raise self.fail(where, f"expected {expected}, got {_describe(value)}", hint)

    def integer(self, value: object, where: str, *, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"expected a whole number, got {_describe(value)}")
        if not low <= value <= high:
            raise self.fail(where, f"must be between {low} and {high}, got {_describe(value)}")
        return value

    def boolean(self, value: object, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"expected true or false, got {_describe(value)}")
        return value

    def path_text(self, value: object, where: str, expected: str) -> str:
        text = self.string(value, where, expected=expected)
        if not text.strip():
            raise self.fail(where, f"expected {expected}, got an empty string")
        if len(text) > MAX_PATH_CHARS:
            raise self.fail(where, f"a path of {len(text)} characters (at most {MAX_PATH_CHARS})")
        return text

    def path(self, value: object, where: str) -> Path:
        """A host file: ``~`` expanded, relative to the config's folder, normalised."""
        text = self.path_text(value, where, "a file path")
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # ~user of a user this host does not have
            raise self.fail(where, f"{_show(text)} names a user this host does not have") from None
        if not path.is_absolute():
            path = self.base / path
        return Path(os.path.normpath(path))

    def guest_dir(self, value: object, where: str) -> str:
        """A folder in the guest: absolute, normalised, not the root."""
        expected = "an absolute guest folder like /var/tmp"
        text = self.path_text(value, where, expected)
        if not text.startswith("/"):
            raise self.fail(where, f"{_show(text)} is not absolute; expected {expected}")
        folder = "/" + posixpath.normpath(text).lstrip("/")  # normpath keeps a leading "//"
        if folder == "/":
            raise self.fail(where, f"must not be / itself; expected {expected}")
        return folder

    def size(self, value: object, where: str, *, low: int, high: int) -> int:
        size = parse_size(value, where=where, file=self.file)
        if not low <= size <= high:
            raise self.fail(
                where,
                f"must be between {format_size(low)} and {format_size(high)}, "
                f"got {_describe(value)}",
            )
        return size

    # --- the schema's table --------------------------------------------------------------

    def value(self, f: Field, value: object, where: str) -> Any:
        """A value checked as the table says: a simple kind here, the rest by its method."""
        if f.check is not None:
            return getattr(self, f.check)(value, where)
        match f.kind:
            case "string":
                pattern = re.compile(f.pattern) if f.pattern else None
                return self.string(value, where, pattern=pattern, expected=f.expected)
            case "text":
                return self.string(value, where, multiline=True)
            case "boolean":
                return self.boolean(value, where)
            case "choice":
                return self.choice(value, where, f.choices)
            case "path":
                return self.path(value, where)
            case "guest_dir":
                return self.guest_dir(value, where)
            case "integer" | "size" if f.low is not None and f.high is not None:
                check = self.integer if f.kind == "integer" else self.size
                return check(value, where, low=f.low, high=f.high)
            case "list":
                return self.each(f, value, where)
        raise AssertionError(f"the table gives {f.key!r} no check")

    def each(self, f: Field, value: object, where: str) -> tuple[Any, ...]:
        """A list's items, each checked as the table says."""
        assert f.of is not None
        items = self.items(value, where, f.what, f.max_items or MAX_LIST)
        return tuple(self.value(f.of, v, f"{where}[{i}]") for i, v in enumerate(items))

    def section(self, value: object, fields: tuple[Field, ...], where: str) -> dict[str, Any]:
        """An object's values as the table says: unknown keys refused (with the closest
        valid key), required ones there. Absent keys are left to the dataclass's defaults."""
        data = self.mapping(value, where)
        self.keys(data, schema.keys(fields), where)
        for f in fields:
            if f.required and f.key not in data:
                raise self.fail(_join(where, f.key), f"missing; {f.missing}", f.hint)
        return {
            f.key: self.value(f, data[f.key], _join(where, f.key)) for f in fields if f.key in data
        }

    def sub(self, section: Field, data: Mapping[object, Any], key: str, where: str) -> Any:
        """``data[key]`` checked as the table says for that key of ``section``."""
        return self.value(schema.field(section, key), data[key], f"{where}.{key}")

    def once_each(
        self, values: list[Any], where: str, key: str, repeated: Callable[[Any, int], str]
    ) -> None:
        """Each of ``values`` (the ``key`` of each item of the list at ``where``) once: a
        repeat fails, saying ``repeated(value, index of its first place)``."""
        first: dict[Any, int] = {}
        for i, value in enumerate(values):
            if value in first:
                raise self.fail(f"{where}[{i}].{key}", repeated(value, first[value]))
            first[value] = i

    def items(self, value: object, where: str, what: str, limit: int = MAX_LIST) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, f"expected a list of {what}, got {_describe(value)}")
        if len(value) > limit:
            raise self.fail(where, f"at most {limit} {what}")
        return value

    # --- sections ------------------------------------------------------------------------

    def disks(self, value: object, where: str) -> tuple[Disk, ...]:
        disks: tuple[Disk, ...] = self.each(schema.DISKS, value, where)
        paths = [disk.path for disk in disks]
        self.once_each(paths, where, "path", lambda _, j: f"the same image as disks[{j}]")
        return disks

    def disk(self, value: object, where: str) -> Disk:
        if isinstance(value, str):
            value = {"path": value}
        values = self.section(value, schema.DISK.fields, where)
        if "backing" in values and values.get("format", "qcow2") != "qcow2":
            raise self.fail(f"{where}.backing", "a backing image needs format qcow2")
        return Disk(**values)

    def network(self, value: object, where: str) -> Network:
        if isinstance(value, str):
            kind_text, _, source_text = value.partition(":")
            value = (
                {"type": kind_text, "source": source_text} if source_text else {"type": kind_text}
            )
        values = self.section(value, schema.NETWORK.fields, where)
        kind = values.get("type", "user")
        if kind in ("network", "bridge") and "source" not in values:
            example = "default" if kind == "network" else "br0"
            raise self.fail(
                f"{where}.source",
                f"missing; a {kind} network needs its name",
                hint=f'e.g. "network": "{kind}:{example}"',
            )
        if kind in ("user", "none") and "source" in values:
            raise self.fail(f"{where}.source", f"a {kind} network takes no source")
        if "mac" in values:
            values["mac"] = values["mac"].lower()
        return Network(**values)

    def qmp(self, value: object, where: str) -> Qmp:
        if isinstance(value, str) or value is None or isinstance(value, bool):
            value = {"endpoint": value}
        data = self.mapping(value, where)
        self.keys(data, QMP_KEYS, where)
        allow_remote = self.boolean(data.get("allow_remote", False), f"{where}.allow_remote")
        ep_where = f"{where}.endpoint" if "allow_remote" in data else where
        endpoint = data.get("endpoint", "auto")
        if endpoint is False or endpoint is None:
            endpoint = "off"
        text = self.string(
            endpoint,
            ep_where,
            expected='"auto", "off", "tcp", "tcp:127.0.0.1:PORT" or "unix:/PATH"',
        )
        if text in ("auto", "off"):
            return Qmp(kind=text, allow_remote=allow_remote)  # type: ignore[arg-type]
        if text == "tcp":  # a loopback port of ozone's choosing
            return Qmp(kind="tcp", host="127.0.0.1", port=None, allow_remote=allow_remote)
        if text.startswith("unix:"):
            path = self.path(text[5:], ep_where)
            if "," in str(path):
                # QEMU reads `-qmp unix:PATH,server=on` as options split at commas: a comma
                # in PATH would smuggle in options of the config's choosing
                raise self.fail(
                    ep_where,
                    f"the socket path {_show(str(path))} contains a comma, which QEMU would "
                    "read as the start of another option",
                    hint="use a folder and file name without commas",
                )
            return Qmp(kind="unix", path=path, allow_remote=allow_remote)
        if text.startswith("tcp:"):
            return self.qmp_tcp(text, ep_where, allow_remote=allow_remote)
        raise self.fail(
            ep_where,
            f'{_show(text)} is not a QMP endpoint; expected "auto", "off", "tcp", '
            '"tcp:127.0.0.1:PORT" or "unix:/PATH"',
        )

    def qmp_tcp(self, text: str, where: str, *, allow_remote: bool) -> Qmp:
        host, sep, port_text = text[4:].rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not _PORT_RE.fullmatch(port_text) or not _is_host(host):
            raise self.fail(
                where,
                f"{_show(text)} is not an endpoint; expected tcp:HOST:PORT with HOST an IP "
                "address or a host name",
            )
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise self.fail(where, f"port {port} is out of range 1-65535")
        if not allow_remote and not _is_loopback(host):
            raise self.fail(
                where,
                f"QMP on {host} would be reachable from other machines, and QMP has no "
                "authentication (anyone who reaches it controls the VM)",
                hint='bind it to 127.0.0.1, or set "qmp": {"endpoint": "...", '
                '"allow_remote": true} if you really mean it',
            )
        return Qmp(kind="tcp", host=host, port=port, allow_remote=allow_remote)

    def port(self, value: object, where: str) -> PortForward:
        """``[tcp:|udp:][ADDRESS:]HOSTPORT:GUESTPORT``, or ``{"forward": that,
        "allow_remote": true}`` for an address beyond loopback."""
        allow_remote = False
        if isinstance(value, dict):
            data = self.mapping(value, where)
            self.keys(data, PORT_KEYS, where)
            if "forward" not in data:
                raise self.fail(
                    f"{where}.forward", 'missing; e.g. {"forward": "0.0.0.0:8080:80", ...}'
                )
            allow_remote = self.boolean(data.get("allow_remote", False), f"{where}.allow_remote")
            where, value = f"{where}.forward", data["forward"]
        if isinstance(value, int) and not isinstance(value, bool):
            value = f"{value}:{value}"
        expected = '"HOSTPORT:GUESTPORT", "127.0.0.1:8080:80" or "udp:5353:53"'
        text = self.string(value, where, expected=expected)
        if text.startswith("["):
            raise self.fail(
                where,
                f"{_show(text)}: QEMU's user networking forwards from IPv4 addresses only",
                hint='e.g. "127.0.0.1:8080:80"',
            )
        parts = text.split(":")
        protocol = "tcp"
        if parts[0] in ("tcp", "udp"):
            protocol = parts.pop(0)
        elif parts[0].isalpha() and parts[0] != "localhost":
            raise self.fail(where, f"protocol {_show(parts[0])} is not tcp or udp")
        host = parts.pop(0) if len(parts) == 3 else "127.0.0.1"
        if len(parts) != 2 or not all(_PORT_RE.fullmatch(p) for p in parts):
            raise self.fail(where, f"{_show(text)} is not a port forward; expected {expected}")
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            raise self.fail(
                where,
                f"{_show(host)} is not an IPv4 address (QEMU's user networking forwards "
                "from IPv4 addresses)",
                hint='e.g. "127.0.0.1:8080:80"',
            ) from None
        port, guest = (int(p) for p in parts)
        if not LOWEST_HOST_PORT <= port <= 65535:
            raise self.fail(
                where,
                f"host port {port} is out of range {LOWEST_HOST_PORT}-65535 (QEMU runs as an "
                "unprivileged user and cannot listen below 1024)",
                hint=f'forward a high port instead, e.g. "{8000 + guest % 1000}:{guest}"',
            )
        if not 1 <= guest <= 65535:
            raise self.fail(where, f"guest port {guest} is out of range 1-65535")
        if not allow_remote and not address.is_loopback:
            raise self.fail(
                where,
                f"a forward from {host} is reachable from other machines",
                hint=f'use 127.0.0.1, or {{"forward": "{text}", "allow_remote": true}} if you '
                "really mean it",
            )
        return PortForward(protocol, str(address), port, guest, allow_remote)  # type: ignore[arg-type]

    def ports(self, value: object, where: str) -> tuple[PortForward, ...]:
        forwards: tuple[PortForward, ...] = self.each(schema.PORTS, value, where)
        for i, fwd in enumerate(forwards):
            for j, earlier in enumerate(forwards[:i]):
                if fwd.forward.overlaps(earlier.forward):
                    raise self.fail(
                        f"{where}[{i}]",
                        f"host port {fwd.port}/{fwd.protocol} is already forwarded by ports[{j}]",
                        hint="each host port forwards to one guest port",
                    )
        return forwards

    def share(self, value: object, where: str) -> Share:
        data = self.mapping(value, where)
        self.keys(data, SHARE_KEYS, where)
        for key in ("host", "guest"):
            if key not in data:
                raise self.fail(
                    f"{where}.{key}",
                    "missing; e.g. {host: ./src, guest: /srv/src, readonly: true}",
                )
        raw = data["guest"]
        if isinstance(raw, str) and ".." in raw.split("/"):
            raise self.fail(f"{where}.guest", f"{_show(raw)}: no '..' in a share's guest folder")
        guest = self.guest_dir(raw, f"{where}.guest")
        if len(guest) > 255:
            raise self.fail(f"{where}.guest", "a guest folder of at most 255 characters")
        if not _GUEST_MOUNT_RE.fullmatch(guest) or guest.split("/")[1] == ".":
            raise self.fail(
                f"{where}.guest",
                f"{_show(guest)}: a share's guest folder may hold letters, digits and "
                "'_.@+-' in each part",
                hint="e.g. /srv/site",
            )
        top = "/" + guest.split("/")[1]
        if guest in _SYSTEM_FOLDERS or top in ("/proc", "/sys", "/dev"):
            raise self.fail(
                f"{where}.guest",
                f"{guest} is a system folder: the share would hide it in the guest at every boot",
                hint="mount it somewhere of its own, e.g. /srv/NAME or /mnt/NAME",
            )
        host = self.path(data["host"], f"{where}.host")
        if "," in str(host):
            raise self.fail(
                f"{where}.host",
                f"{_show(str(host))} contains a comma, which virtiofsd would read as the start "
                "of another option",
                hint="share a folder whose path has no comma",
            )
        return Share(
            host=host,
            guest=guest,
            readonly=self.boolean(data.get("readonly", False), f"{where}.readonly"),
        )

    def shares(self, value: object, where: str) -> tuple[Share, ...]:
        shares: tuple[Share, ...] = self.each(schema.SHARES, value, where)
        self.once_each(
            [share.guest for share in shares],
            where,
            "guest",
            lambda guest, j: f"{guest} is already shares[{j}]'s folder",
        )
        return shares

    def packages(self, value: object, where: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.each(schema.PACKAGES, value, where)))

    def image(self, value: object, where: str) -> Image:
        from .catalogue import CATALOGUE

        if isinstance(value, str):
            value = {"name": value}
        data = self.mapping(value, where)
        self.keys(data, IMAGE_KEYS, where)
        kinds = [k for k in ("debian", "url", "name") if k in data]
        if len(kinds) != 1:
            raise self.fail(
                where,
                "needs exactly one of debian, url or name"
                + (f" (got {', '.join(kinds)})" if kinds else ""),
                hint='e.g. "image": {"debian": "bookworm"}, "image": "debian-12" or '
                '"image": {"url": "https://...", "sha512": "..."}',
            )
        image = schema.IMAGE
        opt: dict[str, Any] = {}
        if "size" in data:
            opt["size"] = self.sub(image, data, "size", where)
        if "debian" in data:
            for key in ("sha256", "sha512", "checksum_url"):
                if key in data:
                    raise self.fail(
                        f"{where}.{key}", "an image built from packages takes no checksum"
                    )
            suite = self.sub(image, data, "debian", where)
            for key in ("packages", "mirror"):
                if key in data:
                    opt[key] = self.sub(image, data, key, where)
            return Image(debian=suite, **opt)
        for key in ("packages", "mirror"):
            if key in data:
                raise self.fail(
                    f"{where}.{key}", "only an image built from packages (debian) takes it"
                )
        if "name" in data:
            name_where = f"{where}.name" if isinstance(value, dict) and len(data) > 1 else where
            name = self.value(schema.field(image, "name"), data["name"], name_where)
            for key in ("url", "sha256", "sha512", "checksum_url"):
                if key in data:
                    raise self.fail(
                        f"{where}.{key}", f"{name} comes from the catalogue, which gives its {key}"
                    )
            entry = CATALOGUE[name]
            return Image(name=name, url=entry.url, checksum_url=entry.checksum_url, **opt)
        url = self.sub(image, data, "url", where)
        sums = [k for k in ("sha256", "sha512", "checksum_url") if k in data]
        if len(sums) != 1:
            raise self.fail(
                where,
                "a downloaded image needs exactly one of sha256, sha512 or checksum_url"
                + (f" (got {', '.join(sums)})" if sums else ""),
                hint="ozone verifies every download before it enters the image store",
            )
        key = sums[0]
        checksum = self.sub(image, data, key, where)
        opt[key] = checksum if key == "checksum_url" else checksum.lower()
        return Image(url=url, **opt)

    def one_line(self, value: object, where: str, expected: str) -> str:
        text = self.string(value, where, expected=expected)
        if not text.strip():
            raise self.fail(where, f"expected {expected}, got an empty string")
        return text

    def ssh_keys(self, value: object, where: str) -> tuple[str, ...]:
        return tuple(key.strip() for key in self.each(schema.SSH_KEYS, value, where))

    def users(self, value: object, where: str) -> tuple[CloudUser, ...]:
        users: tuple[CloudUser, ...] = self.each(schema.USERS, value, where)
        names = [user.name for user in users]
        self.once_each(names, where, "name", lambda name, _: f"{name!r} is listed twice")
        return users

    def cloud_user(self, value: object, where: str) -> CloudUser:
        if isinstance(value, str):
            value = {"name": value}
        return CloudUser(**self.section(value, schema.CLOUD_USER.fields, where))

    def write_file(self, value: object, where: str) -> WriteFile:
        values = self.section(value, schema.WRITE_FILE.fields, where)
        if "permissions" in values:
            values["permissions"] = values["permissions"].rjust(4, "0")
        return WriteFile(**values)

    def command(self, value: object, where: str) -> str | tuple[str, ...]:
        if isinstance(value, str):
            return self.one_line(value, where, "a shell command")  # one line: YAML-safe
        args = self.items(value, where, "arguments")
        if not args:
            raise self.fail(where, "an empty command")
        return tuple(
            self.string(a, f"{where}[{i}]", expected="an argument (a string)")
            for i, a in enumerate(args)
        )

    def hostname(self, value: object, where: str) -> str:
        host = self.string(value, where, expected="a host name")
        if len(host) > 63 or not _HOST_LABEL_RE.fullmatch(host):
            raise self.fail(
                where, f"{_show(host)} is not a host name; expected 1-63 letters, digits and '-'"
            )
        return host

    def cloud_init(self, value: object, where: str) -> CloudInit:
        return CloudInit(**self.section(value, schema.CLOUD_INIT.fields, where))

    def config(self, raw: object) -> VMConfig:
        if not isinstance(raw, dict):
            # only the type: a config path can be a symlink to a file its reader may not
            # see (many a system file read as YAML is one long string): never print it
            raise self.fail(
                "(top level)",
                f"expected an object with keys like name and memory, got {_kind(raw)}",
            )
        data: Mapping[object, Any] = raw
        if data and not any(key in TOP_KEYS for key in data):
            # not a config at all (another file, or a symlink to one): name none of its keys
            raise self.fail(
                "(top level)",
                "not a VM config: none of its keys is a config key",
                hint="a VM config has keys like name, memory, disks and cdrom",
            )
        values = self.section(data, schema.TOP, "")
        if "memory" not in values:
            values["memory"] = self.value(schema.MEMORY, schema.MEMORY.default, "memory")
        self.relations(values)
        return VMConfig(**values, source=self.source)

    def relations(self, values: dict[str, Any]) -> None:
        """The rules that relate fields to each other (the table checks each alone); fills
        in the boot order, whose default depends on them."""
        if values["memory"] % 1024:
            raise self.fail("memory", "must be a whole number of KiB")
        for key in ("initrd", "cmdline"):
            if key in values and "kernel" not in values:
                raise self.fail(key, 'needs a kernel; add "kernel": "path/to/vmlinuz"')
        cdrom, disks = "cdrom" in values, bool(values.get("disks")) or "image" in values
        if "boot" in values:
            for i, dev in enumerate(values["boot"]):
                if dev == "cdrom" and not cdrom:
                    raise self.fail(f"boot[{i}]", "boots from cdrom but no cdrom is configured")
                if dev == "disk" and not disks:
                    raise self.fail(f"boot[{i}]", "boots from disk but no disks are configured")
        else:
            values["boot"] = (("cdrom",) if cdrom else ()) + (("disk",) if disks else ())
        if not disks and not cdrom and "kernel" not in values:
            raise self.fail(
                "disks", "nothing to boot from: give an image, disks, a cdrom or a kernel"
            )
        network = values.get("network", Network())
        if values.get("ports") and network.type != "user":
            raise self.fail(
                "ports",
                f"ports are forwarded by QEMU's user networking; this VM's network is "
                f"{network.type!r}",
                hint="on a libvirt network or bridge the guest has its own address "
                "(`ozone ip NAME`): reach its ports there, or remove ports",
            )

    def boot(self, value: object, where: str) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self.fail(
                where, f'expected a list like ["cdrom", "disk"], got {_describe(value)}'
            )
        order = tuple(self.choice(v, f"{where}[{i}]", BOOT_DEVICES) for i, v in enumerate(value))
        for i, dev in enumerate(order):
            if order.index(dev) != i:
                raise self.fail(f"{where}[{i}]", f"{dev!r} is listed twice")
        return order


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _is_host(host: str) -> bool:
    """An IP address (no IPv6 zone: it may hold any character) or an RFC 1123 host name."""
    if "%" not in host:
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            pass
    labels = host.removesuffix(".").split(".")
    return len(host) <= 253 and all(_HOST_LABEL_RE.fullmatch(label) for label in labels)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_config(data: object, *, source: Path | None = None) -> VMConfig:
    """Validate config data (already parsed from JSON/YAML); relative paths resolve against
    the folder of ``source`` (or the current directory)."""
    return _Checker(source).config(data)


# --- files the config names ----------------------------------------------------------------

_MISSING = "does not exist"
_FILE_TYPES = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
}


def _not_a_file(path: Path) -> str | None:
    """None when ``path`` is a regular file (symlinks followed), else what it is instead."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "is a symlink to a missing file" if os.path.islink(path) else _MISSING
    except OSError as err:
        return f"cannot be examined: {err.strerror}"
    if stat.S_ISREG(mode):
        return None
    return f"is {_FILE_TYPES.get(stat.S_IFMT(mode), 'a special file')}, not a regular file"


def check_host_paths(config: VMConfig) -> None:
    """Check that the files a config names on this host are regular files, or can be
    created as such (disks with a size or backing, the serial log). Raises ConfigError.

    A directory or a device where ozone or QEMU reads or writes a file is refused: QEMU
    would use /dev/sda as a disk, and libvirt's log daemon rotates (renames) a serial log.
    """
    file = _file_name(config.source)

    def refuse(where: str, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(message, file=file, field=where, hint=hint)

    inputs = [
        ("cdrom", config.cdrom, "ISO"),
        ("kernel", config.kernel, "kernel"),
        ("initrd", config.initrd, "initrd"),
        *((f"disks[{i}].backing", d.backing, "backing image") for i, d in enumerate(config.disks)),
    ]
    for where, path, what in inputs:  # read: must be regular files
        problem = _not_a_file(path) if path is not None else None
        if problem:
            raise refuse(where, f"{what} {path} {problem}")
    for i, disk in enumerate(config.disks):
        where = f"disks[{i}].path"
        problem = _not_a_file(disk.path)
        if problem is None:
            continue
        if problem != _MISSING:
            raise refuse(where, f"disk image {disk.path} {problem}")
        if disk.size is None and disk.backing is None:
            raise refuse(
                where,
                f"disk image {disk.path} {_MISSING}",
                hint=f'give disks[{i}] a "size" (e.g. "10GiB") so ozone creates it',
            )
        if not disk.path.parent.is_dir():
            raise refuse(where, f"cannot create {disk.path}: folder {disk.path.parent} {_MISSING}")
    if config.serial_log is not None:
        problem = _not_a_file(config.serial_log)
        if problem not in (None, _MISSING):
            raise refuse("serial_log", f"serial log {config.serial_log} {problem}")


def check_shares(config: VMConfig) -> None:
    """Every share's host folder exists on this host, is a folder and can be read by the user
    virtiofsd runs as: this one (root on qemu:///system; QEMU itself never opens it). Raises
    ConfigError."""
    file = _file_name(config.source)
    for i, share in enumerate(config.shares):
        where = f"shares[{i}].host"
        try:
            is_dir = stat.S_ISDIR(os.stat(share.host).st_mode)
        except FileNotFoundError:
            raise ConfigError(
                f"host folder {share.host} {_MISSING}",
                file=file,
                field=where,
                hint=f"create it (mkdir -p {share.host}) or fix the path",
            ) from None
        except OSError as err:
            message = f"host folder {share.host} cannot be examined: {err.strerror}"
            raise ConfigError(message, file=file, field=where) from None
        if not is_dir:
            raise ConfigError(f"{share.host} is not a folder", file=file, field=where)
        if not os.access(share.host, os.R_OK | os.X_OK):
            raise ConfigError(
                f"host folder {share.host} cannot be read by this user, as whom virtiofsd "
                "would read it",
                file=file,
                field=where,
                hint="share a folder you can read (on qemu:///system libvirt runs virtiofsd "
                "as root)",
            )


# --- lookup by name ------------------------------------------------------------------------


def find_config(name_or_path: str) -> Path:
    """``web`` → the first ``web.json|yaml|yml`` on OZONE_CONFIG_PATH; a path is used as is."""
    looks_like_path = (
        os.sep in name_or_path or name_or_path.endswith(CONFIG_SUFFIXES) or name_or_path == "."
    )
    if looks_like_path:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            problem = "not a regular file" if path.exists() else "no such config file"
            raise ConfigError(problem, file=_file_name(name_or_path))
        return path.absolute()
    if not NAME_RE.fullmatch(name_or_path):
        raise ConfigError(
            f"{_show(name_or_path)} is not a VM name or a config path",
            hint="names use letters, digits, '.', '_' and '-'; paths end in .json/.yaml/.yml",
        )
    dirs = config_search_path()
    for folder in dirs:
        found = [folder / (name_or_path + s) for s in CONFIG_SUFFIXES]
        found = [p for p in found if p.is_file()]
        if len(found) > 1:
            raise ConfigError(
                f"more than one config for {name_or_path!r} in {folder}: "
                + ", ".join(p.name for p in found),
                hint="keep one of them",
            )
        if found:
            return found[0].absolute()
    raise ConfigError(
        f"no config named {name_or_path!r} (looked for {name_or_path}.json/.yaml/.yml in "
        + ", ".join(str(d) for d in dirs)
        + ")",
        hint="pass a path to the file, or set OZONE_CONFIG_PATH to the folder that holds it",
    )
