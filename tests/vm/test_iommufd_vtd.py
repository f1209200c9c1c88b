"""iommufd on QEMU's emulated Intel VT-d (``intel-iommu,intremap=on``: legacy
mode, no scalable mode) with the guest's virtio-net bound to vfio-pci, through
the public API only (``IOMMUFD``, ``IOAS``, ``HWPT``, ``VfioDevice``, ``MemFD``).

These run in the guest on the real 7.3 kernel. Binding the device to vfio-pci
and back costs a few tens of milliseconds under TCG, so every test gets a
fresh binding from the ``vfio_device`` fixture; the VT-d register decoding is
read once per module.
"""
from __future__ import annotations

import errno as E
import os
from dataclasses import dataclass

import pytest

from pyiommufd import errors, ioctl
from pyiommufd._uapi import ffi
from pyiommufd.iommufd import (HW_INFO_TYPES, IOMMU_IOAS_MAP, IOMMUFD, MAP_FIXED_IOVA, MAP_READABLE,
                               MAP_WRITEABLE, PAGE_SIZE, U64_MAX, IovaRange, aligned_buffer)
from pyiommufd.memfd import MemFD, Seal
from pyiommufd.vfio import VfioDevice

MSI_WINDOW = IovaRange(0xFEE00000, 0xFEEFFFFF)
INTEL_VTD = ioctl.const("IOMMU_HW_INFO_TYPE_INTEL_VTD")
ARM_SMMUV3 = ioctl.const("IOMMU_HW_INFO_TYPE_ARM_SMMUV3")
VIRTIO_VENDOR, VIRTIO_NET_MODERN = 0x1AF4, 0x1041
PCI_CAP_ID_VNDR, PCI_CAP_ID_MSIX = 0x09, 0x11


@dataclass
class Bound:
    iommufd: IOMMUFD
    device: VfioDevice
    dev_id: int
    bdf: str


@pytest.fixture
def bound(vfio_device):
    """The virtio-net's cdev, bound to a fresh iommufd (no IOAS yet)."""
    iommufd = IOMMUFD.open()
    device = VfioDevice.open(vfio_device.cdev)
    try:
        dev_id = device.bind(iommufd)
        yield Bound(iommufd, device, dev_id, vfio_device.bdf)
    finally:
        device.close()          # before the fixture unbinds vfio-pci: the kernel waits for it
        iommufd.close()


@pytest.fixture
def attached(bound):
    """``bound`` with an IOAS the device is attached to (automatic HWPT)."""
    ioas = bound.iommufd.alloc_ioas()
    bound.device.attach(ioas)
    return bound, ioas


def _in_usable_range(ioas, iova: int, length: int) -> bool:
    return any(r.start <= iova and iova + length - 1 <= r.last for r in ioas.iova_ranges())


# -- IOAS --------------------------------------------------------------------------------------

def test_ioas_alloc_and_destroy(bound, kernel_release):
    iommufd = bound.iommufd
    first, second = iommufd.alloc_ioas(), iommufd.alloc_ioas()
    assert len({bound.dev_id, first.id, second.id}) == 3
    assert sorted(o.id for o in iommufd.ioases) == sorted([first.id, second.id])
    first.destroy()
    assert first.destroyed and first not in iommufd.ioases
    with pytest.raises(errors.NotFound):           # the id is gone in the kernel
        ioctl.call(iommufd.backend, iommufd.fileno(), IOMMU_IOAS_MAP, ioas_id=first.id,
                   flags=MAP_READABLE, user_va=0x10000, length=PAGE_SIZE)
    with iommufd.alloc_ioas() as scoped:
        assert scoped.id == first.id               # lowest free id again
    assert scoped.destroyed
    second.destroy()


