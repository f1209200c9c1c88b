"""Fixtures for the fake-kernel tier.

``fake_kernel`` (stock 7.3), ``series_kernel`` (lu-v2) and
``series_kernel_v1`` install a :class:`pyiommufd_testing.FakeKernel` with
:func:`pyiommufd.backend.use` for the test and shut it down afterwards,
closing every real placeholder fd.

``ktest`` wraps the installed kernel with a few helpers that issue real
ioctls through :mod:`pyiommufd.ioctl` (struct buffers built by
``ioctl.new``/``ioctl.call``), so tests read like the syscalls they make.
"""
from __future__ import annotations

import os

import pytest

from pyiommufd import backend, ioctl
from pyiommufd._uapi import ffi
from pyiommufd_testing import FakeKernel


class Defs:
    """IoctlDefs by the include-bindings names (kept local so these tests
    depend only on the generic ioctl layer)."""

    CREATE_SESSION = ioctl.define("LIVEUPDATE_IOCTL_CREATE_SESSION", "struct liveupdate_ioctl_create_session", "luo")
    RETRIEVE_SESSION = ioctl.define("LIVEUPDATE_IOCTL_RETRIEVE_SESSION", "struct liveupdate_ioctl_retrieve_session", "luo")
    PRESERVE_FD = ioctl.define("LIVEUPDATE_SESSION_PRESERVE_FD", "struct liveupdate_session_preserve_fd", "luo")
    RETRIEVE_FD = ioctl.define("LIVEUPDATE_SESSION_RETRIEVE_FD", "struct liveupdate_session_retrieve_fd", "luo")
    FINISH = ioctl.define("LIVEUPDATE_SESSION_FINISH", "struct liveupdate_session_finish", "luo")
    GET_NAME = ioctl.define("LIVEUPDATE_SESSION_GET_NAME", "struct liveupdate_session_get_name", "luo")

    DESTROY = ioctl.define("IOMMU_DESTROY", "struct iommu_destroy", "iommufd")
    IOAS_ALLOC = ioctl.define("IOMMU_IOAS_ALLOC", "struct iommu_ioas_alloc", "iommufd")
    ALLOW_IOVAS = ioctl.define("IOMMU_IOAS_ALLOW_IOVAS", "struct iommu_ioas_allow_iovas", "iommufd")
    IOAS_COPY = ioctl.define("IOMMU_IOAS_COPY", "struct iommu_ioas_copy", "iommufd")
    IOVA_RANGES = ioctl.define("IOMMU_IOAS_IOVA_RANGES", "struct iommu_ioas_iova_ranges", "iommufd")
    IOAS_MAP = ioctl.define("IOMMU_IOAS_MAP", "struct iommu_ioas_map", "iommufd")
    IOAS_UNMAP = ioctl.define("IOMMU_IOAS_UNMAP", "struct iommu_ioas_unmap", "iommufd")
    OPTION = ioctl.define("IOMMU_OPTION", "struct iommu_option", "iommufd")
    VFIO_IOAS = ioctl.define("IOMMU_VFIO_IOAS", "struct iommu_vfio_ioas", "iommufd")
    HWPT_ALLOC = ioctl.define("IOMMU_HWPT_ALLOC", "struct iommu_hwpt_alloc", "iommufd")
    HW_INFO = ioctl.define("IOMMU_GET_HW_INFO", "struct iommu_hw_info", "iommufd")
    SET_DIRTY = ioctl.define("IOMMU_HWPT_SET_DIRTY_TRACKING", "struct iommu_hwpt_set_dirty_tracking", "iommufd")
    GET_DIRTY = ioctl.define("IOMMU_HWPT_GET_DIRTY_BITMAP", "struct iommu_hwpt_get_dirty_bitmap", "iommufd")
    INVALIDATE = ioctl.define("IOMMU_HWPT_INVALIDATE", "struct iommu_hwpt_invalidate", "iommufd")
    FAULT_ALLOC = ioctl.define("IOMMU_FAULT_QUEUE_ALLOC", "struct iommu_fault_alloc", "iommufd")
    MAP_FILE = ioctl.define("IOMMU_IOAS_MAP_FILE", "struct iommu_ioas_map_file", "iommufd")
    VIOMMU_ALLOC = ioctl.define("IOMMU_VIOMMU_ALLOC", "struct iommu_viommu_alloc", "iommufd")
    VDEVICE_ALLOC = ioctl.define("IOMMU_VDEVICE_ALLOC", "struct iommu_vdevice_alloc", "iommufd")
    CHANGE_PROCESS = ioctl.define("IOMMU_IOAS_CHANGE_PROCESS", "struct iommu_ioas_change_process", "iommufd")
    VEVENTQ_ALLOC = ioctl.define("IOMMU_VEVENTQ_ALLOC", "struct iommu_veventq_alloc", "iommufd")
    HW_QUEUE_ALLOC = ioctl.define("IOMMU_HW_QUEUE_ALLOC", "struct iommu_hw_queue_alloc", "iommufd")
    NOIOMMU_GET_PA = ioctl.define("IOMMU_IOAS_NOIOMMU_GET_PA", "struct iommu_ioas_noiommu_get_pa", "iommufd")
    LU_SET = ioctl.define("IOMMU_HWPT_LU_SET_PRESERVE", "struct iommu_hwpt_lu_set_preserve", "iommufd")
    LU_MARK = ioctl.define("IOMMU_HWPT_LU_MARK_PRESERVE", "struct iommu_hwpt_lu_mark_preserve", "iommufd")

    BIND = ioctl.define("VFIO_DEVICE_BIND_IOMMUFD", "struct vfio_device_bind_iommufd", "vfio")
    ATTACH = ioctl.define("VFIO_DEVICE_ATTACH_IOMMUFD_PT", "struct vfio_device_attach_iommufd_pt", "vfio")
    DETACH = ioctl.define("VFIO_DEVICE_DETACH_IOMMUFD_PT", "struct vfio_device_detach_iommufd_pt", "vfio")
    GET_INFO = ioctl.define("VFIO_DEVICE_GET_INFO", "struct vfio_device_info", "vfio")
    REGION_INFO = ioctl.define("VFIO_DEVICE_GET_REGION_INFO", "struct vfio_region_info", "vfio")
    IRQ_INFO = ioctl.define("VFIO_DEVICE_GET_IRQ_INFO", "struct vfio_irq_info", "vfio")
    SET_IRQS = ioctl.define("VFIO_DEVICE_SET_IRQS", "struct vfio_irq_set", "vfio")
    RESET = ioctl.define("VFIO_DEVICE_RESET", None, "vfio", arg=ioctl.ARG_NONE)
    FEATURE = ioctl.define("VFIO_DEVICE_FEATURE", "struct vfio_device_feature", "vfio")


