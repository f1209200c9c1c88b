"""pyiommufd.vfio: the VFIO cdev against the fake kernel; the legacy
container/group API and capability decoding the fake does not model against
a scripted backend that decodes the same bytes."""
from __future__ import annotations

import errno as E
import mmap
import os
import uuid

import pytest

from pyiommufd import backend, errors, ioctl, pci, vfio
from pyiommufd._uapi import ffi
from pyiommufd.backend import Backend, oserror
from pyiommufd.fdobject import FileKind
from pyiommufd.iommufd import IOMMUFD, PAGE_SIZE, aligned_buffer
from pyiommufd_testing import FakeKernel, FakePciDevice
from pyiommufd.vfio import (DependentDevice, DeviceInfo, HotResetInfo, IrqInfo, RegionInfo, VfioContainer,
                            VfioDevice, VfioGroup)

BDF = "0000:00:03.0"
CDEV = "/dev/vfio/devices/vfio0"


@pytest.fixture
def on_vfio(fake_kernel):
    pci.PciDevice(BDF).bind_vfio()
    return fake_kernel


@pytest.fixture
def bound(on_vfio):
    ictx = IOMMUFD.open()
    dev = VfioDevice.open(BDF)
    dev.bind(ictx)
    yield dev
    dev.close()
    ictx.close()


def _kernel(**kw):
    kernel = FakeKernel(**kw)
    return kernel


def read_eventfd(kernel, fd) -> int:
    return int.from_bytes(kernel.read(fd, 8), "little")


# -- opening --------------------------------------------------------------------------
@pytest.mark.parametrize("name", [CDEV, BDF, "00:03.0", "vfio0"])
def test_open_by_path_bdf_or_name(on_vfio, name):
    with VfioDevice.open(name) as dev:
        assert dev.path == CDEV and dev.kind is FileKind.VFIO_CDEV
        assert dev.bdf == (BDF if pci.is_bdf(name) else None)
        fd = dev.fileno()
        assert on_vfio.known_fds()[fd] == CDEV
        assert repr(dev).startswith("<VfioDevice ") and f"fd={fd}" in repr(dev)
    assert dev.closed and fd not in on_vfio.known_fds()
    dev.close()                                                     # idempotent


@pytest.mark.parametrize("name", ["", "vfio", "0000:00:03", "devices/vfio0", "vfioX", 7])
def test_open_bad_names(on_vfio, name):
    with pytest.raises(errors.UsageError):
        VfioDevice.open(name)


def test_open_a_device_not_on_vfio_pci(fake_kernel):
    with pytest.raises(errors.SysfsError) as info:
        VfioDevice.open(BDF)
    err = info.value
    assert isinstance(err, errors.NoDevice)
    assert "virtio-pci" in err.detail and "bind_vfio" in err.detail


def test_open_a_missing_device_or_cdev(on_vfio):
    with pytest.raises(errors.SysfsError) as info:
        VfioDevice.open("0000:00:1f.0")
    assert isinstance(info.value, errors.NotFound)
    with pytest.raises(errors.VfioError) as info:
        VfioDevice.open("/dev/vfio/devices/vfio9")
    assert isinstance(info.value, errors.NotFound) and info.value.op == "open(vfio cdev)"


def test_from_fd_and_detach(on_vfio):
    fd = on_vfio.open(CDEV)
    borrowed = VfioDevice.from_fd(fd, owned=False, path=CDEV, bdf="00:03.0")
    assert borrowed.bdf == BDF and not borrowed.owned
    borrowed.close()
    assert fd in on_vfio.known_fds()
    owned = VfioDevice.from_fd(fd)
    assert owned.detach() == fd and owned.closed
    assert fd in on_vfio.known_fds()
    with pytest.raises(errors.UsageError):
        owned.info()
    VfioDevice.from_fd(fd).close()
    assert fd not in on_vfio.known_fds()


