"""The fake kernel's /dev/iommu (upstream 7.3 semantics, fake VT-d)."""
import errno
import mmap

import pytest

from pyiommufd import errors, ioctl
from pyiommufd._uapi import ffi
from pyiommufd_testing import FakeKernel
from pyiommufd.backend import use

U64_MAX = (1 << 64) - 1
RW = 6
FIXED = 1


@pytest.fixture
def dev(fake_kernel, kt):
    """(iommufd, cdev, devid) with the device bound to vfio-pci and iommufd."""
    kt.vfio_pci()
    iommufd = kt.iommufd()
    cdev = kt.cdev()
    return iommufd, cdev, kt.bind(cdev, iommufd)


def page_buffer(pages=4):
    m = mmap.mmap(-1, pages * 4096)
    return m


def raw(kernel, fd, request, struct, size=None, extra=0, **fields):
    arg = ioctl.new(struct, extra=extra, **fields)
    if size is not None:
        arg.size = size
    kernel.ioctl(fd, request, ioctl.buffer_of(arg, ffi.sizeof(struct) + extra))
    return arg


# -- dispatch ----------------------------------------------------------------------------
def test_size_rules(fake_kernel, kt):
    fd = kt.iommufd()
    with pytest.raises(OSError) as exc:
        raw(fake_kernel, fd, 0x3B81, "struct iommu_ioas_alloc", size=8)
    assert exc.value.errno == errno.EINVAL
    arg = ioctl.new(kt.D.IOAS_ALLOC, extra=8)
    buf = ioctl.buffer_of(arg)
    buf[14] = b"\x01"
    with pytest.raises(OSError) as exc:
        fake_kernel.ioctl(fd, 0x3B81, buf)
    assert exc.value.errno == errno.E2BIG
    buf[14] = b"\x00"
    fake_kernel.ioctl(fd, 0x3B81, buf)
    assert arg.out_ioas_id == 1


@pytest.mark.parametrize("request_", [0x3B7F, 0x3B96, 0x3BFF, 0x3C80])
def test_unknown_requests_are_enotty(fake_kernel, kt, request_):
    with pytest.raises(OSError) as exc:
        raw(fake_kernel, kt.iommufd(), request_, "struct iommu_destroy")
    assert exc.value.errno == errno.ENOTTY


def test_vfio_compat_api_version(fake_kernel, kt):
    assert fake_kernel.ioctl_int(kt.iommufd(), 0x3B64) == 0


@pytest.mark.parametrize("size", [0, 12, 16])
def test_nr_0x95_is_noiommu_get_pa_on_stock_73(fake_kernel, kt, size):
    """seed-spec 2.2: the LU mark ioctl slot answers EINVAL (min size 40)."""
    with pytest.raises(OSError) as exc:
        raw(fake_kernel, kt.iommufd(), 0x3B95, "struct iommu_hwpt_lu_mark_preserve", size=size)
    assert exc.value.errno == errno.EINVAL


def test_noiommu_get_pa_full_size_is_eopnotsupp(fake_kernel, kt):
    fd = kt.iommufd()
    with pytest.raises(errors.NotSupported):
        ioctl.call(fake_kernel, fd, kt.D.NOIOMMU_GET_PA, ioas_id=kt.ioas(fd), iova=4096, length=4096)


# -- objects --------------------------------------------------------------------------------
def test_ids_start_at_1_and_reuse_the_lowest_free(fake_kernel, kt):
    fd = kt.iommufd()
    assert [kt.ioas(fd) for _ in range(3)] == [1, 2, 3]
    kt.destroy(fd, 2)
    assert kt.ioas(fd) == 2


def test_destroy_unknown_is_enoent(fake_kernel, kt):
    with pytest.raises(errors.NotFound):
        kt.destroy(kt.iommufd(), 1)


def test_ioas_alloc_flags(fake_kernel, kt):
    with pytest.raises(errors.NotSupported):
        ioctl.call(fake_kernel, kt.iommufd(), kt.D.IOAS_ALLOC, flags=1)


