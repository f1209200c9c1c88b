"""The legacy VFIO API: the container ``/dev/vfio/vfio``, the group nodes
``/dev/vfio/<group>`` and the type1 IOMMU driver behind a container
(K:drivers/vfio/container.c, group.c, vfio_iommu_type1.c). The Debian 7.3
kernel builds them in (CONFIG_VFIO_GROUP, CONFIG_VFIO_CONTAINER and
CONFIG_VFIO_IOMMU_TYPE1 =y; no CONFIG_IOMMUFD_VFIO_CONTAINER, so the
container is container.c, not iommufd's emulation).

Container (K:container.c):

* ``/dev/vfio/vfio`` exists always and anyone may open it (mode 0666);
  every open is a new, empty container.
* GET_API_VERSION is 0; CHECK_EXTENSION before SET_IOMMU polls the type1
  driver with no instance (type1, type1v2 and UNMAP_ALL say 1; UPDATE_VADDR
  and DMA_CC 0, K:vfio_iommu_type1.c:2723-2744), after SET_IOMMU asks the
  instance (K:container.c:184-231).
* SET_IOMMU (K:container.c:260-325): EINVAL without a group or with a
  driver set already; a type no driver claims ENODEV; a claimed type type1
  does not open (UNMAP_ALL) EINVAL; then every group is attached.
* any other ioctl EINVAL before SET_IOMMU, then the driver's: type1 answers
  GET_INFO, MAP_DMA, UNMAP_DMA and ENOTTY for the rest
  (K:container.c:327-357, K:vfio_iommu_type1.c:3081-3100).

Group (K:group.c):

* the node exists while a vfio driver has a device of the IOMMU group;
  root only (0600). Opening it while it is open, or while a cdev of one of
  its devices is bound to an iommufd, is EBUSY (K:group.c:411-451); binding
  a cdev while the group is open is EBUSY too (``vfio_device_block_group``,
  K:group.c:384-400).
* GET_STATUS (K:group.c:325-362): argsz below 8 EINVAL; VIABLE when nothing
  owns the group's DMA (no kernel driver on a device of it, no iommufd),
  CONTAINER_SET|VIABLE once it has a container.
* SET_CONTAINER (K:group.c:107-161): a bad fd EBADF; a container set already
  EINVAL; then ``vfio_container_attach_group`` (K:container.c:416-466) claims
  the group's DMA (EPERM if anyone owns it) and, with the IOMMU set, attaches
  the group to it; an fd that is neither a container nor an iommufd is
  EBADFD. An iommufd as the container (``iommufd_vfio_compat_ioas_create``)
  is not modelled: EBADFD too in the fake.
* UNSET_CONTAINER (K:group.c:81-105): no container EINVAL, an open device
  EBUSY; detaching the last group drops the container's IOMMU.
* GET_DEVICE_FD (K:group.c:303-323): the name is the PCI address, optionally
  followed by `` vf_token=<uuid>`` (``vfio_pci_core_match``,
  K:drivers/vfio/pci/vfio_pci_core.c:2012-2061; EINVAL here: not a PF or VF,
  1919-2007); no device ENODEV; without a container, or before its
  SET_IOMMU, EINVAL (K:group.c:170-236, K:container.c:503-520). The fd is ``anon_inode:[vfio-device]``: the device
  ioctls of :mod:`.vfio` minus the cdev-only ones (BIND_IOMMUFD EINVAL,
  ATTACH/DETACH_IOMMUFD_PT ENOTTY; K:vfio_main.c:1369-1420).

type1 (K:vfio_iommu_type1.c), v1 or v2:

* attaching a group gives it a VT-d paging domain: without interrupt
  remapping EPERM (K:vfio_iommu_type1.c:2340-2345); an existing mapping
  outside the aperture or over a reserved region EINVAL
  (K:vfio_iommu_type1.c:2302-2315). The IOVA list is the aperture minus the
  reserved regions (the MSI window); page sizes are the domain's
  (K:vfio_iommu_type1.c:1247-1268).
* GET_INFO (K:vfio_iommu_type1.c:2836-2893): PGSIZES, and CAPS with the
  migration, DMA-avail and IOVA-range capabilities in that order; a short
  argsz gets the size needed.
* MAP_DMA (K:vfio_iommu_type1.c:1680-1801, 2895-2912): unknown flags,
  size 0, READ/WRITE together with VADDR (or neither), misalignment to the
  smallest page size EINVAL; wrap EOVERFLOW; an overlap EEXIST; no entry
  left (65535, ``dma_entry_limit``) ENOSPC; outside the IOVA list EINVAL;
  memory that cannot be pinned (not mapped, or read-only for a device
  write) EFAULT. VADDR re-sets the address of an invalidated mapping.
* UNMAP_DMA (K:vfio_iommu_type1.c:1391-1551, 2914-2965): v2 refuses to
  bisect a mapping (EINVAL), v1 unmaps only mappings starting inside the
  range; ALL with a non-zero iova/size EINVAL; VADDR invalidates instead of
  unmapping. The bytes unmapped are written back on success only.

Not modelled: VFIO_IOMMU_DIRTY_PAGES (ENOTTY in the fake), dirty bitmaps
on unmap (EINVAL: tracking can never be on), type1's own
``allow_unsafe_interrupts`` parameter, noiommu groups, and an iommufd used
as a group's container.
"""
from __future__ import annotations