# -- iommufd binding ---------------------------------------------------------------------
def test_bind_attach_detach(on_vfio):
    with IOMMUFD.open() as ictx, VfioDevice.open(BDF) as dev:
        with pytest.raises(errors.UsageError):
            dev.attach(1)                                           # not bound yet
        assert dev.bind(ictx) == dev.dev_id == 1
        assert dev.iommufd is ictx and "dev_id=1" in repr(dev)
        ioas = ictx.alloc_ioas()
        hwpt = ictx.alloc_hwpt(dev, ioas)
        assert dev.attach(hwpt) == hwpt.id == dev.pt_id
        assert f"pt_id={hwpt.id}" in repr(dev)
        dev.detach_pt()
        assert dev.pt_id is None
        auto = dev.attach(ioas)                                     # the kernel picks an HWPT
        assert auto not in (ioas.id, hwpt.id) and dev.pt_id == auto
        dev.detach_pt()
        with pytest.raises(errors.VfioError) as info:
            dev.bind(ictx)                                          # bound already
        assert isinstance(info.value, errors.InvalidArgument)
    assert dev.dev_id is None and dev.pt_id is None                  # closing the cdev unbinds


def test_bind_by_raw_fd_and_pasid(on_vfio):
    with IOMMUFD.open() as ictx, VfioDevice.open(BDF) as dev:
        dev.bind(ictx.fileno())
        assert dev.iommufd is None and dev.dev_id == 1
        ioas = ictx.alloc_ioas()
        hwpt = ictx.alloc_hwpt(dev.dev_id, ioas, pasid=True)
        assert dev.attach(hwpt.id) == hwpt.id
        with pytest.raises(errors.VfioError):
            dev.attach(hwpt.id, pasid=1)                            # no PASID capability on this device
        assert dev.pasid_pt_ids == {}
        for call in (lambda: dev.attach(hwpt, pasid=-1), lambda: dev.attach(hwpt, pasid=1 << 20),
                     lambda: dev.detach_pt(pasid=-1), lambda: dev.attach(-1)):
            with pytest.raises(errors.UsageError):
                call()


def test_attach_checks_objects(on_vfio):
    with IOMMUFD.open() as one, IOMMUFD.open() as two, VfioDevice.open(BDF) as dev:
        dev.bind(one)
        foreign = two.alloc_ioas()
        with pytest.raises(errors.UsageError):
            dev.attach(foreign)
        ioas = one.alloc_ioas()
        ioas.destroy()
        with pytest.raises(errors.UsageError):
            dev.attach(ioas)


def test_bind_errors(on_vfio):
    with VfioDevice.open(BDF) as dev:
        with pytest.raises(errors.VfioError) as info:
            dev.bind(999)                                           # not an fd
        assert isinstance(info.value, errors.BadFd)
        with IOMMUFD.open() as ictx:
            with pytest.raises(errors.VfioError) as info:
                dev.bind(ictx, token_uuid=uuid.uuid4())              # no VF token on this device
            assert isinstance(info.value, errors.InvalidArgument)
            for bad in ("not-a-uuid", b"short"):
                with pytest.raises(errors.UsageError):
                    dev.bind(ictx, token_uuid=bad)
            closed = IOMMUFD.open()
            closed.close()
            with pytest.raises(errors.UsageError):
                dev.bind(closed)


def test_bind_without_interrupt_remapping_is_eperm():
    kernel = FakeKernel(interrupt_remapping=False)
    with backend.use(kernel):
        try:
            pci.PciDevice(BDF).bind_vfio()
            with IOMMUFD.open() as ictx, VfioDevice.open(BDF) as dev:
                with pytest.raises(errors.VfioError) as info:
                    dev.bind(ictx)
                err = info.value
                assert isinstance(err, errors.PermissionDenied) and err.op == "VFIO_DEVICE_BIND_IOMMUFD"
                assert "interrupt" in err.hint and err.detail == BDF
        finally:
            kernel.shutdown()


def test_unbound_cdev_refuses_everything_else(on_vfio):
    with VfioDevice.open(BDF) as dev:
        with pytest.raises(errors.InvalidArgument):
            dev.info()
        with pytest.raises(errors.InvalidArgument):
            dev.reset()


# -- info ------------------------------------------------------------------------------
def test_info(bound):
    info = bound.info()
    assert isinstance(info, DeviceInfo)
    assert (info.num_regions, info.num_irqs) == (9, 5)
    # QEMU's virtio-net-pci has no reset method (see test_reset for one that has)
    assert info.is_pci and not info.reset_supported and info.flag_names == ["pci"]
    assert info.caps == [] and info.pci_atomic_comp is None


