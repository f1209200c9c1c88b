"""iommufd (``/dev/iommu``): the context, IO address spaces, HW page tables
and the rest of the 7.3 object zoo.

Every command of Linux 7.3's iommufd is reachable from here:

=============================  ==================================================
command (nr)                   Python
=============================  ==================================================
IOMMU_DESTROY (0x80)           :meth:`IommufdObject.destroy`, :meth:`IOMMUFD.destroy`
IOMMU_IOAS_ALLOC (0x81)        :meth:`IOMMUFD.alloc_ioas`
IOMMU_IOAS_ALLOW_IOVAS (0x82)  :meth:`IOAS.allow_iovas`
IOMMU_IOAS_COPY (0x83)         :meth:`IOAS.copy`
IOMMU_IOAS_IOVA_RANGES (0x84)  :meth:`IOAS.iova_ranges`, :meth:`IOAS.iova_alignment`
IOMMU_IOAS_MAP (0x85)          :meth:`IOAS.map`
IOMMU_IOAS_UNMAP (0x86)        :meth:`IOAS.unmap`, :meth:`IOAS.unmap_all`
IOMMU_OPTION (0x87)            :meth:`IOMMUFD.option`, :meth:`IOAS.huge_pages`
IOMMU_VFIO_IOAS (0x88)         :meth:`IOMMUFD.vfio_ioas`
IOMMU_HWPT_ALLOC (0x89)        :meth:`IOMMUFD.alloc_hwpt`
IOMMU_GET_HW_INFO (0x8a)       :meth:`IOMMUFD.get_hw_info`
IOMMU_HWPT_SET_DIRTY_TRACKING  :meth:`HWPT.set_dirty_tracking`
IOMMU_HWPT_GET_DIRTY_BITMAP    :meth:`HWPT.get_dirty_bitmap`
IOMMU_HWPT_INVALIDATE (0x8d)   :meth:`HWPT.invalidate`, :meth:`Viommu.invalidate`
IOMMU_FAULT_QUEUE_ALLOC        :meth:`IOMMUFD.alloc_fault_queue`
IOMMU_IOAS_MAP_FILE (0x8f)     :meth:`IOAS.map_file`
IOMMU_VIOMMU_ALLOC (0x90)      :meth:`IOMMUFD.alloc_viommu`
IOMMU_VDEVICE_ALLOC (0x91)     :meth:`IOMMUFD.alloc_vdevice`
IOMMU_IOAS_CHANGE_PROCESS      :meth:`IOMMUFD.change_process` (acts on every IOAS of the context)
IOMMU_VEVENTQ_ALLOC (0x93)     :meth:`IOMMUFD.alloc_veventq`
IOMMU_HW_QUEUE_ALLOC (0x94)    :meth:`IOMMUFD.alloc_hw_queue`
IOMMU_IOAS_NOIOMMU_GET_PA      :meth:`IOMMUFD.noiommu_get_pa` (see the note on nr 0x95 there)
=============================  ==================================================

Ownership rules
---------------
* :class:`IOMMUFD` owns its fd: ``close()`` (idempotent), context manager,
  ``fileno()``, ``detach()`` (hand the fd to a VMM).
* Sub-objects (IOAS, HWPT, vIOMMU, ...) are destroyed with ``IOMMU_DESTROY`` on
  ``destroy()`` and on context exit. **Exception:** an HWPT marked for
  live-update preservation (:meth:`HWPT.mark_preserved`) is never destroyed
  implicitly. The kernel has no "unmark": the mark lives as long as the HWPT,
  and destroying the HWPT is the only way to drop it (the series' patch 10/14, IOMMU_HWPT_LU_SET_PRESERVE; the series' review: IOMMU_HWPT_LU_MARK_PRESERVE with a u64 token).
  Call :meth:`HWPT.destroy` yourself when you really mean it (and never while
  its iommufd is preserved in a LUO session: the series H2).
* Buffers mapped with :meth:`IOAS.map` are referenced strongly (and their
  buffer export held, so e.g. an ``mmap.mmap`` cannot be closed) for as long
  as they are mapped. ``unmap``/``unmap_all``/``destroy`` release them.
  ``IOMMUFD.close()`` releases them too: closing the last reference to the
  iommufd destroys every mapping. If you dup'ed the fd or preserved it in a
  LUO session, keep your buffers alive yourself. ``IOMMUFD.detach()`` keeps
  them alive for the life of the process, since the new owner controls the
  mappings.
"""
from __future__ import annotations

import errno as E
import mmap as _mmap
from bisect import bisect_left, bisect_right
from typing import TYPE_CHECKING, Any, Callable, Iterable, Self, TypeVar

from . import errors, ioctl
from ._record import hidden, record
from ._uapi import ffi
from .backend import Backend, get_backend
from .fdobject import FdObject, FileKind, open_path

if TYPE_CHECKING:
    from .abi import LuAbi

DEFAULT_PATH = "/dev/iommu"
PAGE_SIZE = _mmap.PAGESIZE
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1

C = ioctl.const
_Wrapped = TypeVar("_Wrapped", bound="IommufdObject")

# -- ioctl definitions ---------------------------------------------------------
IOMMU_DESTROY = ioctl.define("IOMMU_DESTROY", "struct iommu_destroy", "iommufd")
IOMMU_IOAS_ALLOC = ioctl.define("IOMMU_IOAS_ALLOC", "struct iommu_ioas_alloc", "iommufd")
IOMMU_IOAS_ALLOW_IOVAS = ioctl.define("IOMMU_IOAS_ALLOW_IOVAS", "struct iommu_ioas_allow_iovas", "iommufd")
IOMMU_IOAS_COPY = ioctl.define("IOMMU_IOAS_COPY", "struct iommu_ioas_copy", "iommufd")
IOMMU_IOAS_IOVA_RANGES = ioctl.define("IOMMU_IOAS_IOVA_RANGES", "struct iommu_ioas_iova_ranges", "iommufd")
IOMMU_IOAS_MAP = ioctl.define("IOMMU_IOAS_MAP", "struct iommu_ioas_map", "iommufd")
IOMMU_IOAS_UNMAP = ioctl.define("IOMMU_IOAS_UNMAP", "struct iommu_ioas_unmap", "iommufd")
IOMMU_OPTION = ioctl.define("IOMMU_OPTION", "struct iommu_option", "iommufd")
IOMMU_VFIO_IOAS = ioctl.define("IOMMU_VFIO_IOAS", "struct iommu_vfio_ioas", "iommufd")
IOMMU_HWPT_ALLOC = ioctl.define("IOMMU_HWPT_ALLOC", "struct iommu_hwpt_alloc", "iommufd")
IOMMU_GET_HW_INFO = ioctl.define("IOMMU_GET_HW_INFO", "struct iommu_hw_info", "iommufd")
IOMMU_HWPT_SET_DIRTY_TRACKING = ioctl.define(
    "IOMMU_HWPT_SET_DIRTY_TRACKING", "struct iommu_hwpt_set_dirty_tracking", "iommufd")
IOMMU_HWPT_GET_DIRTY_BITMAP = ioctl.define(
    "IOMMU_HWPT_GET_DIRTY_BITMAP", "struct iommu_hwpt_get_dirty_bitmap", "iommufd")
IOMMU_HWPT_INVALIDATE = ioctl.define("IOMMU_HWPT_INVALIDATE", "struct iommu_hwpt_invalidate", "iommufd")
IOMMU_FAULT_QUEUE_ALLOC = ioctl.define("IOMMU_FAULT_QUEUE_ALLOC", "struct iommu_fault_alloc", "iommufd")
IOMMU_IOAS_MAP_FILE = ioctl.define("IOMMU_IOAS_MAP_FILE", "struct iommu_ioas_map_file", "iommufd")
IOMMU_VIOMMU_ALLOC = ioctl.define("IOMMU_VIOMMU_ALLOC", "struct iommu_viommu_alloc", "iommufd")
IOMMU_VDEVICE_ALLOC = ioctl.define("IOMMU_VDEVICE_ALLOC", "struct iommu_vdevice_alloc", "iommufd")
IOMMU_IOAS_CHANGE_PROCESS = ioctl.define(
    "IOMMU_IOAS_CHANGE_PROCESS", "struct iommu_ioas_change_process", "iommufd")
IOMMU_VEVENTQ_ALLOC = ioctl.define("IOMMU_VEVENTQ_ALLOC", "struct iommu_veventq_alloc", "iommufd")
IOMMU_HW_QUEUE_ALLOC = ioctl.define("IOMMU_HW_QUEUE_ALLOC", "struct iommu_hw_queue_alloc", "iommufd")
# nr 0x95 on upstream 7.3. The live-update series (the series' patch 10/14, IOMMU_HWPT_LU_SET_PRESERVE-2.3) uses the
# same nr, hence the same request value, for IOMMU_HWPT_LU_{SET,MARK}_PRESERVE.
IOMMU_IOAS_NOIOMMU_GET_PA = ioctl.define(
    "IOMMU_IOAS_NOIOMMU_GET_PA", "struct iommu_ioas_noiommu_get_pa", "iommufd")

MAP_FIXED_IOVA = C("IOMMU_IOAS_MAP_FIXED_IOVA")
MAP_WRITEABLE = C("IOMMU_IOAS_MAP_WRITEABLE")
MAP_READABLE = C("IOMMU_IOAS_MAP_READABLE")

HWPT_ALLOC_NEST_PARENT = C("IOMMU_HWPT_ALLOC_NEST_PARENT")
HWPT_ALLOC_DIRTY_TRACKING = C("IOMMU_HWPT_ALLOC_DIRTY_TRACKING")
HWPT_FAULT_ID_VALID = C("IOMMU_HWPT_FAULT_ID_VALID")
HWPT_ALLOC_PASID = C("IOMMU_HWPT_ALLOC_PASID")

