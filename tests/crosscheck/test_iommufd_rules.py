"""Upstream Linux 7.3 iommufd rules (drivers/iommu/iommufd/), the same test code
on the fake kernel and on the real one in the VM.

Where the fake answers differently, the test asserts the real kernel's answer
and the fake is fixed (pyiommufd_testing); until then the fake parameter is
marked ``xfail(strict=True)`` so the discrepancy stays visible.

The device tests bind "the first virtio-net (1af4:1041) PCI function" in both
worlds: 0000:00:03.0 in the fake, whatever the QEMU guest has (0000:00:04.0
today; its 1af4:1009 functions are the 9p shares and are never touched).
"""
import errno as E
import os

import pytest

from pyiommufd import errors, ioctl, pci
from pyiommufd._uapi import ffi
from pyiommufd.iommufd import (IOMMU_DESTROY, IOMMU_HWPT_ALLOC, IOMMU_IOAS_ALLOC, IOMMU_IOAS_ALLOW_IOVAS, IOMMU_IOAS_COPY,
                               IOMMU_IOAS_IOVA_RANGES, IOMMU_IOAS_MAP, IOMMU_IOAS_MAP_FILE,
                               IOMMU_IOAS_NOIOMMU_GET_PA, IOMMU_IOAS_UNMAP, IOMMU_OPTION, IOMMUFD,
                               MAP_FIXED_IOVA, MAP_READABLE, MAP_WRITEABLE, OPTIONS, PAGE_SIZE, U64_MAX,
                               IovaRange, aligned_buffer)
from pyiommufd.memfd import LIVE_UPDATE_SEALS, MemFD, Seal
from pyiommufd.vfio import ATTACH_IOMMUFD_PT, GET_INFO

RW = MAP_READABLE | MAP_WRITEABLE
OP_SET, OP_GET = ioctl.const("IOMMU_OPTION_OP_SET"), ioctl.const("IOMMU_OPTION_OP_GET")
MSI_WINDOW = IovaRange(0xFEE00000, 0xFEEFFFFF)


@pytest.fixture
def iommufd(kernel):
    with IOMMUFD.open() as ictx:
        yield ictx


def _raw(iommufd, idef, **fields):
    return ioctl.call(iommufd.backend, iommufd.fileno(), idef, **fields)


# -- object ids and DESTROY ------------------------------------------------------------

def test_object_ids_start_at_1_per_context_and_the_lowest_free_is_reused(iommufd):
    first, second = iommufd.alloc_ioas(), iommufd.alloc_ioas()
    assert (first.id, second.id) == (1, 2)
    with IOMMUFD.open() as other:
        assert other.alloc_ioas().id == 1
    first.destroy()
    assert iommufd.alloc_ioas().id == 1
    assert iommufd.alloc_ioas().id == 3


@pytest.mark.parametrize("obj_id", [0, 1, 77, 0xFFFFFFFF])
def test_destroy_of_an_unknown_id_is_enoent(iommufd, obj_id):
    with pytest.raises(errors.NotFound) as info:
        _raw(iommufd, IOMMU_DESTROY, id=obj_id)
    assert isinstance(info.value, errors.IommufdError)
    assert info.value.errno == E.ENOENT


def test_destroy_twice_is_enoent_the_second_time(iommufd):
    ioas_id = iommufd.alloc_ioas().id
    _raw(iommufd, IOMMU_DESTROY, id=ioas_id)
    with pytest.raises(errors.NotFound):
        _raw(iommufd, IOMMU_DESTROY, id=ioas_id)


# -- map / unmap ---------------------------------------------------------------------------

def test_unmap_of_an_unmapped_range_is_enoent(iommufd):
    ioas = iommufd.alloc_ioas()
    with pytest.raises(errors.NotFound):
        ioas.unmap(0x100000, PAGE_SIZE)
    buf = aligned_buffer(4 * PAGE_SIZE)
    ioas.map(buf, iova=0x200000)
    with pytest.raises(errors.NotFound):
        ioas.unmap(0x100000, PAGE_SIZE)           # nothing there
    with pytest.raises(errors.NotFound):
        ioas.unmap(0x201000, PAGE_SIZE)           # cuts a mapping: not allowed
    assert ioas.unmap(0x100000, 0x200000) == 4 * PAGE_SIZE   # covers it whole


