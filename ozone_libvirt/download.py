"""Download a file (an installer ISO, a cloud image) over http, https or file://, checked
against a SHA-256 or SHA-512 digest, resumable.

The body goes to a *partial* file the caller names; a later call with the same partial picks
up where the last one stopped (``Range: bytes=N-``). Only a body whose digest matches is
moved to ``dest``; a mismatch deletes the partial. Proxies come from the usual environment
variables (``http_proxy``, ``https_proxy``, ``no_proxy``), as urllib reads them. Every
failure is a one-line :class:`DownloadError` (or :class:`~.errors.UsageError` for a bad
URL or checksum): no traceback escapes. Pure standard library; nothing here talks to libvirt.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import http
import http.client
import os
import posixpath
import re
import shutil
import stat
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, NoReturn, TypeVar

import ozone_libvirt

from .errors import OzoneError, UsageError

CHUNK = 1 << 16
SUMS_LIMIT = 1 << 20
PROGRESS_INTERVAL = 0.1  # seconds: progress() runs at most ~10 times a second
_SCHEMES = ("http", "https", "file")
_ALGO_BY_LENGTH: dict[int, Literal["sha256", "sha512"]] = {64: "sha256", 128: "sha512"}
_LENGTH_OF = {"sha256": 64, "sha512": 128}


class DownloadError(OzoneError):
    """A download failed: the server, the network, or the file's checksum."""

    code = "download-failed"


@dataclass(frozen=True)
class Checksum:
    """The digest a downloaded file must have; ``hex`` is lowercase."""

    algo: Literal["sha256", "sha512"]
    hex: str

    def __str__(self) -> str:
        return f"{self.algo}:{self.hex}"

    def short(self) -> str:
        """For messages: ``sha256:1234abcd5678ef90…`` (at most 16 hex digits)."""
        tail = "…" if len(self.hex) > 16 else ""
        return f"{self.algo}:{self.hex[:16]}{tail}"


# --- checksums -----------------------------------------------------------------------------

# GNU coreutils: "HEX  NAME" (text mode) or "HEX *NAME" (binary mode); a leading backslash
# means NAME has its backslashes and newlines escaped
_GNU_LINE = re.compile(r"(?P<escaped>\\?)(?P<hex>[0-9A-Fa-f]+) [ *](?P<name>.+)")
# BSD / `sha256sum --tag`: "SHA256 (NAME) = HEX"
_BSD_LINE = re.compile(
    r"(?P<tag>SHA-?(?:2-)?(?:256|512)) ?\((?P<name>.+)\) ?= ?(?P<hex>[0-9A-Fa-f]+)"
)


def _unescape_gnu(name: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), name)


def _sums_entries(text: str) -> Iterator[tuple[str, str]]:
    """(name, hex) for each entry of a SHA256SUMS-style file, in order."""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        bsd = _BSD_LINE.fullmatch(line)
        if bsd:
            yield bsd["name"], bsd["hex"]
            continue
        gnu = _GNU_LINE.fullmatch(line)
        if gnu:
            name = _unescape_gnu(gnu["name"]) if gnu["escaped"] else gnu["name"]
            yield name, gnu["hex"]


def checksum_from_sums(text: str, filename: str, *, source: str) -> Checksum:
    """The checksum a SHA256SUMS / SHA512SUMS file (GNU or BSD format) lists for
    ``filename``; the algorithm follows from the digest's length. ``source`` (a URL or path)
    only names the file in errors."""
    for name, hex_digest in _sums_entries(text):
        if name.removeprefix("./") != filename:
            continue
        algo = _ALGO_BY_LENGTH.get(len(hex_digest))
        if algo is not None:
            return Checksum(algo, hex_digest.lower())
    raise DownloadError(
        f"{show_url(source)} lists no SHA-256 or SHA-512 checksum for {filename!r}",
        hint="check that the checksum file belongs to this release and names this file",
    )


