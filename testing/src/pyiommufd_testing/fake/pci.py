"""Fake PCI devices, drivers and IOMMU groups.

:class:`FakePciDevice` describes the *hardware* (it survives a simulated
kexec). :class:`PciBus` is one boot's view of it: which driver is bound,
``driver_override``, IOMMU group DMA ownership. Rules (the series' cover letter: what Phase 1 restores after the kexec):

* sysfs ``bind`` needs a driver that matches the device: its ID table, or
  ``driver_override`` naming it (vfio-pci and pci-stub match only that way);
  otherwise ENODEV (K:drivers/base/bus.c:258-276). A device that has a driver
  already gives EBUSY (K:drivers/base/dd.c:834-835).
* A driver without ``driver_managed_dma`` (anything but vfio-pci and
  pci-stub) first takes the group's default domain: if the group's DMA is
  owned (by an iommufd, or by a preserved device's live-update token after
  kexec) that fails with EBUSY (K:drivers/iommu/iommu.c:3316-3341, reached
  from K:drivers/pci/pci-driver.c:1720-1721; the series' cover letter: what Phase 1 restores after the kexec).
* ``iommufd`` claiming DMA ownership of a group whose owner is someone else
  (a kernel driver, another iommufd, a live-update token) gets EPERM
  (K:drivers/iommu/iommu.c:3446-3470).
* ``unbind`` of a driver that is not bound: ENODEV (K:drivers/base/bus.c:235-250).
* ``drivers_probe`` binds the first matching driver; an unknown device is
  ENODEV (K:drivers/base/bus.c:309-322).

Deviation: unbinding vfio-pci while a cdev of the device is open blocks in
the real kernel (it asks userspace to release the device); the fake answers
EBUSY instead of hanging.
"""
from __future__ import annotations

import errno as E
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from .uaccess import fail

BDF_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")

#: PCI_EXT_CAP_ID_ATS (K:include/uapi/linux/pci_regs.h)
PCI_EXT_CAP_ID_ATS = 0x0F

# VFIO region and IRQ indexes (H:vfio.h)
BAR0, BAR5, ROM, CONFIG, VGA = 0, 5, 6, 7, 8
NUM_REGIONS = 9
INTX, MSI, MSIX, ERR, REQ = 0, 1, 2, 3, 4
NUM_IRQS = 5

#: drivers that set driver_managed_dma (K:drivers/vfio/pci/vfio_pci.c:233,
#: K:drivers/pci/pci-stub.c:39)
MANAGED_DMA_DRIVERS = ("vfio-pci", "pci-stub")
#: pci-pf-stub's ID table (K:drivers/pci/pci-pf-stub.c:20-24)
PCI_PF_STUB_IDS = {(0x1d0f, 0x0053)}


def rom_image_size(rom: bytes, window: int) -> int:
    """``pci_get_rom_size`` (K:drivers/pci/rom.c:185-229, with the header and
    data structure checks of K:drivers/pci/rom.c:99-181): the length of the
    chain of valid expansion ROM images at the start of a ROM BAR of
    ``window`` bytes whose contents are ``rom`` (0 when there is none)."""
    data = rom[:window].ljust(window, b"\xff")
    end = window - 1

    def u16(off: int) -> int:
        return int.from_bytes(data[off:off + 2], "little")

    def header_valid(image: int) -> bool:
        return (image % 512 == 0 and image + 0x1A - 1 <= end
                and u16(image) == 0xAA55)

    image = 0
    while True:
        if not header_valid(image):
            break
        pds = image + u16(image + 0x18)
        if pds % 4 or pds + 0x0A + 1 > end or data[pds:pds + 4] != b"PCIR":
            break
        data_len = u16(pds + 0x0A)
        if data_len < 0x18 or data_len == 0xFFFF or pds + data_len - 1 > end:
            break
        last_image = bool(data[pds + 0x15] & 0x80)
        length = u16(pds + 0x10)
        image += length * 512
        if not last_image and not header_valid(image):
            break
        if not length or last_image:
            break
    return min(image, window)