def test_map_and_unmap_of_page_aligned_buffers_in_a_vtd_domain(attached):
    bound, ioas = attached
    buf = aligned_buffer(16 * PAGE_SIZE)
    iova = ioas.map(buf)
    assert iova % PAGE_SIZE == 0 and _in_usable_range(ioas, iova, len(buf))
    assert not (MSI_WINDOW.start <= iova <= MSI_WINDOW.last)
    fixed = ioas.map(aligned_buffer(4 * PAGE_SIZE), iova=0x4000000, writeable=False)
    assert fixed == 0x4000000
    assert [(m.iova, m.kind, m.writeable) for m in ioas.mappings] == sorted(
        [(iova, "va", True), (fixed, "va", False)])
    with pytest.raises(errors.AlreadyExists):
        ioas.map(aligned_buffer(PAGE_SIZE), iova=0x4001000)
    assert ioas.unmap(fixed, 4 * PAGE_SIZE) == 4 * PAGE_SIZE
    assert ioas.unmap(iova, len(buf)) == len(buf)
    assert ioas.mappings == []


def test_unaligned_buffers_are_refused_once_a_domain_is_attached(attached):
    bound, ioas = attached
    buf = aligned_buffer(4 * PAGE_SIZE)
    with pytest.raises(errors.InvalidArgument) as info:
        ioas.map(memoryview(buf)[0x800:0x800 + PAGE_SIZE])
    assert "not page aligned" in (info.value.detail or "")
    addr = ffi.cast("uintptr_t", ffi.from_buffer(buf))
    with pytest.raises(errors.InvalidArgument):       # IOVA not page aligned
        ioctl.call(bound.iommufd.backend, bound.iommufd.fileno(), IOMMU_IOAS_MAP, ioas_id=ioas.id,
                   flags=MAP_READABLE | MAP_WRITEABLE | MAP_FIXED_IOVA, user_va=int(addr),
                   length=PAGE_SIZE, iova=0x100800)


def test_map_file_of_a_sealed_memfd(attached):
    bound, ioas = attached
    data = os.urandom(8 * PAGE_SIZE)
    with MemFD.create("vtd-guest-ram", len(data)) as ram:
        ram.write(data)
        ram.seal_for_live_update()
        assert ram.sealed_for_live_update
        iova = ioas.map_file(ram, 0, len(data), iova=0x100000)
        assert iova == 0x100000
        half = ioas.map_file(ram, 4 * PAGE_SIZE)           # the rest of the file from an offset
        (m1, m2) = sorted(ioas.mappings, key=lambda m: m.start)
        assert (m1.kind, m1.fd, m1.start, m1.length) == ("file", ram.fileno(), 0, len(data))
        assert (m2.iova, m2.start, m2.length) == (half, 4 * PAGE_SIZE, 4 * PAGE_SIZE)
        with pytest.raises(errors.PermissionDenied):       # sealed: no shrink
            ram.resize(PAGE_SIZE)
        assert ioas.unmap_all() == len(data) + 4 * PAGE_SIZE
        assert ram.read(len(data)) == data


def test_map_file_pins_the_memfd_pages_into_the_domain(attached):
    """F_SEAL_WRITE waits for extra page references and fails with EBUSY if
    they stay: the pages MAP_FILE pinned for the VT-d domain are such
    references, until the unmap drops them."""
    bound, ioas = attached
    with MemFD.create("pinned", 4 * PAGE_SIZE) as memfd:
        memfd.write(b"\x5a" * 4 * PAGE_SIZE)
        memfd.add_seals(Seal.GROW | Seal.SHRINK)
        ioas.map_file(memfd, 0, 4 * PAGE_SIZE, iova=0x200000)
        with pytest.raises(errors.Busy):
            memfd.add_seals(Seal.WRITE)
        ioas.unmap(0x200000, 4 * PAGE_SIZE)
        memfd.add_seals(Seal.WRITE)
        assert Seal.WRITE in memfd.seals


def test_map_file_past_the_end_of_the_file_fails_to_pin(attached):
    bound, ioas = attached
    with MemFD.create("short", PAGE_SIZE) as memfd:
        with pytest.raises(errors.InvalidArgument):
            ioas.map_file(memfd, 0, 4 * PAGE_SIZE, iova=0x100000)
    assert ioas.unmap_all() == 0