def test_unmap_all_on_an_empty_ioas_unmaps_nothing(iommufd):
    ioas = iommufd.alloc_ioas()
    assert ioas.unmap_all() == 0
    arg = _raw(iommufd, IOMMU_IOAS_UNMAP, ioas_id=ioas.id, iova=0, length=U64_MAX)
    assert arg.length == 0


def test_unmap_of_length_0_is_einval(iommufd):
    ioas = iommufd.alloc_ioas()
    with pytest.raises(errors.InvalidArgument):
        _raw(iommufd, IOMMU_IOAS_UNMAP, ioas_id=ioas.id, iova=0x1000, length=0)


@pytest.mark.parametrize("flags", [RW, RW | MAP_FIXED_IOVA])
def test_map_of_length_0_is_einval(iommufd, flags):
    ioas = iommufd.alloc_ioas()
    buf = aligned_buffer(PAGE_SIZE)
    addr = int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
    with pytest.raises(errors.InvalidArgument):        # the library refuses it itself
        _raw(iommufd, IOMMU_IOAS_MAP, flags=flags, ioas_id=ioas.id, user_va=addr, length=0,
             iova=0x100000)
    assert ioas.iova_ranges() == [IovaRange(0, U64_MAX)]


def test_map_file_of_length_0_is_einval(iommufd):
    ioas = iommufd.alloc_ioas()
    with MemFD.create("len0", PAGE_SIZE) as memfd:
        with pytest.raises(errors.InvalidArgument):
            _raw(iommufd, IOMMU_IOAS_MAP_FILE, flags=RW | MAP_FIXED_IOVA, ioas_id=ioas.id,
                 fd=memfd.fileno(), start=0, length=0, iova=0x100000)


def test_map_without_read_or_write_is_einval(iommufd):
    ioas = iommufd.alloc_ioas()
    buf = aligned_buffer(PAGE_SIZE)
    addr = int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
    with pytest.raises(errors.InvalidArgument):
        _raw(iommufd, IOMMU_IOAS_MAP, flags=MAP_FIXED_IOVA, ioas_id=ioas.id, user_va=addr,
             length=PAGE_SIZE, iova=0x100000)


def test_overlapping_fixed_map_is_eexist(iommufd):
    ioas = iommufd.alloc_ioas()
    a, b = aligned_buffer(2 * PAGE_SIZE), aligned_buffer(PAGE_SIZE)
    ioas.map(a, iova=0x100000)
    with pytest.raises(errors.AlreadyExists):
        ioas.map(b, iova=0x101000)


def test_copy_of_an_unmapped_source_is_enoent(iommufd):
    src, dst = iommufd.alloc_ioas(), iommufd.alloc_ioas()
    with pytest.raises(errors.NotFound):
        dst.copy(src, 0x100000, PAGE_SIZE, 0x100000)
    with pytest.raises(errors.InvalidArgument):        # length 0, asked directly
        _raw(iommufd, IOMMU_IOAS_COPY, flags=RW | MAP_FIXED_IOVA, dst_ioas_id=dst.id,
             src_ioas_id=src.id, length=0, dst_iova=0x100000, src_iova=0x100000)


def test_copy_shares_a_file_mapping_at_a_fixed_iova(iommufd):
    src, dst = iommufd.alloc_ioas(), iommufd.alloc_ioas()
    with MemFD.create("copy", 4 * PAGE_SIZE) as memfd:
        src.map_file(memfd, 0, 4 * PAGE_SIZE, iova=0x400000)
        assert dst.copy(src, 0x401000, 2 * PAGE_SIZE, 0x800000) == 0x800000
        with pytest.raises(errors.NotFound):       # only whole copied areas unmap
            dst.unmap(0x800000, PAGE_SIZE)
        assert dst.unmap(0x800000, 2 * PAGE_SIZE) == 2 * PAGE_SIZE
        assert src.unmap_all() == 4 * PAGE_SIZE


# -- IOVA ranges and allowed IOVAs ------------------------------------------------------------