def test_region_info(bound):
    bar1 = bound.region_info("bar1")
    assert isinstance(bar1, RegionInfo)
    assert (bar1.index, bar1.size, bar1.offset) == (1, 0x1000, 1 << 40)
    assert bar1.readable and bar1.writable and bar1.mmappable
    assert bar1.msix_mappable and [c.id for c in bar1.caps] == [3]  # through the argsz re-call
    bar4 = bound.region_info(4)
    assert bar4.size == 0x4000 and not bar4.msix_mappable and bar4.sparse_areas is None
    config = bound.region_info("config")
    assert config.readable and not config.mmappable and config.size == 256     # conventional PCI
    rom = bound.region_info("rom")
    assert rom.readable and not rom.writable and not rom.mmappable and rom.size == 256 * 1024
    assert bound.region_info("bar0").size == 0
    with pytest.raises(errors.InvalidArgument):
        bound.region_info("vga")
    with pytest.raises(errors.UsageError):
        bound.region_info("bar9")
    regions = bound.regions()
    assert [r.index for r in regions] == list(range(8))           # VGA skipped


def test_irq_info(bound):
    irqs = bound.irqs()
    assert [i.count for i in irqs] == [1, 0, 4, 1, 1]
    intx = bound.irq_info("intx")
    assert isinstance(intx, IrqInfo) and intx.eventfd and intx.maskable and intx.automasked
    msix = bound.irq_info("msix")
    assert msix.count == 4 and not msix.noresize and bound.irq_info("msi").noresize
    with pytest.raises(errors.InvalidArgument):
        bound.irq_info(9)
    with pytest.raises(errors.UsageError):
        bound.irq_info("nmi")


# -- region access ----------------------------------------------------------------------
def test_read_write_region(bound, on_vfio):
    assert bound.write_region("bar4", 0x10, b"hello") == 5
    assert bound.read_region(4, 0x10, 5) == b"hello"
    assert bytes(on_vfio.devices[0].bar(4)[0x10:0x15]) == b"hello"
    assert bound.read_region("bar1", 0, 16) == bytes(16)
    for call in (lambda: bound.read_region("bar4", 0x4000 - 2, 4),
                 lambda: bound.read_region("bar4", -1, 4),
                 lambda: bound.read_region("bar4", 0, 0),
                 lambda: bound.write_region("bar4", 0x3FFF, b"ab"),
                 lambda: bound.write_region("bar4", 0, b""),
                 lambda: bound.read_region("bar0", 0, 1)):          # empty, not readable
        with pytest.raises(errors.UsageError):
            call()


def test_config_space(bound):
    assert bound.config_read(0, 2) == 0x1AF4
    assert bound.config_read(2, 2) == 0x1041
    assert bound.config_read(0) == 0x1041_1AF4
    assert bound.config_read(8, 1) == 0x01
    bound.config_write(4, 0x0006, 2)                                # memory + bus master
    assert bound.config_read(4, 2) == 0x0006
    for call in (lambda: bound.config_read(0, 3), lambda: bound.config_read(1, 2),
                 lambda: bound.config_write(4, 1 << 16, 2), lambda: bound.config_write(4, -1, 2),
                 lambda: bound.config_read(4096, 4)):
        with pytest.raises(errors.UsageError):
            call()


def test_mmap_region(bound, on_vfio):
    bound.write_region("bar4", 0x1000, b"mapped")
    m = bound.mmap_region("bar4")
    assert isinstance(m, mmap.mmap) and len(m) == 0x4000
    m.close()
    part = bound.mmap_region("bar4", PAGE_SIZE, PAGE_SIZE)
    assert part[:6] == b"mapped"
    part.close()
    for call in (lambda: bound.mmap_region("config"), lambda: bound.mmap_region("bar4", 100),
                 lambda: bound.mmap_region("bar4", 0, 0x8000), lambda: bound.mmap_region("bar0")):
        with pytest.raises(errors.UsageError):
            call()


