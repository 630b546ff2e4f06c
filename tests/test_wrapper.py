"""The exec wrapper and its host-side parsing, without a guest: the wrapper is run by the
shells guests have (busybox ash in the test guest, dash and bash on Debian guests) right here,
so that what only busybox would forgive is caught. Runs as root, like qemu-ga."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ozone_libvirt import execute
from ozone_libvirt.errors import UsageError
from ozone_libvirt.transfer import parse_location

SHELLS = {"busybox": ["busybox", "sh"], "dash": ["dash"], "bash": ["bash"]}
PARENT = execute.STAGE_FOLDER
FOLDER = f"{PARENT}/test"


@pytest.fixture(params=sorted(SHELLS))
def shell(request: pytest.FixtureRequest) -> list[str]:
    argv = SHELLS[request.param]
    path = shutil.which(argv[0])
    if path is None:
        pytest.fail(f"{argv[0]} is not installed (scripts/setup-host installs busybox-static)")
    return [path, *argv[1:]]


@pytest.fixture
def stage(tmp_path: Path) -> Path:
    """A stage folder like /var/tmp: root's, sticky, writable by all."""
    folder = tmp_path / "stage"
    folder.mkdir()
    folder.chmod(0o1777)
    return folder


def run_wrapper(
    shell: list[str],
    stage: Path,
    argv: list[str],
    *,
    cwd: str = "",
    user: str = "",
    limit: int = 1000,
    env: dict[str, str] | None = None,
    argfile: bool = False,
    ancestors: bool = False,
) -> tuple[subprocess.CompletedProcess[bytes], execute._Header | None, bytes]:
    script = execute.wrapper(
        cwd=bool(cwd), user=bool(user), stdin=False, argfile=argfile, ancestors=ancestors
    )
    environment = {
        **execute.BASE_ENV,
        **(env or {}),
        "OZONE_EXEC": script,
        "OZONE_P": str(stage / FOLDER),
    }
    if argfile:
        environment["OZONE_ARGS"] = "1"
    args = [*shell, "-c", 'eval "$OZONE_EXEC"', "ozone-exec", str(limit), cwd, user, "--"]
    proc = subprocess.run(
        [*args, *([] if argfile else argv)],
        capture_output=True,
        env=environment,
        timeout=30,
        check=False,
    )
    header, rest = execute._parse_header(proc.stdout)
    return proc, header, rest


def test_captured_output_and_status(shell, stage):
    proc, header, out = run_wrapper(
        shell, stage, ["sh", "-c", "printf 'a\\0b'; echo err >&2; exit 3"]
    )
    assert header is not None
    assert (header.exit_code, header.sizes, header.mode) == (3, (3, 4), "captured")
    assert header.full is None
    assert out == b"a\x00b"
    assert proc.stderr == b"err\n"
    assert list((stage / PARENT).iterdir()) == [], "the wrapper left files behind"


def test_the_stage_is_a_private_folder_and_the_program_gets_umask_022(shell, stage):
    script = f"ls -ld {stage}/{FOLDER} {stage}/{FOLDER}/out; umask"
    _, header, out = run_wrapper(shell, stage, ["sh", "-c", script])
    assert header is not None and header.exit_code == 0, out
    folder, output, umask = out.decode().splitlines()
    assert folder.startswith("drwx------") and " root " in folder
    assert output.startswith("-rw-------")
    assert umask.strip() in ("0022", "022")


def test_big_output_is_kept_for_the_host(shell, stage):
    _, header, out = run_wrapper(shell, stage, ["head", "-c", "5000", "/dev/zero"], limit=100)
    assert header is not None and header.mode == "kept" and header.sizes == (5000, 0)
    assert out == b""
    assert {p.name for p in (stage / FOLDER).iterdir()} >= {"out", "err"}


def test_streamed_when_the_host_asked(shell, stage):
    # the host drops the marker while the program runs; here the program does it
    marker = stage / FOLDER / "stream"
    _, header, out = run_wrapper(
        shell, stage, ["sh", "-c", f": >{marker}; echo hi"], env={"X": "1"}
    )
    assert header is not None and header.mode == "streamed" and header.sizes == (3, 0)
    assert out == b""
    assert list((stage / PARENT).iterdir()) == []