def test_destroy_in_use_is_ebusy(fake_kernel, kt, dev):
    iommufd, cdev, devid = dev
    ioas = kt.ioas(iommufd)
    hwpt = kt.hwpt(iommufd, devid, ioas)
    with pytest.raises(errors.Busy):
        kt.destroy(iommufd, ioas)               # the HWPT holds it
    with pytest.raises(errors.Busy):
        kt.destroy(iommufd, devid)              # the bound device
    kt.attach(cdev, hwpt)
    with pytest.raises(errors.Busy):
        kt.destroy(iommufd, hwpt)               # attached
    kt.detach(cdev)
    kt.destroy(iommufd, hwpt)
    kt.destroy(iommufd, ioas)


# -- MAP / MAP_FILE / UNMAP / COPY --------------------------------------------------------------
def test_map_kernel_chosen_and_fixed(fake_kernel, kt):
    fd = kt.iommufd()
    ioas = kt.ioas(fd)
    buf = page_buffer()
    iova = kt.map_va(fd, ioas, buf)
    addr = int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
    align = min(4 * 4096, addr & -addr)         # the source address's alignment is kept
    assert iova >= 4096 and iova % align == 0
    assert kt.map_va(fd, ioas, buf, iova=1 << 32) == 1 << 32
    with pytest.raises(errors.AlreadyExists):
        kt.map_va(fd, ioas, buf, iova=(1 << 32) + 4096)


def test_map_flag_checks(fake_kernel, kt):
    fd = kt.iommufd()
    ioas = kt.ioas(fd)
    buf = page_buffer()
    addr = int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
    with pytest.raises(errors.InvalidArgument):         # neither readable nor writeable
        ioctl.call(fake_kernel, fd, kt.D.IOAS_MAP, flags=0, ioas_id=ioas, user_va=addr, length=4096)
    with pytest.raises(errors.NotSupported):
        ioctl.call(fake_kernel, fd, kt.D.IOAS_MAP, flags=RW | 8, ioas_id=ioas, user_va=addr, length=4096)
    with pytest.raises(errors.NotFound):
        ioctl.call(fake_kernel, fd, kt.D.IOAS_MAP, flags=RW, ioas_id=99, user_va=addr, length=4096)
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, fd, kt.D.IOAS_MAP, flags=RW, ioas_id=ioas, user_va=addr, length=0)


def test_alignment_applies_once_a_domain_exists(fake_kernel, kt, dev):
    iommufd, cdev, devid = dev
    ioas = kt.ioas(iommufd)
    buf = page_buffer()
    addr = int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
    # no domain yet: any alignment goes
    ioctl.call(fake_kernel, iommufd, kt.D.IOAS_MAP, flags=RW | FIXED, ioas_id=ioas,
               user_va=addr + 1, length=100, iova=0x10001)
    kt.unmap(iommufd, ioas, 0, U64_MAX)
    kt.hwpt(iommufd, devid, ioas)
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, iommufd, kt.D.IOAS_MAP, flags=RW | FIXED, ioas_id=ioas,
                   user_va=addr, length=4096, iova=0x10001)
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, iommufd, kt.D.IOAS_MAP, flags=RW, ioas_id=ioas,
                   user_va=addr, length=100)


def test_unaligned_area_blocks_a_domain(fake_kernel, kt, dev):
    iommufd, cdev, devid = dev
    ioas = kt.ioas(iommufd)
    buf = page_buffer()
    addr = int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
    ioctl.call(fake_kernel, iommufd, kt.D.IOAS_MAP, flags=RW | FIXED, ioas_id=ioas,
               user_va=addr, length=100, iova=0x10000)
    with pytest.raises(errors.AddressInUse):
        kt.hwpt(iommufd, devid, ioas)


