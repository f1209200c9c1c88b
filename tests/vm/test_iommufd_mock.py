"""What QEMU's emulated VT-d cannot show, on the iommufd mock domain of
``CONFIG_IOMMUFD_TEST`` (the VM kernel's fragment enables it): a mock device
and HWPT created by ``IOMMU_TEST_OP_MOCK_DOMAIN``, dirty tracking driven by
``IOMMU_TEST_OP_DIRTY`` and read back through ``HWPT.get_dirty_bitmap``, and
``IOMMU_TEST_OP_MD_CHECK_MAP`` proof that ``IOAS.map_file``/``map``/``copy``
really reached the domain's page table.

The mock ioctl is test-only kernel ABI, declared in ``iommufd_test_cmd.py``
next to this file; everything else is the public pyiommufd API (the mock
device's ``idev_id`` is a dev_id like a bound VFIO device's).
"""
from __future__ import annotations

import errno as E
import os

import pytest

import iommufd_test_cmd as T
from pyiommufd import abi, errors
from pyiommufd.iommufd import HWPT, IOMMUFD, PAGE_SIZE, IovaRange, aligned_buffer
from pyiommufd.memfd import MemFD

BASE = T.MOCK_APERTURE_START          # every IOVA here is inside the mock aperture
LENGTH = 16 * PAGE_SIZE


@pytest.fixture
def iommufd():
    with IOMMUFD.open() as ictx:
        yield ictx


@pytest.fixture
def mock(iommufd):
    """An IOAS with one mock device attached to it (automatic mock HWPT)."""
    ioas = iommufd.alloc_ioas()
    dev = T.mock_domain(iommufd, ioas.id)
    return ioas, dev


def test_mock_domain_on_an_ioas(iommufd, mock):
    ioas, dev = mock
    assert ioas.id == 1
    assert len({ioas.id, dev.stdev_id, dev.hwpt_id, dev.idev_id}) == 4
    # the mock aperture and 2 KiB page size, as iommufd_test.h defines them
    assert ioas.iova_ranges() == [IovaRange(T.MOCK_APERTURE_START, T.MOCK_APERTURE_LAST)]
    assert ioas.iova_alignment() == T.MOCK_PAGE_SIZE
    info = iommufd.get_hw_info(dev.idev_id)
    assert (info.data_type, info.data_len) == (T.HW_INFO_TYPE_SELFTEST, 8)
    assert int.from_bytes(info.data[4:8], "little") == T.HW_INFO_SELFTEST_REGVAL
    assert info.dirty_tracking and "pci_ats_not_supported" in info.capability_names
    with pytest.raises(errors.Busy):                       # the mock device is attached
        iommufd.destroy(dev.hwpt_id)
    with pytest.raises(errors.InvalidArgument):            # outside the mock aperture
        ioas.map(aligned_buffer(PAGE_SIZE), iova=0x1000)


def test_test_cmd_size_rules(iommufd, mock):
    ioas, dev = mock
    with pytest.raises(errors.InvalidArgument):
        T.call(iommufd, T.OP_MOCK_DOMAIN, ioas.id, size=T.MIN_SIZE - 1)
    with pytest.raises(errors.NotSupported):               # unknown test op
        T.call(iommufd, 0x7777, ioas.id)
    with pytest.raises(errors.NotFound):                   # CHECK_MAP wants a paging HWPT id
        T.check_map(iommufd, ioas.id, BASE, PAGE_SIZE, 0x10000)


def test_map_file_reaches_the_mock_domain(iommufd, mock):
    ioas, dev = mock
    with MemFD.create("mock-ram", LENGTH) as ram:
        ram.write(os.urandom(LENGTH))
        ram.seal_for_live_update()
        iova = ioas.map_file(ram, 0, LENGTH, iova=BASE)
        view = ram.mmap()                                  # same page-cache pages
        try:
            T.check_map(iommufd, dev.hwpt_id, iova, LENGTH, T.address_of(view))
            T.check_map(iommufd, dev.hwpt_id, iova + 4 * PAGE_SIZE, 2 * PAGE_SIZE,
                        T.address_of(view) + 4 * PAGE_SIZE)
            other = aligned_buffer(LENGTH)
            other[:] = bytes(LENGTH)
            with pytest.raises(errors.InvalidArgument):    # other pages: the check is real
                T.check_map(iommufd, dev.hwpt_id, iova, LENGTH, T.address_of(other))
            ioas.unmap(iova, LENGTH)
            with pytest.raises(errors.InvalidArgument):    # gone from the page table
                T.check_map(iommufd, dev.hwpt_id, iova, PAGE_SIZE, T.address_of(view))
        finally:
            view.close()


