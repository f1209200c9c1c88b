"""pyiommufd.iommufd against the fake kernel: every 7.3 iommufd command,
object ownership, buffer lifetime, input validation and typed errors."""
from __future__ import annotations

import errno as E
import mmap
import os
from types import SimpleNamespace

import pytest

from pyiommufd import backend, errors, ioctl, pci
from pyiommufd._uapi import ffi
from pyiommufd.backend import Backend
from pyiommufd.fdobject import FileKind
from pyiommufd.iommufd import (HWPT, IOAS, IOMMUFD, PAGE_SIZE, DirtyBitmap, FaultQueue, IovaRange,
                               Mapping, aligned_buffer, buffer_address)
from pyiommufd.memfd import MemFD
from pyiommufd_testing import FakeKernel
from pyiommufd.vfio import VfioDevice

BDF = "0000:00:03.0"
MiB = 1 << 20
LU_SEALS = 0x1 | 0x2 | 0x4


def _setup(kernel):
    pci.PciDevice(BDF, kernel).bind_vfio()
    ictx = IOMMUFD.open()
    dev = VfioDevice.open(BDF)
    dev.bind(ictx)
    return SimpleNamespace(k=kernel, ictx=ictx, dev=dev)


@pytest.fixture
def env(fake_kernel):
    e = _setup(fake_kernel)
    yield e
    e.dev.close()
    e.ictx.close()


@pytest.fixture
def series(series_kernel):
    e = _setup(series_kernel)
    yield e
    e.dev.close()
    e.ictx.close()


@pytest.fixture
def dirty_kernel():
    kernel = FakeKernel(dirty_tracking=True)
    with backend.use(kernel):
        try:
            yield kernel
        finally:
            kernel.shutdown()


def memfd(size=MiB, seals=LU_SEALS):
    m = MemFD.create("buffer")
    m.resize(size)
    if seals:
        m.add_seals(seals)
    return m


# -- the context --------------------------------------------------------------------
def test_open_close_and_fd_ownership(fake_kernel):
    ictx = IOMMUFD.open()
    fd = ictx.fileno()
    assert ictx.fd == fd and not ictx.closed and ictx.owned and ictx.kind is FileKind.IOMMUFD
    assert fake_kernel.known_fds()[fd] == "/dev/iommu"
    assert repr(ictx) == f"<IOMMUFD fd={fd} objects=[]>"
    ictx.close()
    ictx.close()                                            # idempotent
    assert ictx.closed and fd not in fake_kernel.known_fds()
    assert repr(ictx) == "<IOMMUFD closed objects=[]>"
    with pytest.raises(errors.UsageError):
        ictx.fileno()
    with pytest.raises(errors.UsageError):
        ictx.alloc_ioas()


def test_context_manager_closes(fake_kernel):
    with IOMMUFD.open() as ictx:
        fd = ictx.fileno()
    assert ictx.closed and fd not in fake_kernel.known_fds()


def test_open_missing_node_is_typed(fake_kernel):
    with pytest.raises(errors.IommufdError) as info:
        IOMMUFD.open("/dev/no-such-iommu")
    assert isinstance(info.value, errors.NotFound)
    assert info.value.op == "open(/dev/no-such-iommu)"


def test_from_fd_and_detach(fake_kernel):
    fd = fake_kernel.open("/dev/iommu")
    borrowed = IOMMUFD.from_fd(fd, owned=False)
    assert borrowed.alloc_ioas().id == 1
    borrowed.close()
    assert fd in fake_kernel.known_fds()                     # not ours to close
    owned = IOMMUFD.from_fd(fd)
    assert owned.detach() == fd
    assert owned.closed and fd in fake_kernel.known_fds()
    again = IOMMUFD.from_fd(fd)
    assert again.alloc_ioas().id == 2                         # the same kernel context
    again.close()
    assert fd not in fake_kernel.known_fds()


def test_bad_fd_is_usage_error():
    with pytest.raises(errors.UsageError):
        IOMMUFD.from_fd(-1)


# -- IOAS ----------------------------------------------------------------------------
def test_alloc_ioas_and_registry(fake_kernel):
    with IOMMUFD.open() as ictx:
        a, b = ictx.alloc_ioas(), ictx.alloc_ioas()
        assert (a.id, b.id) == (1, 2) and a.kind == "ioas"
        assert ictx.ioases == [a, b] and ictx.objects == [a, b] and ictx.hwpts == []
        assert repr(a) == "<IOAS id=1 mappings=0>"
        assert ictx.ioas(1) is a
        a.destroy()
        a.destroy()                                           # idempotent
        assert a.destroyed and ictx.ioases == [b]
        assert "destroyed" in repr(a)
        with pytest.raises(errors.UsageError):
            a.map(bytearray(PAGE_SIZE))
        with pytest.raises(errors.NotFound):
            ictx.destroy(1)                                   # gone from the kernel too
        ictx.destroy(b.id)                                     # by id, through the object
        assert b.destroyed


def test_ioas_wrapper_of_an_existing_id(fake_kernel):
    with IOMMUFD.open() as ictx:
        fd = ictx.fileno()
        raw = ioctl.call(fake_kernel, fd, ioctl.REGISTRY["IOMMU_IOAS_ALLOC"]).out_ioas_id
        with ictx.ioas(raw) as wrapped:
            assert wrapped.id == raw and not wrapped.owned
        assert not wrapped.destroyed                          # not owned: left alone
        with pytest.raises(errors.UsageError):
            ictx.ioas(0)


def test_ioas_context_exit_destroys(fake_kernel):
    with IOMMUFD.open() as ictx:
        with ictx.alloc_ioas() as ioas:
            pass
        assert ioas.destroyed and ictx.objects == []


def test_map_va_buffers(fake_kernel):
    with IOMMUFD.open() as ictx:
        ioas = ictx.alloc_ioas()
        mm = mmap.mmap(-1, 4 * PAGE_SIZE)
        iova = ioas.map(mm)
        (m,) = ioas.mappings
        assert isinstance(m, Mapping) and (m.iova, m.length, m.kind) == (iova, 4 * PAGE_SIZE, "va")
        assert m.buffer is mm and m.user_va == int(ffi.cast("uintptr_t", ffi.from_buffer(mm)))
        assert (m.readable, m.writeable, m.fd) == (True, True, None)
        ba = bytearray(2 * PAGE_SIZE)
        fixed = ioas.map(ba, 1 << 32)
        assert fixed == 1 << 32
        arr = ffi.new("char[]", PAGE_SIZE)
        assert ioas.map(arr, 2 << 32, readable=True, writeable=False) == 2 << 32
        ro = ioas.map(bytes(PAGE_SIZE), writeable=False)
        mv = ioas.map(memoryview(bytearray(3 * PAGE_SIZE)), length=PAGE_SIZE)
        assert [x.iova for x in ioas.mappings] == sorted([iova, fixed, 2 << 32, ro, mv])
        assert {x.length for x in ioas.mappings if x.iova == mv} == {PAGE_SIZE}