def test_missing_program_and_bad_cwd(shell, stage):
    proc, header, _ = run_wrapper(shell, stage, ["no-such-program-x"])
    assert header is not None and header.exit_code == 127
    assert proc.stderr == b"no-such-program-x: command not found\n"
    _, header, _ = run_wrapper(shell, stage, ["true"], cwd="/no/such/dir")
    assert header is not None and header.mode == "failed"
    assert header.message == "cannot change to directory /no/such/dir"
    assert list((stage / PARENT).iterdir()) == []


def test_the_programs_path_is_its_own(shell, stage):
    _, header, out = run_wrapper(
        shell, stage, ["/bin/sh", "-c", 'echo "$PATH"'], env={"PATH": "/nowhere"}
    )
    assert header is not None and header.exit_code == 0
    assert out == b"/nowhere\n"


@pytest.mark.parametrize("planted", ["symlink", "folder"])
def test_a_planted_parent_is_replaced_never_used(shell, stage, tmp_path, planted):
    """Another user made S/.ozone-exec first (a symlink to a folder of theirs, or a folder
    holding a symlink where the run's folder goes): root removes it, makes its own, and
    writes nothing through theirs."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text("precious")
    if planted == "symlink":
        os.symlink(victim, stage / PARENT)
    else:
        (stage / PARENT).mkdir()
        os.symlink(victim, stage / FOLDER)
        os.chown(stage / PARENT, 65534, 65534)
    _, header, out = run_wrapper(shell, stage, ["echo", "hi"])
    assert header is not None and header.exit_code == 0 and out == b"hi\n"
    info = (stage / PARENT).lstat()
    assert os.path.isdir(stage / PARENT) and not os.path.islink(stage / PARENT)
    assert (info.st_uid, info.st_mode & 0o777) == (0, 0o700)
    assert sorted(p.name for p in victim.iterdir()) == ["file"]
    assert (victim / "file").read_text() == "precious"


def test_a_stage_others_can_write_is_refused_unless_sticky(shell, stage):
    stage.chmod(0o777)
    _, header, _ = run_wrapper(shell, stage, ["true"])
    assert header is not None and header.mode == "failed"
    assert header.message == f"stage: others can write in {stage}"
    stage.chmod(0o755)
    _, header, _ = run_wrapper(shell, stage, ["true"])
    assert header is not None and header.exit_code == 0
    missing = stage / "nowhere"
    _, header, _ = run_wrapper(shell, missing, ["true"])
    assert header is not None and header.message == f"stage: the guest has no folder {missing}"


def test_a_sticky_stage_must_still_be_roots(shell, stage):
    os.chown(stage, 65534, 65534)  # its owner may move anything in it
    _, header, _ = run_wrapper(shell, stage, ["true"])
    assert header is not None and header.message == f"stage: {stage} is not root's"


def test_every_folder_above_a_chosen_stage_must_be_safe(shell, tmp_path):
    """A root folder inside another user's folder is not safe: they can move it away. Nor is
    a symlink of theirs that points at a good folder."""
    theirs = tmp_path / "theirs"
    (theirs / "stage").mkdir(parents=True)
    os.chown(theirs, 65534, 65534)
    _, header, _ = run_wrapper(shell, theirs / "stage", ["true"], ancestors=True)
    assert header is not None and header.mode == "failed", header
    assert "a folder on the way to" in header.message
    good = tmp_path / "good"
    good.mkdir(mode=0o755)
    link = tmp_path / "link"
    os.symlink(good, link)
    os.chown(link, 65534, 65534, follow_symlinks=False)
    _, header, _ = run_wrapper(shell, link, ["true"], ancestors=True)
    assert header is not None and header.mode == "failed", header
    os.chown(link, 0, 0, follow_symlinks=False)
    _, header, out = run_wrapper(shell, link, ["echo", "ok"], ancestors=True)
    assert header is not None and header.exit_code == 0 and out == b"ok\n", header


def test_a_full_stage_is_reported_not_passed_off_as_success(shell, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        mount.chmod(0o1777)
        subprocess.run(["dd", "if=/dev/zero", f"of={mount}/fill", "bs=4k", "count=64"], check=False)
        _, header, out = run_wrapper(shell, mount, ["echo", "hello"])
        assert header is not None
        assert header.full == "0", header
        assert out == b""
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_folders_a_crash_brought_back_are_removed(shell, stage):
    """After a guest crash the journal can bring back a stage folder removed just before:
    the next run removes folders of other boots (and leaves those of this boot alone)."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    folders = {"old": "0000-earlier-boot", "live": boot, "starting": None, "emptied": None}
    (stage / PARENT).mkdir(mode=0o700)
    for name, recorded in folders.items():
        folder = stage / PARENT / name
        folder.mkdir(mode=0o700)
        if recorded is not None:
            (folder / f"boot-{recorded}").touch()
    a_while_ago = time.time() - 120
    os.utime(stage / PARENT / "emptied", (a_while_ago, a_while_ago))
    _, header, _ = run_wrapper(shell, stage, ["true"])
    assert header is not None and header.exit_code == 0
    assert sorted(p.name for p in (stage / PARENT).iterdir()) == ["live", "starting"]


