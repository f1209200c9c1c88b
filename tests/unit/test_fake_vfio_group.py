"""The fake kernel's legacy VFIO API: /dev/vfio/vfio, /dev/vfio/<group> and
type1 (drivers/vfio/container.c, group.c, vfio_iommu_type1.c of 7.3)."""
import errno
import mmap

import pytest

from pyiommufd import ioctl, pci
from pyiommufd._uapi import ffi
from pyiommufd.backend import use
from pyiommufd_testing import FakeKernel, FakePciDevice
from pyiommufd.vfio import VfioContainer, VfioDevice, VfioGroup

BDF = "0000:00:03.0"
C = ioctl.const
TYPE1, TYPE1V2, NOIOMMU, UNMAP_ALL, UPDATE_VADDR, DMA_CC, SPAPR = 1, 3, 8, 9, 10, 4, 2

API_VERSION = ioctl.define("VFIO_GET_API_VERSION", None, "vfio", arg=ioctl.ARG_NONE)
CHECK_EXT = ioctl.define("VFIO_CHECK_EXTENSION", None, "vfio", arg=ioctl.ARG_VALUE)
SET_IOMMU = ioctl.define("VFIO_SET_IOMMU", None, "vfio", arg=ioctl.ARG_VALUE)
STATUS = ioctl.define("VFIO_GROUP_GET_STATUS", "struct vfio_group_status", "vfio")
UNSET = ioctl.define("VFIO_GROUP_UNSET_CONTAINER", None, "vfio", arg=ioctl.ARG_NONE)
INFO = ioctl.define("VFIO_IOMMU_GET_INFO", "struct vfio_iommu_type1_info", "vfio")
MAP = ioctl.define("VFIO_IOMMU_MAP_DMA", "struct vfio_iommu_type1_dma_map", "vfio")
UNMAP = ioctl.define("VFIO_IOMMU_UNMAP_DMA", "struct vfio_iommu_type1_dma_unmap", "vfio")
DEV_INFO = ioctl.define("VFIO_DEVICE_GET_INFO", "struct vfio_device_info", "vfio")
BIND = ioctl.define("VFIO_DEVICE_BIND_IOMMUFD", "struct vfio_device_bind_iommufd", "vfio")
ATTACH = ioctl.define("VFIO_DEVICE_ATTACH_IOMMUFD_PT", "struct vfio_device_attach_iommufd_pt", "vfio")
RW = 3


def err(fn, *args, **kw):
    with pytest.raises(OSError) as exc:
        fn(*args, **kw)
    return exc.value.errno


def set_container(k, group_fd, cfd):
    k.ioctl(group_fd, C("VFIO_GROUP_SET_CONTAINER"), ffi.buffer(ffi.new("int32_t *", cfd)))


def get_device_fd(k, group_fd, name):
    return k.ioctl(group_fd, C("VFIO_GROUP_GET_DEVICE_FD"), ffi.buffer(ffi.new("char[]", name.encode())))


def status(k, group_fd):
    return int(ioctl.call(k, group_fd, STATUS).flags)


def dma_map(k, cfd, buf, iova, flags=RW, size=None):
    addr = int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
    return ioctl.call(k, cfd, MAP, flags=flags, vaddr=addr, iova=iova,
                      size=len(buf) if size is None else size)


def dma_unmap(k, cfd, iova, size, flags=0):
    return int(ioctl.call(k, cfd, UNMAP, flags=flags, iova=iova, size=size).size)


@pytest.fixture
def on_vfio(fake_kernel):
    pci.PciDevice(BDF).bind_vfio()
    return fake_kernel


@pytest.fixture
def legacy(on_vfio):
    """(kernel, container fd, group fd) with the group on a type1v2 container."""
    k = on_vfio
    cfd, gfd = k.open("/dev/vfio/vfio"), k.open("/dev/vfio/3")
    set_container(k, gfd, cfd)
    ioctl.call(k, cfd, SET_IOMMU, value=TYPE1V2)
    return k, cfd, gfd


