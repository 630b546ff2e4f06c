"""Downloads: pure, no libvirt, no internet. A local ThreadingHTTPServer on 127.0.0.1 plays
the mirror: it serves ranges, 404s, cuts a body short, stalls (until the test releases it) or
ignores Range, and records every request it sees."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import time
from pathlib import Path

import pytest

import ozone_libvirt
from ozone_libvirt import download as dl
from ozone_libvirt.download import (
    Checksum,
    DownloadError,
    checksum_from_sums,
    download,
    fetch_text,
    resolve_checksum,
)
from ozone_libvirt.errors import UsageError

from .mirror import CUT, DATA, STALL_AFTER, _no_proxy_from_the_host, server

__all__ = ["_no_proxy_from_the_host", "server"]  # fixtures, used by name

SHA256 = Checksum("sha256", hashlib.sha256(DATA).hexdigest())
SHA512 = Checksum("sha512", hashlib.sha512(DATA).hexdigest())


def paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "img.iso", tmp_path / "img.iso.part"


def error_of(exc_type, func, *args, **kwargs):
    with pytest.raises(exc_type) as info:
        func(*args, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


# --- success -------------------------------------------------------------------------------


@pytest.mark.parametrize("checksum", [SHA256, SHA512], ids=["sha256", "sha512"])
def test_downloads_the_file_and_verifies_its_checksum(server, tmp_path, checksum):
    dest, partial = paths(tmp_path)
    calls: list[tuple[int, int | None]] = []
    download(
        server.add("/img.iso"),
        dest,
        checksum=checksum,
        partial=partial,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert dest.read_bytes() == DATA
    assert not partial.exists()
    assert dest.stat().st_mode & 0o777 == 0o600
    assert calls[-1] == (len(DATA), len(DATA))
    assert server.ranges() == [None]
    assert server.state.seen[0].headers["User-Agent"] == f"ozone/{ozone_libvirt.__version__}"


def test_file_url_is_copied_through_the_partial_and_verified(tmp_path):
    source = tmp_path / "source dir" / "img.iso"
    source.parent.mkdir()
    source.write_bytes(DATA)
    dest, partial = paths(tmp_path)
    download(source.as_uri(), dest, checksum=SHA256, partial=partial)
    assert dest.read_bytes() == DATA
    assert not partial.exists()

    other = tmp_path / "other.iso"
    wrong = Checksum("sha512", "0" * 128)
    err = error_of(DownloadError, download, source.as_uri(), other, checksum=wrong, partial=partial)
    assert "checksum mismatch" in str(err)
    assert not partial.exists()
    assert not other.exists()


def test_a_complete_partial_is_not_fetched_again(server, tmp_path):
    dest, partial = paths(tmp_path)
    partial.write_bytes(DATA)
    download(server.add("/img.iso"), dest, checksum=SHA256, partial=partial)
    assert dest.read_bytes() == DATA
    assert server.state.seen == []


# --- checksum files ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "algo"),
    [
        (f"{SHA256.hex}  img.iso", "sha256"),  # GNU text mode
        (f"{SHA256.hex} *img.iso", "sha256"),  # GNU binary mode
        (f"{SHA256.hex.upper()}  ./img.iso", "sha256"),
        (f"SHA256 (img.iso) = {SHA256.hex}", "sha256"),  # BSD
        (f"{SHA512.hex}  img.iso", "sha512"),
        (f"SHA512 (img.iso) = {SHA512.hex}", "sha512"),
    ],
)
def test_checksum_from_sums_reads_gnu_and_bsd_lines(line, algo):
    text = f"# comment\n{'0' * 64}  img.iso.zsync\n{line}\n{'f' * 64} *other.iso\n"
    got = checksum_from_sums(text, "img.iso", source="SHA256SUMS")
    assert got == (SHA256 if algo == "sha256" else SHA512)
    assert str(got) == f"{algo}:{got.hex}"


def test_checksum_url_in_gnu_format(server, tmp_path):
    url = server.add("/pub/img.iso")
    sums = server.add("/pub/SHA256SUMS", f"{'0' * 64} *x.iso\n{SHA256.hex} *img.iso\n".encode())
    checksum = resolve_checksum(url, checksum_url=sums)
    assert checksum == SHA256
    dest, partial = paths(tmp_path)
    download(url, dest, checksum=checksum, partial=partial)
    assert dest.read_bytes() == DATA


def test_checksum_url_in_bsd_format(server):
    url = server.add("/pub/img.iso")
    sums = server.add(
        "/pub/CHECKSUM", f"# img.iso: 200000 bytes\nSHA512 (img.iso) = {SHA512.hex}\n".encode()
    )
    assert resolve_checksum(url + "?mirror=1", checksum_url=sums) == SHA512


def test_checksum_file_without_the_entry_names_file_and_source(server):
    url = server.add("/pub/img.iso")
    sums = server.add("/pub/SHA256SUMS", f"{SHA256.hex}  other.iso\n".encode())
    err = error_of(DownloadError, resolve_checksum, url, checksum_url=sums)
    assert sums in str(err)
    assert "'img.iso'" in str(err)
    assert err.code == "download-failed"
    assert err.exit_code == 1


def test_missing_checksum_file_is_a_download_error(server):
    err = error_of(
        DownloadError, resolve_checksum, server.add("/img.iso"), checksum_url=server.base + "/SUMS"
    )
    assert str(err) == f"HTTP 404 Not Found from {server.base}/SUMS"


def test_fetch_text_refuses_a_big_file(server):
    url = server.add("/big", b"x" * 2000)
    err = error_of(DownloadError, fetch_text, url, limit=1000)
    assert "bigger than 1000 bytes" in str(err)
    assert fetch_text(url, limit=2000) == "x" * 2000


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({}, "exactly one"),
        ({"sha256": SHA256.hex, "sha512": SHA512.hex}, "exactly one"),
        ({"sha256": SHA256.hex, "checksum_url": "http://x/SUMS"}, "exactly one"),
        ({"sha256": SHA256.hex[:-1]}, "not a sha256 digest"),
        ({"sha256": SHA512.hex}, "not a sha256 digest"),
        ({"sha512": SHA512.hex[:-1] + "g"}, "not a sha512 digest"),
    ],
)
def test_resolve_checksum_argument_errors(kwargs, words):
    err = error_of(UsageError, resolve_checksum, "http://example.com/img.iso", **kwargs)
    assert words in str(err)
    assert err.hint
    assert err.exit_code == 2


def test_resolve_checksum_normalises_a_digest():
    assert resolve_checksum("http://h/i", sha256=f" sha256:{SHA256.hex.upper()} ") == SHA256
    assert resolve_checksum("http://h/i", sha512=SHA512.hex) == SHA512


# --- failures ------------------------------------------------------------------------------


def test_wrong_checksum_deletes_the_partial_and_writes_no_dest(server, tmp_path):
    dest, partial = paths(tmp_path)
    url = server.add("/img.iso")
    wrong = Checksum("sha256", "1234abcd" * 8)
    err = error_of(DownloadError, download, url, dest, checksum=wrong, partial=partial)
    assert str(err) == (
        f"checksum mismatch for {url}: expected sha256:1234abcd1234abcd…, "
        f"got sha256:{SHA256.hex[:16]}…"
    )
    assert err.hint == "the file changed on the server or the checksum is wrong"
    assert not partial.exists()
    assert not dest.exists()


def test_404_is_an_error_and_leaves_no_empty_partial(server, tmp_path):
    dest, partial = paths(tmp_path)
    err = error_of(
        DownloadError, download, server.base + "/nope.iso", dest, checksum=SHA256, partial=partial
    )
    assert str(err) == f"HTTP 404 Not Found from {server.base}/nope.iso"
    assert not partial.exists()
    assert not dest.exists()


def test_404_keeps_a_partial_that_has_data(server, tmp_path):
    dest, partial = paths(tmp_path)
    partial.write_bytes(DATA[:CUT])
    url = server.add("/img.iso", DATA, "404")
    error_of(DownloadError, download, url, dest, checksum=SHA256, partial=partial)
    assert partial.read_bytes() == DATA[:CUT]


def test_truncated_body_is_kept_and_the_next_call_resumes(server, tmp_path):
    dest, partial = paths(tmp_path)
    url = server.add("/img.iso", DATA, "truncate", "range")
    err = error_of(DownloadError, download, url, dest, checksum=SHA256, partial=partial)
    assert f"ended after {CUT} of {len(DATA)} bytes" in str(err)
    assert str(err).endswith("run the same command again to resume")
    assert partial.read_bytes() == DATA[:CUT]
    assert partial.stat().st_mode & 0o777 == 0o600
    assert not dest.exists()

    calls: list[tuple[int, int | None]] = []
    download(
        url,
        dest,
        checksum=SHA256,
        partial=partial,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert server.ranges() == [None, f"bytes={CUT}-"]
    assert dest.read_bytes() == DATA
    assert not partial.exists()
    assert calls[0] == (CUT, len(DATA))
    assert calls[-1] == (len(DATA), len(DATA))


def test_server_that_ignores_range_restarts_cleanly(server, tmp_path):
    dest, partial = paths(tmp_path)
    partial.write_bytes(b"x" * 5000)  # not even a prefix: appending would fail the checksum
    url = server.add("/img.iso", DATA, "ignore-range")
    download(url, dest, checksum=SHA256, partial=partial)
    assert server.ranges() == ["bytes=5000-"]
    assert dest.read_bytes() == DATA


def test_range_not_satisfiable_starts_over_once(server, tmp_path):
    dest, partial = paths(tmp_path)
    partial.write_bytes(b"x" * (len(DATA) + 10))  # longer than the file: the server says 416
    download(server.add("/img.iso"), dest, checksum=SHA256, partial=partial)
    assert server.ranges() == [f"bytes={len(DATA) + 10}-", None]
    assert dest.read_bytes() == DATA


def test_stall_fails_quickly_keeps_the_partial_and_resumes(server, tmp_path):
    dest, partial = paths(tmp_path)
    url = server.add("/img.iso", DATA, "stall", "range")
    started = time.monotonic()
    err = error_of(
        DownloadError, download, url, dest, checksum=SHA256, partial=partial, stall_timeout=0.5
    )
    assert time.monotonic() - started < 3
    assert server.state.stalling.is_set()
    host = f"127.0.0.1:{server.server_address[1]}"
    assert f"stalled: no data for 0.5 s from {host}; run the same command again" in str(err)
    assert partial.read_bytes() == DATA[:STALL_AFTER]

    server.state.release.set()
    download(url, dest, checksum=SHA256, partial=partial, stall_timeout=5)
    assert server.ranges()[-1] == f"bytes={STALL_AFTER}-"
    assert dest.read_bytes() == DATA


def test_connection_refused_is_a_download_error(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dest, partial = paths(tmp_path)
    url = f"http://127.0.0.1:{port}/img.iso"
    err = error_of(DownloadError, download, url, dest, checksum=SHA256, partial=partial)
    assert str(err) == f"cannot download {url}: Connection refused"
    assert not partial.exists()


@pytest.mark.parametrize(
    "url", ["ftp://example.com/img.iso", "img.iso", "http:///img.iso", "http://h:port/img.iso"]
)
def test_unsupported_or_bad_urls_are_usage_errors(tmp_path, url):
    dest, partial = paths(tmp_path)
    err = error_of(UsageError, download, url, dest, checksum=SHA256, partial=partial)
    assert err.hint
    assert not partial.exists()


def test_unsupported_scheme_message():
    err = error_of(UsageError, fetch_text, "ftp://example.com/SHA256SUMS")
    assert str(err).startswith("unsupported URL scheme ftp:")


def test_urls_in_errors_lose_credentials_and_are_cut_to_80_chars(server, tmp_path):
    dest, partial = paths(tmp_path)
    host = server.base.removeprefix("http://")
    url = f"http://alice:s3cret@{host}/{'long/' * 30}img.iso"
    err = error_of(DownloadError, download, url, dest, checksum=SHA256, partial=partial)
    assert "s3cret" not in str(err)
    assert "alice" not in str(err)
    shown = str(err).removeprefix("HTTP 404 Not Found from ")
    assert len(shown) == 80
    assert shown.endswith("…")
    # the credentials themselves went to the server, as HTTP Basic
    assert server.state.seen[0].headers["Authorization"] == "Basic YWxpY2U6czNjcmV0"


def test_http_proxy_from_the_environment_is_used(server, tmp_path, monkeypatch):
    # the server plays the proxy: it gets the absolute URI of a host that does not resolve
    server.add("/img.iso")
    monkeypatch.setenv("http_proxy", server.base)
    dest, partial = paths(tmp_path)
    download("http://ozone-test.invalid/img.iso", dest, checksum=SHA256, partial=partial)
    assert [s.path for s in server.state.seen] == ["http://ozone-test.invalid/img.iso"]
    assert dest.read_bytes() == DATA


def test_across_file_systems_the_file_is_copied(server, tmp_path, monkeypatch):
    dest, partial = paths(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == partial:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        real_replace(src, dst)

    monkeypatch.setattr(dl.os, "replace", replace)
    download(server.add("/img.iso"), dest, checksum=SHA256, partial=partial)
    assert dest.read_bytes() == DATA
    assert dest.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.iso"]
