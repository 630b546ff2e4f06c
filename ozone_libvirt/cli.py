"""The `ozone` command line: thin typer commands over the library.

Each command parses its options, calls one library function inside :func:`session` (which
opens the connection and turns every ozone error into one line and an exit code) and hands
the result to a renderer in :mod:`ozone_libvirt.output`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from . import completion, output
from .errors import EXIT_FAILED, Interrupted, OzoneError, UsageError, interrupted_exit_code

if TYPE_CHECKING:
    import libvirt

    from .config import VMConfig
    from .hosts import Inventory, Placement
    from .vm import SerialLog

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="ozone",
    help="Declarative QEMU virtual machines on libvirt: one JSON/YAML file per VM.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


@dataclass
class Globals:
    uri: str | None = None
    host: str | None = None  # --host NAME: a host of the inventory (or auto)
    verbose: bool = False


G = Globals()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
NameArg = Annotated[
    str,
    typer.Argument(
        help="VM (libvirt domain) name.", show_default=False, autocompletion=completion.vm_names
    ),
]
ConfigArg = Annotated[
    str,
    typer.Argument(
        help="Config name (found on OZONE_CONFIG_PATH) or path.",
        show_default=False,
        autocompletion=completion.config_names,
    ),
]


HostOpt = Annotated[
    str | None,
    typer.Option(
        "--host",
        help="A host of the inventory, or auto: place the VM (as the global --host).",
        autocompletion=completion.host_names,
        show_default=False,
    ),
]


def _command_host(host: str | None) -> None:
    """`ozone define CONFIG --host NAME`: the command's --host is the global one."""
    if host is None:
        return
    if G.uri is not None or (G.host is not None and G.host != host):
        raise UsageError("--connect and --host both name a host: give one")
    G.host = host


def _version(value: bool) -> None:
    if value:
        from . import __version__

        output.emit(f"ozone {__version__}")
        raise typer.Exit(0)


@app.callback()
def _globals(
    connect: Annotated[
        str | None,
        typer.Option(
            "--connect", "-c", help="libvirt URI (default: $LIBVIRT_DEFAULT_URI or libvirt's)."
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            "--host",
            help="A host of the inventory (~/.config/ozone/hosts.yaml or $OZONE_HOSTS); "
            "`auto` places a VM from its config.",
            autocompletion=completion.host_names,
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show more detail.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print ozone's version and exit.", is_eager=True, callback=_version
        ),
    ] = False,
) -> None:
    if connect is not None and host is not None:
        from typer._click import exceptions as click_errors

        raise click_errors.UsageError("--connect and --host both name a host: give one")
    G.uri = connect
    G.host = host
    G.verbose = verbose


def handles_errors(fn: F) -> F:
    """Run a command, turning ozone errors into one line (or JSON) and their exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except OzoneError as err:
            output.error(err, as_json=as_json)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt as err:
            sys.stderr.write("interrupted\n")
            raise typer.Exit(interrupted_exit_code(err)) from None

    return wrapper  # type: ignore[return-value]


def _seconds(value: float | None) -> float | None:
    """A timeout on the command line: a number of seconds above 0."""
    if value is not None and not (value > 0 and value != float("inf")):
        raise typer.BadParameter(f"{value:g} is not a number of seconds above 0")
    return value


def _seconds_or_zero(value: float) -> float:
    if not value >= 0 or value == float("inf"):
        raise typer.BadParameter(f"{value:g} is not a number of seconds (0 or more)")
    return value


@dataclass(frozen=True)
class Target:
    """The libvirt a command talks to: a URI (None: the default) and, when it came from the
    inventory, the host's name there, and how ``auto`` chose it."""

    uri: str | None = None
    host: str | None = None
    placement: Placement | None = None


def _inventory(wanted: str) -> Inventory:
    from .hosts import load_inventory

    return load_inventory(wanted=wanted)


def target(config: VMConfig | None = None, *, as_json: bool = False) -> Target:
    """Where a command goes: ``-c URI``, else ``--host NAME``, else the config's ``host``,
    else the default URI. ``auto`` (from ``--host`` or the config) places the config's VM,
    and says where on stderr (not with ``--json``)."""
    from .hosts import AUTO, wanted_host

    config_host = config.host if config is not None else None
    name = wanted_host(connect=G.uri, host=G.host, config_host=config_host)
    if name is None:
        return Target(G.uri)
    from_config = G.host is None
    file = str(config.source) if config is not None and config.source else None
    inventory = _inventory(f"{file}: host {name}" if from_config else f"--host {name}")
    placement = None
    if name == AUTO:
        if config is None:
            raise UsageError(
                "--host auto places a VM from its config: define, start CONFIG, apply and run "
                "take it",
                hint="name a host: --host NAME",
            )
        from .fleet import locate

        placement = locate(inventory, config)
        if not as_json:
            output.info(placement.rule)
            for note in placement.notes:
                output.info(f"note: {note}")
        name = placement.host
    host = inventory.find(name)
    if host is None:
        from .errors import ConfigError

        if not from_config:
            inventory.get(name)  # raises the usage error
        message, hint = inventory.unknown(name)
        raise ConfigError(message, file=file, field="host", hint=hint)
    return Target(host.uri, host.name, placement)


@contextlib.contextmanager
def connection(where: Target | None = None) -> Iterator[libvirt.virConnect]:
    """A connection to ``where`` (default: the host the global options name)."""
    from .connection import connect, libvirt_errors

    where = where or target()
    # a libvirt call the library left untranslated still ends as one line, not a traceback
    with connect(where.uri, host=where.host) as conn, libvirt_errors(uri=where.uri):
        yield conn


def load(name_or_path: str) -> VMConfig:
    from .config import find_config, load_config

    return load_config(find_config(name_or_path))