OPTIONS = {"rlimit_mode": C("IOMMU_OPTION_RLIMIT_MODE"), "huge_pages": C("IOMMU_OPTION_HUGE_PAGES")}
VFIO_IOAS_OPS = {"get": C("IOMMU_VFIO_IOAS_GET"), "set": C("IOMMU_VFIO_IOAS_SET"),
                 "clear": C("IOMMU_VFIO_IOAS_CLEAR")}

HWPT_DATA_TYPES = {
    "none": (C("IOMMU_HWPT_DATA_NONE"), None),
    "vtd_s1": (C("IOMMU_HWPT_DATA_VTD_S1"), "struct iommu_hwpt_vtd_s1"),
    "arm_smmuv3": (C("IOMMU_HWPT_DATA_ARM_SMMUV3"), "struct iommu_hwpt_arm_smmuv3"),
    "amd_guest": (C("IOMMU_HWPT_DATA_AMD_GUEST"), "struct iommu_hwpt_amd_guest"),
}
INVALIDATE_DATA_TYPES = {
    "vtd_s1": (C("IOMMU_HWPT_INVALIDATE_DATA_VTD_S1"), "struct iommu_hwpt_vtd_s1_invalidate"),
    "arm_smmuv3": (C("IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3"), "struct iommu_viommu_arm_smmuv3_invalidate"),
}
HW_INFO_TYPES = {
    C("IOMMU_HW_INFO_TYPE_NONE"): ("none", None),
    C("IOMMU_HW_INFO_TYPE_INTEL_VTD"): ("intel_vtd", "struct iommu_hw_info_vtd"),
    C("IOMMU_HW_INFO_TYPE_ARM_SMMUV3"): ("arm_smmuv3", "struct iommu_hw_info_arm_smmuv3"),
    C("IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV"): ("tegra241_cmdqv", "struct iommu_hw_info_tegra241_cmdqv"),
    C("IOMMU_HW_INFO_TYPE_AMD"): ("amd", "struct iommu_hw_info_amd"),
}
HW_CAPABILITIES = {
    "dirty_tracking": C("IOMMU_HW_CAP_DIRTY_TRACKING"),
    "pci_pasid_exec": C("IOMMU_HW_CAP_PCI_PASID_EXEC"),
    "pci_pasid_priv": C("IOMMU_HW_CAP_PCI_PASID_PRIV"),
    "pci_ats_not_supported": C("IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED"),
}
VIOMMU_TYPES = {"default": C("IOMMU_VIOMMU_TYPE_DEFAULT"), "arm_smmuv3": C("IOMMU_VIOMMU_TYPE_ARM_SMMUV3"),
                "tegra241_cmdqv": C("IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV")}
VEVENTQ_TYPES = {"default": C("IOMMU_VEVENTQ_TYPE_DEFAULT"), "arm_smmuv3": C("IOMMU_VEVENTQ_TYPE_ARM_SMMUV3"),
                 "tegra241_cmdqv": C("IOMMU_VEVENTQ_TYPE_TEGRA241_CMDQV")}
_UINTPTR = ffi.typeof("uintptr_t")
_CDATA, _from_buffer, _cast = ffi.CData, ffi.from_buffer, ffi.cast
_PAGE_MASK = PAGE_SIZE - 1

HW_QUEUE_TYPES = {"default": C("IOMMU_HW_QUEUE_TYPE_DEFAULT"),
                  "tegra241_cmdqv": C("IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV")}

# The ioctls whose types an open iommufd builds at once (see ioctl.prepare).
_HOT_IOCTLS = (IOMMU_DESTROY, IOMMU_IOAS_ALLOC, IOMMU_IOAS_MAP, IOMMU_IOAS_MAP_FILE, IOMMU_IOAS_UNMAP,
               IOMMU_HWPT_ALLOC)

_MAP_POOL, _MAP_REQUEST = IOMMU_IOAS_MAP._free, IOMMU_IOAS_MAP.request
_UNMAP_POOL, _UNMAP_REQUEST = IOMMU_IOAS_UNMAP._free, IOMMU_IOAS_UNMAP.request

# Buffers of mappings whose iommufd was detach()ed to another owner: they must
# outlive this process's interest in them, since the kernel may still DMA there.
_KEEPALIVE: list[Any] = []