def test_unmapped_user_va_faults_only_with_a_domain(fake_kernel, kt, dev):
    iommufd, cdev, devid = dev
    ioas = kt.ioas(iommufd)
    ioctl.call(fake_kernel, iommufd, kt.D.IOAS_MAP, flags=RW, ioas_id=ioas, user_va=0x1000, length=4096)
    with pytest.raises(errors.BadAddress):
        kt.hwpt(iommufd, devid, ioas)
    kt.unmap(iommufd, ioas, 0, U64_MAX)
    kt.hwpt(iommufd, devid, ioas)
    with pytest.raises(errors.BadAddress):
        ioctl.call(fake_kernel, iommufd, kt.D.IOAS_MAP, flags=RW, ioas_id=ioas, user_va=0x1000, length=4096)


def test_map_file(fake_kernel, kt):
    fd = kt.iommufd()
    ioas = kt.ioas(fd)
    mfd = kt.memfd()
    iova = kt.map_file(fd, ioas, mfd, iova=None)
    assert iova % (1 << 20) == 0 and iova > 0
    with pytest.raises(errors.BadFd):
        kt.map_file(fd, ioas, 9999)
    assert kt.map_file(fd, ioas, mfd, iova=1 << 32) == 1 << 32


def test_map_file_past_eof_fails_when_pinned(fake_kernel, kt, dev):
    iommufd, cdev, devid = dev
    ioas = kt.ioas(iommufd)
    mfd = kt.memfd(size=4096)
    kt.hwpt(iommufd, devid, ioas)
    with pytest.raises(errors.InvalidArgument):
        kt.map_file(iommufd, ioas, mfd, length=8192)
    with pytest.raises(errors.InvalidArgument):
        kt.map_file(iommufd, ioas, kt.iommufd(), length=4096)      # not a memfd


def test_map_keeps_the_file_alive(fake_kernel, kt, dev):
    """The mapping holds a reference: pinning after the fd is closed works."""
    iommufd, cdev, devid = dev
    ioas = kt.ioas(iommufd)
    mfd = kt.memfd(data=b"data")
    kt.map_file(iommufd, ioas, mfd)
    fake_kernel.close(mfd)
    kt.hwpt(iommufd, devid, ioas)       # fills the domain from the closed memfd


def test_unmap_rules(fake_kernel, kt):
    fd = kt.iommufd()
    ioas = kt.ioas(fd)
    buf = page_buffer()
    kt.map_va(fd, ioas, buf, iova=0x100000)
    kt.map_va(fd, ioas, buf, iova=0x200000)
    with pytest.raises(errors.NotFound):            # hits nothing
        kt.unmap(fd, ioas, 0x400000, 0x1000)
    with pytest.raises(errors.NotFound):            # cuts an area
        kt.unmap(fd, ioas, 0x100000, 0x1000)
    assert kt.unmap(fd, ioas, 0x100000, 0x4000) == 0x4000
    with pytest.raises(errors.InvalidArgument):
        kt.unmap(fd, ioas, 0x200000, 0)
    assert kt.unmap(fd, ioas, 0, U64_MAX) == 0x4000
    assert kt.unmap(fd, ioas, 0, U64_MAX) == 0      # unmap-all of nothing is fine


def test_unmap_is_not_atomic(fake_kernel, kt):
    """Areas before the one that sticks out are gone (K:io_pagetable.c:738-848)."""
    fd = kt.iommufd()
    ioas = kt.ioas(fd)
    buf = page_buffer()
    kt.map_va(fd, ioas, buf, iova=0x100000)
    kt.map_va(fd, ioas, buf, iova=0x200000)
    with pytest.raises(errors.NotFound):
        kt.unmap(fd, ioas, 0x100000, 0x101000)
    with pytest.raises(errors.NotFound):
        kt.unmap(fd, ioas, 0x100000, 0x4000)        # already gone
    assert kt.unmap(fd, ioas, 0x200000, 0x4000) == 0x4000


def test_copy(fake_kernel, kt):
    fd = kt.iommufd()
    src, dst = kt.ioas(fd), kt.ioas(fd)
    kt.map_file(fd, src, kt.memfd(), iova=0x100000)
    arg = ioctl.call(fake_kernel, fd, kt.D.IOAS_COPY, flags=RW | FIXED, src_ioas_id=src,
                     dst_ioas_id=dst, length=0x2000, src_iova=0x101000, dst_iova=0x300000)
    assert arg.dst_iova == 0x300000
    assert kt.unmap(fd, dst, 0, U64_MAX) == 0x2000
    with pytest.raises(errors.NotFound):
        ioctl.call(fake_kernel, fd, kt.D.IOAS_COPY, flags=RW, src_ioas_id=src, dst_ioas_id=dst,
                   length=0x1000, src_iova=0x900000)