import errno as E
import re
from typing import TYPE_CHECKING, Any

from .files import OpenFile
from .iommufd import MSI_WINDOW, Domain, IommufdFile
from .uaccess import PAGE_SIZE, U64_MAX, CData, IoctlArg, UserMemory, fail, offsetofend, sizeof

if TYPE_CHECKING:   # pragma: no cover
    from .boot import Boot
    from .pci import IommuGroup
    from .vfio import VfioDevice, VfioRegistry

VFIO_TYPE = 0x3B


def _io(n: int) -> int:
    return (VFIO_TYPE << 8) | (100 + n)


GET_API_VERSION, CHECK_EXTENSION, SET_IOMMU = _io(0), _io(1), _io(2)
GROUP_GET_STATUS, GROUP_SET_CONTAINER, GROUP_UNSET_CONTAINER, GROUP_GET_DEVICE_FD = _io(3), _io(4), _io(5), _io(6)
IOMMU_GET_INFO, IOMMU_MAP_DMA, IOMMU_UNMAP_DMA = _io(12), _io(13), _io(14)

TYPE1_IOMMU, TYPE1V2_IOMMU, DMA_CC_IOMMU, UNMAP_ALL, UPDATE_VADDR = 1, 3, 4, 9, 10
RESERVED_TYPE1_NESTING_IOMMU = 6
GROUP_FLAGS_VIABLE, GROUP_FLAGS_CONTAINER_SET = 1, 2
INFO_PGSIZES, INFO_CAPS = 1, 2
CAP_IOVA_RANGE, CAP_MIGRATION, CAP_DMA_AVAIL = 1, 2, 3
MAP_FLAG_READ, MAP_FLAG_WRITE, MAP_FLAG_VADDR = 1, 2, 4
UNMAP_FLAG_GET_DIRTY_BITMAP, UNMAP_FLAG_ALL, UNMAP_FLAG_VADDR = 1, 2, 4
DMA_ENTRY_LIMIT = 0xFFFF                        # U16_MAX (K:vfio_iommu_type1.c:59)
DIRTY_BITMAP_SIZE_MAX = ((1 << 31) - 1 + 63) // 64 * 8   # DIRTY_BITMAP_BYTES(INT_MAX)
PAGE_MASK = U64_MAX & ~(PAGE_SIZE - 1)
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def lowest_bit(n: int) -> int:
    return n & -n


# -- type1 -------------------------------------------------------------------------------------
class Dma:
    """``struct vfio_dma``."""

    def __init__(self, iova: int, size: int, vaddr: int, prot: int) -> None:
        self.iova = iova
        self.size = size
        self.vaddr = vaddr
        self.prot = prot
        self.vaddr_invalid = False

    @property
    def last(self) -> int:
        return self.iova + self.size - 1


