"""The fake kernel, split by concern.

==============  ==========================================================
module          models
==============  ==========================================================
``kernel``      :class:`FakeKernel`, the backend (fd methods, kexec, files)
``files``       the file table: ``struct file`` objects behind real fds
``uaccess``     user memory: ioctl argument buffers and user pointers
``luo``         ``/dev/liveupdate`` and LUO sessions (7.3)
``memfd``       memfds, LUO's frozen size, the memfd LUO handler
``iommufd``     ``/dev/iommu`` and the fake VT-d
``iopt``        the io_pagetable of an IOAS
``vfio``        VFIO device cdevs of vfio-pci devices
``vfio_group``  the legacy VFIO container, groups and type1 IOMMU
``pci``         PCI devices, drivers, IOMMU groups
``series``      the out-of-tree live-update series (``lu_abi``)
``kexec``       ``kexec_file_load``/``reboot`` and :class:`SimulatedKexec`
``boot``        one boot's state and the KHO hand-over between boots
``sysfs``       the kernel's file systems ``/sys``, ``/proc``, ``/dev``
``hostfiles``   every other path: a temporary tree, ``/boot`` included
==============  ==========================================================
"""
from .kernel import FakeKernel
from .kexec import SimulatedKexec
from .pci import FakePciDevice

__all__ = ["FakeKernel", "FakePciDevice", "SimulatedKexec"]