# -- IOVA ranges ----------------------------------------------------------------------------------
def ranges(kernel, kt, iommufd, ioas):
    arg, items = ioctl.call_growing(kernel, iommufd, kt.D.IOVA_RANGES, count_field="num_iovas",
                                    ptr_field="allowed_iovas", elem_type="struct iommu_iova_range",
                                    initial=0, ioas_id=ioas)
    return [(int(r.start), int(r.last)) for r in items], int(arg.out_iova_alignment)


def test_iova_ranges(fake_kernel, kt, dev):
    iommufd, cdev, devid = dev
    ioas = kt.ioas(iommufd)
    assert ranges(fake_kernel, kt, iommufd, ioas) == ([(0, U64_MAX)], 1)
    hwpt = kt.hwpt(iommufd, devid, ioas)
    # QEMU's intel-iommu: MGAW 39, so the second-stage domain ends at 2^39-1
    assert ranges(fake_kernel, kt, iommufd, ioas) == ([(0, (1 << 39) - 1)], 4096)
    kt.attach(cdev, hwpt)
    assert ranges(fake_kernel, kt, iommufd, ioas)[0] == [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)]


@pytest.mark.parametrize("mgaw, sagaw, bits", [
    (39, 0b00010, 39),      # QEMU's default: 3-level tables only
    (48, 0b00110, 48),      # 4-level: the whole MGAW
    (46, 0b00100, 46),      # fewer bits than the 4-level table covers
    (48, 0b00010, 39),      # MGAW 48 but only 3-level tables: 39 bits
    (57, 0b01110, 57),
    (57, 0b00100, 48),
    (30, 0b00010, 0),       # nothing fits
])
def test_vtd_second_stage_width_follows_mgaw_and_sagaw(mgaw, sagaw, bits):
    from pyiommufd_testing.fake.iommufd import cap_mgaw, vtd_ss_vasz_lg2
    cap = ((mgaw - 1) << 16) | (sagaw << 8)
    assert cap_mgaw(cap) == mgaw
    assert vtd_ss_vasz_lg2(cap) == bits


def test_vtd_second_stage_page_sizes_follow_sslps():
    from pyiommufd_testing.fake.iommufd import VTD_CAP, vtd_ss_pgsizes
    assert vtd_ss_pgsizes(VTD_CAP) == (1 << 12) | (1 << 21) | (1 << 30)
    assert vtd_ss_pgsizes(VTD_CAP & ~(0xF << 34)) == 1 << 12
    assert vtd_ss_pgsizes((VTD_CAP & ~(0xF << 34)) | (1 << 34)) == (1 << 12) | (1 << 21)


def test_iova_ranges_emsgsize(fake_kernel, kt, dev):
    iommufd, cdev, devid = dev
    ioas = kt.ioas(iommufd)
    kt.attach(cdev, ioas)
    with pytest.raises(errors.MessageSize):
        arg = ioctl.new(kt.D.IOVA_RANGES, ioas_id=ioas, num_iovas=1)
        array = ffi.new("struct iommu_iova_range[1]")
        arg.allowed_iovas = int(ffi.cast("uintptr_t", array))
        try:
            ioctl.invoke(fake_kernel, iommufd, kt.D.IOVA_RANGES, arg)
        finally:
            assert arg.num_iovas == 2 and array[0].last == 0xFEDFFFFF


def test_attach_conflicts_with_an_area_in_the_msi_window(fake_kernel, kt, dev):
    iommufd, cdev, devid = dev
    ioas = kt.ioas(iommufd)
    kt.map_file(iommufd, ioas, kt.memfd(), iova=0xFEE00000)
    with pytest.raises(errors.AddressInUse):
        kt.attach(cdev, ioas)