class Type1:
    """``struct vfio_iommu`` of one container."""

    def __init__(self, boot: "Boot", iommu_type: int) -> None:
        self.boot = boot
        self.v2 = iommu_type in (TYPE1V2_IOMMU, RESERVED_TYPE1_NESTING_IOMMU)
        self.domains: dict[int, Domain] = {}        # IOMMU group number -> domain
        self.iova_list: list[tuple[int, int]] = []
        self.dmas: list[Dma] = []
        self.dma_avail = DMA_ENTRY_LIMIT
        self.pgsize_bitmap = PAGE_MASK
        self.vaddr_invalid_count = 0

    @staticmethod
    def check_extension(iommu: "Type1 | None", arg: int) -> int:
        if arg in (TYPE1_IOMMU, TYPE1V2_IOMMU, UNMAP_ALL):
            return 1
        if arg == UPDATE_VADDR:
            return 1 if iommu is not None else 0       # no emulated (mdev) groups
        if arg == DMA_CC_IOMMU:
            # every domain enforces cache coherency: VT-d's needs Snoop Control
            # in the ECAP (K:vfio_iommu_type1.c:2696-2711,
            # K:drivers/iommu/intel/iommu.c:3196-3210, 3232-3248)
            if iommu is None:
                return 0
            sc = bool(iommu.boot.iommu_caps.ecap >> 7 & 1)
            return 1 if not iommu.domains or sc else 0
        return 0

    # -- groups ------------------------------------------------------------------------------
    def attach_group(self, number: int) -> None:
        """``vfio_iommu_type1_attach_group`` (K:vfio_iommu_type1.c:2236-2426)."""
        if self.vaddr_invalid_count:
            fail(E.EBUSY)
        if number in self.domains:
            fail(E.EINVAL)
        domain = Domain(False, self.boot.iommu_caps.cap)
        if not self.boot.interrupt_remapping:
            fail(E.EPERM)
        start, end = domain.aperture_start, domain.aperture_end
        if any(d.iova < start or d.last > end for d in self.dmas):
            fail(E.EINVAL)                      # vfio_iommu_aper_conflict
        if any(d.iova <= MSI_WINDOW[1] and d.last >= MSI_WINDOW[0] for d in self.dmas):
            fail(E.EINVAL)                      # vfio_iommu_resv_conflict
        self.domains[number] = domain
        self._rebuild()

    def detach_group(self, number: int) -> None:
        self.domains.pop(number, None)
        self._rebuild()

    def _rebuild(self) -> None:
        """The IOVA list (aperture minus reserved regions) and page sizes."""
        if not self.domains:
            self.iova_list = []
            self.pgsize_bitmap = PAGE_MASK
            return
        start = max(d.aperture_start for d in self.domains.values())
        end = min(d.aperture_end for d in self.domains.values())
        out = []
        lo, hi = MSI_WINDOW
        if start < lo:
            out.append((start, min(end, lo - 1)))
        if end > hi:
            out.append((max(start, hi + 1), end))
        self.iova_list = out
        bitmap = U64_MAX
        for d in self.domains.values():
            bitmap &= d.pgsize_bitmap
        if bitmap & ~PAGE_MASK:
            bitmap = (bitmap & PAGE_MASK) | PAGE_SIZE
        self.pgsize_bitmap = bitmap

    def release(self) -> None:
        self.dmas.clear()
        self.domains.clear()

    # -- ioctls ------------------------------------------------------------------------------
    def ioctl(self, request: int, arg: IoctlArg) -> int:
        if request == IOMMU_GET_INFO:
            self.get_info(arg)
        elif request == IOMMU_MAP_DMA:
            self.map_dma(arg)
        elif request == IOMMU_UNMAP_DMA:
            self.unmap_dma(arg)
        else:
            fail(E.ENOTTY)          # incl. VFIO_IOMMU_DIRTY_PAGES: not modelled
        return 0

    def _caps(self) -> tuple[bytes, list[int]]:
        minimum = lowest_bit(self.pgsize_bitmap)
        migration = ((CAP_MIGRATION | (1 << 16)).to_bytes(4, "little") + bytes(4)
                     + bytes(8) + minimum.to_bytes(8, "little")
                     + DIRTY_BITMAP_SIZE_MAX.to_bytes(8, "little"))
        avail = ((CAP_DMA_AVAIL | (1 << 16)).to_bytes(4, "little") + bytes(4)
                 + self.dma_avail.to_bytes(4, "little") + bytes(4))        # 12, aligned to 16
        caps = [migration, avail]
        if self.iova_list:
            body = len(self.iova_list).to_bytes(4, "little") + bytes(4)
            for start, end in self.iova_list:
                body += start.to_bytes(8, "little") + end.to_bytes(8, "little")
            caps.append((CAP_IOVA_RANGE | (1 << 16)).to_bytes(4, "little") + bytes(4) + body)
        return b"".join(caps), [len(c) for c in caps]

    def get_info(self, arg: IoctlArg) -> None:
        struct = "struct vfio_iommu_type1_info"
        minsz = offsetofend(struct, "iova_pgsizes")
        cmd = arg.copy_from_user(struct, minsz)
        if cmd.argsz < minsz:
            fail(E.EINVAL)
        n = min(int(cmd.argsz), sizeof(struct))
        cmd.flags = INFO_PGSIZES | INFO_CAPS
        cmd.iova_pgsizes = self.pgsize_bitmap
        caps, sizes = self._caps()
        base = sizeof(struct)
        if cmd.argsz < base + len(caps):
            cmd.argsz = base + len(caps)
        else:
            chain = bytearray(caps)
            off = 0
            for i, size in enumerate(sizes):        # vfio_info_cap_shift: next offsets
                nxt = base + off + size if i + 1 < len(sizes) else 0
                chain[off + 4:off + 8] = nxt.to_bytes(4, "little")
                off += size
            arg.write(base, bytes(chain))
            cmd.cap_offset = base
        arg.copy_prefix_to_user(n)

    def _find(self, start: int, size: int) -> Dma | None:
        last = start + size - 1
        return next((d for d in self.dmas if d.iova <= last and d.last >= start), None)

    def map_dma(self, arg: IoctlArg) -> None:
        struct = "struct vfio_iommu_type1_dma_map"
        minsz = offsetofend(struct, "size")
        cmd = arg.copy_from_user(struct, minsz)
        flags = int(cmd.flags)
        if cmd.argsz < minsz or flags & ~(MAP_FLAG_READ | MAP_FLAG_WRITE | MAP_FLAG_VADDR):
            fail(E.EINVAL)
        iova, vaddr, size = int(cmd.iova), int(cmd.vaddr), int(cmd.size)
        set_vaddr = bool(flags & MAP_FLAG_VADDR)
        if not size:
            fail(E.EINVAL)
        if iova + size - 1 > U64_MAX or vaddr + size - 1 > U64_MAX:
            fail(E.EOVERFLOW)
        prot = flags & (MAP_FLAG_READ | MAP_FLAG_WRITE)
        if bool(prot) == set_vaddr:
            fail(E.EINVAL)
        pgsize = lowest_bit(self.pgsize_bitmap)
        if (size | iova | vaddr) & (pgsize - 1):
            fail(E.EINVAL)
        dma = self._find(iova, size)
        if set_vaddr:
            if dma is None:
                fail(E.ENOENT)
            if not dma.vaddr_invalid or dma.iova != iova or dma.size != size:
                fail(E.EINVAL)
            dma.vaddr = vaddr
            dma.vaddr_invalid = False
            self.vaddr_invalid_count -= 1
            return
        if dma is not None:
            fail(E.EEXIST)
        if not self.dma_avail:
            fail(E.ENOSPC)
        last = iova + size - 1
        if self.iova_list and not any(s <= iova and last <= e for s, e in self.iova_list):
            fail(E.EINVAL)
        if self.domains and not arg.mem.maps.accessible(vaddr, size, write=bool(prot & MAP_FLAG_WRITE)):
            fail(E.EFAULT)          # vfio_pin_map_dma could not pin the pages
        self.dmas.append(Dma(iova, size, vaddr, prot))
        self.dmas.sort(key=lambda d: d.iova)
        self.dma_avail -= 1

    def unmap_dma(self, arg: IoctlArg) -> None:
        struct = "struct vfio_iommu_type1_dma_unmap"
        minsz = offsetofend(struct, "size")
        cmd = arg.copy_from_user(struct, minsz)
        flags = int(cmd.flags)
        if cmd.argsz < minsz or flags & ~(UNMAP_FLAG_GET_DIRTY_BITMAP | UNMAP_FLAG_ALL | UNMAP_FLAG_VADDR):
            fail(E.EINVAL)
        if flags & UNMAP_FLAG_GET_DIRTY_BITMAP:
            fail(E.EINVAL)          # with ALL/VADDR, or dirty tracking is off
        iova, size = int(cmd.iova), int(cmd.size)
        unmap_all = bool(flags & UNMAP_FLAG_ALL)
        invalidate = bool(flags & UNMAP_FLAG_VADDR)
        pgsize = lowest_bit(self.pgsize_bitmap)
        if iova & (pgsize - 1):
            fail(E.EINVAL)
        if unmap_all:
            if iova or size:
                fail(E.EINVAL)
            end = U64_MAX
        else:
            if not size or size & (pgsize - 1):
                fail(E.EINVAL)
            end = iova + size - 1
            if end > U64_MAX:
                fail(E.EOVERFLOW)
        if self.v2 and not unmap_all:
            first = self._find(iova, 1)
            if first is not None and first.iova != iova:
                fail(E.EINVAL)
            tail = self._find(end, 1)
            if tail is not None and tail.last != end:
                fail(E.EINVAL)
        unmapped = 0
        touched: list[Dma] = []
        for dma in [d for d in self.dmas if d.last >= iova]:
            if dma.iova > end:
                break
            if not self.v2 and iova > dma.iova:
                break
            if invalidate:
                if dma.vaddr_invalid:
                    for t in touched:           # roll back
                        t.vaddr_invalid = False
                        self.vaddr_invalid_count -= 1
                    fail(E.EINVAL)
                dma.vaddr_invalid = True
                self.vaddr_invalid_count += 1
                touched.append(dma)
                unmapped += dma.size
                continue
            unmapped += dma.size
            self.dmas.remove(dma)
            if dma.vaddr_invalid:
                self.vaddr_invalid_count -= 1
            self.dma_avail += 1
        cmd.size = unmapped
        arg.copy_prefix_to_user(minsz)