def test_arguments_from_a_file(shell, stage, tmp_path):
    folder = stage / FOLDER
    folder.mkdir(mode=0o700, parents=True)
    (stage / PARENT).chmod(0o700)
    tools = tmp_path / "bin"  # the program's own PATH, which the wrapper must not use itself
    tools.mkdir()
    (tools / "mytool").write_text("#!/bin/sh\nprintf '%s|' \"$@\"\n")
    (tools / "mytool").chmod(0o755)
    argv = ["mytool", "it's", 'a "b"', "$HOME", "x" * 70000]
    lines = ["set -- " + " ".join(execute._shell_quote(a) for a in argv)]
    lines.append("export " + execute._shell_quote(f"PATH={tools}"))
    (folder / "args").write_text("\n".join(lines) + "\n")
    _, header, out = run_wrapper(shell, stage, [], argfile=True, limit=1 << 20)
    assert header is not None and header.exit_code == 0, out
    assert out == "|".join(argv[1:]).encode() + b"|"
    assert list((stage / PARENT).iterdir()) == []


def test_another_users_program_can_reopen_its_output(shell, stage):
    script = 'id -un; echo to-stdout >>/dev/stdout; echo to-stderr >>/dev/stderr; echo "$HOME"'
    proc, header, out = run_wrapper(shell, stage, ["sh", "-c", script], user="nobody")
    assert header is not None and header.exit_code == 0, (header, proc.stderr)
    assert out.decode().splitlines() == ["nobody", "to-stdout", "/nonexistent"]
    assert proc.stderr == b"to-stderr\n"
    assert list((stage / PARENT).iterdir()) == []


@pytest.mark.parametrize(
    ("data", "parsed"),
    [
        (b"OZONE-EXEC 0 1 2 captured \nx", ((0, (1, 2), "captured", ""), b"x")),
        (b"OZONE-EXEC 0 1 2 captured full 12\n", ((0, (1, 2), "captured", "full 12"), b"")),
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
    for argv, env in (
        (["true"], {"1X": "y"}),
        (["true"], {"X\n": "y"}),
        ([], None),
        (["a\0b"], None),
        (["x" * (128 << 10)], None),
        (["x" * 100000] * 11, None),
    ):
        with pytest.raises(UsageError):
            execute.check_argv(argv, env)
    assert execute.check_argv(["x" * 100000] * 3, None)  # big, but goes through a file


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf")])
def test_timeouts_must_be_positive(timeout):
    with pytest.raises(UsageError):
        execute.check_options(execute.ExecOptions(timeout=timeout))


@pytest.mark.parametrize("stage", ["tmp", "/", "/a b", "/a/../b", "/a\n", "/a//b", "/tmp/$(x)"])
def test_stage_folders_must_be_plain_paths(stage):
    with pytest.raises(UsageError):
        execute.check_options(execute.ExecOptions(stage_dir=stage))
    assert execute.check_options(execute.ExecOptions(stage_dir="/srv/stage/")) == "/srv/stage"


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