def test_allow_iovas(fake_kernel, kt, dev):
    iommufd, cdev, devid = dev
    ioas = kt.ioas(iommufd)
    arr = ffi.new("struct iommu_iova_range[1]", [{"start": 0x40000000, "last": 0x7FFFFFFF}])
    ioctl.call(fake_kernel, iommufd, kt.D.ALLOW_IOVAS, ioas_id=ioas, num_iovas=1,
               allowed_iovas=int(ffi.cast("uintptr_t", arr)))
    iova = kt.map_file(iommufd, ioas, kt.memfd())
    assert 0x40000000 <= iova <= 0x7FFFFFFF
    bad = ffi.new("struct iommu_iova_range[1]", [{"start": 5, "last": 5}])
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, iommufd, kt.D.ALLOW_IOVAS, ioas_id=ioas, num_iovas=1,
                   allowed_iovas=int(ffi.cast("uintptr_t", bad)))
    with pytest.raises(errors.BadAddress):
        ioctl.call(fake_kernel, iommufd, kt.D.ALLOW_IOVAS, ioas_id=ioas, num_iovas=1, allowed_iovas=8)
    kt.attach(cdev, ioas)
    msi = ffi.new("struct iommu_iova_range[1]", [{"start": 0xFE000000, "last": 0xFEFFFFFF}])
    with pytest.raises(errors.AddressInUse):
        ioctl.call(fake_kernel, iommufd, kt.D.ALLOW_IOVAS, ioas_id=ioas, num_iovas=1,
                   allowed_iovas=int(ffi.cast("uintptr_t", msi)))


# -- OPTION, VFIO_IOAS, CHANGE_PROCESS ----------------------------------------------------------
def test_options(fake_kernel, kt):
    fd = kt.iommufd()
    assert ioctl.call(fake_kernel, fd, kt.D.OPTION, option_id=0, op=1).val64 == 0
    ioctl.call(fake_kernel, fd, kt.D.OPTION, option_id=0, op=0, val64=1)
    assert ioctl.call(fake_kernel, fd, kt.D.OPTION, option_id=0, op=1).val64 == 1
    ioas = kt.ioas(fd)
    with pytest.raises(errors.Busy):
        ioctl.call(fake_kernel, fd, kt.D.OPTION, option_id=0, op=0, val64=0)
    assert ioctl.call(fake_kernel, fd, kt.D.OPTION, option_id=1, op=1, object_id=ioas).val64 == 1
    ioctl.call(fake_kernel, fd, kt.D.OPTION, option_id=1, op=0, object_id=ioas, val64=0)
    assert ioctl.call(fake_kernel, fd, kt.D.OPTION, option_id=1, op=1, object_id=ioas).val64 == 0
    with pytest.raises(errors.NotSupported):
        ioctl.call(fake_kernel, fd, kt.D.OPTION, option_id=7, op=1)
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, fd, kt.D.OPTION, option_id=1, op=0, object_id=ioas, val64=2)


def _huge_pages_and_alignment(kernel, kt, fd, ioas):
    val = ioctl.call(kernel, fd, kt.D.OPTION, option_id=1, op=1, object_id=ioas).val64
    ranges = ioctl.new(kt.D.IOVA_RANGES, ioas_id=ioas)
    with pytest.raises(errors.MessageSize):       # no array given: still answers the alignment
        ioctl.invoke(kernel, fd, kt.D.IOVA_RANGES, ranges)
    return val, ranges.out_iova_alignment