# -- the container -------------------------------------------------------------------------------
class ContainerFile(OpenFile):
    """An open ``/dev/vfio/vfio`` (``struct vfio_container``). Groups set on
    it hold a kernel reference, like the container's kref."""

    kind = "vfio-container"
    path = "/dev/vfio/vfio"

    def __init__(self, boot: "Boot") -> None:
        super().__init__()
        self.boot = boot
        self.groups: list["VfioGroup"] = []
        self.iommu: Type1 | None = None

    def ioctl(self, fd: int, request: int, buf: Any, mem: UserMemory) -> int:
        request &= 0xffffffff
        if request in (GET_API_VERSION, CHECK_EXTENSION, SET_IOMMU):
            # by-value ioctls handed a buffer: the buffer's address is the value
            return self.ioctl_int(fd, request, IoctlArg(buf, mem).address)
        if self.iommu is None:
            fail(E.EINVAL)
        return self.iommu.ioctl(request, IoctlArg(buf, mem))

    def ioctl_int(self, fd: int, request: int, value: int) -> int:
        request &= 0xffffffff
        if request == GET_API_VERSION:
            return 0                            # VFIO_API_VERSION
        if request == CHECK_EXTENSION:
            return Type1.check_extension(self.iommu, value)
        if request == SET_IOMMU:
            return self.set_iommu(value)
        if self.iommu is None:
            fail(E.EINVAL)
        if request in (IOMMU_GET_INFO, IOMMU_MAP_DMA, IOMMU_UNMAP_DMA):
            fail(E.EFAULT)                      # a bogus pointer
        fail(E.ENOTTY)

    def set_iommu(self, value: int) -> int:
        """``vfio_ioctl_set_iommu`` with type1 as the only driver."""
        if not self.groups or self.iommu is not None:
            fail(E.EINVAL)
        if Type1.check_extension(None, value) <= 0:
            fail(E.ENODEV)
        if value not in (TYPE1_IOMMU, TYPE1V2_IOMMU, RESERVED_TYPE1_NESTING_IOMMU):
            fail(E.EINVAL)                      # vfio_iommu_type1_open
        iommu = Type1(self.boot, value)
        for group in self.groups:               # __vfio_container_attach_groups
            iommu.attach_group(group.number)
        self.iommu = iommu
        return 0

    def attach_group(self, group: "VfioGroup") -> None:
        """``vfio_container_attach_group`` (K:container.c:416-466)."""
        iommu_group = group.iommu_group
        assert iommu_group is not None      # an open group file: its devices are there
        iommu_group.claim_exclusive(group)            # EPERM
        if self.iommu is not None:
            try:
                self.iommu.attach_group(group.number)
            except BaseException:
                iommu_group.release(group)
                raise
        group.container = self
        group.container_users = 1
        self.groups.append(group)
        self.get()

    def detach_group(self, group: "VfioGroup") -> None:
        """``vfio_group_detach_container`` (K:container.c:468-501)."""
        if self.iommu is not None:
            self.iommu.detach_group(group.number)
        assert group.iommu_group is not None    # VfioGroup.remove() detaches before clearing it
        group.iommu_group.release(group)
        group.container = None
        group.container_users = 0
        if group in self.groups:
            self.groups.remove(group)
        if self.iommu is not None and not self.groups:
            self.iommu.release()                # the last group deprivileges it
            self.iommu = None
        self.put()