def test_iova_ranges_of_an_ioas_without_devices_is_everything_via_emsgsize(iommufd):
    ioas = iommufd.alloc_ioas()
    arg = ioctl.new(IOMMU_IOAS_IOVA_RANGES, ioas_id=ioas.id, num_iovas=0, allowed_iovas=0)
    with pytest.raises(errors.MessageSize):
        ioctl.invoke(iommufd.backend, iommufd.fileno(), IOMMU_IOAS_IOVA_RANGES, arg)
    assert arg.num_iovas == 1                          # the kernel says how many
    assert arg.out_iova_alignment == 1                 # no domain: byte granular
    ranges = ffi.new("struct iommu_iova_range[]", 1)
    arg = _raw(iommufd, IOMMU_IOAS_IOVA_RANGES, ioas_id=ioas.id, num_iovas=1,
               allowed_iovas=int(ffi.cast("uintptr_t", ranges)))
    assert arg.num_iovas == 1
    assert (ranges[0].start, ranges[0].last) == (0, U64_MAX)
    assert ioas.iova_ranges() == [IovaRange(0, U64_MAX)]
    assert ioas.iova_alignment() == 1


def test_allow_iovas_steers_automatic_iovas_only(iommufd):
    ioas = iommufd.alloc_ioas()
    ioas.allow_iovas([(0x1000000, 0x1FFFFFF)])
    assert ioas.iova_ranges() == [IovaRange(0, U64_MAX)]      # allowed ranges do not show
    assert 0x1000000 <= ioas.map(aligned_buffer(PAGE_SIZE)) <= 0x1FFFFFF
    assert ioas.map(aligned_buffer(PAGE_SIZE), iova=0x4000000) == 0x4000000   # fixed: anywhere
    ioas.allow_iovas([])                                       # lifts the restriction


@pytest.mark.parametrize("ranges", [[(0x2000, 0x2000)], [(0x3000, 0x2000)],
                                    [(0x1000, 0x1FFF), (0x1800, 0x2FFF)]])
def test_allow_iovas_rejects_empty_reversed_and_overlapping_ranges(iommufd, ranges):
    ioas = iommufd.alloc_ioas()
    array = ffi.new("struct iommu_iova_range[]", len(ranges))
    for i, (start, last) in enumerate(ranges):
        array[i].start, array[i].last = start, last
    with pytest.raises(errors.InvalidArgument):
        _raw(iommufd, IOMMU_IOAS_ALLOW_IOVAS, ioas_id=ioas.id,
             num_iovas=len(ranges), allowed_iovas=int(ffi.cast("uintptr_t", array)))


# -- IOMMU_OPTION ---------------------------------------------------------------------------------

def test_huge_pages_option_get_and_set_on_an_ioas(iommufd):
    ioas = iommufd.alloc_ioas()
    assert ioas.huge_pages() is True                 # the default
    assert ioas.huge_pages(False) is False
    assert ioas.huge_pages() is False
    assert iommufd.option("huge_pages", object_id=ioas) == 0
    ioas.huge_pages(True)
    assert ioas.huge_pages() is True
    huge = OPTIONS["huge_pages"]
    with pytest.raises(errors.InvalidArgument):
        _raw(iommufd, IOMMU_OPTION, option_id=huge, op=OP_SET, object_id=ioas.id, val64=2)
    with pytest.raises(errors.NotFound):             # per IOAS: object 0 is no IOAS
        _raw(iommufd, IOMMU_OPTION, option_id=huge, op=OP_GET, object_id=0)
    with pytest.raises(errors.NotSupported):
        _raw(iommufd, IOMMU_OPTION, option_id=huge, op=7, object_id=ioas.id)
    with pytest.raises(errors.NotSupported):
        _raw(iommufd, IOMMU_OPTION, option_id=0x55, op=OP_GET, object_id=ioas.id)


def test_rlimit_mode_changes_only_while_the_context_is_empty(iommufd):
    assert iommufd.option("rlimit_mode") == 0
    assert iommufd.option("rlimit_mode", 1) == 1      # root has CAP_SYS_RESOURCE
    assert iommufd.option("rlimit_mode") == 1
    iommufd.option("rlimit_mode", 0)
    rlimit = OPTIONS["rlimit_mode"]
    with pytest.raises(errors.InvalidArgument):
        _raw(iommufd, IOMMU_OPTION, option_id=rlimit, op=OP_SET, object_id=0, val64=2)
    with pytest.raises(errors.NotSupported):
        _raw(iommufd, IOMMU_OPTION, option_id=rlimit, op=OP_GET, object_id=1)
    iommufd.alloc_ioas()
    with pytest.raises(errors.Busy):
        iommufd.option("rlimit_mode", 1)
    assert iommufd.option("rlimit_mode") == 0