def test_unmap_all_and_copy_between_two_ioases(bound):
    iommufd, device = bound.iommufd, bound.device
    src, dst = iommufd.alloc_ioas(), iommufd.alloc_ioas()
    device.attach(src)
    dst_hwpt = iommufd.alloc_hwpt(device, dst)         # a second VT-d domain on dst
    buf = aligned_buffer(8 * PAGE_SIZE)
    with MemFD.create("copy-src", 8 * PAGE_SIZE) as memfd:
        src.map(buf, iova=0x100000)
        src.map_file(memfd, iova=0x200000)
        assert dst.copy(src, 0x100000, 8 * PAGE_SIZE, 0x300000) == 0x300000
        auto = dst.copy(src, 0x202000, 2 * PAGE_SIZE, readable=True, writeable=False)
        assert auto % PAGE_SIZE == 0 and auto not in (0x300000,)
        kinds = {m.iova: (m.kind, m.copied_from) for m in dst.mappings}
        assert kinds[0x300000] == ("va", (src.id, 0x100000))
        assert kinds[auto] == ("file", (src.id, 0x202000))
        assert src.unmap_all() == 16 * PAGE_SIZE           # the copies stay
        assert dst.unmap(0x300000, 8 * PAGE_SIZE) == 8 * PAGE_SIZE
        assert dst.unmap_all() == 2 * PAGE_SIZE
        assert dst.unmap_all() == 0
    dst_hwpt.destroy()


def test_copy_into_the_msi_window_of_an_attached_ioas_is_einval(bound):
    iommufd = bound.iommufd
    src, dst = iommufd.alloc_ioas(), iommufd.alloc_ioas()
    bound.device.attach(dst)
    src.map(aligned_buffer(PAGE_SIZE), iova=0x100000)
    with pytest.raises(errors.InvalidArgument):
        dst.copy(src, 0x100000, PAGE_SIZE, MSI_WINDOW.start)
    assert dst.copy(src, 0x100000, PAGE_SIZE, MSI_WINDOW.last + 1) == MSI_WINDOW.last + 1


# -- IOVA ranges and allowed IOVAs --------------------------------------------------------------

def test_iova_ranges_follow_domains_and_the_msi_window(bound, vtd_regs):
    iommufd, device = bound.iommufd, bound.device
    ioas = iommufd.alloc_ioas()
    assert ioas.iova_ranges() == [IovaRange(0, U64_MAX)] and ioas.iova_alignment() == 1
    aperture_last = (1 << vtd_regs.mgaw) - 1
    hwpt = iommufd.alloc_hwpt(device, ioas)                 # a domain, no device yet
    assert ioas.iova_ranges() == [IovaRange(0, aperture_last)]
    assert ioas.iova_alignment() == PAGE_SIZE
    device.attach(hwpt)                                     # now the device's MSI window
    assert ioas.iova_ranges() == [IovaRange(0, MSI_WINDOW.start - 1),
                                  IovaRange(MSI_WINDOW.last + 1, aperture_last)]
    with pytest.raises(errors.InvalidArgument):
        ioas.map(aligned_buffer(PAGE_SIZE), iova=0xFEE10000)
    device.detach_pt()
    assert ioas.iova_ranges() == [IovaRange(0, aperture_last)]
    hwpt.destroy()
    assert ioas.iova_ranges() == [IovaRange(0, U64_MAX)]


def test_allow_iovas(attached):
    bound, ioas = attached
    ioas.allow_iovas([(0x1000000, 0x1FFFFFF)])
    assert 0x1000000 <= ioas.map(aligned_buffer(4 * PAGE_SIZE)) <= 0x1FFFFFF - 4 * PAGE_SIZE + 1
    with pytest.raises(errors.AddressInUse):               # over the MSI window
        ioas.allow_iovas([(0xFE000000, 0xFEFFFFFF)])
    ioas.allow_iovas([(0x1000000, 0x1000FFF)])
    with pytest.raises(errors.IommufdError) as info:       # 16 pages do not fit in 1
        ioas.map(aligned_buffer(0x10 * PAGE_SIZE))
    assert info.value.errno == E.ENOSPC
    ioas.allow_iovas([])
    ioas.map(aligned_buffer(0x10 * PAGE_SIZE))


# -- HWPTs ------------------------------------------------------------------------------------