def test_map_keeps_the_buffer_until_unmap(fake_kernel):
    with IOMMUFD.open() as ictx:
        ioas = ictx.alloc_ioas()
        mm = mmap.mmap(-1, PAGE_SIZE)
        iova = ioas.map(mm)
        with pytest.raises(BufferError):
            mm.close()                                        # exported while mapped
        assert ioas.unmap(iova, PAGE_SIZE) == PAGE_SIZE
        assert ioas.mappings == []
        mm.close()                                            # released on unmap


def test_close_releases_buffers_and_detach_keeps_them(fake_kernel):
    ictx = IOMMUFD.open()
    ioas = ictx.alloc_ioas()
    mm = mmap.mmap(-1, PAGE_SIZE)
    ioas.map(mm)
    ictx.close()
    assert ioas.destroyed and ioas.mappings == []
    mm.close()

    ictx = IOMMUFD.open()
    ioas = ictx.alloc_ioas()
    kept = mmap.mmap(-1, PAGE_SIZE)
    ioas.map(kept)
    fd = ictx.detach()
    with pytest.raises(BufferError):
        kept.close()                                          # the new owner may still DMA there
    fake_kernel.close(fd)


def test_map_validation_happens_first(fake_kernel):
    with IOMMUFD.open() as ictx:
        ioas = ictx.alloc_ioas()
        buf = bytearray(PAGE_SIZE)
        bad = [
            lambda: ioas.map(bytearray()),                               # length 0
            lambda: ioas.map(buf, -PAGE_SIZE),                           # negative iova
            lambda: ioas.map(buf, (1 << 64) - PAGE_SIZE + PAGE_SIZE),    # past 2^64
            lambda: ioas.map(buf, (1 << 64) - PAGE_SIZE, length=2 * PAGE_SIZE),
            lambda: ioas.map(buf, readable=False, writeable=False),
            lambda: ioas.map(bytes(PAGE_SIZE)),                          # read-only, writeable
            lambda: ioas.map(12345),
            lambda: ioas.map(buf, length=2 * PAGE_SIZE),
            lambda: ioas.map(ffi.new("char *")),                         # pointer without length
            lambda: ioas.map(buf, 1 << 32, hint_iova=2 << 32),
            lambda: ioas.map(buf, True),
        ]
        for call in bad:
            with pytest.raises(errors.UsageError):
                call()
        assert ioas.mappings == []


def test_byte_granular_maps_are_left_to_the_kernel(fake_kernel):
    """No domain: the kernel's iova_alignment is 1 and it takes them; with
    huge pages off it is a page and the kernel's EINVAL comes through."""
    with IOMMUFD.open() as ictx:
        ioas = ictx.alloc_ioas()
        assert ioas.map(bytearray(100), 0x123) == 0x123
        m = memfd(MiB)
        assert ioas.map_file(m, start=100, length=PAGE_SIZE + 1, iova=7 << 20) == 7 << 20
        assert ioas.unmap(0x123, 100) == 100
        assert ioas.unmap(7 << 20, PAGE_SIZE + 1) == PAGE_SIZE + 1
        ioas.huge_pages(False)
        with pytest.raises(errors.InvalidArgument) as info:
            ioas.map(aligned_buffer(PAGE_SIZE), 0x123)
        assert "iova 0x123 not page aligned" in str(info.value)
        assert ioas.mappings == []


def test_buffer_address():
    arr = ffi.new("char[]", 64)
    addr, size, pin = buffer_address(arr, writable=True)
    assert (addr, size, pin) == (int(ffi.cast("uintptr_t", arr)), 64, None)
    ptr = ffi.cast("char *", arr)
    assert buffer_address(ptr, writable=True, length=32)[1] == 32


def test_unaligned_buffer_with_a_domain(env):
    ioas = env.ictx.alloc_ioas()
    env.ictx.alloc_hwpt(env.dev, ioas)
    buf = bytearray(3 * PAGE_SIZE)
    addr = buffer_address(buf, writable=True)[0]
    start = (-addr % PAGE_SIZE) + 16                              # 16 bytes past a page boundary
    unaligned = memoryview(buf)[start:start + PAGE_SIZE]
    with pytest.raises(errors.InvalidArgument) as info:
        ioas.map(unaligned)
    assert "not page aligned" in info.value.detail
    assert ioas.map(aligned_buffer(PAGE_SIZE)) % PAGE_SIZE == 0
    with pytest.raises(errors.UsageError):
        aligned_buffer(100)


def test_map_overlap_is_kernel_eexist(fake_kernel):
    with IOMMUFD.open() as ictx:
        ioas = ictx.alloc_ioas()
        ioas.map(bytearray(PAGE_SIZE), 1 << 32)
        with pytest.raises(errors.IommufdError) as info:
            ioas.map(bytearray(PAGE_SIZE), 1 << 32)
        assert isinstance(info.value, errors.AlreadyExists)
        assert len(ioas.mappings) == 1


def test_map_hint_iova_is_not_fixed(fake_kernel):
    with IOMMUFD.open() as ictx:
        ioas = ictx.alloc_ioas()
        mm = mmap.mmap(-1, PAGE_SIZE)
        got = ioas.map(mm, hint_iova=1 << 32)
        assert got != 1 << 32                                 # 7.3 ignores the hint: first fit
        m = memfd()
        assert ioas.map_file(m, hint_iova=1 << 32) != 1 << 32


def test_map_file(fake_kernel):
    with IOMMUFD.open() as ictx:
        ioas = ictx.alloc_ioas()
        m = memfd(2 * MiB)
        whole = ioas.map_file(m)                              # length: to the end of the file
        half = ioas.map_file(m.fileno(), start=MiB, length=MiB, iova=1 << 32, writeable=False)
        assert half == 1 << 32
        by_iova = {x.iova: x for x in ioas.mappings}
        a, b = by_iova[whole], by_iova[half]
        assert (a.kind, a.length, a.start, a.fd, a.file) == ("file", 2 * MiB, 0, m.fileno(), m)
        assert (b.kind, b.length, b.start, b.fd, b.file, b.writeable) == ("file", MiB, MiB, m.fileno(), None, False)