# -- the generic ioctl dispatch: size rules and unknown numbers -------------------------------------

def test_size_below_the_last_field_is_einval(iommufd):
    arg = ioctl.new(IOMMU_IOAS_ALLOC)
    arg.size = 8                                     # offsetofend(out_ioas_id) is 12
    with pytest.raises(errors.InvalidArgument):
        ioctl.invoke(iommufd.backend, iommufd.fileno(), IOMMU_IOAS_ALLOC, arg)


def test_non_zero_tail_past_the_kernel_struct_is_e2big(iommufd):
    base = ffi.sizeof("struct iommu_ioas_alloc")
    arg = ioctl.new(IOMMU_IOAS_ALLOC, extra=8)
    ioctl.buffer_of(arg)[base + 3] = b"\x01"
    with pytest.raises(errors.TooBig):
        ioctl.invoke(iommufd.backend, iommufd.fileno(), IOMMU_IOAS_ALLOC, arg)
    assert iommufd.alloc_ioas().id == 1                # nothing was allocated


def test_zero_tail_past_the_kernel_struct_is_accepted(iommufd):
    arg = ioctl.new(IOMMU_IOAS_ALLOC, extra=16)
    ioctl.invoke(iommufd.backend, iommufd.fileno(), IOMMU_IOAS_ALLOC, arg)
    assert arg.out_ioas_id == 1
    assert bytes(ioctl.buffer_of(arg))[ffi.sizeof("struct iommu_ioas_alloc"):] == bytes(16)


@pytest.mark.parametrize("request_value", [
    ioctl.IO(0x3B, 0x97),            # a hole: past 7.3's last command and the series' 0x96
    ioctl.IO(0x3B, 0xEE),            # past the table: VFIO compat, which does not know it
    ioctl.IO(0x3C, 0x81),            # IOAS_ALLOC's nr with another type
    ioctl.IO(0x3B, 0x81) | (12 << 16) | (3 << 30),   # _IOWR(';', 0x81, 12): sized encoding
], ids=["hole-0x97", "nr-0xee", "type-0x3c", "iowr-0x81"])
def test_unknown_request_is_enotty(iommufd, request_value):
    idef = ioctl.IoctlDef(f"{request_value:#x}", request_value, "struct iommu_ioas_alloc", "iommufd")
    with pytest.raises(errors.NoSuchIoctl):
        ioctl.call(iommufd.backend, iommufd.fileno(), idef)


def test_noiommu_get_pa_on_a_kernel_without_noiommu_is_eopnotsupp(iommufd):
    ioas = iommufd.alloc_ioas()
    assert ffi.sizeof("struct iommu_ioas_noiommu_get_pa") == 40
    with pytest.raises(errors.NotSupported):
        iommufd.noiommu_get_pa(ioas, 0, PAGE_SIZE)
    with pytest.raises(errors.NotSupported):          # before any id lookup
        _raw(iommufd, IOMMU_IOAS_NOIOMMU_GET_PA, ioas_id=999, iova=0, length=PAGE_SIZE)
    arg = ioctl.new(IOMMU_IOAS_NOIOMMU_GET_PA, ioas_id=ioas.id, length=PAGE_SIZE)
    arg.size = 39
    with pytest.raises(errors.InvalidArgument):
        ioctl.invoke(iommufd.backend, iommufd.fileno(), IOMMU_IOAS_NOIOMMU_GET_PA, arg)


# -- MAP_FILE -----------------------------------------------------------------------------------

def test_map_file_of_a_pipe_into_an_ioas_without_domain(iommufd):
    """7.3 checks the file type only when it pins the pages (a domain or an
    access): MAP_FILE of a pipe into an IOAS without a domain is accepted."""
    ioas = iommufd.alloc_ioas()
    read_end, write_end = os.pipe()
    try:
        assert ioas.map_file(read_end, 0, PAGE_SIZE, iova=0x100000) == 0x100000
        assert ioas.unmap(0x100000, PAGE_SIZE) == PAGE_SIZE
    finally:
        os.close(read_end)
        os.close(write_end)