# -- groups --------------------------------------------------------------------------------------
class VfioGroup:
    """``struct vfio_group`` of one IOMMU group with vfio devices."""

    def __init__(self, registry: "VfioRegistry", iommu_group: IommuGroup) -> None:
        self.registry = registry
        self.iommu_group: IommuGroup | None = iommu_group     # None once the last device is gone
        self.number = iommu_group.number
        self.drivers = 0                        # registered vfio devices
        self.opened_file: "GroupFile | None" = None
        self.container: ContainerFile | None = None
        self.container_users = 0
        self.cdev_device_open_cnt = 0

    @property
    def path(self) -> str:
        return f"/dev/vfio/{self.number}"

    def devices(self) -> list["VfioDevice"]:
        return [v for v in self.registry.devices.values()
                if v.state.group is self.iommu_group and self.iommu_group is not None]

    def remove(self) -> None:
        """``vfio_device_remove_group`` of the last device (K:group.c:697-741)."""
        if self.container is not None:
            self.container.detach_group(self)
        self.iommu_group = None


class GroupFile(OpenFile):
    """An open ``/dev/vfio/<group>``."""

    kind = "vfio-group"

    def __init__(self, group: VfioGroup) -> None:
        super().__init__()
        self.group = group
        self.path = group.path

    @property
    def boot(self) -> "Boot":
        return self.group.registry.boot

    def release(self) -> None:
        group = self.group
        if group.container is not None:
            group.container.detach_group(group)
        if group.opened_file is self:
            group.opened_file = None

    def ioctl(self, fd: int, request: int, buf: Any, mem: UserMemory) -> int:
        request &= 0xffffffff
        arg = IoctlArg(buf, mem)
        if request == GROUP_GET_STATUS:
            self.get_status(arg)
            return 0
        if request == GROUP_SET_CONTAINER:
            self.set_container(int.from_bytes(arg.read(0, 4), "little", signed=True))
            return 0
        if request == GROUP_UNSET_CONTAINER:
            return self.ioctl_int(fd, request, 0)
        if request == GROUP_GET_DEVICE_FD:
            raw = arg.read(0, arg.length)
            if b"\0" not in raw:
                fail(E.EFAULT if arg.length < PAGE_SIZE else E.EINVAL)     # strndup_user
            return self.get_device_fd(raw.split(b"\0", 1)[0])
        fail(E.ENOTTY)

    def ioctl_int(self, fd: int, request: int, value: int) -> int:
        request &= 0xffffffff
        if request == GROUP_UNSET_CONTAINER:
            self.unset_container()
            return 0
        if request in (GROUP_GET_STATUS, GROUP_SET_CONTAINER, GROUP_GET_DEVICE_FD):
            fail(E.EFAULT)                      # a bogus pointer
        fail(E.ENOTTY)

    def get_status(self, arg: IoctlArg) -> None:
        struct = "struct vfio_group_status"
        minsz = offsetofend(struct, "flags")
        cmd = arg.copy_from_user(struct, minsz)
        if cmd.argsz < minsz:
            fail(E.EINVAL)
        group = self.group
        if group.iommu_group is None:
            fail(E.ENODEV)
        flags = 0
        if group.container is not None:
            flags = GROUP_FLAGS_CONTAINER_SET | GROUP_FLAGS_VIABLE
        elif not group.iommu_group.owner_cnt:       # iommu_group_dma_owner_claimed
            flags = GROUP_FLAGS_VIABLE
        cmd.flags = flags
        arg.copy_prefix_to_user(minsz)

    def set_container(self, cfd: int) -> None:
        file = self.boot.table.get(cfd)             # EBADF
        group = self.group
        if group.container is not None:
            fail(E.EINVAL)
        if group.iommu_group is None:
            fail(E.ENODEV)
        if isinstance(file, ContainerFile):
            file.attach_group(group)
            return
        if isinstance(file, IommufdFile):
            fail(E.EBADFD)          # iommufd_vfio_compat_ioas_create: not modelled
        fail(E.EBADFD)

    def unset_container(self) -> None:
        group = self.group
        if group.container is None:
            fail(E.EINVAL)
        if group.container_users != 1:
            fail(E.EBUSY)
        group.container.detach_group(group)

    def get_device_fd(self, name: bytes) -> int:
        vdev = self._match(name.decode(errors="replace"))
        if vdev is None:
            fail(E.ENODEV)
        group = self.group
        # vfio_df_group_open
        if group.container is None:
            fail(E.EINVAL)
        if vdev.bound_file is not None:
            fail(E.EINVAL)          # vfio_df_open: a cdev has it (unreachable: the group is open)
        if not vdev.group_opens:
            if group.container.iommu is None:
                fail(E.EINVAL)      # vfio_group_use_container: no SET_IOMMU yet
            self.get()
            group.container_users += 1
        vdev.group_opens += 1
        from .vfio import VfioCdevFile
        file = VfioCdevFile(vdev, "anon_inode:[vfio-device]", group_file=self)
        file.access_granted = True
        vdev.files.add(file)
        table = self.boot.table
        fd = table.install(file, table.placeholder("[vfio-device]"))
        return fd

    def _match(self, name: str) -> "VfioDevice | None":
        """``vfio_pci_core_match`` over the group's devices
        (K:drivers/vfio/pci/vfio_pci_core.c:2012-2061)."""
        for vdev in self.group.devices():
            bdf = vdev.hw.bdf
            if not name.startswith(bdf):
                continue
            rest = name[len(bdf):]
            if rest and rest[0] != " ":
                continue
            token = False
            i = 0
            while i < len(rest):
                if rest[i] == " ":
                    i += 1
                    continue
                if not token and rest.startswith("vf_token=", i):
                    i += len("vf_token=")
                    if len(rest) - i < 36 or not UUID_RE.match(rest[i:]):
                        fail(E.EINVAL)
                    token = True
                    i += 36
                else:
                    fail(E.EINVAL)              # unknown or duplicate option
            if token:
                fail(E.EINVAL)                  # not a PF or VF
            return vdev
        return None


def open_container(boot: "Boot") -> ContainerFile:
    return ContainerFile(boot)


def open_group(registry: "VfioRegistry", number: int) -> GroupFile:
    """``vfio_group_fops_open`` (K:group.c:411-451)."""
    group = registry.groups.get(number)
    if group is None or group.iommu_group is None or not group.drivers:
        fail(E.ENODEV)
    if group.cdev_device_open_cnt or group.opened_file is not None:
        fail(E.EBUSY)
    file = GroupFile(group)
    group.opened_file = file
    return file


__all__ = ["ContainerFile", "GroupFile", "Type1", "VfioGroup", "open_container", "open_group"]