def progress(text: str, as_json: bool) -> contextlib.AbstractContextManager[None]:
    return output.spinner(text, enabled=not as_json)


# --- commands ------------------------------------------------------------------------------


@app.command()
@handles_errors
def define(config: ConfigArg, host: HostOpt = None, as_json: JsonOpt = False) -> None:
    """Create a VM from its config, or update it in place (keeping its UUID): `ozone apply`
    of one file."""
    from . import converge

    _command_host(host)
    cfg = load(config)
    where = target(cfg, as_json=as_json)
    with (
        connection(where) as conn,
        output.activity(f"Defining {cfg.name}:", enabled=not as_json) as (
            report,
            advance,
        ),
    ):
        result = converge.define(conn, cfg, report=report, progress=advance)
    if as_json:
        output.emit_json(_with_host(result, where))
        return
    verb = "Defined" if result.created else "Updated" if result.changed else "Unchanged:"
    output.emit(f"{verb} {result.name} ({result.uuid}); QMP {result.qmp or 'off'}")
    for made in result.images_made:
        output.info(f"made {made}")
    for disk in result.disks_created:
        output.info(f"created disk {disk}")
    for forward in result.forwards:
        protocol, host, port, guest = forward.split(":")
        what = "ssh" if guest == "22" and protocol == "tcp" else f"{protocol} port {guest}"
        output.info(f"forwards {host}:{port} to the guest's {what}")
    for note in result.notes:
        output.info(f"note: {note}")
    if result.restart_needed:
        output.info(f"{result.name} is running: the changes apply at its next start")


def _with_host(result: object, where: Target) -> object:
    """A result's JSON with the host it is on (when the inventory named it) and how
    ``auto`` chose it."""
    if where.host is None:
        return result
    extra: dict[str, object] = {"host": where.host}
    if where.placement is not None:
        extra["placement"] = where.placement
    return {**output.to_json(result), **extra}


def _ask_for_name() -> str:
    if not sys.stdin.isatty():
        raise UsageError("which VM? give a NAME", hint="ozone start NAME")
    answer = str(typer.prompt("What VM would you like to start?")).strip()
    if not answer:
        raise UsageError("no VM name given")
    return answer


