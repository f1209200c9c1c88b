"""The one seam through which pyiommufd reaches the kernel.

Every syscall the library makes goes through a :class:`Backend`; the files it
reads and writes in sysfs, procfs and /dev go through the backend's ``files``
(:mod:`pyiommufd.hostfs`). The real one,
:class:`LinuxBackend`, talks to the running kernel. The test-only fake kernel
(:mod:`pyiommufd_testing`) implements the same methods and decodes the very
ioctl buffers the real kernel would receive.

Methods raise plain :class:`OSError` with ``errno`` set; the interface layers
turn those into typed :mod:`pyiommufd.errors`.
"""
from __future__ import annotations

import contextlib
import contextvars
import fcntl
import mmap as _mmap
import os
from typing import Any, Callable, Iterator

from .hostfs import HostFiles, LinuxHostFiles

# kexec_file_load(2) and reboot(2) numbers for x86_64 (the only arch with VT-d).
SYS_KEXEC_FILE_LOAD = 320
LINUX_REBOOT_CMD_KEXEC = 0x45584543
KEXEC_FILE_UNLOAD = 0x1
KEXEC_FILE_ON_CRASH = 0x2
KEXEC_FILE_NO_INITRAMFS = 0x4


class Backend:
    """The syscall seam. Subclasses implement every method."""

    name = "abstract"

    #: Whether another process sees the same kernel state (Linux does; a test
    #: double that keeps its state in this process does not). Decides where
    #: the agent may run: a spawned daemon, or a thread of this process.
    shared_with_other_processes: bool = False

    #: sysfs, procfs and /dev as files (:mod:`pyiommufd.hostfs`): not syscalls
    #: of the seam, a small interface of their own
    files: HostFiles

    # -- file descriptors -------------------------------------------------
    def open(self, path: str, flags: int = os.O_RDWR | os.O_CLOEXEC) -> int:
        raise NotImplementedError

    def close(self, fd: int) -> None:
        raise NotImplementedError

    def dup(self, fd: int) -> int:
        raise NotImplementedError

    def ioctl(self, fd: int, request: int, arg: Any) -> int:
        """Issue ``ioctl(fd, request, &arg)``; ``arg`` is a writable buffer
        (a ``cffi`` buffer of the argument struct) that the kernel may update."""
        raise NotImplementedError

    def ioctl_function(self) -> Callable[[int, int, Any], Any]:
        """A plain ``f(fd, request, buffer)`` with :meth:`ioctl`'s effect, for
        hot paths that look it up once per call site; by default the bound
        method itself."""
        return self.ioctl

    def ioctl_int(self, fd: int, request: int, value: int = 0) -> int:
        """Issue an ioctl whose argument is passed by value (VFIO legacy API)."""
        raise NotImplementedError

    def fcntl(self, fd: int, cmd: int, arg: int = 0) -> int:
        raise NotImplementedError

    # -- memory files -----------------------------------------------------
    def memfd_create(self, name: str, flags: int) -> int:
        raise NotImplementedError

    def ftruncate(self, fd: int, length: int) -> None:
        raise NotImplementedError

    def fstat_size(self, fd: int) -> int:
        raise NotImplementedError

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        raise NotImplementedError

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        raise NotImplementedError

    def read(self, fd: int, length: int) -> bytes:
        raise NotImplementedError

    def write(self, fd: int, data: bytes) -> int:
        raise NotImplementedError

    def mmap(self, fd: int, length: int, offset: int = 0,
             prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE) -> _mmap.mmap:
        raise NotImplementedError

    def eventfd(self, initval: int = 0, flags: int = 0) -> int:
        raise NotImplementedError

    # -- kexec ------------------------------------------------------------
    def kexec_file_load(self, kernel_fd: int, initrd_fd: int, cmdline: str, flags: int) -> None:
        raise NotImplementedError

    def reboot(self, cmd: int) -> None:
        raise NotImplementedError

    # -- identity -----------------------------------------------------------
    def geteuid(self) -> int:
        raise NotImplementedError

    def kernel_release(self) -> str:
        raise NotImplementedError


