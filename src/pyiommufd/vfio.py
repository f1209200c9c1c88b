"""VFIO: device cdevs (``/dev/vfio/devices/vfioN``) bound to iommufd, plus the
legacy container/group API as thin objects.

* :class:`VfioDevice` opens a cdev by path or by PCI address (resolved through
  sysfs ``vfio-dev/vfioN``, :mod:`pyiommufd.pci`), or wraps an fd, e.g. one
  retrieved from a LUO session (:meth:`VfioDevice.from_fd`). ``bind`` /
  ``attach`` / ``detach_pt`` connect it to an :class:`~pyiommufd.iommufd.IOMMUFD`;
  ``info``/``region_info``/``irq_info`` decode the replies including capability
  chains; regions are accessed with ``pread``/``pwrite``/``mmap`` through the
  backend; ``set_irqs``/``disable_all_irqs`` manage interrupts (the series'
  vfio freeze at kexec requires interrupts disabled, the series' patches 12-13/14, VFIO cdev preservation).
* :class:`VfioContainer` and :class:`VfioGroup`: ``/dev/vfio/vfio`` and
  ``/dev/vfio/<group>`` (GET_API_VERSION, CHECK_EXTENSION, SET_IOMMU,
  GROUP_GET_STATUS, SET_CONTAINER, GET_DEVICE_FD, type1 MAP/UNMAP_DMA).

Naming note: ``detach()`` gives up ownership of the fd and returns it, like on
every pyiommufd object; ``detach_pt()`` is VFIO_DEVICE_DETACH_IOMMUFD_PT.
"""
from __future__ import annotations

import errno as E
import mmap as _mmap
import os
import re
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from . import errors, ioctl, pci
from ._record import factory, hidden, record
from ._uapi import ffi
from .backend import Backend, get_backend
from .fdobject import FdObject, FileKind, open_path
from .iommufd import (IOMMUFD, U32_MAX, U64_MAX, IommufdObject, _aligned, _int, _length,
                      _release, buffer_address)

if TYPE_CHECKING:
    import uuid as _uuid  # imported on use (VF tokens): slow to import

C = ioctl.const
CDEV_DIR = "/dev/vfio/devices"
CONTAINER_PATH = "/dev/vfio/vfio"
GROUP_DIR = "/dev/vfio"


def _maybe_const(name: str, default: int | None = None) -> int | None:
    try:
        return C(name)
    except Exception:
        return default


# -- ioctl definitions ---------------------------------------------------------
# device fd (cdev, or GROUP_GET_DEVICE_FD)
BIND_IOMMUFD = ioctl.define("VFIO_DEVICE_BIND_IOMMUFD", "struct vfio_device_bind_iommufd", "vfio")
ATTACH_IOMMUFD_PT = ioctl.define("VFIO_DEVICE_ATTACH_IOMMUFD_PT", "struct vfio_device_attach_iommufd_pt", "vfio")
DETACH_IOMMUFD_PT = ioctl.define("VFIO_DEVICE_DETACH_IOMMUFD_PT", "struct vfio_device_detach_iommufd_pt", "vfio")
GET_INFO = ioctl.define("VFIO_DEVICE_GET_INFO", "struct vfio_device_info", "vfio")
GET_REGION_INFO = ioctl.define("VFIO_DEVICE_GET_REGION_INFO", "struct vfio_region_info", "vfio")
GET_IRQ_INFO = ioctl.define("VFIO_DEVICE_GET_IRQ_INFO", "struct vfio_irq_info", "vfio")
SET_IRQS = ioctl.define("VFIO_DEVICE_SET_IRQS", "struct vfio_irq_set", "vfio")
RESET = ioctl.define("VFIO_DEVICE_RESET", None, "vfio", arg=ioctl.ARG_NONE)
GET_PCI_HOT_RESET_INFO = ioctl.define("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", "struct vfio_pci_hot_reset_info",
                                      "vfio")
PCI_HOT_RESET = ioctl.define("VFIO_DEVICE_PCI_HOT_RESET", "struct vfio_pci_hot_reset", "vfio")
FEATURE = ioctl.define("VFIO_DEVICE_FEATURE", "struct vfio_device_feature", "vfio")
# container fd
GET_API_VERSION = ioctl.define("VFIO_GET_API_VERSION", None, "vfio", arg=ioctl.ARG_NONE)
CHECK_EXTENSION = ioctl.define("VFIO_CHECK_EXTENSION", None, "vfio", arg=ioctl.ARG_VALUE)
SET_IOMMU = ioctl.define("VFIO_SET_IOMMU", None, "vfio", arg=ioctl.ARG_VALUE)
IOMMU_GET_INFO = ioctl.define("VFIO_IOMMU_GET_INFO", "struct vfio_iommu_type1_info", "vfio")
IOMMU_MAP_DMA = ioctl.define("VFIO_IOMMU_MAP_DMA", "struct vfio_iommu_type1_dma_map", "vfio")
IOMMU_UNMAP_DMA = ioctl.define("VFIO_IOMMU_UNMAP_DMA", "struct vfio_iommu_type1_dma_unmap", "vfio")
# group fd
GROUP_GET_STATUS = ioctl.define("VFIO_GROUP_GET_STATUS", "struct vfio_group_status", "vfio")
# these two take a pointer to an int / to a NUL-terminated name, not an argsz struct
GROUP_SET_CONTAINER = ioctl.define("VFIO_GROUP_SET_CONTAINER", "int32_t", "vfio", size_field="")
GROUP_UNSET_CONTAINER = ioctl.define("VFIO_GROUP_UNSET_CONTAINER", None, "vfio", arg=ioctl.ARG_NONE)
GROUP_GET_DEVICE_FD = ioctl.define("VFIO_GROUP_GET_DEVICE_FD", None, "vfio", size_field="")

PCI_CONFIG_REGION_INDEX = C("VFIO_PCI_CONFIG_REGION_INDEX")
PCI_NUM_REGIONS = C("VFIO_PCI_NUM_REGIONS")
PCI_NUM_IRQS = C("VFIO_PCI_NUM_IRQS")
IRQ_INDEX = {"intx": C("VFIO_PCI_INTX_IRQ_INDEX"), "msi": C("VFIO_PCI_MSI_IRQ_INDEX"),
             "msix": C("VFIO_PCI_MSIX_IRQ_INDEX"), "err": C("VFIO_PCI_ERR_IRQ_INDEX"),
             "req": C("VFIO_PCI_REQ_IRQ_INDEX")}