def test_map_file_validation(fake_kernel):
    with IOMMUFD.open() as ictx:
        ioas = ictx.alloc_ioas()
        m = memfd(MiB)
        for call in (
            lambda: ioas.map_file("not a file"),
            lambda: ioas.map_file(-3),
            lambda: ioas.map_file(m, start=MiB),                 # nothing left to map
            lambda: ioas.map_file(m, length=0),
            lambda: ioas.map_file(m, start=-PAGE_SIZE),
            lambda: ioas.map_file(m, iova=-7),
        ):
            with pytest.raises(errors.UsageError):
                call()
        with pytest.raises(errors.IommufdError) as info:
            ioas.map_file(99999, length=PAGE_SIZE)             # the kernel: EBADF
        assert isinstance(info.value, errors.BadFd)


def test_unmap(fake_kernel):
    with IOMMUFD.open() as ictx:
        ioas = ictx.alloc_ioas()
        a = ioas.map(bytearray(PAGE_SIZE), 1 << 32)
        b = ioas.map(bytearray(PAGE_SIZE), (1 << 32) + PAGE_SIZE)
        ioas.map(bytearray(PAGE_SIZE), 2 << 32)
        assert ioas.unmap(a, 2 * PAGE_SIZE) == 2 * PAGE_SIZE
        assert [m.iova for m in ioas.mappings] == [2 << 32]
        with pytest.raises(errors.IommufdError) as info:
            ioas.unmap(a, PAGE_SIZE)                          # nothing there any more
        err = info.value
        assert isinstance(err, errors.NotFound) and err.op == "IOMMU_IOAS_UNMAP"
        assert "no mapping" in err.hint
        for call in (lambda: ioas.unmap(a, 0), lambda: ioas.unmap(-PAGE_SIZE, PAGE_SIZE),
                     lambda: ioas.unmap((1 << 64) - PAGE_SIZE, 2 * PAGE_SIZE)):
            with pytest.raises(errors.UsageError):
                call()
        for call in (lambda: ioas.unmap(a, 100), lambda: ioas.unmap(3, PAGE_SIZE)):
            with pytest.raises(errors.NotFound):              # byte granular: the kernel judges
                call()
        assert ioas.unmap_all() == PAGE_SIZE
        assert ioas.mappings == [] and ioas.unmap_all() == 0
        assert b


def test_copy(fake_kernel):
    with IOMMUFD.open() as ictx:
        src, dst = ictx.alloc_ioas(), ictx.alloc_ioas()
        m = memfd(MiB)
        at = src.map_file(m, iova=1 << 32)
        got = dst.copy(src, at + PAGE_SIZE, 2 * PAGE_SIZE)
        (c,) = dst.mappings
        assert (c.iova, c.length, c.kind, c.fd, c.start, c.file) == (got, 2 * PAGE_SIZE, "file", m.fileno(), PAGE_SIZE, m)
        assert c.copied_from == (src.id, at + PAGE_SIZE)
        mm = mmap.mmap(-1, 2 * PAGE_SIZE)
        va = src.map(mm)
        fixed = dst.copy(src.id, va, PAGE_SIZE, 3 << 32, writeable=False)
        assert fixed == 3 << 32
        vcopy = {x.iova: x for x in dst.mappings}[fixed]
        assert vcopy.kind == "va" and vcopy.buffer is mm and not vcopy.writeable
        src.unmap(va, 2 * PAGE_SIZE)
        with pytest.raises(BufferError):
            mm.close()                                        # the copy still holds it
        dst.unmap(fixed, PAGE_SIZE)
        mm.close()
        with pytest.raises(errors.NotFound):
            dst.copy(src, 5 << 32, PAGE_SIZE)                 # nothing mapped there
        for call in (lambda: dst.copy(src, at, 0), lambda: dst.copy(src, -1, PAGE_SIZE),
                     lambda: dst.copy(src, at, PAGE_SIZE, readable=False, writeable=False)):
            with pytest.raises(errors.UsageError):
                call()
        # byte granular, no domain on either side: the kernel takes it
        assert dst.copy(src, at + 1, PAGE_SIZE, (6 << 32) + 5) == (6 << 32) + 5


def test_copy_of_a_range_mapped_elsewhere(fake_kernel):
    with IOMMUFD.open() as ictx:
        src, dst = ictx.alloc_ioas(), ictx.alloc_ioas()
        fd = ictx.fileno()
        mm = mmap.mmap(-1, PAGE_SIZE)
        raw = ioctl.call(fake_kernel, fd, ioctl.REGISTRY["IOMMU_IOAS_MAP"], flags=1 | 2 | 4, ioas_id=src.id,
                         user_va=int(ffi.cast("uintptr_t", ffi.from_buffer(mm))), length=PAGE_SIZE,
                         iova=1 << 32).iova
        got = dst.copy(src, raw, PAGE_SIZE)
        assert dst.mappings[0].kind == "unknown" and dst.mappings[0].iova == got


def test_objects_of_another_context_are_refused(fake_kernel):
    with IOMMUFD.open() as one, IOMMUFD.open() as two:
        a, b = one.alloc_ioas(), two.alloc_ioas()
        with pytest.raises(errors.UsageError):
            a.copy(b, 0, PAGE_SIZE)
        with pytest.raises(errors.UsageError):
            one.vfio_ioas("set", b)


def test_iova_ranges_and_alignment(env):
    ioas = env.ictx.alloc_ioas()
    assert ioas.iova_ranges() == [IovaRange(0, (1 << 64) - 1)]
    assert ioas.iova_alignment() == 1
    hwpt = env.ictx.alloc_hwpt(env.dev, ioas)
    env.dev.attach(hwpt)
    ranges = ioas.iova_ranges()
    assert len(ranges) == 2                                   # the MSI window is reserved
    assert 0xFEE00000 not in ranges[0] and 0xFEE00000 not in ranges[1]
    assert ranges[0].start == 0 and ranges[0].length == 0xFEE00000
    assert ioas.iova_alignment() == PAGE_SIZE