# -- nodes ------------------------------------------------------------------------------------
def test_group_node_exists_while_a_device_is_on_vfio_pci(fake_kernel):
    k = fake_kernel
    assert k.files.listdir("/dev/vfio") == ["devices", "vfio"]
    assert err(k.open, "/dev/vfio/3") == errno.ENOENT
    binding = pci.PciDevice(BDF).bind_vfio()
    assert k.files.listdir("/dev/vfio") == ["3", "devices", "vfio"]
    gfd = k.open("/dev/vfio/3")
    assert k.files.readlink(f"/proc/self/fd/{gfd}") == "/dev/vfio/3"
    binding.restore()                                    # the last device goes: the group dies
    assert "3" not in k.files.listdir("/dev/vfio")
    assert err(ioctl.call, k, gfd, STATUS) == errno.ENODEV
    k.close(gfd)


def test_the_container_is_for_everyone_the_group_for_root():
    with FakeKernel(euid=1000, devices=[FakePciDevice(driver="vfio-pci")]) as k, use(k):
        cfd = k.open("/dev/vfio/vfio")
        assert k.files.readlink(f"/proc/self/fd/{cfd}") == "/dev/vfio/vfio"
        assert ioctl.call(k, cfd, API_VERSION) == 0
        assert err(k.open, "/dev/vfio/3") == errno.EACCES


def test_a_group_opens_once(on_vfio):
    k = on_vfio
    gfd = k.open("/dev/vfio/3")
    assert err(k.open, "/dev/vfio/3") == errno.EBUSY
    assert err(k.open, f"/proc/self/fd/{gfd}") == errno.EBUSY
    k.close(gfd)
    k.close(k.open("/dev/vfio/3"))


def test_group_and_bound_cdev_exclude_each_other(on_vfio, kt):
    k = on_vfio
    cdev, iommufd = kt.cdev(), kt.iommufd()
    gfd = k.open("/dev/vfio/3")
    assert err(kt.bind, cdev, iommufd) == errno.EBUSY        # vfio_device_block_group
    k.close(gfd)
    kt.bind(cdev, iommufd)
    assert err(k.open, "/dev/vfio/3") == errno.EBUSY         # cdev_device_open_cnt
    k.close(cdev)
    k.close(k.open("/dev/vfio/3"))


# -- container ioctls ------------------------------------------------------------------------------
def test_container_extensions_and_set_iommu_rules(on_vfio):
    k = on_vfio
    cfd = k.open("/dev/vfio/vfio")
    assert ioctl.call(k, cfd, API_VERSION) == 0
    exts = {e: ioctl.call(k, cfd, CHECK_EXT, value=e) for e in (TYPE1, TYPE1V2, UNMAP_ALL, UPDATE_VADDR,
                                                              DMA_CC, NOIOMMU, SPAPR)}
    assert exts == {TYPE1: 1, TYPE1V2: 1, UNMAP_ALL: 1, UPDATE_VADDR: 0, DMA_CC: 0, NOIOMMU: 0, SPAPR: 0}
    assert err(ioctl.call, k, cfd, SET_IOMMU, value=TYPE1V2) == errno.EINVAL     # no group yet
    assert err(ioctl.call, k, cfd, INFO) == errno.EINVAL                         # no IOMMU yet
    gfd = k.open("/dev/vfio/3")
    set_container(k, gfd, cfd)
    assert err(ioctl.call, k, cfd, SET_IOMMU, value=SPAPR) == errno.ENODEV      # nobody offers it
    assert err(ioctl.call, k, cfd, SET_IOMMU, value=UNMAP_ALL) == errno.EINVAL  # type1 cannot open it
    ioctl.call(k, cfd, SET_IOMMU, value=TYPE1V2)
    assert err(ioctl.call, k, cfd, SET_IOMMU, value=TYPE1V2) == errno.EINVAL    # set already
    assert ioctl.call(k, cfd, CHECK_EXT, value=UPDATE_VADDR) == 1
    assert ioctl.call(k, cfd, CHECK_EXT, value=DMA_CC) == 0                     # QEMU's VT-d: no SC
    assert err(k.ioctl, cfd, ioctl.IO(0x3B, 100 + 30), bytearray(16)) == errno.ENOTTY
    k.close(gfd)                                      # the last group deprivileges the container
    assert ioctl.call(k, cfd, CHECK_EXT, value=UPDATE_VADDR) == 0
    assert err(ioctl.call, k, cfd, INFO) == errno.EINVAL


