"""VFIO device cdevs of the fake kernel (7.3 semantics)."""
import errno
import os

import pytest

from pyiommufd import errors, ioctl
from pyiommufd._uapi import ffi
from pyiommufd.backend import use
from pyiommufd_testing import FakeKernel, FakePciDevice

CONFIG_OFFSET = 7 << 40


@pytest.fixture
def cdev(fake_kernel, kt):
    kt.vfio_pci()
    return kt.cdev()


@pytest.fixture
def bound(fake_kernel, kt, cdev):
    iommufd = kt.iommufd()
    return cdev, iommufd, kt.bind(cdev, iommufd)


def test_cdev_exists_only_with_vfio_pci(fake_kernel, kt):
    assert not fake_kernel.files.exists("/dev/vfio/devices/vfio0")
    with pytest.raises(FileNotFoundError):
        fake_kernel.open("/dev/vfio/devices/vfio0")
    kt.vfio_pci()
    assert fake_kernel.files.listdir("/dev/vfio/devices") == ["vfio0"]
    assert fake_kernel.files.readlink(f"/proc/self/fd/{kt.cdev()}") == "/dev/vfio/devices/vfio0"


def test_everything_but_bind_is_einval_before_bind(fake_kernel, kt, cdev):
    for idef in (kt.D.GET_INFO, kt.D.ATTACH, kt.D.REGION_INFO, kt.D.FEATURE):
        with pytest.raises(errors.InvalidArgument):
            ioctl.call(fake_kernel, cdev, idef)
    with pytest.raises(OSError) as exc:
        fake_kernel.pread(cdev, 4, CONFIG_OFFSET)
    assert exc.value.errno == errno.EINVAL


def test_bind(fake_kernel, kt, cdev):
    iommufd = kt.iommufd()
    devid = kt.bind(cdev, iommufd)
    assert devid == 1
    with pytest.raises(errors.InvalidArgument):         # this file is bound already
        kt.bind(cdev, iommufd)
    with pytest.raises(errors.InvalidArgument):         # the device is, through another open
        kt.bind(kt.cdev(), kt.iommufd())


def test_bind_argument_checks(fake_kernel, kt, cdev):
    iommufd = kt.iommufd()
    arg = ioctl.new(kt.D.BIND, iommufd=iommufd)
    arg.argsz = 12
    with pytest.raises(OSError) as exc:
        fake_kernel.ioctl(cdev, kt.D.BIND.request, ioctl.buffer_of(arg, 24))
    assert exc.value.errno == errno.EINVAL
    arg = ioctl.new(kt.D.BIND, extra=8, iommufd=iommufd)
    buf = ioctl.buffer_of(arg)
    buf[25] = b"\x01"
    with pytest.raises(OSError) as exc:
        fake_kernel.ioctl(cdev, kt.D.BIND.request, buf)
    assert exc.value.errno == errno.E2BIG
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, cdev, kt.D.BIND, iommufd=-1)
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, cdev, kt.D.BIND, iommufd=iommufd, flags=2)
    with pytest.raises(errors.BadFd):
        ioctl.call(fake_kernel, cdev, kt.D.BIND, iommufd=9999)
    with pytest.raises(OSError) as exc:
        ioctl.call(fake_kernel, cdev, kt.D.BIND, iommufd=kt.memfd())
    assert exc.value.errno == errno.EBADFD
    with pytest.raises(errors.InvalidArgument):         # no VF token on this device
        token = ffi.new("uint8_t[16]")
        ioctl.call(fake_kernel, cdev, kt.D.BIND, iommufd=iommufd, flags=1,
                   token_uuid_ptr=int(ffi.cast("uintptr_t", token)))


def test_bind_needs_interrupt_remapping(kt):
    with FakeKernel(interrupt_remapping=False) as k, use(k):
        t = type(kt)(k)
        t.vfio_pci()
        cdev = t.cdev()
        with pytest.raises(errors.PermissionDenied):
            t.bind(cdev, t.iommufd())
        k.files.write_text("/sys/module/iommufd/parameters/allow_unsafe_interrupts", "1")
        t.bind(cdev, t.iommufd())