class CountingBackend:
    """Wraps a backend and counts the ioctls that go through it."""

    def __init__(self, inner):
        self.inner = inner
        self.requests = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def ioctl(self, fd, request, arg):
        self.requests.append(request)
        return self.inner.ioctl(fd, request, arg)


def test_iova_ranges_grows_on_emsgsize(env):
    counting = CountingBackend(env.k)
    ictx = IOMMUFD.from_fd(env.ictx.fileno(), backend=counting, owned=False)
    ioas = ictx.alloc_ioas()
    env.dev.attach(ictx.alloc_hwpt(env.dev.dev_id, ioas).id)
    ioas.ranges_initial = 1                                    # the kernel has 2: EMSGSIZE, then again
    del counting.requests[:]
    ranges = ioas.iova_ranges()
    assert len(ranges) == 2 and ranges[0].last == 0xFEDFFFFF
    assert counting.requests == [ioctl.REGISTRY["IOMMU_IOAS_IOVA_RANGES"].request] * 2
    ioas.ranges_initial = 8
    del counting.requests[:]
    assert ioas.iova_ranges() == ranges and len(counting.requests) == 1


def test_allow_iovas(fake_kernel):
    with IOMMUFD.open() as ictx:
        ioas = ictx.alloc_ioas()
        ioas.allow_iovas([(1 << 32, (2 << 32) - 1)])
        assert ioas.iova_ranges() == [IovaRange(0, (1 << 64) - 1)]   # allowed ranges are not listed
        assert (1 << 32) <= ioas.map(bytearray(PAGE_SIZE)) < (2 << 32)
        ioas.allow_iovas([IovaRange(3 << 32, (4 << 32) - 1), (5 << 32, (6 << 32) - 1)])
        assert (3 << 32) <= ioas.map(mmap.mmap(-1, PAGE_SIZE)) < (4 << 32)
        ioas.allow_iovas([])
        for bad in ([(5, 4)], [(1, 2, 3)], ["x"], [(-1, 5)]):
            with pytest.raises(errors.UsageError):
                ioas.allow_iovas(bad)


def test_change_process(fake_kernel):
    with IOMMUFD.open() as ictx:
        ioas = ictx.alloc_ioas()
        ioas.map_file(memfd())
        ictx.change_process()                                 # file mappings only: fine
        ioas.map(bytearray(PAGE_SIZE))
        with pytest.raises(errors.IommufdError) as info:
            ictx.change_process()
        assert isinstance(info.value, errors.InvalidArgument)


def test_options(fake_kernel):
    with IOMMUFD.open() as ictx:
        assert ictx.option("rlimit_mode") == 0
        assert ictx.option("rlimit_mode", 1) == 1
        assert ictx.option(0) == 1
        ioas = ictx.alloc_ioas()
        with pytest.raises(errors.Busy):
            ictx.option("rlimit_mode", 0)                     # objects exist already
        assert ioas.huge_pages() is True
        assert ioas.huge_pages(False) is False
        assert ictx.option("huge_pages", object_id=ioas) == 0
        assert ictx.option("HUGE_PAGES", True, object_id=ioas.id) == 1
        for call in (lambda: ictx.option("nope"), lambda: ictx.option("rlimit_mode", object_id=ioas),
                     lambda: ictx.option("huge_pages"), lambda: ictx.option("huge_pages", -1, object_id=ioas)):
            with pytest.raises(errors.UsageError):
                call()
        with pytest.raises(errors.InvalidArgument):
            ictx.option("huge_pages", 2, object_id=ioas)      # the kernel's own answer
        with pytest.raises(errors.NotSupported):
            ictx.option(7)


def test_huge_pages_refused_with_mapped_domains(env):
    ioas = env.ictx.alloc_ioas()
    env.ictx.alloc_hwpt(env.dev, ioas)
    ioas.map(aligned_buffer(PAGE_SIZE))
    with pytest.raises(errors.IommufdError) as info:
        ioas.huge_pages(False)
    assert isinstance(info.value, errors.InvalidArgument)


def test_open_needs_root():
    kernel = FakeKernel(euid=1000)
    with backend.use(kernel):
        try:
            with pytest.raises(errors.IommufdError) as info:
                IOMMUFD.open()
            assert isinstance(info.value, errors.PermissionDenied)
            assert "root" in info.value.hint
        finally:
            kernel.shutdown()


def test_vfio_ioas(fake_kernel):
    with IOMMUFD.open() as ictx:
        with pytest.raises(errors.IommufdError) as info:
            ictx.vfio_ioas()
        assert isinstance(info.value, errors.NoDevice)
        ioas = ictx.alloc_ioas()
        assert ictx.vfio_ioas("set", ioas) is None
        assert ictx.vfio_ioas("get") == ioas.id
        ictx.vfio_ioas("clear")
        with pytest.raises(errors.NoDevice):
            ictx.vfio_ioas("get")
        for call in (lambda: ictx.vfio_ioas("set"), lambda: ictx.vfio_ioas("get", ioas),
                     lambda: ictx.vfio_ioas("bogus"), lambda: ictx.vfio_ioas(9)):
            with pytest.raises(errors.UsageError):
                call()


# -- HWPT ------------------------------------------------------------------------------
def test_alloc_hwpt_and_lifetime(env):
    ioas = env.ictx.alloc_ioas()
    with env.ictx.alloc_hwpt(env.dev, ioas) as hwpt:
        assert isinstance(hwpt, HWPT) and hwpt.kind == "hwpt"
        assert (hwpt.parent, hwpt.parent_id, hwpt.dev_id, hwpt.flags) == (ioas, ioas.id, env.dev.dev_id, 0)
        assert hwpt.ioas is ioas and not hwpt.nested and not hwpt.marked
        assert repr(hwpt) == f"<HWPT id={hwpt.id} pt={ioas.id}>"
        assert env.ictx.hwpts == [hwpt]
        with pytest.raises(errors.IommufdError) as info:
            ioas.destroy()                                    # the HWPT uses it
        assert isinstance(info.value, errors.Busy) and "still in use" in info.value.hint
        env.dev.attach(hwpt)
        with pytest.raises(errors.Busy):
            hwpt.destroy()                                    # attached
        env.dev.detach_pt()
    assert hwpt.destroyed and env.ictx.hwpts == []
    ioas.destroy()


def test_alloc_hwpt_by_ids_and_flags(env):
    ioas = env.ictx.alloc_ioas()
    hwpt = env.ictx.alloc_hwpt(env.dev.dev_id, ioas.id, pasid=True)
    assert hwpt.parent is ioas and hwpt.flags & 0x8
    fq = env.ictx.alloc_fault_queue()
    with_fault = env.ictx.alloc_hwpt(env.dev, ioas, fault_queue=fq)
    assert with_fault.fault_queue is fq and with_fault.flags & 0x4


