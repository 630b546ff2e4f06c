"""VM config files: load (JSON or YAML), validate, normalise, find by name.

Pure: no libvirt, no side effects beyond reading the config file (and, in
:func:`check_host_paths`, looking at the files it names). Every error is a
:class:`~ozone_libvirt.errors.ConfigError` naming the file, the field path
(``disks[0].size``), what was expected and, for typos, the closest valid key.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError
from .units import format_size

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
DEFAULT_CONFIG_PATH = ("./vms", "~/.config/ozone/vms")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MACHINE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")

ACCELS = ("auto", "kvm", "tcg")
BOOT_DEVICES = ("cdrom", "disk", "network")
DISK_FORMATS = ("qcow2", "raw")
DISK_BUSES = ("virtio", "sata", "scsi")
NIC_MODELS = ("virtio", "e1000", "e1000e", "rtl8139")
GRAPHICS = ("none", "vnc")

MIN_MEMORY = 32 * 1024**2
MAX_MEMORY = 16 * 1024**4
MAX_VCPUS = 512

# libvirt's unit conventions: K/KiB = 1024, KB = 1000 (and so on up).
_UNITS = {
    "": 1024**2,  # a bare number is MiB
    "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")

TOP_KEYS = (
    "name", "description", "memory", "vcpus", "machine", "accel", "disks", "cdrom", "boot",
    "kernel", "initrd", "cmdline", "serial_log", "agent", "network", "qmp", "graphics",
)  # fmt: skip
DISK_KEYS = ("path", "size", "backing", "format", "bus")
NETWORK_KEYS = ("type", "source", "model", "mac")
QMP_KEYS = ("endpoint", "allow_remote")


@dataclass(frozen=True)
class Disk:
    path: Path
    size: int | None = None  # bytes; create the image when it is missing
    backing: Path | None = None
    format: str = "qcow2"
    bus: str = "virtio"


@dataclass(frozen=True)
class Network:
    type: Literal["user", "none", "network", "bridge"] = "user"
    source: str | None = None  # libvirt network name or host bridge
    model: str = "virtio"
    mac: str | None = None


@dataclass(frozen=True)
class Qmp:
    """Where QEMU serves QMP. ``auto`` becomes a ``tcp`` port when the VM is defined."""

    kind: Literal["auto", "off", "tcp", "unix"] = "auto"
    host: str | None = None
    port: int | None = None
    path: Path | None = None
    allow_remote: bool = False

    @property
    def endpoint(self) -> str:
        if self.kind == "tcp":
            return f"tcp:{self.host}:{self.port}"
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
    source: Path | None = None  # the file this config came from

    def to_dict(self) -> dict[str, Any]:
        """The normalised config as plain JSON data (absolute paths, sizes in bytes)."""

        def conv(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, tuple):
                return [conv(v) for v in value]
            if hasattr(value, "__dataclass_fields__"):
                return {k: conv(getattr(value, k)) for k in value.__dataclass_fields__}
            return value

        data = conv(self)
        del data["source"]
        return data

    @property
    def hash(self) -> str:
        """A stable digest of the normalised config (not of the file's formatting)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


# --- sizes ---------------------------------------------------------------------------------


def parse_size(value: object, *, where: str, file: str | None = None) -> int:
    """Parse ``512``, ``"512MiB"``, ``"2G"``, ``"1.5GiB"`` into bytes (bare numbers are MiB)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(
            f"expected a size like 512MiB or 2GiB, got {_describe(value)}", file=file, field=where
        )
    text = str(value)
    m = _SIZE_RE.match(text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ConfigError(
            f"{text!r} is not a size; use a number of MiB or a number with a unit "
            "(B, KiB, MiB, GiB, TiB; KB, MB, GB are powers of 1000)",
            file=file,
            field=where,
        )
    number = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    return int(number * _UNITS[unit])


# --- loading -------------------------------------------------------------------------------


def load_config(path: str | Path) -> VMConfig:
    """Read and validate one config file (``.json``, ``.yaml`` or ``.yml``)."""
    path = Path(path).expanduser().absolute()
    data = read_config_data(path)
    return parse_config(data, source=path)


def read_config_data(path: Path) -> Any:
    shown = str(path)
    if path.suffix not in CONFIG_SUFFIXES:
        raise ConfigError(
            "unknown config file type",
            file=shown,
            hint="name the file NAME.json, NAME.yaml or NAME.yml",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", file=shown) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read: {err}", file=shown) from None
    if path.suffix == ".json":
        return _parse_json(text, shown)
    return _parse_yaml(text, shown)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _parse_json(text: str, shown: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"line {err.lineno}, column {err.colno}: invalid JSON: {err.msg}", file=shown
        ) from None
    except ValueError as err:  # duplicate key
        raise ConfigError(f"invalid JSON: {err}", file=shown) from None


def _parse_yaml(text: str, shown: str) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in result:
                mark = key_node.start_mark
                raise ConfigError(
                    f"line {mark.line + 1}, column {mark.column + 1}: duplicate key {key!r}",
                    file=shown,
                )
            result[key] = loader.construct_object(value_node, deep=True)
        return result

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = err.problem or err.context or "syntax error"
        raise ConfigError(f"{where}invalid YAML: {problem}", file=shown) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML: {err}", file=shown) from None


# --- validation ----------------------------------------------------------------------------


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class _Checker:
    """Validates one config document; knows the file name and the base directory."""

    def __init__(self, source: Path | None) -> None:
        self.source = source
        self.file = str(source) if source else None
        self.base = source.parent if source else Path.cwd()

    def fail(self, where: str, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(message, file=self.file, field=where, hint=hint)

    def keys(self, data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
        for key in data:
            if key in allowed:
                continue
            path = f"{where}.{key}" if where else str(key)
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else "valid keys: " + ", ".join(allowed)
            raise self.fail(path, f"unknown key {str(key)!r}", hint)

    def mapping(self, value: object, where: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where or "(top level)", f"expected an object, got {_describe(value)}")
        return value

    def string(
        self,
        value: object,
        where: str,
        *,
        pattern: re.Pattern[str] | None = None,
        expected: str | None = None,
    ) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"expected {expected or 'a string'}, got {_describe(value)}")
        if "\x00" in value:
            raise self.fail(where, "must not contain NUL characters")
        if pattern is not None and not pattern.match(value):
            raise self.fail(where, f"{value!r} is not valid; expected {expected}")
        return value

    def choice(self, value: object, where: str, choices: tuple[str, ...]) -> str:
        expected = "one of " + ", ".join(choices)
        if not isinstance(value, str) or value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else None
            raise self.fail(where, f"expected {expected}, got {_describe(value)}", hint)
        return value

    def integer(self, value: object, where: str, *, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"expected a whole number, got {_describe(value)}")
        if not low <= value <= high:
            raise self.fail(where, f"must be between {low} and {high}, got {value}")
        return value

    def boolean(self, value: object, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"expected true or false, got {_describe(value)}")
        return value

    def path(self, value: object, where: str) -> Path:
        text = self.string(value, where, expected="a file path")
        if not text.strip():
            raise self.fail(where, "expected a file path, got an empty string")
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = self.base / path
        return Path(os.path.normpath(path))

    def size(self, value: object, where: str, *, low: int, high: int) -> int:
        size = parse_size(value, where=where, file=self.file)
        if not low <= size <= high:
            raise self.fail(
                where, f"must be between {format_size(low)} and {format_size(high)}, got {value}"
            )
        return size

    # --- sections ------------------------------------------------------------------------

    def disk(self, value: object, where: str) -> Disk:
        if isinstance(value, str):
            value = {"path": value}
        data = self.mapping(value, where)
        self.keys(data, DISK_KEYS, where)
        if "path" not in data:
            raise self.fail(f"{where}.path", "missing; every disk needs a path")
        fmt = self.choice(data.get("format", "qcow2"), f"{where}.format", DISK_FORMATS)
        backing = self.path(data["backing"], f"{where}.backing") if "backing" in data else None
        if backing is not None and fmt != "qcow2":
            raise self.fail(f"{where}.backing", "a backing image needs format qcow2")
        size = None
        if "size" in data:
            size = self.size(data["size"], f"{where}.size", low=1024**2, high=64 * 1024**4)
        return Disk(
            path=self.path(data["path"], f"{where}.path"),
            size=size,
            backing=backing,
            format=fmt,
            bus=self.choice(data.get("bus", "virtio"), f"{where}.bus", DISK_BUSES),
        )

    def network(self, value: object, where: str) -> Network:
        if isinstance(value, str):
            kind, _, source = value.partition(":")
            value = {"type": kind, "source": source} if source else {"type": kind}
        data = self.mapping(value, where)
        self.keys(data, NETWORK_KEYS, where)
        kind = self.choice(
            data.get("type", "user"), f"{where}.type", ("user", "none", "network", "bridge")
        )
        source = None
        if kind in ("network", "bridge"):
            if "source" not in data:
                example = "default" if kind == "network" else "br0"
                raise self.fail(
                    f"{where}.source",
                    f"missing; a {kind} network needs its name",
                    hint=f'e.g. "network": "{kind}:{example}"',
                )
            source = self.string(
                data["source"],
                f"{where}.source",
                pattern=IFNAME_RE,
                expected="a network or bridge name",
            )
        elif "source" in data:
            raise self.fail(f"{where}.source", f"a {kind} network takes no source")
        mac = None
        if "mac" in data:
            mac = self.string(
                data["mac"],
                f"{where}.mac",
                pattern=MAC_RE,
                expected="a MAC address like 52:54:00:12:34:56",
            ).lower()
        model = self.choice(data.get("model", "virtio"), f"{where}.model", NIC_MODELS)
        return Network(type=kind, source=source, model=model, mac=mac)  # type: ignore[arg-type]

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
            endpoint, ep_where, expected='"auto", "off", "tcp:127.0.0.1:PORT" or "unix:/PATH"'
        )
        if text in ("auto", "off"):
            return Qmp(kind=text, allow_remote=allow_remote)  # type: ignore[arg-type]
        if text.startswith("unix:"):
            return Qmp(kind="unix", path=self.path(text[5:], ep_where), allow_remote=allow_remote)
        if text.startswith("tcp:"):
            host, sep, port_text = text[4:].rpartition(":")
            host = host.strip("[]")
            if not sep or not host or not port_text.isdigit():
                raise self.fail(ep_where, f"{text!r} is not an endpoint; expected tcp:HOST:PORT")
            port = int(port_text)
            if not 1 <= port <= 65535:
                raise self.fail(ep_where, f"port {port} is out of range 1-65535")
            if not allow_remote and not _is_loopback(host):
                raise self.fail(
                    ep_where,
                    f"QMP on {host} would be reachable from other machines, and QMP has no "
                    "authentication (anyone who reaches it controls the VM)",
                    hint='bind it to 127.0.0.1, or set "qmp": {"endpoint": "...", '
                    '"allow_remote": true} if you really mean it',
                )
            return Qmp(kind="tcp", host=host, port=port, allow_remote=allow_remote)
        raise self.fail(
            ep_where,
            f'{text!r} is not a QMP endpoint; expected "auto", "off", '
            '"tcp:127.0.0.1:PORT" or "unix:/PATH"',
        )

    def config(self, raw: object) -> VMConfig:
        data = self.mapping(raw, "")
        self.keys(data, TOP_KEYS, "")
        if "name" not in data:
            raise self.fail("name", "missing; every VM needs a name", hint='e.g. "name": "web"')
        name = self.string(
            data["name"],
            "name",
            pattern=NAME_RE,
            expected="1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
        opt: dict[str, Any] = {}
        if "description" in data:
            opt["description"] = self.string(data["description"], "description")
        memory = self.size(data.get("memory", 512), "memory", low=MIN_MEMORY, high=MAX_MEMORY)
        if memory % 1024:
            raise self.fail("memory", "must be a whole number of KiB")
        if "vcpus" in data:
            opt["vcpus"] = self.integer(data["vcpus"], "vcpus", low=1, high=MAX_VCPUS)
        if "machine" in data:
            opt["machine"] = self.string(
                data["machine"],
                "machine",
                pattern=MACHINE_RE,
                expected="a QEMU machine type like q35 or pc",
            )
        if "accel" in data:
            opt["accel"] = self.choice(data["accel"], "accel", ACCELS)
        disks_raw = data.get("disks", [])
        if not isinstance(disks_raw, list):
            raise self.fail("disks", f"expected a list of disks, got {_describe(disks_raw)}")
        disks = tuple(self.disk(d, f"disks[{i}]") for i, d in enumerate(disks_raw))
        seen: dict[Path, int] = {}
        for i, disk in enumerate(disks):
            if disk.path in seen:
                raise self.fail(f"disks[{i}].path", f"the same image as disks[{seen[disk.path]}]")
            seen[disk.path] = i
        if len(disks) > 20:
            raise self.fail("disks", "at most 20 disks")
        cdrom = self.path(data["cdrom"], "cdrom") if "cdrom" in data else None
        for key in ("kernel", "initrd"):
            if key in data:
                opt[key] = self.path(data[key], key)
        if "cmdline" in data:
            opt["cmdline"] = self.string(data["cmdline"], "cmdline")
        for key in ("initrd", "cmdline"):
            if key in data and "kernel" not in data:
                raise self.fail(key, 'needs a kernel; add "kernel": "path/to/vmlinuz"')
        boot = self.boot(data.get("boot"), cdrom=cdrom is not None, disks=bool(disks))
        if not disks and cdrom is None and "kernel" not in data:
            raise self.fail("disks", "nothing to boot from: give disks, a cdrom or a kernel")
        if "serial_log" in data:
            opt["serial_log"] = self.path(data["serial_log"], "serial_log")
        if "agent" in data:
            opt["agent"] = self.boolean(data["agent"], "agent")
        if "network" in data:
            opt["network"] = self.network(data["network"], "network")
        if "qmp" in data:
            opt["qmp"] = self.qmp(data["qmp"], "qmp")
        if "graphics" in data:
            opt["graphics"] = self.choice(data["graphics"], "graphics", GRAPHICS)
        return VMConfig(
            name=name, memory=memory, disks=disks, cdrom=cdrom, boot=boot, source=self.source, **opt
        )

    def boot(self, value: object, *, cdrom: bool, disks: bool) -> tuple[str, ...]:
        if value is None:
            order = (("cdrom",) if cdrom else ()) + (("disk",) if disks else ())
            return order
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self.fail(
                "boot", f'expected a list like ["cdrom", "disk"], got {_describe(value)}'
            )
        order = tuple(self.choice(v, f"boot[{i}]", BOOT_DEVICES) for i, v in enumerate(value))
        for i, dev in enumerate(order):
            if order.index(dev) != i:
                raise self.fail(f"boot[{i}]", f"{dev!r} is listed twice")
            if dev == "cdrom" and not cdrom:
                raise self.fail(f"boot[{i}]", "boots from cdrom but no cdrom is configured")
            if dev == "disk" and not disks:
                raise self.fail(f"boot[{i}]", "boots from disk but no disks are configured")
        return order


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


def check_host_paths(config: VMConfig, *, exists: Callable[[Path], bool] = Path.exists) -> None:
    """Check that the files a config names exist (or can be created). Raises ConfigError."""
    file = str(config.source) if config.source else None

    def need(path: Path | None, where: str, what: str) -> None:
        if path is not None and not exists(path):
            raise ConfigError(f"{what} {path} does not exist", file=file, field=where)

    need(config.cdrom, "cdrom", "ISO")
    need(config.kernel, "kernel", "kernel")
    need(config.initrd, "initrd", "initrd")
    for i, disk in enumerate(config.disks):
        need(disk.backing, f"disks[{i}].backing", "backing image")
        if not exists(disk.path):
            if disk.size is None and disk.backing is None:
                raise ConfigError(
                    f"disk image {disk.path} does not exist",
                    file=file,
                    field=f"disks[{i}].path",
                    hint=f'give disks[{i}] a "size" (e.g. "10GiB") so ozone creates it',
                )
            if not exists(disk.path.parent):
                raise ConfigError(
                    f"cannot create {disk.path}: folder {disk.path.parent} does not exist",
                    file=file,
                    field=f"disks[{i}].path",
                )


# --- lookup by name ------------------------------------------------------------------------


def config_search_path() -> list[Path]:
    raw = os.environ.get("OZONE_CONFIG_PATH")
    parts = raw.split(os.pathsep) if raw else list(DEFAULT_CONFIG_PATH)
    return [Path(p).expanduser() for p in parts if p]


def find_config(name_or_path: str) -> Path:
    """``web`` → the first ``web.json|yaml|yml`` on OZONE_CONFIG_PATH; a path is used as is."""
    looks_like_path = (
        os.sep in name_or_path or name_or_path.endswith(CONFIG_SUFFIXES) or name_or_path == "."
    )
    if looks_like_path:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ConfigError("no such config file", file=name_or_path)
        return path.absolute()
    if not NAME_RE.match(name_or_path):
        raise ConfigError(
            f"{name_or_path!r} is not a VM name or a config path",
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
