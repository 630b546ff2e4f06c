"""libvirt errors become ozone errors in one place (connection.py), by error code: "not
found" is an answer only for its own code; a dropped connection or a refused permission is
never taken for "no such VM" / "no such network" / "slot free".

Fakes stand in for a dropped connection (libvirt cannot be made to drop one on demand here);
libvirt's in-process test:///default driver answers the real lookups."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import pytest

from ozone_libvirt import connection
from ozone_libvirt.connection import (
    best_effort,
    call,
    find_domain,
    find_domain_by_uuid,
    find_network,
    find_pool,
    find_snapshot,
    find_volume,
    if_exists,
    libvirt_errors,
    refused_with,
)
from ozone_libvirt.errors import (
    ConflictError,
    ConnectionLost,
    LibvirtFailure,
    NotFoundError,
    OzoneError,
)


def fake_error(code: int, domain: int = libvirt.VIR_FROM_NONE, message: str = "x") -> Exception:
    err = libvirt.libvirtError(message)
    err.err = (code, domain, message, 2, None, None, None, -1, -1)
    return err


def raising(err: Exception) -> Callable[..., Any]:
    def fn(*_args: Any) -> Any:
        raise err

    return fn


DROPPED = [
    fake_error(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, "Cannot recv data"),
    fake_error(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_RPC, "client socket is closed"),
]
MISSING = [
    libvirt.VIR_ERR_NO_DOMAIN,
    libvirt.VIR_ERR_NO_NETWORK,
    libvirt.VIR_ERR_NO_STORAGE_POOL,
    libvirt.VIR_ERR_NO_STORAGE_VOL,
    libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT,
    libvirt.VIR_ERR_NO_DOMAIN_METADATA,
]


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    with connection.connect("test:///default") as opened:
        yield opened


@pytest.mark.parametrize("missing", MISSING)
@pytest.mark.parametrize("dropped", DROPPED, ids=["system-error", "internal-error"])
def test_a_dropped_connection_is_never_reported_as_not_found(
    missing: int, dropped: Exception
) -> None:
    with pytest.raises(ConnectionLost):
        if_exists(raising(dropped), missing=missing)
    with pytest.raises(ConnectionLost):
        refused_with(raising(dropped), code=missing)


@pytest.mark.parametrize("missing", MISSING)
def test_not_found_is_an_answer_only_for_its_own_code(missing: int) -> None:
    assert if_exists(raising(fake_error(missing)), missing=missing) is None
    other = next(code for code in MISSING if code != missing)
    with pytest.raises(NotFoundError):
        if_exists(raising(fake_error(other)), missing=missing)


def test_a_refused_permission_is_not_taken_for_not_found() -> None:
    denied = fake_error(libvirt.VIR_ERR_ACCESS_DENIED, message="access denied")
    with pytest.raises(LibvirtFailure):
        if_exists(raising(denied))
    with pytest.raises(LibvirtFailure):
        refused_with(raising(denied), code=libvirt.VIR_ERR_SNAPSHOT_REVERT_RISKY)


def test_the_context_manager_translates_and_explain_never_sees_a_dropped_connection() -> None:
    seen: list[int | None] = []

    def explain(err: libvirt.libvirtError) -> OzoneError | None:
        seen.append(err.get_error_code())
        return ConflictError("explained") if "taken" in str(err) else None

    for dropped in DROPPED:
        with pytest.raises(ConnectionLost), libvirt_errors(explain=explain):
            raise dropped
    assert seen == []
    with pytest.raises(ConflictError, match="explained"), libvirt_errors(explain=explain):
        raise fake_error(libvirt.VIR_ERR_INTERNAL_ERROR, message="port taken")
    with pytest.raises(NotFoundError, match="no VM named 'web'"), libvirt_errors(name="web"):
        raise fake_error(libvirt.VIR_ERR_NO_DOMAIN)


def test_best_effort_is_for_cleanup_only_and_lets_other_errors_pass() -> None:
    with best_effort():
        raise DROPPED[0]
    with pytest.raises(ValueError), best_effort():
        raise ValueError("not libvirt's")


def test_lookups_on_the_test_driver(conn: libvirt.virConnect) -> None:
    assert find_domain(conn, "test") is not None
    assert find_domain(conn, "nosuch") is None
    assert find_domain_by_uuid(conn, "00000000-0000-0000-0000-000000000001") is None
    assert find_network(conn, "default") is not None
    assert find_network(conn, "nosuch") is None
    assert find_pool(conn, "default-pool") is not None
    assert find_pool(conn, "nosuch") is None
    assert find_volume(conn, "/nosuch/volume.img") is None
    dom = call(conn.lookupByName, "test")
    assert find_snapshot(dom, "nosuch") is None
    assert connection.domain_metadata(dom) is None  # not ozone's
    with pytest.raises(NotFoundError, match="no VM named 'nosuch'"):
        connection.lookup(conn, "nosuch")


def test_a_closed_connection_is_not_a_missing_domain() -> None:
    conn = libvirt.open("test:///default")
    conn.close()
    with pytest.raises(OzoneError) as caught:
        find_domain(conn, "test")
    assert not isinstance(caught.value, NotFoundError)


class _Dom:
    """A domain whose every libvirt call fails with ``err`` (a stand-in: libvirt cannot
    drop a connection on demand here)."""

    def __init__(self, err: Exception) -> None:
        self.err = err

    def name(self) -> str:
        return "web"

    def __getattr__(self, _name: str) -> Callable[..., Any]:
        return raising(self.err)


@pytest.mark.parametrize("dropped", DROPPED, ids=["system-error", "internal-error"])
def test_a_dropped_connection_is_not_a_silent_answer_about_the_vm(
    dropped: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    import libvirt_qemu

    from ozone_libvirt.agent import Agent
    from ozone_libvirt.inventory import _has_managed_save, is_active

    dom: Any = _Dom(dropped)
    with pytest.raises(ConnectionLost):
        _has_managed_save(dom)  # not "no saved state"
    with pytest.raises(ConnectionLost):
        is_active(dom)  # not "stopped"
    monkeypatch.setattr(libvirt_qemu, "qemuAgentCommand", raising(dropped))
    with pytest.raises(ConnectionLost):
        Agent(dom).answers(timeout=1)  # not "the agent does not answer"


def test_a_domain_that_went_away_is_not_running_and_has_no_saved_state() -> None:
    from ozone_libvirt.inventory import _has_managed_save, is_active

    dom: Any = _Dom(fake_error(libvirt.VIR_ERR_NO_DOMAIN))
    assert is_active(dom) is False
    assert _has_managed_save(dom) is False