def test_alloc_hwpt_validation(env):
    ioas = env.ictx.alloc_ioas()
    unbound = VfioDevice.open(BDF)
    try:
        for call in (
            lambda: env.ictx.alloc_hwpt(unbound, ioas),
            lambda: env.ictx.alloc_hwpt(True, ioas),
            lambda: env.ictx.alloc_hwpt(env.dev, ioas, data=b"\0" * 24),
            lambda: env.ictx.alloc_hwpt(env.dev, ioas, data_type="nope", data=b"x"),
            lambda: env.ictx.alloc_hwpt(env.dev, ioas, data_type="vtd_s1"),
            lambda: env.ictx.alloc_hwpt(env.dev, ioas, data_type="vtd_s1", data={"bogus": 1}),
            lambda: env.ictx.alloc_hwpt(env.dev, ioas, data_type="vtd_s1", data=3.5),
            lambda: env.ictx.alloc_hwpt(env.dev, ioas, flags=-1),
            lambda: env.ictx.alloc_hwpt(env.dev, -4),
        ):
            with pytest.raises(errors.UsageError):
                call()
    finally:
        unbound.close()


def test_alloc_hwpt_kernel_errors(env):
    ioas = env.ictx.alloc_ioas()
    with pytest.raises(errors.IommufdError) as info:
        env.ictx.alloc_hwpt(env.dev, ioas, dirty_tracking=True)   # this VT-d lacks it
    assert isinstance(info.value, errors.NotSupported)
    assert "flags or data type" in info.value.hint
    parent = env.ictx.alloc_hwpt(env.dev, ioas)
    with pytest.raises(errors.IommufdError):                    # nested: not on this fake VT-d
        env.ictx.alloc_hwpt(env.dev, parent, data_type="vtd_s1",
                            data={"flags": 0, "pgtbl_addr": 0x1000, "addr_width": 48})
    with pytest.raises(errors.NotFound):
        env.ictx.alloc_hwpt(77, ioas)                            # no such device


def test_hwpt_exit_with_a_pending_exception_does_not_mask_it(env):
    ioas = env.ictx.alloc_ioas()
    with pytest.raises(RuntimeError):
        with env.ictx.alloc_hwpt(env.dev, ioas) as hwpt:
            env.dev.attach(hwpt)                               # so DESTROY will say EBUSY
            raise RuntimeError("boom")
    assert not hwpt.destroyed


def test_invalidate(env):
    ioas = env.ictx.alloc_ioas()
    hwpt = env.ictx.alloc_hwpt(env.dev, ioas)
    with pytest.raises(errors.IommufdError) as info:
        hwpt.invalidate([{"addr": 0x1000, "npages": 1, "flags": 0}])   # paging HWPTs take none
    assert isinstance(info.value, errors.InvalidArgument)
    assert "0 of 1 entries handled" in info.value.detail
    with pytest.raises(errors.InvalidArgument):
        hwpt.invalidate(bytes(48), data_type="vtd_s1")
    for call in (lambda: hwpt.invalidate(bytes(10), data_type="vtd_s1"),
                 lambda: hwpt.invalidate(bytes(8), data_type=9),
                 lambda: hwpt.invalidate([{"addr": 1}], data_type=9),
                 lambda: hwpt.invalidate([b"short"], data_type="vtd_s1"),
                 lambda: hwpt.invalidate([], data_type="nope")):
        with pytest.raises(errors.UsageError):
            call()


def test_dirty_tracking(dirty_kernel):
    e = _setup(dirty_kernel)
    ioas = e.ictx.alloc_ioas()
    hwpt = e.ictx.alloc_hwpt(e.dev, ioas, dirty_tracking=True)
    e.dev.attach(hwpt)
    ioas.map_file(memfd(), iova=1 << 32)
    hwpt.set_dirty_tracking(True)
    bitmap = hwpt.get_dirty_bitmap(1 << 32, MiB)
    assert isinstance(bitmap, DirtyBitmap)
    assert (bitmap.iova, bitmap.length, bitmap.page_size, bitmap.npages) == (1 << 32, MiB, PAGE_SIZE, 256)
    assert len(bitmap.bitmap) == 32 and bitmap.count == 0 and bitmap.dirty_iovas() == []
    assert not bitmap.is_dirty(1 << 32)
    with pytest.raises(errors.UsageError):
        bitmap.is_dirty(0)
    assert hwpt.get_dirty_bitmap(1 << 32, 2 * MiB, page_size=2 * MiB, clear=False).npages == 1
    hwpt.set_dirty_tracking(False)
    for call in (lambda: hwpt.get_dirty_bitmap(1 << 32, 0), lambda: hwpt.get_dirty_bitmap(1 << 32, MiB, 3000),
                 lambda: hwpt.get_dirty_bitmap((1 << 32) + 4096, MiB, 2 * MiB),
                 lambda: hwpt.get_dirty_bitmap(1 << 32, PAGE_SIZE + 1)):
        with pytest.raises(errors.UsageError):
            call()
    e.dev.close()
    e.ictx.close()


def test_dirty_tracking_unsupported(env):
    ioas = env.ictx.alloc_ioas()
    hwpt = env.ictx.alloc_hwpt(env.dev, ioas)
    with pytest.raises(errors.NotSupported):
        hwpt.set_dirty_tracking(True)
    with pytest.raises(errors.NotSupported):
        hwpt.get_dirty_bitmap(0, MiB)


def test_dirty_bitmap_decoding():
    bm = DirtyBitmap(0x10000, 16 * PAGE_SIZE, PAGE_SIZE, bytes([0b101, 0x80]))
    assert bm.dirty_iovas() == [0x10000, 0x12000, 0x10000 + 15 * PAGE_SIZE]
    assert bm.count == 3 and bm.is_dirty(0x12000) and not bm.is_dirty(0x11000)