# -- interrupts -------------------------------------------------------------------------
def test_msix_eventfds_trigger_and_disable(bound, on_vfio):
    efds = [on_vfio.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
    bound.set_irqs("msix", 0, efds)
    bound.set_irqs("msix", 1, action="trigger", count=1)            # DATA_NONE loopback
    assert read_eventfd(on_vfio, efds[1]) == 1
    bound.set_irqs("msix", 0, bools=[True, False, True])           # DATA_BOOL loopback
    assert read_eventfd(on_vfio, efds[0]) == 1 and read_eventfd(on_vfio, efds[2]) == 1
    with pytest.raises(errors.VfioError) as info:
        bound.set_irqs("intx", 0, [efds[0]])                        # MSI-X is the active type
    assert isinstance(info.value, errors.InvalidArgument) and info.value.detail == "index 0"
    bound.disable_irqs("msix")
    for fd in efds:
        on_vfio.close(fd)


def test_intx_mask_unmask(bound, on_vfio):
    efd = on_vfio.eventfd(0, os.EFD_NONBLOCK)
    bound.set_irqs(0, 0, [efd])
    bound.set_irqs("intx", action="mask")
    bound.set_irqs("intx", action="unmask")
    bound.set_irqs("intx")                                          # loopback trigger
    assert read_eventfd(on_vfio, efd) == 1
    bound.set_irqs("intx", 0, [-1])                                 # unassign
    on_vfio.close(efd)


class _HasFileno:
    def __init__(self, fd):
        self.fd = fd

    def fileno(self):
        return self.fd


def test_set_irqs_validation(bound, on_vfio):
    efd = on_vfio.eventfd()
    for call in (lambda: bound.set_irqs("msix", 0, [efd], bools=[True]),
                 lambda: bound.set_irqs("msix", 0, [efd], count=2),
                 lambda: bound.set_irqs("msix", 0, bools=[True], count=3),
                 lambda: bound.set_irqs("msix", 0, ["x"]),
                 lambda: bound.set_irqs("msix", 0, [-2]),
                 lambda: bound.set_irqs("msix", action="fire"),
                 lambda: bound.set_irqs("msix", action="mask", count=0),
                 lambda: bound.set_irqs("msix", 0, [], action="trigger"),
                 lambda: bound.set_irqs("msix", -1, [efd]),
                 lambda: bound.set_irqs("bogus", 0, [efd])):
        with pytest.raises(errors.UsageError):
            call()
    bound.set_irqs("msix", 2, [_HasFileno(efd)])
    bound.disable_irqs("msix")
    on_vfio.close(efd)


def test_disable_all_irqs_lets_the_series_freeze(series_kernel, kt):
    """The series' vfio freeze refuses a device with interrupts enabled, so
    reboot(KEXEC) fails with EINVAL until they are disabled (seed-spec 4.5)."""
    iommufd, memfd_fd, cdev_fd, ioas, hwpt, devid = kt.device_setup()
    dev = VfioDevice.from_fd(cdev_fd, owned=False)
    efd = series_kernel.eventfd()
    err_efd = series_kernel.eventfd()
    dev.set_irqs("msix", 0, [efd, efd, efd])
    dev.set_irqs("err", 0, [err_efd])
    session = kt.create_session(kt.luo(), "irqs")
    kt.preserve(session, memfd_fd, 1)
    kt.preserve(session, iommufd, 2)
    kt.preserve(session, cdev_fd, 3)
    with pytest.raises(OSError) as info:
        series_kernel.kexec()
    assert info.value.errno == E.EINVAL
    # (the real kernel keeps the error trigger when MSI-X goes; the fake drops it too)
    assert vfio.IRQ_INDEX["msix"] in dev.disable_all_irqs()
    assert dev.disable_all_irqs() == []                             # nothing left enabled
    series_kernel.kexec()
    assert series_kernel.boot_count == 2


# -- reset and features --------------------------------------------------------------------
def test_reset():
    kernel = FakeKernel(devices=[FakePciDevice(bdf=BDF, reset_works=True)])
    with backend.use(kernel):
        try:
            pci.PciDevice(BDF).bind_vfio()
            with IOMMUFD.open() as ictx, VfioDevice.open(BDF) as dev:
                dev.bind(ictx)
                assert dev.info().reset_supported
                dev.write_region("bar4", 0, b"junk")
                dev.reset()
                assert dev.read_region("bar4", 0, 4) == bytes(4)
        finally:
            kernel.shutdown()


def test_reset_unsupported():
    kernel = FakeKernel(devices=[FakePciDevice(bdf=BDF, reset_works=False)])
    with backend.use(kernel):
        try:
            pci.PciDevice(BDF).bind_vfio()
            with IOMMUFD.open() as ictx, VfioDevice.open(BDF) as dev:
                dev.bind(ictx)
                assert not dev.info().reset_supported
                with pytest.raises(errors.VfioError) as info:
                    dev.reset()
                assert isinstance(info.value, errors.InvalidArgument) and info.value.op == "VFIO_DEVICE_RESET"
        finally:
            kernel.shutdown()


def test_hot_reset_on_the_fake(bound):
    with pytest.raises(errors.NoDevice):
        bound.hot_reset_info()                                      # the fake has no resettable bus
    with pytest.raises(errors.NoDevice):
        bound.hot_reset()


def test_features(bound):
    assert bound.feature_probe("dma_buf")
    assert bound.feature_probe("dma_buf", get=True)
    assert not bound.feature_probe("dma_buf", set=True)
    assert not bound.feature_probe("migration")
    assert bound.feature("low_power_entry", op="probe")
    assert bound.feature("low_power_entry", op="set") == 0
    with pytest.raises(errors.VfioError) as info:
        bound.feature_get("migration", 8)
    assert isinstance(info.value, errors.NoSuchIoctl)
    with pytest.raises(errors.InvalidArgument):
        bound.feature("low_power_entry", op="get", length=0)          # SET only
    with pytest.raises(errors.NotSupported):
        bound.dma_buf("bar4", [(0, PAGE_SIZE)])                       # the fake exports no dma-buf
    for call in (lambda: bound.feature("migration", op="frob"), lambda: bound.feature("migration"),
                 lambda: bound.feature_get("migration"), lambda: bound.feature_get("x", 8),
                 lambda: bound.feature_get(0x10000, 8), lambda: bound.dma_buf("bar4", []),
                 lambda: bound.dma_buf("bar4", [(0, 0)]), lambda: bound.feature_get("migration", 4, data=b"x")):
        with pytest.raises(errors.UsageError):
            call()


def test_vfio_compat_container_on_an_iommufd(fake_kernel):
    """/dev/iommu answers the container's version/extension ioctls itself."""
    with IOMMUFD.open() as ictx:
        container = VfioContainer.from_fd(ictx.fileno(), owned=False)
        assert container.kind is FileKind.VFIO_CONTAINER
        assert container.api_version() == 0
        assert container.check_extension("type1v2") == 1
        assert container.check_extension(vfio.EXTENSIONS["type1"]) == 1
        with pytest.raises(errors.UsageError):
            container.check_extension("spam")


def test_legacy_container_and_group_on_the_fake(on_vfio):
    with VfioContainer.open() as container, VfioGroup.open(3) as group:
        assert group.status().viable
        group.set_container(container)
        container.set_iommu("type1v2")
        dev = group.get_device_fd(BDF)
        dev.close()


# -- a scripted kernel for what the fake does not model ---------------------------------------------
class Scripted(Backend):
    """Answers ioctls with handlers that decode the argument bytes like the
    kernel does. ``handlers[request](fd, buf) -> int`` (``buf`` writable)."""

    name = "scripted"

    def __init__(self):
        self.handlers = {}
        self.value_handlers = {}
        self.opened = []
        self.closed = []
        self.calls = []
        self._next = 100

    def open(self, path, flags=0):
        self.opened.append(path)
        self._next += 1
        return self._next

    def close(self, fd):
        self.closed.append(fd)

    def ioctl(self, fd, request, arg):
        self.calls.append((fd, request, bytes(arg)))
        handler = self.handlers.get(request)
        if handler is None:
            raise oserror(E.ENOTTY)
        return handler(fd, arg)

    def ioctl_int(self, fd, request, value=0):
        self.calls.append((fd, request, value))
        handler = self.value_handlers.get(request)
        if handler is None:
            raise oserror(E.ENOTTY)
        return handler(fd, value)


def req(name):
    return ioctl.const(name)


def cap(cid, version, nxt, body=b""):
    return cid.to_bytes(2, "little") + version.to_bytes(2, "little") + nxt.to_bytes(4, "little") + body


def test_legacy_container_scripted():
    k = Scripted()
    dma = {}
    k.value_handlers[req("VFIO_GET_API_VERSION")] = lambda fd, v: 0
    k.value_handlers[req("VFIO_CHECK_EXTENSION")] = lambda fd, v: 1 if v in (1, 3, 9) else 0
    k.value_handlers[req("VFIO_SET_IOMMU")] = lambda fd, v: 0 if v == 3 else (_ for _ in ()).throw(oserror(E.EINVAL))

    def get_info(fd, buf):
        base = ffi.sizeof("struct vfio_iommu_type1_info")
        iova = cap(1, 1, base + 32, (1).to_bytes(4, "little") + bytes(4)
                   + (0).to_bytes(8, "little") + (0xFEDFFFFF).to_bytes(8, "little"))
        avail = cap(3, 1, 0, (65535).to_bytes(4, "little") + bytes(4))
        reply_len = base + len(iova) + len(avail)
        arg = ffi.from_buffer("struct vfio_iommu_type1_info *", buf)
        arg.flags = 1 | 2
        arg.iova_pgsizes = 0x40201000
        if arg.argsz < reply_len:
            arg.argsz = reply_len
            arg.cap_offset = 0
            return 0
        arg.cap_offset = base
        ffi.buffer(arg, reply_len)[base:] = iova + avail
        return 0

    def map_dma(fd, buf):
        arg = ffi.from_buffer("struct vfio_iommu_type1_dma_map *", buf)
        assert arg.argsz == ffi.sizeof("struct vfio_iommu_type1_dma_map")
        dma[int(arg.iova)] = (int(arg.vaddr), int(arg.size), int(arg.flags))
        return 0

    def unmap_dma(fd, buf):
        arg = ffi.from_buffer("struct vfio_iommu_type1_dma_unmap *", buf)
        if arg.flags & 2:
            arg.size = sum(v[1] for v in dma.values())
            dma.clear()
        else:
            arg.size = dma.pop(int(arg.iova))[1]
        return 0

    k.handlers[req("VFIO_IOMMU_GET_INFO")] = get_info
    k.handlers[req("VFIO_IOMMU_MAP_DMA")] = map_dma
    k.handlers[req("VFIO_IOMMU_UNMAP_DMA")] = unmap_dma

    with VfioContainer.open(backend=k) as c:
        assert k.opened == ["/dev/vfio/vfio"] and "fd=" in repr(c)
        assert c.api_version() == 0
        assert c.check_extension("type1v2") == 1 and c.check_extension("noiommu") == 0
        c.set_iommu("type1v2")
        with pytest.raises(errors.VfioError) as info:
            c.set_iommu("type1")
        assert isinstance(info.value, errors.InvalidArgument) and info.value.op == "VFIO_SET_IOMMU"
        info = c.iommu_info()
        assert info.iova_pgsizes == 0x40201000 and info.iova_ranges == [(0, 0xFEDFFFFF)]
        assert info.dma_avail == 65535 and info.migration is None and [x.id for x in info.caps] == [1, 3]
        buf = aligned_buffer(2 * PAGE_SIZE)
        assert c.map_dma(buf, 1 << 32, writeable=False) == 1 << 32
        addr = int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
        assert dma[1 << 32] == (addr, 2 * PAGE_SIZE, 1)              # READ only
        with pytest.raises(BufferError):
            buf.close()
        assert [m.iova for m in c.mappings] == [1 << 32]
        assert c.unmap_dma(1 << 32, 2 * PAGE_SIZE) == 2 * PAGE_SIZE
        buf.close()
        c.map_dma(aligned_buffer(PAGE_SIZE), 0)
        assert c.unmap_all() == PAGE_SIZE and c.mappings == []
        # A slice of a bytearray is a copy that may land on a page boundary; this view never does.
        unaligned = memoryview(aligned_buffer(2 * PAGE_SIZE))[16:16 + PAGE_SIZE]
        for call, reason in ((lambda: c.map_dma(unaligned, 0), "buffer address"),
                             (lambda: c.map_dma(aligned_buffer(PAGE_SIZE), 5), "iova"),
                             (lambda: c.map_dma(aligned_buffer(PAGE_SIZE), 0, readable=False,
                                                writeable=False), "readable"),
                             (lambda: c.unmap_dma(0, 0), "length must not be 0")):
            with pytest.raises(errors.UsageError, match=reason):
                call()
    assert k.closed == [101]


def test_legacy_group_scripted():
    k = Scripted()
    seen = {}

    def status(fd, buf):
        arg = ffi.from_buffer("struct vfio_group_status *", buf)
        arg.flags = 1 | 2
        return 0

    def set_container(fd, buf):
        seen["container"] = int.from_bytes(bytes(buf)[:4], "little", signed=True)
        return 0

    def get_device_fd(fd, buf):
        seen["name"] = bytes(buf)
        return 42

    k.handlers[req("VFIO_GROUP_GET_STATUS")] = status
    k.handlers[req("VFIO_GROUP_SET_CONTAINER")] = set_container
    k.handlers[req("VFIO_GROUP_GET_DEVICE_FD")] = get_device_fd
    k.value_handlers[req("VFIO_GROUP_UNSET_CONTAINER")] = lambda fd, v: 0

    with VfioContainer.open(backend=k) as container, VfioGroup.open(7, backend=k) as group:
        assert k.opened == ["/dev/vfio/vfio", "/dev/vfio/7"] and group.group == 7
        assert group.kind is FileKind.VFIO_GROUP and "7" in repr(group)
        st = group.status()
        assert st.viable and st.container_set
        group.set_container(container)
        assert seen["container"] == container.fileno() and group.container is container
        group.unset_container()
        assert group.container is None
        dev = group.get_device_fd("00:03.0")
        assert seen["name"] == b"0000:00:03.0\0"
        assert isinstance(dev, VfioDevice) and dev.fileno() == 42 and dev.bdf == BDF and dev.owned
        dev.close()
        assert 42 in k.closed
        other = group.get_device_fd("platform-dev.0")
        assert other.bdf is None and seen["name"] == b"platform-dev.0\0"
        for bad in ("", "a\0b", 5, "x" * 300):
            with pytest.raises(errors.UsageError):
                group.get_device_fd(bad)
    assert VfioGroup.open("/dev/vfio/noiommu-0", backend=k).group is None
    assert VfioGroup.open("12", backend=k).group == 12
    for bad in ("abc", 1.5, True):
        with pytest.raises(errors.UsageError):
            VfioGroup.open(bad, backend=k)
    with pytest.raises(errors.VfioError) as info:
        VfioGroup.from_fd(5, backend=Scripted()).status()           # nothing answers: ENOTTY
    assert isinstance(info.value, errors.NoSuchIoctl)


def test_region_caps_scripted():
    """Sparse mmap and type capabilities, as vfio-pci reports them for a BAR
    holding the MSI-X table and for a device-specific region."""
    k = Scripted()
    base = ffi.sizeof("struct vfio_region_info")

    def region(fd, buf):
        arg = ffi.from_buffer("struct vfio_region_info *", buf)
        index = int(arg.index)
        sparse = cap(1, 1, base + 8 + 8 + 32, (2).to_bytes(4, "little") + bytes(4)
                     + (0).to_bytes(8, "little") + (0x2000).to_bytes(8, "little")
                     + (0x3000).to_bytes(8, "little") + (0x1000).to_bytes(8, "little"))
        rtype = cap(2, 1, base + len(sparse) + 16, (0x80008086).to_bytes(4, "little") + (1).to_bytes(4, "little"))
        msix = cap(3, 1, 0)
        chain = sparse + rtype + msix
        arg.flags = 1 | 2 | 4 | 8
        arg.size, arg.offset = 0x4000, index << 40
        if arg.argsz < base + len(chain):
            arg.argsz = base + len(chain)
            return 0
        arg.cap_offset = base
        ffi.buffer(arg, base + len(chain))[base:] = chain
        return 0

    k.handlers[req("VFIO_DEVICE_GET_REGION_INFO")] = region
    dev = VfioDevice.from_fd(5, backend=k)
    info = dev.region_info(2)
    assert info.sparse_areas == [(0, 0x2000), (0x3000, 0x1000)]
    assert (info.type, info.subtype) == (0x80008086, 1) and info.msix_mappable
    assert [c.id for c in info.caps] == [1, 2, 3]
    k.mmap = lambda fd, length, offset=0, prot=0: ("mmap", length, offset)
    assert dev.mmap_region(2, 0x3000, 0x1000) == ("mmap", 0x1000, (2 << 40) + 0x3000)
    with pytest.raises(errors.UsageError):
        dev.mmap_region(2, 0x1000, 0x2000)                          # across the MSI-X hole
    with pytest.raises(errors.UsageError):
        dev.mmap_region(2)


def test_device_info_caps_scripted():
    k = Scripted()
    base = ffi.sizeof("struct vfio_device_info")

    def info(fd, buf):
        arg = ffi.from_buffer("struct vfio_device_info *", buf)
        atomic = cap(5, 1, 0, (1 | 2).to_bytes(4, "little") + bytes(4))
        arg.flags = 2 | 0x80
        arg.num_regions, arg.num_irqs = 9, 5
        if arg.argsz < base + len(atomic):
            arg.argsz = base + len(atomic)
            return 0
        arg.cap_offset = base
        ffi.buffer(arg, base + len(atomic))[base:] = atomic
        return 0

    k.handlers[req("VFIO_DEVICE_GET_INFO")] = info
    got = VfioDevice.from_fd(5, backend=k).info()
    assert got.pci_atomic_comp == 3 and "caps" in got.flag_names and [c.id for c in got.caps] == [5]


def test_hot_reset_info_scripted():
    k = Scripted()
    base = ffi.sizeof("struct vfio_pci_hot_reset_info")
    size = ffi.sizeof("struct vfio_pci_dependent_device")
    devices = [(1, 0, 0, 0x18), (0, 0, 0, 0x20), (0xFFFFFFFF, 1, 0xAF, 0x01), (7, 0, 1, 0), (8, 0, 1, 1)]

    def hot_reset_info(fd, buf):
        arg = ffi.from_buffer("struct vfio_pci_hot_reset_info *", buf)
        if arg.argsz < base + len(devices) * size:
            arg.count = len(devices)
            raise oserror(E.ENOSPC)
        arg.flags = 1
        arg.count = len(devices)
        raw = b"".join(i.to_bytes(4, "little") + s.to_bytes(2, "little") + bytes([b, df])
                       for i, s, b, df in devices)
        ffi.buffer(arg, base + len(raw))[base:] = raw
        return 0

    def hot_reset(fd, buf):
        arg = ffi.from_buffer("struct vfio_pci_hot_reset *", buf)
        assert arg.count == 2 and bytes(buf)[12:20] == (3).to_bytes(4, "little") + (4).to_bytes(4, "little")
        return 0

    k.handlers[req("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO")] = hot_reset_info
    k.handlers[req("VFIO_DEVICE_PCI_HOT_RESET")] = hot_reset
    dev = VfioDevice.from_fd(5, backend=k)
    info = dev.hot_reset_info()
    assert isinstance(info, HotResetInfo) and info.ids_are_dev_ids and not info.all_owned
    assert info.devices[0] == DependentDevice(1, 0, 0, 0x18) and info.devices[0].bdf == BDF
    assert info.devices[2].bdf == "0001:af:00.1" and info.devices[2].id == 0xFFFFFFFF
    assert len(info.devices) == 5
    assert len([c for c in k.calls if c[1] == req("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO")]) == 2
    dev.hot_reset([3, _HasFileno(4)])


def test_dma_buf_scripted():
    k = Scripted()
    head = ffi.sizeof("struct vfio_device_feature")

    def feature(fd, buf):
        raw = bytes(buf)
        arg = ffi.from_buffer("struct vfio_device_feature *", buf)
        assert arg.flags == ioctl.const("VFIO_DEVICE_FEATURE_DMA_BUF") | ioctl.const("VFIO_DEVICE_FEATURE_GET")
        req_ = ffi.from_buffer("struct vfio_device_feature_dma_buf *", bytearray(raw[head:head + 16]))
        assert (req_.region_index, req_.nr_ranges) == (4, 2)
        assert req_.open_flags == os.O_RDWR | os.O_CLOEXEC
        assert raw[head + 16:] == ((0).to_bytes(8, "little") + (0x1000).to_bytes(8, "little")
                                   + (0x2000).to_bytes(8, "little") + (0x2000).to_bytes(8, "little"))
        return 77

    k.handlers[req("VFIO_DEVICE_FEATURE")] = feature
    assert VfioDevice.from_fd(5, backend=k).dma_buf("bar4", [(0, 0x1000), (0x2000, 0x2000)]) == 77


@pytest.mark.parametrize("device, error, message", [
    ("00:03.8", "UsageError", "not a PCI address"),
    ("eth0", "UsageError", "neither a VFIO cdev"),
    ("0000:00:09.0", "NotFound", "no PCI device 0000:00:09.0"),
    ("0000:00:03.0", "KernelError", "has no VFIO cdev"),    # on virtio-pci, not vfio-pci
])
def test_cdev_path_says_why_a_name_is_no_cdev(device, error, message):
    from pyiommufd import errors
    from pyiommufd.vfio import cdev_path
    from pyiommufd_testing import FakeKernel

    with FakeKernel() as k, pytest.raises(getattr(errors, error), match=message):
        cdev_path(device, k)


def test_cdev_path_of_a_bound_device_is_the_one_open_uses():
    from pyiommufd.vfio import cdev_path
    from pyiommufd_testing import FakeKernel, FakePciDevice

    with FakeKernel(devices=[FakePciDevice(driver="vfio-pci")]) as k:
        path, bdf = cdev_path("00:03.0", k)
        assert (path, bdf) == ("/dev/vfio/devices/vfio0", "0000:00:03.0")
        assert cdev_path("vfio0", k) == (path, None)
        with VfioDevice.open("00:03.0", backend=k) as dev:
            assert (dev.path, dev.bdf) == (path, bdf)