@pytest.mark.parametrize("offset, length, iova", [
    (2048, 4096, 0x100800),     # IOVA, length and page offset
    (0, 4096, 0x100800),        # the IOVA only
    (0, 2048, 0x100000),        # the length only
    (2048, 4096, 0x100000),     # the page offset only
], ids=["all", "iova", "length", "page-offset"])
def test_huge_pages_off_refuses_an_area_that_is_not_page_aligned(fake_kernel, kt, offset, length, iova):
    """iopt_disable_large_pages(): the alignment grows to a page only if every
    area fits it, else EADDRINUSE and huge pages stay on, alignment 1."""
    fd = kt.iommufd()
    ioas = kt.ioas(fd)
    buf = page_buffer()
    addr = int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
    ioctl.call(fake_kernel, fd, kt.D.IOAS_MAP, flags=RW | FIXED, ioas_id=ioas, user_va=addr + offset,
               length=length, iova=iova)
    with pytest.raises(errors.AddressInUse):
        ioctl.call(fake_kernel, fd, kt.D.OPTION, option_id=1, op=0, object_id=ioas, val64=0)
    assert _huge_pages_and_alignment(fake_kernel, kt, fd, ioas) == (1, 1)
    kt.unmap(fd, ioas, iova, length)
    ioctl.call(fake_kernel, fd, kt.D.OPTION, option_id=1, op=0, object_id=ioas, val64=0)
    assert _huge_pages_and_alignment(fake_kernel, kt, fd, ioas) == (0, 4096)


def test_huge_pages_off_keeps_page_aligned_areas(fake_kernel, kt):
    fd = kt.iommufd()
    ioas = kt.ioas(fd)
    buf = page_buffer()
    addr = int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
    ioctl.call(fake_kernel, fd, kt.D.IOAS_MAP, flags=RW | FIXED, ioas_id=ioas, user_va=addr,
               length=8192, iova=0x100000)
    ioctl.call(fake_kernel, fd, kt.D.OPTION, option_id=1, op=0, object_id=ioas, val64=0)
    assert _huge_pages_and_alignment(fake_kernel, kt, fd, ioas) == (0, 4096)


def test_vfio_ioas(fake_kernel, kt):
    fd = kt.iommufd()
    with pytest.raises(errors.NoDevice):
        ioctl.call(fake_kernel, fd, kt.D.VFIO_IOAS, op=0)
    ioas = kt.ioas(fd)
    ioctl.call(fake_kernel, fd, kt.D.VFIO_IOAS, op=1, ioas_id=ioas)
    assert ioctl.call(fake_kernel, fd, kt.D.VFIO_IOAS, op=0).ioas_id == ioas


def test_change_process_needs_file_mappings(fake_kernel, kt):
    fd = kt.iommufd()
    ioas = kt.ioas(fd)
    kt.map_file(fd, ioas, kt.memfd())
    ioctl.call(fake_kernel, fd, kt.D.CHANGE_PROCESS)
    kt.map_va(fd, ioas, page_buffer())
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, fd, kt.D.CHANGE_PROCESS)


# -- HWPT_ALLOC, HW_INFO, dirty tracking, invalidate ----------------------------------------------
def test_hwpt_alloc_checks(fake_kernel, kt, dev):
    iommufd, cdev, devid = dev
    ioas = kt.ioas(iommufd)
    with pytest.raises(errors.NotFound):
        kt.hwpt(iommufd, ioas, ioas)                 # dev_id is not a device
    with pytest.raises(errors.InvalidArgument):
        kt.hwpt(iommufd, devid, 77)                  # unknown pt_id
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, iommufd, kt.D.HWPT_ALLOC, dev_id=devid, pt_id=ioas, data_len=8)
    for flags in (1, 2, 0x10):                       # NEST_PARENT, DIRTY_TRACKING, unknown
        with pytest.raises(errors.NotSupported):
            kt.hwpt(iommufd, devid, ioas, flags)
    hwpt = kt.hwpt(iommufd, devid, ioas)
    with pytest.raises(errors.NotSupported):         # nested needs data
        kt.hwpt(iommufd, devid, hwpt)
    with pytest.raises(errors.InvalidArgument):      # parent is not NEST_PARENT
        ioctl.call(fake_kernel, iommufd, kt.D.HWPT_ALLOC, dev_id=devid, pt_id=hwpt,
                   data_type=1, data_len=24, data_uptr=8)