def _parse_hex(value: str, algo: Literal["sha256", "sha512"]) -> Checksum:
    text = value.strip().lower().removeprefix(f"{algo}:")
    if len(text) != _LENGTH_OF[algo] or not re.fullmatch(r"[0-9a-f]+", text):
        raise UsageError(
            f"{algo} {value!r} is not a {algo} digest",
            hint=f"a {algo} digest is {_LENGTH_OF[algo]} hex digits (as `{algo}sum` prints)",
        )
    return Checksum(algo, text)


def resolve_checksum(
    url: str,
    *,
    sha256: str | None = None,
    sha512: str | None = None,
    checksum_url: str | None = None,
    timeout: float = 30,
) -> Checksum:
    """The checksum ``url``'s file must have, from exactly one of: a SHA-256 digest, a
    SHA-512 digest (each optionally prefixed ``sha256:`` / ``sha512:``), or the URL of a
    SHA256SUMS-style file that lists the basename of ``url``'s path."""
    given = [v for v in (sha256, sha512, checksum_url) if v is not None]
    if len(given) != 1:
        raise UsageError(
            "give exactly one of sha256, sha512 or checksum_url "
            f"({'none' if not given else f'{len(given)}'} given)",
            hint="the digest is on the download page, or in its SHA256SUMS / SHA512SUMS file",
        )
    if sha256 is not None:
        return _parse_hex(sha256, "sha256")
    if sha512 is not None:
        return _parse_hex(sha512, "sha512")
    assert checksum_url is not None
    filename = _basename(url)
    return checksum_from_sums(
        fetch_text(checksum_url, timeout=timeout, limit=SUMS_LIMIT),
        filename,
        source=checksum_url,
    )


def _basename(url: str) -> str:
    parts = _split(url)
    name = posixpath.basename(urllib.parse.unquote(parts.path))
    if not name:
        raise UsageError(
            f"{show_url(url)} names no file",
            hint="a checksum file lists file names: the URL must end in one",
        )
    return name


# --- URLs ----------------------------------------------------------------------------------


def show_url(url: str, *, width: int = 80) -> str:
    """``url`` for a message: without user:password@, on one line, at most ``width`` chars."""
    shown = url
    with contextlib.suppress(ValueError):
        parts = urllib.parse.urlsplit(url)
        if "@" in parts.netloc:
            shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    shown = " ".join(shown.split())
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def _split(url: str) -> urllib.parse.SplitResult:
    """``url`` split, checked: a scheme we handle, a host for http(s), a numeric port."""
    try:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme in ("http", "https") and not parts.hostname:
            raise ValueError("no host")
        _ = parts.port  # raises ValueError for a bad one
    except ValueError as err:
        raise UsageError(
            f"{show_url(url)} is not a valid URL ({err})",
            hint="give an http://, https:// or file:// URL",
        ) from None
    if scheme not in _SCHEMES:
        raise UsageError(
            f"unsupported URL scheme {scheme + ':' if scheme else '(none)'} in {show_url(url)}",
            hint="give an http://, https:// or file:// URL",
        )
    if scheme == "file" and parts.netloc not in ("", "localhost"):
        raise UsageError(
            f"{show_url(url)} names a file on another host ({parts.netloc})",
            hint="file:// URLs name local files: file:///path/to/file",
        )
    return parts


def _host(parts: urllib.parse.SplitResult) -> str:
    host = parts.hostname or "?"
    return f"{host}:{parts.port}" if parts.port else host


def _user_agent() -> str:
    version = getattr(ozone_libvirt, "__version__", None)
    return f"ozone/{version}" if version else "ozone"


class _NoFTP(urllib.request.FTPHandler):
    """A redirect to ftp:// would escape the stall timeout and the checks: refuse it."""

    def ftp_open(self, req: urllib.request.Request) -> NoReturn:
        raise urllib.error.URLError("redirected to an ftp:// URL, which ozone does not fetch")