@app.command()
@handles_errors
def start(
    name: Annotated[
        str | None,
        typer.Argument(
            help="VM name (or config); asked for when omitted.",
            autocompletion=completion.vm_or_config_names,
        ),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Return when the guest agent answers.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits.", callback=_seconds)] = 120,
    host: HostOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a VM (resuming saved state if there is some). Defines it first if a config of
    that name exists and no VM does."""
    from dataclasses import replace

    from . import vm

    _command_host(host)
    name = name or _ask_for_name()
    where = target(_config_with_host(name), as_json=as_json)
    with connection(where) as conn:
        path = vm.config_to_define(conn, name)
        if path is not None:
            from .config import load_config

            cfg = load_config(path)
            name = cfg.name  # `ozone start vms/web.yaml` starts the VM it names
            with output.activity(f"Defining {name}:", enabled=not as_json) as steps:
                vm.define(conn, cfg, report=steps[0], progress=steps[1])
            output.info(f"defined {name} from {path}")
        with progress(f"Starting {name}…", as_json):
            result = vm.start(conn, name)
        if wait:
            with output.activity(f"Waiting for {name}:", enabled=not as_json) as steps:
                waited = _wait_or_show_console(conn, name, timeout, report=steps[0])
                result = replace(result, ready_seconds=round(waited, 3))
    if as_json:
        output.emit_json(_with_host(result, where))
        return
    action = {"booted": "Started", "restored": "Restored", "resumed": "Resumed"}
    text = f"{action.get(result.action, 'Already running:')} {name}"
    if result.ready_seconds is not None:
        text += f" (guest agent ready after {result.ready_seconds:.1f} s)"
    output.emit(text)
    if result.clock == "synced":
        output.info(f"guest clock set from the host (it was {result.clock_offset_s:+.1f} s off)")
    elif result.clock is not None:
        output.info(f"guest clock {result.clock}")


def _config_with_host(name: str) -> VMConfig | None:
    """`ozone start NAME`: the config of that name, when it could say which host the VM is
    on (no -c or --host given, and it names a ``host``). A config that does not load is
    left to define, which reports it if it is needed."""
    if G.uri is not None or G.host is not None:
        return None
    from .config import find_config, load_config

    try:
        cfg = load_config(find_config(name))
    except OzoneError:
        return None
    return cfg if cfg.host is not None else None


def _wait_or_show_console(
    conn: libvirt.virConnect,
    name: str,
    timeout: float,
    report: Callable[[str], None] = lambda _text: None,
) -> float:
    from . import vm

    try:
        return vm.wait_agent(conn, name, timeout=timeout, report=report)
    except OzoneError:
        tail = _console_tail(conn, name)
        if tail:
            output.info(f"last lines of {name}'s serial console:\n{tail}")
        raise


def _console_tail(conn: libvirt.virConnect, name: str, lines: int = 15) -> str:
    from . import vm

    with contextlib.suppress(OzoneError, OSError):
        log = vm.serial_log(conn, name)
        text = log.read(max(0, (log.size() or 0) - 8192)).decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])
    return ""


@app.command()
@handles_errors
def wait(
    name: NameArg,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.", callback=_seconds)] = 120,
    as_json: JsonOpt = False,
) -> None:
    """Wait until a VM's guest agent answers (the guest can run programs) and, on a VM
    with cloud-init, until cloud-init has finished."""
    with (
        connection() as conn,
        output.activity(f"Waiting for {name}:", enabled=not as_json) as steps,
    ):
        seconds = _wait_or_show_console(conn, name, timeout, report=steps[0])
    if as_json:
        output.emit_json({"name": name, "ready_seconds": round(seconds, 3)})
    else:
        output.emit(f"{name} is ready ({seconds:.1f} s)")


@app.command()
@handles_errors
def stop(
    name: NameArg,
    timeout: Annotated[
        float,
        typer.Option(
            help="Seconds to wait for a clean shutdown before forcing.", callback=_seconds_or_zero
        ),
    ] = 60,
    force: Annotated[bool, typer.Option("--force", "-f", help="Power off at once.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Shut a VM down: guest agent, else ACPI; forced off after --timeout."""
    from . import vm

    with connection() as conn, progress(f"Stopping {name}…", as_json):
        result = vm.stop(conn, name, timeout=timeout, force=force)
    if as_json:
        output.emit_json(result)
    elif result.method == "none":
        output.emit(f"{name} was not running")
    else:
        how = {
            "agent": "by the guest agent",
            "acpi": "by ACPI power button",
            "forced": "forced off",
        }
        text = f"Stopped {name} {how[result.method]} in {result.seconds:.1f} s"
        if result.method == "forced" and result.requested:
            text += f" (it ignored the {result.requested} shutdown for {timeout:g} s)"
        output.emit(text)


@app.command()
@handles_errors
def destroy(name: NameArg, as_json: JsonOpt = False) -> None:
    """Power a VM off at once (like pulling the plug); its definition stays."""
    from . import vm

    with connection() as conn:
        was_running = vm.destroy(conn, name)
    if as_json:
        output.emit_json({"name": name, "was_running": was_running})
    else:
        output.emit(f"Destroyed {name}" if was_running else f"{name} was not running")


@app.command()
@handles_errors
def undefine(
    name: NameArg,
    remove_storage: Annotated[
        bool,
        typer.Option(
            "--remove-storage", help="Also delete its disk images (never ISOs or backing images)."
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Power it off first if it runs.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove a VM's definition; its disk images stay unless --remove-storage."""
    from . import vm

    with connection() as conn:
        removed = vm.undefine(conn, name, remove_storage=remove_storage, force=force)
    if as_json:
        output.emit_json({"name": name, "removed": removed})
        return
    output.emit(f"Undefined {name}")
    for path in removed:
        output.info(f"removed {path}")


def _memory(num_bytes: int) -> str:
    from .units import format_size

    return format_size(num_bytes)


@app.command("list")
@handles_errors
def list_(
    all_: Annotated[
        bool, typer.Option("--all", "-a", help="Every libvirt domain, not only ozone's.")
    ] = False,
    all_hosts: Annotated[
        bool,
        typer.Option(
            "--all-hosts",
            help="Every host of the inventory, asked at once (exit 1 if one did not answer).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """List ozone's VMs: name, state, vCPUs, memory, QMP endpoint."""
    if all_hosts:
        _list_all_hosts(all_, as_json)
        return
    from . import inventory

    with connection() as conn:
        vms = inventory.list_vms(conn, all_domains=all_)
    if as_json:
        output.emit_json(vms)
        return
    rows = [[v.name, v.state, v.vcpus, _memory(v.memory), v.qmp] for v in vms]
    output.emit(output.table(["NAME", "STATE", "VCPUS", "MEMORY", "QMP"], rows))


def _list_all_hosts(all_: bool, as_json: bool) -> None:
    """`ozone list --all-hosts`: one table with a HOST column; a host that did not answer
    has a row saying why, and makes the exit status 1, after the others' VMs are shown."""
    from .fleet import list_everywhere

    if G.uri is not None or G.host is not None:
        raise UsageError(
            "--all-hosts asks every host of the inventory: no --connect or --host with it"
        )
    inventory = _inventory("--all-hosts")
    found = list_everywhere(inventory, all_domains=all_)
    if as_json:
        output.emit_json(found)
    else:
        failed = {e.host: e for e in found.errors}
        rows: list[list[object]] = []
        for host in inventory.names:
            if host in failed:
                rows.append([host, "-", f"error: {failed[host].message}"])
            rows += [
                [v.host, v.name, v.state, v.vcpus, _memory(v.memory), v.qmp]
                for v in found.vms
                if v.host == host
            ]
        output.emit(output.table(["HOST", "NAME", "STATE", "VCPUS", "MEMORY", "QMP"], rows))
    if found.errors:
        raise typer.Exit(EXIT_FAILED)


@app.command()
@handles_errors
def status(name: NameArg, as_json: JsonOpt = False) -> None:
    """Show one VM: state, resources, QMP endpoint, config file, disks."""
    from . import vm

    with connection() as conn:
        found = vm.status(conn, name)
    if as_json:
        output.emit_json(found)
        return
    data = output.to_json(found)
    warnings = data.pop("warnings")
    data["memory"] = _memory(data["memory"])
    data["disks"] = ", ".join(data["disks"]) or None
    data["ports"] = ", ".join(data["ports"]) or None
    data["shares"] = (
        ", ".join(
            f"{s['host']} -> {s['guest'] or '?'} ({'ro' if s['readonly'] else 'rw'})"
            for s in data["shares"]
        )
        or None
    )
    width = max(len(k) for k in data)
    output.emit(
        "\n".join(f"{k + ':':<{width + 1}} {'-' if v is None else v}" for k, v in data.items())
    )
    for warning in warnings:
        output.info(f"warning: {warning}")


@app.command()
@handles_errors
def ssh(
    name: NameArg,
    command: CommandArg = None,
    login: Annotated[
        str | None,
        typer.Option(
            "--login",
            "-l",
            help="Log in as this user (default: the config's first cloud-init user, else root).",
        ),
    ] = None,
    identity: Annotated[
        Path | None,
        typer.Option("--identity", "-i", help="Offer this private key too (ssh -i)."),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            "-o",
            help="An ssh option (ssh -o), e.g. -o ConnectTimeout=5; it wins over ozone's.",
        ),
    ] = None,
) -> None:
    """Log in to a running VM with the system's ssh, or run a command there.

    `ozone ssh NAME [-- COMMAND...]`: ozone exits with ssh's status (255: ssh could not
    connect, and ozone says why when it can tell).
    """
    from . import ssh as ssh_

    options = [arg for value in option or [] for arg in ("-o", value)]
    options += ["-i", str(identity)] if identity else []
    with connection() as conn:
        target = ssh_.target(
            conn,
            name,
            command or [],
            user=ssh_.check_user(login) if login else None,
            options=options,
        )
    code = ssh_.run(target)
    if code == 255:
        problem = ssh_.diagnose(target)
        if problem is not None:
            output.error(problem, as_json=False)
    raise typer.Exit(code)


@app.command()
@handles_errors
def events(
    name: Annotated[
        str | None,
        typer.Argument(
            help="Only this VM's events (default: every domain's).",
            autocompletion=completion.vm_names,
        ),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Stop after this many seconds.", callback=_seconds)
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="A JSON object a line: time, name, uuid, event, reason.")
    ] = False,
) -> None:
    """Print VM lifecycle and guest-agent events as they happen (started, paused, shut down,
    stopped with its reason, crashed, saved, restored, migrated, agent connected), until
    Ctrl-C or --timeout."""
    from . import events as ev

    def show(event: ev.Event) -> None:
        text = output.json_text(event, indent=None) if as_json else event.line()
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def ready() -> None:
        if not as_json and sys.stderr.isatty():
            output.info("listening for events (Ctrl-C ends)")

    import signal

    # Ctrl-C ends it even where the shell started it with SIGINT ignored (as exec does)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ev.prepare()  # before the connection opens
    with connection() as conn:
        try:
            ev.follow(conn, show, name=name, timeout=timeout, ready=ready)
        except KeyboardInterrupt as err:  # Ctrl-C: 130; SIGTERM: 143
            raise typer.Exit(interrupted_exit_code(err)) from None


@app.command()
@handles_errors
def ip(name: NameArg, as_json: JsonOpt = False) -> None:
    """Show a running VM's network addresses (from its guest agent, else libvirt's DHCP
    leases, else the host's ARP table); loopback left out."""
    from .addresses import guest_addresses

    with connection() as conn:
        result = guest_addresses(conn, name)
    if as_json:
        output.emit_json(result)
        return
    rows = [[i.name, i.mac, a] for i in result.interfaces for a in i.addresses]
    output.emit(output.table(["INTERFACE", "MAC", "ADDRESS"], rows))
    where = {"agent": "the guest agent", "lease": "libvirt's DHCP leases", "arp": "the ARP table"}
    output.info(f"(from {where[result.source]})")


@app.command()
@handles_errors
def xml(
    config: ConfigArg,
    defined: Annotated[
        bool, typer.Option("--defined", help="Show what libvirt holds for the VM instead.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print the domain XML a config produces, without touching libvirt."""
    if defined:
        from . import vm

        with connection() as conn:
            text = vm.dumpxml(conn, config, inactive=True)
    else:
        from . import domain_xml as dx
        from .connection import local_host_facts
        from .images import resolve
        from .ssh import vm_public_key

        loaded = load(config)
        cfg = resolve(loaded, vm_key=vm_public_key(loaded.name, create=False)).config
        facts = local_host_facts()
        qmp = dx.choose_qmp(cfg, facts)
        forwards = dx.planned_forwards(cfg)
        text = dx.to_string(dx.build_domain(cfg, facts=facts, qmp_endpoint=qmp, forwards=forwards))
    if as_json:
        output.emit_json({"xml": text})
    else:
        output.emit(text)


@app.command()
@handles_errors
def qmp(
    name: NameArg,
    command: Annotated[str, typer.Argument(help="QMP command, e.g. query-status.")],
    arguments: Annotated[str | None, typer.Argument(help="Arguments as a JSON object.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Send a QMP command through libvirt's monitor passthrough and print the reply."""
    from . import qmp as q
    from .connection import lookup

    with connection() as conn:
        reply = q.monitor_command(lookup(conn, name), command, arguments)
    output.emit_json(reply)


@app.command()
@handles_errors
def console(name: NameArg) -> None:
    """Attach to a VM's serial console (leave with Ctrl-]), through virsh."""
    import shutil

    from . import vm
    from .connection import lookup

    with connection() as conn:
        dom = lookup(conn, name)
        if not vm.is_active(dom):
            raise OzoneError(f"{name} is not running", hint=f"`ozone start {name}`")
        uri = conn.getURI()
    virsh = shutil.which("virsh")
    if virsh is None:
        raise OzoneError("virsh is not installed", hint="install libvirt-clients")
    os.execv(virsh, [virsh, "-c", uri, "console", name])


@app.command()
@handles_errors
def logs(
    name: NameArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new output.")
    ] = False,
    lines: Annotated[
        int | None, typer.Option("--lines", "-n", help="Only the last N lines.")
    ] = None,
) -> None:
    """Print a VM's serial console log."""
    from . import vm

    with connection() as conn:
        _print_log(vm.serial_log(conn, name), follow=follow, lines=lines)


def _print_log(log: SerialLog, *, follow: bool, lines: int | None) -> None:
    out = sys.stdout.buffer
    size = log.size()
    if size is None and not follow:
        raise OzoneError(f"no serial log yet at {log.path}", hint="the VM has not been started")
    data = log.read() if size else b""
    if lines is not None:
        data = b"".join(data.splitlines(keepends=True)[-lines:]) if lines > 0 else b""
    out.write(data)
    out.flush()
    if not follow:
        return
    offset = size or 0
    try:
        while True:
            size = log.size() or 0
            if size < offset:  # truncated: the VM restarted
                offset = 0
            if size > offset:
                chunk = log.read(offset)
                offset += len(chunk)
                out.write(chunk)
                out.flush()
            time.sleep(0.2)
    except KeyboardInterrupt:
        return


# --- programs and files in the guest ------------------------------------------------------


def handles_exec_errors(fn: F) -> F:
    """Like :func:`handles_errors`, for commands that pass a guest program's exit status
    through: ozone's own failures exit 125, a timeout 124 (like timeout(1), docker exec)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .errors import EXIT_OZONE, ExecTimeout

        try:
            return fn(*args, **kwargs)
        except ExecTimeout as err:
            output.error(err, as_json=False)
            raise typer.Exit(err.exit_code) from None
        except OzoneError as err:
            output.error(err, as_json=False)
            raise typer.Exit(EXIT_OZONE) from None
        except KeyboardInterrupt as err:
            sys.stderr.write("interrupted\n")
            raise typer.Exit(interrupted_exit_code(err)) from None

    return wrapper  # type: ignore[return-value]


# the options `exec` and `run` share
CommandArg = Annotated[
    list[str] | None, typer.Argument(help="The program and its arguments (after --).")
]
EnvOpt = Annotated[
    list[str] | None,
    typer.Option("--env", "-e", help="NAME=VALUE for the program (NAME alone: the host's)."),
]
CwdOpt = Annotated[str | None, typer.Option("--cwd", "-w", help="Working directory.")]
UserOpt = Annotated[str | None, typer.Option("--user", "-u", help="Run as this user.")]
TimeoutOpt = Annotated[
    float | None,
    typer.Option(help="Kill the program after this many seconds (exit 124).", callback=_seconds),
]
StageOpt = Annotated[
    str | None,
    typer.Option(
        "--stage-dir",
        help="Guest folder for the program's output while it runs (default: the VM's "
        "stage_dir, else /var/tmp).",
    ),
]
InteractiveOpt = Annotated[
    bool, typer.Option("--interactive", "-i", help="Forward this stdin to the program.")
]


def _environment(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            if key not in os.environ:
                raise UsageError(f"--env {key}: no =VALUE and no such variable on the host")
            value = os.environ[key]
        env[key] = value
    return env


def _exec_options(
    env: list[str] | None,
    cwd: str | None,
    user: str | None,
    timeout: float | None,
    stdin: bool,
    stage_dir: str | None,
) -> dict[str, Any]:
    """The keyword arguments of execute.run for `exec` and `run`: the terminal's streams."""
    return {
        "env": _environment(env or []),
        "cwd": cwd,
        "user": user,
        "stdin": sys.stdin.buffer if stdin else None,
        "timeout": timeout,
        "stage_dir": stage_dir,
        "stdout": _stream_to(sys.stdout.fileno()),
        "stderr": _stream_to(sys.stderr.fileno()),
    }


def _stream_to(fd: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return write


@app.command("exec")
@handles_exec_errors
def exec_(
    name: NameArg,
    command: CommandArg = None,
    env: EnvOpt = None,
    cwd: CwdOpt = None,
    user: UserOpt = None,
    timeout: TimeoutOpt = None,
    interactive: InteractiveOpt = False,
    stage_dir: StageOpt = None,
    sync_clock: Annotated[
        bool, typer.Option("--sync-clock", help="Set the guest clock from the host's first.")
    ] = False,
) -> None:
    """Run a program in the guest: its output streams here, ozone exits with its status.

    `ozone exec [OPTIONS] NAME -- PROGRAM [ARGS]...` (the `--` keeps the program's own
    options away from ozone's)
    """
    from . import execute

    exec_options = _exec_options(env, cwd, user, timeout, interactive, stage_dir)
    with connection() as conn:
        code = execute.run_in(conn, name, command or [], sync_clock=sync_clock, **exec_options)
    raise typer.Exit(code)


@app.command()
@handles_errors
def cp(
    source: Annotated[str, typer.Argument(help="A host path, or NAME:/guest/path.")],
    destination: Annotated[str, typer.Argument(help="A host path, or NAME:/guest/path.")],
    as_json: JsonOpt = False,
) -> None:
    """Copy a file into or out of a guest (a destination ending in / is a directory)."""
    from . import transfer
    from .agent import Agent
    from .connection import lookup

    src_vm, src_path = transfer.parse_location(source)
    dst_vm, dst_path = transfer.parse_location(destination)
    if (src_vm is None) == (dst_vm is None):
        raise UsageError(
            "one side of cp must be NAME:/path in a guest, the other a host path",
            hint="e.g. `ozone cp app.tar web:/tmp/` or `ozone cp web:/var/log/syslog .`",
        )
    with connection() as conn:
        agent = Agent(lookup(conn, src_vm or dst_vm or ""))
        with output.progress_bar(
            f"{source} → {destination}", enabled=not as_json, total=_size_of(src_vm, src_path)
        ) as advance:
            if src_vm is None:
                result = transfer.copy_to_guest(agent, Path(src_path), dst_path, progress=advance)
            else:
                result = transfer.copy_from_guest(agent, src_path, dst_path, progress=advance)
    if as_json:
        output.emit_json(result)
    else:
        output.info(f"copied {result.bytes} bytes to {result.destination}")


def _size_of(guest: str | None, path: str) -> int | None:
    if guest is not None:
        return None  # unknown here: the bar shows bytes and speed without a total
    try:
        return os.stat(path).st_size
    except OSError:
        return None


@app.command()
@handles_errors
def clock(
    name: NameArg,
    sync: Annotated[
        bool, typer.Option("--sync", help="Set the guest clock from the host.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show how far the guest's clock is from the host's; --sync sets it."""
    from .agent import Agent
    from .connection import lookup

    with connection() as conn:
        agent = Agent(lookup(conn, name))
        offset = agent.set_time() if sync else agent.clock_offset()
    if as_json:
        output.emit_json({"name": name, "offset_s": round(offset, 3), "synced": sync})
    elif sync:
        output.emit(f"Set {name}'s clock from the host (it was {offset:+.3f} s off)")
    else:
        output.emit(f"{name}'s clock is {offset:+.3f} s from the host's")


# --- snapshots, saved state ------------------------------------------------------------------

snapshot_app = typer.Typer(
    help="Snapshots of a VM (with memory when it runs).", no_args_is_help=True
)
app.add_typer(snapshot_app, name="snapshot")
SnapArg = Annotated[
    str,
    typer.Argument(
        help="Snapshot name.", show_default=False, autocompletion=completion.snapshot_names
    ),
]


@snapshot_app.command("create")
@handles_errors
def snapshot_create(
    name: NameArg,
    snap: Annotated[str | None, typer.Argument(help="Snapshot name (default: snap-DATE).")] = None,
    description: Annotated[str, typer.Option(help="Free text kept with it.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Take a snapshot: disks and memory of a running VM, disks of a shut-off one."""
    from . import snapshots

    with connection() as conn, progress(f"Snapshotting {name}…", as_json):
        info = snapshots.create(conn, name, snap, description)
    if as_json:
        output.emit_json(info)
    else:
        what = "disks and memory" if info.memory else "disks"
        output.emit(f"Created snapshot {info.name} of {name} ({what}, {info.state})")


@snapshot_app.command("list")
@handles_errors
def snapshot_list(name: NameArg, as_json: JsonOpt = False) -> None:
    """List a VM's snapshots: name, creation time, state captured, parent."""
    from . import snapshots

    with connection() as conn:
        infos = snapshots.list_snapshots(conn, name)
    if as_json:
        output.emit_json(infos)
        return
    rows = [
        [
            i.name + (" *" if i.current else ""),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created)),
            i.state,
            i.parent,
        ]
        for i in infos
    ]
    output.emit(output.table(["NAME", "CREATED", "STATE", "PARENT"], rows))


@snapshot_app.command("revert")
@handles_errors
def snapshot_revert(name: NameArg, snap: SnapArg, as_json: JsonOpt = False) -> None:
    """Go back to a snapshot (a running VM stays running; its clock is set from the host)."""
    from . import snapshots

    with connection() as conn, progress(f"Reverting {name} to {snap}…", as_json):
        result = snapshots.revert(conn, name, snap)
    if as_json:
        output.emit_json(result)
    else:
        output.emit(f"Reverted {name} to {snap} ({result.state})")


@snapshot_app.command("delete")
@handles_errors
def snapshot_delete(name: NameArg, snap: SnapArg, as_json: JsonOpt = False) -> None:
    """Delete a snapshot."""
    from . import snapshots

    with connection() as conn:
        snapshots.delete(conn, name, snap)
    if as_json:
        output.emit_json({"name": name, "deleted": snap})
    else:
        output.emit(f"Deleted snapshot {snap} of {name}")


@app.command()
@handles_errors
def save(name: NameArg, as_json: JsonOpt = False) -> None:
    """Save a running VM's state to disk and stop it; `ozone start` resumes it."""
    from . import snapshots

    with connection() as conn, progress(f"Saving {name}…", as_json):
        result = snapshots.save(conn, name)
    if as_json:
        output.emit_json(result)
    else:
        output.emit(f"Saved {name} in {result.seconds:.1f} s (`ozone start {name}` resumes it)")


@app.command()
@handles_errors
def migrate(
    name: NameArg,
    host: Annotated[
        str,
        typer.Argument(
            help="Destination: a host of the inventory, or a libvirt URI (qemu+ssh://host/system).",
            autocompletion=completion.host_names,
        ),
    ],
    live: Annotated[
        bool, typer.Option("--live", help="Keep the VM running while its memory moves.")
    ] = False,
    copy_storage: Annotated[
        bool,
        typer.Option(
            "--copy-storage", help="Copy its disks too (for disks not on shared storage)."
        ),
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout", help="Abort the move after S seconds (the VM stays).", callback=_seconds
        ),
    ] = 600,
    as_json: JsonOpt = False,
) -> None:
    """Move a VM to another libvirt host: same UUID, metadata and QMP endpoint; a failed
    move leaves it running where it was. A stopped VM moves its definition."""
    from . import migrate as mig

    label, uri = mig.resolve_host(host)
    with (
        connection() as conn,
        output.activity(f"Moving {name}:", enabled=not as_json) as (report, advance),
    ):
        result = mig.migrate(
            conn,
            name,
            uri,
            live=live,
            copy_storage=copy_storage,
            host=label,
            timeout=timeout,
            report=report,
            progress=advance,
        )
    if as_json:
        output.emit_json(result)
        return
    where = label if label == uri else f"{label} ({uri})"
    copied = f", {result.bytes_copied / 2**20:.0f} MiB copied" if result.bytes_copied else ""
    output.emit(f"Migrated {name} to {where} in {result.seconds:.1f} s ({result.mode}{copied})")
    for folder in result.made_on_destination:
        output.info(f"made {folder} there")
    for disk in result.left_on_source:
        output.info(f"the source host keeps {disk} (copied; remove it there when done)")


# --- ozone run, boot cache -----------------------------------------------------------------


@app.command("run")
@handles_exec_errors
def run_(
    config: ConfigArg,
    command: CommandArg = None,
    keep: Annotated[bool, typer.Option("--keep", help="Leave the VM running afterwards.")] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Boot, do not use or fill the boot cache.")
    ] = False,
    env: EnvOpt = None,
    cwd: CwdOpt = None,
    user: UserOpt = None,
    timeout: TimeoutOpt = None,
    interactive: InteractiveOpt = False,
    stage_dir: StageOpt = None,
    boot_timeout: Annotated[
        float,
        typer.Option(help="Seconds to wait for the guest agent when booting.", callback=_seconds),
    ] = 120,
    host: HostOpt = None,
) -> None:
    """Run one command in a throwaway VM made from a config, then remove the VM.

    `ozone run [OPTIONS] CONFIG -- PROGRAM [ARGS]...`

    The VM is restored from the boot cache when it holds this config's booted state (else
    booted, and the cache filled); it runs on a fresh overlay over the config's disks, which
    are never written.
    """
    from . import run as runner

    _command_host(host)
    exec_options = _exec_options(env, cwd, user, timeout, interactive, stage_dir)
    from .hosts import AUTO

    named = target() if G.host != AUTO else Target()  # where a VM NAME is looked up
    cfg = runner.config_of(config, uri=named.uri, host=named.host)
    options = runner.RunOptions(
        keep=keep,
        use_cache=not no_cache,
        boot_timeout=boot_timeout,
        report=output.info if G.verbose else (lambda _text: None),
    )
    with connection(target(cfg)) as conn:
        code = runner.run(conn, cfg, command or [], options, **exec_options)
    raise typer.Exit(code)


cache_app = typer.Typer(help="The boot cache of `ozone run`.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("list")
@handles_errors
def cache_list(as_json: JsonOpt = False) -> None:
    """Show the boot cache's entries: key, config, slots filled, size on disk, age (and the
    host their saved states are on, when it is not this machine)."""
    from . import cache
    from .units import human_size

    entries = cache.list_cache()
    if as_json:
        output.emit_json(entries)
        return
    rows = [
        [e.key, e.config or e.name, e.slots, human_size(e.bytes), f"{e.age_s / 60:.0f} min"]
        for e in entries
    ]
    headers = ["KEY", "CONFIG", "SLOTS", "SIZE", "AGE"]
    if any(e.host is not None for e in entries):  # states on other hosts: say where
        headers.append("HOST")
        for row, entry in zip(rows, entries, strict=True):
            row.append(entry.host or "this machine")
    output.emit(output.table(headers, rows))


@cache_app.command("clear")
@handles_errors
def cache_clear(
    config: Annotated[
        str | None,
        typer.Argument(
            help="Only this config's entries (its path or name).",
            autocompletion=completion.config_names,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Drop boot cache entries (all, or one config's) of the connected host; entries in use
    stay, and so do those of other hosts."""
    from . import cache

    if config is not None:
        from .config import find_config

        with contextlib.suppress(OzoneError):  # a config file (by path or name), else a name
            config = str(find_config(config))
    with connection() as conn:
        removed = cache.clear_cache(conn, config=config)
    if as_json:
        output.emit_json({"removed": removed})
    else:
        output.emit(f"Removed {len(removed)} boot cache entr{'y' if len(removed) == 1 else 'ies'}")


image_app = typer.Typer(
    help="The image store: base images built from Debian packages or downloaded.",
    no_args_is_help=True,
)
app.add_typer(image_app, name="image")


def _obtained(result: Any, as_json: bool, verb: str) -> None:
    if as_json:
        output.emit_json(result)
    elif result.made:
        output.emit(f"{verb} {result.id} in {result.seconds:.1f} s: {result.path}")
    else:
        output.emit(f"{result.id} is in the store: {result.path}")


@image_app.command("build")
@handles_errors
def image_build(config: ConfigArg, as_json: JsonOpt = False) -> None:
    """Build the image a config names (image: {debian: SUITE, packages: [...]}) unless the
    store has it."""
    from . import imagestore

    cfg = load(config)
    with connection() as conn, output.activity("Building:", enabled=not as_json) as steps:
        result = imagestore.build_config_image(conn, cfg, report=steps[0])
    _obtained(result, as_json, "built")


@image_app.command("pull")
@handles_errors
def image_pull(
    source: Annotated[str, typer.Argument(help="A URL (http, https, file) or a catalogue name.")],
    sha256: Annotated[str | None, typer.Option(help="The image's SHA-256.")] = None,
    sha512: Annotated[str | None, typer.Option(help="The image's SHA-512.")] = None,
    checksum_url: Annotated[
        str | None, typer.Option(help="A SHA256SUMS/SHA512SUMS file naming the image.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Download an image into the store, verified, unless the store has it. Names:
    debian-12, debian-13, ubuntu-22.04, ubuntu-24.04."""
    from . import imagestore

    with connection() as conn, output.activity("Pulling:", enabled=not as_json) as steps:
        result = imagestore.pull_image(
            conn,
            source,
            sha256=sha256,
            sha512=sha512,
            checksum_url=checksum_url,
            report=steps[0],
            progress=steps[1],
        )
    _obtained(result, as_json, "pulled")


@image_app.command("list")
@handles_errors
def image_list(as_json: JsonOpt = False) -> None:
    """Show the store's images: id, source, size on disk, VMs using them, age."""
    import time

    from . import imagestore
    from .units import human_size

    with connection() as conn:
        found = imagestore.list_images(conn)
    if as_json:
        output.emit_json(found)
        return
    rows = [
        [
            i.id,
            i.source,
            human_size(i.bytes),
            ", ".join(i.used_by) or "-",
            f"{(time.time() - i.created) / 3600:.1f} h",
        ]
        for i in found
    ]
    output.emit(output.table(["IMAGE", "SOURCE", "SIZE", "USED BY", "AGE"], rows))


@image_app.command("rm")
@handles_errors
def image_rm(
    image: Annotated[str, typer.Argument(help="Image id (or a unique prefix, or its name).")],
    as_json: JsonOpt = False,
) -> None:
    """Delete an image no VM uses (its boot cache entries go with it)."""
    from . import imagestore

    with connection() as conn:
        removed = imagestore.remove_image(conn, image)
    if as_json:
        output.emit_json({"removed": removed})
    else:
        output.emit("removed " + ", ".join(removed))


@app.command()
@handles_errors
def gc(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", "-n", help="Only show what would be removed.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove what ozone processes that died left behind: throwaway VMs and their overlays,
    half-copied files, empty boot cache entries, stale QMP sockets."""
    from . import gc as janitor

    with connection() as conn:
        result = janitor.collect(conn, dry_run=dry_run)
    if as_json:
        output.emit_json(result)
        return
    verb = "would remove" if dry_run else "removed"
    for item in result.removed:
        output.emit(f"{verb} {item}")
    for item in result.kept:
        output.emit(f"left {item}")
    if not result.removed and not result.kept:
        output.emit("nothing to remove")


@app.command()
@handles_errors
def apply(
    targets: Annotated[
        list[str],
        typer.Argument(
            help="Config folders, files or names.",
            show_default=False,
            autocompletion=completion.config_names,
        ),
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Apply without asking.")] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="Restart running VMs whose change needs it.")
    ] = False,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="Undefine ozone VMs defined from a folder's configs that "
            "are gone (their disks stay).",
        ),
    ] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, max=32, help="Steps at once.")] = 4,
    host: HostOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make libvirt's VMs match their configs: show the plan, then (after asking, or with
    --yes) create, change, restart (--restart) and prune (--prune) what differs."""
    from . import converge
    from .plan import describe

    _command_host(host)
    configs = converge.load(targets)
    with connection(_apply_target(configs.configs, as_json)) as conn:
        the_plan = converge.make_plan(conn, configs, prune=prune)
        width = max((len(s.name) for s in the_plan.steps), default=0)
        if not as_json:
            output.emit(the_plan.summary())
            for step in the_plan.steps:
                output.emit(describe(step, width))
        go = the_plan.changes_anything and (yes or _confirmed("apply this plan?", as_json))
        results = []
        if go:

            def report(name: str, text: str) -> None:
                if not as_json:
                    output.info(f"{name}: {text}")

            results = converge.execute(
                conn, the_plan, configs, restart=restart, jobs=jobs, report=report
            )
    failed = [r for r in results if not r.ok]
    if as_json:
        output.emit_json(converge.Applied(the_plan, go, tuple(results)))
    elif the_plan.changes_anything and not go:
        output.info("nothing changed: `--yes` applies the plan")
    else:
        for result in failed:
            assert result.error is not None
            output.info(f"error: {result.name}: {result.error.message}")
            if result.error.hint:
                output.info(f"hint: {result.error.hint}")
        for result in results:
            if result.action == "restart-needed" and result.done != "restarted" and result.ok:
                output.info(f"{result.name}: takes the change at its next start (--restart: now)")
        if go:
            changed = sum(1 for r in results if r.ok and r.done != "nothing")
            output.info(f"applied: {changed} changed, {len(failed)} failed")
    if failed:
        raise typer.Exit(EXIT_FAILED)


def _apply_target(configs: tuple[VMConfig, ...], as_json: bool) -> Target:
    """The one host `apply` works on: -c or --host NAME, else the one the configs' ``host``
    names (or ``auto`` picks for each); configs that live on different hosts are applied
    one host at a time."""
    from .hosts import AUTO

    if G.uri is not None or G.host not in (None, AUTO) or not any(c.host for c in configs):
        return target()
    where = {c.name: target(c, as_json=as_json) for c in configs}
    if len({t.host for t in where.values()}) > 1:
        found = ", ".join(f"{name} on {t.host or 'the default URI'}" for name, t in where.items())
        raise UsageError(
            f"these configs live on more than one host ({found}): apply takes one host at a time",
            hint="apply each host's configs on their own, or pick one with --host NAME",
        )
    return next(iter(where.values()))


def _confirmed(question: str, as_json: bool) -> bool:
    """Asked on a terminal only: without one (a script, CI) the answer is no."""
    if as_json or not (sys.stdin.isatty() and sys.stdout.isatty()):
        return False
    return bool(typer.confirm(question, default=False))


@app.command()
@handles_errors
def diff(
    target: Annotated[
        str,
        typer.Argument(
            help="VM name or config (name or path).",
            show_default=False,
            autocompletion=completion.vm_or_config_names,
        ),
    ],
    as_json: JsonOpt = False,
) -> None:
    """Show how the domain XML libvirt holds differs from what the config makes (a unified
    diff, without what libvirt adds by itself); nothing when they agree."""
    from . import converge

    with connection() as conn:
        text = converge.diff(conn, target)
    if as_json:
        output.emit_json({"same": not text, "diff": text})
    elif text:
        output.emit(text)


@app.command()
def schema() -> None:
    """Print the config's JSON Schema (draft 2020-12), for editors that validate and complete
    YAML and JSON."""
    from .schema import json_schema

    output.emit_json(json_schema())


def _terminate(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def main() -> None:
    import signal

    from typer._click import exceptions as click_errors  # typer's own click (pinned typer)

    # SIGTERM unwinds like Ctrl-C (every clean-up runs) and exits 143, as a shell reports it
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(prog_name="ozone", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as err:
        err.show()
        code = err.exit_code
    except click_errors.UsageError as err:
        # a command line ozone cannot parse: one line and a hint, exit 2
        command = err.ctx.command_path if err.ctx else "ozone"
        sys.stderr.write(f"error: {err.format_message()}\nhint: `{command} --help`\n")
        code = err.exit_code
    except click_errors.ClickException as err:
        err.show()
        code = err.exit_code
    except typer.Abort:
        sys.stderr.write("aborted\n")
        code = EXIT_FAILED
    except SystemExit as exc:
        code = exc.code
    sys.exit(code if isinstance(code, int) else (0 if code is None else EXIT_FAILED))


if __name__ == "__main__":
    main()
