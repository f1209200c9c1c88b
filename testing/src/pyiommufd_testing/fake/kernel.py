"""``FakeKernel``: the :class:`pyiommufd.backend.Backend` that *is* a Linux 7.3
kernel (optionally carrying the live-update series), in-process.

Every backend method behaves like the syscall: it receives the same bytes
(ioctl arguments are the caller's writable struct buffers, decoded with
:mod:`pyiommufd._uapi`), writes results back the same way and fails with
``OSError(errno, strerror)``. See the modules of :mod:`pyiommufd_testing.fake`
for the rules each subsystem models and where they come from.
"""
from __future__ import annotations

import errno as E
import fcntl as _fcntl
import mmap as _mmap
import os
import posixpath
import re
from typing import Any, cast

from pyiommufd.backend import Backend, oserror
from .boot import Boot, BootConfig
from .files import OpenFile
from .hostfiles import FakeHostFiles
from .iommufd import IommufdCtx, IommufdFile
from .kexec import LINUX_REBOOT_CMD_KEXEC, SimulatedKexec, file_load
from .memfd import MemfdFile, ShmemInode, check_memfd_flags
from .pci import FakePciDevice
from .series import ABIS
from .sysfs import Attr, DevNode, Dir, FakeFs, is_kernel_path
from .uaccess import UserMemory, fail
from .vfio import EventFile
from .vfio_group import open_container, open_group

_UNSET = object()
F_DUPFD = 0
F_DUPFD_CLOEXEC = 1030
_FD_PATH = re.compile(r"^/(?:proc/(?:self|\d+)/fd|dev/fd)/(\d+)$")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


def default_cmdline(release: str, liveupdate: bool) -> str:
    words = [f"BOOT_IMAGE=/boot/vmlinuz-{release}", "root=/dev/vda", "ro", "console=ttyS0",
             "intel_iommu=on"]
    if liveupdate:
        words.append("liveupdate=on")
    return " ".join(words)