def test_group_dma_owned_by_another_iommufd(kt):
    devices = [FakePciDevice(bdf="0000:00:03.0", iommu_group=3),
               FakePciDevice(bdf="0000:00:04.0", iommu_group=3)]
    with FakeKernel(devices=devices) as k, use(k):
        t = type(kt)(k)
        t.vfio_pci("0000:00:03.0")
        t.vfio_pci("0000:00:04.0")
        t.bind(t.cdev("/dev/vfio/devices/vfio0"), t.iommufd())
        with pytest.raises(errors.PermissionDenied):
            t.bind(t.cdev("/dev/vfio/devices/vfio1"), t.iommufd())


def test_closing_the_cdev_unbinds(fake_kernel, kt, bound):
    cdev, iommufd, devid = bound
    fake_kernel.close(cdev)
    assert kt.ioas(iommufd) == devid        # the device object is gone, its id free again
    assert kt.bind(kt.cdev(), iommufd) == devid + 1


def test_attach_detach(fake_kernel, kt, bound):
    cdev, iommufd, devid = bound
    ioas = kt.ioas(iommufd)
    auto = kt.attach(cdev, ioas)            # an automatic domain
    assert auto != ioas
    hwpt = kt.hwpt(iommufd, devid, ioas)
    assert kt.attach(cdev, hwpt) == hwpt    # replace; the auto domain dies
    with pytest.raises(errors.NotFound):
        kt.destroy(iommufd, auto)
    kt.detach(cdev)
    kt.detach(cdev)                         # detaching twice is harmless
    kt.destroy(iommufd, hwpt)


def test_attach_argument_checks(fake_kernel, kt, bound):
    cdev, iommufd, devid = bound
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, cdev, kt.D.ATTACH, flags=4, pt_id=1)
    with pytest.raises(errors.NotFound):
        kt.attach(cdev, 42)
    with pytest.raises(errors.InvalidArgument):
        kt.attach(cdev, devid)              # not a page table
    arg = ioctl.new(kt.D.ATTACH, flags=1, pt_id=1, pasid=1)
    arg.argsz = 12                          # PASID needs argsz to cover it
    with pytest.raises(OSError) as exc:
        fake_kernel.ioctl(cdev, kt.D.ATTACH.request, ioctl.buffer_of(arg, 16))
    assert exc.value.errno == errno.EINVAL


def test_pasid_attach_needs_pasid_capable_hwpt_and_device(fake_kernel, kt, bound):
    cdev, iommufd, devid = bound
    ioas = kt.ioas(iommufd)
    hwpt = kt.hwpt(iommufd, devid, ioas)
    with pytest.raises(errors.InvalidArgument):         # HWPT not allocated with ALLOC_PASID
        kt.attach(cdev, hwpt, pasid=1)
    pasid_hwpt = kt.hwpt(iommufd, devid, ioas, flags=8)
    with pytest.raises(errors.InvalidArgument):         # the device has no PASID support
        kt.attach(cdev, pasid_hwpt, pasid=1)


def test_pasid_attach_on_a_pasid_device(kt):
    with FakeKernel(devices=[FakePciDevice(max_pasids=1 << 20)]) as k, use(k):
        t = type(kt)(k)
        t.vfio_pci()
        cdev, iommufd = t.cdev(), t.iommufd()
        devid = t.bind(cdev, iommufd)
        hwpt = t.hwpt(iommufd, devid, t.ioas(iommufd), flags=8)
        assert t.attach(cdev, hwpt, pasid=5) == hwpt
        info = ioctl.call(k, iommufd, t.D.HW_INFO, dev_id=devid)
        assert info.out_max_pasid_log2 == 20
        ioctl.call(k, cdev, t.D.DETACH, flags=1, pasid=5)


