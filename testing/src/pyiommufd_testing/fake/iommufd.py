"""``/dev/iommu`` of Linux 7.3 with a fake Intel VT-d IOMMU
(K:drivers/iommu/iommufd/main.c, ioas.c, hw_pagetable.c, device.c, viommu.c,
eventq.c, vfio_compat.c; K:drivers/iommu/intel/iommu.c, nested.c).

Generic dispatch (K:drivers/iommu/iommufd/main.c:524-565): an nr outside 0x80..last goes to the
VFIO compatibility ioctls (only ``VFIO_GET_API_VERSION`` and
``VFIO_CHECK_EXTENSION`` are answered, the rest ENOTTY); a request whose full
value differs from the table's is ENOTTY; ``size`` below
``offsetofend(last field)`` is EINVAL; non-zero bytes past the kernel's struct
are E2BIG. Object ids are allocated lowest-free from 1 (XA_FLAGS_ALLOC1,
K:drivers/iommu/iommufd/main.c:334). ``IOMMU_DESTROY`` of an object that is still used (an IOAS
under an HWPT, an attached HWPT, a bound device) is EBUSY (K:drivers/iommu/iommufd/main.c:226-313).

The VT-d model: second-stage paging domains (scalable mode off). Their
geometry comes from the capability register, as
``intel_iommu_domain_alloc_second_stage`` derives it: the IOVA width is the
largest table size both MGAW and SAGAW support (``compute_vasz_lg2_ss``,
K:drivers/iommu/intel/iommu.c:2913-2935), so QEMU's MGAW 39 gives an aperture
ending at 2^39-1 (K:drivers/iommu/generic_pt/iommu_pt.h:1238-1252, reserved
above it by K:drivers/iommu/iommufd/io_pagetable.c:1262-1273); the page sizes
are 4K plus 2M/1G where SSLPS says so (K:drivers/iommu/intel/iommu.c:3000-3004).
Every device has the MSI window 0xfee00000-0xfeefffff as a
reserved region (so IOVA_RANGES shows the hole once a device is attached);
no nesting and no vIOMMU (``VIOMMU_ALLOC`` is EOPNOTSUPP: VT-d has no
``viommu_init`` in 7.3); dirty tracking only if ``FakeKernel(dirty_tracking=True)``
(else HWPT_ALLOC with the flag, SET_DIRTY_TRACKING and GET_DIRTY_BITMAP are
EOPNOTSUPP). No DMA ever happens, so the dirty bitmap stays clean.

``IOMMU_IOAS_NOIOMMU_GET_PA`` (nr 0x95 on stock 7.3): the Debian 7.3 config
has no CONFIG_IOMMUFD_NOIOMMU, so a well-formed call is EOPNOTSUPP
(K:drivers/iommu/iommufd/iommufd_private.h:360-367); an undersized one is EINVAL from the generic
dispatch (min size 40; Linux 7.3 include/uapi/linux/iommufd.h: nr 0x95 is IOMMU_IOAS_NOIOMMU_GET_PA).
"""
from __future__ import annotations

import errno as E
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar, cast, overload

from .files import OpenFile
from .iopt import Iopt, Pages
from .uaccess import PAGE_SIZE, U64_MAX, ULONG_MAX, CData, IoctlArg, UserMemory, fail, getf, offsetofend

if TYPE_CHECKING:   # pragma: no cover
    from .boot import Boot
    from .pci import IommuGroup
    from .vfio import VfioDevice

IOMMUFD_TYPE = 0x3B
CMD_BASE = 0x80

# map flags, hwpt flags, options (H:iommufd.h)
MAP_FIXED_IOVA, MAP_WRITEABLE, MAP_READABLE = 1, 2, 4
HWPT_ALLOC_NEST_PARENT, HWPT_ALLOC_DIRTY_TRACKING, HWPT_FAULT_ID_VALID, HWPT_ALLOC_PASID = 1, 2, 4, 8
HWPT_DATA_NONE, HWPT_DATA_VTD_S1 = 0, 1
OPTION_RLIMIT_MODE, OPTION_HUGE_PAGES = 0, 1
OPTION_OP_SET, OPTION_OP_GET = 0, 1
VFIO_IOAS_GET, VFIO_IOAS_SET, VFIO_IOAS_CLEAR = 0, 1, 2
HW_INFO_FLAG_INPUT_TYPE = 1
HW_INFO_TYPE_DEFAULT, HW_INFO_TYPE_INTEL_VTD = 0, 1
HW_CAP_DIRTY_TRACKING = 1
HW_CAP_PCI_ATS_NOT_SUPPORTED = 1 << 3
HW_INFO_VTD_ERRATA_772415_SPR17 = 1
DIRTY_TRACKING_ENABLE = 1
GET_DIRTY_BITMAP_NO_CLEAR = 1
IOMMU_NO_PASID = 0
VEVENTQ_MAX_DEPTH = 1 << 19

# VFIO legacy ioctls answered by iommufd's container compatibility
VFIO_GET_API_VERSION = 0x3B64
VFIO_CHECK_EXTENSION = 0x3B65

#: a QEMU intel-iommu (scalable mode off) capability / extended capability
VTD_CAP = 0x00D2008C22260286
VTD_ECAP = 0x0000000000F00F5E
VTD_PGSIZES = (1 << 12) | (1 << 21) | (1 << 30)
MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)


_O = TypeVar("_O", bound="Obj")