def test_hwpt_alloc_attach_replace_detach(bound):
    iommufd, device = bound.iommufd, bound.device
    ioas = iommufd.alloc_ioas()
    first = iommufd.alloc_hwpt(device, ioas)
    second = iommufd.alloc_hwpt(bound.dev_id, ioas)
    assert (first.ioas, second.ioas) == (ioas, ioas) and first.id != second.id
    assert device.attach(first) == first.id and device.pt_id == first.id
    assert device.attach(second) == second.id                  # replace while attached
    first.destroy()
    with pytest.raises(errors.Busy) as info:
        second.destroy()
    assert isinstance(info.value, errors.IommufdError) and info.value.errno == E.EBUSY
    assert "in use" in info.value.hint
    device.detach_pt()
    assert device.pt_id is None
    second.destroy()
    auto = device.attach(ioas)
    assert auto not in (ioas.id, bound.dev_id)
    assert device.attach(ioas) == auto                         # same IOAS: same automatic HWPT
    device.detach_pt()
    ioas.destroy()


def test_hwpt_on_an_ioas_with_mappings_gets_them(bound):
    iommufd, device = bound.iommufd, bound.device
    ioas = iommufd.alloc_ioas()
    with MemFD.create("prefilled", 4 * PAGE_SIZE) as memfd:
        ioas.map_file(memfd, iova=0x100000)
        hwpt = iommufd.alloc_hwpt(device, ioas)                 # fills the new domain (pins)
        device.attach(hwpt)
        with pytest.raises(errors.Busy):
            memfd.add_seals(Seal.WRITE)
        with pytest.raises(errors.Busy):
            ioas.destroy()
        device.detach_pt()
        hwpt.destroy()
        memfd.add_seals(Seal.WRITE)                             # unpinned with the domain


def test_detach_is_idempotent(bound):
    """VFIO_DEVICE_DETACH_IOMMUFD_PT of a device that is not attached does
    nothing and succeeds (vfio_iommufd_physical_detach_ioas returns early)."""
    device = bound.device
    device.detach_pt()
    ioas = bound.iommufd.alloc_ioas()
    device.attach(ioas)
    device.detach_pt()
    device.detach_pt()
    assert device.pt_id is None
    ioas.destroy()                                   # nothing holds it any more


# -- GET_HW_INFO ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class VtdRegs:
    cap: int
    ecap: int
    flags: int

    @property
    def mgaw(self) -> int:          # maximum guest address width
        return ((self.cap >> 16) & 0x3F) + 1

    @property
    def sagaw(self) -> int:         # supported adjusted guest address widths
        return (self.cap >> 8) & 0x1F

    @property
    def sllps(self) -> int:         # second-level large page support (bit 0: 2M, bit 1: 1G)
        return (self.cap >> 34) & 0xF

    def ecap_bit(self, bit: int) -> bool:
        return bool((self.ecap >> bit) & 1)


@pytest.fixture
def vtd_regs(bound) -> VtdRegs:
    info = bound.iommufd.get_hw_info(bound.device)
    return VtdRegs(info.vtd.cap_reg, info.vtd.ecap_reg, info.vtd.flags)