def test_get_info_and_regions(fake_kernel, kt, bound):
    cdev, _, _ = bound
    info = ioctl.call(fake_kernel, cdev, kt.D.GET_INFO)
    # QEMU's virtio-net-pci: PCI, no reset method
    assert info.flags == 2 and info.num_regions == 9 and info.num_irqs == 5
    cfg = ioctl.call(fake_kernel, cdev, kt.D.REGION_INFO, index=7)
    assert cfg.size == 256 and cfg.offset == CONFIG_OFFSET and cfg.flags == 3
    rom = ioctl.call(fake_kernel, cdev, kt.D.REGION_INFO, index=6)
    assert rom.size == 256 * 1024 and rom.offset == 6 << 40 and rom.flags == 1
    assert ioctl.call(fake_kernel, cdev, kt.D.REGION_INFO, index=0).size == 0
    assert ioctl.call(fake_kernel, cdev, kt.D.REGION_INFO, index=4).flags == 7
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, cdev, kt.D.REGION_INFO, index=8)       # no VGA
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, cdev, kt.D.REGION_INFO, index=9)


def test_device_info_capability_chain(kt):
    with FakeKernel(devices=[FakePciDevice(atomic_ops=0x3)]) as k, use(k):
        t = type(kt)(k)
        t.vfio_pci()
        cdev = t.cdev()
        t.bind(cdev, t.iommufd())
        arg = ioctl.call(k, cdev, t.D.GET_INFO)
        assert arg.flags & 0x80 and arg.argsz == 24 + 16 and arg.cap_offset == 0
        arg, reply = ioctl.call_with_caps(k, cdev, t.D.GET_INFO)
        (cap,) = ioctl.walk_caps(reply, arg.cap_offset)
        assert cap.id == 5 and int.from_bytes(cap.data[8:12], "little") == 0x3


def test_region_capability_chain(fake_kernel, kt, bound):
    """The MSI-X BAR (BAR1) carries MSIX_MAPPABLE; argsz grows like VFIO's."""
    cdev, _, _ = bound
    arg = ioctl.call(fake_kernel, cdev, kt.D.REGION_INFO, index=1)
    assert arg.flags & 8 and arg.argsz == 32 + 8 and arg.cap_offset == 0
    arg, reply = ioctl.call_with_caps(fake_kernel, cdev, kt.D.REGION_INFO, index=1)
    caps = list(ioctl.walk_caps(reply, arg.cap_offset))
    assert [(c.id, c.version) for c in caps] == [(3, 1)]


def test_config_space_read(fake_kernel, kt, bound):
    cdev, _, _ = bound
    ids = fake_kernel.pread(cdev, 4, CONFIG_OFFSET)
    assert ids == bytes.fromhex("f41a4110")         # 1af4:1041, little endian
    with pytest.raises(OSError) as exc:
        fake_kernel.pread(cdev, 8, CONFIG_OFFSET + 4092)
    assert exc.value.errno == errno.EFAULT
    fake_kernel.pwrite(cdev, b"\x06\x00", CONFIG_OFFSET + 4)
    assert fake_kernel.pread(cdev, 2, CONFIG_OFFSET + 4) == b"\x06\x00"


def test_bar_access(fake_kernel, kt, bound):
    cdev, _, _ = bound
    bar4 = 4 << 40
    assert fake_kernel.pwrite(cdev, b"abcd", bar4 + 0x3FFE) == 2         # short at the end
    assert fake_kernel.pread(cdev, 8, bar4 + 0x3FFC) == b"\0\0ab"
    with pytest.raises(OSError) as exc:
        fake_kernel.pread(cdev, 1, bar4 + 0x4000)
    assert exc.value.errno == errno.EINVAL


def test_irq_info(fake_kernel, kt, bound):
    cdev, _, _ = bound
    intx = ioctl.call(fake_kernel, cdev, kt.D.IRQ_INFO, index=0)
    assert intx.count == 1 and intx.flags == 1 | 2 | 4
    msix = ioctl.call(fake_kernel, cdev, kt.D.IRQ_INFO, index=2)
    assert msix.count == 4 and msix.flags == 1
    assert ioctl.call(fake_kernel, cdev, kt.D.IRQ_INFO, index=1).flags == 1 | 8
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, cdev, kt.D.IRQ_INFO, index=5)