def io(nr: int) -> int:
    return (IOMMUFD_TYPE << 8) | nr


# -- objects -------------------------------------------------------------------------
class Obj:
    type = "any"

    def __init__(self) -> None:
        self.id = 0
        self.users = 1

    def destroy(self, ctx: "IommufdCtx") -> None:
        pass


class Ioas(Obj):
    type = "ioas"

    def __init__(self) -> None:
        super().__init__()
        self.iopt = Iopt()
        self.hwpts: list["HwptPaging"] = []

    def destroy(self, ctx: IommufdCtx) -> None:
        # the kernel would WARN and leak an immutable IOAS's areas; the fake
        # drops them so that no file reference is leaked
        self.iopt.lu_immutable = False
        self.iopt.unmap_all()


def ecap_dev_iotlb_support(ecap: int) -> bool:
    """``ecap_dev_iotlb_support`` (K:drivers/iommu/intel/iommu.h:216)."""
    return bool((ecap >> 2) & 1)


def cap_mgaw(cap: int) -> int:
    """``cap_mgaw`` (K:drivers/iommu/intel/iommu.h:177)."""
    return ((cap >> 16) & 0x3F) + 1


def cap_sagaw(cap: int) -> int:
    """``cap_sagaw`` (K:drivers/iommu/intel/iommu.h:178)."""
    return (cap >> 8) & 0x1F


def vtd_ss_vasz_lg2(cap: int) -> int:
    """``compute_vasz_lg2_ss`` (K:drivers/iommu/intel/iommu.c:2913-2935): the
    second-stage IOVA width in bits (0 when no table size fits)."""
    mgaw, sagaw = cap_mgaw(cap), cap_sagaw(cap)
    if mgaw > 48 and sagaw >= 1 << 3:
        return min(57, mgaw)
    if mgaw > 39 and sagaw >= 1 << 2:
        return min(48, mgaw)
    if mgaw > 30 and sagaw >= 1 << 1:
        return min(39, mgaw)
    return 0


def vtd_ss_pgsizes(cap: int) -> int:
    """The second-stage ``pgsize_bitmap``: 4K, 2M if SSLPS bit 0, 1G if bit 1
    (K:drivers/iommu/intel/iommu.c:3000-3004, cap_super_page_val at
    K:drivers/iommu/intel/iommu.h:169)."""
    sslps = (cap >> 34) & 0xF
    pgsizes = VTD_PGSIZES
    if not sslps & 1:
        pgsizes &= ~(1 << 21)
    if not sslps & 2:
        pgsizes &= ~(1 << 30)
    return pgsizes


class Domain:
    """The VT-d paging domain behind an HWPT; its geometry comes from the
    IOMMU's capability register (see the module docstring)."""

    def __init__(self, dirty: bool, cap: int = VTD_CAP) -> None:
        vasz = vtd_ss_vasz_lg2(cap)
        if not vasz:    # a configuration error of the fake, not a modelled answer
            raise ValueError(f"VT-d cap {cap:#x}: MGAW/SAGAW allow no second-stage table")
        self.pgsize_bitmap = vtd_ss_pgsizes(cap)
        self.aperture_start = 0
        self.aperture_end = min((1 << vasz) - 1, ULONG_MAX)
        self.dirty_ops = dirty
        self.dirty_enabled = False
        self.preserved_state: Any = None        # series: set while preserved


class Hwpt(Obj):
    def __init__(self, domain: Domain) -> None:
        super().__init__()
        self.domain = domain
        self.pasid_compat = False
        self.fault: "Fault | None" = None


class HwptPaging(Hwpt):
    type = "hwpt_paging"

    def __init__(self, ioas: Ioas, domain: Domain) -> None:
        super().__init__(domain)
        self.ioas = ioas
        self.auto_domain = False
        self.nest_parent = False
        # the series (S1:3210-3211)
        self.lu_preserve = False
        self.lu_token = 0

    def destroy(self, ctx: IommufdCtx) -> None:
        self.ioas.iopt.remove_domain(self.domain)
        if self in self.ioas.hwpts:
            self.ioas.hwpts.remove(self)
        self.ioas.users -= 1
        if self.fault is not None:
            self.fault.users -= 1
        if ctx.boot.series is not None:
            ctx.boot.series.hwpt_destroyed(ctx, self)


class Fault(Obj):
    type = "fault"

    def __init__(self) -> None:
        super().__init__()
        self.file: OpenFile | None = None


class Device(Obj):
    """``struct iommufd_device``: a bound VFIO device."""
    type = "device"

    def __init__(self, ctx: "IommufdCtx", vdev: "VfioDevice") -> None:
        super().__init__()
        self.ctx = ctx
        self.vdev = vdev
        self.attach: dict[int, Hwpt] = {}       # pasid -> hwpt

    @property
    def group(self) -> IommuGroup:
        return self.vdev.state.group

    def unbind(self) -> None:
        """``iommufd_device_unbind``: drop the object and the DMA ownership."""
        self.ctx.objects.pop(self.id, None)
        self.group.release(self.ctx)


class EventqFile(OpenFile):
    """``[iommufd-pgfault]``: the fault queue's fd (no faults ever arrive)."""
    kind = "iommufd-eventq"

    def __init__(self, ctx: "IommufdCtx", obj: Obj, name: str) -> None:
        super().__init__()
        self.ctx = ctx
        self.obj = obj
        self.path = f"anon_inode:{name}"

    def release(self) -> None:
        self.obj.users -= 1
        self.ctx.file.put()

    def read(self, fd: int, length: int) -> bytes:
        fail(E.EAGAIN)