def test_set_iommu_without_interrupt_remapping_is_eperm():
    with FakeKernel(interrupt_remapping=False, devices=[FakePciDevice(driver="vfio-pci")]) as k, use(k):
        cfd, gfd = k.open("/dev/vfio/vfio"), k.open("/dev/vfio/3")
        set_container(k, gfd, cfd)
        assert err(ioctl.call, k, cfd, SET_IOMMU, value=TYPE1V2) == errno.EPERM


# -- group ioctls --------------------------------------------------------------------------------------
def test_group_status_and_set_container(on_vfio):
    k = on_vfio
    gfd, cfd = k.open("/dev/vfio/3"), k.open("/dev/vfio/vfio")
    assert status(k, gfd) == 1                                          # VIABLE
    with pytest.raises(OSError) as exc:
        ioctl.call(k, gfd, STATUS, argsz=4)
    assert exc.value.errno == errno.EINVAL
    assert err(ioctl.call, k, gfd, UNSET) == errno.EINVAL              # no container
    assert err(set_container, k, gfd, 9999) == errno.EBADF
    memfd = k.memfd_create("not-a-container", 0)
    assert err(set_container, k, gfd, memfd) == errno.EBADFD
    set_container(k, gfd, cfd)
    assert status(k, gfd) == 3                                          # CONTAINER_SET | VIABLE
    assert err(set_container, k, gfd, cfd) == errno.EINVAL             # set already
    ioctl.call(k, gfd, UNSET)
    assert status(k, gfd) == 1


def test_a_group_shared_with_a_kernel_driver_is_not_viable():
    devices = [FakePciDevice(bdf=BDF, iommu_group=3),
               FakePciDevice(bdf="0000:00:04.0", iommu_group=3)]
    with FakeKernel(devices=devices) as k, use(k):
        pci.PciDevice(BDF).bind_vfio()                  # 00:04.0 stays on virtio-pci
        gfd, cfd = k.open("/dev/vfio/3"), k.open("/dev/vfio/vfio")
        assert status(k, gfd) == 0
        assert err(set_container, k, gfd, cfd) == errno.EPERM
        pci.PciDevice("0000:00:04.0").bind_vfio()
        assert status(k, gfd) == 1
        set_container(k, gfd, cfd)
        # the group's DMA is owned now: a kernel driver cannot take a device of it
        k.files.write_text("/sys/bus/pci/drivers/vfio-pci/unbind", "0000:00:04.0")
        k.files.write_text("/sys/bus/pci/devices/0000:00:04.0/driver_override", "")
        assert err(k.files.write_text, "/sys/bus/pci/drivers/virtio-pci/bind", "0000:00:04.0") == errno.EBUSY


def test_get_device_fd(legacy):
    k, cfd, gfd = legacy
    assert err(get_device_fd, k, gfd, "0000:00:09.0") == errno.ENODEV
    assert err(get_device_fd, k, gfd, BDF + "x") == errno.ENODEV          # not a word boundary
    assert err(get_device_fd, k, gfd, BDF + " spam") == errno.EINVAL
    assert err(get_device_fd, k, gfd, BDF + " vf_token=1234") == errno.EINVAL
    token = " vf_token=bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3"
    assert err(get_device_fd, k, gfd, BDF + token) == errno.EINVAL          # not a PF or VF
    dfd = get_device_fd(k, gfd, BDF)
    assert k.files.readlink(f"/proc/self/fd/{dfd}") == "anon_inode:[vfio-device]"
    assert ioctl.call(k, dfd, DEV_INFO).num_regions == 9
    assert k.pread(dfd, 2, 7 << 40) == b"\xf4\x1a"
    again = get_device_fd(k, gfd, BDF)                    # the group path opens a device twice
    assert err(ioctl.call, k, dfd, BIND, iommufd=k.open("/dev/iommu")) == errno.EINVAL
    assert err(ioctl.call, k, dfd, ATTACH, pt_id=1) == errno.ENOTTY
    assert err(ioctl.call, k, gfd, UNSET) == errno.EBUSY              # a device is open
    assert err(k.files.write_text, "/sys/bus/pci/drivers/vfio-pci/unbind", BDF) == errno.EBUSY
    k.close(dfd)
    k.close(again)
    ioctl.call(k, gfd, UNSET)