def test_map_and_copy_reach_the_mock_domains(iommufd, mock):
    ioas, dev = mock
    buf = aligned_buffer(LENGTH)
    buf[:] = b"\xa5" * LENGTH                              # fault the pages in
    iova = ioas.map(buf)
    assert BASE <= iova <= T.MOCK_APERTURE_LAST
    T.check_map(iommufd, dev.hwpt_id, iova, LENGTH, T.address_of(buf))
    other_ioas = iommufd.alloc_ioas()
    other = T.mock_domain(iommufd, other_ioas.id)
    dst = other_ioas.copy(ioas, iova, LENGTH, BASE + 0x100000)
    T.check_map(iommufd, other.hwpt_id, dst, LENGTH, T.address_of(buf))   # shared pages
    ioas.unmap_all()
    T.check_map(iommufd, other.hwpt_id, dst, LENGTH, T.address_of(buf))   # the copy stays
    iommufd.destroy(other.stdev_id)


def test_dirty_tracking_on_the_mock_domain(iommufd, mock):
    ioas, dev = mock
    ioas.huge_pages(False)              # PAGE_SIZE IOPTEs: one dirty bit per 4 KiB page
    hwpt = iommufd.alloc_hwpt(dev.idev_id, ioas, dirty_tracking=True)
    assert T.mock_domain_replace(iommufd, dev.stdev_id, hwpt.id) == hwpt.id
    with pytest.raises(errors.NotFound):                   # the automatic HWPT died
        iommufd.destroy(dev.hwpt_id)
    buf = aligned_buffer(LENGTH)
    iova = ioas.map(buf, iova=BASE)
    with pytest.raises(errors.InvalidArgument):            # tracking not enabled yet
        T.set_dirty(iommufd, hwpt.id, iova, LENGTH, PAGE_SIZE, b"\x01")
    hwpt.set_dirty_tracking(True)
    assert hwpt.get_dirty_bitmap(iova, LENGTH).dirty_iovas() == []
    pages = [0, 2, 7, 15]
    bits = sum(1 << p for p in pages).to_bytes(2, "little")
    assert T.set_dirty(iommufd, hwpt.id, iova, LENGTH, PAGE_SIZE, bits) == len(pages)
    expected = [iova + p * PAGE_SIZE for p in pages]
    kept = hwpt.get_dirty_bitmap(iova, LENGTH, clear=False)        # NO_CLEAR
    assert kept.dirty_iovas() == expected and kept.count == 4
    assert hwpt.get_dirty_bitmap(iova, LENGTH).dirty_iovas() == expected   # read and clear
    assert hwpt.get_dirty_bitmap(iova, LENGTH).dirty_iovas() == []
    # a coarser bitmap: one bit per 32 KiB
    T.set_dirty(iommufd, hwpt.id, iova, LENGTH, PAGE_SIZE, (1 << 9).to_bytes(2, "little"))
    coarse = hwpt.get_dirty_bitmap(iova, LENGTH, page_size=8 * PAGE_SIZE)
    assert coarse.npages == 2 and coarse.dirty_iovas() == [iova + 8 * PAGE_SIZE]
    hwpt.set_dirty_tracking(False)
    with pytest.raises(errors.InvalidArgument):
        T.set_dirty(iommufd, hwpt.id, iova, LENGTH, PAGE_SIZE, b"\x01")
    with pytest.raises(errors.Busy):
        hwpt.destroy()
    iommufd.destroy(dev.stdev_id)                          # detaches and unbinds the mock device
    with pytest.raises(errors.NotFound):
        iommufd.destroy(dev.idev_id)
    hwpt.destroy()