REGION_INDEX = {**{f"bar{i}": i for i in range(6)}, "rom": C("VFIO_PCI_ROM_REGION_INDEX"),
                "config": PCI_CONFIG_REGION_INDEX, "vga": C("VFIO_PCI_VGA_REGION_INDEX")}

IRQ_ACTIONS = {"mask": C("VFIO_IRQ_SET_ACTION_MASK"), "unmask": C("VFIO_IRQ_SET_ACTION_UNMASK"),
               "trigger": C("VFIO_IRQ_SET_ACTION_TRIGGER")}
IRQ_DATA_NONE = C("VFIO_IRQ_SET_DATA_NONE")
IRQ_DATA_BOOL = C("VFIO_IRQ_SET_DATA_BOOL")
IRQ_DATA_EVENTFD = C("VFIO_IRQ_SET_DATA_EVENTFD")

FEATURE_MASK = C("VFIO_DEVICE_FEATURE_MASK")
FEATURE_GET = C("VFIO_DEVICE_FEATURE_GET")
FEATURE_SET = C("VFIO_DEVICE_FEATURE_SET")
FEATURE_PROBE = C("VFIO_DEVICE_FEATURE_PROBE")
FEATURES = {name.lower(): value for name, value in (
    (n, _maybe_const(f"VFIO_DEVICE_FEATURE_{n}")) for n in (
        "PCI_VF_TOKEN", "MIGRATION", "MIG_DEVICE_STATE", "LOW_POWER_ENTRY",
        "LOW_POWER_ENTRY_WITH_WAKEUP", "LOW_POWER_EXIT", "DMA_LOGGING_START", "DMA_LOGGING_STOP",
        "DMA_LOGGING_REPORT", "MIG_DATA_SIZE", "BUS_MASTER", "DMA_BUF", "ZPCI_ERROR"))
    if value is not None}

DEVICE_FLAGS = {n.lower(): C(f"VFIO_DEVICE_FLAGS_{n}") for n in
                ("RESET", "PCI", "PLATFORM", "AMBA", "CCW", "AP", "FSL_MC", "CAPS", "CDX")}
REGION_FLAG_READ = C("VFIO_REGION_INFO_FLAG_READ")
REGION_FLAG_WRITE = C("VFIO_REGION_INFO_FLAG_WRITE")
REGION_FLAG_MMAP = C("VFIO_REGION_INFO_FLAG_MMAP")
REGION_FLAG_CAPS = C("VFIO_REGION_INFO_FLAG_CAPS")
REGION_CAP_SPARSE_MMAP = C("VFIO_REGION_INFO_CAP_SPARSE_MMAP")
REGION_CAP_TYPE = C("VFIO_REGION_INFO_CAP_TYPE")
REGION_CAP_MSIX_MAPPABLE = C("VFIO_REGION_INFO_CAP_MSIX_MAPPABLE")
DEVICE_CAP_PCI_ATOMIC_COMP = C("VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP")

EXTENSIONS = {"type1": C("VFIO_TYPE1_IOMMU"), "spapr_tce": C("VFIO_SPAPR_TCE_IOMMU"),
              "type1v2": C("VFIO_TYPE1v2_IOMMU"), "dma_cc": C("VFIO_DMA_CC_IOMMU"), "eeh": C("VFIO_EEH"),
              "spapr_tce_v2": C("VFIO_SPAPR_TCE_v2_IOMMU"), "noiommu": C("VFIO_NOIOMMU_IOMMU"),
              "unmap_all": C("VFIO_UNMAP_ALL"), "update_vaddr": C("VFIO_UPDATE_VADDR")}


def _write_tail(arg: ioctl.CData, base: int, data: bytes) -> None:
    if data:
        ffi.buffer(arg, base + len(data))[base:] = data


# -- records -------------------------------------------------------------------
@record(frozen=True)
class DeviceInfo:
    """VFIO_DEVICE_GET_INFO, with its capability chain."""

    flags: int
    num_regions: int
    num_irqs: int
    caps: list[ioctl.Capability] = factory(default_factory=list)
    pci_atomic_comp: int | None = None

    @property
    def flag_names(self) -> list[str]:
        return [n for n, bit in DEVICE_FLAGS.items() if self.flags & bit]

    @property
    def is_pci(self) -> bool:
        return bool(self.flags & DEVICE_FLAGS["pci"])

    @property
    def reset_supported(self) -> bool:
        return bool(self.flags & DEVICE_FLAGS["reset"])


@record(frozen=True)
class RegionInfo:
    """VFIO_DEVICE_GET_REGION_INFO, with decoded capabilities."""

    index: int
    flags: int
    size: int
    offset: int
    caps: list[ioctl.Capability] = factory(default_factory=list)
    sparse_areas: list[tuple[int, int]] | None = None  # (offset, size) within the region
    type: int | None = None
    subtype: int | None = None
    msix_mappable: bool = False

    @property
    def readable(self) -> bool:
        return bool(self.flags & REGION_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & REGION_FLAG_WRITE)

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & REGION_FLAG_MMAP)


@record(frozen=True)
class IrqInfo:
    """VFIO_DEVICE_GET_IRQ_INFO."""

    index: int
    flags: int
    count: int

    @property
    def eventfd(self) -> bool:
        return bool(self.flags & C("VFIO_IRQ_INFO_EVENTFD"))

    @property
    def maskable(self) -> bool:
        return bool(self.flags & C("VFIO_IRQ_INFO_MASKABLE"))

    @property
    def automasked(self) -> bool:
        return bool(self.flags & C("VFIO_IRQ_INFO_AUTOMASKED"))

    @property
    def noresize(self) -> bool:
        return bool(self.flags & C("VFIO_IRQ_INFO_NORESIZE"))


@record(frozen=True)
class DependentDevice:
    """One ``struct vfio_pci_dependent_device`` of a hot-reset info reply.
    ``id`` is a dev_id (cdev mode: 0 = owned but not bound here, 0xffffffff =
    not owned) or a group id (legacy mode)."""

    id: int
    segment: int
    bus: int
    devfn: int

    @property
    def bdf(self) -> str:
        return pci.bdf_from_parts(self.segment, self.bus, self.devfn)


@record(frozen=True)
class HotResetInfo:
    flags: int
    devices: list[DependentDevice]

    @property
    def ids_are_dev_ids(self) -> bool:
        return bool(self.flags & C("VFIO_PCI_HOT_RESET_FLAG_DEV_ID"))

    @property
    def all_owned(self) -> bool:
        return bool(self.flags & C("VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED"))


