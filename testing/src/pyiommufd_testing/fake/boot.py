"""One boot of the fake kernel: everything that a kexec throws away.

A :class:`Boot` owns the file table, LUO, the PCI bus view, VFIO devices,
the kexec image and the iommufd contexts. What survives a kexec is the
hardware (:class:`~.pci.FakePciDevice`) and the :class:`Kho` hand-over:
the outgoing LUO sessions and, with the series, the IOMMU FLB's list of
devices preserved with IOMMU state.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .files import FileTable, OpenFile
from .kexec import KexecImage
from .iommufd import VTD_CAP, VTD_ECAP, ecap_dev_iotlb_support
from .luo import HandoverSession, Luo
from .memfd import MemfdLuoHandler, adopt_memfd, is_real_memfd
from .pci import FakePciDevice, LuoOwner, PciBus
from .series import PreservedDevice, Series
from .vfio import EventFile, VfioRegistry


@dataclass
class IommuCaps:
    cap: int = VTD_CAP
    ecap: int = VTD_ECAP
    dirty_tracking: bool = False
    nesting: bool = False

    def ats_supported(self, hw: FakePciDevice) -> bool:
        """``IOMMU_CAP_PCI_ATS_SUPPORTED`` of a device: the VT-d's ECAP has
        Device-TLB support and the function has ATS (integrated devices
        pass ``dmar_ats_supported``; K:drivers/iommu/intel/iommu.c:3300-3303)."""
        return ecap_dev_iotlb_support(self.ecap) and hw.ats


@dataclass
class Kho:
    """Kexec HandOver: what the previous kernel left for this one."""
    sessions: list[HandoverSession] = field(default_factory=list)
    devices: list[PreservedDevice] = field(default_factory=list)


@dataclass
class BootConfig:
    lu_abi: str | None
    lu_nr: int
    release: str
    euid: int
    interrupt_remapping: bool
    dirty_tracking: bool
    cmdline: str
    vfio_lu_handler: bool = True


def cmdline_flag(cmdline: str, name: str) -> bool | None:
    """``kstrtobool`` of the last ``name=`` on the command line."""
    value = None
    for word in cmdline.split():
        if word.startswith(name + "="):
            value = word.split("=", 1)[1]
    if value is None:
        return None
    if value[:1] in ("1", "y", "Y", "t", "T") or value.lower() == "on":
        return True
    return False


class Boot:
    def __init__(self, number: int, config: BootConfig, devices: list[FakePciDevice],
                 kho: Kho | None) -> None:
        self.number = number
        self.config = config
        self.euid = config.euid
        self.interrupt_remapping = config.interrupt_remapping
        self.allow_unsafe_interrupts = False
        self.iommu_caps = IommuCaps(dirty_tracking=config.dirty_tracking)
        self.cmdline = config.cmdline
        self.kexec_image: KexecImage | None = None
        self.crash_image: KexecImage | None = None
        self.kexec_load_disabled = False
        self.table = FileTable()
        self.table.adopt = self._adopt
        self.liveupdate = bool(cmdline_flag(config.cmdline, "liveupdate"))
        self.series = Series(self, config.lu_abi, config.lu_nr, config.vfio_lu_handler) \
            if config.lu_abi else None
        handlers = [MemfdLuoHandler()] + (self.series.handlers() if self.series else [])
        kho = kho or Kho()
        self.luo = Luo(self, self.liveupdate, handlers,
                       kho.sessions if self.liveupdate else [])
        self.vfio = VfioRegistry(self)
        self.pci = PciBus(devices, self.vfio)
        if self.series is not None and self.liveupdate:
            # the IOMMU driver restores preserved devices and claims their
            # DMA ownership for the iommufd's token (S1:2640-2700)
            for dev in kho.devices:
                state = self.pci.devices.get(dev.bdf)
                if state is not None:
                    state.luo_token = dev.token
                    state.group.owner = LuoOwner(dev.token)
                    state.group.owner_cnt = 1
        self.pci.boot_probe()

    @staticmethod
    def _adopt(fd: int) -> OpenFile | None:
        """Real files created behind the backend's back that the fake
        understands: memfds and eventfds."""
        if is_real_memfd(fd):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:pyiommufd-fake:"):
                return None         # another FakeKernel's placeholder: foreign here
            return adopt_memfd(fd)
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]":
                return EventFile()
        except OSError:
            pass
        return None

    def handover(self) -> Kho:
        sessions = self.luo.handover()
        devices = Series.flb_handover(sessions) if self.series else []
        return Kho(sessions, devices)
