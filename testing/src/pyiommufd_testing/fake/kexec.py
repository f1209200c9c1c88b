"""Simulated kexec: ``kexec_file_load(2)`` and ``reboot(LINUX_REBOOT_CMD_KEXEC)``.

* ``kexec_file_load`` (K:kernel/kexec_file.c:365-471): not root EPERM
  (CAP_SYS_BOOT; also once ``kexec_load_disabled`` is set); unknown flags
  EINVAL; ``KEXEC_FILE_UNLOAD`` drops the image; a bad kernel fd, or initrd
  fd without ``KEXEC_FILE_NO_INITRAMFS``, EBADF; any readable fd is accepted
  as an image (the fake does not parse bzImages). The image's command line
  becomes the next boot's ``/proc/cmdline``, so leaving out ``liveupdate=on``
  boots a kernel without LUO, as on real hardware.
* ``reboot(KEXEC)`` (K:kernel/kexec_core.c:1138-1153, K:kernel/reboot.c:809-811):
  not root EPERM; no image loaded EINVAL; then LUO freezes every preserved
  file, and a refusal (a VFIO device with interrupts enabled, the series' patches 12-13/14, VFIO cdev preservation)
  fails the syscall with that errno and nothing changes. Otherwise the old
  kernel is gone: every fd the fake knows is closed (placeholders included),
  the outgoing LUO sessions that were still open are handed over, the new
  kernel boots (incoming sessions, preserved devices' DMA ownership, boot
  drivers probed) and :class:`SimulatedKexec` is raised so that the caller's
  stage-1 code unwinds like a process that did not survive the reboot.
"""
from __future__ import annotations

import errno as E
import os
from dataclasses import dataclass
from typing import Protocol

from .uaccess import fail

KEXEC_FILE_UNLOAD = 0x01
KEXEC_FILE_ON_CRASH = 0x02
KEXEC_FILE_NO_INITRAMFS = 0x04
KEXEC_FILE_DEBUG = 0x08
KEXEC_FILE_NO_CMA = 0x10
KEXEC_FILE_FORCE_DTB = 0x20
KEXEC_FILE_FLAGS = (KEXEC_FILE_UNLOAD | KEXEC_FILE_ON_CRASH | KEXEC_FILE_NO_INITRAMFS
                    | KEXEC_FILE_DEBUG | KEXEC_FILE_NO_CMA | KEXEC_FILE_FORCE_DTB)
LINUX_REBOOT_CMD_KEXEC = 0x45584543


class SimulatedKexec(BaseException):
    """Raised by ``reboot(LINUX_REBOOT_CMD_KEXEC)`` on the fake kernel once
    the new kernel has booted. A ``BaseException`` so that ``except
    Exception`` in the code under test does not swallow the reboot."""

    def __init__(self, boot_count: int, cmdline: str) -> None:
        super().__init__(f"simulated kexec: now in boot {boot_count}")
        self.boot_count = boot_count
        self.cmdline = cmdline


@dataclass
class KexecImage:
    kernel_size: int
    initrd_size: int
    cmdline: str
    flags: int


def _file_size(fd: int) -> int:
    try:
        st = os.fstat(fd)
    except OSError:
        fail(E.EBADF)
    return st.st_size


class KexecState(Protocol):
    """What kexec_file_load changes in a boot (:class:`~.boot.Boot`, which imports this module)."""

    euid: int
    kexec_load_disabled: bool
    kexec_image: KexecImage | None
    crash_image: KexecImage | None


def file_load(boot: KexecState, kernel_fd: int, initrd_fd: int, cmdline: str, flags: int) -> None:
    if boot.euid != 0 or boot.kexec_load_disabled:
        fail(E.EPERM)
    if flags != flags & KEXEC_FILE_FLAGS:
        fail(E.EINVAL)
    crash = bool(flags & KEXEC_FILE_ON_CRASH)
    if flags & KEXEC_FILE_UNLOAD:
        if crash:
            boot.crash_image = None
        else:
            boot.kexec_image = None
        return
    ksize = _file_size(kernel_fd)
    isize = 0 if flags & KEXEC_FILE_NO_INITRAMFS else _file_size(initrd_fd)
    image = KexecImage(ksize, isize, cmdline, flags)
    if crash:
        boot.crash_image = image
    else:
        boot.kexec_image = image