def _index(value: Any, table: dict[str, int], what: str) -> int:
    if isinstance(value, str):
        try:
            return table[value.lower()]
        except KeyError:
            raise errors.UsageError(f"unknown {what} {value!r}; known: {', '.join(table)}") from None
    return _int(value, what, maximum=U32_MAX)


class _FdOwner(FdObject):
    """fd ownership shared by the VFIO objects: a path, closed when collected."""

    _what = "VFIO fd"
    close_on_gc = True

    def __init__(self, fd: int, *, backend: Backend | None = None, owned: bool = True,
                 path: str | None = None):
        super().__init__(fd, backend=backend, owned=owned)
        self.path = path


def _open(backend: Backend, path: str, op: str) -> int:
    return open_path(backend, path, op, "vfio")


# -- the device ----------------------------------------------------------------
def cdev_path(device: str, backend: Backend | None = None) -> tuple[str, str | None]:
    """The VFIO cdev path that ``device`` names, and its PCI address if it is one:
    an absolute path, ``vfioN``, or a PCI address resolved through
    sysfs ``/sys/bus/pci/devices/<bdf>/vfio-dev/vfioN``. Whether the node exists
    is left to whoever opens it."""
    be = get_backend(backend)
    if not isinstance(device, str) or not device:
        raise errors.UsageError("give a cdev path (/dev/vfio/devices/vfioN) or a PCI address")
    if device.startswith("/"):
        return device, None
    if pci.is_bdf(device):
        dev = pci.PciDevice(device, be)
        dev.require()
        path = dev.vfio_cdev
        if path is None:
            driver = dev.driver
            raise errors.make_error(
                f"open(vfio cdev of {dev.bdf})", "sysfs", E.ENODEV,
                detail=f"{dev.bdf} has no VFIO cdev (no vfio-dev/ in sysfs): it is on {driver or 'no driver'}; "
                       f"bind it to vfio-pci (pyiommufd bind {dev.bdf}, PciDevice.bind_vfio()), and the kernel "
                       "needs CONFIG_VFIO_DEVICE_CDEV")
        return path, dev.bdf
    if re.fullmatch(r"vfio\d+", device):
        return f"{CDEV_DIR}/{device}", None
    if ":" in device:
        pci.normalize_bdf(device)   # looks like a PCI address but is not one: says why
    raise errors.UsageError(f"{device!r} is neither a VFIO cdev ({CDEV_DIR}/vfioN) "
                            "nor a PCI address (0000:00:03.0)")


