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

    from .abi import LU_V1 as LU_V1
    from .abi import LU_V2 as LU_V2
    from .abi import LuAbi as LuAbi
    from .abi import probe_lu_abi as probe_lu_abi
    from .backend import Backend as Backend
    from .backend import LinuxBackend as LinuxBackend
    from .errors import KernelError as KernelError
    from .errors import PyiommufdError as PyiommufdError
    from .errors import UsageError as UsageError
    from .fdobject import FileKind as FileKind
    from .iommufd import HWPT as HWPT
    from .iommufd import IOAS as IOAS
    from .iommufd import IOMMUFD as IOMMUFD
    from .luo import LiveUpdate as LiveUpdate
    from .luo import PreservedFile as PreservedFile
    from .luo import RetrievedFile as RetrievedFile
    from .luo import Session as Session
    from .memfd import MemFD as MemFD
    from .pci import PciDevice as PciDevice
    from .vfio import VfioDevice as VfioDevice

__version__ = "0.1.0"

_EXPORTS = {
    "LiveUpdate": "luo", "Session": "luo", "PreservedFile": "luo", "RetrievedFile": "luo",
    "FileKind": "fdobject",
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