def test_hw_info(fake_kernel, kt, dev):
    iommufd, cdev, devid = dev
    data = ffi.new("uint8_t[64]", b"\xff" * 64)
    arg = ioctl.call(fake_kernel, iommufd, kt.D.HW_INFO, dev_id=devid, data_len=64,
                     data_uptr=int(ffi.cast("uintptr_t", data)))
    assert arg.out_data_type == 1 and arg.data_len == 24
    vtd = ffi.cast("struct iommu_hw_info_vtd *", data)
    assert vtd.flags == 1 and vtd.cap_reg != 0 and vtd.ecap_reg != 0
    assert bytes(data[24:64]) == bytes(40)          # the rest is cleared
    arg = ioctl.call(fake_kernel, iommufd, kt.D.HW_INFO, dev_id=devid, data_len=0)
    assert arg.data_len == 24                       # no EMSGSIZE: the length is reported
    with pytest.raises(errors.NotSupported):
        ioctl.call(fake_kernel, iommufd, kt.D.HW_INFO, dev_id=devid, flags=1, in_data_type=2)
    with pytest.raises(errors.NotFound):
        ioctl.call(fake_kernel, iommufd, kt.D.HW_INFO, dev_id=99)


def test_hw_info_reports_a_device_without_ats(fake_kernel, kt, dev):
    """device.c:1709-1711: the default virtio-net has no ATS capability."""
    iommufd, cdev, devid = dev
    arg = ioctl.call(fake_kernel, iommufd, kt.D.HW_INFO, dev_id=devid)
    assert arg.out_capabilities == 1 << 3           # IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED


def test_hw_info_of_a_device_with_ats(kt):
    from pyiommufd_testing import FakePciDevice
    with FakeKernel(devices=[FakePciDevice(ats=True, cfg_size=4096)]) as k, use(k):
        t = type(kt)(k)
        t.vfio_pci()
        iommufd, cdev = t.iommufd(), t.cdev()
        devid = t.bind(cdev, iommufd)
        assert ioctl.call(k, iommufd, t.D.HW_INFO, dev_id=devid).out_capabilities == 0
        ext = k.pread(cdev, 4, (7 << 40) + 0x100)   # the ATS extended capability
        assert int.from_bytes(ext, "little") & 0xFFFF == 0x0F
    with FakeKernel(devices=[FakePciDevice(ats=True, cfg_size=4096)], dirty_tracking=True) as k, use(k):
        t = type(kt)(k)
        t.vfio_pci()
        iommufd, cdev = t.iommufd(), t.cdev()
        devid = t.bind(cdev, iommufd)
        assert ioctl.call(k, iommufd, t.D.HW_INFO, dev_id=devid).out_capabilities == 1


def test_ats_needs_pcie_config_space():
    from pyiommufd_testing import FakePciDevice
    with pytest.raises(ValueError):
        FakePciDevice(ats=True, cfg_size=256)


def test_dirty_tracking_unsupported_by_default(fake_kernel, kt, dev):
    iommufd, cdev, devid = dev
    hwpt = kt.hwpt(iommufd, devid, kt.ioas(iommufd))
    with pytest.raises(errors.NotSupported):
        ioctl.call(fake_kernel, iommufd, kt.D.SET_DIRTY, hwpt_id=hwpt, flags=1)
    bitmap = ffi.new("uint64_t[1]")
    with pytest.raises(errors.NotSupported):
        ioctl.call(fake_kernel, iommufd, kt.D.GET_DIRTY, hwpt_id=hwpt, iova=0, length=0x10000,
                   page_size=4096, data=int(ffi.cast("uintptr_t", bitmap)))


def test_dirty_tracking_when_supported(kt):
    with FakeKernel(dirty_tracking=True) as k, use(k):
        t = type(kt)(k)
        t.vfio_pci()
        fd = t.iommufd()
        devid = t.bind(t.cdev(), fd)
        hwpt = t.hwpt(fd, devid, t.ioas(fd), flags=2)
        ioctl.call(k, fd, t.D.SET_DIRTY, hwpt_id=hwpt, flags=1)
        bitmap = ffi.new("uint64_t[1]")
        ioctl.call(k, fd, t.D.GET_DIRTY, hwpt_id=hwpt, iova=0, length=0x10000, page_size=4096,
                   data=int(ffi.cast("uintptr_t", bitmap)))
        with pytest.raises(errors.InvalidArgument):
            ioctl.call(k, fd, t.D.GET_DIRTY, hwpt_id=hwpt, iova=0, length=0x10000, page_size=0,
                       data=int(ffi.cast("uintptr_t", bitmap)))
        with pytest.raises(errors.BadAddress):
            ioctl.call(k, fd, t.D.GET_DIRTY, hwpt_id=hwpt, iova=0, length=0x10000, page_size=4096, data=8)