class VfioDevice(_FdOwner):
    """A VFIO device fd: a cdev (``/dev/vfio/devices/vfioN``), a cdev fd
    retrieved from a LUO session, or a legacy GROUP_GET_DEVICE_FD fd."""

    _what = "VFIO device"
    kind = FileKind.VFIO_CDEV

    def __init__(self, fd: int, *, backend: Backend | None = None, owned: bool = True,
                 path: str | None = None, bdf: str | None = None):
        super().__init__(fd, backend=backend, owned=owned, path=path)
        self.bdf = pci.normalize_bdf(bdf) if bdf else None
        self.dev_id: int | None = None
        self.iommufd: IOMMUFD | None = None
        self.pt_id: int | None = None
        self.pasid_pt_ids: dict[int, int] = {}
        self._regions: dict[int, RegionInfo] = {}

    @classmethod
    def open(cls, cdev_path_or_bdf: str, backend: Backend | None = None) -> "VfioDevice":
        """Open a cdev by path, or by PCI address (``0000:00:03.0``/``00:03.0``)
        through sysfs ``/sys/bus/pci/devices/<bdf>/vfio-dev/vfioN``."""
        be = get_backend(backend)
        path, bdf = cdev_path(cdev_path_or_bdf, be)
        fd = _open(be, path, "open(vfio cdev)")
        return cls(fd, backend=be, owned=True, path=path, bdf=bdf)

    @classmethod
    def from_fd(cls, fd: int, backend: Backend | None = None, owned: bool = True, *,
                path: str | None = None, bdf: str | None = None) -> "VfioDevice":
        """Wrap a device fd you have (e.g. RETRIEVE_FD from a LUO session)."""
        return cls(fd, backend=backend, owned=owned, path=path, bdf=bdf)

    def __repr__(self) -> str:
        name = self.bdf or self.path or "?"
        state = "closed" if self._fd is None else f"fd={self._fd}"
        bound = f" dev_id={self.dev_id}" if self.dev_id is not None else ""
        att = f" pt_id={self.pt_id}" if self.pt_id is not None else ""
        return f"<VfioDevice {name} {state}{bound}{att}>"

    def _on_close(self) -> None:
        # closing the cdev unbinds it from its iommufd
        self.dev_id = None
        self.iommufd = None
        self.pt_id = None
        self.pasid_pt_ids.clear()

    # -- iommufd ---------------------------------------------------------------
    def bind(self, iommufd: IOMMUFD | int, *, token_uuid: "_uuid.UUID | bytes | str | None" = None) -> int:
        """VFIO_DEVICE_BIND_IOMMUFD. Returns (and remembers as ``dev_id``) the
        device's id in that iommufd. ``token_uuid`` is the PF's VF token, for
        VFs of a vfio-pci PF. After a live update a preserved device refuses
        any new iommufd with :class:`~pyiommufd.errors.PermissionDenied`
        (the series' cover letter: what Phase 1 restores after the kexec)."""
        if isinstance(iommufd, IOMMUFD):
            ictx_fd = iommufd.fileno()
        else:
            ictx_fd = _int(iommufd, "iommufd fd", maximum=(1 << 31) - 1)
        flags = 0
        holder = None
        if token_uuid is not None:
            import uuid as _uuid  # only for VF tokens: uuid is slow to import

            if isinstance(token_uuid, str):
                try:
                    token_uuid = _uuid.UUID(token_uuid)
                except ValueError:
                    raise errors.UsageError(f"{token_uuid!r} is not a UUID") from None
            raw = token_uuid.bytes if isinstance(token_uuid, _uuid.UUID) else bytes(token_uuid)
            if len(raw) != 16:
                raise errors.UsageError("a VF token is a 16-byte UUID")
            holder = ffi.new("uint8_t[]", raw)
            flags |= C("VFIO_DEVICE_BIND_FLAG_TOKEN")
        arg = ioctl.new(BIND_IOMMUFD, flags=flags, iommufd=ictx_fd)
        if holder is not None:
            arg.token_uuid_ptr = int(ffi.cast("uintptr_t", holder))
        self._invoke(BIND_IOMMUFD, arg, detail=self.bdf or self.path)
        self.dev_id = int(arg.out_devid)
        self.iommufd = iommufd if isinstance(iommufd, IOMMUFD) else None
        return self.dev_id

    def _pt_id(self, target: Any) -> int:
        if isinstance(target, IommufdObject):
            if target.destroyed:
                raise errors.UsageError(f"{target!r} is destroyed")
            if self.iommufd is not None and target.iommufd is not self.iommufd:
                raise errors.UsageError(f"{target!r} belongs to a different iommufd than the device is bound to")
            return target.id
        return _int(target, "pt_id", maximum=U32_MAX)

    def _require_bound(self) -> None:
        if self.dev_id is None:
            raise errors.UsageError(f"{self!r} is not bound to an iommufd: call bind(iommufd) first")

    def attach(self, hwpt_or_ioas: Any, pasid: int | None = None) -> int:
        """VFIO_DEVICE_ATTACH_IOMMUFD_PT to an HWPT or an IOAS (the kernel
        then picks or creates an HWPT). Returns the pt_id the kernel answers
        (the HWPT's id when an IOAS was given). ``pasid`` attaches a PASID
        instead of the RID; PASID attachments are not preserved by the series
        (the series' patches 12-13/14, VFIO cdev preservation)."""
        self._require_bound()
        pt_id = self._pt_id(hwpt_or_ioas)
        flags = 0
        fields: dict[str, Any] = {}
        if pasid is not None:
            fields["pasid"] = _int(pasid, "pasid", maximum=(1 << 20) - 1)
            flags |= C("VFIO_DEVICE_ATTACH_PASID")
        arg = self._call(ATTACH_IOMMUFD_PT, flags=flags, pt_id=pt_id, detail=self.bdf or self.path, **fields)
        got = int(arg.pt_id)
        if pasid is None:
            self.pt_id = got
        else:
            self.pasid_pt_ids[pasid] = got
        return got

    def detach_pt(self, pasid: int | None = None) -> None:
        """VFIO_DEVICE_DETACH_IOMMUFD_PT (the RID, or ``pasid``)."""
        self._require_bound()
        flags = 0
        fields: dict[str, Any] = {}
        if pasid is not None:
            fields["pasid"] = _int(pasid, "pasid", maximum=(1 << 20) - 1)
            flags |= C("VFIO_DEVICE_DETACH_PASID")
        self._call(DETACH_IOMMUFD_PT, flags=flags, detail=self.bdf or self.path, **fields)
        if pasid is None:
            self.pt_id = None
        else:
            self.pasid_pt_ids.pop(pasid, None)

    # -- info ------------------------------------------------------------------
    def info(self) -> DeviceInfo:
        """VFIO_DEVICE_GET_INFO with its capability chain."""
        arg, reply = ioctl.call_with_caps(self.backend, self.fileno(), GET_INFO)
        caps: list[ioctl.Capability] = []
        atomic = None
        if int(arg.flags) & DEVICE_FLAGS["caps"] and int(arg.cap_offset):
            caps = list(ioctl.walk_caps(reply, int(arg.cap_offset)))
            for cap in caps:
                if cap.id == DEVICE_CAP_PCI_ATOMIC_COMP:
                    view, _keep = cap.view("struct vfio_device_info_cap_pci_atomic_comp")
                    atomic = int(view.flags)
        return DeviceInfo(int(arg.flags), int(arg.num_regions), int(arg.num_irqs), caps, atomic)

    def region_info(self, index: int | str) -> RegionInfo:
        """VFIO_DEVICE_GET_REGION_INFO, decoding the sparse-mmap, type and
        MSI-X-mappable capabilities. ``index`` may be ``"bar0"``..``"bar5"``,
        ``"rom"``, ``"config"``, ``"vga"``."""
        index = _index(index, REGION_INDEX, "region index")
        arg, reply = ioctl.call_with_caps(self.backend, self.fileno(), GET_REGION_INFO, index=index)
        flags = int(arg.flags)
        caps: list[ioctl.Capability] = []
        sparse = None
        rtype = subtype = None
        msix = False
        if flags & REGION_FLAG_CAPS and int(arg.cap_offset):
            caps = list(ioctl.walk_caps(reply, int(arg.cap_offset)))
        for cap in caps:
            if cap.id == REGION_CAP_SPARSE_MMAP:
                sparse = _sparse_areas(cap)
            elif cap.id == REGION_CAP_TYPE:
                view, _keep = cap.view("struct vfio_region_info_cap_type")
                rtype, subtype = int(view.type), int(view.subtype)
            elif cap.id == REGION_CAP_MSIX_MAPPABLE:
                msix = True
        info = RegionInfo(index, flags, int(arg.size), int(arg.offset), caps, sparse, rtype, subtype, msix)
        self._regions[index] = info
        return info

    def regions(self) -> list[RegionInfo]:
        """Every region of the device (vfio-pci: BARs, ROM, config, VGA...).
        Indices the device rejects (e.g. VGA on a non-VGA function) are skipped."""
        out = []
        for index in range(self.info().num_regions):
            try:
                out.append(self.region_info(index))
            except errors.InvalidArgument:
                continue
        return out

    def _region(self, index: int | str) -> RegionInfo:
        idx = _index(index, REGION_INDEX, "region index")
        return self._regions.get(idx) or self.region_info(idx)

    def irq_info(self, index: int | str) -> IrqInfo:
        """VFIO_DEVICE_GET_IRQ_INFO; ``index`` may be ``"intx"``, ``"msi"``,
        ``"msix"``, ``"err"``, ``"req"``."""
        index = _index(index, IRQ_INDEX, "IRQ index")
        arg = self._call(GET_IRQ_INFO, index=index)
        return IrqInfo(index, int(arg.flags), int(arg.count))

    def irqs(self) -> list[IrqInfo]:
        return [self.irq_info(i) for i in range(self.info().num_irqs)]

    # -- region access ---------------------------------------------------------
    def _span(self, region: RegionInfo, offset: int, length: int) -> None:
        if offset + length > region.size:
            raise errors.UsageError(f"[{offset:#x}, +{length:#x}) is outside region {region.index} "
                                    f"({region.size:#x} bytes)")

    def read_region(self, index: int | str, offset: int, length: int) -> bytes:
        """``pread`` ``length`` bytes at ``offset`` within region ``index``."""
        region = self._region(index)
        offset = _int(offset, "offset")
        length = _length(length, alignment=None)
        self._span(region, offset, length)
        if not region.readable:
            raise errors.UsageError(f"region {region.index} is not readable")
        out = b""
        while len(out) < length:
            try:
                chunk = self.backend.pread(self.fileno(), length - len(out), region.offset + offset + len(out))
            except OSError as exc:
                raise errors.make_error(f"pread(region {region.index})", "vfio", exc.errno or E.EIO,
                                        detail=f"offset {offset + len(out):#x}") from None
            if not chunk:
                break
            out += chunk
        return out

    def write_region(self, index: int | str, offset: int, data: bytes) -> int:
        """``pwrite`` ``data`` at ``offset`` within region ``index``; returns bytes written."""
        region = self._region(index)
        offset = _int(offset, "offset")
        data = bytes(data)
        _length(len(data), "data length", alignment=None)
        self._span(region, offset, len(data))
        if not region.writable:
            raise errors.UsageError(f"region {region.index} is not writable")
        done = 0
        while done < len(data):
            try:
                n = self.backend.pwrite(self.fileno(), data[done:], region.offset + offset + done)
            except OSError as exc:
                raise errors.make_error(f"pwrite(region {region.index})", "vfio", exc.errno or E.EIO,
                                        detail=f"offset {offset + done:#x}") from None
            if not n:
                break
            done += n
        return done

    def mmap_region(self, index: int | str, offset: int = 0, length: int | None = None, *,
                    prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE) -> _mmap.mmap:
        """``mmap`` (part of) a region. With a sparse-mmap capability the range
        must lie inside one of its areas (e.g. not over the MSI-X table)."""
        region = self._region(index)
        if not region.mmappable:
            raise errors.UsageError(f"region {region.index} does not support mmap")
        offset = _aligned(_int(offset, "offset"), "offset")
        if length is None:
            length = region.size - offset
        length = _length(length, alignment=None)
        self._span(region, offset, length)
        if region.sparse_areas is not None and not any(
                a_off <= offset and offset + length <= a_off + a_size for a_off, a_size in region.sparse_areas):
            raise errors.UsageError(f"[{offset:#x}, +{length:#x}) is not inside one mmap-able area of region "
                                    f"{region.index}: {[(hex(o), hex(s)) for o, s in region.sparse_areas]}")
        try:
            return self.backend.mmap(self.fileno(), length, region.offset + offset, prot)
        except OSError as exc:
            raise errors.make_error(f"mmap(region {region.index})", "vfio", exc.errno or E.EIO) from None

    def config_read(self, offset: int, size: int = 4) -> int:
        """Read a 1-, 2- or 4-byte little-endian value from PCI config space."""
        if size not in (1, 2, 4):
            raise errors.UsageError(f"config access size must be 1, 2 or 4 (got {size!r})")
        offset = _int(offset, "offset")
        if offset % size:
            raise errors.UsageError(f"config offset {offset:#x} is not aligned to {size}")
        return int.from_bytes(self.read_region(PCI_CONFIG_REGION_INDEX, offset, size), "little")

    def config_write(self, offset: int, value: int, size: int = 4) -> None:
        """Write a 1-, 2- or 4-byte little-endian value to PCI config space."""
        if size not in (1, 2, 4):
            raise errors.UsageError(f"config access size must be 1, 2 or 4 (got {size!r})")
        offset = _int(offset, "offset")
        if offset % size:
            raise errors.UsageError(f"config offset {offset:#x} is not aligned to {size}")
        value = _int(value, "value", maximum=(1 << (8 * size)) - 1)
        self.write_region(PCI_CONFIG_REGION_INDEX, offset, value.to_bytes(size, "little"))

    # -- interrupts ---------------------------------------------------------------
    def set_irqs(self, index: int | str, start: int = 0, eventfds: Sequence[Any] | None = None, *,
                 action: str = "trigger", count: int | None = None,
                 bools: Sequence[bool] | None = None) -> None:
        """VFIO_DEVICE_SET_IRQS.

        * ``eventfds=[fd, ...]`` (ints, ``-1`` to unassign, or objects with
          ``fileno()``): DATA_EVENTFD for vectors ``start..``;
        * ``bools=[...]``: DATA_BOOL;
        * neither: DATA_NONE with ``count`` (default 1) vectors;
          ``count=0`` with action ``"trigger"`` disables the index.

        ``action`` is ``"trigger"``, ``"mask"`` or ``"unmask"``."""
        index = _index(index, IRQ_INDEX, "IRQ index")
        start = _int(start, "start", maximum=U32_MAX)
        act = IRQ_ACTIONS.get(action) if isinstance(action, str) else None
        if act is None:
            raise errors.UsageError(f"unknown IRQ action {action!r}; known: {', '.join(IRQ_ACTIONS)}")
        if eventfds is not None and bools is not None:
            raise errors.UsageError("give eventfds or bools, not both")
        if eventfds is not None:
            fds = []
            for item in eventfds:
                fd = item if isinstance(item, int) and not isinstance(item, bool) else None
                if fd is None and hasattr(item, "fileno"):
                    fd = item.fileno()
                if fd is None or fd < -1:
                    raise errors.UsageError(f"an eventfd must be an fd, -1 or have fileno(), not {item!r}")
                fds.append(fd)
            if count is not None and count != len(fds):
                raise errors.UsageError("count must match the number of eventfds")
            data = b"".join(int(fd).to_bytes(4, "little", signed=True) for fd in fds)
            n, dflag = len(fds), IRQ_DATA_EVENTFD
        elif bools is not None:
            values = [bool(b) for b in bools]
            if count is not None and count != len(values):
                raise errors.UsageError("count must match the number of bools")
            data = bytes(values)
            n, dflag = len(values), IRQ_DATA_BOOL
        else:
            n = 1 if count is None else _int(count, "count", maximum=U32_MAX)
            data, dflag = b"", IRQ_DATA_NONE
        if n == 0 and (dflag != IRQ_DATA_NONE or act != IRQ_ACTIONS["trigger"]):
            raise errors.UsageError("count 0 is only meaningful as DATA_NONE|ACTION_TRIGGER (disable)")
        base = ffi.sizeof("struct vfio_irq_set")
        arg = ioctl.new(SET_IRQS, extra=len(data), flags=dflag | act, index=index, start=start, count=n)
        _write_tail(arg, base, data)
        self._invoke(SET_IRQS, arg, detail=f"index {index}")

    def disable_irqs(self, index: int | str) -> None:
        """Disable every vector of ``index`` (DATA_NONE|ACTION_TRIGGER, count 0)."""
        self.set_irqs(index, 0, action="trigger", count=0)

    def disable_all_irqs(self) -> list[int]:
        """Disable INTx, MSI, MSI-X and the error/request triggers, as the
        series' vfio freeze at kexec requires (the series' patches 12-13/14, VFIO cdev preservation). vfio-pci
        answers EINVAL for an index that is not the active interrupt type,
        which here just means "was not enabled". Returns the indices
        disabled without error."""
        done = []
        info = self.info()
        for index in range(min(info.num_irqs, PCI_NUM_IRQS) if info.is_pci else info.num_irqs):
            if self.irq_info(index).count == 0:
                continue
            try:
                self.disable_irqs(index)
            except errors.InvalidArgument:
                continue
            done.append(index)
        return done

    # -- reset -----------------------------------------------------------------
    def reset(self) -> None:
        """VFIO_DEVICE_RESET (function-level or whatever reset the device has)."""
        self._call(RESET, detail=self.bdf or self.path)

    def hot_reset_info(self) -> HotResetInfo:
        """VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: the devices a bus/slot reset
        would affect (grows the array on ENOSPC)."""
        dev_size = ffi.sizeof("struct vfio_pci_dependent_device")
        base = ffi.sizeof("struct vfio_pci_hot_reset_info")
        count = 4
        for _ in range(6):
            arg = ioctl.new(GET_PCI_HOT_RESET_INFO, extra=count * dev_size)
            try:
                self._invoke(GET_PCI_HOT_RESET_INFO, arg)
            except errors.KernelError as exc:
                if exc.errno == E.ENOSPC and int(arg.count) > count:
                    count = int(arg.count)
                    continue
                raise
            n = int(arg.count)
            raw = bytes(ffi.buffer(arg, base + n * dev_size))[base:]
            devices = []
            for i in range(n):
                d = ffi.from_buffer("struct vfio_pci_dependent_device *",
                                    bytearray(raw[i * dev_size:(i + 1) * dev_size]))
                devices.append(DependentDevice(int(d.devid), int(d.segment), int(d.bus), int(d.devfn)))
            return HotResetInfo(int(arg.flags), devices)
        raise errors.make_error(GET_PCI_HOT_RESET_INFO.name, "vfio", E.ENOSPC,
                                detail="the device count kept growing")

    def hot_reset(self, group_fds: Iterable[Any] = ()) -> None:
        """VFIO_DEVICE_PCI_HOT_RESET. For cdevs pass nothing (every affected
        device must be opened in the same iommufd); legacy users pass the group fds."""
        fds = [g if isinstance(g, int) else g.fileno() for g in group_fds]
        data = b"".join(int(fd).to_bytes(4, "little", signed=True) for fd in fds)
        arg = ioctl.new(PCI_HOT_RESET, extra=len(data), count=len(fds))
        _write_tail(arg, ffi.sizeof("struct vfio_pci_hot_reset"), data)
        self._invoke(PCI_HOT_RESET, arg)

    # -- features ----------------------------------------------------------------
    def _feature_arg(self, feature: int | str, flags: int, data: bytes) -> tuple[int, ioctl.CData]:
        index = _index(feature, FEATURES, "device feature")
        if index > FEATURE_MASK:
            raise errors.UsageError(f"feature index {index:#x} is above {FEATURE_MASK:#x}")
        arg = ioctl.new(FEATURE, extra=len(data), flags=index | flags)
        _write_tail(arg, ffi.sizeof("struct vfio_device_feature"), data)
        return index, arg

    def _feature_call(self, feature: int | str, flags: int, data: bytes) -> tuple[int, bytes]:
        """Issue VFIO_DEVICE_FEATURE; returns (the ioctl's result, the data
        area as the kernel left it)."""
        _, arg = self._feature_arg(feature, flags, data)
        base = ffi.sizeof("struct vfio_device_feature")
        buf = ffi.buffer(arg, base + len(data))
        result = ioctl.invoke_raw(self.backend, self.fileno(), FEATURE, buf)
        return result, bytes(buf)[base:]

    def feature(self, feature: int | str, data: bytes | None = None, *, op: str = "get",
                length: int | None = None) -> bytes | int | bool:
        """VFIO_DEVICE_FEATURE, generically.

        * ``op="get"``: returns the feature's data area after the call — pass
          ``length`` (a zeroed area of that size) or ``data`` (input the
          feature reads first, e.g. DMA_BUF's request);
        * ``op="set"``: sends ``data``, returns the ioctl's result (some
          features answer with a new fd);
        * ``op="probe"``: whether the device has the feature at all."""
        if op == "get":
            return self.feature_get(feature, length, data=data)
        if op == "set":
            return self.feature_set(feature, b"" if data is None else data)
        if op == "probe":
            return self.feature_probe(feature)
        raise errors.UsageError(f"unknown feature op {op!r}: get, set or probe")

    def feature_probe(self, feature: int | str, *, get: bool = False, set: bool = False) -> bool:
        """VFIO_DEVICE_FEATURE_PROBE: True if the device has ``feature`` and,
        when asked, supports GET and/or SET of it. Unsupported features
        (ENOTTY) and ops (EINVAL) give False."""
        flags = FEATURE_PROBE | (FEATURE_GET if get else 0) | (FEATURE_SET if set else 0)
        try:
            self._feature_call(feature, flags, b"")
        except (errors.NoSuchIoctl, errors.InvalidArgument, errors.NotSupported):
            return False
        return True

    def feature_get(self, feature: int | str, length: int | None = None, *, data: bytes | None = None) -> bytes:
        """VFIO_DEVICE_FEATURE_GET; see :meth:`feature`."""
        if data is None:
            if length is None:
                raise errors.UsageError("feature_get needs length= (the feature's payload size) or data=")
            data = bytes(_int(length, "length", maximum=1 << 20))
        elif length is not None and length != len(data):
            raise errors.UsageError("length and len(data) differ")
        _, out = self._feature_call(feature, FEATURE_GET, bytes(data))
        return out

    def feature_set(self, feature: int | str, data: bytes = b"") -> int:
        """VFIO_DEVICE_FEATURE_SET with ``data``; returns the ioctl's result."""
        result, _ = self._feature_call(feature, FEATURE_SET, bytes(data))
        return result

    def dma_buf(self, region: int | str, ranges: Sequence[tuple[int, int]], *,
                open_flags: int = os.O_RDWR | os.O_CLOEXEC) -> int:
        """VFIO_DEVICE_FEATURE_DMA_BUF (a GET whose result is the new fd): a
        dma-buf over ``(offset, length)`` ranges of a region (a BAR). Map it
        with ``IOAS.map_file`` — the way to give a device P2P access to a BAR
        (IOMMU_IOAS_MAP of a BAR mmap fails with EFAULT). The caller owns the fd."""
        index = _index(region, REGION_INDEX, "region index")
        ranges = [(_int(o, "range offset"), _length(n, "range length", alignment=None)) for o, n in ranges]
        if not ranges:
            raise errors.UsageError("a dma-buf needs at least one range")
        head = ffi.new("struct vfio_device_feature_dma_buf *")
        head.region_index = index
        head.open_flags = _int(open_flags, "open_flags", maximum=U32_MAX)
        head.nr_ranges = len(ranges)
        body = bytes(ffi.buffer(head))
        for off, n in ranges:
            r = ffi.new("struct vfio_region_dma_range *")
            r.offset, r.length = off, n
            body += bytes(ffi.buffer(r))
        if "dma_buf" not in FEATURES:
            raise errors.UsageError("these bindings lack VFIO_DEVICE_FEATURE_DMA_BUF")
        result, _ = self._feature_call("dma_buf", FEATURE_GET, body)
        return result