def test_dirty_tracking_needs_a_capable_device(iommufd, mock):
    ioas, dev = mock
    hwpt = iommufd.alloc_hwpt(dev.idev_id, ioas, dirty_tracking=True)
    plain = T.mock_domain(iommufd, ioas.id, dev_flags=T.MOCK_FLAGS_DEVICE_NO_DIRTY)
    assert not iommufd.get_hw_info(plain.idev_id).dirty_tracking
    with pytest.raises(errors.NotSupported):
        iommufd.alloc_hwpt(plain.idev_id, ioas, dirty_tracking=True)
    with pytest.raises(errors.InvalidArgument):            # attaching it to a dirty domain
        T.mock_domain(iommufd, hwpt.id, dev_flags=T.MOCK_FLAGS_DEVICE_NO_DIRTY)
    with pytest.raises(errors.InvalidArgument):
        T.mock_domain_replace(iommufd, plain.stdev_id, hwpt.id)
    plain_hwpt = HWPT(iommufd, plain.hwpt_id, parent=ioas, owned=False)  # adopt the automatic one
    with pytest.raises(errors.NotSupported):               # no dirty ops in that domain
        plain_hwpt.set_dirty_tracking(True)


def test_reserved_iova_added_by_the_test_op(iommufd, mock):
    ioas, dev = mock
    T.add_reserved(iommufd, ioas.id, 0x40000000, 0x100000)
    assert ioas.iova_ranges() == [IovaRange(T.MOCK_APERTURE_START, 0x3FFFFFFF),
                                  IovaRange(0x40100000, T.MOCK_APERTURE_LAST)]
    with pytest.raises(errors.InvalidArgument):
        ioas.map(aligned_buffer(PAGE_SIZE), iova=0x40000000)
    ioas.allow_iovas([(0x30000000, 0x3FFFFFFF)])
    with pytest.raises(errors.AddressInUse):               # over the reserved range
        T.add_reserved(iommufd, ioas.id, 0x3FF00000, 0x1000)


def test_nr_0x95_with_a_mock_hwpt_is_the_73_occupant_and_marks_follow_the_probe(iommufd, mock):
    """With a mapped mock HWPT in place the probe still never runs 0x95's
    occupant (7.3's NOIOMMU_GET_PA, also on the series rebased to 0x96), a blind
    mark there is refused, and marking through the probe works exactly when the
    kernel has the mark ioctl at the configured nr."""
    ioas, dev = mock
    with MemFD.create("lu", LENGTH) as ram:
        ram.seal_for_live_update()
        ioas.map_file(ram, iova=BASE)
        at_95 = abi.probe_lu_abi(iommufd, nr=abi.DEFAULT_NR)
        configured = abi.probe_lu_abi(iommufd)
        moved = configured.nr != abi.DEFAULT_NR
        if moved or not configured.supported:
            assert at_95.status == "foreign" and at_95.errnos == {16: E.EINVAL}
            for revision in (abi.LU_V1, abi.LU_V2):        # a blind mark: NOIOMMU_GET_PA says EINVAL
                with pytest.raises(errors.InvalidArgument):
                    revision.mark(None, iommufd.fileno(), dev.hwpt_id, 0x789012)
            with pytest.raises(errors.NotSupported):       # and the 7.3 occupant is compiled out
                iommufd.noiommu_get_pa(ioas, BASE, PAGE_SIZE)
        hwpt = HWPT(iommufd, dev.hwpt_id, parent=ioas, owned=False)
        if configured.supported:
            hwpt.mark_preserved(0x789012)                  # the probe found the mark ioctl
            assert hwpt.marked
        else:
            with pytest.raises(errors.AbiError, match="kernel lacks"):
                hwpt.mark_preserved(0x789012)              # probe: nothing to mark with
            assert not hwpt.marked
        view = ram.mmap()                                  # the mapping is intact
        try:
            T.check_map(iommufd, dev.hwpt_id, BASE, LENGTH, T.address_of(view))
        finally:
            view.close()