# -- live-update mark ---------------------------------------------------------------------
def test_mark_preserved(series):
    ioas = series.ictx.alloc_ioas()
    hwpt = series.ictx.alloc_hwpt(series.dev, ioas)
    series.dev.attach(hwpt)
    ioas.map_file(memfd())
    hwpt.mark_preserved(0x789012, abi="lu-v2")
    assert hwpt.marked and hwpt.preserve_token == 0x789012 and hwpt.preserve_abi == "lu-v2"
    assert repr(hwpt) == f"<HWPT id={hwpt.id} pt={ioas.id} token=0x789012>"
    hwpt.mark_preserved(0x42)                                    # re-mark overwrites; abi probed
    assert hwpt.preserve_token == 0x42
    other = series.ictx.alloc_hwpt(series.dev, ioas)
    with pytest.raises(errors.IommufdError) as info:
        other.mark_preserved(0x42, abi="lu-v2")
    assert isinstance(info.value, errors.AddressInUse) and "unique per iommufd" in info.value.hint
    assert not other.marked
    for bad in (-1, 1 << 64, "x", True):
        with pytest.raises(errors.UsageError):
            hwpt.mark_preserved(bad)


def test_marked_hwpt_is_never_destroyed_implicitly(series):
    ioas = series.ictx.alloc_ioas()
    with series.ictx.alloc_hwpt(series.dev, ioas) as hwpt:
        hwpt.mark_preserved(7, abi="lu-v2")
    assert not hwpt.destroyed                                     # the mark is permanent
    assert series.ictx.hwpts == [hwpt]
    hwpt.destroy()                                                # explicitly: the only way to unmark
    assert hwpt.destroyed


def test_mark_on_stock_73_hits_noiommu_get_pa(env):
    ioas = env.ictx.alloc_ioas()
    hwpt = env.ictx.alloc_hwpt(env.dev, ioas)
    with pytest.raises(errors.IommufdError) as info:
        hwpt.mark_preserved(1, abi="lu-v2")
    assert isinstance(info.value, errors.InvalidArgument)
    assert "NOIOMMU_GET_PA" in info.value.hint
    assert not hwpt.marked
    with pytest.raises(errors.AbiError):
        hwpt.mark_preserved(1)                                    # the probe finds no LU ioctl


def test_mark_refuses_nested_hwpts_before_the_kernel(env):
    nested = HWPT(env.ictx, 99, data_type=1)
    with pytest.raises(errors.UsageError):
        nested.mark_preserved(1, abi="lu-v2")


def test_mark_v1_token_width(series_kernel_v1):
    e = _setup(series_kernel_v1)
    ioas = e.ictx.alloc_ioas()
    hwpt = e.ictx.alloc_hwpt(e.dev, ioas)
    with pytest.raises(errors.UsageError):
        hwpt.mark_preserved(1 << 32, abi="lu-v1")
    hwpt.mark_preserved((1 << 32) - 1, abi="lu-v1")
    assert hwpt.preserve_abi == "lu-v1"
    e.dev.close()
    e.ictx.close()


# -- GET_HW_INFO --------------------------------------------------------------------------
def test_get_hw_info(env):
    info = env.ictx.get_hw_info(env.dev)
    assert info.dev_id == env.dev.dev_id and info.type_name == "intel_vtd" and info.data_type == 1
    assert info.data_len == 24 and len(info.data) == 24
    assert info.vtd is not None and info.vtd.errata_772415_spr17
    assert info.vtd.cap_reg == int.from_bytes(info.data[8:16], "little")
    assert info.vtd.ecap_reg == int.from_bytes(info.data[16:24], "little")
    assert info.decoded == {"flags": info.vtd.flags, "cap_reg": info.vtd.cap_reg, "ecap_reg": info.vtd.ecap_reg}
    # QEMU's virtio-net-pci has no ATS (device.c:1709-1711)
    assert info.capability_names == ["pci_ats_not_supported"] and not info.dirty_tracking
    assert info.max_pasid_log2 >= 0
    again = env.ictx.get_hw_info(env.dev.dev_id, data_type=1, buffer_size=8)   # grows to 24
    assert again.data == info.data and again.vtd == info.vtd
    with pytest.raises(errors.NotSupported):
        env.ictx.get_hw_info(env.dev, data_type=2)           # not an SMMUv3
    with pytest.raises(errors.NotFound):
        env.ictx.get_hw_info(42)
    with pytest.raises(errors.UsageError):
        env.ictx.get_hw_info(env.dev, buffer_size=-1)


def test_get_hw_info_capabilities(dirty_kernel):
    e = _setup(dirty_kernel)
    info = e.ictx.get_hw_info(e.dev)
    assert info.dirty_tracking and info.capability_names == ["dirty_tracking", "pci_ats_not_supported"]
    e.dev.close()
    e.ictx.close()


# -- fault queues, vIOMMU and friends ----------------------------------------------------------
def test_fault_queue(env):
    fq = env.ictx.alloc_fault_queue()
    assert isinstance(fq, FaultQueue) and fq.kind == "fault"
    fd = fq.fileno()
    assert env.k.known_fds()[fd]
    assert repr(fq) == f"<FaultQueue id={fq.id} fd={fd}>"
    fq.destroy()                                                  # closes the fd first (it pins the object)
    assert fq.destroyed and fd not in env.k.known_fds()
    with pytest.raises(errors.UsageError):
        fq.fileno()


def test_fault_queue_read_and_respond(env):
    fq = env.ictx.alloc_fault_queue()
    assert fq.read_faults() == []                                # nothing pending
    with pytest.raises(errors.IommufdError):
        fq.respond(12345)                                         # no fault group with that cookie
    for call in (lambda: fq.read_faults(0), lambda: fq.respond(-1), lambda: fq.respond(1, code=1 << 32)):
        with pytest.raises(errors.UsageError):
            call()
    fq.close()
    fq.close()
    with pytest.raises(errors.UsageError):
        fq.read_faults()


def test_fault_queue_closed_with_the_context(fake_kernel):
    ictx = IOMMUFD.open()
    fq = ictx.alloc_fault_queue()
    fd = fq.fileno()
    ictx.close()
    assert fq.destroyed and fd not in fake_kernel.known_fds()


