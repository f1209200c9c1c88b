"""VFIO device cdevs ``/dev/vfio/devices/vfioN`` of vfio-pci devices
(K:drivers/vfio/device_cdev.c, vfio_main.c, iommufd.c,
K:drivers/vfio/pci/vfio_pci_core.c, vfio_pci_intrs.c, vfio_pci_config.c).

Rules:

* the cdev exists while vfio-pci is bound; opening it never conflicts, but
  everything except ``VFIO_DEVICE_BIND_IOMMUFD`` is EINVAL until this open
  file is bound (K:vfio_main.c:1377-1382), and so are read/write.
* BIND_IOMMUFD (K:device_cdev.c:92-180): ``argsz`` below
  offsetofend(out_devid) EINVAL, bytes past the struct must be zero (E2BIG);
  a negative fd or unknown flags EINVAL; this file bound already EINVAL; the
  device bound through another open file EINVAL (K:vfio_main.c:610-611);
  ``FLAG_TOKEN`` on a device without a VF token EINVAL; a bad fd EBADF, not
  an iommufd EBADFD; then iommufd's bind (K:drivers/iommu/iommufd/device.c:225-276): no
  interrupt remapping EPERM (unless allow_unsafe_interrupts), the group's
  DMA owned by someone else EPERM (after kexec: a device preserved with
  IOMMU state, the series' cover letter: what Phase 1 restores after the kexec, S1:4441-4444).
* ATTACH/DETACH_IOMMUFD_PT (K:device_cdev.c:203-303): argsz below minsz or
  unknown flags EINVAL; with ``VFIO_DEVICE_ATTACH_PASID`` the argsz must
  reach ``pasid``. A second RID attach is a replace.
* GET_INFO (with ``FakePciDevice(atomic_ops=...)`` an AtomicOps capability)
  and GET_REGION_INFO (the MSI-X BAR carries
  ``VFIO_REGION_INFO_CAP_MSIX_MAPPABLE``) extend ``argsz`` and chain
  capabilities like VFIO (K:vfio_pci_core.c:1073-1128, K:vfio_main.c:1324-1366);
  GET_IRQ_INFO, SET_IRQS
  (eventfd triggers; DATA_NONE/BOOL loopback signals the eventfd), RESET
  (EINVAL without reset support), DEVICE_FEATURE (probe semantics of
  ``vfio_check_feature``; migration and dirty logging ENOTTY for plain
  vfio-pci), unknown ioctls ENOTTY.
* read/write at ``index << 40``: config space (EFAULT past cfg_size),
  BARs (EINVAL past the end, short reads at the end).
* the ROM region (K:vfio_pci_core.c:1166-1196): readable and the size of
  the ROM BAR when ``pci_map_rom`` finds a valid image in it, else size 0
  and no flags; reads (K:vfio_pci_rdwr.c:201-240) are EINVAL without a ROM
  BAR or past its end, ENOMEM without a valid image, 0xff past the image;
  writes EINVAL (K:vfio_pci_core.c:1657-1662); no mmap.
* closing the last bound file (``vfio_pci_core_disable``,
  K:vfio_pci_core.c:764-806): a device with a reset method is reset; one
  without (QEMU's virtio-net) only gets its saved config space back, BAR
  contents stay.

The legacy group/container API is :mod:`.vfio_group`; a device fd from
``VFIO_GROUP_GET_DEVICE_FD`` is a :class:`VfioCdevFile` with ``group_file``
set (``df->group``). Not modelled: hot reset (ENODEV: the fake
device has no resettable slot or bus), ioeventfds, dma-buf export (GET of
``VFIO_DEVICE_FEATURE_DMA_BUF`` is EOPNOTSUPP; PROBE works).
"""
from __future__ import annotations

import errno as E
import mmap as _mmap
import os
from typing import TYPE_CHECKING, Any, cast

from .files import OpenFile
from .iommufd import IOMMU_NO_PASID, Device, Hwpt, IommufdFile
from .pci import BAR0, BAR5, CONFIG, INTX, MSIX, ERR, REQ, NUM_IRQS, NUM_REGIONS, ROM, DeviceState, \
    FakePciDevice, IommuGroup
from .uaccess import U32_MAX, CData, IoctlArg, UserMemory, fail, offsetofend, sizeof