# -- input validation ----------------------------------------------------------
def _int(value: Any, what: str, *, minimum: int = 0, maximum: int = U64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.UsageError(f"{what} must be an integer, not {type(value).__name__}")
    if value < minimum or value > maximum:
        if value < 0 and minimum >= 0:
            raise errors.UsageError(f"{what} must not be negative (got {value})")
        raise errors.UsageError(f"{what} must be in [{minimum:#x}, {maximum:#x}] (got {value:#x})")
    return value


def _aligned(value: int, what: str, alignment: int = PAGE_SIZE) -> int:
    if value % alignment:
        raise errors.UsageError(f"{what} {value:#x} is not a multiple of {alignment:#x}")
    return value


def _length(value: Any, what: str = "length", alignment: int | None = None) -> int:
    length = _int(value, what)
    if length == 0:
        raise errors.UsageError(f"{what} must not be 0")
    if alignment:
        _aligned(length, what, alignment)
    return length


def _granularity(**values: int) -> Callable[[], str] | None:
    """The detail for a failed call with byte-granular values, made only on
    failure: the kernel takes them while the IOAS's iova_alignment is 1 (no
    domain attached, huge pages on) and refuses them (EINVAL) once it is a page
    (io_pagetable.c, iopt_calculate_iova_alignment), so the library leaves
    the judgement to the kernel."""
    odd = [f"{name} {value:#x}" for name, value in values.items() if value & _PAGE_MASK]
    if not odd:
        return None
    return lambda: (f"{', '.join(odd)} not page aligned, which the kernel refuses (EINVAL) once "
                    "the IOAS has a domain attached or huge pages off: see IOAS.iova_alignment()")


def _range_end(start: int, length: int, what: str) -> None:
    if start + length - 1 > U64_MAX:
        raise errors.UsageError(f"{what} [{start:#x}, +{length:#x}) wraps past 2^64")


def _named(value: Any, table: dict[str, Any], what: str) -> Any:
    if isinstance(value, str):
        try:
            return table[value.lower()]
        except KeyError:
            raise errors.UsageError(f"unknown {what} {value!r}; known: {', '.join(sorted(table))}") from None
    return value


def _flags(value: Any, what: str = "flags") -> int:
    return _int(value, what, maximum=U32_MAX)


def _fd_of(file_or_fd: Any, what: str = "file") -> int:
    if isinstance(file_or_fd, bool):
        raise errors.UsageError(f"{what} must be an fd or have fileno()")
    if isinstance(file_or_fd, int):
        fd = file_or_fd
    elif hasattr(file_or_fd, "fileno"):
        fd = file_or_fd.fileno()
    else:
        raise errors.UsageError(f"{what} must be an fd or have fileno(), not {type(file_or_fd).__name__}")
    if not isinstance(fd, int) or fd < 0:
        raise errors.UsageError(f"{what} has no valid fd ({fd!r})")
    return fd


def buffer_address(buffer: Any, *, writable: bool, length: int | None = None) -> tuple[int, int, Any]:
    """``(address, length, pin)`` of a Python buffer or a cffi array.

    ``pin`` is the cffi object that keeps the buffer exported (so it can
    neither be freed nor, for ``mmap``, closed) while it lives; None for a
    cffi array/pointer (keep a reference to the object itself)."""
    if isinstance(buffer, ffi.CData):
        kind = ffi.typeof(buffer).kind
        if kind == "array":
            size = ffi.sizeof(buffer)
        elif kind == "pointer":
            if length is None:
                raise errors.UsageError("a cffi pointer carries no size: pass length=")
            size = length
        else:
            raise errors.UsageError(f"cannot map a cffi {ffi.typeof(buffer).cname}")
        addr = int(ffi.cast(_UINTPTR, buffer))
        pin = None  # the caller's own cffi object: referenced, never released by us
    else:
        try:
            pin = ffi.from_buffer(buffer, require_writable=writable)
        except BufferError:
            raise errors.UsageError("the buffer is read-only: pass writeable=False for a device "
                                    "that only reads, or map a writable buffer") from None
        except TypeError:
            raise errors.UsageError(f"cannot map a {type(buffer).__name__}: need a buffer "
                                    "(mmap.mmap, bytearray, memoryview) or a cffi array") from None
        size = len(pin)
        addr = int(ffi.cast(_UINTPTR, pin))
    if length is not None:
        length = _int(length, "length")
        if length > size:
            raise errors.UsageError(f"length {length:#x} exceeds the buffer's {size:#x} bytes")
        size = length
    if size == 0:
        raise errors.UsageError("cannot map an empty buffer (length 0)")
    return addr, size, pin


def aligned_buffer(length: int) -> _mmap.mmap:
    """Page-aligned anonymous memory for :meth:`IOAS.map` (an ``mmap.mmap``)."""
    return _mmap.mmap(-1, _length(length, alignment=PAGE_SIZE))


def _release(pin: Any) -> None:
    if isinstance(pin, ffi.CData):
        try:
            ffi.release(pin)
        except (ValueError, TypeError):
            pass


# -- records ---------------------------------------------------------------------
@record(frozen=True)
class IovaRange:
    """An inclusive IOVA range, as the kernel reports it (``start``..``last``)."""

    start: int
    last: int

    @property
    def length(self) -> int:
        return self.last - self.start + 1

    def __contains__(self, iova: int) -> bool:
        return self.start <= iova <= self.last


@record
class Mapping:
    """One mapping pyiommufd made in an IOAS.

    ``kind`` is ``"va"`` (IOMMU_IOAS_MAP), ``"file"`` (IOMMU_IOAS_MAP_FILE) or
    ``"unknown"`` (a copy of a range pyiommufd did not map itself). For file
    mappings ``fd``/``start`` name the file and offset; ``file`` is the object
    passed in (kept alive, since a live-update plan must preserve that very
    open file description, the series' patch 14/14: memfd, then iommufd, then cdev, in one session)."""

    iova: int
    length: int
    kind: str
    readable: bool = True
    writeable: bool = True
    fd: int | None = None
    start: int | None = None
    user_va: int | None = None
    copied_from: tuple[int, int] | None = None  # (src ioas id, src iova)
    file: Any = hidden(default=None)
    buffer: Any = hidden(default=None)
    pin: Any = hidden(default=None)

    @property
    def last(self) -> int:
        return self.iova + self.length - 1

    def covers(self, iova: int, length: int) -> bool:
        return self.iova <= iova and iova + length - 1 <= self.last


@record(frozen=True)
class HwInfoVtd:
    """Decoded ``struct iommu_hw_info_vtd``."""

    flags: int
    cap_reg: int
    ecap_reg: int

    @property
    def errata_772415_spr17(self) -> bool:
        return bool(self.flags & C("IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17"))


@record(frozen=True)
class HwInfo:
    """The answer of IOMMU_GET_HW_INFO.

    ``data`` is the driver-specific record exactly as the kernel filled it
    (``min(our buffer, kernel's length)`` bytes); ``data_len`` is the length the
    kernel supports (may exceed ``len(data)`` on a newer kernel). ``decoded`` is
    a dict of the record's fields for known types; ``vtd`` the VT-d record."""

    dev_id: int
    data_type: int
    type_name: str
    data: bytes
    data_len: int
    capabilities: int
    max_pasid_log2: int
    decoded: dict[str, Any] | None = None
    vtd: HwInfoVtd | None = None

    @property
    def capability_names(self) -> list[str]:
        return [name for name, bit in HW_CAPABILITIES.items() if self.capabilities & bit]

    @property
    def dirty_tracking(self) -> bool:
        return bool(self.capabilities & HW_CAPABILITIES["dirty_tracking"])


@record(frozen=True)
class DirtyBitmap:
    """IOMMU_HWPT_GET_DIRTY_BITMAP's answer: bit i covers ``iova + i*page_size``."""

    iova: int
    length: int
    page_size: int
    bitmap: bytes

    @property
    def npages(self) -> int:
        return self.length // self.page_size

    def is_dirty(self, iova: int) -> bool:
        if not (self.iova <= iova < self.iova + self.length):
            raise errors.UsageError(f"iova {iova:#x} is outside the bitmap's range")
        bit = (iova - self.iova) // self.page_size
        return bool(self.bitmap[bit // 8] & (1 << (bit % 8)))

    def dirty_iovas(self) -> list[int]:
        out = []
        for bit in range(self.npages):
            if self.bitmap[bit // 8] & (1 << (bit % 8)):
                out.append(self.iova + bit * self.page_size)
        return out

    @property
    def count(self) -> int:
        return len(self.dirty_iovas())


@record(frozen=True)
class PageFault:
    """One ``struct iommu_hwpt_pgfault`` read from a fault queue."""

    flags: int
    dev_id: int
    pasid: int
    grpid: int
    perm: int
    addr: int
    length: int
    cookie: int


def _struct_dict(cdata: ioctl.CData, struct: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, fld in ffi.typeof(struct).fields:
        if name.startswith("__") or name == "reserved":
            continue
        value = getattr(cdata, name)
        if fld.type.kind == "array":
            value = [int(v) for v in value]
        else:
            value = int(value)
        out[name] = value
    return out


def _data_bytes(data: Any, struct: str | None, what: str) -> bytes:
    """Driver data given as bytes, a cffi struct (pointer) or a dict of fields."""
    if data is None:
        return b""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, ffi.CData):
        kind = ffi.typeof(data).kind
        if kind == "pointer":
            return bytes(ffi.buffer(data, ffi.sizeof(ffi.typeof(data).item)))
        return bytes(ffi.buffer(data))
    if isinstance(data, dict):
        if struct is None:
            raise errors.UsageError(f"{what}: give a data type with a known layout, or raw bytes")
        arg = ffi.new(f"{struct} *")
        for key, value in data.items():
            try:
                setattr(arg, key, value)
            except (AttributeError, TypeError, OverflowError) as exc:
                raise errors.UsageError(f"{what}: bad field {key!r} for {struct}: {exc}") from None
        return bytes(ffi.buffer(arg))
    raise errors.UsageError(f"{what} must be bytes, a cffi struct or a dict, not {type(data).__name__}")


# -- the context -----------------------------------------------------------------
class IOMMUFD(FdObject):
    """An iommufd context (an open ``/dev/iommu``)."""

    kind = FileKind.IOMMUFD
    _what = "iommufd"
    close_on_gc = True

    def __init__(self, fd: int, *, backend: Backend | None = None, owned: bool = True,
                 path: str | None = None):
        super().__init__(fd, backend=backend, owned=owned)
        self.path = path
        self._objects: dict[int, IommufdObject] = {}
        ioctl.prepare(*_HOT_IOCTLS)  # once per process: the first call then costs no more
        self._ioctl = ioctl.raw_ioctl(self.backend)

    # -- construction and fd ownership -----------------------------------------
    @classmethod
    def open(cls, path: str = DEFAULT_PATH, backend: Backend | None = None) -> "IOMMUFD":
        be = get_backend(backend)
        return cls(open_path(be, path, f"open({path})", "iommufd"), backend=be, owned=True, path=path)

    @classmethod
    def from_fd(cls, fd: int, backend: Backend | None = None, owned: bool = True) -> "IOMMUFD":
        """Wrap an iommufd fd you already have (from a VMM, SCM_RIGHTS, a LUO
        session). With ``owned=True`` (the default) ``close()`` closes it."""
        return cls(fd, backend=backend, owned=owned)

    def _on_close(self) -> None:
        # Objects allocated through this wrapper are forgotten (the kernel
        # destroys them with the last reference to the file); mapped buffers
        # are released.
        for obj in list(self._objects.values()):
            obj._forget()
        self._objects.clear()

    def detach(self) -> int:
        """Give up ownership and return the fd (e.g. to hand it to a VMM).
        The objects stay in the kernel; buffers mapped through them are kept
        alive for the life of the process."""
        fd = self.fileno()
        for obj in list(self._objects.values()):
            _KEEPALIVE.extend(obj._pins())
            obj._forget(release=False)
        self._objects.clear()
        self._fd = None
        return fd

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else f"fd={self._fd}"
        return f"<IOMMUFD {state} objects={sorted(self._objects)}>"

    def _register(self, obj: "IommufdObject") -> None:
        self._objects[obj.id] = obj

    def _unregister(self, obj: "IommufdObject") -> None:
        if self._objects.get(obj.id) is obj:
            del self._objects[obj.id]

    def _obj_id(self, obj: Any, what: str) -> int:
        if isinstance(obj, IommufdObject):
            if obj.iommufd is not self:
                raise errors.UsageError(f"{what} {obj!r} belongs to a different iommufd")
            if obj.destroyed:
                raise errors.UsageError(f"{what} {obj!r} is destroyed")
            return obj.id
        return _int(obj, f"{what} id", maximum=U32_MAX)

    def _dev_id(self, device: Any) -> int:
        if isinstance(device, bool):
            raise errors.UsageError("device must be a bound VfioDevice or a dev_id")
        if isinstance(device, int):
            return _int(device, "dev_id", maximum=U32_MAX)
        dev_id = getattr(device, "dev_id", None)
        if dev_id is None:
            raise errors.UsageError(f"{device!r} is not bound to an iommufd: call bind(iommufd) first")
        bound = getattr(device, "iommufd", None)
        if isinstance(bound, IOMMUFD) and bound is not self:
            raise errors.UsageError(f"{device!r} is bound to a different iommufd")
        return int(dev_id)

    @property
    def objects(self) -> list["IommufdObject"]:
        """Live objects allocated (or adopted) through this wrapper."""
        return list(self._objects.values())

    @property
    def ioases(self) -> list["IOAS"]:
        return [o for o in self._objects.values() if isinstance(o, IOAS)]

    @property
    def hwpts(self) -> list["HWPT"]:
        return [o for o in self._objects.values() if isinstance(o, HWPT)]

    # -- generic -------------------------------------------------------------------
    def destroy(self, obj_id: int | "IommufdObject") -> None:
        """IOMMU_DESTROY by id (or object). Prefer ``obj.destroy()``."""
        if isinstance(obj_id, IommufdObject):
            obj_id.destroy()
            return
        obj_id = _int(obj_id, "object id", maximum=U32_MAX)
        known = self._objects.get(obj_id)
        if known is not None:
            known.destroy()
            return
        self._call(IOMMU_DESTROY, id=obj_id)

    # -- IOAS ----------------------------------------------------------------------
    def alloc_ioas(self) -> "IOAS":
        pair = IOMMU_IOAS_ALLOC.take()
        ioctl.issue(self.backend, self.fileno(), IOMMU_IOAS_ALLOC, pair[1])
        ioas = IOAS(self, pair[0].out_ioas_id)
        IOMMU_IOAS_ALLOC.give(pair)
        self._objects[ioas.id] = ioas
        return ioas

    def _wrap(self, cls: type[_Wrapped], obj_id: int, owned: bool) -> _Wrapped:
        obj_id = _int(obj_id, f"{cls.__name__} id", minimum=1, maximum=U32_MAX)
        known = self._objects.get(obj_id)
        if isinstance(known, cls):
            return known
        obj = cls(self, obj_id, owned=owned)
        self._register(obj)
        return obj

    def ioas(self, ioas_id: int, *, owned: bool = False) -> "IOAS":
        """Wrap an existing IOAS id (e.g. the VFIO compat IOAS). Not destroyed
        on context exit unless ``owned``."""
        return self._wrap(IOAS, ioas_id, owned)

    def hwpt(self, hwpt_id: int, *, owned: bool = False) -> "HWPT":
        """Wrap an existing paging HWPT id, e.g. the automatic HWPT that
        ``VfioDevice.attach(ioas)`` returns. Not destroyed unless ``owned``."""
        return self._wrap(HWPT, hwpt_id, owned)

    def change_process(self) -> None:
        """IOMMU_IOAS_CHANGE_PROCESS: move the pinned-page accounting of every
        mapping of every IOAS in this context to the calling process (userspace
        live update of the VMM process). Only MAP_FILE mappings qualify; with any
        user-VA mapping present the kernel says EINVAL and changes nothing."""
        self._call(IOMMU_IOAS_CHANGE_PROCESS)

    # -- options -------------------------------------------------------------------
    def option(self, option: str | int, value: int | bool | None = None, *,
               object_id: "int | IOAS" = 0) -> int:
        """IOMMU_OPTION. ``value=None`` gets, otherwise sets; returns the value.

        * ``"rlimit_mode"`` (context-wide, ``object_id`` 0): 0 = account pinned
          pages to RLIMIT_MEMLOCK of the user (default), 1 = to the mm
          (needs CAP_SYS_RESOURCE to set).
        * ``"huge_pages"`` (per IOAS: pass ``object_id=ioas``): 1 = use huge
          pages (default), 0 = PAGE_SIZE only."""
        opt = _named(option, OPTIONS, "option")
        opt = _int(opt, "option", maximum=U32_MAX)
        if isinstance(object_id, IommufdObject):
            obj = self._obj_id(object_id, "object")
        else:
            obj = _int(object_id, "object_id", maximum=U32_MAX)
        if opt == OPTIONS["rlimit_mode"] and obj:
            raise errors.UsageError("rlimit_mode is context-wide: object_id must be 0")
        if opt == OPTIONS["huge_pages"] and not obj:
            raise errors.UsageError("huge_pages is per IOAS: pass object_id=<IOAS>")
        if value is None:
            arg = self._call(IOMMU_OPTION, option_id=opt, op=C("IOMMU_OPTION_OP_GET"), object_id=obj)
            return int(arg.val64)
        # any u64: the kernel itself says which values an option takes (EINVAL)
        value = int(value) if isinstance(value, bool) else _int(value, "option value")
        self._call(IOMMU_OPTION, option_id=opt, op=C("IOMMU_OPTION_OP_SET"), object_id=obj, val64=value)
        return value

    # -- VFIO compatibility ----------------------------------------------------
    def vfio_ioas(self, op: str = "get", ioas: "IOAS | int | None" = None) -> int | None:
        """IOMMU_VFIO_IOAS: the IOAS the VFIO container compatibility layer of
        this iommufd uses. ``"get"`` returns its id (ENODEV if none yet),
        ``"set"`` makes ``ioas`` it, ``"clear"`` unsets it."""
        opcode = _named(op, VFIO_IOAS_OPS, "vfio_ioas op")
        if opcode not in VFIO_IOAS_OPS.values():
            raise errors.UsageError(f"unknown vfio_ioas op {op!r}")
        if opcode == VFIO_IOAS_OPS["set"]:
            if ioas is None:
                raise errors.UsageError("vfio_ioas('set') needs an IOAS")
            ioas_id = self._obj_id(ioas, "IOAS")
        elif ioas is not None:
            raise errors.UsageError(f"vfio_ioas({op!r}) takes no IOAS")
        else:
            ioas_id = 0
        arg = self._call(IOMMU_VFIO_IOAS, ioas_id=ioas_id, op=opcode)
        return int(arg.ioas_id) if opcode == VFIO_IOAS_OPS["get"] else None

    # -- HWPT ----------------------------------------------------------------------
    def alloc_hwpt(self, device_or_dev_id: Any, ioas: Any, *, flags: int = 0, data: Any = None,
                   data_type: str | int | None = None, fault_queue: "FaultQueue | int | None" = None,
                   nest_parent: bool = False, dirty_tracking: bool = False,
                   pasid: bool = False) -> "HWPT":
        """IOMMU_HWPT_ALLOC: a paging HWPT on an IOAS, or (with ``data``) a
        nested HWPT on a nest-parent HWPT or a vIOMMU.

        ``data`` is the driver's stage-1 record (bytes, a cffi struct, or a
        dict of fields of the ``data_type``'s struct); ``data_type`` is
        ``"vtd_s1"``, ``"arm_smmuv3"``, ``"amd_guest"`` or an int.
        ``fault_queue`` (with IOMMU_HWPT_FAULT_ID_VALID) routes IO page faults
        to that queue. The flag keywords OR into ``flags``."""
        dev_id = self._dev_id(device_or_dev_id)
        pt_id = self._obj_id(ioas, "IOAS/HWPT/vIOMMU")
        flags = _flags(flags)
        if nest_parent:
            flags |= HWPT_ALLOC_NEST_PARENT
        if dirty_tracking:
            flags |= HWPT_ALLOC_DIRTY_TRACKING
        if pasid:
            flags |= HWPT_ALLOC_PASID
        fault_id = 0
        if fault_queue is not None:
            fault_id = self._obj_id(fault_queue, "fault queue")
            flags |= HWPT_FAULT_ID_VALID
        if data is not None and data_type is None:
            raise errors.UsageError("nested HWPT data needs a data_type (e.g. 'vtd_s1')")
        dtype, struct = 0, None
        if data_type is not None:
            entry = _named(data_type, HWPT_DATA_TYPES, "HWPT data type")
            if isinstance(entry, tuple):
                dtype, struct = entry
            else:
                dtype = _int(entry, "data_type", maximum=U32_MAX)
                struct = next((s for v, s in HWPT_DATA_TYPES.values() if v == dtype), None)
        raw = _data_bytes(data, struct, "HWPT data")
        if dtype and not raw:
            raise errors.UsageError("a nested HWPT data type needs data")
        holder = ffi.from_buffer(bytearray(raw)) if raw else None
        arg = ioctl.new(IOMMU_HWPT_ALLOC, flags=flags, dev_id=dev_id, pt_id=pt_id, data_type=dtype,
                        data_len=len(raw), fault_id=fault_id)
        if holder is not None:
            arg.data_uptr = int(ffi.cast("uintptr_t", holder))
        self._invoke(IOMMU_HWPT_ALLOC, arg)
        parent = ioas if isinstance(ioas, IommufdObject) else self._objects.get(pt_id)
        hwpt = HWPT(self, int(arg.out_hwpt_id), parent=parent, parent_id=pt_id, dev_id=dev_id,
                    flags=flags, data_type=dtype,
                    fault_queue=fault_queue if isinstance(fault_queue, FaultQueue) else None)
        self._register(hwpt)
        return hwpt

    # -- GET_HW_INFO ---------------------------------------------------------------
    def get_hw_info(self, device: Any, *, data_type: int | None = None, buffer_size: int = 64) -> HwInfo:
        """IOMMU_GET_HW_INFO for a bound device.

        The kernel copies ``min(data_len, its length)`` bytes, zeroes the rest
        of our buffer and answers with the length it supports; if that is
        larger than our buffer we ask again with a buffer of that size.
        ``data_type`` requests a specific type (IOMMU_HW_INFO_FLAG_INPUT_TYPE)."""
        dev_id = self._dev_id(device)
        size = _int(buffer_size, "buffer_size", maximum=1 << 20)
        flags = 0
        if data_type is not None:
            _int(data_type, "data_type", maximum=U32_MAX)
            flags = C("IOMMU_HW_INFO_FLAG_INPUT_TYPE")
        for _ in range(3):
            buf = ffi.new("uint8_t[]", max(size, 1))
            arg = ioctl.new(IOMMU_GET_HW_INFO, flags=flags, dev_id=dev_id, data_len=size,
                            data_uptr=int(ffi.cast("uintptr_t", buf)))
            if data_type is not None:
                arg.in_data_type = data_type
            self._invoke(IOMMU_GET_HW_INFO, arg)
            kernel_len = int(arg.data_len)
            if kernel_len <= size:
                break
            size = kernel_len
        data = bytes(ffi.buffer(buf, min(size, kernel_len)))
        dtype = int(arg.out_data_type)
        name, struct = HW_INFO_TYPES.get(dtype, (f"type{dtype}", None))
        decoded = vtd = None
        if struct is not None and len(data) >= ffi.sizeof(struct):
            view = ffi.from_buffer(f"{struct} *", bytearray(data[:ffi.sizeof(struct)]))
            decoded = _struct_dict(view, struct)
            if dtype == C("IOMMU_HW_INFO_TYPE_INTEL_VTD"):
                vtd = HwInfoVtd(int(view.flags), int(view.cap_reg), int(view.ecap_reg))
        return HwInfo(dev_id=dev_id, data_type=dtype, type_name=name, data=data, data_len=kernel_len,
                      capabilities=int(arg.out_capabilities),
                      max_pasid_log2=int(arg.out_max_pasid_log2), decoded=decoded, vtd=vtd)

    # -- fault queues, vIOMMU and friends ----------------------------------------------
    def alloc_fault_queue(self) -> "FaultQueue":
        """IOMMU_FAULT_QUEUE_ALLOC: a queue of IO page faults with its own fd."""
        arg = self._call(IOMMU_FAULT_QUEUE_ALLOC)
        fq = FaultQueue(self, int(arg.out_fault_id), int(arg.out_fault_fd))
        self._register(fq)
        return fq

    def alloc_viommu(self, device: Any, hwpt: Any, *, type: str | int = "default", flags: int = 0,
                     data: Any = None) -> "Viommu":
        """IOMMU_VIOMMU_ALLOC on a nest-parent HWPT. ``data`` is the
        type-specific in/out record; its kernel-updated bytes land in
        ``viommu.data``."""
        dev_id = self._dev_id(device)
        hwpt_id = self._obj_id(hwpt, "nest-parent HWPT")
        vtype = _int(_named(type, VIOMMU_TYPES, "vIOMMU type"), "vIOMMU type", maximum=U32_MAX)
        raw = _data_bytes(data, "struct iommu_viommu_tegra241_cmdqv"
                          if vtype == VIOMMU_TYPES["tegra241_cmdqv"] else None, "vIOMMU data")
        holder = bytearray(raw)
        arg = ioctl.new(IOMMU_VIOMMU_ALLOC, flags=_flags(flags), type=vtype, dev_id=dev_id,
                        hwpt_id=hwpt_id, data_len=len(raw))
        pin = None
        if raw:
            pin = ffi.from_buffer(holder)
            arg.data_uptr = int(ffi.cast("uintptr_t", pin))
        self._invoke(IOMMU_VIOMMU_ALLOC, arg)
        viommu = Viommu(self, int(arg.out_viommu_id), type=vtype, dev_id=dev_id,
                        hwpt=hwpt if isinstance(hwpt, HWPT) else None, data=bytes(holder))
        del pin
        self._register(viommu)
        return viommu

    def alloc_vdevice(self, viommu: Any, device: Any, virt_id: int) -> "Vdevice":
        """IOMMU_VDEVICE_ALLOC: the device's ID as the guest sees it behind a vIOMMU."""
        viommu_id = self._obj_id(viommu, "vIOMMU")
        dev_id = self._dev_id(device)
        virt_id = _int(virt_id, "virt_id")
        arg = self._call(IOMMU_VDEVICE_ALLOC, viommu_id=viommu_id, dev_id=dev_id, virt_id=virt_id)
        vdev = Vdevice(self, int(arg.out_vdevice_id), viommu_id=viommu_id, dev_id=dev_id, virt_id=virt_id)
        self._register(vdev)
        return vdev

    def alloc_veventq(self, viommu: Any, *, type: str | int = "default", depth: int = 64,
                      flags: int = 0) -> "Veventq":
        """IOMMU_VEVENTQ_ALLOC: a vIOMMU event queue with its own fd."""
        viommu_id = self._obj_id(viommu, "vIOMMU")
        qtype = _int(_named(type, VEVENTQ_TYPES, "vEVENTQ type"), "vEVENTQ type", maximum=U32_MAX)
        depth = _int(depth, "depth", minimum=1, maximum=U32_MAX)
        arg = self._call(IOMMU_VEVENTQ_ALLOC, flags=_flags(flags), viommu_id=viommu_id, type=qtype,
                         veventq_depth=depth)
        q = Veventq(self, int(arg.out_veventq_id), int(arg.out_veventq_fd), viommu_id=viommu_id,
                    type=qtype, depth=depth)
        self._register(q)
        return q

    def alloc_hw_queue(self, viommu: Any, *, type: str | int, index: int, base_addr: int,
                       length: int, flags: int = 0) -> "HwQueue":
        """IOMMU_HW_QUEUE_ALLOC: a HW-accelerated vIOMMU queue whose guest memory
        is at ``base_addr`` (a nesting-parent IOVA, i.e. a guest PA)."""
        viommu_id = self._obj_id(viommu, "vIOMMU")
        qtype = _int(_named(type, HW_QUEUE_TYPES, "HW queue type"), "HW queue type", maximum=U32_MAX)
        index = _int(index, "index", maximum=U32_MAX)
        base_addr = _int(base_addr, "base_addr")
        length = _length(length, "length", alignment=None)
        arg = self._call(IOMMU_HW_QUEUE_ALLOC, flags=_flags(flags), viommu_id=viommu_id, type=qtype,
                         index=index, nesting_parent_iova=base_addr, length=length)
        q = HwQueue(self, int(arg.out_hw_queue_id), viommu_id=viommu_id, type=qtype, index=index,
                    base_addr=base_addr, length=length)
        self._register(q)
        return q

    # -- noiommu -------------------------------------------------------------------
    def noiommu_get_pa(self, ioas: Any, iova: int, length: int) -> tuple[int, int]:
        """IOMMU_IOAS_NOIOMMU_GET_PA (7.3, nr 0x95): the physical address behind
        ``iova`` and how many bytes from there are physically contiguous (at
        most ``length``). Only for noiommu devices doing unsafe DMA; needs
        CAP_SYS_RAWIO and CONFIG_IOMMUFD_NOIOMMU.

        **nr 0x95 collision:** the live-update series numbers its HWPT mark
        ioctl 0x95 too, so both encode to request 0x3b95 (Linux 7.3 include/uapi/linux/iommufd.h: nr 0x95 is IOMMU_IOAS_NOIOMMU_GET_PA). On a
        kernel with the series this call reaches the mark ioctl, which rejects
        our non-zero tail with E2BIG; on stock 7.3 an LU mark call lands here
        and fails with EINVAL (struct too small). Neither side can tell from
        the request value alone; :mod:`pyiommufd.abi` selects the LU revision."""
        ioas_id = self._obj_id(ioas, "IOAS")
        iova = _int(iova, "iova")
        length = _length(length, "length", alignment=None)
        arg = self._call(IOMMU_IOAS_NOIOMMU_GET_PA, ioas_id=ioas_id, iova=iova, length=length)
        return int(arg.out_phys), int(arg.length)


# -- objects -----------------------------------------------------------------------
class IommufdObject:
    """An object inside an iommufd context, named by its id."""

    kind = "object"

    def __init__(self, iommufd: IOMMUFD, obj_id: int, *, owned: bool = True):
        self.iommufd = iommufd
        self.id = int(obj_id)
        self.owned = owned
        self.destroyed = False

    @property
    def backend(self) -> Backend:
        return self.iommufd.backend

    def _check(self) -> None:
        if self.destroyed:
            raise errors.UsageError(f"{self!r} is destroyed")
        if self.iommufd.closed:
            raise errors.UsageError(f"{self!r}: its iommufd is closed")

    def _pins(self) -> list[Any]:
        return []

    def _forget(self, release: bool = True) -> None:
        """The kernel object is gone (or no longer ours to manage)."""
        self.destroyed = True

    def _before_destroy(self) -> None:
        pass

    def destroy(self) -> None:
        """IOMMU_DESTROY. Idempotent; a no-op once the iommufd is closed."""
        if self.destroyed:
            return
        if self.iommufd.closed:
            self._forget()
            return
        self._before_destroy()
        arg, buf = pair = IOMMU_DESTROY.take()
        arg.id = self.id
        ioctl.issue(self.iommufd.backend, self.iommufd.fileno(), IOMMU_DESTROY, buf,
                    detail=lambda: f"{self.kind} {self.id}")
        IOMMU_DESTROY.give(pair)
        self.iommufd._unregister(self)
        self._forget()

    def _implicit_destroy_ok(self) -> bool:
        return self.owned

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._implicit_destroy_ok():
            return
        try:
            self.destroy()
        except errors.KernelError:
            if exc_type is None:
                raise
            # an exception is already propagating: do not mask it

    def __repr__(self) -> str:
        state = " destroyed" if self.destroyed else ""
        return f"<{type(self).__name__} id={self.id}{state}>"


class IOAS(IommufdObject):
    """An IO address space."""

    kind = "ioas"

    def __init__(self, iommufd: IOMMUFD, obj_id: int, *, owned: bool = True):
        super().__init__(iommufd, obj_id, owned=owned)
        # The mappings by IOVA. Map and the unmap of exactly one mapping are
        # O(1); an unmap of a wider range bisects the IOVAs, sorted again
        # only after maps changed them (None: not sorted yet).
        self._mappings: dict[int, Mapping] = {}
        self._sorted: list[int] | None = []

    def __repr__(self) -> str:
        state = " destroyed" if self.destroyed else ""
        return f"<IOAS id={self.id} mappings={len(self._mappings)}{state}>"

    @property
    def mappings(self) -> list[Mapping]:
        """What pyiommufd mapped into this IOAS, by IOVA."""
        return [self._mappings[k] for k in self._sorted_iovas()]

    def _sorted_iovas(self) -> list[int]:
        if self._sorted is None:
            self._sorted = sorted(self._mappings)
        return self._sorted

    def _track(self, mapping: Mapping) -> None:
        if mapping.iova not in self._mappings:
            self._sorted = None
        self._mappings[mapping.iova] = mapping

    def _pins(self) -> list[Any]:
        return [(m.pin, m.buffer, m.file) for m in self._mappings.values()]

    def _forget(self, release: bool = True) -> None:
        super()._forget(release)
        if release:
            for m in self._mappings.values():
                _release(m.pin)
        self._mappings.clear()
        self._sorted = []

    def _map_flags(self, readable: bool, writeable: bool, fixed: bool) -> int:
        if not (readable or writeable):
            raise errors.UsageError("a mapping must be readable, writeable or both")
        return ((MAP_READABLE if readable else 0) | (MAP_WRITEABLE if writeable else 0)
                | (MAP_FIXED_IOVA if fixed else 0))

    def _check_iova(self, iova: int | None, length: int, hint: int | None = None) -> int:
        if hint is None and iova.__class__ is int and iova >= 0 and iova + length - 1 <= U64_MAX:
            return iova  # the common case, checked in one go
        if iova is None:
            if hint is None:
                return 0
            return _int(hint, "hint_iova")
        if hint is not None:
            raise errors.UsageError("give iova (fixed) or hint_iova, not both")
        iova = _int(iova, "iova")
        _range_end(iova, length, "IOVA range")
        return iova

    # -- map / unmap ---------------------------------------------------------------
    def map(self, buffer: Any, iova: int | None = None, *, readable: bool = True, writeable: bool = True,
            length: int | None = None, hint_iova: int | None = None) -> int:
        """IOMMU_IOAS_MAP of a user buffer (``mmap.mmap``, ``bytearray``,
        ``memoryview``, a cffi array/buffer). ``iova`` maps at that IOVA
        (IOMMU_IOAS_MAP_FIXED_IOVA); ``iova=None`` lets the kernel choose
        (``hint_iova`` is then passed in the iova field without FIXED_IOVA,
        as the seed selftest does; 7.3 ignores it). Returns the IOVA.

        The buffer is referenced (and its export held) until it is unmapped.
        The IOVA and the length may be byte granular while the IOAS has no
        domain attached; once one is, the kernel wants whole pages. Use page-aligned
        memory (``mmap.mmap``, :func:`aligned_buffer`): a ``bytearray`` is
        rarely page aligned, and the kernel keeps the buffer's page offset in
        the IOVA, which it refuses (EINVAL) once the IOAS has a domain; the
        IOMMU also maps whole pages, so the device could reach the bytes
        around an unaligned buffer. User-VA mappings cannot be preserved across a live
        update (the series' patch 11/14, iommufd preservation): use :meth:`map_file` with a sealed memfd."""
        ictx = self.iommufd
        if self.destroyed or ictx._fd is None:
            self._check()
        flags = self._map_flags(readable, writeable, iova is not None)
        pin = None
        if length is None and not isinstance(buffer, _CDATA):
            try:   # the common case (mmap, bytearray) inline; anything odd goes to buffer_address
                pin = _from_buffer(buffer, require_writable=writeable)
            except (BufferError, TypeError):
                pass
        if pin is not None and len(pin):
            size = len(pin)
            addr = int(_cast(_UINTPTR, pin))
        else:
            _release(pin)
            addr, size, pin = buffer_address(buffer, writable=writeable, length=length)
        detail: ioctl.Detail = None
        if addr & _PAGE_MASK:
            detail = (f"user_va {addr:#x} is not page aligned: once a domain is attached the IOVA "
                      "must be page aligned and keeps the buffer's page offset; map page-aligned "
                      "memory (mmap.mmap, pyiommufd.iommufd.aligned_buffer())")
        elif (size | (iova if isinstance(iova, int) else 0)) & _PAGE_MASK:
            detail = _granularity(iova=iova if isinstance(iova, int) else 0, length=size)
        try:
            if (hint_iova is None and iova.__class__ is int and iova >= 0
                    and iova + size - 1 <= U64_MAX):
                iova_in = iova
            else:
                iova_in = self._check_iova(iova, size, hint_iova)
            # the pool rule (docs/architecture.md); every field is set here, so
            # a struct from the pool needs no zeroing
            try:
                arg, buf = pair = _MAP_POOL.pop()
            except IndexError:
                arg, buf = pair = IOMMU_IOAS_MAP.take()
            arg.flags = flags
            arg.ioas_id = self.id
            arg.user_va = addr
            arg.length = size
            arg.iova = iova_in
            try:
                ictx._ioctl(ictx._fd, _MAP_REQUEST, buf)  # type: ignore[arg-type]  # open: checked
            except OSError as exc:
                raise ioctl.failure(exc, IOMMU_IOAS_MAP, None, detail) from None
            got: int = arg.iova
            _MAP_POOL.append(pair)
        except BaseException:
            _release(pin)
            raise
        mappings = self._mappings
        if got not in mappings:
            self._sorted = None
        mappings[got] = Mapping(got, size, "va", readable, writeable, None, None, addr, None, None, buffer, pin)
        return got

    def map_file(self, file_or_fd: Any, start: int = 0, length: int | None = None,
                 iova: int | None = None, *, readable: bool = True, writeable: bool = True,
                 hint_iova: int | None = None) -> int:
        """IOMMU_IOAS_MAP_FILE of ``length`` bytes of a file (a ``MemFD`` or
        anything with ``fileno()``, or an int fd) from offset ``start``.
        ``length=None`` maps from ``start`` to the end of the file. ``iova``
        and ``hint_iova`` as for :meth:`map`. Returns the IOVA.

        For live update the memfd must be sealed F_SEAL_SEAL|GROW|SHRINK
        **before** this call; the kernel samples the seals here (the series' patch 11/14, iommufd preservation)."""
        self._check()
        fd, start, length, iova_in, flags = self._map_file_args(file_or_fd, start, length, iova, readable,
                                                                 writeable, hint_iova)
        arg, buf = pair = IOMMU_IOAS_MAP_FILE.take()
        arg.flags = flags
        arg.ioas_id = self.id
        arg.fd = fd
        arg.start = start
        arg.length = length
        arg.iova = iova_in
        try:
            self.iommufd._ioctl(self.iommufd.fileno(), IOMMU_IOAS_MAP_FILE.request, buf)
        except OSError as exc:
            raise ioctl.failure(exc, IOMMU_IOAS_MAP_FILE, None,
                                _granularity(start=start, length=length, iova=iova_in)) from None
        got: int = arg.iova
        IOMMU_IOAS_MAP_FILE.give(pair)
        self._track(Mapping(got, length, "file", readable, writeable, fd, start, None, None,
                            None if isinstance(file_or_fd, int) else file_or_fd))
        return got

    def map_file_many(self, items: Iterable[Any]) -> list[int]:
        """IOMMU_IOAS_MAP_FILE of every item, in order; returns their IOVAs.

        Each item is a dict of :meth:`map_file`'s arguments (``file`` plus
        ``start``, ``length``, ``iova``, ``readable``, ``writeable``,
        ``hint_iova``) or a tuple ``(file, start, length, iova)``. Every item
        is checked and its struct built before the first ioctl (bad input:
        :class:`~pyiommufd.errors.UsageError` naming the item, nothing
        mapped). If the kernel refuses item ``i``, the error is that map's
        typed error, its detail names the item and the mappings made before
        it, and it carries ``index`` and ``done`` (the IOVAs of items
        ``0..i-1``, which stay mapped and tracked)."""
        self._check()
        prepared: list[Any] = []
        for index, item in enumerate(items):
            try:
                if isinstance(item, dict):
                    kw = dict(item)
                    file_or_fd = kw.pop("file")
                    args = self._map_file_args(file_or_fd, kw.pop("start", 0), kw.pop("length", None),
                                               kw.pop("iova", None), kw.pop("readable", True),
                                               kw.pop("writeable", True), kw.pop("hint_iova", None))
                    if kw:
                        raise errors.UsageError(f"unknown map_file arguments {sorted(kw)}")
                    readable, writeable = item.get("readable", True), item.get("writeable", True)
                else:
                    file_or_fd, start, length, iova = item
                    args = self._map_file_args(file_or_fd, start, length, iova, True, True, None)
                    readable = writeable = True
            except (errors.UsageError, KeyError, TypeError, ValueError) as exc:
                what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
                if isinstance(exc, (TypeError, ValueError)) and not isinstance(exc, errors.UsageError):
                    what = f"not a map_file item (dict, or (file, start, length, iova)): {item!r}"
                raise errors.UsageError(f"map_file_many: item {index + 1}: {what}") from None
            prepared.append((args, readable, writeable, None if isinstance(file_or_fd, int) else file_or_fd))
        n = len(prepared)
        array = IOMMU_IOAS_MAP_FILE.array(n)
        for i, ((fd, start, length, iova_in, flags), _, _, _) in enumerate(prepared):
            a = array[i]
            a.flags, a.ioas_id, a.fd, a.start, a.length, a.iova = flags, self.id, fd, start, length, iova_in
        bufs = IOMMU_IOAS_MAP_FILE.buffers(array, n)
        do_ioctl, ifd, request = self.iommufd._ioctl, self.iommufd.fileno(), IOMMU_IOAS_MAP_FILE.request
        i = 0
        try:
            for i in range(n):
                do_ioctl(ifd, request, bufs[i])
        except OSError as exc:
            done = self._track_files(prepared, array, i)
            error = ioctl.failure(exc, IOMMU_IOAS_MAP_FILE)
            raise errors.partial(error, i, n, "mapped", [f"iova {v:#x}" for v in done], done) from None
        return self._track_files(prepared, array, n)

    def _track_files(self, prepared: list[Any], array: ioctl.CData, count: int) -> list[int]:
        out: list[int] = []
        for i in range(count):
            (fd, start, length, _, _), readable, writeable, file = prepared[i]
            got = array[i].iova
            self._track(Mapping(got, length, "file", readable, writeable, fd, start, None, None, file))
            out.append(got)
        return out

    def _map_file_args(self, file_or_fd: Any, start: Any, length: Any, iova: Any, readable: bool,
                       writeable: bool, hint_iova: Any) -> tuple[int, int, int, int, int]:
        """map_file's checks, in its order: ``(fd, start, length, iova, flags)``."""
        fd = _fd_of(file_or_fd)
        start = _int(start, "start")
        if length is None:
            try:
                size = self.backend.fstat_size(fd)
            except OSError as exc:
                raise errors.make_error("fstat", "iommufd", exc.errno or E.EIO,
                                        detail=f"fd {fd}") from None
            length = size - start
            if length <= 0:
                raise errors.UsageError(f"nothing to map: the file is {size:#x} bytes, start is {start:#x}")
        length = _length(length)
        _range_end(start, length, "file range")
        iova_in = self._check_iova(iova, length, hint_iova)
        flags = self._map_flags(readable, writeable, iova is not None)
        return fd, start, length, iova_in, flags

    def _drop_tracked(self, iova: int, length: int) -> None:
        """Forget every tracked mapping fully inside ``[iova, iova+length)``."""
        mappings = self._mappings
        m = mappings.get(iova)
        if m is not None and m.length == length:
            # exactly one mapping: tracked mappings never overlap (the kernel
            # refuses overlapping IOVAs), so nothing else lies in the range
            del mappings[iova]
            if self._sorted:
                del self._sorted[bisect_left(self._sorted, iova)]
            if m.pin is not None:
                _release(m.pin)
            return
        last = iova + length - 1
        iovas = self._sorted_iovas()
        lo, hi = bisect_left(iovas, iova), bisect_right(iovas, last)
        kept = []
        for key in iovas[lo:hi]:
            m = mappings[key]
            if m.iova + m.length - 1 <= last:
                del mappings[key]
                _release(m.pin)
            else:
                kept.append(key)
        iovas[lo:hi] = kept

    def unmap(self, iova: int, length: int) -> int:
        """IOMMU_IOAS_UNMAP of every mapping fully inside ``[iova, iova+length)``.
        Returns the bytes unmapped. Nothing mapped there:
        :class:`~pyiommufd.errors.NotFound`. Releases the buffers."""
        ictx = self.iommufd
        if self.destroyed or ictx._fd is None:
            self._check()
        if not (iova.__class__ is int and length.__class__ is int and iova >= 0 and length > 0
                and iova + length - 1 <= U64_MAX):
            # not the common case: the full checks, which say what is wrong
            iova = _int(iova, "iova")
            length = _length(length)
            _range_end(iova, length, "IOVA range")
        try:
            arg, buf = pair = _UNMAP_POOL.pop()   # every field is set: no zeroing
        except IndexError:
            arg, buf = pair = IOMMU_IOAS_UNMAP.take()
        arg.ioas_id = self.id
        arg.iova = iova
        arg.length = length
        try:
            ictx._ioctl(ictx._fd, _UNMAP_REQUEST, buf)  # type: ignore[arg-type]  # open: checked
        except OSError as exc:
            raise ioctl.failure(exc, IOMMU_IOAS_UNMAP, None, _granularity(iova=iova, length=length)) from None
        done: int = arg.length
        _UNMAP_POOL.append(pair)
        self._drop_tracked(iova, length)
        return done

    def unmap_all(self) -> int:
        """IOMMU_IOAS_UNMAP with iova 0, length U64_MAX: everything. Returns the bytes unmapped."""
        self._check()
        arg = self.iommufd._call(IOMMU_IOAS_UNMAP, ioas_id=self.id, iova=0, length=U64_MAX)
        for m in self._mappings.values():
            _release(m.pin)
        self._mappings.clear()
        self._sorted = []
        return int(arg.length)

    def copy(self, src_ioas: "IOAS | int", src_iova: int, length: int, dst_iova: int | None = None, *,
             readable: bool = True, writeable: bool = True) -> int:
        """IOMMU_IOAS_COPY ``length`` bytes mapped at ``src_iova`` in
        ``src_ioas`` into this IOAS (sharing the pinned pages). Returns the
        destination IOVA. Copies of MAP_FILE ranges stay file-backed."""
        self._check()
        src_id = self.iommufd._obj_id(src_ioas, "source IOAS")
        src_iova = _int(src_iova, "src_iova")
        length = _length(length)
        _range_end(src_iova, length, "source IOVA range")
        dst_in = self._check_iova(dst_iova, length)
        flags = self._map_flags(readable, writeable, dst_iova is not None)
        arg = self.iommufd._call(IOMMU_IOAS_COPY, flags=flags, dst_ioas_id=self.id, src_ioas_id=src_id,
                                 length=length, dst_iova=dst_in, src_iova=src_iova,
                                 detail=_granularity(src_iova=src_iova, length=length, dst_iova=dst_in))
        got = int(arg.dst_iova)
        src = src_ioas if isinstance(src_ioas, IOAS) else self.iommufd._objects.get(src_id)
        origin = None
        if isinstance(src, IOAS):
            origin = next((m for m in src._mappings.values() if m.covers(src_iova, length)), None)
        if origin is not None:
            delta = src_iova - origin.iova
            self._track(Mapping(
                iova=got, length=length, kind=origin.kind, readable=readable, writeable=writeable,
                fd=origin.fd, start=None if origin.start is None else origin.start + delta,
                user_va=None if origin.user_va is None else origin.user_va + delta,
                copied_from=(src_id, src_iova), file=origin.file, buffer=origin.buffer,
                pin=None if origin.pin is None else ffi.from_buffer(origin.buffer)))
        else:
            self._track(Mapping(iova=got, length=length, kind="unknown", readable=readable,
                                writeable=writeable, copied_from=(src_id, src_iova)))
        return got

    # -- IOVA ranges -------------------------------------------------------------
    #: entries in the first IOVA_RANGES call; more take a second (EMSGSIZE) call
    ranges_initial = 8

    def _ranges_call(self) -> tuple[ioctl.CData, list[ioctl.CData]]:
        return ioctl.call_growing(self.backend, self.iommufd.fileno(), IOMMU_IOAS_IOVA_RANGES,
                                  count_field="num_iovas", ptr_field="allowed_iovas",
                                  elem_type="struct iommu_iova_range", initial=self.ranges_initial,
                                  ioas_id=self.id)

    def iova_ranges(self) -> list[IovaRange]:
        """IOMMU_IOAS_IOVA_RANGES: the holes between reserved IOVA ranges
        (the MSI window, the domains' apertures). Allowed ranges
        (:meth:`allow_iovas`) only steer automatic allocation and do not show
        here. The EMSGSIZE two-call is done for you."""
        self._check()
        _, ranges = self._ranges_call()
        return [IovaRange(int(r.start), int(r.last)) for r in ranges]

    def iova_alignment(self) -> int:
        """The minimum IOVA alignment the attached domains need."""
        self._check()
        arg, _ = self._ranges_call()
        return int(arg.out_iova_alignment)

    def allow_iovas(self, ranges: Iterable[IovaRange | tuple[int, int]]) -> None:
        """IOMMU_IOAS_ALLOW_IOVAS: restrict automatic IOVA allocation to these
        inclusive ``(start, last)`` ranges; an empty list lifts the restriction."""
        self._check()
        items = []
        for r in ranges:
            if isinstance(r, IovaRange):
                start, last = r.start, r.last
            else:
                try:
                    start, last = r
                except (TypeError, ValueError):
                    raise errors.UsageError(f"an IOVA range is (start, last), not {r!r}") from None
            start, last = _int(start, "range start"), _int(last, "range last")
            if start > last:
                raise errors.UsageError(f"IOVA range start {start:#x} is above its last {last:#x}")
            items.append((start, last))
        array = ffi.new("struct iommu_iova_range[]", max(len(items), 1))
        for i, (start, last) in enumerate(items):
            array[i].start, array[i].last = start, last
        self.iommufd._call(IOMMU_IOAS_ALLOW_IOVAS, ioas_id=self.id, num_iovas=len(items),
                           allowed_iovas=int(ffi.cast("uintptr_t", array)) if items else 0)

    # -- per-IOAS bits --------------------------------------------------------
    def huge_pages(self, value: bool | None = None) -> bool:
        """IOMMU_OPTION_HUGE_PAGES on this IOAS: get (``None``) or set."""
        self._check()
        return bool(self.iommufd.option("huge_pages", value, object_id=self))

    def noiommu_get_pa(self, iova: int, length: int) -> tuple[int, int]:
        """See :meth:`IOMMUFD.noiommu_get_pa`."""
        self._check()
        return self.iommufd.noiommu_get_pa(self, iova, length)


class _Invalidatable(IommufdObject):
    def invalidate(self, entries: Any = (), *, data_type: str | int = "vtd_s1",
                   entry_len: int | None = None) -> int:
        """IOMMU_HWPT_INVALIDATE: hand cache-invalidation requests to the
        driver. ``entries`` is a list of dicts (fields of the type's entry
        struct) or cffi structs, or raw bytes with ``entry_len``. An empty list
        probes whether the data type is supported. Returns the number of
        entries the kernel handled."""
        self._check()
        entry = _named(data_type, INVALIDATE_DATA_TYPES, "invalidation data type")
        if isinstance(entry, tuple):
            dtype, struct = entry
        else:
            dtype = _int(entry, "data_type", maximum=U32_MAX)
            struct = next((s for v, s in INVALIDATE_DATA_TYPES.values() if v == dtype), None)
        if isinstance(entries, (bytes, bytearray, memoryview)):
            raw = bytes(entries)
            if entry_len is None:
                if struct is None:
                    raise errors.UsageError("raw invalidation entries need entry_len")
                entry_len = ffi.sizeof(struct)
            entry_len = _length(entry_len, "entry_len", alignment=None)
            if len(raw) % entry_len:
                raise errors.UsageError(f"{len(raw)} bytes is not a whole number of {entry_len}-byte entries")
            count = len(raw) // entry_len
        else:
            items = list(entries)
            if items and struct is None and entry_len is None:
                raise errors.UsageError("entries of an unknown data type must be raw bytes with entry_len")
            chunks = [_data_bytes(item, struct, "invalidation entry") for item in items]
            if entry_len is None:
                entry_len = ffi.sizeof(struct) if struct else 0
            entry_len = _int(entry_len, "entry_len", maximum=U32_MAX)
            for c in chunks:
                if len(c) != entry_len:
                    raise errors.UsageError(f"an invalidation entry is {len(c)} bytes, entry_len is {entry_len}")
            raw = b"".join(chunks)
            count = len(chunks)
        holder = ffi.new("uint8_t[]", max(len(raw), 1))
        ffi.buffer(holder, len(raw))[:] = raw
        arg = ioctl.new(IOMMU_HWPT_INVALIDATE, hwpt_id=self.id, data_type=dtype,
                        entry_len=entry_len or 0, entry_num=count)
        if count:
            arg.data_uptr = int(ffi.cast("uintptr_t", holder))
        try:
            self.iommufd._invoke(IOMMU_HWPT_INVALIDATE, arg)
        except errors.KernelError as exc:
            exc.detail = (exc.detail + "; " if exc.detail else "") + f"{int(arg.entry_num)} of {count} entries handled"
            raise
        return int(arg.entry_num)


class HWPT(_Invalidatable):
    """A hardware page table (paging, or nested when it has ``data_type``)."""

    kind = "hwpt"

    def __init__(self, iommufd: IOMMUFD, obj_id: int, *, parent: Any = None, parent_id: int | None = None,
                 dev_id: int | None = None, flags: int = 0, data_type: int = 0,
                 fault_queue: "FaultQueue | None" = None, owned: bool = True):
        super().__init__(iommufd, obj_id, owned=owned)
        self.parent = parent
        self.parent_id = parent_id
        self.dev_id = dev_id
        self.flags = flags
        self.data_type = data_type
        self.fault_queue = fault_queue
        self.preserve_token: int | None = None
        self.preserve_abi: str | None = None

    @property
    def ioas(self) -> IOAS | None:
        """The IOAS this HWPT translates (for a nested HWPT: its parent's)."""
        p = self.parent
        while isinstance(p, HWPT):
            p = p.parent
        if isinstance(p, Viommu):
            return p.hwpt.ioas if p.hwpt is not None else None
        return p if isinstance(p, IOAS) else None

    @property
    def nested(self) -> bool:
        return self.data_type != 0

    @property
    def marked(self) -> bool:
        return self.preserve_token is not None

    def __repr__(self) -> str:
        extra = f" token={self.preserve_token:#x}" if self.marked else ""
        state = " destroyed" if self.destroyed else ""
        parent = f" pt={self.parent_id}" if self.parent_id is not None else ""
        return f"<HWPT id={self.id}{parent}{' nested' if self.nested else ''}{extra}{state}>"

    def _implicit_destroy_ok(self) -> bool:
        # A marked HWPT is never destroyed implicitly: the mark is permanent
        # and destroying it silently drops it from the live update.
        return self.owned and not self.marked

    def _forget(self, release: bool = True) -> None:
        super()._forget(release)

    # -- dirty tracking -----------------------------------------------------------
    def set_dirty_tracking(self, enabled: bool) -> None:
        """IOMMU_HWPT_SET_DIRTY_TRACKING (the HWPT needs ``dirty_tracking=True`` at alloc)."""
        self._check()
        flags = C("IOMMU_HWPT_DIRTY_TRACKING_ENABLE") if enabled else 0
        self.iommufd._call(IOMMU_HWPT_SET_DIRTY_TRACKING, flags=flags, hwpt_id=self.id)

    def get_dirty_bitmap(self, iova: int, length: int, page_size: int = PAGE_SIZE,
                         clear: bool = True) -> DirtyBitmap:
        """IOMMU_HWPT_GET_DIRTY_BITMAP over ``[iova, iova+length)`` with one bit
        per ``page_size``; ``clear=False`` leaves the dirty bits set (NO_CLEAR)."""
        self._check()
        page_size = _int(page_size, "page_size")
        if page_size == 0 or page_size & (page_size - 1):
            raise errors.UsageError(f"page_size must be a power of two (got {page_size:#x})")
        iova = _aligned(_int(iova, "iova"), "iova", page_size)
        length = _length(length, alignment=page_size)
        _range_end(iova, length, "IOVA range")
        npages = length // page_size
        words = (npages + 63) // 64
        bitmap = ffi.new("uint64_t[]", words)
        flags = 0 if clear else C("IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR")
        self.iommufd._call(IOMMU_HWPT_GET_DIRTY_BITMAP, hwpt_id=self.id, flags=flags, iova=iova,
                           length=length, page_size=page_size, data=int(ffi.cast("uintptr_t", bitmap)))
        return DirtyBitmap(iova, length, page_size, bytes(ffi.buffer(bitmap)))

    # -- live update ---------------------------------------------------------------
    def mark_preserved(self, token: int, abi: str | LuAbi | None = None) -> None:
        """Mark this paging HWPT for live-update preservation with ``token``
        (unique per iommufd, else :class:`~pyiommufd.errors.AddressInUse`),
        through the LU ABI revision ``abi`` (a spelling such as ``"lu-v2"`` or
        ``"mark"``, a :class:`~pyiommufd.abi.LuAbi`, or None/``"probe"``: a
        side-effect-free probe; see :func:`pyiommufd.abi.select_lu_abi`).

        The mark only takes effect when the iommufd fd is preserved into a LUO
        session afterwards (mark first: the series H1). **It is permanent**:
        the kernel has no unmark, only destroying the HWPT drops it, so this
        object is no longer destroyed on context exit (the series' patch 10/14, IOMMU_HWPT_LU_SET_PRESERVE; the series' review: IOMMU_HWPT_LU_MARK_PRESERVE with a u64 token).
        Marking again overwrites the token."""
        self._check()
        token = _int(token, "token")
        if self.nested:
            raise errors.UsageError("only paging HWPTs can be marked for preservation, not nested ones "
                                    "(the series' patches 12-13/14, VFIO cdev preservation)")
        from . import abi as _abi  # lazy: abi.py imports this module's neighbours
        lu = _abi.select_lu_abi(abi, iommufd=self.iommufd, backend=self.backend)
        lu.mark(self.backend, self.iommufd.fileno(), self.id, token)
        self.preserve_token = token
        self.preserve_abi = getattr(lu, "name", str(abi))


class _FdObject(IommufdObject):
    """An iommufd object that comes with its own fd (fault queue, vEVENTQ)."""

    def __init__(self, iommufd: IOMMUFD, obj_id: int, fd: int, *, owned: bool = True):
        super().__init__(iommufd, obj_id, owned=owned)
        self._fd: int | None = fd

    def fileno(self) -> int:
        if self._fd is None:
            raise errors.UsageError(f"{self!r}: its fd is closed")
        return self._fd

    def close(self) -> None:
        """Close the queue's fd (idempotent); the object lives until destroyed."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self.backend.close(fd)

    def _before_destroy(self) -> None:
        self.close()  # the open fd holds a user reference: DESTROY would say EBUSY

    def _forget(self, release: bool = True) -> None:
        super()._forget(release)
        if release:
            try:
                self.close()
            except OSError:
                pass
        else:
            self._fd = None

    def _read(self, length: int, what: str) -> bytes:
        try:
            return self.backend.read(self.fileno(), length)
        except OSError as exc:
            raise errors.make_error(f"read({what})", "iommufd", exc.errno or E.EIO) from None

    def __repr__(self) -> str:
        state = " destroyed" if self.destroyed else ""
        return f"<{type(self).__name__} id={self.id} fd={self._fd}{state}>"


class FaultQueue(_FdObject):
    """An IO page fault queue (IOMMU_FAULT_QUEUE_ALLOC) and its fd.
    ``destroy()`` closes the fd first (it pins the object)."""

    kind = "fault"

    def read_faults(self, max_faults: int = 16) -> list[PageFault]:
        """Read up to ``max_faults`` pending faults; ``[]`` when none is
        pending (the kernel's read does not wait: poll the fd for that).
        Answer each fault group with :meth:`respond` and its cookie."""
        size = ffi.sizeof("struct iommu_hwpt_pgfault")
        max_faults = _int(max_faults, "max_faults", minimum=1, maximum=4096)
        try:
            raw = self._read(size * max_faults, "fault queue")
        except errors.KernelError as exc:
            if exc.errno == E.EAGAIN:
                return []
            raise
        out = []
        for off in range(0, len(raw) - size + 1, size):
            f = ffi.from_buffer("struct iommu_hwpt_pgfault *", bytearray(raw[off:off + size]))
            out.append(PageFault(int(f.flags), int(f.dev_id), int(f.pasid), int(f.grpid), int(f.perm),
                                 int(f.addr), int(f.length), int(f.cookie)))
        return out

    def respond(self, cookie: int, code: int = 0) -> None:
        """Answer a fault group (``code`` IOMMUFD_PAGE_RESP_SUCCESS=0 / INVALID=1)."""
        resp = ffi.new("struct iommu_hwpt_page_response *")
        resp.cookie = _int(cookie, "cookie", maximum=U32_MAX)
        resp.code = _int(code, "code", maximum=U32_MAX)
        try:
            self.backend.write(self.fileno(), bytes(ffi.buffer(resp)))
        except OSError as exc:
            raise errors.make_error("write(fault queue)", "iommufd", exc.errno or E.EIO) from None


class Viommu(_Invalidatable):
    """A virtual IOMMU (IOMMU_VIOMMU_ALLOC)."""

    kind = "viommu"

    def __init__(self, iommufd: IOMMUFD, obj_id: int, *, type: int, dev_id: int, hwpt: HWPT | None,
                 data: bytes = b"", owned: bool = True):
        super().__init__(iommufd, obj_id, owned=owned)
        self.type = type
        self.dev_id = dev_id
        self.hwpt = hwpt
        self.data = data


class Vdevice(IommufdObject):
    """A device's virtual ID behind a vIOMMU (IOMMU_VDEVICE_ALLOC)."""

    kind = "vdevice"

    def __init__(self, iommufd: IOMMUFD, obj_id: int, *, viommu_id: int, dev_id: int, virt_id: int,
                 owned: bool = True):
        super().__init__(iommufd, obj_id, owned=owned)
        self.viommu_id = viommu_id
        self.dev_id = dev_id
        self.virt_id = virt_id


class Veventq(_FdObject):
    """A vIOMMU event queue (IOMMU_VEVENTQ_ALLOC) and its fd."""

    kind = "veventq"

    def __init__(self, iommufd: IOMMUFD, obj_id: int, fd: int, *, viommu_id: int, type: int, depth: int,
                 owned: bool = True):
        super().__init__(iommufd, obj_id, fd, owned=owned)
        self.viommu_id = viommu_id
        self.type = type
        self.depth = depth

    def read(self, length: int = 4096) -> bytes:
        """Raw read of events (``struct iommufd_vevent_header`` + type data each)."""
        return self._read(_length(length, alignment=None), "veventq")


class HwQueue(IommufdObject):
    """A HW-accelerated vIOMMU queue (IOMMU_HW_QUEUE_ALLOC)."""

    kind = "hw_queue"

    def __init__(self, iommufd: IOMMUFD, obj_id: int, *, viommu_id: int, type: int, index: int,
                 base_addr: int, length: int, owned: bool = True):
        super().__init__(iommufd, obj_id, owned=owned)
        self.viommu_id = viommu_id
        self.type = type
        self.index = index
        self.base_addr = base_addr
        self.length = length


__all__ = [
    "IOMMUFD", "IOAS", "HWPT", "FaultQueue", "Viommu", "Vdevice", "Veventq", "HwQueue", "IommufdObject",
    "Mapping", "IovaRange", "HwInfo", "HwInfoVtd", "DirtyBitmap", "PageFault", "buffer_address", "aligned_buffer",
    "DEFAULT_PATH", "PAGE_SIZE",
]
