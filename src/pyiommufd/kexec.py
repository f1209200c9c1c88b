"""kexec_file_load(2) and reboot(LINUX_REBOOT_CMD_KEXEC).

Live update needs the file-based loader: KHO hands state over only through
kexec_file_load (the series' patch 14/14, tools/testing/selftests/iommu/iommufd_liveupdate.c step 22). ``execute()`` runs LUO's freeze of
every preserved file first; a refusing file (e.g. a VFIO device with IRQs
still on) makes it fail instead of rebooting.
"""
from __future__ import annotations

import errno as E
import os

from . import errors, ioctl
from .backend import Backend, get_backend
from .errors import UsageError

KEXEC_FILE_UNLOAD = ioctl.const("KEXEC_FILE_UNLOAD")
KEXEC_FILE_NO_INITRAMFS = ioctl.const("KEXEC_FILE_NO_INITRAMFS")
LINUX_REBOOT_CMD_KEXEC = ioctl.const("LINUX_REBOOT_CMD_KEXEC")

# kexec-tools' --reuse-cmdline drops these: they describe the old boot only.
_NOT_REUSED = ("BOOT_IMAGE=", "initrd=")


def reuse_cmdline(text: str) -> str:
    """/proc/cmdline as the next kernel should get it."""
    return " ".join(w for w in text.split() if not w.startswith(_NOT_REUSED))


def current_cmdline(backend: Backend | None = None) -> str:
    return reuse_cmdline(get_backend(backend).files.read_text("/proc/cmdline"))


def _open_image(be: Backend, path: str | os.PathLike[str], what: str) -> int:
    try:
        return be.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.from_oserror(exc, f"open({what})", "kexec", detail=os.fspath(path)) from None


def check_image(path: str, what: str, backend: Backend | None = None) -> None:
    """Refuse ``path`` as a kexec image (``what``: the option naming it) unless
    it is an existing file, before anything is preserved or loaded."""
    files = get_backend(backend).files
    if not files.exists(path):
        raise UsageError(f"{what} {path}: no such file")
    if files.is_dir(path):
        raise UsageError(f"{what} {path}: is a directory, not a kernel image")


def load(kernel: str | os.PathLike[str], initrd: str | os.PathLike[str] | None = None,
         cmdline: str | None = None, *, backend: Backend | None = None) -> str:
    """Load ``kernel`` (and ``initrd``) for the next kexec. ``cmdline=None``
    reuses the running kernel's. Returns the command line used."""
    be = get_backend(backend)
    if cmdline is None:
        cmdline = current_cmdline(be)
    if len(cmdline.encode()) >= 4096:
        raise UsageError("kernel command line too long (4095 bytes at most)")
    kernel_fd = _open_image(be, kernel, "kernel")
    initrd_fd = -1
    try:
        if initrd is not None:
            initrd_fd = _open_image(be, initrd, "initrd")
        flags = 0 if initrd is not None else KEXEC_FILE_NO_INITRAMFS
        try:
            be.kexec_file_load(kernel_fd, initrd_fd, cmdline, flags)
        except OSError as exc:
            raise errors.from_oserror(exc, "kexec_file_load", "kexec", detail=os.fspath(kernel)) from None
    finally:
        be.close(kernel_fd)
        if initrd_fd >= 0:
            be.close(initrd_fd)
    return cmdline


def unload(*, backend: Backend | None = None) -> None:
    be = get_backend(backend)
    try:
        be.kexec_file_load(-1, -1, "", KEXEC_FILE_UNLOAD)
    except OSError as exc:
        raise errors.from_oserror(exc, "kexec_file_load(unload)", "kexec") from None


def is_loaded(*, backend: Backend | None = None) -> bool:
    try:
        return get_backend(backend).files.read_text("/sys/kernel/kexec_loaded").strip() == "1"
    except OSError:
        return False


def execute(*, backend: Backend | None = None) -> None:
    """Reboot into the loaded kernel. Returns only by raising."""
    be = get_backend(backend)
    try:
        be.reboot(LINUX_REBOOT_CMD_KEXEC)
    except OSError as exc:
        raise errors.from_oserror(exc, "reboot(KEXEC)", "kexec") from None
    raise errors.make_error("reboot(KEXEC)", "kexec", E.EIO, detail="reboot returned without rebooting")