if TYPE_CHECKING:   # pragma: no cover
    from .boot import Boot
    from .vfio_group import GroupFile, VfioGroup

# what one PASID of an IOMMU group is attached to: the HWPT and the devices using it
GroupAttach = tuple[Hwpt, set[Device]]

VFIO_TYPE = 0x3B


def _io(n: int) -> int:
    return (VFIO_TYPE << 8) | (100 + n)


GET_INFO, GET_REGION_INFO, GET_IRQ_INFO, SET_IRQS, RESET = _io(7), _io(8), _io(9), _io(10), _io(11)
GET_PCI_HOT_RESET_INFO, PCI_HOT_RESET, IOEVENTFD = _io(12), _io(13), _io(16)
DEVICE_FEATURE, BIND_IOMMUFD, ATTACH_IOMMUFD_PT, DETACH_IOMMUFD_PT = _io(17), _io(18), _io(19), _io(20)

DEVICE_FLAGS_RESET, DEVICE_FLAGS_PCI, DEVICE_FLAGS_CAPS = 1, 2, 1 << 7
REGION_FLAG_READ, REGION_FLAG_WRITE, REGION_FLAG_MMAP, REGION_FLAG_CAPS = 1, 2, 4, 8
REGION_INFO_CAP_MSIX_MAPPABLE = 3
DEVICE_INFO_CAP_PCI_ATOMIC_COMP = 5
IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE, IRQ_INFO_AUTOMASKED, IRQ_INFO_NORESIZE = 1, 2, 4, 8
IRQ_SET_DATA_NONE, IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD = 1, 2, 4
IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_UNMASK, IRQ_SET_ACTION_TRIGGER = 8, 16, 32
IRQ_SET_DATA_TYPE_MASK = 7
IRQ_SET_ACTION_TYPE_MASK = 56
FEATURE_MASK, FEATURE_GET, FEATURE_SET, FEATURE_PROBE = 0xffff, 1 << 16, 1 << 17, 1 << 18
BIND_FLAG_TOKEN = 1
ATTACH_PASID = 1
INDEX_SHIFT = 40
OFFSET_MASK = (1 << INDEX_SHIFT) - 1
IRQ_NONE = NUM_IRQS


class EventFile(OpenFile):
    """A real eventfd (created through the backend or adopted)."""

    kind = "eventfd"
    path = "anon_inode:[eventfd]"

    def signal(self) -> None:
        os.eventfd_write(self.kfd, 1)

    def read(self, fd: int, length: int) -> bytes:
        return os.read(fd, length)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)


class VfioDevice:
    """``struct vfio_device`` of a vfio-pci bound function."""

    def __init__(self, registry: "VfioRegistry", state: DeviceState, index: int) -> None:
        self.registry = registry
        self.state = state
        self.index = index
        self.files: set["VfioCdevFile"] = set()
        self.bound_file: "VfioCdevFile | None" = None        # open_count == 1
        self.idev: Device | None = None
        self.iommufd_attached = False
        self.pasids: set[int] = set()
        self.irq_type = IRQ_NONE
        self.triggers: dict[int, dict[int, EventFile]] = {}
        self.intx_masked = False
        self.group_opens = 0            # open_count through the group path

    def close_device(self) -> None:
        """``vfio_pci_core_close_device`` -> ``vfio_pci_core_disable``."""
        self.disable_irqs()
        if self.hw.reset_works:
            self.hw.reset()
        else:
            self.hw.restore_config()

    @property
    def hw(self) -> FakePciDevice:
        return self.state.hw

    @property
    def path(self) -> str:
        return f"/dev/vfio/devices/vfio{self.index}"

    def irq_count(self, index: int) -> int:
        return int(self.hw.irq_counts.get(index, 0))

    def irqs_enabled(self) -> bool:
        return self.irq_type != IRQ_NONE

    def disable_irqs(self) -> None:
        for vectors in self.triggers.values():
            for ev in vectors.values():
                ev.put()
        self.triggers.clear()
        self.irq_type = IRQ_NONE