def _request(parts: urllib.parse.SplitResult) -> urllib.request.Request:
    """A GET for ``parts``; credentials in the URL become a Basic header that is not sent
    on to another host after a redirect."""
    netloc = parts.netloc.rpartition("@")[2]
    request = urllib.request.Request(
        parts._replace(netloc=netloc).geturl(),
        headers={"User-Agent": _user_agent(), "Accept-Encoding": "identity"},
    )
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        request.add_unredirected_header("Authorization", f"Basic {token}")
    return request


# --- sources: where the bytes come from ----------------------------------------------------


class _Restart(Exception):
    """The server cannot continue the partial file (416, or a range we did not ask for)."""


@dataclass
class _Body:
    read: Callable[[], bytes]  # b"" at the end
    start: int  # where in the file the body begins: the resume offset, or 0
    total: int | None  # the whole file's size, when known
    close: Callable[[], None]


def _reason(err: BaseException) -> str:
    """One line from an exception, without urllib's and errno's wrapping."""
    while isinstance(err, urllib.error.URLError) and isinstance(err.reason, BaseException):
        err = err.reason
    if isinstance(err, urllib.error.URLError):
        text = str(err.reason)
    elif isinstance(err, http.client.IncompleteRead):
        text = "the connection closed early"
    elif isinstance(err, http.client.BadStatusLine) and not isinstance(err, ConnectionError):
        text = f"not an HTTP answer: {err}"
    elif isinstance(err, OSError) and err.strerror:
        text = err.strerror
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def _status_line(code: int, reason: str) -> str:
    if not reason:
        with contextlib.suppress(ValueError):
            reason = http.HTTPStatus(code).phrase
    return f"HTTP {code} {' '.join(reason.split())}".rstrip()