def _sparse_areas(cap: ioctl.Capability) -> list[tuple[int, int]]:
    struct = "struct vfio_region_info_cap_sparse_mmap"
    view, _keep = cap.view(struct)
    n = int(view.nr_areas)
    first = ffi.offsetof(struct, "areas")
    size = ffi.sizeof("struct vfio_region_sparse_mmap_area")
    if first + n * size > len(cap.data):
        raise errors.UsageError(f"sparse mmap capability claims {n} areas but holds {len(cap.data)} bytes")
    out = []
    for i in range(n):
        raw = bytearray(cap.data[first + i * size:first + (i + 1) * size])
        a = ffi.from_buffer("struct vfio_region_sparse_mmap_area *", raw)
        out.append((int(a.offset), int(a.size)))
    return out


# -- the legacy container/group API ----------------------------------------------------
@record(frozen=True)
class Type1Info:
    """VFIO_IOMMU_GET_INFO of a type1 container."""

    flags: int
    iova_pgsizes: int
    iova_ranges: list[tuple[int, int]] | None = None  # inclusive (start, end)
    dma_avail: int | None = None
    migration: dict[str, int] | None = None
    caps: list[ioctl.Capability] = factory(default_factory=list)


@record
class DmaMapping:
    iova: int
    size: int
    user_va: int
    readable: bool
    writeable: bool
    buffer: Any = hidden(default=None, compare=True)
    pin: Any = hidden(default=None, compare=True)