MFD_ALLOW_SEALING = 0x2
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
LU_SEALS = 0x1 | 0x2 | 0x4          # F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW
RW = 2 | 4                          # IOMMU_IOAS_MAP_WRITEABLE | READABLE
CDEV = "/dev/vfio/devices/vfio0"
BDF = "0000:00:03.0"


class KTest:
    """Helpers over the installed fake kernel. Every call is a backend call."""

    D = Defs

    def __init__(self, kernel: FakeKernel) -> None:
        self.k = kernel

    # -- LUO --------------------------------------------------------------------------
    def luo(self) -> int:
        return self.k.open("/dev/liveupdate")

    def create_session(self, luo_fd: int, name: str) -> int:
        return ioctl.call(self.k, luo_fd, Defs.CREATE_SESSION, name=name.encode()).fd

    def retrieve_session(self, luo_fd: int, name: str) -> int:
        return ioctl.call(self.k, luo_fd, Defs.RETRIEVE_SESSION, name=name.encode()).fd

    def preserve(self, session: int, fd: int, token: int) -> None:
        ioctl.call(self.k, session, Defs.PRESERVE_FD, fd=fd, token=token)

    def retrieve(self, session: int, token: int) -> int:
        return ioctl.call(self.k, session, Defs.RETRIEVE_FD, token=token).fd

    def finish(self, session: int) -> None:
        ioctl.call(self.k, session, Defs.FINISH)

    # -- memfd ------------------------------------------------------------------------
    def memfd(self, size: int = 1 << 20, seals: int | None = LU_SEALS, name: str = "buffer",
              data: bytes = b"") -> int:
        fd = self.k.memfd_create(name, MFD_ALLOW_SEALING)
        self.k.ftruncate(fd, size)
        if data:
            self.k.pwrite(fd, data, 0)
        if seals:
            self.k.fcntl(fd, F_ADD_SEALS, seals)
        return fd

    # -- iommufd ------------------------------------------------------------------------
    def iommufd(self) -> int:
        return self.k.open("/dev/iommu")

    def ioas(self, iommufd: int) -> int:
        return ioctl.call(self.k, iommufd, Defs.IOAS_ALLOC).out_ioas_id

    def map_file(self, iommufd: int, ioas: int, memfd: int, length: int = 1 << 20, *,
                 iova: int | None = None, start: int = 0) -> int:
        flags = RW | (1 if iova is not None else 0)
        return ioctl.call(self.k, iommufd, Defs.MAP_FILE, flags=flags, ioas_id=ioas, fd=memfd,
                          start=start, length=length, iova=iova or 0).iova

    def map_va(self, iommufd: int, ioas: int, buf, *, iova: int | None = None) -> int:
        addr = int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
        flags = RW | (1 if iova is not None else 0)
        return ioctl.call(self.k, iommufd, Defs.IOAS_MAP, flags=flags, ioas_id=ioas,
                          user_va=addr, length=len(buf), iova=iova or 0).iova

    def unmap(self, iommufd: int, ioas: int, iova: int, length: int) -> int:
        return ioctl.call(self.k, iommufd, Defs.IOAS_UNMAP, ioas_id=ioas, iova=iova,
                          length=length).length

    def hwpt(self, iommufd: int, dev_id: int, pt_id: int, flags: int = 0) -> int:
        return ioctl.call(self.k, iommufd, Defs.HWPT_ALLOC, flags=flags, dev_id=dev_id,
                          pt_id=pt_id).out_hwpt_id

    def destroy(self, iommufd: int, obj_id: int) -> None:
        ioctl.call(self.k, iommufd, Defs.DESTROY, id=obj_id)

    def mark(self, iommufd: int, hwpt_id: int, token: int) -> None:
        idef = Defs.LU_MARK if self.k.lu_abi == "lu-v2" else Defs.LU_SET
        if self.k.lu_nr != 0x95:
            idef = ioctl.define(idef.name, idef.struct, "iommufd",
                                request=ioctl.IO(0x3B, self.k.lu_nr))
        ioctl.call(self.k, iommufd, idef, hwpt_id=hwpt_id, hwpt_token=token)

    # -- VFIO ---------------------------------------------------------------------------
    def vfio_pci(self, bdf: str = BDF) -> None:
        """Move the device to vfio-pci the usual way."""
        base = f"/sys/bus/pci/devices/{bdf}"
        if self.k.files.exists(base + "/driver"):
            drv = os.path.basename(self.k.files.readlink(base + "/driver"))
            self.k.files.write_text(f"/sys/bus/pci/drivers/{drv}/unbind", bdf)
        self.k.files.write_text(base + "/driver_override", "vfio-pci")
        self.k.files.write_text("/sys/bus/pci/drivers_probe", bdf)

    def cdev(self, path: str = CDEV) -> int:
        return self.k.open(path)

    def bind(self, cdev: int, iommufd: int) -> int:
        return ioctl.call(self.k, cdev, Defs.BIND, iommufd=iommufd).out_devid

    def attach(self, cdev: int, pt_id: int, pasid: int | None = None) -> int:
        if pasid is None:
            return ioctl.call(self.k, cdev, Defs.ATTACH, pt_id=pt_id).pt_id
        return ioctl.call(self.k, cdev, Defs.ATTACH, flags=1, pt_id=pt_id, pasid=pasid).pt_id

    def detach(self, cdev: int) -> None:
        ioctl.call(self.k, cdev, Defs.DETACH)

    def device_setup(self, *, mark_token: int | None = 0x789012):
        """The selftest's stage 1 up to the mark (S1:4326-4348): returns
        (iommufd, memfd, cdev, ioas, hwpt, devid)."""
        self.vfio_pci()
        iommufd = self.iommufd()
        memfd = self.memfd()
        cdev = self.cdev()
        devid = self.bind(cdev, iommufd)
        ioas = self.ioas(iommufd)
        hwpt = self.hwpt(iommufd, devid, ioas)
        assert self.attach(cdev, hwpt) == hwpt
        self.map_file(iommufd, ioas, memfd)
        if mark_token is not None:
            self.mark(iommufd, hwpt, mark_token)
        return iommufd, memfd, cdev, ioas, hwpt, devid


def _installed(kernel: FakeKernel):
    with backend.use(kernel):
        try:
            yield kernel
        finally:
            kernel.shutdown()


@pytest.fixture
def fake_kernel():
    """Stock upstream 7.3."""
    yield from _installed(FakeKernel())


@pytest.fixture
def series_kernel():
    """A 7.3 kernel carrying the series, post-review ABI (lu-v2)."""
    yield from _installed(FakeKernel(lu_abi="lu-v2"))


@pytest.fixture
def series_kernel_v1():
    """A 7.3 kernel carrying the series as posted (lu-v1)."""
    yield from _installed(FakeKernel(lu_abi="lu-v1"))


@pytest.fixture
def kt(request):
    """KTest over whichever kernel fixture the test also requests."""
    for name in ("series_kernel", "series_kernel_v1", "fake_kernel"):
        if name in request.fixturenames:
            return KTest(request.getfixturevalue(name))
    return KTest(request.getfixturevalue("fake_kernel"))


@pytest.fixture
def sockdir():
    """A private directory for agent sockets, short because AF_UNIX paths are
    limited to 107 bytes."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="pyiommufd-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)