def test_get_device_fd_needs_the_container_iommu(on_vfio):
    k = on_vfio
    gfd, cfd = k.open("/dev/vfio/3"), k.open("/dev/vfio/vfio")
    assert err(get_device_fd, k, gfd, BDF) == errno.EINVAL               # no container
    set_container(k, gfd, cfd)
    assert err(get_device_fd, k, gfd, BDF) == errno.EINVAL               # no SET_IOMMU
    ioctl.call(k, cfd, SET_IOMMU, value=TYPE1)
    k.close(get_device_fd(k, gfd, BDF))


def test_device_fds_keep_the_group_and_container_alive(legacy):
    k, cfd, gfd = legacy
    dfd = get_device_fd(k, gfd, BDF)
    k.close(gfd)
    k.close(cfd)
    assert ioctl.call(k, dfd, DEV_INFO).num_irqs == 5
    assert err(k.open, "/dev/vfio/3") == errno.EBUSY       # still open through the device
    k.close(dfd)
    k.close(k.open("/dev/vfio/3"))


def test_the_library_on_the_legacy_api(on_vfio):
    with VfioContainer.open() as container, VfioGroup.open(3) as group:
        assert group.status().viable and not group.status().container_set
        group.set_container(container)
        container.set_iommu("type1v2")
        info = container.iommu_info()
        assert info.iova_ranges == [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)]
        assert info.dma_avail == 0xFFFF
        buf = mmap.mmap(-1, 4 * 4096)
        assert container.map_dma(buf, 0x100000) == 0x100000
        assert container.iommu_info().dma_avail == 0xFFFE
        assert container.unmap_dma(0x100000, 4 * 4096) == 4 * 4096
        with group.get_device_fd(BDF) as dev:
            assert isinstance(dev, VfioDevice) and dev.info().is_pci


# -- type1 -----------------------------------------------------------------------------------------------
def test_type1_get_info(legacy):
    k, cfd, _ = legacy
    arg = ioctl.call(k, cfd, INFO)
    assert arg.flags == 3 and arg.iova_pgsizes == (1 << 12) | (1 << 21) | (1 << 30)
    assert arg.argsz == 24 + 32 + 16 + 16 + 2 * 16 and arg.cap_offset == 0
    arg, reply = ioctl.call_with_caps(k, cfd, INFO)
    caps = list(ioctl.walk_caps(reply, arg.cap_offset))
    assert [(c.id, c.version) for c in caps] == [(2, 1), (3, 1), (1, 1)]   # migration, avail, ranges
    migration = caps[0].data
    assert int.from_bytes(migration[16:24], "little") == 4096
    with pytest.raises(OSError) as exc:
        ioctl.call(k, cfd, INFO, argsz=8)
    assert exc.value.errno == errno.EINVAL


def test_type1_map_rules(legacy):
    k, cfd, _ = legacy
    buf = mmap.mmap(-1, 8 * 4096)
    dma_map(k, cfd, buf, 0x100000)
    assert err(dma_map, k, cfd, buf, 0x104000) == errno.EEXIST
    assert err(dma_map, k, cfd, buf, 0x200800) == errno.EINVAL            # misaligned iova
    assert err(dma_map, k, cfd, buf, 0x300000, size=0) == errno.EINVAL
    assert err(dma_map, k, cfd, buf, 0x300000, flags=0) == errno.EINVAL   # neither READ nor WRITE
    assert err(dma_map, k, cfd, buf, 0x300000, flags=RW | 4) == errno.EINVAL   # RW with VADDR
    assert err(dma_map, k, cfd, buf, 0x300000, flags=8) == errno.EINVAL
    assert err(dma_map, k, cfd, buf, 0xFEE00000) == errno.EINVAL         # the MSI window
    assert err(dma_map, k, cfd, buf, 1 << 39) == errno.EINVAL            # past the aperture
    assert err(dma_map, k, cfd, buf, (1 << 64) - 4096) == errno.EOVERFLOW
    readonly = mmap.mmap(-1, 4096, prot=mmap.PROT_READ)
    assert err(dma_map, k, cfd, readonly, 0x400000) == errno.EFAULT      # device writes, RO memory
    dma_map(k, cfd, readonly, 0x400000, flags=1)                          # READ only: fine
    with pytest.raises(OSError) as exc:
        ioctl.call(k, cfd, MAP, flags=RW, vaddr=0x1000, iova=0x500000, size=4096)
    assert exc.value.errno == errno.EFAULT                                # nothing mapped there