class VfioContainer(_FdOwner):
    """``/dev/vfio/vfio`` (or an iommufd fd, which implements the same
    container ioctls when the kernel has CONFIG_IOMMUFD_VFIO_CONTAINER)."""

    _what = "VFIO container"
    kind = FileKind.VFIO_CONTAINER

    def __init__(self, fd: int, *, backend: Backend | None = None, owned: bool = True, path: str | None = None):
        super().__init__(fd, backend=backend, owned=owned, path=path)
        self._mappings: dict[int, DmaMapping] = {}

    @classmethod
    def open(cls, path: str = CONTAINER_PATH, backend: Backend | None = None) -> "VfioContainer":
        be = get_backend(backend)
        return cls(_open(be, path, "open(vfio container)"), backend=be, owned=True, path=path)

    @classmethod
    def from_fd(cls, fd: int, backend: Backend | None = None, owned: bool = True) -> "VfioContainer":
        return cls(fd, backend=backend, owned=owned)

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else f"fd={self._fd}"
        return f"<VfioContainer {state} mappings={len(self._mappings)}>"

    def _on_close(self) -> None:
        for m in self._mappings.values():
            _release(m.pin)
        self._mappings.clear()

    @property
    def mappings(self) -> list[DmaMapping]:
        return [self._mappings[k] for k in sorted(self._mappings)]

    def api_version(self) -> int:
        """VFIO_GET_API_VERSION (0 = VFIO_API_VERSION)."""
        return int(self._call(GET_API_VERSION))

    def check_extension(self, extension: int | str) -> int:
        """VFIO_CHECK_EXTENSION; non-zero if supported. Names: ``type1``,
        ``type1v2``, ``noiommu``, ``unmap_all``, ``update_vaddr``, ``dma_cc``..."""
        ext = _index(extension, EXTENSIONS, "VFIO extension")
        return int(self._call(CHECK_EXTENSION, value=ext))

    def set_iommu(self, iommu_type: int | str = "type1v2") -> None:
        """VFIO_SET_IOMMU (needs a group set on the container first)."""
        self._call(SET_IOMMU, value=_index(iommu_type, EXTENSIONS, "IOMMU type"))

    def iommu_info(self) -> Type1Info:
        """VFIO_IOMMU_GET_INFO with the IOVA-range, migration and DMA-avail capabilities."""
        arg, reply = ioctl.call_with_caps(self.backend, self.fileno(), IOMMU_GET_INFO)
        caps: list[ioctl.Capability] = []
        ranges = avail = migration = None
        if int(arg.flags) & C("VFIO_IOMMU_INFO_CAPS") and int(arg.cap_offset):
            caps = list(ioctl.walk_caps(reply, int(arg.cap_offset)))
        for cap in caps:
            if cap.id == C("VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE"):
                struct = "struct vfio_iommu_type1_info_cap_iova_range"
                view, _keep = cap.view(struct)
                n = int(view.nr_iovas)
                first = ffi.offsetof(struct, "iova_ranges")
                size = ffi.sizeof("struct vfio_iova_range")
                if first + n * size > len(cap.data):
                    raise errors.UsageError("IOVA range capability is truncated")
                ranges = []
                for i in range(n):
                    r = ffi.from_buffer("struct vfio_iova_range *",
                                        bytearray(cap.data[first + i * size:first + (i + 1) * size]))
                    ranges.append((int(r.start), int(r.end)))
            elif cap.id == C("VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL"):
                view, _keep = cap.view("struct vfio_iommu_type1_info_dma_avail")
                avail = int(view.avail)
            elif cap.id == C("VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION"):
                view, _keep = cap.view("struct vfio_iommu_type1_info_cap_migration")
                migration = {"flags": int(view.flags), "pgsize_bitmap": int(view.pgsize_bitmap),
                             "max_dirty_bitmap_size": int(view.max_dirty_bitmap_size)}
        return Type1Info(int(arg.flags), int(arg.iova_pgsizes), ranges, avail, migration, caps)

    def map_dma(self, buffer: Any, iova: int, *, readable: bool = True, writeable: bool = True,
                length: int | None = None) -> int:
        """VFIO_IOMMU_MAP_DMA of a user buffer at a fixed ``iova``. The buffer
        is referenced until unmapped."""
        if not (readable or writeable):
            raise errors.UsageError("a DMA mapping must be readable, writeable or both")
        iova = _aligned(_int(iova, "iova"), "iova")
        addr, size, pin = buffer_address(buffer, writable=writeable, length=length)
        try:
            _aligned(size, "length")
            _aligned(addr, "buffer address")
            if iova + size - 1 > U64_MAX:
                raise errors.UsageError("IOVA range wraps past 2^64")
            flags = (C("VFIO_DMA_MAP_FLAG_READ") if readable else 0) | (C("VFIO_DMA_MAP_FLAG_WRITE") if writeable else 0)
            self._call(IOMMU_MAP_DMA, flags=flags, vaddr=addr, iova=iova, size=size)
        except BaseException:
            _release(pin)
            raise
        self._mappings[iova] = DmaMapping(iova, size, addr, readable, writeable, buffer, pin)
        return iova

    def unmap_dma(self, iova: int, size: int) -> int:
        """VFIO_IOMMU_UNMAP_DMA; returns the bytes unmapped."""
        iova = _aligned(_int(iova, "iova"), "iova")
        size = _length(size)
        arg = self._call(IOMMU_UNMAP_DMA, iova=iova, size=size)
        last = iova + size - 1
        for key in [k for k, m in self._mappings.items() if iova <= m.iova and m.iova + m.size - 1 <= last]:
            _release(self._mappings.pop(key).pin)
        return int(arg.size)

    def unmap_all(self) -> int:
        """VFIO_IOMMU_UNMAP_DMA with VFIO_DMA_UNMAP_FLAG_ALL."""
        arg = self._call(IOMMU_UNMAP_DMA, flags=C("VFIO_DMA_UNMAP_FLAG_ALL"), iova=0, size=0)
        for m in self._mappings.values():
            _release(m.pin)
        self._mappings.clear()
        return int(arg.size)