def test_invalidate_on_a_paging_hwpt(fake_kernel, kt, dev):
    iommufd, cdev, devid = dev
    hwpt = kt.hwpt(iommufd, devid, kt.ioas(iommufd))
    arg = ioctl.new(kt.D.INVALIDATE, hwpt_id=hwpt, entry_num=0)
    with pytest.raises(errors.InvalidArgument):
        ioctl.invoke(fake_kernel, iommufd, kt.D.INVALIDATE, arg)
    arg = ioctl.new(kt.D.INVALIDATE, hwpt_id=hwpt, entry_num=3)
    with pytest.raises(errors.InvalidArgument):     # entries but no data_uptr
        ioctl.invoke(fake_kernel, iommufd, kt.D.INVALIDATE, arg)
    assert arg.entry_num == 0


def test_fault_queue(fake_kernel, kt, dev):
    iommufd, cdev, devid = dev
    arg = ioctl.call(fake_kernel, iommufd, kt.D.FAULT_ALLOC)
    assert fake_kernel.files.readlink(f"/proc/self/fd/{arg.out_fault_fd}") == "anon_inode:[iommufd-pgfault]"
    hwpt = ioctl.call(fake_kernel, iommufd, kt.D.HWPT_ALLOC, flags=4, dev_id=devid,
                      pt_id=kt.ioas(iommufd), fault_id=arg.out_fault_id).out_hwpt_id
    with pytest.raises(errors.Busy):
        kt.destroy(iommufd, arg.out_fault_id)
    kt.destroy(iommufd, hwpt)
    fake_kernel.close(arg.out_fault_fd)
    kt.destroy(iommufd, arg.out_fault_id)


def test_vtd_has_no_viommu(fake_kernel, kt, dev):
    iommufd, cdev, devid = dev
    hwpt = kt.hwpt(iommufd, devid, kt.ioas(iommufd))
    for type_ in (0, 1):
        with pytest.raises(errors.NotSupported):
            ioctl.call(fake_kernel, iommufd, kt.D.VIOMMU_ALLOC, type=type_, dev_id=devid, hwpt_id=hwpt)
    with pytest.raises(errors.NotFound):
        ioctl.call(fake_kernel, iommufd, kt.D.VDEVICE_ALLOC, viommu_id=1, dev_id=devid, virt_id=1)
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, iommufd, kt.D.VEVENTQ_ALLOC, viommu_id=1, type=1, veventq_depth=0)
    with pytest.raises(errors.NotFound):
        ioctl.call(fake_kernel, iommufd, kt.D.VEVENTQ_ALLOC, viommu_id=1, type=1, veventq_depth=8)
    with pytest.raises(errors.NotFound):
        ioctl.call(fake_kernel, iommufd, kt.D.HW_QUEUE_ALLOC, viommu_id=1, type=1, length=4096)


def test_closing_iommufd_releases_mappings(fake_kernel, kt):
    fd = kt.iommufd()
    mfd = kt.memfd()
    kt.map_file(fd, kt.ioas(fd), mfd)
    fake_kernel.close(fd)
    fake_kernel.close(mfd)
    assert fake_kernel.known_fds() == {}


def test_read_only_argument_faults_on_the_reply(fake_kernel, kt):
    fd = kt.iommufd()
    arg = ioctl.new(kt.D.IOAS_ALLOC)
    with pytest.raises(OSError) as exc:
        fake_kernel.ioctl(fd, kt.D.IOAS_ALLOC.request, bytes(ioctl.buffer_of(arg)))
    assert exc.value.errno == errno.EFAULT
    assert kt.ioas(fd) == 1             # the failed reply did not leak an object
