"""The VMM live update's own errors (kernel errors stay pyiommufd.errors')."""
from __future__ import annotations

from .. import exitcodes
from ..errors import PyiommufdError


class VmmError(PyiommufdError):
    """QEMU failed, or is not the QEMU the command needs."""
    exit_code = exitcodes.VMM_FAILED


class QemuError(VmmError):
    """No usable QEMU: missing, too old, lacking a feature, or the fetch failed."""


class QmpFailed(VmmError):
    """QEMU refused a QMP command, or its monitor did not answer."""


class QemuDied(VmmError):
    """The QEMU process exited while a step needed it."""


class VmNotFound(PyiommufdError):
    """No VM of that name is running (or held) here."""
    exit_code = exitcodes.BAD_INPUT


__all__ = ["VmmError", "QemuError", "QmpFailed", "QemuDied", "VmNotFound"]