def set_irqs(kernel, kt, cdev, index, flags, start=0, fds=None, data=b""):
    payload = b"".join(fd.to_bytes(4, "little", signed=True) for fd in fds) if fds is not None else data
    count = len(fds) if fds is not None else len(data)
    arg = ioctl.new(kt.D.SET_IRQS, extra=len(payload), index=index, flags=flags, start=start,
                    count=count)
    buf = ioctl.buffer_of(arg)
    buf[20:20 + len(payload)] = payload
    return ioctl.invoke(kernel, cdev, kt.D.SET_IRQS, arg)


def test_set_irqs_eventfd_trigger_and_loopback(fake_kernel, kt, bound):
    cdev, _, _ = bound
    efd = fake_kernel.eventfd(0, os.EFD_NONBLOCK)
    set_irqs(fake_kernel, kt, cdev, 2, 4 | 32, fds=[efd, -1])        # MSI-X vectors 0-1
    set_irqs(fake_kernel, kt, cdev, 2, 1 | 32, data=b"\0\0")         # DATA_NONE: fire 0-1
    assert os.eventfd_read(efd) == 1
    with pytest.raises(errors.InvalidArgument):                      # MSI while MSI-X is on
        set_irqs(fake_kernel, kt, cdev, 1, 4 | 32, fds=[efd])
    with pytest.raises(errors.InvalidArgument):                      # past the vector count
        set_irqs(fake_kernel, kt, cdev, 2, 4 | 32, start=3, fds=[efd, efd])
    with pytest.raises(errors.InvalidArgument):                      # not an eventfd
        set_irqs(fake_kernel, kt, cdev, 2, 4 | 32, fds=[kt.memfd()])
    with pytest.raises(errors.BadFd):
        set_irqs(fake_kernel, kt, cdev, 2, 4 | 32, fds=[9999])
    with pytest.raises(errors.NoSuchIoctl):                          # no masking for MSI-X
        set_irqs(fake_kernel, kt, cdev, 2, 1 | 8, data=b"")
    set_irqs(fake_kernel, kt, cdev, 2, 1 | 32, data=b"")             # count 0: disable


def _resettable(kt):
    """A kernel whose device has a reset method (FLR), bound: (kernel, KTest, cdev)."""
    k = FakeKernel(devices=[FakePciDevice(reset_works=True)])
    t = type(kt)(k)
    t.vfio_pci()
    cdev = t.cdev()
    t.bind(cdev, t.iommufd())
    return k, t, cdev


def test_reset_of_a_device_with_a_reset_method(kt):
    k, t, cdev = _resettable(kt)
    with k, use(k):
        assert ioctl.call(k, cdev, t.D.GET_INFO).flags == 3          # RESET | PCI
        k.pwrite(cdev, b"\x06\x00", CONFIG_OFFSET + 4)
        k.pwrite(cdev, b"junk", (4 << 40) + 0x10)
        ioctl.invoke(k, cdev, t.D.RESET)
        assert k.pread(cdev, 2, CONFIG_OFFSET + 4) == b"\0\0"
        assert k.pread(cdev, 4, (4 << 40) + 0x10) == bytes(4)
        assert k.files.exists("/sys/bus/pci/devices/0000:00:03.0/reset")


def test_reset_of_the_default_virtio_net_is_einval(fake_kernel, kt, bound):
    """QEMU's virtio-net-pci has no reset method: no VFIO_DEVICE_FLAGS_RESET,
    VFIO_DEVICE_RESET is EINVAL and sysfs has no reset attribute."""
    cdev, _, _ = bound
    with pytest.raises(errors.InvalidArgument):
        ioctl.invoke(fake_kernel, cdev, kt.D.RESET)
    assert not fake_kernel.files.exists("/sys/bus/pci/devices/0000:00:03.0/reset")