def test_map_file_of_a_closed_fd_is_ebadf(iommufd):
    ioas = iommufd.alloc_ioas()
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(errors.BadFd):
        _raw(iommufd, IOMMU_IOAS_MAP_FILE, flags=RW | MAP_FIXED_IOVA, ioas_id=ioas.id,
             fd=read_end, start=0, length=PAGE_SIZE, iova=0x100000)


def test_map_file_seals_are_neither_required_nor_frozen_on_stock_73(iommufd):
    """Stock 7.3 samples nothing it enforces: an unsealed memfd maps, the seals
    can be added (or the file grown) after MAP_FILE, and the mapping stays as
    it was mapped (the series samples the seals at MAP_FILE for preservation,
    which is why the library seals first)."""
    ioas = iommufd.alloc_ioas()
    with MemFD.create("unsealed", 2 * PAGE_SIZE) as memfd:
        assert memfd.seals == Seal(0)
        ioas.map_file(memfd, 0, 2 * PAGE_SIZE, iova=0x100000)
        memfd.resize(4 * PAGE_SIZE)
        memfd.add_seals(LIVE_UPDATE_SEALS)
        assert memfd.seals == LIVE_UPDATE_SEALS
        ioas.map_file(memfd, 2 * PAGE_SIZE, 2 * PAGE_SIZE, iova=0x200000)
        assert [(m.iova, m.length) for m in ioas.mappings] == [(0x100000, 2 * PAGE_SIZE),
                                                                (0x200000, 2 * PAGE_SIZE)]
        assert ioas.unmap_all() == 4 * PAGE_SIZE


def test_map_file_beyond_the_end_of_the_file_without_a_domain_is_accepted(iommufd):
    ioas = iommufd.alloc_ioas()
    with MemFD.create("short", PAGE_SIZE) as memfd:
        assert ioas.map_file(memfd, 0, 4 * PAGE_SIZE, iova=0x100000) == 0x100000
        assert ioas.unmap_all() == 4 * PAGE_SIZE


# -- devices -----------------------------------------------------------------------------------

def test_virtio_net_is_on_vfio_pci_with_a_cdev(virtio_net, device):
    assert pci.PciDevice(virtio_net.bdf).driver == "vfio-pci"
    assert virtio_net.vfio_cdev.startswith("/dev/vfio/devices/vfio")
    assert device.fileno() >= 0


def test_device_ioctls_before_bind_are_einval(device, iommufd):
    ioas = iommufd.alloc_ioas()
    with pytest.raises(errors.VfioError) as info:      # the library refuses it itself
        ioctl.call(device.backend, device.fileno(), ATTACH_IOMMUFD_PT, pt_id=ioas.id)
    assert info.value.errno == E.EINVAL
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(device.backend, device.fileno(), GET_INFO)


def test_bind_twice_is_einval(device, iommufd):
    assert device.bind(iommufd) == 1                   # ids start at 1 for devices too
    with pytest.raises(errors.InvalidArgument):
        device.bind(iommufd)
    with IOMMUFD.open() as other, pytest.raises(errors.InvalidArgument):
        device.bind(other)
    assert iommufd.alloc_ioas().id == 2


def test_hwpt_alloc_with_a_bad_dev_id_is_enoent_and_a_bad_pt_id_einval(device, iommufd):
    ioas = iommufd.alloc_ioas()
    dev_id = device.bind(iommufd)
    for bad in (0, dev_id + 100, ioas.id):             # unknown, unknown, not a device
        with pytest.raises(errors.NotFound):
            iommufd.alloc_hwpt(bad, ioas)
    # a bad pt_id is EINVAL, not ENOENT (hw_pagetable.c:369-372, 420)
    with pytest.raises(errors.InvalidArgument):         # unknown pt_id
        iommufd.alloc_hwpt(dev_id, 4242)
    with pytest.raises(errors.InvalidArgument):         # pt_id is a device, not an IOAS
        _raw(iommufd, IOMMU_HWPT_ALLOC, dev_id=dev_id, pt_id=dev_id)