# -- ioctl table -----------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    nr: int
    struct: str
    last: str
    fn: Callable[["IommufdCtx", IoctlArg, Any], None]


class IommufdCtx:
    """``struct iommufd_ctx``: one open of ``/dev/iommu``."""

    def __init__(self, boot: "Boot") -> None:
        self.boot = boot
        self.objects: dict[int, Obj] = {}
        self.account_mode_mm = False
        self.compat_ioas: Ioas | None = None  # not vfio_ioas: that is the handler
        # IommufdFile.__init__ sets it at once: no context lives without its file
        self.file: "IommufdFile" = None     # type: ignore[assignment]
        self.mem: UserMemory | None = None

    # -- object table ------------------------------------------------------------------
    def alloc(self, obj: _O) -> _O:
        new_id = 1
        while new_id in self.objects:
            new_id += 1
        if new_id > (1 << 31) - 1:
            fail(E.EBUSY)
        obj.id = new_id
        self.objects[new_id] = obj
        return obj

    @overload
    def get(self, oid: int, kind: type[_O]) -> _O: ...
    @overload
    def get(self, oid: int, kind: tuple[type[Obj], ...] | None = None) -> Obj: ...

    def get(self, oid: int, kind: type[Obj] | tuple[type[Obj], ...] | None = None) -> Obj:
        obj = self.objects.get(oid)
        if obj is None or (kind is not None and not isinstance(obj, kind)) or obj.users <= 0:
            fail(E.ENOENT)
        return obj

    def remove(self, obj: Obj) -> None:
        obj.destroy(self)
        self.objects.pop(obj.id, None)
        if self.compat_ioas is obj:
            self.compat_ioas = None

    def destroy_all(self) -> None:
        """``iommufd_fops_release``: leaves first until nothing is left."""
        while self.objects:
            progressed = False
            for obj in sorted(self.objects.values(), key=lambda o: o.id):
                if obj.users == 1 or obj.users <= 0:
                    self.remove(obj)
                    progressed = True
            if not progressed:      # a refcount bug in the fake; do not hang
                for obj in list(self.objects.values()):
                    self.remove(obj)

    def hwpt_put(self, hwpt: Hwpt) -> None:
        """``iommufd_hw_pagetable_put``: an auto domain dies with its last user."""
        hwpt.users -= 1
        if isinstance(hwpt, HwptPaging) and hwpt.auto_domain and hwpt.users == 1:
            self.remove(hwpt)

    # -- dispatch ------------------------------------------------------------------------
    def table(self) -> dict[int, Op]:
        ops = {op.nr: op for op in BASE_OPS}
        series = self.boot.series
        if series is not None:
            ops[series.lu_nr] = Op(series.lu_nr, series.struct, "hwpt_token", series.mark_ioctl)
        return ops

    def ioctl(self, request: int, buf: Any, mem: UserMemory) -> int:
        self.mem = mem
        nr = request & 0xff
        ops = self.table()
        last_nr = max(ops)
        if nr < CMD_BASE or nr > last_nr or nr not in ops:
            if CMD_BASE <= nr <= last_nr:
                fail(E.ENOTTY)
            return self.vfio_compat(request, buf)
        arg = IoctlArg(buf, mem)
        user_size = arg.get_u32(0)
        op = ops[nr]
        if io(op.nr) != (request & 0xffffffff):
            fail(E.ENOTTY)
        if user_size < offsetofend(op.struct, op.last):
            fail(E.EINVAL)
        cmd = arg.copy_struct_from_user(op.struct, user_size)
        op.fn(self, arg, cmd)
        return 0

    def vfio_compat(self, request: int, buf: Any) -> int:
        """K:drivers/iommu/iommufd/vfio_compat.c:513-536 (type-1 container emulation is not modelled)."""
        request &= 0xffffffff
        if request == VFIO_GET_API_VERSION:
            return 0
        fail(E.ENOTTY)

    def ioctl_int(self, request: int, value: int) -> int:
        request &= 0xffffffff
        if request == VFIO_GET_API_VERSION:
            return 0
        if request == VFIO_CHECK_EXTENSION:
            # VFIO_TYPE1_IOMMU, VFIO_TYPE1v2_IOMMU, VFIO_UNMAP_ALL (K:drivers/iommu/iommufd/vfio_compat.c:279-308)
            return 1 if value in (1, 3, 9) else 0
        if (request & 0xff) >= CMD_BASE and (request >> 8) & 0xff == IOMMUFD_TYPE:
            fail(E.EFAULT)      # a struct ioctl given a bogus pointer
        fail(E.ENOTTY)

    # -- commands -------------------------------------------------------------------------
    def destroy(self, arg: IoctlArg, cmd: CData) -> None:
        obj = self.objects.get(int(cmd.id))
        if obj is None:
            fail(E.ENOENT)
        if obj.users != 1:
            fail(E.EBUSY)
        self.remove(obj)

    def ioas_alloc(self, arg: IoctlArg, cmd: CData) -> None:
        if cmd.flags:
            fail(E.EOPNOTSUPP)
        ioas = self.alloc(Ioas())
        cmd.out_ioas_id = ioas.id
        try:
            arg.respond()
        except OSError:
            self.remove(ioas)
            raise

    def ioas_iova_ranges(self, arg: IoctlArg, cmd: CData) -> None:
        if getf(cmd, "__reserved"):
            fail(E.EOPNOTSUPP)
        ioas = self.get(int(cmd.ioas_id), Ioas)
        max_iovas = int(cmd.num_iovas)
        ptr = int(cmd.allowed_iovas)
        ranges = ioas.iopt.iova_ranges()
        cmd.out_iova_alignment = ioas.iopt.iova_alignment
        for i, (start, last) in enumerate(ranges[:max_iovas]):
            arg.mem.write(ptr + 16 * i, start.to_bytes(8, "little") + last.to_bytes(8, "little"))
        cmd.num_iovas = len(ranges)
        arg.respond()
        if len(ranges) > max_iovas:
            fail(E.EMSGSIZE)

    def ioas_allow_iovas(self, arg: IoctlArg, cmd: CData) -> None:
        if getf(cmd, "__reserved"):
            fail(E.EOPNOTSUPP)
        ioas = self.get(int(cmd.ioas_id), Ioas)
        ptr = int(cmd.allowed_iovas)
        loaded: list[tuple[int, int]] = []
        for i in range(int(cmd.num_iovas)):
            raw = arg.mem.read(ptr + 16 * i, 16)
            start = int.from_bytes(raw[:8], "little")
            last = int.from_bytes(raw[8:], "little")
            if start >= last:
                fail(E.EINVAL)
            if any(s <= last and l >= start for s, l in loaded):
                fail(E.EINVAL)
            loaded.append((start, last))
        ioas.iopt.set_allowed(loaded)

    @staticmethod
    def _map_checks(cmd: CData, reserved_field: bool) -> None:
        if (cmd.flags & ~(MAP_FIXED_IOVA | MAP_WRITEABLE | MAP_READABLE)) or (
                reserved_field and getf(cmd, "__reserved")):
            fail(E.EOPNOTSUPP)

    def ioas_map(self, arg: IoctlArg, cmd: CData) -> None:
        self._map_checks(cmd, True)
        if cmd.iova >= ULONG_MAX or cmd.length >= ULONG_MAX:
            fail(E.EOVERFLOW)
        if not cmd.flags & (MAP_WRITEABLE | MAP_READABLE):
            fail(E.EINVAL)
        ioas = self.get(int(cmd.ioas_id), Ioas)
        uptr, length = int(cmd.user_va), int(cmd.length)
        if uptr + length > ULONG_MAX:
            fail(E.EOVERFLOW)
        down = uptr & ~(PAGE_SIZE - 1)
        pages = Pages("user", length, uptr - down, bool(cmd.flags & MAP_WRITEABLE), uptr=down)
        fixed = bool(cmd.flags & MAP_FIXED_IOVA)
        cmd.iova = ioas.iopt.map_pages([(pages, uptr - down, length)], length,
                                       int(cmd.iova) if fixed else None,
                                       bool(cmd.flags & MAP_WRITEABLE), arg.mem)
        arg.respond()

    def ioas_map_file(self, arg: IoctlArg, cmd: CData) -> None:
        self._map_checks(cmd, False)
        if cmd.iova >= ULONG_MAX or cmd.length >= ULONG_MAX:
            fail(E.EOVERFLOW)
        if not cmd.flags & (MAP_WRITEABLE | MAP_READABLE):
            fail(E.EINVAL)
        ioas = self.get(int(cmd.ioas_id), Ioas)
        start, length = int(cmd.start), int(cmd.length)
        if not length:
            fail(E.EINVAL)
        if start + length - 1 > U64_MAX:
            fail(E.EOVERFLOW)
        start_byte = start % PAGE_SIZE
        file = self.boot.table.get(int(cmd.fd))         # EBADF
        seals = self.boot.series.sample_seals(file) if self.boot.series else 0
        pages = Pages("file", length, start_byte, bool(cmd.flags & MAP_WRITEABLE),
                      file=file, start=start - start_byte, seals=seals)
        fixed = bool(cmd.flags & MAP_FIXED_IOVA)
        cmd.iova = ioas.iopt.map_pages([(pages, start_byte, length)], length,
                                       int(cmd.iova) if fixed else None,
                                       bool(cmd.flags & MAP_WRITEABLE), arg.mem)
        arg.respond()

    def ioas_copy(self, arg: IoctlArg, cmd: CData) -> None:
        if cmd.flags & ~(MAP_FIXED_IOVA | MAP_WRITEABLE | MAP_READABLE):
            fail(E.EOPNOTSUPP)
        if cmd.length >= ULONG_MAX or cmd.src_iova >= ULONG_MAX or cmd.dst_iova >= ULONG_MAX:
            fail(E.EOVERFLOW)
        if not cmd.flags & (MAP_WRITEABLE | MAP_READABLE):
            fail(E.EINVAL)
        src = self.get(int(cmd.src_ioas_id), Ioas)
        elems = src.iopt.get_pages(int(cmd.src_iova), int(cmd.length))
        try:
            dst = self.get(int(cmd.dst_ioas_id), Ioas)
        except OSError:
            for pages, _, _ in elems:
                pages.put()
            raise
        fixed = bool(cmd.flags & MAP_FIXED_IOVA)
        cmd.dst_iova = dst.iopt.map_pages(elems, int(cmd.length),
                                          int(cmd.dst_iova) if fixed else None,
                                          bool(cmd.flags & MAP_WRITEABLE), arg.mem)
        arg.respond()

    def ioas_unmap(self, arg: IoctlArg, cmd: CData) -> None:
        ioas = self.get(int(cmd.ioas_id), Ioas)
        iova, length = int(cmd.iova), int(cmd.length)
        if iova == 0 and length == U64_MAX:
            unmapped = ioas.iopt.unmap_all()
        else:
            if iova >= ULONG_MAX or length >= ULONG_MAX:
                fail(E.EOVERFLOW)
            if not length:
                fail(E.EINVAL)
            if iova + length - 1 > ULONG_MAX:
                fail(E.EOVERFLOW)
            unmapped = ioas.iopt.unmap_range(iova, iova + length - 1)
            if not unmapped:
                fail(E.ENOENT)
        cmd.length = unmapped
        arg.respond()

    def ioas_change_process(self, arg: IoctlArg, cmd: CData) -> None:
        if getf(cmd, "__reserved"):
            fail(E.EOPNOTSUPP)
        for obj in self.objects.values():
            if isinstance(obj, Ioas):
                for area in obj.iopt.areas:
                    if area.pages.kind != "file":
                        fail(E.EINVAL)
        # accounting moves to the caller: nothing observable in the fake

    def option(self, arg: IoctlArg, cmd: CData) -> None:
        if getf(cmd, "__reserved"):
            fail(E.EOPNOTSUPP)
        if cmd.option_id == OPTION_RLIMIT_MODE:
            if cmd.object_id:
                fail(E.EOPNOTSUPP)
            if cmd.op == OPTION_OP_GET:
                cmd.val64 = 1 if self.account_mode_mm else 0
            elif cmd.op == OPTION_OP_SET:
                if self.boot.euid != 0:
                    fail(E.EPERM)
                if self.objects:
                    fail(E.EBUSY)
                if cmd.val64 not in (0, 1):
                    fail(E.EINVAL)
                self.account_mode_mm = bool(cmd.val64)
            else:
                fail(E.EOPNOTSUPP)
        elif cmd.option_id == OPTION_HUGE_PAGES:
            ioas = self.get(int(cmd.object_id), Ioas)
            if cmd.op == OPTION_OP_GET:
                cmd.val64 = 0 if ioas.iopt.disable_large_pages else 1
            elif cmd.op == OPTION_OP_SET:
                if cmd.val64 == 0:
                    ioas.iopt.set_large_pages(False)
                elif cmd.val64 == 1:
                    ioas.iopt.set_large_pages(True)
                else:
                    fail(E.EINVAL)
            else:
                fail(E.EOPNOTSUPP)
        else:
            fail(E.EOPNOTSUPP)
        arg.copy_field_to_user("val64")

    def vfio_ioas(self, arg: IoctlArg, cmd: CData) -> None:
        if getf(cmd, "__reserved"):
            fail(E.EOPNOTSUPP)
        if cmd.op == VFIO_IOAS_GET:
            if self.compat_ioas is None or self.compat_ioas.id not in self.objects:
                fail(E.ENODEV)
            cmd.ioas_id = self.compat_ioas.id
            arg.respond()
        elif cmd.op == VFIO_IOAS_SET:
            self.compat_ioas = self.get(int(cmd.ioas_id), Ioas)
        elif cmd.op == VFIO_IOAS_CLEAR:
            self.compat_ioas = None
        else:
            fail(E.EOPNOTSUPP)

    # -- HWPTs ---------------------------------------------------------------------------------
    def get_device(self, dev_id: int) -> Device:
        return self.get(dev_id, Device)

    def hwpt_paging_alloc(self, ioas: Ioas, idev: Device, flags: int, user_data: bool,
                          pasid: int = IOMMU_NO_PASID, immediate_attach: bool = False) -> HwptPaging:
        valid = HWPT_ALLOC_NEST_PARENT | HWPT_ALLOC_DIRTY_TRACKING | HWPT_FAULT_ID_VALID | HWPT_ALLOC_PASID
        if flags & ~valid:
            fail(E.EOPNOTSUPP)
        dirty_cap = self.boot.iommu_caps.dirty_tracking
        if flags & HWPT_ALLOC_DIRTY_TRACKING and not dirty_cap:
            fail(E.EOPNOTSUPP)
        if flags & HWPT_FAULT_ID_VALID and flags & HWPT_ALLOC_NEST_PARENT:
            fail(E.EOPNOTSUPP)
        # intel_iommu_domain_alloc_paging_flags (K:drivers/iommu/intel/iommu.c:3020-3035)
        dflags = flags & ~HWPT_FAULT_ID_VALID
        if user_data:
            fail(E.EOPNOTSUPP)
        if dflags & HWPT_ALLOC_NEST_PARENT and not self.boot.iommu_caps.nesting:
            fail(E.EOPNOTSUPP)
        hwpt = HwptPaging(ioas, Domain(bool(dflags & HWPT_ALLOC_DIRTY_TRACKING),
                                        self.boot.iommu_caps.cap))
        hwpt.pasid_compat = bool(flags & HWPT_ALLOC_PASID)
        hwpt.nest_parent = bool(flags & HWPT_ALLOC_NEST_PARENT)
        ioas.users += 1
        self.alloc(hwpt)
        try:
            if immediate_attach:
                self.hwpt_attach(hwpt, idev, pasid)
            try:
                # set by the ioctls that made the areas (also when a cdev attach gets here)
                ioas.iopt.add_domain(hwpt.domain, cast(UserMemory, self.mem))
            except BaseException:
                if immediate_attach:
                    self.hwpt_detach(idev, pasid, put=False)
                raise
        except BaseException:
            self.objects.pop(hwpt.id, None)
            ioas.users -= 1
            raise
        ioas.hwpts.append(hwpt)
        return hwpt

    def hwpt_alloc(self, arg: IoctlArg, cmd: CData) -> None:
        if getf(cmd, "__reserved"):
            fail(E.EOPNOTSUPP)
        if (cmd.data_type == HWPT_DATA_NONE and cmd.data_len) or (
                cmd.data_type != HWPT_DATA_NONE and not cmd.data_len):
            fail(E.EINVAL)
        idev = self.get_device(int(cmd.dev_id))
        pt = self.objects.get(int(cmd.pt_id))
        if pt is None or pt.users <= 0:
            fail(E.EINVAL)
        flags = int(cmd.flags)
        if isinstance(pt, Ioas):
            hwpt: Hwpt = self.hwpt_paging_alloc(pt, idev, flags, bool(cmd.data_len))
        elif isinstance(pt, HwptPaging):
            # iommufd_hwpt_nested_alloc + intel_iommu_domain_alloc_nested
            if (flags & ~(HWPT_FAULT_ID_VALID | HWPT_ALLOC_PASID)) or not cmd.data_len:
                fail(E.EOPNOTSUPP)
            if pt.auto_domain or not pt.nest_parent:
                fail(E.EINVAL)
            if not self.boot.iommu_caps.nesting or cmd.data_type != HWPT_DATA_VTD_S1:
                fail(E.EOPNOTSUPP)
            fail(E.EOPNOTSUPP)      # nested translation is not modelled
        else:
            fail(E.EINVAL)
        if flags & HWPT_FAULT_ID_VALID:
            try:
                fault = self.get(int(cmd.fault_id), Fault)
            except OSError:
                self.remove(hwpt)
                raise
            hwpt.fault = fault
            fault.users += 1
        cmd.out_hwpt_id = hwpt.id
        try:
            arg.respond()
        except OSError:
            self.remove(hwpt)
            raise

    def get_hwpt_paging(self, hwpt_id: int) -> HwptPaging:
        return self.get(hwpt_id, HwptPaging)

    def hwpt_set_dirty_tracking(self, arg: IoctlArg, cmd: CData) -> None:
        if cmd.flags & ~DIRTY_TRACKING_ENABLE:
            fail(E.EOPNOTSUPP)
        hwpt = self.get_hwpt_paging(int(cmd.hwpt_id))
        if not hwpt.domain.dirty_ops:
            fail(E.EOPNOTSUPP)
        hwpt.domain.dirty_enabled = bool(cmd.flags & DIRTY_TRACKING_ENABLE)

    def hwpt_get_dirty_bitmap(self, arg: IoctlArg, cmd: CData) -> None:
        if (cmd.flags & ~GET_DIRTY_BITMAP_NO_CLEAR) or getf(cmd, "__reserved"):
            fail(E.EOPNOTSUPP)
        hwpt = self.get_hwpt_paging(int(cmd.hwpt_id))
        iopt = hwpt.ioas.iopt
        iova, length, page_size = int(cmd.iova), int(cmd.length), int(cmd.page_size)
        # iommufd_check_iova_range (K:drivers/iommu/iommufd/io_pagetable.c:602-629)
        if not length:
            fail(E.EINVAL)
        last = iova + length - 1
        if last > U64_MAX or iova > ULONG_MAX or last > ULONG_MAX:
            fail(E.EOVERFLOW)
        align = iopt.iova_alignment
        if (iova & (align - 1)) or ((last + 1) & (align - 1)):
            fail(E.EINVAL)
        if not page_size:
            fail(E.EINVAL)
        if (iova & (page_size - 1)) or ((last + 1) & (page_size - 1)):
            fail(E.EINVAL)
        if not hwpt.domain.dirty_ops:
            fail(E.EOPNOTSUPP)
        # the bitmap must be writable user memory; no page is ever dirty
        nbits = length // page_size
        arg.mem.write(int(cmd.data), arg.mem.read(int(cmd.data), -(-nbits // 8)))

    def hwpt_invalidate(self, arg: IoctlArg, cmd: CData) -> None:
        done = 0
        try:
            if getf(cmd, "__reserved"):
                fail(E.EOPNOTSUPP)
            if cmd.entry_num and (not cmd.data_uptr or not cmd.entry_len
                                  or cmd.entry_len > PAGE_SIZE or cmd.entry_num > (1 << 19)):
                fail(E.EINVAL)
            pt = self.get(int(cmd.hwpt_id))
            # only nested HWPTs and vIOMMUs take invalidations; VT-d has neither here
            fail(E.EINVAL if not isinstance(pt, Hwpt) or isinstance(pt, HwptPaging) else E.EOPNOTSUPP)
        finally:
            cmd.entry_num = done
            arg.respond()

    def get_hw_info(self, arg: IoctlArg, cmd: CData) -> None:
        if cmd.flags & ~HW_INFO_FLAG_INPUT_TYPE:
            fail(E.EOPNOTSUPP)
        if any(getf(cmd, "__reserved")[i] for i in range(3)):
            fail(E.EOPNOTSUPP)
        if not cmd.flags & HW_INFO_FLAG_INPUT_TYPE:
            cmd.in_data_type = HW_INFO_TYPE_DEFAULT
        idev = self.get_device(int(cmd.dev_id))
        if cmd.in_data_type not in (HW_INFO_TYPE_DEFAULT, HW_INFO_TYPE_INTEL_VTD):
            fail(E.EOPNOTSUPP)
        data = (HW_INFO_VTD_ERRATA_772415_SPR17.to_bytes(4, "little") + bytes(4)
                + self.boot.iommu_caps.cap.to_bytes(8, "little")
                + self.boot.iommu_caps.ecap.to_bytes(8, "little"))
        cmd.out_data_type = HW_INFO_TYPE_INTEL_VTD
        user_len = int(cmd.data_len)
        ptr = int(cmd.data_uptr)
        copy_len = min(user_len, len(data))
        arg.mem.write(ptr, data[:copy_len])
        if copy_len < user_len:
            arg.mem.clear(ptr + copy_len, user_len - copy_len)
        cmd.data_len = len(data)
        caps = 0
        if self.boot.iommu_caps.dirty_tracking:
            caps |= HW_CAP_DIRTY_TRACKING
        # K:drivers/iommu/iommufd/device.c:1709-1711: a device the IOMMU cannot
        # use ATS with (see FakePciDevice.ats) says so
        if not self.boot.iommu_caps.ats_supported(idev.vdev.state.hw):
            caps |= HW_CAP_PCI_ATS_NOT_SUPPORTED
        cmd.out_capabilities = caps
        max_pasids = idev.vdev.state.hw.max_pasids
        cmd.out_max_pasid_log2 = max_pasids.bit_length() - 1 if max_pasids else 0
        arg.respond()

    def fault_queue_alloc(self, arg: IoctlArg, cmd: CData) -> None:
        if cmd.flags:
            fail(E.EOPNOTSUPP)
        fault = self.alloc(Fault())
        table = self.boot.table
        qfile = EventqFile(self, fault, "[iommufd-pgfault]")
        fd = table.install(qfile, table.placeholder("[iommufd-pgfault]"))
        fault.users += 1
        self.file.get()
        fault.file = qfile
        cmd.out_fault_id = fault.id
        cmd.out_fault_fd = fd
        try:
            arg.respond()
        except OSError:
            table.close(fd)
            self.remove(fault)
            raise

    def viommu_alloc(self, arg: IoctlArg, cmd: CData) -> None:
        if cmd.flags or cmd.type == 0:
            fail(E.EOPNOTSUPP)
        self.get_device(int(cmd.dev_id))
        fail(E.EOPNOTSUPP)      # intel_iommu_ops has no get_viommu_size/viommu_init

    def vdevice_alloc(self, arg: IoctlArg, cmd: CData) -> None:
        if cmd.virt_id > ULONG_MAX:
            fail(E.EINVAL)
        fail(E.ENOENT)          # no vIOMMU object can exist

    def veventq_alloc(self, arg: IoctlArg, cmd: CData) -> None:
        if cmd.flags or getf(cmd, "__reserved") or cmd.type == 0:
            fail(E.EOPNOTSUPP)
        if not cmd.veventq_depth or cmd.veventq_depth > VEVENTQ_MAX_DEPTH:
            fail(E.EINVAL)
        fail(E.ENOENT)

    def hw_queue_alloc(self, arg: IoctlArg, cmd: CData) -> None:
        if cmd.flags or cmd.type == 0:
            fail(E.EOPNOTSUPP)
        if not cmd.length:
            fail(E.EINVAL)
        if cmd.nesting_parent_iova + cmd.length - 1 > U64_MAX:
            fail(E.EOVERFLOW)
        fail(E.ENOENT)

    def noiommu_get_pa(self, arg: IoctlArg, cmd: CData) -> None:
        fail(E.EOPNOTSUPP)      # CONFIG_IOMMUFD_NOIOMMU=n

    # -- device attachment (called by the VFIO cdev) ----------------------------------------------
    def hwpt_attach(self, hwpt: Hwpt, idev: Device, pasid: int) -> None:
        """``iommufd_hw_pagetable_attach``."""
        group_attach = self.boot.vfio.group_attach(idev.group)
        cur = group_attach.get(pasid)
        if cur is not None and cur[0] is not hwpt:
            fail(E.EINVAL)
        if pasid == IOMMU_NO_PASID:
            if not hwpt.pasid_compat and any(p != IOMMU_NO_PASID for p in group_attach):
                fail(E.EINVAL)
        else:
            if not hwpt.pasid_compat:
                fail(E.EINVAL)
            rid = group_attach.get(IOMMU_NO_PASID)
            if rid is not None and not rid[0].pasid_compat:
                fail(E.EINVAL)
            max_pasids = idev.vdev.state.hw.max_pasids
            if pasid >= max_pasids:
                fail(E.EINVAL)
        if isinstance(hwpt, HwptPaging) and pasid == IOMMU_NO_PASID:
            hwpt.ioas.iopt.reserve(MSI_WINDOW[0], MSI_WINDOW[1], idev)
        if cur is None:
            group_attach[pasid] = (hwpt, {idev})
        else:
            cur[1].add(idev)
        idev.attach[pasid] = hwpt
        hwpt.users += 1

    def hwpt_detach(self, idev: Device, pasid: int, put: bool = True) -> Hwpt | None:
        group_attach = self.boot.vfio.group_attach(idev.group)
        cur = group_attach.get(pasid)
        hwpt = idev.attach.pop(pasid, None)
        if cur is None or hwpt is None:
            return None
        cur[1].discard(idev)
        if not cur[1]:
            del group_attach[pasid]
        if isinstance(hwpt, HwptPaging) and pasid == IOMMU_NO_PASID:
            hwpt.ioas.iopt.remove_reserved(idev)
        if put:
            self.hwpt_put(hwpt)
        else:
            hwpt.users -= 1
        return hwpt

    def device_attach(self, idev: Device, pasid: int, pt_id: int, replace: bool) -> int:
        """``iommufd_device_attach``/``_replace``; returns the HWPT id."""
        pt = self.get(pt_id)
        if isinstance(pt, Hwpt):
            self._do_attach(idev, pasid, pt, replace)
            return pt.id
        if isinstance(pt, Ioas):
            for hwpt in list(pt.hwpts):
                if not hwpt.auto_domain:
                    continue
                try:
                    self._do_attach(idev, pasid, hwpt, replace)
                except OSError as exc:
                    if exc.errno == E.EINVAL:
                        continue
                    raise
                return hwpt.id
            if replace:
                hwpt = self.hwpt_paging_alloc(pt, idev, 0, False)
                try:
                    self._do_attach(idev, pasid, hwpt, replace)
                except BaseException:
                    self.remove(hwpt)
                    raise
            else:
                hwpt = self.hwpt_paging_alloc(pt, idev, 0, False, pasid, immediate_attach=True)
            hwpt.auto_domain = True
            return hwpt.id
        fail(E.EINVAL)

    def _do_attach(self, idev: Device, pasid: int, hwpt: Hwpt, replace: bool) -> None:
        if not replace:
            self.hwpt_attach(hwpt, idev, pasid)
            return
        old = idev.attach.get(pasid)
        if old is None:
            fail(E.EINVAL)
        if old is hwpt:
            return
        self.hwpt_detach(idev, pasid, put=False)
        try:
            self.hwpt_attach(hwpt, idev, pasid)
        except BaseException:
            self.hwpt_attach(old, idev, pasid)
            raise
        old.users += 1
        self.hwpt_put(old)


BASE_OPS = [
    Op(0x80, "struct iommu_destroy", "id", IommufdCtx.destroy),
    Op(0x81, "struct iommu_ioas_alloc", "out_ioas_id", IommufdCtx.ioas_alloc),
    Op(0x82, "struct iommu_ioas_allow_iovas", "allowed_iovas", IommufdCtx.ioas_allow_iovas),
    Op(0x83, "struct iommu_ioas_copy", "src_iova", IommufdCtx.ioas_copy),
    Op(0x84, "struct iommu_ioas_iova_ranges", "out_iova_alignment", IommufdCtx.ioas_iova_ranges),
    Op(0x85, "struct iommu_ioas_map", "iova", IommufdCtx.ioas_map),
    Op(0x86, "struct iommu_ioas_unmap", "length", IommufdCtx.ioas_unmap),
    Op(0x87, "struct iommu_option", "val64", IommufdCtx.option),
    Op(0x88, "struct iommu_vfio_ioas", "__reserved", IommufdCtx.vfio_ioas),
    Op(0x89, "struct iommu_hwpt_alloc", "__reserved", IommufdCtx.hwpt_alloc),
    Op(0x8a, "struct iommu_hw_info", "__reserved", IommufdCtx.get_hw_info),
    Op(0x8b, "struct iommu_hwpt_set_dirty_tracking", "__reserved", IommufdCtx.hwpt_set_dirty_tracking),
    Op(0x8c, "struct iommu_hwpt_get_dirty_bitmap", "data", IommufdCtx.hwpt_get_dirty_bitmap),
    Op(0x8d, "struct iommu_hwpt_invalidate", "__reserved", IommufdCtx.hwpt_invalidate),
    Op(0x8e, "struct iommu_fault_alloc", "out_fault_fd", IommufdCtx.fault_queue_alloc),
    Op(0x8f, "struct iommu_ioas_map_file", "iova", IommufdCtx.ioas_map_file),
    Op(0x90, "struct iommu_viommu_alloc", "out_viommu_id", IommufdCtx.viommu_alloc),
    Op(0x91, "struct iommu_vdevice_alloc", "virt_id", IommufdCtx.vdevice_alloc),
    Op(0x92, "struct iommu_ioas_change_process", "__reserved", IommufdCtx.ioas_change_process),
    Op(0x93, "struct iommu_veventq_alloc", "out_veventq_fd", IommufdCtx.veventq_alloc),
    Op(0x94, "struct iommu_hw_queue_alloc", "length", IommufdCtx.hw_queue_alloc),
    Op(0x95, "struct iommu_ioas_noiommu_get_pa", "out_phys", IommufdCtx.noiommu_get_pa),
]


class IommufdFile(OpenFile):
    """An open ``/dev/iommu``."""

    kind = "iommufd"
    path = "/dev/iommu"

    def __init__(self, ctx: IommufdCtx) -> None:
        super().__init__()
        self.ctx = ctx
        ctx.file = self

    def release(self) -> None:
        self.ctx.destroy_all()

    def ioctl(self, fd: int, request: int, buf: Any, mem: UserMemory) -> int:
        return self.ctx.ioctl(request, buf, mem)

    def ioctl_int(self, fd: int, request: int, value: int) -> int:
        return self.ctx.ioctl_int(request, value)