def test_type1v2_unmap_rules(legacy):
    k, cfd, _ = legacy
    buf = mmap.mmap(-1, 4 * 4096)
    dma_map(k, cfd, buf, 0x100000)
    dma_map(k, cfd, buf, 0x200000)
    assert dma_unmap(k, cfd, 0x800000, 4096) == 0                         # nothing there
    assert err(dma_unmap, k, cfd, 0x101000, 4096) == errno.EINVAL        # bisects
    assert err(dma_unmap, k, cfd, 0x100000, 4096) == errno.EINVAL
    assert err(dma_unmap, k, cfd, 0x100000, 0) == errno.EINVAL
    assert err(dma_unmap, k, cfd, 0x100800, 4096) == errno.EINVAL
    assert err(dma_unmap, k, cfd, 0x100000, 4096, flags=2) == errno.EINVAL   # ALL with a range
    assert err(dma_unmap, k, cfd, 0, 0, flags=1) == errno.EINVAL          # no dirty tracking
    assert dma_unmap(k, cfd, 0, 0x1000000) == 8 * 4096                    # covers both
    dma_map(k, cfd, buf, 0x100000)
    assert dma_unmap(k, cfd, 0, 0, flags=2) == 4 * 4096                  # UNMAP_ALL


def test_type1v1_unmap_of_an_offset_unmaps_nothing(on_vfio):
    k = on_vfio
    cfd, gfd = k.open("/dev/vfio/vfio"), k.open("/dev/vfio/3")
    set_container(k, gfd, cfd)
    ioctl.call(k, cfd, SET_IOMMU, value=TYPE1)
    buf = mmap.mmap(-1, 4 * 4096)
    dma_map(k, cfd, buf, 0x100000)
    assert dma_unmap(k, cfd, 0x101000, 4096) == 0
    assert dma_unmap(k, cfd, 0x100000, 4096) == 4 * 4096                  # the first iova: all of it


def test_type1_vaddr_update(legacy):
    k, cfd, _ = legacy
    old, new = mmap.mmap(-1, 4096), mmap.mmap(-1, 4096)
    dma_map(k, cfd, old, 0x100000)
    assert err(dma_map, k, cfd, new, 0x100000, flags=4) == errno.EINVAL   # still valid
    assert dma_unmap(k, cfd, 0x100000, 4096, flags=4) == 4096             # invalidate the vaddr
    assert err(dma_unmap, k, cfd, 0x100000, 4096, flags=4) == errno.EINVAL
    assert err(dma_map, k, cfd, new, 0x200000, flags=4) == errno.ENOENT
    dma_map(k, cfd, new, 0x100000, flags=4)
    assert dma_unmap(k, cfd, 0x100000, 4096) == 4096


def test_a_second_group_joins_a_container_with_its_iommu_set():
    devices = [FakePciDevice(bdf=BDF, iommu_group=3, driver="vfio-pci"),
               FakePciDevice(bdf="0000:00:04.0", iommu_group=4, driver="vfio-pci")]
    with FakeKernel(devices=devices) as k, use(k):
        cfd, g3, g4 = k.open("/dev/vfio/vfio"), k.open("/dev/vfio/3"), k.open("/dev/vfio/4")
        set_container(k, g3, cfd)
        ioctl.call(k, cfd, SET_IOMMU, value=TYPE1V2)
        set_container(k, g4, cfd)                          # attached to the IOMMU right away
        assert status(k, g4) == 3
        k.close(get_device_fd(k, g4, "0000:00:04.0"))
        ioctl.call(k, g3, UNSET)
        assert ioctl.call(k, cfd, INFO).flags == 3         # g4 still holds the IOMMU
        ioctl.call(k, g4, UNSET)
        assert err(ioctl.call, k, cfd, INFO) == errno.EINVAL