def test_destroy_of_a_bound_device_id_is_ebusy(device, iommufd):
    dev_id = device.bind(iommufd)
    with pytest.raises(errors.Busy):
        _raw(iommufd, IOMMU_DESTROY, id=dev_id)


def test_objects_in_use_cannot_be_destroyed(device, iommufd):
    ioas = iommufd.alloc_ioas()
    device.bind(iommufd)
    hwpt = iommufd.alloc_hwpt(device, ioas)
    with pytest.raises(errors.Busy):                   # the HWPT holds the IOAS
        ioas.destroy()
    device.attach(hwpt)
    with pytest.raises(errors.Busy):                   # attached
        hwpt.destroy()
    device.detach_pt()
    hwpt.destroy()
    ioas.destroy()


def test_attach_to_an_ioas_makes_an_automatic_hwpt_that_dies_on_detach(device, iommufd):
    ioas = iommufd.alloc_ioas()
    dev_id = device.bind(iommufd)
    auto = device.attach(ioas)
    assert auto not in (ioas.id, dev_id)
    assert device.attach(ioas) == auto                 # the same IOAS again: same HWPT
    with pytest.raises(errors.Busy):
        _raw(iommufd, IOMMU_DESTROY, id=auto)
    device.detach_pt()
    with pytest.raises(errors.NotFound):
        _raw(iommufd, IOMMU_DESTROY, id=auto)
    assert iommufd.alloc_ioas().id == auto             # its id is free again


def test_detach_without_attach_succeeds(device, iommufd):
    device.bind(iommufd)
    device.detach_pt()
    ioas = iommufd.alloc_ioas()
    device.attach(ioas)
    device.detach_pt()
    device.detach_pt()
    ioas.destroy()


def test_huge_pages_off_is_refused_once_a_domain_has_mappings(device, iommufd):
    ioas = iommufd.alloc_ioas()
    device.bind(iommufd)
    device.attach(ioas)
    ioas.huge_pages(False)                             # a domain but no mapping: fine
    ioas.huge_pages(True)
    ioas.map(aligned_buffer(PAGE_SIZE), iova=0x100000)
    with pytest.raises(errors.InvalidArgument):
        ioas.huge_pages(False)
    assert ioas.huge_pages() is True


def test_replace_moves_the_device_and_frees_the_old_hwpt(device, iommufd):
    ioas = iommufd.alloc_ioas()
    device.bind(iommufd)
    first, second = iommufd.alloc_hwpt(device, ioas), iommufd.alloc_hwpt(device, ioas)
    assert device.attach(first) == first.id
    assert device.attach(second) == second.id         # replace while attached
    first.destroy()
    with pytest.raises(errors.Busy):
        second.destroy()


def test_iova_ranges_once_attached_exclude_the_msi_window(device, iommufd):
    ioas = iommufd.alloc_ioas()
    device.bind(iommufd)
    device.attach(ioas)
    ranges = ioas.iova_ranges()
    assert [r for r in ranges if MSI_WINDOW.start in r or MSI_WINDOW.last in r] == []
    assert ranges[0] == IovaRange(0, MSI_WINDOW.start - 1)
    assert ranges[1].start == MSI_WINDOW.last + 1
    assert ioas.iova_alignment() == PAGE_SIZE
    with pytest.raises(errors.InvalidArgument):        # reserved: EINVAL, not EADDRINUSE
        ioas.map(aligned_buffer(PAGE_SIZE), iova=MSI_WINDOW.start)


def test_domain_aperture_is_the_vtd_mgaw(device, iommufd):
    ioas = iommufd.alloc_ioas()
    device.bind(iommufd)
    cap = iommufd.get_hw_info(device).vtd.cap_reg
    mgaw = ((cap >> 16) & 0x3F) + 1
    device.attach(ioas)
    assert ioas.iova_ranges()[-1].last == (1 << mgaw) - 1


def test_allowed_range_over_the_msi_window_blocks_attach(device, iommufd):
    ioas = iommufd.alloc_ioas()
    device.bind(iommufd)
    ioas.allow_iovas([(0xFE000000, 0xFEFFFFFF)])
    with pytest.raises(errors.AddressInUse):
        device.attach(ioas)
    ioas.allow_iovas([])
    device.attach(ioas)
    with pytest.raises(errors.AddressInUse):           # and the other way round
        ioas.allow_iovas([(0xFE000000, 0xFEFFFFFF)])