def test_viommu_family(env):
    ioas = env.ictx.alloc_ioas()
    parent = env.ictx.alloc_hwpt(env.dev, ioas)
    with pytest.raises(errors.NotSupported):
        env.ictx.alloc_viommu(env.dev, parent, type="arm_smmuv3")    # VT-d has no vIOMMU in 7.3
    with pytest.raises(errors.NotSupported):
        env.ictx.alloc_viommu(env.dev, parent)                        # type 0 is not allocatable
    with pytest.raises(errors.NotFound):
        env.ictx.alloc_vdevice(5, env.dev, 0x100)
    with pytest.raises(errors.NotFound):
        env.ictx.alloc_veventq(5, type="arm_smmuv3", depth=16)
    with pytest.raises(errors.NotFound):
        env.ictx.alloc_hw_queue(5, type="tegra241_cmdqv", index=0, base_addr=1 << 32, length=PAGE_SIZE)
    for call in (lambda: env.ictx.alloc_viommu(env.dev, parent, type="bogus"),
                 lambda: env.ictx.alloc_vdevice(5, env.dev, -1),
                 lambda: env.ictx.alloc_veventq(5, depth=0),
                 lambda: env.ictx.alloc_hw_queue(5, type="default", index=0, base_addr=0, length=0),
                 lambda: env.ictx.alloc_hw_queue(5, type="default", index=-1, base_addr=0, length=64)):
        with pytest.raises(errors.UsageError):
            call()


def test_noiommu_get_pa(env):
    ioas = env.ictx.alloc_ioas()
    with pytest.raises(errors.IommufdError) as info:
        env.ictx.noiommu_get_pa(ioas, 0, PAGE_SIZE)             # CONFIG_IOMMUFD_NOIOMMU=n
    assert isinstance(info.value, errors.NotSupported)
    with pytest.raises(errors.NotSupported):
        ioas.noiommu_get_pa(0, 1)
    with pytest.raises(errors.UsageError):
        ioas.noiommu_get_pa(0, 0)


def test_noiommu_get_pa_on_a_series_kernel_reaches_the_mark_ioctl(series):
    """Same request value 0x3b95 (seed-spec 2.2): the series' mark ioctl sees
    a 40-byte struct with a non-zero tail and refuses it with E2BIG."""
    ioas = series.ictx.alloc_ioas()
    with pytest.raises(errors.IommufdError) as info:
        series.ictx.noiommu_get_pa(ioas, 1 << 32, PAGE_SIZE)
    assert isinstance(info.value, errors.TooBig)


def test_generic_destroy_by_id(fake_kernel):
    with IOMMUFD.open() as ictx:
        fd = ictx.fileno()
        raw = ioctl.call(fake_kernel, fd, ioctl.REGISTRY["IOMMU_IOAS_ALLOC"]).out_ioas_id
        ictx.destroy(raw)                                          # not one of ours: a plain IOMMU_DESTROY
        with pytest.raises(errors.NotFound):
            ictx.destroy(raw)
        with pytest.raises(errors.UsageError):
            ictx.destroy(-1)


def test_objects_after_close(fake_kernel):
    ictx = IOMMUFD.open()
    ioas = ictx.alloc_ioas()
    ictx.close()
    assert ioas.destroyed
    ioas.destroy()                                                # no-op
    with pytest.raises(errors.UsageError):
        ioas.iova_ranges()


def test_destroy_of_a_closed_context_object(fake_kernel):
    ictx = IOMMUFD.open()
    ioas = IOAS(ictx, 1)
    ictx.close()
    ioas.destroy()                                                # the kernel dropped it with the file
    assert ioas.destroyed


def test_enomem_hint_mentions_memlock():
    err = errors.make_error("IOMMU_IOAS_MAP", "iommufd", E.ENOMEM)
    assert "RLIMIT_MEMLOCK" in err.hint and "RLIMIT_MODE" in err.hint
    assert os.strerror(E.ENOMEM) in str(err)


# -- a scripted kernel for what the fake VT-d cannot do (vIOMMU, nesting, noiommu) -----------------
class Scripted(Backend):
    """Answers iommufd ioctls with handlers that decode the argument bytes."""

    name = "scripted"

    def __init__(self):
        self.handlers = {}
        self.closed = []
        self.reads = {}

    def close(self, fd):
        self.closed.append(fd)

    def ioctl(self, fd, request, arg):
        handler = self.handlers.get(request)
        if handler is None:
            raise backend.oserror(E.ENOTTY)
        nr = request & 0xFF
        struct = {0x80: "iommu_destroy", 0x89: "iommu_hwpt_alloc", 0x8a: "iommu_hw_info",
                  0x8d: "iommu_hwpt_invalidate", 0x90: "iommu_viommu_alloc", 0x91: "iommu_vdevice_alloc",
                  0x93: "iommu_veventq_alloc", 0x94: "iommu_hw_queue_alloc",
                  0x95: "iommu_ioas_noiommu_get_pa"}[nr]
        return handler(ffi.from_buffer(f"struct {struct} *", arg)) or 0

    def read(self, fd, length):
        return self.reads.get(fd, b"")[:length]


def req(name):
    return ioctl.const(name)


