"""QMP: the per-VM passthrough endpoint (choice and checks) and commands sent through
libvirt's monitor passthrough, which also works over remote URIs."""

from __future__ import annotations

import json
import socket
from typing import Any

import libvirt
import libvirt_qemu

from .connection import call
from .errors import QMPError, UsageError


def tcp_port_free(host: str, port: int, *, protocol: str = "tcp") -> bool:
    """Can something listen on host:port (``protocol`` tcp or udp) right now?"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    with socket.socket(family, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def command_json(command: str, arguments: str | None) -> str:
    """Build the QMP request; ``arguments`` is a JSON object given on the command line."""
    request: dict[str, Any] = {"execute": command}
    if arguments:
        try:
            args = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise UsageError(
                f"the QMP arguments are not valid JSON: {err.msg} at column {err.colno}",
                hint='quote them for the shell, e.g. \'{"device": "ide1-cd0"}\'',
            ) from None
        if not isinstance(args, dict):
            raise UsageError("the QMP arguments must be a JSON object, e.g. '{\"id\": 1}'")
        request["arguments"] = args
    return json.dumps(request)


def monitor_command(dom: libvirt.virDomain, command: str, arguments: str | None = None) -> Any:
    """Send one QMP command through libvirt and return its ``return`` value."""
    request = command_json(command, arguments)
    reply_text = call(libvirt_qemu.qemuMonitorCommand, dom, request, 0, name=dom.name())
    reply = json.loads(reply_text)
    if "error" in reply:
        problem = reply["error"]
        raise QMPError(
            f"{command}: {problem.get('desc', problem)} ({problem.get('class', 'Error')})"
        )
    return reply.get("return")
