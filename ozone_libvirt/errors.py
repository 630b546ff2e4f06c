"""ozone's error hierarchy.

Every failure a user can cause or meet is one of these: a one-line message, an optional hint
that says how to fix it, a stable machine-readable ``code`` (used in ``--json`` errors) and the
process exit code the CLI uses. libvirt's own errors are translated into these in exactly one
place, :func:`ozone_libvirt.connection.translate`.
"""

from __future__ import annotations

from typing import Protocol

EXIT_FAILED = 1  # the operation failed
EXIT_USAGE = 2  # bad usage or bad config
EXIT_TIMEOUT = 124  # exec/run: the guest program ran out of time (like timeout(1))
EXIT_OZONE = 125  # exec/run: ozone itself failed (like docker exec)


class ExecResultLike(Protocol):
    argv: list[str]
    exit_code: int


class OzoneError(Exception):
    """Base class: ``message`` says what is wrong, ``hint`` how to fix it."""

    code = "failed"
    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "hint": self.hint}


class ConfigError(OzoneError):
    """A VM config is unreadable or invalid. Names the file and the field path."""

    code = "bad-config"
    exit_code = EXIT_USAGE

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.file = file
        self.field = field
        prefix = ""
        if file:
            prefix = f"{file}: "
        if field:
            prefix += f"{field}: "
        super().__init__(prefix + message, hint=hint)


class UsageError(OzoneError):
    """The command line itself is wrong."""

    code = "bad-usage"
    exit_code = EXIT_USAGE


class NotFoundError(OzoneError):
    """A VM (domain), config or file that was named does not exist."""

    code = "not-found"


class ConflictError(OzoneError):
    """The request clashes with something that exists (a name, a QMP endpoint, a port)."""

    code = "conflict"


class StateError(OzoneError):
    """The VM is in the wrong state for the operation (e.g. not running)."""

    code = "bad-state"


class ConnectionFailed(OzoneError):
    """libvirt cannot be reached."""

    code = "connection"


class ConnectionLost(ConnectionFailed):
    """An open libvirt connection broke (libvirtd restarted or died, the network dropped):
    the VM itself may well be running on."""

    code = "connection-lost"


class TimeoutExpired(OzoneError):
    """A bounded wait ran out."""

    code = "timeout"


class AgentError(OzoneError):
    """The QEMU guest agent is missing, not answering, or returned an error."""

    code = "agent"


class RequestTooLarge(AgentError):
    """A request bigger than the guest agent reliably takes (it stalls on them)."""


class AgentCommandFailed(AgentError):
    """The guest agent ran the command and reported an error (``detail`` is its message)."""

    def __init__(self, command: str, detail: str, *, name: str | None = None) -> None:
        self.command = command
        self.detail = detail
        where = f" in {name}" if name else ""
        super().__init__(f"{command}{where}: {detail}")


class ExecFailed(OzoneError):
    """ozone could not run the program in the guest (not the program's own failure)."""

    code = "exec"
    exit_code = EXIT_OZONE


class ExecTimeout(TimeoutExpired):
    """The guest program ran past its timeout and was killed."""

    exit_code = EXIT_TIMEOUT

    def __init__(
        self, message: str, *, stdout: bytes | None = None, stderr: bytes | None = None
    ) -> None:
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr


class ExitError(OzoneError):
    """``check=True`` and the guest program exited with a non-zero status."""

    code = "exit-status"

    def __init__(self, result: ExecResultLike) -> None:
        self.result = result
        self.exit_code = result.exit_code
        super().__init__(f"`{' '.join(result.argv)}` exited with status {result.exit_code}")


class QMPError(OzoneError):
    """A QMP command failed (the reply carried an error)."""

    code = "qmp"


class LibvirtFailure(OzoneError):
    """Any other libvirt error, with libvirt's own message."""

    code = "libvirt"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the command stops (after cleaning up) and exits 128+N,
    like a shell reports a process killed by signal N (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int = 2) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def interrupted_exit_code(err: KeyboardInterrupt) -> int:
    return err.exit_code if isinstance(err, Interrupted) else 130