def test_mapping_in_the_msi_window_blocks_attach(device, iommufd):
    ioas = iommufd.alloc_ioas()
    device.bind(iommufd)
    ioas.map(aligned_buffer(PAGE_SIZE), iova=MSI_WINDOW.start)
    with pytest.raises(errors.AddressInUse):
        device.attach(ioas)
    ioas.unmap_all()
    device.attach(ioas)


def test_hw_info_of_the_vtd(device, iommufd):
    device.bind(iommufd)
    info = iommufd.get_hw_info(device)
    assert info.type_name == "intel_vtd" and info.data_len == 24
    assert info.vtd.errata_772415_spr17                  # 7.3 always reports it
    assert info.vtd.cap_reg and info.vtd.ecap_reg
    assert not info.dirty_tracking
    assert info.max_pasid_log2 == 0


def test_hw_info_says_ats_is_not_supported_for_the_virtio_net(device, iommufd):
    device.bind(iommufd)
    info = iommufd.get_hw_info(device)
    assert info.capability_names == ["pci_ats_not_supported"]


def test_vtd_without_scalable_mode_has_no_dirty_tracking_nesting_or_viommu(device, iommufd):
    ioas = iommufd.alloc_ioas()
    device.bind(iommufd)
    with pytest.raises(errors.NotSupported):
        iommufd.alloc_hwpt(device, ioas, dirty_tracking=True)
    with pytest.raises(errors.NotSupported):
        iommufd.alloc_hwpt(device, ioas, nest_parent=True)
    hwpt = iommufd.alloc_hwpt(device, ioas, pasid=True)      # PASID-compatible paging: fine
    for vtype in ("default", "arm_smmuv3"):
        with pytest.raises(errors.NotSupported):
            iommufd.alloc_viommu(device, hwpt, type=vtype)
    with pytest.raises(errors.NotSupported):
        hwpt.set_dirty_tracking(True)
    with pytest.raises(errors.NotSupported):
        hwpt.get_dirty_bitmap(0, PAGE_SIZE)


def test_map_file_of_a_pipe_fails_to_pin_into_a_domain(device, iommufd):
    ioas = iommufd.alloc_ioas()
    device.bind(iommufd)
    device.attach(ioas)
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(errors.InvalidArgument):
            ioas.map_file(read_end, 0, PAGE_SIZE, iova=0x100000)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert ioas.unmap_all() == 0                       # nothing was left mapped


def test_pinned_memfd_pages_make_f_seal_write_ebusy(device, iommufd):
    ioas = iommufd.alloc_ioas()
    device.bind(iommufd)
    device.attach(ioas)
    with MemFD.create("pinned", 4 * PAGE_SIZE) as memfd:
        memfd.add_seals(Seal.GROW | Seal.SHRINK)
        ioas.map_file(memfd, iova=0x200000)
        with pytest.raises(errors.Busy):
            memfd.add_seals(Seal.WRITE)
        ioas.unmap_all()
        memfd.add_seals(Seal.WRITE)


def test_hw_info_of_another_input_type_is_eopnotsupp(device, iommufd):
    device.bind(iommufd)
    with pytest.raises(errors.NotSupported):
        iommufd.get_hw_info(device, data_type=ioctl.const("IOMMU_HW_INFO_TYPE_ARM_SMMUV3"))
    assert iommufd.get_hw_info(device, buffer_size=8) == iommufd.get_hw_info(device)


def test_reset_works_iff_get_info_says_so(device, iommufd):
    device.bind(iommufd)
    if device.info().reset_supported:
        device.reset()
    else:
        with pytest.raises(errors.InvalidArgument):
            device.reset()


def test_qemu_virtio_net_as_vfio_sees_it(device, iommufd):
    device.bind(iommufd)
    info = device.info()
    assert info.is_pci and not info.reset_supported
    assert device.region_info("config").size == 256
    rom = device.region_info("rom")
    assert rom.readable and not rom.writable and rom.size == 256 * 1024
    assert device.irq_info("msix").count == 4