class VfioRegistry:
    """vfio-pci devices of one boot, and IOMMU group attachments."""

    def __init__(self, boot: "Boot") -> None:
        self.boot = boot
        self.devices: dict[int, VfioDevice] = {}
        self._group_attach: dict[int, dict[int, GroupAttach]] = {}
        #: legacy VFIO groups by IOMMU group number (:mod:`.vfio_group`)
        self.groups: dict[int, VfioGroup] = {}

    def register(self, state: DeviceState) -> None:
        from .vfio_group import VfioGroup
        index = 0
        while index in self.devices:
            index += 1
        self.devices[index] = VfioDevice(self, state, index)
        # vfio_device_set_group -> vfio_group_find_or_alloc (K:group.c:638-695)
        group = self.groups.get(state.group.number)
        if group is None or group.iommu_group is None:
            group = self.groups[state.group.number] = VfioGroup(self, state.group)
        group.drivers += 1

    def unregister(self, state: DeviceState) -> None:
        for index, vdev in list(self.devices.items()):
            if vdev.state is state:
                if vdev.files:
                    fail(E.EBUSY)
                del self.devices[index]
                group = self.groups.get(state.group.number)
                if group is not None and group.iommu_group is not None:
                    group.drivers -= 1
                    if not group.drivers:       # vfio_device_remove_group (K:group.c:697-741)
                        group.remove()
                        del self.groups[state.group.number]

    def vfio_group(self, state: DeviceState) -> VfioGroup | None:
        group = self.groups.get(state.group.number)
        return group if group is not None and group.iommu_group is not None else None

    def by_state(self, state: DeviceState) -> VfioDevice | None:
        return next((v for v in self.devices.values() if v.state is state), None)

    def by_bdf(self, bdf: str) -> VfioDevice | None:
        return next((v for v in self.devices.values() if v.hw.bdf == bdf), None)

    def by_path(self, path: str) -> VfioDevice | None:
        return next((v for v in self.devices.values() if v.path == path), None)

    def group_attach(self, group: IommuGroup) -> dict[int, GroupAttach]:
        return self._group_attach.setdefault(group.number, {})

    def open_cdev(self, vdev: VfioDevice, path: str | None = None) -> "VfioCdevFile":
        file = VfioCdevFile(vdev, path or vdev.path)
        vdev.files.add(file)
        return file