def test_close_restores_config_and_resets_only_a_resettable_device(fake_kernel, kt, bound):
    cdev, iommufd, _ = bound
    fake_kernel.pwrite(cdev, b"\x06\x00", CONFIG_OFFSET + 4)
    fake_kernel.pwrite(cdev, b"kept", (4 << 40) + 0x10)
    fake_kernel.close(cdev)
    cdev = kt.cdev()
    kt.bind(cdev, iommufd)
    assert fake_kernel.pread(cdev, 2, CONFIG_OFFSET + 4) == b"\0\0"   # saved state restored
    assert fake_kernel.pread(cdev, 4, (4 << 40) + 0x10) == b"kept"      # no reset: BAR as it was
    k, t, rcdev = _resettable(kt)
    with k, use(k):
        k.pwrite(rcdev, b"gone", (4 << 40) + 0x10)
        k.close(rcdev)
        rcdev = t.cdev()
        t.bind(rcdev, t.iommufd())
        assert k.pread(rcdev, 4, (4 << 40) + 0x10) == bytes(4)


def test_config_space_of_a_conventional_pci_function_is_256_bytes(fake_kernel, kt, bound):
    cdev, _, _ = bound
    assert len(fake_kernel.pread(cdev, 256, CONFIG_OFFSET)) == 256
    for offset, length in ((255, 2), (256, 1), (0x100, 4)):
        with pytest.raises(OSError) as exc:
            fake_kernel.pread(cdev, length, CONFIG_OFFSET + offset)
        assert exc.value.errno == errno.EFAULT


ROM_OFFSET = 6 << 40


def test_rom_region_reads_the_image_then_0xff(fake_kernel, kt, bound):
    cdev, _, _ = bound
    head = fake_kernel.pread(cdev, 0x1C + 4, ROM_OFFSET)
    assert head[:2] == b"\x55\xaa" and head[0x1C:] == b"PCIR"
    image_len = fake_kernel.devices[0].rom_len()
    assert 0 < image_len < 256 * 1024
    assert fake_kernel.pread(cdev, 16, ROM_OFFSET + image_len) == b"\xff" * 16
    assert fake_kernel.pread(cdev, 64, ROM_OFFSET + 256 * 1024 - 8) == b"\xff" * 8   # short at the end
    with pytest.raises(OSError) as exc:
        fake_kernel.pread(cdev, 4, ROM_OFFSET + 256 * 1024)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        fake_kernel.pwrite(cdev, b"\0", ROM_OFFSET)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        fake_kernel.mmap(cdev, 4096, ROM_OFFSET)
    assert exc.value.errno == errno.EINVAL


@pytest.mark.parametrize("rom_size, rom, size, flags, read_errno", [
    (0, None, 0, 0, errno.EINVAL),                      # no ROM BAR
    (64 * 1024, b"\xff" * 1024, 0, 0, errno.ENOMEM),     # a BAR without a valid image
])
def test_rom_region_without_a_usable_rom(kt, rom_size, rom, size, flags, read_errno):
    with FakeKernel(devices=[FakePciDevice(rom_size=rom_size, rom=rom)]) as k, use(k):
        t = type(kt)(k)
        t.vfio_pci()
        cdev = t.cdev()
        t.bind(cdev, t.iommufd())
        info = ioctl.call(k, cdev, t.D.REGION_INFO, index=6)
        assert (info.size, info.flags) == (size, flags)
        with pytest.raises(OSError) as exc:
            k.pread(cdev, 4, ROM_OFFSET)
        assert exc.value.errno == read_errno


