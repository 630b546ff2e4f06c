"""ozone: declarative QEMU virtual machines on libvirt. ``from ozone_libvirt import VM``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["VM", "ExecResult", "ExecTimeout", "ExitError", "OzoneError", "__version__"]

if TYPE_CHECKING:
    from .api import VM
    from .errors import ExecTimeout, ExitError, OzoneError
    from .execute import ExecResult


def __getattr__(name: str) -> Any:
    # imported on first use, so that `ozone xml` and friends never load libvirt
    if name == "VM":
        from .api import VM

        return VM
    if name == "ExecResult":
        from .execute import ExecResult

        return ExecResult
    if name in ("ExecTimeout", "ExitError", "OzoneError"):
        from . import errors

        return getattr(errors, name)
    raise AttributeError(name)
