"""The exec wrapper and its host-side parsing, without a guest: the wrapper is run by the
shells guests have (busybox ash in the test guest, dash and bash on Debian guests) right here,
so that what only busybox would forgive is caught."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ozone_libvirt import execute
from ozone_libvirt.errors import UsageError
from ozone_libvirt.transfer import parse_location

SHELLS = {"busybox": ["busybox", "sh"], "dash": ["dash"], "bash": ["bash"]}


@pytest.fixture(params=sorted(SHELLS))
def shell(request: pytest.FixtureRequest) -> list[str]:
    argv = SHELLS[request.param]
    path = shutil.which(argv[0])
    if path is None:
        pytest.fail(f"{argv[0]} is not installed (scripts/setup-host installs busybox-static)")
    return [path, *argv[1:]]


def run_wrapper(
    shell: list[str],
    tmp_path: Path,
    argv: list[str],
    *,
    cwd: str = "",
    limit: int = 1000,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[bytes], execute._Header | None, bytes]:
    prefix = str(tmp_path / ".ozone-exec-test")
    script = execute.wrapper(cwd=bool(cwd), user=False, stdin=False)
    environment = {**execute.BASE_ENV, **(env or {}), "OZONE_EXEC": script}
    proc = subprocess.run(
        [
            *shell,
            "-c",
            'eval "$OZONE_EXEC"',
            "ozone-exec",
            prefix,
            str(limit),
            cwd,
            "",
            "--",
            *argv,
        ],
        capture_output=True,
        env=environment,
        timeout=30,
        check=False,
    )
    header, rest = execute._parse_header(proc.stdout)
    return proc, header, rest


def test_captured_output_and_status(shell, tmp_path):
    proc, header, out = run_wrapper(
        shell, tmp_path, ["sh", "-c", "printf 'a\\0b'; echo err >&2; exit 3"]
    )
    assert header is not None
    assert (header.exit_code, header.sizes, header.mode) == (3, (3, 4), "captured")
    assert out == b"a\x00b"
    assert proc.stderr == b"err\n"
    assert list(tmp_path.iterdir()) == [], "the wrapper left files behind"


def test_big_output_is_kept_for_the_host(shell, tmp_path):
    _, header, out = run_wrapper(shell, tmp_path, ["head", "-c", "5000", "/dev/zero"], limit=100)
    assert header is not None and header.mode == "kept" and header.sizes == (5000, 0)
    assert out == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".ozone-exec-test.err",
        ".ozone-exec-test.out",
    ]


def test_streamed_when_the_host_asked(shell, tmp_path):
    (tmp_path / ".ozone-exec-test.stream").touch()
    # the marker exists before the wrapper starts: noclobber must not trip over it
    _, header, out = run_wrapper(shell, tmp_path, ["echo", "hi"])
    assert header is not None and header.mode == "streamed" and header.sizes == (3, 0)
    assert out == b""
    assert list(tmp_path.iterdir()) == []


def test_missing_program_and_bad_cwd(shell, tmp_path):
    proc, header, _ = run_wrapper(shell, tmp_path, ["no-such-program-x"])
    assert header is not None and header.exit_code == 127
    assert proc.stderr == b"no-such-program-x: command not found\n"
    _, header, _ = run_wrapper(shell, tmp_path, ["true"], cwd="/no/such/dir")
    assert header is not None and header.mode == "failed"
    assert header.message == "cannot change to directory /no/such/dir"
    assert list(tmp_path.iterdir()) == []


def test_the_programs_path_is_its_own(shell, tmp_path):
    _, header, out = run_wrapper(
        shell, tmp_path, ["/bin/sh", "-c", 'echo "$PATH"'], env={"PATH": "/nowhere"}
    )
    assert header is not None and header.exit_code == 0
    assert out == b"/nowhere\n"


def test_existing_output_file_is_never_followed(shell, tmp_path):
    target = tmp_path / "victim"
    target.write_text("precious")
    os.symlink(target, tmp_path / ".ozone-exec-test.out")
    _, header, _ = run_wrapper(shell, tmp_path, ["echo", "overwrite?"])
    assert header is not None and header.mode == "failed"
    assert target.read_text() == "precious"


@pytest.mark.parametrize(
    ("data", "parsed"),
    [
        (b"OZONE-EXEC 0 1 2 captured\nx", ((0, (1, 2), "captured", ""), b"x")),
        (b"OZONE-EXEC 125 0 0 failed no user bob\n", ((125, (0, 0), "failed", "no user bob"), b"")),
        (b"garbage\n", (None, b"garbage\n")),
        (b"OZONE-EXEC 1 2", (None, b"OZONE-EXEC 1 2")),
    ],
)
def test_parse_header(data, parsed):
    header, rest = execute._parse_header(data)
    got = None if header is None else (header.exit_code, header.sizes, header.mode, header.message)
    assert (got, rest) == parsed


def test_check_argv():
    assert "A=1" in execute.check_argv(["true"], {"A": "1"})
    for argv, env in ((["true"], {"1X": "y"}), ([], None), (["a\0b"], None)):
        with pytest.raises(UsageError):
            execute.check_argv(argv, env)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("web:/etc/hosts", ("web", "/etc/hosts")),
        ("./web:/x", (None, "./web:/x")),
        ("a:b", (None, "a:b")),
        ("/tmp/file", (None, "/tmp/file")),
    ],
)
def test_parse_location(text, parsed):
    assert parse_location(text) == parsed