class VfioCdevFile(OpenFile):
    """``struct vfio_device_file`` of a cdev open (or of a LUO retrieve)."""

    kind = "vfio-cdev"

    def __init__(self, vdev: VfioDevice, path: str, group_file: GroupFile | None = None) -> None:
        super().__init__()
        self.vdev = vdev
        self.path = path
        self.access_granted = False
        self.iommufd: IommufdFile | None = None
        self.devid = 0
        #: the group file for a VFIO_GROUP_GET_DEVICE_FD fd (``df->group``)
        self.group_file = group_file

    @property
    def boot(self) -> "Boot":
        return self.vdev.registry.boot

    # -- lifetime -------------------------------------------------------------------------
    def release(self) -> None:
        if self.group_file is not None:
            self.group_close()
        else:
            self.unbind()
        self.vdev.files.discard(self)

    def group_close(self) -> None:
        """``vfio_df_group_close``: the last close of the device closes it and
        stops using the group's container (K:group.c:238-253, K:vfio_main.c:582-597,
        K:group.c:774-785, K:container.c:522-529)."""
        vdev = self.vdev
        self.access_granted = False
        vdev.group_opens -= 1
        if vdev.group_opens:
            return
        vdev.close_device()
        gfile, self.group_file = self.group_file, None
        assert gfile is not None        # a group close is of a group-opened device
        gfile.group.container_users -= 1
        gfile.put()

    def unbind(self) -> None:
        """``vfio_df_unbind_iommufd`` + ``close_device``."""
        if not self.access_granted:
            return
        vdev = self.vdev
        ctx = self.iommufd.ctx if self.iommufd else None
        if ctx is not None and vdev.idev is not None:
            for pasid in sorted(vdev.pasids):
                ctx.hwpt_detach(vdev.idev, pasid)
            vdev.pasids.clear()
            if vdev.iommufd_attached:
                ctx.hwpt_detach(vdev.idev, IOMMU_NO_PASID)
                vdev.iommufd_attached = False
            vdev.idev.unbind()
            vdev.idev = None
        vdev.close_device()
        vdev.bound_file = None
        group = self.vdev.registry.vfio_group(vdev.state)
        if group is not None:
            group.cdev_device_open_cnt -= 1          # vfio_device_unblock_group
        self.access_granted = False
        if self.iommufd is not None:
            self.iommufd.put()
            self.iommufd = None

    # -- ioctls -----------------------------------------------------------------------------
    def ioctl(self, fd: int, request: int, buf: Any, mem: UserMemory) -> int:
        request &= 0xffffffff
        arg = IoctlArg(buf, mem)
        if request == BIND_IOMMUFD:
            return self.bind(arg)
        if not self.access_granted:
            fail(E.EINVAL)
        handlers = {
            DEVICE_FEATURE: self.feature, GET_REGION_INFO: self.region_info,
            GET_INFO: self.get_info, GET_IRQ_INFO: self.irq_info, SET_IRQS: self.set_irqs,
            RESET: self.reset, GET_PCI_HOT_RESET_INFO: self.hot_reset,
            PCI_HOT_RESET: self.hot_reset, IOEVENTFD: self.ioeventfd,
        }
        if self.group_file is None:     # cdev-only ioctls (K:vfio_main.c:1388-1399)
            handlers.update({ATTACH_IOMMUFD_PT: self.attach_pt, DETACH_IOMMUFD_PT: self.detach_pt})
        handler = handlers.get(request)
        if handler is None:
            fail(E.ENOTTY)
        handler(arg)
        return 0

    def ioctl_int(self, fd: int, request: int, value: int) -> int:
        request &= 0xffffffff
        if request == RESET and self.access_granted:
            self.reset(None)
            return 0
        if self.group_file is not None and request in (ATTACH_IOMMUFD_PT, DETACH_IOMMUFD_PT):
            fail(E.ENOTTY)
        if request in (BIND_IOMMUFD, ATTACH_IOMMUFD_PT, DETACH_IOMMUFD_PT, GET_INFO,
                       GET_REGION_INFO, GET_IRQ_INFO, SET_IRQS, DEVICE_FEATURE):
            fail(E.EFAULT if self.access_granted or request == BIND_IOMMUFD else E.EINVAL)
        if not self.access_granted:
            fail(E.EINVAL)
        fail(E.ENOTTY)

    def bind(self, arg: IoctlArg) -> int:
        struct = "struct vfio_device_bind_iommufd"
        user_size = arg.get_u32(0)
        if user_size < offsetofend(struct, "out_devid"):
            fail(E.EINVAL)
        cmd = arg.copy_struct_from_user(struct, user_size)
        if cmd.iommufd < 0 or cmd.flags & ~BIND_FLAG_TOKEN:
            fail(E.EINVAL)
        if self.group_file is not None:
            fail(E.EINVAL)          # BIND_IOMMUFD only for cdev fds (K:device_cdev.c:117-119)
        vdev = self.vdev
        group = self.vdev.registry.vfio_group(vdev.state)
        if group is not None and group.opened_file is not None:
            fail(E.EBUSY)           # vfio_device_block_group (K:group.c:384-400)
        if self.access_granted:
            fail(E.EINVAL)
        if cmd.flags & BIND_FLAG_TOKEN:
            arg.mem.read(int(cmd.token_uuid_ptr), 16)           # EFAULT first
            fail(E.EINVAL)          # not a PF with a VF token, not a VF
        file = self.boot.table.get(int(cmd.iommufd))            # EBADF
        if not isinstance(file, IommufdFile):
            fail(E.EBADFD)
        if vdev.bound_file is not None or vdev.group_opens:
            fail(E.EINVAL)          # vfio_df_open: cdev opens are exclusive
        ctx = file.ctx
        # iommufd_device_bind -> iommufd_bind_iommu
        if not self.boot.interrupt_remapping and not self.boot.allow_unsafe_interrupts:
            fail(E.EPERM)
        vdev.state.group.claim(ctx)                            # EPERM
        idev = Device(ctx, vdev)
        ctx.alloc(idev)
        idev.users = 2          # the binding driver is a user until unbind
        vdev.idev = idev
        vdev.bound_file = self
        self.iommufd = file.get()
        self.devid = idev.id
        self.access_granted = True
        if group is not None:
            group.cdev_device_open_cnt += 1
        cmd.out_devid = idev.id
        try:
            arg.copy_field_to_user("out_devid")
        except OSError:
            self.unbind()
            raise
        return 0

    def attach_pt(self, arg: IoctlArg) -> None:
        struct = "struct vfio_device_attach_iommufd_pt"
        minsz = offsetofend(struct, "pt_id")
        cmd = arg.copy_from_user(struct, minsz)
        if cmd.argsz < minsz or cmd.flags & ~ATTACH_PASID:
            fail(E.EINVAL)
        pasid = IOMMU_NO_PASID
        if cmd.flags & ATTACH_PASID:
            xend = offsetofend(struct, "pasid")
            if cmd.argsz < xend:
                fail(E.EINVAL)
            arg.copy_more_from_user(minsz, xend)
            pasid = int(cmd.pasid)
        vdev = self.vdev
        assert self.iommufd is not None and vdev.idev is not None     # bound: checked by ioctl()
        ctx = self.iommufd.ctx
        if pasid == IOMMU_NO_PASID:
            cmd.pt_id = ctx.device_attach(vdev.idev, pasid, int(cmd.pt_id), vdev.iommufd_attached)
            vdev.iommufd_attached = True
        else:
            replace = pasid in vdev.pasids
            cmd.pt_id = ctx.device_attach(vdev.idev, pasid, int(cmd.pt_id), replace)
            vdev.pasids.add(pasid)
        arg.copy_field_to_user("pt_id")

    def detach_pt(self, arg: IoctlArg) -> None:
        struct = "struct vfio_device_detach_iommufd_pt"
        minsz = offsetofend(struct, "flags")
        cmd = arg.copy_from_user(struct, minsz)
        if cmd.argsz < minsz or cmd.flags & ~ATTACH_PASID:
            fail(E.EINVAL)
        vdev = self.vdev
        assert self.iommufd is not None     # a cdev with access is bound: checked by ioctl()
        ctx = self.iommufd.ctx
        if cmd.flags & ATTACH_PASID:
            xend = offsetofend(struct, "pasid")
            if cmd.argsz < xend:
                fail(E.EINVAL)
            arg.copy_more_from_user(minsz, xend)
            pasid = int(cmd.pasid)
            if pasid in vdev.pasids:        # attached: bound, idev set
                ctx.hwpt_detach(cast(Device, vdev.idev), pasid)
                vdev.pasids.discard(pasid)
        elif vdev.iommufd_attached:
            ctx.hwpt_detach(cast(Device, vdev.idev), IOMMU_NO_PASID)
            vdev.iommufd_attached = False

    def get_info(self, arg: IoctlArg) -> None:
        struct = "struct vfio_device_info"
        minsz = offsetofend(struct, "num_irqs")
        cmd = arg.copy_from_user(struct, minsz)
        if cmd.argsz < minsz:
            fail(E.EINVAL)
        n = min(int(cmd.argsz), sizeof(struct))
        hw = self.vdev.hw
        cmd.flags = DEVICE_FLAGS_PCI | (DEVICE_FLAGS_RESET if hw.reset_works else 0)
        cmd.num_regions = NUM_REGIONS
        cmd.num_irqs = NUM_IRQS
        caps = b""
        if hw.atomic_ops:
            # struct vfio_device_info_cap_pci_atomic_comp
            caps = (DEVICE_INFO_CAP_PCI_ATOMIC_COMP.to_bytes(2, "little") + (1).to_bytes(2, "little")
                    + bytes(4) + hw.atomic_ops.to_bytes(4, "little") + bytes(4))
        if caps:
            cmd.flags |= DEVICE_FLAGS_CAPS
            base = sizeof(struct)
            if cmd.argsz < base + len(caps):
                cmd.argsz = base + len(caps)
            else:
                arg.write(base, caps)
                cmd.cap_offset = base
        arg.copy_prefix_to_user(n)

    def region_info(self, arg: IoctlArg) -> None:
        struct = "struct vfio_region_info"
        minsz = offsetofend(struct, "offset")
        cmd = arg.copy_from_user(struct, minsz)
        if cmd.argsz < minsz:
            fail(E.EINVAL)
        hw = self.vdev.hw
        index = int(cmd.index)
        caps = b""
        cmd.cap_offset = 0
        if index == CONFIG:
            cmd.offset, cmd.size = index << INDEX_SHIFT, hw.cfg_size
            cmd.flags = REGION_FLAG_READ | REGION_FLAG_WRITE
        elif BAR0 <= index <= BAR5:
            size = hw.region_sizes.get(index, 0)
            cmd.offset, cmd.size = index << INDEX_SHIFT, size
            if not size:
                cmd.flags = 0
            else:
                cmd.flags = REGION_FLAG_READ | REGION_FLAG_WRITE
                if size >= 4096:
                    cmd.flags |= REGION_FLAG_MMAP
                    if index == self.msix_bar():
                        # struct vfio_info_cap_header {id, version, next}
                        caps = (REGION_INFO_CAP_MSIX_MAPPABLE.to_bytes(2, "little")
                                + (1).to_bytes(2, "little") + bytes(4))
        elif index == ROM:
            cmd.offset, cmd.size, cmd.flags = index << INDEX_SHIFT, 0, 0
            if hw.rom_len():            # "Report the BAR size, not the ROM size."
                cmd.size, cmd.flags = hw.rom_size, REGION_FLAG_READ
        else:       # no VGA, no device-specific regions
            fail(E.EINVAL)
        if caps:
            cmd.flags |= REGION_FLAG_CAPS
            base = sizeof(struct)
            if cmd.argsz < base + len(caps):
                cmd.argsz = base + len(caps)
                cmd.cap_offset = 0
            else:
                arg.write(base, caps)
                cmd.cap_offset = base
        arg.copy_prefix_to_user(minsz)

    def msix_bar(self) -> int | None:
        hw = self.vdev.hw
        if not hw.irq_counts.get(MSIX):
            return None
        bar = hw.msix_bar
        if bar is not None:
            return bar
        return min(hw.region_sizes) if hw.region_sizes else None

    def irq_info(self, arg: IoctlArg) -> None:
        struct = "struct vfio_irq_info"
        minsz = offsetofend(struct, "count")
        cmd = arg.copy_from_user(struct, minsz)
        if cmd.argsz < minsz or cmd.index >= NUM_IRQS:
            fail(E.EINVAL)
        cmd.flags = IRQ_INFO_EVENTFD
        cmd.count = self.vdev.irq_count(int(cmd.index))
        if cmd.index == INTX:
            cmd.flags |= IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED
        elif cmd.index != MSIX:
            cmd.flags |= IRQ_INFO_NORESIZE
        arg.copy_prefix_to_user(minsz)

    def _eventfd(self, fd: int) -> EventFile:
        file = self.boot.table.get(fd)          # EBADF
        if not isinstance(file, EventFile):
            fail(E.EINVAL)
        return file

    def set_irqs(self, arg: IoctlArg) -> None:
        struct = "struct vfio_irq_set"
        minsz = offsetofend(struct, "count")
        cmd = arg.copy_from_user(struct, minsz)
        vdev = self.vdev
        index, start, count, flags = int(cmd.index), int(cmd.start), int(cmd.count), int(cmd.flags)
        # vfio_set_irqs_validate_and_prepare (K:vfio_main.c:1659-1704)
        if (cmd.argsz < minsz or index >= NUM_IRQS or count >= U32_MAX - start
                or flags & ~(IRQ_SET_DATA_TYPE_MASK | IRQ_SET_ACTION_TYPE_MASK)):
            fail(E.EINVAL)
        nirqs = vdev.irq_count(index)
        if start >= nirqs or start + count > nirqs:
            fail(E.EINVAL)
        dtype = flags & IRQ_SET_DATA_TYPE_MASK
        size = {IRQ_SET_DATA_NONE: 0, IRQ_SET_DATA_BOOL: 1, IRQ_SET_DATA_EVENTFD: 4}.get(dtype)
        if size is None:
            fail(E.EINVAL)
        data = b""
        if size:
            if cmd.argsz - minsz < count * size:
                fail(E.EINVAL)
            data = arg.read(minsz, count * size)
        action = flags & IRQ_SET_ACTION_TYPE_MASK
        if index == INTX and action in (IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_UNMASK):
            if vdev.irq_type == INTX and count:
                vdev.intx_masked = action == IRQ_SET_ACTION_MASK
            return
        if action != IRQ_SET_ACTION_TRIGGER:
            fail(E.ENOTTY)
        if index in (ERR, REQ):
            self._set_single(index, count, dtype, data)
        elif index == INTX:
            self._set_intx(start, count, dtype, data)
        else:
            self._set_msi(index, start, count, dtype, data)

    def _fds(self, data: bytes) -> list[int]:
        return [int.from_bytes(data[i:i + 4], "little", signed=True) for i in range(0, len(data), 4)]

    def _set_single(self, index: int, count: int, dtype: int, data: bytes) -> None:
        vectors = self.vdev.triggers.setdefault(index, {})
        cur = vectors.get(0)
        if dtype == IRQ_SET_DATA_NONE:
            if cur is None:
                fail(E.EINVAL)
            if count:
                cur.signal()
            else:
                vectors.pop(0).put()
        elif dtype == IRQ_SET_DATA_BOOL:
            if not count:
                fail(E.EINVAL)
            if data[0] and cur is not None:
                cur.signal()
        else:
            if count != 1:
                fail(E.EINVAL)
            fd = self._fds(data)[0]
            new = self._eventfd(fd).get() if fd >= 0 else None
            if cur is not None:
                vectors.pop(0).put()
            if new is not None:
                vectors[0] = new

    def _set_intx(self, start: int, count: int, dtype: int, data: bytes) -> None:
        vdev = self.vdev
        if vdev.irq_type == INTX and not count and dtype == IRQ_SET_DATA_NONE:
            vdev.disable_irqs()
            return
        if vdev.irq_type not in (INTX, IRQ_NONE) or start != 0 or count != 1:
            fail(E.EINVAL)
        if dtype == IRQ_SET_DATA_EVENTFD:
            fd = self._fds(data)[0]
            new = self._eventfd(fd).get() if fd >= 0 else None
            vectors = vdev.triggers.setdefault(INTX, {})
            if 0 in vectors:
                vectors.pop(0).put()
            if new is not None:
                vectors[0] = new
            vdev.irq_type = INTX
            return
        if vdev.irq_type != INTX:
            fail(E.EINVAL)
        if (dtype == IRQ_SET_DATA_NONE or data[0]) and 0 in vdev.triggers.get(INTX, {}):
            vdev.triggers[INTX][0].signal()

    def _set_msi(self, index: int, start: int, count: int, dtype: int, data: bytes) -> None:
        vdev = self.vdev
        if vdev.irq_type == index and not count and dtype == IRQ_SET_DATA_NONE:
            vdev.disable_irqs()
            return
        if vdev.irq_type not in (index, IRQ_NONE):
            fail(E.EINVAL)
        if dtype == IRQ_SET_DATA_EVENTFD:
            fds = self._fds(data)
            files = [self._eventfd(fd) if fd >= 0 else None for fd in fds]
            vectors = vdev.triggers.setdefault(index, {})
            for i, ev in enumerate(files):
                old = vectors.pop(start + i, None)
                if old is not None:
                    old.put()
                if ev is not None:
                    vectors[start + i] = ev.get()
            vdev.irq_type = index
            return
        if vdev.irq_type != index:
            fail(E.EINVAL)
        vectors = vdev.triggers.get(index, {})
        for i in range(start, start + count):
            ev = vectors.get(i)
            if ev is None:
                continue
            if dtype == IRQ_SET_DATA_NONE or data[i - start]:
                ev.signal()

    def reset(self, arg: IoctlArg | None) -> None:
        if not self.vdev.hw.reset_works:
            fail(E.EINVAL)
        self.vdev.hw.reset()

    def hot_reset(self, arg: IoctlArg) -> None:
        minsz = 12      # argsz, flags, count
        raw = arg.read(0, minsz)
        if int.from_bytes(raw[:4], "little") < minsz:
            fail(E.EINVAL)
        fail(E.ENODEV)

    def ioeventfd(self, arg: IoctlArg) -> None:
        fail(E.EOPNOTSUPP)

    def feature(self, arg: IoctlArg) -> None:
        struct = "struct vfio_device_feature"
        minsz = offsetofend(struct, "flags")
        cmd = arg.copy_from_user(struct, minsz)
        argsz, flags = int(cmd.argsz), int(cmd.flags)
        if argsz < minsz:
            fail(E.EINVAL)
        if flags & ~(FEATURE_MASK | FEATURE_SET | FEATURE_GET | FEATURE_PROBE):
            fail(E.EINVAL)
        if not flags & FEATURE_PROBE and flags & FEATURE_SET and flags & FEATURE_GET:
            fail(E.EINVAL)
        feature = flags & FEATURE_MASK
        datasz = argsz - minsz

        def check(supported: int, min_data: int) -> bool:
            # vfio_check_feature: True means "execute"
            if (flags & (FEATURE_GET | FEATURE_SET)) & ~supported:
                fail(E.EINVAL)
            if flags & FEATURE_PROBE:
                return False
            if not flags & (FEATURE_GET | FEATURE_SET):
                fail(E.EINVAL)
            if datasz < min_data:
                fail(E.EINVAL)
            return True

        if feature in (3, 5):                   # LOW_POWER_ENTRY / _EXIT
            check(FEATURE_SET, 0)
        elif feature == 4:                      # LOW_POWER_ENTRY_WITH_WAKEUP
            if check(FEATURE_SET, 8):
                self._eventfd(int.from_bytes(arg.read(minsz, 4), "little", signed=True))
        elif feature == 11:                     # DMA_BUF
            if check(FEATURE_GET, 16):
                fail(E.EOPNOTSUPP)
        else:
            # PCI_VF_TOKEN without SR-IOV, migration and dirty logging without
            # a variant driver, ZPCI_ERROR off s390, BUS_MASTER (not vfio-pci)
            fail(E.ENOTTY)

    # -- region access ------------------------------------------------------------------------
    def _region(self, offset: int) -> tuple[int, int]:
        if not self.access_granted:
            fail(E.EINVAL)
        index = offset >> INDEX_SHIFT
        if index >= NUM_REGIONS:
            fail(E.EINVAL)
        return index, offset & OFFSET_MASK

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        index, pos = self._region(offset)
        hw = self.vdev.hw
        if index == CONFIG:
            if pos >= hw.cfg_size or pos + length > hw.cfg_size:
                fail(E.EFAULT)
            return bytes(hw.config[pos:pos + length])
        if BAR0 <= index <= BAR5 and index in hw.region_sizes:
            bar = hw.bar(index)
            if pos >= len(bar):
                fail(E.EINVAL)
            return bytes(bar[pos:pos + length])
        if index == ROM and hw.rom_size:
            if pos >= hw.rom_size:
                fail(E.EINVAL)
            if not hw.rom_len():
                fail(E.ENOMEM)          # pci_map_rom found no image
            return hw.read_rom(pos, min(length, hw.rom_size - pos))
        fail(E.EINVAL)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        index, pos = self._region(offset)
        hw = self.vdev.hw
        if index == CONFIG:
            if pos >= hw.cfg_size or pos + len(data) > hw.cfg_size:
                fail(E.EFAULT)
            # only the command register is writable in the fake's virtual config
            for i, byte in enumerate(data):
                if pos + i in (4, 5):
                    hw.config[pos + i] = byte
            return len(data)
        if BAR0 <= index <= BAR5 and index in hw.region_sizes:
            bar = hw.bar(index)
            if pos >= len(bar):
                fail(E.EINVAL)
            n = min(len(data), len(bar) - pos)
            bar[pos:pos + n] = data[:n]
            return n
        fail(E.EINVAL)

    def read(self, fd: int, length: int) -> bytes:
        if not self.access_granted:
            fail(E.EINVAL)
        data = self.pread(fd, length, self.pos)
        self.pos += len(data)
        return data

    def write(self, fd: int, data: bytes) -> int:
        if not self.access_granted:
            fail(E.EINVAL)
        n = self.pwrite(fd, data, self.pos)
        self.pos += n
        return n

    def mmap(self, fd: int, length: int, offset: int, prot: int) -> _mmap.mmap:
        index, pos = self._region(offset)
        hw = self.vdev.hw
        if not (BAR0 <= index <= BAR5) or hw.region_sizes.get(index, 0) < 4096:
            fail(E.EINVAL)
        if pos + length > hw.region_sizes[index]:
            fail(E.EINVAL)
        m = _mmap.mmap(-1, length, prot=prot)
        m.write(bytes(hw.bar(index)[pos:pos + length]))
        m.seek(0)
        return m
