"""The CLI's one output channel: data to stdout (text or one JSON document), errors to
stderr as one line plus a hint (or, with --json, as ``{"error": {...}}`` on stdout), and
progress spinners only on a terminal."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from .errors import OzoneError
from .results import OMIT_NONE


def to_json(obj: Any) -> Any:
    """The one encoder of ``--json`` output: a library result (a dataclass, its fields in
    order, leaving out an :func:`.results.optional` field while None), a NamedTuple or a
    mapping become an object; lists, tuples and sets an array; an error its
    ``{"code", "message", "hint"}``; anything else not JSON already (a path) its string."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_json(value)
            for f in dataclasses.fields(obj)
            if (value := getattr(obj, f.name)) is not None or not f.metadata.get(OMIT_NONE)
        }
    if isinstance(obj, OzoneError):
        return obj.to_dict()
    if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
        return to_json(obj._asdict())
    if isinstance(obj, Mapping):
        return {str(key): to_json(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_json(item) for item in obj]
    if obj is None or isinstance(obj, str | int | float):
        return obj
    return str(obj)


def json_text(obj: Any, *, indent: int | None = 2) -> str:
    return json.dumps(to_json(obj), indent=indent)


def emit_json(data: Any) -> None:
    sys.stdout.write(json_text(data) + "\n")


def emit(text: str) -> None:
    sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))


def info(text: str) -> None:
    """A human-oriented status line (stderr, so stdout stays clean for data)."""
    sys.stderr.write(text + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns two spaces apart. A row shorter than the headers ends in a note that runs on
    across the columns it lacks, without widening them."""
    cells = [[str(c) for c in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [
        max(len(row[i]) for row in cells if i < len(row) - (len(row) < len(headers)))
        for i in range(len(headers))
    ]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def error(err: OzoneError, *, as_json: bool) -> None:
    if as_json:
        emit_json({"error": err.to_dict()})
        return
    message = err.message.replace("\n", " ")
    sys.stderr.write(f"error: {message}\n")
    if err.hint:
        sys.stderr.write(f"hint: {err.hint}\n")


@contextlib.contextmanager
def spinner(text: str, *, enabled: bool = True) -> Iterator[None]:
    """A rich spinner on stderr while the block runs; nothing when not on a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(text):
        yield


@contextlib.contextmanager
def progress_bar(
    text: str, *, enabled: bool = True, total: int | None = None
) -> Iterator[Callable[[int], None] | None]:
    """A rich transfer bar on stderr, advanced by the callable it yields (None when not on a
    terminal)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    with Progress(*columns, TransferSpeedColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task(text, total=total)
        yield lambda n: bar.advance(task, n)


Report = Callable[[str], None]
Advance = Callable[[int, int | None], None]


@contextlib.contextmanager
def activity(text: str, *, enabled: bool = True) -> Iterator[tuple[Report, Advance]]:
    """A long operation's progress on stderr (a terminal only): a spinner whose line the
    first callable replaces, and a byte count with speed the second one sets (done, total)."""
    if not enabled or not sys.stderr.isatty():
        yield (lambda _text: None), (lambda _done, _total: None)
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(escape(text), total=None)
        state: dict[str, Any] = {}

        def report(line: str) -> None:  # a line may hold "[...]" (a URL): not markup
            bar.update(task, description=escape(f"{text} {line}"))

        def advance(done: int, total: int | None) -> None:
            if "bytes" not in state:
                state["bytes"] = bar.add_task("", total=total)
                bar.columns = (*columns, BarColumn(), DownloadColumn(), TransferSpeedColumn())
            bar.update(state["bytes"], completed=done, total=total)

        yield report, advance