class LinuxBackend(Backend):
    """The running kernel."""

    name = "linux"
    shared_with_other_processes = True
    files: HostFiles = LinuxHostFiles()

    _libc_handle: Any = None

    @property
    def _libc(self) -> Any:
        # ctypes only for kexec_file_load and reboot: loaded on first use
        if self._libc_handle is None:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall.restype = ctypes.c_long
            self._libc_handle = libc
        return self._libc_handle

    def open(self, path: str, flags: int = os.O_RDWR | os.O_CLOEXEC) -> int:
        return os.open(path, flags)

    def close(self, fd: int) -> None:
        os.close(fd)

    def dup(self, fd: int) -> int:
        return os.dup(fd)

    def ioctl(self, fd: int, request: int, arg: Any) -> int:
        rc: int = fcntl.ioctl(fd, request, arg, True)  # the syscall's result for a buffer
        return rc

    def ioctl_function(self) -> Callable[[int, int, Any], Any]:
        # fcntl.ioctl mutates a writable buffer by default, exactly as ioctl()
        # asks: one Python frame fewer per hot-path ioctl
        return fcntl.ioctl

    def ioctl_int(self, fd: int, request: int, value: int = 0) -> int:
        return fcntl.ioctl(fd, request, value)

    def fcntl(self, fd: int, cmd: int, arg: int = 0) -> int:
        return fcntl.fcntl(fd, cmd, arg)

    def memfd_create(self, name: str, flags: int) -> int:
        return os.memfd_create(name, flags)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def fstat_size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def read(self, fd: int, length: int) -> bytes:
        return os.read(fd, length)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def mmap(self, fd: int, length: int, offset: int = 0,
             prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE) -> _mmap.mmap:
        return _mmap.mmap(fd, length, flags=_mmap.MAP_SHARED, prot=prot, offset=offset)

    def eventfd(self, initval: int = 0, flags: int = 0) -> int:
        return os.eventfd(initval, flags)

    def kexec_file_load(self, kernel_fd: int, initrd_fd: int, cmdline: str, flags: int) -> None:
        import ctypes

        raw = cmdline.encode() + b"\0"
        rc = self._libc.syscall(SYS_KEXEC_FILE_LOAD, ctypes.c_int(kernel_fd),
                                ctypes.c_int(initrd_fd), ctypes.c_ulong(len(raw)),
                                ctypes.c_char_p(raw), ctypes.c_ulong(flags))
        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def reboot(self, cmd: int) -> None:
        import ctypes

        os.sync()
        if self._libc.reboot(ctypes.c_int(cmd)) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def geteuid(self) -> int:
        return os.geteuid()

    def kernel_release(self) -> str:
        return os.uname().release


_default: Backend | None = None
_current: contextvars.ContextVar[Backend | None] = contextvars.ContextVar(
    "pyiommufd_backend", default=None)


def get_backend(backend: Backend | None = None) -> Backend:
    """Return ``backend`` if given, else the one installed by :func:`use`,
    else the process-wide :class:`LinuxBackend`."""
    global _default
    if backend is not None:
        return backend
    current = _current.get()
    if current is not None:
        return current
    if _default is None:
        _default = LinuxBackend()
    return _default


@contextlib.contextmanager
def use(backend: Backend) -> Iterator[Backend]:
    """Make ``backend`` the default for the code run inside the block."""
    token = _current.set(backend)
    try:
        yield backend
    finally:
        _current.reset(token)


def oserror(err: int, filename: str | None = None) -> OSError:
    """An OSError exactly as the real syscall would raise it."""
    return OSError(err, os.strerror(err), filename) if filename else OSError(err, os.strerror(err))


__all__ = [
    "Backend", "LinuxBackend", "get_backend", "use", "oserror",
    "KEXEC_FILE_UNLOAD", "KEXEC_FILE_ON_CRASH", "KEXEC_FILE_NO_INITRAMFS",
    "LINUX_REBOOT_CMD_KEXEC",
]