def test_viommu_family_scripted():
    k = Scripted()
    seen = {}

    def viommu(cmd):
        assert (cmd.type, cmd.dev_id, cmd.hwpt_id, cmd.data_len) == (2, 1, 3, 16)
        data = ffi.cast("struct iommu_viommu_tegra241_cmdqv *", cmd.data_uptr)
        data.out_vintf_mmap_offset, data.out_vintf_mmap_length = 0x1000, 0x2000
        cmd.out_viommu_id = 10

    def vdevice(cmd):
        assert (cmd.viommu_id, cmd.dev_id, cmd.virt_id) == (10, 1, 0x42)
        cmd.out_vdevice_id = 11

    def veventq(cmd):
        assert (cmd.viommu_id, cmd.type, cmd.veventq_depth) == (10, 1, 32)
        cmd.out_veventq_id, cmd.out_veventq_fd = 12, 50

    def hw_queue(cmd):
        assert (cmd.viommu_id, cmd.type, cmd.index, cmd.nesting_parent_iova, cmd.length) == (10, 1, 0, 1 << 30, 64)
        cmd.out_hw_queue_id = 13

    def invalidate(cmd):
        assert (cmd.hwpt_id, cmd.data_type, cmd.entry_len, cmd.entry_num) == (10, 1, 16, 2)
        raw = bytes(ffi.buffer(ffi.cast("char *", cmd.data_uptr), 32))
        seen["inv"] = raw
        cmd.entry_num = 1
        raise backend.oserror(E.EIO)

    def destroy(cmd):
        seen.setdefault("destroyed", []).append(int(cmd.id))

    for name, fn in (("IOMMU_VIOMMU_ALLOC", viommu), ("IOMMU_VDEVICE_ALLOC", vdevice),
                     ("IOMMU_VEVENTQ_ALLOC", veventq), ("IOMMU_HW_QUEUE_ALLOC", hw_queue),
                     ("IOMMU_HWPT_INVALIDATE", invalidate), ("IOMMU_DESTROY", destroy)):
        k.handlers[req(name)] = fn
    ictx = IOMMUFD.from_fd(3, backend=k)
    parent = HWPT(ictx, 3)
    ictx._register(parent)
    vi = ictx.alloc_viommu(1, parent, type="tegra241_cmdqv", data=bytes(16))
    assert vi.id == 10 and vi.hwpt is parent and vi.kind == "viommu"
    assert int.from_bytes(vi.data[:8], "little") == 0x1000 and int.from_bytes(vi.data[8:], "little") == 0x2000
    vd = ictx.alloc_vdevice(vi, 1, 0x42)
    assert (vd.id, vd.viommu_id, vd.virt_id) == (11, 10, 0x42)
    q = ictx.alloc_veventq(vi, type="arm_smmuv3", depth=32)
    assert (q.id, q.fileno(), q.depth) == (12, 50, 32)
    k.reads[50] = b"\x01" * 40
    assert q.read(16) == b"\x01" * 16
    hq = ictx.alloc_hw_queue(vi, type="tegra241_cmdqv", index=0, base_addr=1 << 30, length=64)
    assert (hq.id, hq.base_addr, hq.length) == (13, 1 << 30, 64)
    with pytest.raises(errors.IommufdError) as info:
        vi.invalidate([b"\x01" * 16, b"\x02" * 16], data_type="arm_smmuv3")
    assert isinstance(info.value, errors.IOFailure) and "1 of 2 entries handled" in info.value.detail
    assert seen["inv"] == b"\x01" * 16 + b"\x02" * 16
    with q:
        pass
    assert 50 in k.closed and q.destroyed                         # fd closed before DESTROY
    hq.destroy()
    vd.destroy()
    vi.destroy()
    assert seen["destroyed"] == [12, 13, 11, 10]
    assert ictx.objects == [parent]
    ictx.detach()


def test_nested_hwpt_and_noiommu_scripted():
    k = Scripted()
    seen = {}

    def hwpt_alloc(cmd):
        seen["data"] = bytes(ffi.buffer(ffi.cast("char *", cmd.data_uptr), cmd.data_len))
        seen["flags"] = int(cmd.flags)
        assert (cmd.pt_id, cmd.data_type, cmd.fault_id) == (5, 1, 9)
        cmd.out_hwpt_id = 6

    def get_pa(cmd):
        assert (cmd.ioas_id, cmd.iova, cmd.length) == (2, 1 << 32, 3 * PAGE_SIZE)
        cmd.out_phys, cmd.length = 0x1234000, PAGE_SIZE

    k.handlers[req("IOMMU_HWPT_ALLOC")] = hwpt_alloc
    k.handlers[req("IOMMU_IOAS_NOIOMMU_GET_PA")] = get_pa
    ictx = IOMMUFD.from_fd(3, backend=k, owned=False)
    parent = HWPT(ictx, 5, flags=1)
    ictx._register(parent)
    nested = ictx.alloc_hwpt(1, parent, data_type="vtd_s1", fault_queue=9,
                             data={"flags": 1, "pgtbl_addr": 0x5000, "addr_width": 48})
    s1 = ffi.from_buffer("struct iommu_hwpt_vtd_s1 *", bytearray(seen["data"]))
    assert (s1.flags, s1.pgtbl_addr, s1.addr_width) == (1, 0x5000, 48)
    assert seen["flags"] == 0x4 and nested.nested and nested.parent is parent
    assert nested.ioas is None and "nested" in repr(nested)
    with pytest.raises(errors.UsageError):
        nested.mark_preserved(1, abi="lu-v2")
    raw = ictx.alloc_hwpt(1, 5, data_type=1, data=bytes(24), fault_queue=9)
    assert raw.parent is parent
    ioas = IOAS(ictx, 2)
    ictx._register(ioas)
    assert ioas.noiommu_get_pa(1 << 32, 3 * PAGE_SIZE) == (0x1234000, PAGE_SIZE)


def test_hw_info_other_types_scripted():
    k = Scripted()
    state = {"type": 2, "data": bytes(range(40))}

    def hw_info(cmd):
        n = min(int(cmd.data_len), len(state["data"]))
        ffi.buffer(ffi.cast("char *", cmd.data_uptr), n)[:] = state["data"][:n]
        cmd.data_len = len(state["data"])
        cmd.out_data_type = state["type"]
        cmd.out_capabilities = 0x2 | 0x8
        cmd.out_max_pasid_log2 = 20

    k.handlers[req("IOMMU_GET_HW_INFO")] = hw_info
    ictx = IOMMUFD.from_fd(3, backend=k, owned=False)
    info = ictx.get_hw_info(1, buffer_size=16)                       # 40 > 16: asked again
    assert info.type_name == "arm_smmuv3" and info.data == state["data"] and info.vtd is None
    assert info.decoded["idr"] == [int.from_bytes(state["data"][8 + 4 * i:12 + 4 * i], "little") for i in range(6)]
    assert info.capability_names == ["pci_pasid_exec", "pci_ats_not_supported"] and info.max_pasid_log2 == 20
    state.update(type=77, data=b"\xAA" * 8)
    odd = ictx.get_hw_info(1)
    assert odd.type_name == "type77" and odd.data == b"\xAA" * 8 and odd.decoded is None


def test_wrapping_an_existing_hwpt_id(series_kernel):
    from pyiommufd import pci
    from pyiommufd.iommufd import HWPT, IOMMUFD
    from pyiommufd.vfio import VfioDevice

    pci.PciDevice("0000:00:03.0").bind_vfio()
    with IOMMUFD.open() as iommufd, VfioDevice.open("0000:00:03.0") as dev:
        dev.bind(iommufd)
        ioas = iommufd.alloc_ioas()
        auto_id = dev.attach(ioas)  # the kernel allocates an automatic HWPT
        hwpt = iommufd.hwpt(auto_id)
        assert isinstance(hwpt, HWPT) and hwpt.id == auto_id and not hwpt.owned
        assert iommufd.hwpt(auto_id) is hwpt
        dev.detach_pt()


def test_enospc_has_its_own_class():
    from pyiommufd import errors

    exc = errors.make_error("IOMMU_IOAS_MAP", "iommufd", 28)
    assert isinstance(exc, errors.NoSpace) and "allowed IOVAs" in exc.hint