def option_rom(vendor: int, device: int, class_code: int, sectors: int = 0x80) -> bytes:
    """A minimal, valid expansion ROM image (one x86 image of ``sectors``
    512-byte sectors: 55 AA, the pointer to a "PCIR" data structure with
    the IDs, its length and the last-image indicator)."""
    rom = bytearray(b"\xff" * (sectors * 512))
    rom[0:2] = b"\x55\xaa"
    rom[2] = min(sectors, 0xFF)             # initialization size, 512-byte units
    rom[0x18:0x1A] = (0x1C).to_bytes(2, "little")
    pcir = bytearray(0x18)
    pcir[0:4] = b"PCIR"
    pcir[4:6] = vendor.to_bytes(2, "little")
    pcir[6:8] = device.to_bytes(2, "little")
    pcir[0x0A:0x0C] = (0x18).to_bytes(2, "little")
    pcir[0x0D:0x10] = class_code.to_bytes(3, "little")
    pcir[0x10:0x12] = sectors.to_bytes(2, "little")
    pcir[0x14] = 0x00                       # code type: x86
    pcir[0x15] = 0x80                       # last image
    rom[0x1C:0x1C + len(pcir)] = pcir
    return bytes(rom)


@dataclass
class FakePciDevice:
    """A PCI function behind the (fake) VT-d IOMMU.

    ``regions`` maps a BAR index (0-5) to its size in bytes; ``irqs`` maps a
    VFIO IRQ index (0 INTx, 1 MSI, 2 MSI-X, 3 ERR, 4 REQ) to its vector
    count. ``driver`` is the driver bound at every boot (``None`` for none;
    ``"vfio-pci"`` is like booting with ``vfio-pci.ids=``). ``max_pasids``
    above 0 makes the function PASID capable; ``msix_bar`` is the BAR
    holding the MSI-X table (default: the lowest BAR); ``atomic_ops`` is a
    mask of ``VFIO_PCI_ATOMIC_COMP32/64/128`` the root port completes, which
    VFIO_DEVICE_GET_INFO reports as a capability (K:drivers/vfio/pci/vfio_pci_core.c:1042-1071).
    ``ats`` gives the function an ATS extended capability (``pci_ats_supported``;
    needs PCIe config space, ``cfg_size=4096``): the VT-d then reports
    ``IOMMU_CAP_PCI_ATS_SUPPORTED`` for it if its ECAP has Device-TLB support
    (K:drivers/iommu/intel/iommu.c:3300-3303, 3263-3264), and IOMMU_GET_HW_INFO
    stops saying ``IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED``
    (K:drivers/iommu/iommufd/device.c:1709-1711). The fake's functions are all
    integrated on the root bus, which ``dmar_ats_supported`` allows
    (K:drivers/iommu/intel/iommu.c:2285-2289).

    The default is what VFIO reports for QEMU's ``virtio-net-pci`` with
    ``disable-legacy=on,iommu_platform=on`` on q35's root bus: a conventional
    PCI function (256 bytes of config space, ``cfg_size``), no reset method
    (``reset_works=False``: no FLR, no PM reset with NoSoftRst-, no slot or
    bus to reset), MSI-X with 4 vectors (2 per queue pair + config + 2) in
    BAR1, the modern virtio structures in the 64-bit BAR4, and a 256 KiB
    expansion ROM BAR (``rom_size``; 0 for none) holding ``rom`` (default: a
    minimal valid image, :func:`option_rom`; the rest of the BAR reads as
    0xff, as VFIO fills it, K:drivers/vfio/pci/vfio_pci_rdwr.c:226-240).
    """

    bdf: str = "0000:00:03.0"
    vendor: int = 0x1af4
    device: int = 0x1041
    driver: str | None = "virtio-pci"
    iommu_group: int = 3
    regions: dict[int, int] | None = None
    irqs: dict[int, int] | None = None
    class_code: int = 0x020000
    subsystem_vendor: int = 0x1af4
    subsystem_device: int = 0x1100
    revision: int = 0x01
    reset_works: bool = False
    cfg_size: int = 256
    max_pasids: int = 0
    msix_bar: int | None = None
    atomic_ops: int = 0
    ats: bool = False
    rom_size: int = 256 * 1024
    rom: bytes | None = None

    def __post_init__(self) -> None:
        self.bdf = self.bdf.lower()
        if not BDF_RE.match(self.bdf):
            raise ValueError(f"not a PCI address: {self.bdf!r}")
        if self.cfg_size not in (256, 4096):
            raise ValueError(f"cfg_size is 256 (PCI) or 4096 (PCIe), not {self.cfg_size}")
        if self.ats and self.cfg_size < 4096:
            raise ValueError("ATS is a PCIe extended capability: it needs cfg_size=4096")
        if self.rom_size and (self.rom_size & (self.rom_size - 1) or self.rom_size < 2048):
            raise ValueError(f"a ROM BAR is a power of two of at least 2 KiB, not {self.rom_size}")
        if self.rom_size and self.rom is None:
            self.rom = option_rom(self.vendor, self.device, self.class_code,
                                  min(0x80, self.rom_size // 512))
        if self.rom is not None and len(self.rom) > self.rom_size:
            raise ValueError("the ROM contents do not fit the ROM BAR")
        if self.regions is None:
            # a virtio-net-pci with disable-legacy=on: MSI-X table in BAR1,
            # the modern virtio structures in the 64-bit BAR4
            self.regions = {1: 0x1000, 4: 0x4000}
        if self.irqs is None:
            self.irqs = {INTX: 1, MSI: 0, MSIX: 4, ERR: 1, REQ: 1}
        for index in self.regions:
            if not BAR0 <= index <= BAR5:
                raise ValueError(f"BAR index {index} is not 0-5")
        if self.msix_bar is None and self.irqs.get(MSIX) and self.regions:
            self.msix_bar = min(self.regions)
        self._bars = {i: bytearray(size) for i, size in self.regions.items()}
        self.config = self._initial_config()

    # regions and irqs are never None after __post_init__ (None asks for the defaults)
    @property
    def region_sizes(self) -> dict[int, int]:
        assert self.regions is not None
        return self.regions

    @property
    def irq_counts(self) -> dict[int, int]:
        assert self.irqs is not None
        return self.irqs

    # -- config space ----------------------------------------------------------
    def _initial_config(self) -> bytearray:
        assert self.regions is not None and self.irqs is not None   # set by __post_init__
        cfg = bytearray(self.cfg_size)
        cfg[0:2] = self.vendor.to_bytes(2, "little")
        cfg[2:4] = self.device.to_bytes(2, "little")
        cfg[6:8] = (0x0010).to_bytes(2, "little")           # status: capability list
        cfg[8] = self.revision
        cfg[9:12] = self.class_code.to_bytes(3, "little")
        cfg[0x0e] = 0x00                                     # header type 0
        addr = 0xfe000000
        for index, size in sorted(self.regions.items()):
            cfg[0x10 + 4 * index:0x14 + 4 * index] = addr.to_bytes(4, "little")
            addr += max(size, 0x1000)
        cfg[0x2c:0x2e] = self.subsystem_vendor.to_bytes(2, "little")
        cfg[0x2e:0x30] = self.subsystem_device.to_bytes(2, "little")
        if self.rom_size:                                    # ROM BAR, decode off
            addr = (addr + self.rom_size - 1) & ~(self.rom_size - 1)
            cfg[0x30:0x34] = addr.to_bytes(4, "little")
        cfg[0x3d] = 1 if self.irqs.get(INTX) else 0          # interrupt pin
        if self.irqs.get(MSIX):
            cfg[0x34] = 0x40                                 # capabilities pointer
            cfg[0x40] = 0x11                                 # MSI-X
            cfg[0x42:0x44] = (self.irqs[MSIX] - 1).to_bytes(2, "little")
        if self.ats:
            # extended capability header at 0x100: ATS (id 0x0f), version 1, last
            cfg[0x100:0x104] = (PCI_EXT_CAP_ID_ATS | (1 << 16)).to_bytes(4, "little")
        return cfg

    def bar(self, index: int) -> bytearray:
        return self._bars[index]

    def rom_len(self) -> int:
        """What ``pci_map_rom`` finds in the ROM BAR (0: no valid image)."""
        if not self.rom_size or self.rom is None:
            return 0
        return rom_image_size(self.rom, self.rom_size)

    def read_rom(self, pos: int, length: int) -> bytes:
        data = self.rom[:self.rom_len()] if self.rom is not None else b""
        return data[pos:pos + length].ljust(length, b"\xff")

    def reset(self) -> None:
        """Function level reset: config space and BAR contents start over."""
        self.config = self._initial_config()
        for data in self._bars.values():
            data[:] = bytes(len(data))

    def restore_config(self) -> None:
        """``pci_restore_state`` of the state saved when VFIO enabled the
        device: config space only, BAR contents stay."""
        self.config = self._initial_config()

    def modalias_match(self, ids: set[tuple[int, int]]) -> bool:
        return (self.vendor, self.device) in ids


class IommuGroup:
    """DMA ownership of one IOMMU group (struct iommu_group owner/owner_cnt)."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.devices: list[FakePciDevice] = []
        self.owner: Any = None
        self.owner_cnt = 0

    def use_default_domain(self) -> None:
        """A kernel driver (not driver_managed_dma) is about to probe."""
        if self.owner_cnt and self.owner is not None:
            fail(E.EBUSY)
        self.owner_cnt += 1

    def unuse_default_domain(self) -> None:
        if self.owner_cnt:
            self.owner_cnt -= 1

    def claim(self, owner: Any) -> None:
        """``iommu_device_claim_dma_owner``."""
        if self.owner_cnt:
            if self.owner is not owner:
                fail(E.EPERM)
            self.owner_cnt += 1
            return
        self.owner = owner
        self.owner_cnt = 1

    def claim_exclusive(self, owner: Any) -> None:
        """``iommu_group_claim_dma_owner`` (the VFIO group path): EPERM if
        anyone, even ``owner``, uses the group already
        (K:drivers/iommu/iommu.c:3423-3441)."""
        if self.owner_cnt:
            fail(E.EPERM)
        self.owner = owner
        self.owner_cnt = 1

    def release(self, owner: Any) -> None:
        if self.owner is owner and self.owner_cnt:
            self.owner_cnt -= 1
            if not self.owner_cnt:
                self.owner = None


class LuoOwner:
    """The owner a new kernel gives the group of a device preserved with its
    IOMMU state (S1:2662-2674): the iommufd's LUO token."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __repr__(self) -> str:
        return f"<LuoOwner token={self.token:#x}>"


@dataclass
class Driver:
    name: str
    managed_dma: bool
    ids: set[tuple[int, int]] = field(default_factory=set)
    dynamic_ids: set[tuple[int, int]] = field(default_factory=set)

    def matches(self, dev: FakePciDevice, override: str | None) -> bool:
        if override is not None:
            return override == self.name
        return dev.modalias_match(self.ids | self.dynamic_ids)


@dataclass
class DeviceState:
    """One boot's view of a device."""
    hw: FakePciDevice
    group: IommuGroup
    driver: str | None = None
    driver_override: str | None = None
    #: set at boot for a device preserved with IOMMU state (the series' cover letter: restore at boot)
    luo_token: int | None = None


class VfioDrivers(Protocol):
    """vfio-pci's side of binding (:class:`~.vfio.VfioRegistry`, which imports this module)."""

    def register(self, state: DeviceState) -> None: ...
    def unregister(self, state: DeviceState) -> None: ...


class PciBus:
    """The PCI bus of one boot: devices, drivers, groups."""

    def __init__(self, devices: list[FakePciDevice], vfio: VfioDrivers) -> None:
        self.vfio = vfio
        self.groups: dict[int, IommuGroup] = {}
        self.devices: dict[str, DeviceState] = {}
        self.drivers: dict[str, Driver] = {
            "vfio-pci": Driver("vfio-pci", True),
            "pci-stub": Driver("pci-stub", True),
            "pci-pf-stub": Driver("pci-pf-stub", False, set(PCI_PF_STUB_IDS)),
        }
        for hw in devices:
            group = self.groups.setdefault(hw.iommu_group, IommuGroup(hw.iommu_group))
            group.devices.append(hw)
            self.devices[hw.bdf] = DeviceState(hw, group)
            if hw.driver and hw.driver not in self.drivers:
                self.drivers[hw.driver] = Driver(hw.driver, False)
            if hw.driver and hw.driver not in MANAGED_DMA_DRIVERS:
                self.drivers[hw.driver].ids.add((hw.vendor, hw.device))

    def device(self, bdf: str) -> DeviceState:
        state = self.devices.get(bdf.strip().lower())
        if state is None:
            fail(E.ENODEV)
        return state

    def boot_probe(self) -> None:
        """Bind every device's boot driver; failures leave it unbound."""
        for state in self.devices.values():
            name = state.hw.driver
            if name is None:
                continue
            try:
                if name in MANAGED_DMA_DRIVERS:
                    state.driver_override = None
                    self.probe(state, self.drivers[name], force=True)
                else:
                    self.probe(state, self.drivers[name])
            except OSError:
                pass        # e.g. EBUSY for a preserved device (the series' cover letter: what Phase 1 restores after the kexec)

    # -- driver core --------------------------------------------------------------
    def probe(self, state: DeviceState, drv: Driver, force: bool = False) -> None:
        """``really_probe``: dma_configure, then the driver's probe."""
        if state.driver is not None:
            fail(E.EBUSY)
        if not force and not drv.matches(state.hw, state.driver_override):
            fail(E.ENODEV)
        if not drv.managed_dma:
            state.group.use_default_domain()
        state.driver = drv.name
        if drv.name == "vfio-pci":
            self.vfio.register(state)

    def bind(self, drv_name: str, bdf: str) -> None:
        drv = self.drivers.get(drv_name)
        if drv is None:
            fail(E.ENOENT)
        state = self.devices.get(bdf.strip().lower())
        if state is None or not drv.matches(state.hw, state.driver_override):
            fail(E.ENODEV)
        self.probe(state, drv)

    def unbind(self, drv_name: str, bdf: str) -> None:
        state = self.devices.get(bdf.strip().lower())
        if state is None or state.driver != drv_name:
            fail(E.ENODEV)
        self.detach(state)

    def detach(self, state: DeviceState) -> None:
        drv = self.drivers[state.driver] if state.driver else None
        if drv is None:
            return
        if drv.name == "vfio-pci":
            self.vfio.unregister(state)         # EBUSY while a cdev is open
        if not drv.managed_dma:
            state.group.unuse_default_domain()
        state.driver = None

    def drivers_probe(self, bdf: str) -> None:
        state = self.device(bdf)
        if state.driver is not None:
            return
        for drv in self.drivers.values():
            if drv.matches(state.hw, state.driver_override):
                self.probe(state, drv)
                return

    def new_id(self, drv_name: str, text: str) -> None:
        drv = self.drivers.get(drv_name)
        if drv is None:
            fail(E.ENOENT)
        parts = text.split()
        if len(parts) < 2:
            fail(E.EINVAL)
        try:
            ids = (int(parts[0], 16), int(parts[1], 16))
        except ValueError:
            fail(E.EINVAL)
        if ids in drv.dynamic_ids:
            fail(E.EEXIST)
        drv.dynamic_ids.add(ids)
        for state in self.devices.values():        # driver_attach
            if state.driver is None and drv.matches(state.hw, state.driver_override):
                try:
                    self.probe(state, drv)
                except OSError:
                    pass

    def remove_id(self, drv_name: str, text: str) -> None:
        drv = self.drivers.get(drv_name)
        if drv is None:
            fail(E.ENOENT)
        parts = text.split()
        try:
            ids = (int(parts[0], 16), int(parts[1], 16))
        except (ValueError, IndexError):
            fail(E.EINVAL)
        if ids not in drv.dynamic_ids:
            fail(E.ENODEV)
        drv.dynamic_ids.discard(ids)