class FakeKernel(Backend):
    """A fake Linux 7.3 kernel behind the backend seam.

    ``lu_abi``: ``None`` is stock upstream 7.3 (nr 0x95 is
    ``IOMMU_IOAS_NOIOMMU_GET_PA``; LUO preserves memfds only); ``"lu-v1"`` or
    ``"lu-v2"`` is a kernel carrying the series with that revision of the
    mark ioctl at nr ``lu_nr``, plus its iommufd and vfio-pci LUO handlers.
    ``liveupdate`` puts ``liveupdate=on`` on the command line (without it
    there is no ``/dev/liveupdate``). ``devices``: the PCI functions
    (default: one virtio-net at 0000:00:03.0). ``euid``: 0 is root; anything
    else gets EACCES/EPERM where the kernel checks privileges.
    ``interrupt_remapping=False`` makes ``VFIO_DEVICE_BIND_IOMMUFD`` fail with
    EPERM (unless ``allow_unsafe_interrupts`` is set in sysfs).
    ``dirty_tracking`` gives the fake VT-d second-stage dirty tracking.
    ``vfio_lu_handler=False`` is the series without patch 13 (and the VFIO
    cdev series it depends on): LUO has no handler for a VFIO cdev, as on the
    series rebased onto 7.3.4.
    """

    shared_with_other_processes = False    # its state lives in this Python process

    name = "fake"

    def __init__(self, *, lu_abi: str | None = None, lu_nr: int = 0x95, liveupdate: bool = True,
                 devices: list[FakePciDevice] | None = None, euid: int = 0,
                 release: str = "7.3.4", interrupt_remapping: bool = True,
                 dirty_tracking: bool = False, cmdline: str | None = None,
                 vfio_lu_handler: bool = True) -> None:
        if lu_abi is not None and lu_abi not in ABIS:
            raise ValueError(f"lu_abi must be None, 'lu-v1' or 'lu-v2', not {lu_abi!r}")
        if not 0x80 <= lu_nr <= 0xff:
            raise ValueError(f"lu_nr {lu_nr:#x} is not an iommufd command number (0x80-0xff)")
        self.devices = list(devices) if devices is not None else [FakePciDevice()]
        bdfs = [d.bdf for d in self.devices]
        if len(set(bdfs)) != len(bdfs):
            raise ValueError(f"duplicate PCI addresses in {bdfs}")
        self.lu_abi = lu_abi
        self.lu_nr = lu_nr
        self.release = release
        self.euid = euid
        self.interrupt_remapping = interrupt_remapping
        self.dirty_tracking = dirty_tracking
        self.vfio_lu_handler = vfio_lu_handler
        self.boot_count = 1
        #: fd numbers that were open when the last kexec happened (see close())
        self.dead_fds: set[int] = set()
        self.fs = FakeFs(self)
        self.files: FakeHostFiles = FakeHostFiles(self)
        self.closed = False
        self.boot = Boot(1, self._config(cmdline or default_cmdline(release, liveupdate)),
                         self.devices, None)
        self._install_kernel_package()

    def _install_kernel_package(self) -> None:
        """``/boot`` as the running kernel's package leaves it. Done again at
        every boot: a kexec may change what the fake carries (``lu_abi``)
        without changing its release."""
        release = self.release
        self.files.install({
            f"/boot/config-{release}": self.kconfig().encode(),
            f"/boot/vmlinuz-{release}": b"MZ fake bzImage " + release.encode() + b"\n",
            f"/boot/initrd.img-{release}": b"070701 fake initramfs\n",
        })

    def _config(self, cmdline: str) -> BootConfig:
        return BootConfig(self.lu_abi, self.lu_nr, self.release, self.euid,
                          self.interrupt_remapping, self.dirty_tracking, cmdline,
                          self.vfio_lu_handler)

    def __repr__(self) -> str:
        return (f"<FakeKernel {self.release} lu_abi={self.lu_abi} boot={self.boot_count} "
                f"devices={[d.bdf for d in self.devices]}>")

    # -- introspection for tests ---------------------------------------------------------
    @property
    def cmdline(self) -> str:
        return self.boot.cmdline

    @property
    def liveupdate(self) -> bool:
        return self.boot.luo.enabled

    @property
    def kexec_loaded(self) -> bool:
        return self.boot.kexec_image is not None

    def known_fds(self) -> dict[int, str]:
        """fd -> what ``/proc/self/fd`` would show, for every fd the fake knows."""
        return {fd: f.path for fd, f in self.boot.table.known_fds()}

    def kconfig(self) -> str:
        lines = [
            f"# Linux/x86 {self.release} Kernel Configuration (pyiommufd fake)",
            "CONFIG_MEMFD_CREATE=y", "CONFIG_SHMEM=y", "CONFIG_TMPFS=y",
            "CONFIG_KEXEC_FILE=y", "CONFIG_KEXEC_HANDOVER=y",
            "CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT=y",
            "CONFIG_LIVEUPDATE=y", "CONFIG_LIVEUPDATE_MEMFD=y",
            "CONFIG_IOMMU_SUPPORT=y", "CONFIG_INTEL_IOMMU=y", "CONFIG_IRQ_REMAP=y",
            "CONFIG_IOMMUFD=y", "CONFIG_IOMMUFD_DRIVER_CORE=y",
            "CONFIG_VFIO=y", "CONFIG_VFIO_DEVICE_CDEV=y", "CONFIG_VFIO_GROUP=y",
            "CONFIG_VFIO_CONTAINER=y", "CONFIG_VFIO_IOMMU_TYPE1=y", "CONFIG_VFIO_PCI=y",
            "# CONFIG_VFIO_NOIOMMU is not set",
        ]
        if self.lu_abi is not None:
            lines.append("CONFIG_IOMMU_LIVEUPDATE=y")
        return "\n".join(lines) + "\n"

    # -- file descriptors -------------------------------------------------------------------
    def _install(self, file: OpenFile, what: str, flags: int) -> int:
        table = self.boot.table
        fd = table.install(file, table.placeholder(what))
        if not flags & os.O_CLOEXEC:
            os.set_inheritable(fd, True)
        return fd

    def _require_root(self) -> None:
        if self.boot.euid != 0:
            fail(E.EACCES)

    def _open_iommu(self, path: str, flags: int) -> int:
        ctx = IommufdCtx(self.boot)
        return self._install(IommufdFile(ctx), "/dev/iommu", flags)

    def _open_liveupdate(self, path: str, flags: int) -> int:
        return self._install(self.boot.luo.open_device(), "/dev/liveupdate", flags)

    def _open_vfio(self, path: str, flags: int) -> int:
        vdev = self.boot.vfio.by_path(path)
        if vdev is None:
            fail(E.ENODEV)
        return self._install(self.boot.vfio.open_cdev(vdev), path, flags)

    def _open_vfio_container(self, path: str, flags: int) -> int:
        return self._install(open_container(self.boot), path, flags)

    def _open_vfio_group(self, path: str, flags: int) -> int:
        number = int(path.rsplit("/", 1)[1])
        return self._install(open_group(self.boot.vfio, number), path, flags)

    def open(self, path: str, flags: int = os.O_RDWR | os.O_CLOEXEC) -> int:
        self._check_alive()
        path = posixpath.normpath(path)
        m = _FD_PATH.match(path)
        if m:
            return self._reopen(int(m.group(1)), flags)
        if not is_kernel_path(path):
            if flags & _WRITE_FLAGS:
                raise oserror(E.EROFS, path)
            return self.files.open_in_tree(path, flags)
        try:
            canon, node = self.fs.resolve(path)
        except OSError as exc:
            raise oserror(exc.errno or E.ENOENT, path) from None
        if isinstance(node, DevNode):
            if not node.public:
                self._require_root()
            return node.opener(canon, flags)
        if isinstance(node, Dir):
            if flags & _WRITE_FLAGS:
                raise oserror(E.EISDIR, path)
            return os.open("/", flags)
        if isinstance(node, Attr):
            if flags & _WRITE_FLAGS:
                raise oserror(E.EOPNOTSUPP, path)     # write sysfs with write_text()
            fd = os.memfd_create("pyiommufd-fake:" + canon, os.MFD_CLOEXEC)
            os.write(fd, node.data())
            os.lseek(fd, 0, os.SEEK_SET)
            if not flags & os.O_CLOEXEC:
                os.set_inheritable(fd, True)
            return fd
        raise oserror(E.ENOENT, path)

    def _reopen(self, oldfd: int, flags: int) -> int:
        table = self.boot.table
        file = table.lookup(oldfd)
        if file is None:
            try:
                return os.open(f"/proc/self/fd/{oldfd}", flags)
            except OSError as exc:
                raise oserror(exc.errno or E.ENOENT) from None
        if isinstance(file, MemfdFile):
            fd = os.open(f"/proc/self/fd/{oldfd}", flags)
            return table.install(file.sibling(), fd)
        if isinstance(file, IommufdFile):
            return self.open("/dev/iommu", flags)
        if file.path.startswith("/dev/vfio/"):       # cdevs, the container, groups
            return self.open(file.path, flags)
        fail(E.ENXIO)           # anonymous inodes cannot be re-opened

    def close(self, fd: int) -> None:
        """``close(2)``. One deliberate deviation: closing an fd number that
        was open when a simulated kexec happened, and has not been reused,
        succeeds silently. The kexec closed it already; this lets stage-1
        code that unwinds after :class:`SimulatedKexec` run its ``finally``
        and ``__exit__`` blocks without turning the reboot into EBADF. New
        fds the fake creates never take such numbers."""
        self._check_alive()
        if fd in self.dead_fds:
            self.dead_fds.discard(fd)
            self.boot.table.avoid.discard(fd)
            try:
                os.fstat(fd)
            except OSError:
                return
        self.boot.table.close(fd)

    def dup(self, fd: int) -> int:
        self._check_alive()
        newfd = os.dup(fd)
        return self.boot.table.dup(fd, newfd)

    def ioctl(self, fd: int, request: int, arg: Any) -> int:
        self._check_alive()
        file = self.boot.table.get(fd)
        return file.ioctl(fd, request, arg, UserMemory())

    def ioctl_int(self, fd: int, request: int, value: int = 0) -> int:
        self._check_alive()
        file = self.boot.table.get(fd)
        return file.ioctl_int(fd, request, value)

    def fcntl(self, fd: int, cmd: int, arg: int = 0) -> int:
        self._check_alive()
        file = self.boot.table.get(fd)
        if cmd in (F_DUPFD, F_DUPFD_CLOEXEC):
            newfd = _fcntl.fcntl(fd, cmd, arg)
            return self.boot.table.dup(fd, newfd)
        return file.fcntl(fd, cmd, arg)

    # -- memory files --------------------------------------------------------------------------
    def memfd_create(self, name: str, flags: int) -> int:
        self._check_alive()
        host_flags, hugetlb = check_memfd_flags(name, flags)
        fd = os.memfd_create(name, host_flags)
        return self.boot.table.install(MemfdFile(name, ShmemInode(hugetlb)), fd)

    def ftruncate(self, fd: int, length: int) -> None:
        self._check_alive()
        self.boot.table.get(fd).ftruncate(fd, length)

    def fstat_size(self, fd: int) -> int:
        self._check_alive()
        return self.boot.table.get(fd).fstat_size(fd)

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        self._check_alive()
        return self.boot.table.get(fd).pread(fd, length, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        self._check_alive()
        return self.boot.table.get(fd).pwrite(fd, bytes(data), offset)

    def read(self, fd: int, length: int) -> bytes:
        self._check_alive()
        return self.boot.table.get(fd).read(fd, length)

    def write(self, fd: int, data: bytes) -> int:
        self._check_alive()
        return self.boot.table.get(fd).write(fd, bytes(data))

    def mmap(self, fd: int, length: int, offset: int = 0,
             prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE) -> _mmap.mmap:
        self._check_alive()
        return self.boot.table.get(fd).mmap(fd, length, offset, prot)

    def eventfd(self, initval: int = 0, flags: int = 0) -> int:
        self._check_alive()
        fd = os.eventfd(initval, flags)
        return self.boot.table.install(EventFile(), fd)

    # -- kexec -----------------------------------------------------------------------------------
    def kexec_file_load(self, kernel_fd: int, initrd_fd: int, cmdline: str, flags: int) -> None:
        self._check_alive()
        file_load(self.boot, kernel_fd, initrd_fd, cmdline, flags)

    def reboot(self, cmd: int) -> None:
        self._check_alive()
        if self.boot.euid != 0:
            fail(E.EPERM)
        if cmd != LINUX_REBOOT_CMD_KEXEC:
            fail(E.EINVAL)      # only kexec is modelled
        self._kexec()
        raise SimulatedKexec(self.boot_count, self.boot.cmdline)

    def kexec(self, *, cmdline: str | None = None, lu_abi: str | None | object = _UNSET,
              lu_nr: int | object = _UNSET, release: str | object = _UNSET) -> None:
        """Perform a kexec now, as ``reboot(LINUX_REBOOT_CMD_KEXEC)`` would,
        but return normally instead of raising :class:`SimulatedKexec`.

        Without a loaded image one is loaded implicitly with ``cmdline``
        (default: the current command line). ``lu_abi``, ``lu_nr`` and
        ``release`` boot into a different kernel (e.g. ``lu_abi=None`` to
        kexec from a series kernel into stock 7.3). A freeze failure raises
        the ``OSError`` the syscall would return, and nothing changes.
        """
        self._check_alive()
        boot = self.boot
        if boot.kexec_image is None or cmdline is not None:
            from .kexec import KexecImage
            boot.kexec_image = KexecImage(0, 0, cmdline if cmdline is not None else boot.cmdline, 0)
        if lu_abi is not _UNSET:
            if lu_abi is not None and lu_abi not in ABIS:
                raise ValueError(f"lu_abi must be None, 'lu-v1' or 'lu-v2', not {lu_abi!r}")
            self.lu_abi = lu_abi
        if lu_nr is not _UNSET:
            self.lu_nr = cast(int, lu_nr)
        if release is not _UNSET:
            self.release = cast(str, release)
        self._kexec()

    def _kexec(self) -> None:
        boot = self.boot
        image = boot.kexec_image
        if image is None:
            fail(E.EINVAL)
        if boot.luo.enabled:
            boot.luo.freeze_all()           # a refusal fails the syscall
        kho = boot.handover()
        self.dead_fds |= set(boot.table.by_fd)
        boot.table.abandon()                # the old kernel and its processes are gone
        self.boot_count += 1
        self.boot = Boot(self.boot_count, self._config(image.cmdline), self.devices, kho)
        self.boot.table.avoid = set(self.dead_fds)
        self._install_kernel_package()

    # -- identity ----------------------------------------------------------------------------------
    def geteuid(self) -> int:
        return self.boot.euid

    def kernel_release(self) -> str:
        return self.release

    # -- teardown ----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Close every real fd the fake holds (user fds and kernel
        references) and remove its host files' tree. The fake is unusable
        afterwards."""
        if not self.closed:
            self.boot.table.abandon()
            self.files.close()
            self.closed = True

    def _check_alive(self) -> None:
        if self.closed:
            raise RuntimeError("this FakeKernel was shut down")

    def __enter__(self) -> "FakeKernel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
