"""pyiommufd: userspace toolkit for Linux IOMMU live update.

iommufd (/dev/iommu), VFIO device cdevs (/dev/vfio/devices/vfioN), the Live
Update Orchestrator (/dev/liveupdate) and the out-of-tree
IOMMU_HWPT_LU_{SET,MARK}_PRESERVE ioctl, over one syscall seam
(:mod:`pyiommufd.backend`).

Names are imported lazily so that ``import pyiommufd`` (and the CLI's
``--help``) stays cheap.
"""
from __future__ import annotations

import importlib

# typing.TYPE_CHECKING without importing typing: the names below are for type
# checkers only, and stay lazy at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .abi import LU_V1, LU_V2, LuAbi, probe_lu_abi
    from .backend import Backend, LinuxBackend
    from .errors import KernelError, PyiommufdError, UsageError
    from .iommufd import HWPT, IOAS, IOMMUFD
    from .luo import LiveUpdate, Session
    from .memfd import MemFD
    from .pci import PciDevice
    from .vfio import VfioDevice

__version__ = "0.1.0"

_EXPORTS = {
    "LiveUpdate": "luo", "Session": "luo",
    "IOMMUFD": "iommufd", "IOAS": "iommufd", "HWPT": "iommufd",
    "VfioDevice": "vfio",
    "PciDevice": "pci",
    "MemFD": "memfd",
    "LuAbi": "abi", "LU_V1": "abi", "LU_V2": "abi", "probe_lu_abi": "abi",
    "Backend": "backend", "LinuxBackend": "backend",
    "PyiommufdError": "errors", "KernelError": "errors", "UsageError": "errors",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pyiommufd' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
