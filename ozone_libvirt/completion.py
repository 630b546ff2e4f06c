"""Shell completion of VM names (from libvirt), config names (from ``OZONE_CONFIG_PATH``)
and snapshot names. Runs at every Tab: light imports only (no config validator), and never
an error on the terminal (a completer that fails offers nothing)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
DEFAULT_CONFIG_PATH = ("./vms", "~/.config/ozone/vms")


def config_search_path() -> list[Path]:
    """The folders ``NAME`` configs are looked up in: ``OZONE_CONFIG_PATH`` (colon-separated),
    else ``./vms`` then ``~/.config/ozone/vms``."""
    raw = os.environ.get("OZONE_CONFIG_PATH")
    parts = raw.split(os.pathsep) if raw else list(DEFAULT_CONFIG_PATH)
    return [Path(p).expanduser() for p in parts if p]


@contextlib.contextmanager
def _libvirt(ctx: Any) -> Iterator[Any]:
    """A read-only connection to the URI the command line names (-c), else the default."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # quiet on the terminal
    root = ctx.find_root() if ctx is not None else None
    uri = (root.params.get("connect") if root is not None else None) or os.environ.get(
        "LIBVIRT_DEFAULT_URI"
    )
    conn = libvirt.openReadOnly(uri)
    try:
        yield conn
    finally:
        conn.close()


def vm_names(ctx: Any, incomplete: str) -> list[str]:
    # a completion offers nothing rather than break the shell (no libvirt, no permission)
    with contextlib.suppress(Exception), _libvirt(ctx) as conn:
        names = [d.name() for d in conn.listAllDomains(0)]
        return sorted(n for n in names if n.startswith(incomplete))
    return []


def config_names(incomplete: str) -> list[str]:
    """Config names on the search path, and config files and folders under ``incomplete``."""
    found: set[str] = set()
    with contextlib.suppress(OSError):
        for folder in config_search_path():
            for path in folder.glob(f"{incomplete}*") if "/" not in incomplete else ():
                if path.suffix in CONFIG_SUFFIXES and path.is_file():
                    found.add(path.stem)
        typed = Path(incomplete or ".")
        folder, stem = (typed, "") if incomplete.endswith("/") else (typed.parent, typed.name)
        for path in folder.glob(f"{stem}*"):
            shown = str(path) if incomplete.startswith("./") or folder != Path(".") else path.name
            if path.is_dir():
                found.add(shown.rstrip("/") + "/")
            elif path.suffix in CONFIG_SUFFIXES:
                found.add(shown)
    return sorted(f for f in found if f.startswith(incomplete))


def snapshot_names(ctx: Any, incomplete: str) -> list[str]:
    name = ctx.params.get("name") if ctx is not None else None
    if not name:
        return []
    with contextlib.suppress(Exception), _libvirt(ctx) as conn:
        snaps = conn.lookupByName(name).listAllSnapshots(0)
        return sorted(s.getName() for s in snaps if s.getName().startswith(incomplete))
    return []


def vm_or_config_names(ctx: Any, incomplete: str) -> list[str]:
    """`ozone start` takes either (it defines a VM from its config first)."""
    return sorted(set(vm_names(ctx, incomplete)) | set(config_names(incomplete)))


def host_names(incomplete: str) -> list[str]:
    """The hosts file's host names (and ``auto``), for ``--host``."""
    with contextlib.suppress(Exception):
        from .hosts import AUTO, load_inventory

        names = [*load_inventory(wanted="--host").names, AUTO]
        return [n for n in names if n.startswith(incomplete)]
    return []