def _open_file(parts: urllib.parse.SplitResult, have: int, url: str) -> _Body:
    path = urllib.request.url2pathname(urllib.parse.unquote(parts.path))
    try:
        # non-blocking: a FIFO must not hang the open; only a regular file is an image
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise DownloadError(f"cannot read {show_url(url)}: {_reason(err)}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DownloadError(f"{show_url(url)} is not a regular file")
    os.set_blocking(fd, True)
    handle = os.fdopen(fd, "rb")
    try:
        total = os.fstat(handle.fileno()).st_size
        if have and have >= total:
            raise _Restart  # like HTTP 416: what is there is not a prefix of the file
        handle.seek(have)
    except OSError as err:
        raise DownloadError(f"cannot read {show_url(url)}: {_reason(err)}") from None
    except BaseException:
        handle.close()
        raise
    return _Body(lambda: handle.read(CHUNK), have, total, handle.close)


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """(first byte, total size or None) from ``bytes FIRST-LAST/TOTAL``."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not match:
        return None
    return int(match[1]), None if match[3] == "*" else int(match[3])


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value and value.strip().isdigit() else None


def _open_http(parts: urllib.parse.SplitResult, have: int, *, timeout: float, url: str) -> _Body:
    request = _request(parts)
    if have:
        request.add_header("Range", f"bytes={have}-")
    # built per call: ProxyHandler reads the *_proxy variables when it is made
    opener = urllib.request.build_opener(_NoFTP())
    try:
        response: http.client.HTTPResponse = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == http.HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE and have:
            raise _Restart from None
        raise DownloadError(
            f"{_status_line(err.code, str(err.reason))} from {show_url(url)}",
            hint="check the URL (and any proxy in http_proxy/https_proxy)",
        ) from None
    length = _content_length(response)
    body = _Body(lambda: response.read1(CHUNK), 0, length, response.close)
    if response.status == http.HTTPStatus.PARTIAL_CONTENT and have:
        span = _content_range(response.headers.get("Content-Range"))
        if span is None or span[0] != have:
            response.close()
            raise _Restart
        body.start = have
        body.total = span[1]
        if body.total is None and length is not None:
            body.total = have + length
    elif response.status != http.HTTPStatus.OK:
        response.close()
        raise DownloadError(
            f"{_status_line(response.status, response.reason)} from {show_url(url)}",
            hint="expected the file itself (200 OK)",
        )
    return body


def _open(url: str, have: int, *, timeout: float) -> _Body:
    """The body of ``url`` from byte ``have`` on if the source can resume, else from 0.
    Network failures before the body starts become a :class:`DownloadError`."""
    parts = _split(url)
    if parts.scheme.lower() == "file":
        return _open_file(parts, have, url)
    host = _host(parts)
    try:
        return _open_http(parts, have, timeout=timeout, url=url)
    except (TimeoutError, urllib.error.URLError) as err:
        if isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None), TimeoutError):
            raise DownloadError(
                f"no answer from {host} within {timeout:g} s for {show_url(url)}",
                hint="check the network, or the proxy in http_proxy/https_proxy",
            ) from None
        raise DownloadError(
            f"cannot download {show_url(url)}: {_reason(err)}",
            hint="check the URL, the network, or the proxy in http_proxy/https_proxy",
        ) from None
    except (OSError, http.client.HTTPException, ValueError) as err:
        raise DownloadError(
            f"cannot download {show_url(url)}: {_reason(err)}",
            hint="check the URL, the network, or the proxy in http_proxy/https_proxy",
        ) from None


# --- copying -------------------------------------------------------------------------------


class _Progress:
    def __init__(self, callback: Callable[[int, int | None], None] | None) -> None:
        self.callback = callback
        self.last = float("-inf")

    def __call__(self, done: int, total: int | None, *, final: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if final or now - self.last >= PROGRESS_INTERVAL:
            self.last = now
            self.callback(done, total)


def _pump(
    body: _Body,
    write: Callable[[bytes], object],
    *,
    done: int,
    url: str,
    timeout: float,
    progress: _Progress,
) -> int:
    """Copy ``body`` through ``write`` until its end; ``done`` bytes are already there.
    The file's size at the end, checked against the size the server announced."""
    host = _host(_split(url))
    resume = "run the same command again to resume"
    progress(done, body.total)
    try:
        while chunk := body.read():
            write(chunk)
            done += len(chunk)
            progress(done, body.total)
    except TimeoutError:
        raise DownloadError(
            f"download of {show_url(url)} stalled: no data for {timeout:g} s from {host}; " + resume
        ) from None
    except (OSError, http.client.HTTPException, ValueError) as err:
        of = f" of {body.total}" if body.total is not None else ""
        raise DownloadError(
            f"download of {show_url(url)} ended after {done}{of} bytes ({_reason(err)}); " + resume
        ) from None
    finally:
        body.close()
    if body.total is not None and done != body.total:
        raise DownloadError(
            f"download of {show_url(url)} ended after {done} of {body.total} bytes; " + resume
        )
    return done


_T = TypeVar("_T")


def _writing(path: Path, action: Callable[[], _T]) -> _T:
    try:
        return action()
    except OSError as err:
        raise DownloadError(f"cannot write {path}: {_reason(err)}") from None


class _Sink:
    """The partial file (mode 0600, never through a symlink), open for appending, with the
    digest and size of what is in it."""

    def __init__(self, path: Path, algo: str) -> None:
        self.path = path
        self.algo = algo
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
        fd = _writing(path, lambda: os.open(path, flags, 0o600))
        self.file: IO[bytes] = os.fdopen(fd, "r+b", buffering=0)
        self.hasher = hashlib.new(algo)
        self.size = 0
        try:
            self._wrap(self._hash_existing)
        except BaseException:
            self.file.close()
            raise

    def _wrap(self, action: Callable[[], _T]) -> _T:
        return _writing(self.path, action)

    def _hash_existing(self) -> None:
        os.fchmod(self.file.fileno(), 0o600)
        self.file.seek(0)
        while chunk := self.file.read(CHUNK):
            self.hasher.update(chunk)
            self.size += len(chunk)

    def write(self, data: bytes) -> None:
        self._wrap(lambda: self.file.write(data))
        self.hasher.update(data)
        self.size += len(data)

    def truncate(self) -> None:
        self._wrap(lambda: os.ftruncate(self.file.fileno(), 0))
        self.hasher = hashlib.new(self.algo)
        self.size = 0

    def sync(self) -> None:
        self._wrap(lambda: os.fsync(self.file.fileno()))

    def close(self) -> None:
        self.file.close()


def _install(partial: Path, dest: Path) -> None:
    """Move the verified ``partial`` to ``dest``, copying when they are on two file systems."""
    try:
        try:
            os.replace(partial, dest)
        except OSError as err:
            if err.errno != errno.EXDEV:
                raise
            _copy_across(partial, dest)
        _sync_dir(dest.parent)
    except OSError as err:
        raise DownloadError(f"cannot write {dest}: {_reason(err)}") from None


def _copy_across(partial: Path, dest: Path) -> None:
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, open(partial, "rb") as src:
            shutil.copyfileobj(src, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.replace(name, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    partial.unlink()


def _sync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- the entry points ----------------------------------------------------------------------


class _TooBig(Exception):
    pass


def fetch_text(url: str, *, timeout: float = 30, limit: int = SUMS_LIMIT) -> str:
    """The text at ``url`` (http, https or file), at most ``limit`` bytes (UTF-8)."""
    data = bytearray()

    def keep(chunk: bytes) -> None:
        data.extend(chunk)
        if len(data) > limit:
            raise _TooBig

    body = _open(url, 0, timeout=timeout)
    try:
        _pump(body, keep, done=0, url=url, timeout=timeout, progress=_Progress(None))
    except _TooBig:
        raise DownloadError(
            f"{show_url(url)} is bigger than {limit} bytes",
            hint="expected a small text file (a SHA256SUMS list)",
        ) from None
    return data.decode("utf-8", errors="replace")


def download(
    url: str,
    dest: Path,
    *,
    checksum: Checksum,
    partial: Path,
    progress: Callable[[int, int | None], None] | None = None,
    stall_timeout: float = 30,
) -> None:
    """Fetch ``url`` through ``partial`` (resuming what is there) and, once its digest is
    ``checksum``, move it to ``dest`` (mode 0600). On a network failure the partial file is
    kept for the next call (removed if empty); on a checksum mismatch it is deleted."""
    _split(url)  # a bad URL is a UsageError before anything is touched
    expected = checksum.hex.lower()
    report = _Progress(progress)
    sink = _Sink(partial, checksum.algo)
    ok = False
    try:
        restarted = False
        while not (sink.size and sink.hasher.hexdigest() == expected):
            try:
                body = _open(url, sink.size, timeout=stall_timeout)
            except _Restart:
                # 416 or a range we did not ask for: what is there is not a prefix of the
                # file (its digest did not match above), so start over, once
                if restarted:
                    raise DownloadError(
                        f"{show_url(url)}: the server cannot resume or restart the download",
                        hint=f"delete {partial} and try again",
                    ) from None
                restarted = True
                sink.truncate()
                continue
            if body.start != sink.size:
                sink.truncate()  # the server sends the whole file: start over
            _pump(
                body,
                sink.write,
                done=sink.size,
                url=url,
                timeout=stall_timeout,
                progress=report,
            )
            got = Checksum(checksum.algo, sink.hasher.hexdigest())
            if got.hex != expected:
                sink.close()
                partial.unlink(missing_ok=True)
                raise DownloadError(
                    f"checksum mismatch for {show_url(url)}: "
                    f"expected {checksum.short()}, got {got.short()}",
                    hint="the file changed on the server or the checksum is wrong",
                )
            break
        report(sink.size, sink.size, final=True)
        sink.sync()
        ok = True
    finally:
        if not sink.file.closed:
            empty = sink.size == 0
            sink.close()
            if not ok and empty:
                partial.unlink(missing_ok=True)
    _install(partial, dest)