@record(frozen=True)
class GroupStatus:
    flags: int

    @property
    def viable(self) -> bool:
        return bool(self.flags & C("VFIO_GROUP_FLAGS_VIABLE"))

    @property
    def container_set(self) -> bool:
        return bool(self.flags & C("VFIO_GROUP_FLAGS_CONTAINER_SET"))


class VfioGroup(_FdOwner):
    """A legacy VFIO group (``/dev/vfio/<group>``)."""

    _what = "VFIO group"
    kind = FileKind.VFIO_GROUP

    def __init__(self, fd: int, *, backend: Backend | None = None, owned: bool = True,
                 path: str | None = None, group: int | None = None):
        super().__init__(fd, backend=backend, owned=owned, path=path)
        self.group = group
        self.container: VfioContainer | None = None

    @classmethod
    def open(cls, group: int | str, backend: Backend | None = None) -> "VfioGroup":
        """Open by group number or by path (``/dev/vfio/7``, ``/dev/vfio/noiommu-0``)."""
        be = get_backend(backend)
        number = None
        if isinstance(group, str) and group.startswith("/"):
            path = group
            tail = group.rsplit("/", 1)[-1]
            number = int(tail) if tail.isdigit() else None
        elif isinstance(group, str) and group.isdigit():
            number = int(group)
            path = f"{GROUP_DIR}/{number}"
        elif isinstance(group, int) and not isinstance(group, bool):
            number = _int(group, "group", maximum=U32_MAX)
            path = f"{GROUP_DIR}/{number}"
        else:
            raise errors.UsageError(f"{group!r} is neither an IOMMU group number nor a /dev/vfio path")
        return cls(_open(be, path, "open(vfio group)"), backend=be, owned=True, path=path, group=number)

    @classmethod
    def from_fd(cls, fd: int, backend: Backend | None = None, owned: bool = True) -> "VfioGroup":
        return cls(fd, backend=backend, owned=owned)

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else f"fd={self._fd}"
        return f"<VfioGroup {self.group if self.group is not None else self.path} {state}>"

    def status(self) -> GroupStatus:
        """VFIO_GROUP_GET_STATUS (viable: every device of the group is on a VFIO
        driver or none; container_set)."""
        return GroupStatus(int(self._call(GROUP_GET_STATUS).flags))

    def set_container(self, container: VfioContainer | int) -> None:
        """VFIO_GROUP_SET_CONTAINER."""
        cfd = container.fileno() if isinstance(container, VfioContainer) else _int(container, "container fd")
        self._invoke(GROUP_SET_CONTAINER, ffi.new("int32_t *", cfd))
        self.container = container if isinstance(container, VfioContainer) else None

    def unset_container(self) -> None:
        """VFIO_GROUP_UNSET_CONTAINER."""
        self._call(GROUP_UNSET_CONTAINER)
        self.container = None

    def get_device_fd(self, name: str) -> VfioDevice:
        """VFIO_GROUP_GET_DEVICE_FD: a device of this group by name (the BDF for
        PCI). Returns an owned :class:`VfioDevice`."""
        if not isinstance(name, str) or not name or "\0" in name or len(name) > 255:
            raise errors.UsageError(f"{name!r} is not a device name")
        bdf = None
        if pci.is_bdf(name):
            bdf = name = pci.normalize_bdf(name)
        raw = ffi.new("char[]", name.encode())
        fd = ioctl.invoke_raw(self.backend, self.fileno(), GROUP_GET_DEVICE_FD, ffi.buffer(raw), detail=name)
        return VfioDevice(fd, backend=self.backend, owned=True, bdf=bdf)


__all__ = [
    "cdev_path", "VfioDevice", "VfioContainer", "VfioGroup", "DeviceInfo", "RegionInfo", "IrqInfo", "HotResetInfo",
    "DependentDevice", "Type1Info", "DmaMapping", "GroupStatus", "IRQ_INDEX", "REGION_INDEX", "FEATURES",
    "EXTENSIONS",
]