def test_rom_image_size_walks_the_image_chain():
    from pyiommufd_testing.fake.pci import option_rom, rom_image_size
    one = option_rom(0x1AF4, 0x1041, 0x020000, sectors=4)
    assert rom_image_size(one, 64 * 1024) == 4 * 512
    assert rom_image_size(one, 1024) == 1024            # never more than the window
    first = bytearray(one)
    first[0x1C + 0x15] = 0                              # not the last image...
    assert rom_image_size(bytes(first), 64 * 1024) == 4 * 512     # ...but nothing follows
    two = bytes(first) + option_rom(0x1AF4, 0x1041, 0x020000, sectors=2)
    assert rom_image_size(two, 64 * 1024) == 6 * 512
    bad = bytearray(one)
    bad[0x1C:0x20] = b"PCIX"
    assert rom_image_size(bytes(bad), 64 * 1024) == 0
    assert rom_image_size(b"", 64 * 1024) == 0


@pytest.mark.parametrize("kw", [dict(cfg_size=1024), dict(rom_size=3000), dict(rom_size=1024),
                                dict(rom_size=2048, rom=b"\x55" * 4096)])
def test_bad_device_descriptions(kw):
    with pytest.raises(ValueError):
        FakePciDevice(**kw)


def test_features(fake_kernel, kt, bound):
    cdev, _, _ = bound
    probe, get, set_ = 1 << 18, 1 << 16, 1 << 17
    ioctl.call(fake_kernel, cdev, kt.D.FEATURE, flags=probe | set_ | 3)       # LOW_POWER_ENTRY
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, cdev, kt.D.FEATURE, flags=probe | get | 3)     # SET only
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, cdev, kt.D.FEATURE, flags=get | set_ | 3)      # both without PROBE
    with pytest.raises(errors.NoSuchIoctl):
        ioctl.call(fake_kernel, cdev, kt.D.FEATURE, flags=probe | get | 1)     # no migration
    ioctl.call(fake_kernel, cdev, kt.D.FEATURE, flags=probe | get | 11)       # DMA_BUF probes


def test_unknown_cdev_ioctl_is_enotty(fake_kernel, kt, bound):
    cdev, _, _ = bound
    arg = ioctl.new("struct vfio_device_info", argsz=16)
    with pytest.raises(OSError) as exc:
        fake_kernel.ioctl(cdev, ioctl.IO(0x3B, 100 + 30), ioctl.buffer_of(arg))
    assert exc.value.errno == errno.ENOTTY


def test_hot_reset_is_not_possible(fake_kernel, kt, bound):
    cdev, _, _ = bound
    arg = ioctl.new("struct vfio_pci_hot_reset_info", argsz=12)
    with pytest.raises(OSError) as exc:
        fake_kernel.ioctl(cdev, ioctl.IO(0x3B, 112), ioctl.buffer_of(arg))
    assert exc.value.errno == errno.ENODEV


def test_unbinding_vfio_pci_with_an_open_cdev_is_ebusy(fake_kernel, kt, cdev):
    with pytest.raises(OSError) as exc:
        fake_kernel.files.write_text("/sys/bus/pci/drivers/vfio-pci/unbind", "0000:00:03.0")
    assert exc.value.errno == errno.EBUSY
    fake_kernel.close(cdev)
    fake_kernel.files.write_text("/sys/bus/pci/drivers/vfio-pci/unbind", "0000:00:03.0")
    assert not fake_kernel.files.exists("/dev/vfio/devices/vfio0")


def test_failed_replace_keeps_the_old_attachment(fake_kernel, kt, bound):
    cdev, iommufd, devid = bound
    ioas = kt.ioas(iommufd)
    hwpt = kt.hwpt(iommufd, devid, ioas)
    kt.attach(cdev, hwpt)
    other = kt.ioas(iommufd)
    kt.map_file(iommufd, other, kt.memfd(), iova=0xFEE00000)       # blocks the MSI window
    with pytest.raises(errors.AddressInUse):
        kt.attach(cdev, kt.hwpt(iommufd, devid, other))
    with pytest.raises(errors.Busy):
        kt.destroy(iommufd, hwpt)           # still attached, still one user more
    kt.detach(cdev)
    kt.destroy(iommufd, hwpt)