def test_get_hw_info_decodes_the_vtd_record(bound, vtd_regs):
    info = bound.iommufd.get_hw_info(bound.device)
    assert (info.data_type, info.type_name) == (INTEL_VTD, "intel_vtd")
    assert info.dev_id == bound.dev_id
    assert info.data_len == len(info.data) == 24            # struct iommu_hw_info_vtd
    assert info.decoded == {"flags": info.vtd.flags, "cap_reg": info.vtd.cap_reg,
                            "ecap_reg": info.vtd.ecap_reg}
    assert info.vtd.errata_772415_spr17                     # 7.3 reports it on every VT-d
    regs = vtd_regs
    assert regs.cap != 0 and regs.ecap != 0
    assert regs.mgaw in (39, 48, 57)
    assert regs.sagaw & (1 << ((regs.mgaw - 30) // 9))      # the MGAW's page-table depth
    assert regs.sllps & 0b01                                # 2 MiB second-level pages
    assert regs.ecap_bit(1) and regs.ecap_bit(3)            # QI and IR: intremap=on
    assert not regs.ecap_bit(43)                            # no scalable mode (SMTS)...
    assert not regs.ecap_bit(50)                            # ...so no SSADS dirty bits
    assert info.capability_names == ["pci_ats_not_supported"]
    assert info.max_pasid_log2 == 0                         # no PASID without scalable mode


def test_get_hw_info_with_an_input_type_and_a_small_buffer(bound):
    iommufd, device = bound.iommufd, bound.device
    default = iommufd.get_hw_info(device)
    assert iommufd.get_hw_info(device, data_type=INTEL_VTD) == default
    assert iommufd.get_hw_info(device, data_type=0) == default      # TYPE_DEFAULT
    assert iommufd.get_hw_info(device, buffer_size=8) == default    # re-asked at 24 bytes
    with pytest.raises(errors.NotSupported):
        iommufd.get_hw_info(device, data_type=ARM_SMMUV3)
    assert HW_INFO_TYPES[INTEL_VTD][0] == "intel_vtd"


# -- IOMMU_OPTION --------------------------------------------------------------------------------

def test_rlimit_mode_option(bound):
    with IOMMUFD.open() as fresh:
        assert fresh.option("rlimit_mode") == 0
        assert fresh.option("rlimit_mode", 1) == 1
        assert fresh.option("rlimit_mode") == 1
        ioas = fresh.alloc_ioas()
        ioas.map(aligned_buffer(PAGE_SIZE))                 # accounted to the mm now
    with pytest.raises(errors.Busy):                        # the bound device is an object
        bound.iommufd.option("rlimit_mode", 1)
    assert bound.iommufd.option("rlimit_mode") == 0


def test_huge_pages_option_with_a_vtd_domain(bound):
    iommufd, device = bound.iommufd, bound.device
    ioas = iommufd.alloc_ioas()
    assert ioas.huge_pages() is True
    device.attach(ioas)
    assert ioas.huge_pages(False) is False                  # a domain, but nothing mapped yet
    assert ioas.huge_pages() is False and ioas.iova_alignment() == PAGE_SIZE
    ioas.huge_pages(True)
    ioas.map(aligned_buffer(4 * PAGE_SIZE), iova=0x200000)
    with pytest.raises(errors.InvalidArgument):             # domain + mappings: too late
        ioas.huge_pages(False)
    assert ioas.huge_pages() is True
    ioas.unmap_all()
    ioas.huge_pages(False)


# -- dirty tracking and vIOMMU ----------------------------------------------------------------------

def test_dirty_tracking_follows_the_hw_info_capability(attached):
    bound, ioas = attached
    iommufd, device = bound.iommufd, bound.device
    info = iommufd.get_hw_info(device)
    if info.dirty_tracking:                                  # a VT-d with SSADS (scalable mode)
        hwpt = iommufd.alloc_hwpt(device, ioas, dirty_tracking=True)
        device.attach(hwpt)
        ioas.map(aligned_buffer(4 * PAGE_SIZE), iova=0x100000)
        hwpt.set_dirty_tracking(True)
        assert hwpt.get_dirty_bitmap(0x100000, 4 * PAGE_SIZE).dirty_iovas() == []   # no DMA
        hwpt.set_dirty_tracking(False)
        return
    # QEMU's intel-iommu in legacy mode: the kernel refuses every dirty op
    with pytest.raises(errors.NotSupported) as info_err:
        iommufd.alloc_hwpt(device, ioas, dirty_tracking=True)
    assert info_err.value.errno == E.EOPNOTSUPP
    hwpt = iommufd.alloc_hwpt(device, ioas)
    for call in (lambda: hwpt.set_dirty_tracking(True), lambda: hwpt.set_dirty_tracking(False),
                 lambda: hwpt.get_dirty_bitmap(0x100000, 4 * PAGE_SIZE)):
        with pytest.raises(errors.NotSupported):
            call()


def test_viommu_alloc_is_eopnotsupp_on_73_vtd(bound):
    """7.3's intel-iommu has no viommu_init, and without nested translation
    (scalable mode) there is no nest-parent HWPT to put a vIOMMU on either."""
    iommufd, device = bound.iommufd, bound.device
    ioas = iommufd.alloc_ioas()
    with pytest.raises(errors.NotSupported):
        iommufd.alloc_hwpt(device, ioas, nest_parent=True)
    hwpt = iommufd.alloc_hwpt(device, ioas)
    for vtype in ("default", "arm_smmuv3", "tegra241_cmdqv"):
        with pytest.raises(errors.NotSupported):
            iommufd.alloc_viommu(device, hwpt, type=vtype)
    with pytest.raises(errors.InvalidArgument):              # nested VT-d stage 1: no parent
        iommufd.alloc_hwpt(device, hwpt, data_type="vtd_s1",
                           data={"pgtbl_addr": 0x1000000, "addr_width": 48})


# -- VFIO device ---------------------------------------------------------------------------------

def test_vfio_device_info_of_the_virtio_net(bound):
    device = bound.device
    info = device.info()
    assert info.is_pci and "pci" in info.flag_names
    assert info.num_regions == 9 and info.num_irqs == 5
    regions = device.regions()
    assert [r.index for r in regions] == list(range(8))            # BAR0-5, ROM, config; no VGA
    config = device.region_info("config")
    assert config.readable and config.writable and config.size >= 256
    bars = [r for r in regions if r.index < 6 and r.size]
    assert bars and all(r.size & (r.size - 1) == 0 for r in bars)    # BARs are powers of two
    assert any(r.mmappable for r in bars)
    assert any(r.msix_mappable for r in bars)                      # the MSI-X table's BAR


def test_config_read_of_the_virtio_net(bound):
    device = bound.device
    assert device.config_read(0x00, 2) == VIRTIO_VENDOR
    assert device.config_read(0x02, 2) == VIRTIO_NET_MODERN
    assert device.config_read(0x08, 4) >> 8 == 0x020000             # class: Ethernet
    assert device.config_read(0x0E, 1) & 0x7F == 0                  # header type 0
    assert device.config_read(0x06, 2) & 0x10                       # capability list
    seen, ptr = [], device.config_read(0x34, 1) & 0xFC
    while ptr and len(seen) < 48:
        seen.append(device.config_read(ptr, 1))
        ptr = device.config_read(ptr + 1, 1) & 0xFC
    assert PCI_CAP_ID_MSIX in seen and seen.count(PCI_CAP_ID_VNDR) >= 4   # virtio structures
    with pytest.raises(errors.UsageError):
        device.config_read(0x01, 2)                                 # unaligned: refused locally


def test_irq_info_of_the_virtio_net(bound):
    device = bound.device
    intx, msi, msix, err, req = (device.irq_info(i) for i in ("intx", "msi", "msix", "err", "req"))
    assert intx.count == 1 and intx.eventfd and intx.maskable and intx.automasked
    assert msi.count == 0                                           # no MSI capability
    assert msix.count >= 2 and msix.eventfd
    assert err.count == 1 and req.count == 1
    assert [i.index for i in device.irqs()] == [0, 1, 2, 3, 4]


def test_reset_of_the_virtio_net(bound):
    device = bound.device
    if device.info().reset_supported:
        device.reset()
        return
    # QEMU's virtio-net-pci has neither FLR nor a PM reset; vfio-pci says so
    with pytest.raises(errors.InvalidArgument) as info:
        device.reset()
    assert isinstance(info.value, errors.VfioError)
    with pytest.raises(errors.NoDevice):                            # no slot/bus reset either
        device.hot_reset_info()


# -- typed errors ---------------------------------------------------------------------------------

def test_typed_errors(attached):
    bound, ioas = attached
    with pytest.raises(errors.NotFound) as info:
        ioas.unmap(0x7000000, PAGE_SIZE)
    err = info.value
    assert isinstance(err, errors.IommufdError) and isinstance(err, OSError)
    assert (err.op, err.errno, err.errname) == ("IOMMU_IOAS_UNMAP", E.ENOENT, "ENOENT")
    assert "IOMMU_IOAS_UNMAP" in str(err) and err.hint
    with pytest.raises(errors.Busy) as info:
        bound.iommufd.destroy(bound.device.pt_id)          # the attached automatic HWPT
    assert (info.value.op, info.value.errno) == ("IOMMU_DESTROY", E.EBUSY)
    with pytest.raises(errors.InvalidArgument) as info:
        bound.device.bind(bound.iommufd)
    assert isinstance(info.value, errors.VfioError) and info.value.op == "VFIO_DEVICE_BIND_IOMMUFD"
    with pytest.raises(errors.UsageError):                 # caught before the kernel
        ioas.unmap(0x7000000, 0)
