"""Typed errors with hints written for IOMMU live update.

Every failed kernel call becomes a :class:`KernelError` that is at once

* an interface class (:class:`IommufdError`, :class:`VfioError`,
  :class:`LiveUpdateError`, :class:`MemfdError`, :class:`KexecError`,
  :class:`SysfsError`), and
* an errno class (:class:`Busy`, :class:`NotFound`, :class:`AddressInUse`...),

so ``except LiveUpdateError`` and ``except Busy`` both work, and so does
``except OSError``. The error carries the operation name (the ioctl), the
errno and a hint. Hints cite the series' patches and the kernel files (pyiommufd.citations).
"""
from __future__ import annotations

import errno as E
import os
from typing import Any, Callable, Iterable, Mapping, cast


# Linux has one value for ENOTSUP and EOPNOTSUPP; the kernel sources say EOPNOTSUPP.
_PREFERRED_NAMES = {E.EOPNOTSUPP: "EOPNOTSUPP"}


def errname(err: int | None) -> str:
    """The symbolic name of ``err`` as the kernel sources spell it."""
    if err is None:
        return "ok"
    return _PREFERRED_NAMES.get(err) or E.errorcode.get(err, str(err))


class PyiommufdError(Exception):
    """Base of every error pyiommufd raises on purpose."""


class UsageError(PyiommufdError, ValueError):
    """Bad input, caught before the kernel was touched."""


class PlanError(UsageError):
    """A live-update preservation plan breaks a rule of the series."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class VerificationFailed(PyiommufdError):
    """A check found a difference: a restored file is not what its manifest
    says, or the manifest itself cannot be trusted."""


class AbiError(PyiommufdError):
    """The requested LU ABI revision is unknown or absent from this kernel."""


class KernelError(PyiommufdError, OSError):
    """A syscall or ioctl failed. ``op`` names it, ``hint`` says what to do."""

    interface = "kernel"
    # Set by partial() on the error of a bulk call, absent otherwise.
    index: int
    done: Any

    def __init__(self, op: str, err: int, hint: str | None = None, detail: str | None = None):
        OSError.__init__(self, err, os.strerror(err))
        self.op = op
        self.hint = hint
        self.detail = detail

    @property
    def errname(self) -> str:
        return errname(self.errno)

    def __str__(self) -> str:
        text = f"{self.op}: {self.strerror} ({self.errname})"
        if self.detail:
            text += f" [{self.detail}]"
        if self.hint:
            text += f"; {self.hint}"
        return text

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (type(self), (self.op, self.errno, self.hint, self.detail))


# -- interface classes ------------------------------------------------------
class IommufdError(KernelError):
    interface = "iommufd"


class VfioError(KernelError):
    interface = "vfio"


class LiveUpdateError(KernelError):
    interface = "luo"


class MemfdError(KernelError):
    interface = "memfd"


class KexecError(KernelError):
    interface = "kexec"


class SysfsError(KernelError):
    interface = "sysfs"


INTERFACES: dict[str, type[KernelError]] = {
    cls.interface: cls
    for cls in (KernelError, IommufdError, VfioError, LiveUpdateError, MemfdError, KexecError, SysfsError)
}


# -- errno classes ----------------------------------------------------------
class NotFound(KernelError):
    """ENOENT"""


class Busy(KernelError):
    """EBUSY"""


class PermissionDenied(KernelError):
    """EPERM / EACCES"""


class InvalidArgument(KernelError):
    """EINVAL"""


class TooBig(KernelError):
    """E2BIG: non-zero bytes past the size this kernel knows"""


class NoSuchIoctl(KernelError):
    """ENOTTY: the kernel does not know this ioctl"""


class MessageSize(KernelError):
    """EMSGSIZE: the output array was too small"""


class AlreadyExists(KernelError):
    """EEXIST"""


class AddressInUse(KernelError):
    """EADDRINUSE: a live-update HWPT token is already used in this iommufd"""


class NotSupported(KernelError):
    """EOPNOTSUPP"""


class BadFd(KernelError):
    """EBADF"""


class OutOfMemory(KernelError):
    """ENOMEM"""


class BadAddress(KernelError):
    """EFAULT"""


class IOFailure(KernelError):
    """EIO"""


class NoDevice(KernelError):
    """ENODEV / ENXIO"""


class Overflow(KernelError):
    """EOVERFLOW / ERANGE"""


class NoSpace(KernelError):
    """ENOSPC: e.g. no free IOVA range fits"""


ERRNO_CLASSES: dict[int, type[KernelError]] = {
    E.ENOENT: NotFound, E.EBUSY: Busy, E.EPERM: PermissionDenied, E.EACCES: PermissionDenied,
    E.EINVAL: InvalidArgument, E.E2BIG: TooBig, E.ENOTTY: NoSuchIoctl, E.EMSGSIZE: MessageSize,
    E.EEXIST: AlreadyExists, E.EADDRINUSE: AddressInUse, E.EOPNOTSUPP: NotSupported,
    E.EBADF: BadFd, E.ENOMEM: OutOfMemory, E.EFAULT: BadAddress, E.EIO: IOFailure,
    E.ENODEV: NoDevice, E.ENXIO: NoDevice, E.EOVERFLOW: Overflow, E.ERANGE: Overflow,
    E.ENOSPC: NoSpace,
}

# -- combined classes ---------------------------------------------------------
# One per interface and errno class, declared here so that they import
# (``from pyiommufd.errors import LiveUpdateBusy``) and type-check; the
# docstring of each is its errno class's. tests/unit/test_errors.py checks
# that every pair has its class.

class IommufdNotFound(IommufdError, NotFound): __doc__ = NotFound.__doc__
class IommufdBusy(IommufdError, Busy): __doc__ = Busy.__doc__
class IommufdPermissionDenied(IommufdError, PermissionDenied): __doc__ = PermissionDenied.__doc__
class IommufdInvalidArgument(IommufdError, InvalidArgument): __doc__ = InvalidArgument.__doc__
class IommufdTooBig(IommufdError, TooBig): __doc__ = TooBig.__doc__
class IommufdNoSuchIoctl(IommufdError, NoSuchIoctl): __doc__ = NoSuchIoctl.__doc__
class IommufdMessageSize(IommufdError, MessageSize): __doc__ = MessageSize.__doc__
class IommufdAlreadyExists(IommufdError, AlreadyExists): __doc__ = AlreadyExists.__doc__
class IommufdAddressInUse(IommufdError, AddressInUse): __doc__ = AddressInUse.__doc__
class IommufdNotSupported(IommufdError, NotSupported): __doc__ = NotSupported.__doc__
class IommufdBadFd(IommufdError, BadFd): __doc__ = BadFd.__doc__
class IommufdOutOfMemory(IommufdError, OutOfMemory): __doc__ = OutOfMemory.__doc__
class IommufdBadAddress(IommufdError, BadAddress): __doc__ = BadAddress.__doc__
class IommufdIOFailure(IommufdError, IOFailure): __doc__ = IOFailure.__doc__
class IommufdNoDevice(IommufdError, NoDevice): __doc__ = NoDevice.__doc__
class IommufdOverflow(IommufdError, Overflow): __doc__ = Overflow.__doc__
class IommufdNoSpace(IommufdError, NoSpace): __doc__ = NoSpace.__doc__

class VfioNotFound(VfioError, NotFound): __doc__ = NotFound.__doc__
class VfioBusy(VfioError, Busy): __doc__ = Busy.__doc__
class VfioPermissionDenied(VfioError, PermissionDenied): __doc__ = PermissionDenied.__doc__
class VfioInvalidArgument(VfioError, InvalidArgument): __doc__ = InvalidArgument.__doc__
class VfioTooBig(VfioError, TooBig): __doc__ = TooBig.__doc__
class VfioNoSuchIoctl(VfioError, NoSuchIoctl): __doc__ = NoSuchIoctl.__doc__
class VfioMessageSize(VfioError, MessageSize): __doc__ = MessageSize.__doc__
class VfioAlreadyExists(VfioError, AlreadyExists): __doc__ = AlreadyExists.__doc__
class VfioAddressInUse(VfioError, AddressInUse): __doc__ = AddressInUse.__doc__
class VfioNotSupported(VfioError, NotSupported): __doc__ = NotSupported.__doc__
class VfioBadFd(VfioError, BadFd): __doc__ = BadFd.__doc__
class VfioOutOfMemory(VfioError, OutOfMemory): __doc__ = OutOfMemory.__doc__
class VfioBadAddress(VfioError, BadAddress): __doc__ = BadAddress.__doc__
class VfioIOFailure(VfioError, IOFailure): __doc__ = IOFailure.__doc__
class VfioNoDevice(VfioError, NoDevice): __doc__ = NoDevice.__doc__
class VfioOverflow(VfioError, Overflow): __doc__ = Overflow.__doc__
class VfioNoSpace(VfioError, NoSpace): __doc__ = NoSpace.__doc__

class LiveUpdateNotFound(LiveUpdateError, NotFound): __doc__ = NotFound.__doc__
class LiveUpdateBusy(LiveUpdateError, Busy): __doc__ = Busy.__doc__
class LiveUpdatePermissionDenied(LiveUpdateError, PermissionDenied): __doc__ = PermissionDenied.__doc__
class LiveUpdateInvalidArgument(LiveUpdateError, InvalidArgument): __doc__ = InvalidArgument.__doc__
class LiveUpdateTooBig(LiveUpdateError, TooBig): __doc__ = TooBig.__doc__
class LiveUpdateNoSuchIoctl(LiveUpdateError, NoSuchIoctl): __doc__ = NoSuchIoctl.__doc__
class LiveUpdateMessageSize(LiveUpdateError, MessageSize): __doc__ = MessageSize.__doc__
class LiveUpdateAlreadyExists(LiveUpdateError, AlreadyExists): __doc__ = AlreadyExists.__doc__
class LiveUpdateAddressInUse(LiveUpdateError, AddressInUse): __doc__ = AddressInUse.__doc__
class LiveUpdateNotSupported(LiveUpdateError, NotSupported): __doc__ = NotSupported.__doc__
class LiveUpdateBadFd(LiveUpdateError, BadFd): __doc__ = BadFd.__doc__
class LiveUpdateOutOfMemory(LiveUpdateError, OutOfMemory): __doc__ = OutOfMemory.__doc__
class LiveUpdateBadAddress(LiveUpdateError, BadAddress): __doc__ = BadAddress.__doc__
class LiveUpdateIOFailure(LiveUpdateError, IOFailure): __doc__ = IOFailure.__doc__
class LiveUpdateNoDevice(LiveUpdateError, NoDevice): __doc__ = NoDevice.__doc__
class LiveUpdateOverflow(LiveUpdateError, Overflow): __doc__ = Overflow.__doc__
class LiveUpdateNoSpace(LiveUpdateError, NoSpace): __doc__ = NoSpace.__doc__

class MemfdNotFound(MemfdError, NotFound): __doc__ = NotFound.__doc__
class MemfdBusy(MemfdError, Busy): __doc__ = Busy.__doc__
class MemfdPermissionDenied(MemfdError, PermissionDenied): __doc__ = PermissionDenied.__doc__
class MemfdInvalidArgument(MemfdError, InvalidArgument): __doc__ = InvalidArgument.__doc__
class MemfdTooBig(MemfdError, TooBig): __doc__ = TooBig.__doc__
class MemfdNoSuchIoctl(MemfdError, NoSuchIoctl): __doc__ = NoSuchIoctl.__doc__
class MemfdMessageSize(MemfdError, MessageSize): __doc__ = MessageSize.__doc__
class MemfdAlreadyExists(MemfdError, AlreadyExists): __doc__ = AlreadyExists.__doc__
class MemfdAddressInUse(MemfdError, AddressInUse): __doc__ = AddressInUse.__doc__
class MemfdNotSupported(MemfdError, NotSupported): __doc__ = NotSupported.__doc__
class MemfdBadFd(MemfdError, BadFd): __doc__ = BadFd.__doc__
class MemfdOutOfMemory(MemfdError, OutOfMemory): __doc__ = OutOfMemory.__doc__
class MemfdBadAddress(MemfdError, BadAddress): __doc__ = BadAddress.__doc__
class MemfdIOFailure(MemfdError, IOFailure): __doc__ = IOFailure.__doc__
class MemfdNoDevice(MemfdError, NoDevice): __doc__ = NoDevice.__doc__
class MemfdOverflow(MemfdError, Overflow): __doc__ = Overflow.__doc__
class MemfdNoSpace(MemfdError, NoSpace): __doc__ = NoSpace.__doc__

class KexecNotFound(KexecError, NotFound): __doc__ = NotFound.__doc__
class KexecBusy(KexecError, Busy): __doc__ = Busy.__doc__
class KexecPermissionDenied(KexecError, PermissionDenied): __doc__ = PermissionDenied.__doc__
class KexecInvalidArgument(KexecError, InvalidArgument): __doc__ = InvalidArgument.__doc__
class KexecTooBig(KexecError, TooBig): __doc__ = TooBig.__doc__
class KexecNoSuchIoctl(KexecError, NoSuchIoctl): __doc__ = NoSuchIoctl.__doc__
class KexecMessageSize(KexecError, MessageSize): __doc__ = MessageSize.__doc__
class KexecAlreadyExists(KexecError, AlreadyExists): __doc__ = AlreadyExists.__doc__
class KexecAddressInUse(KexecError, AddressInUse): __doc__ = AddressInUse.__doc__
class KexecNotSupported(KexecError, NotSupported): __doc__ = NotSupported.__doc__
class KexecBadFd(KexecError, BadFd): __doc__ = BadFd.__doc__
class KexecOutOfMemory(KexecError, OutOfMemory): __doc__ = OutOfMemory.__doc__
class KexecBadAddress(KexecError, BadAddress): __doc__ = BadAddress.__doc__
class KexecIOFailure(KexecError, IOFailure): __doc__ = IOFailure.__doc__
class KexecNoDevice(KexecError, NoDevice): __doc__ = NoDevice.__doc__
class KexecOverflow(KexecError, Overflow): __doc__ = Overflow.__doc__
class KexecNoSpace(KexecError, NoSpace): __doc__ = NoSpace.__doc__

class SysfsNotFound(SysfsError, NotFound): __doc__ = NotFound.__doc__
class SysfsBusy(SysfsError, Busy): __doc__ = Busy.__doc__
class SysfsPermissionDenied(SysfsError, PermissionDenied): __doc__ = PermissionDenied.__doc__
class SysfsInvalidArgument(SysfsError, InvalidArgument): __doc__ = InvalidArgument.__doc__
class SysfsTooBig(SysfsError, TooBig): __doc__ = TooBig.__doc__
class SysfsNoSuchIoctl(SysfsError, NoSuchIoctl): __doc__ = NoSuchIoctl.__doc__
class SysfsMessageSize(SysfsError, MessageSize): __doc__ = MessageSize.__doc__
class SysfsAlreadyExists(SysfsError, AlreadyExists): __doc__ = AlreadyExists.__doc__
class SysfsAddressInUse(SysfsError, AddressInUse): __doc__ = AddressInUse.__doc__
class SysfsNotSupported(SysfsError, NotSupported): __doc__ = NotSupported.__doc__
class SysfsBadFd(SysfsError, BadFd): __doc__ = BadFd.__doc__
class SysfsOutOfMemory(SysfsError, OutOfMemory): __doc__ = OutOfMemory.__doc__
class SysfsBadAddress(SysfsError, BadAddress): __doc__ = BadAddress.__doc__
class SysfsIOFailure(SysfsError, IOFailure): __doc__ = IOFailure.__doc__
class SysfsNoDevice(SysfsError, NoDevice): __doc__ = NoDevice.__doc__
class SysfsOverflow(SysfsError, Overflow): __doc__ = Overflow.__doc__
class SysfsNoSpace(SysfsError, NoSpace): __doc__ = NoSpace.__doc__


_COMBINED: dict[tuple[type[KernelError], type[KernelError]], type[KernelError]] = {
    (cls.__bases__[0], cls.__bases__[1]): cls
    for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, KernelError) and len(cls.__bases__) == 2
}


def error_class(interface: str, err: int) -> type[KernelError]:
    """The class raised for ``err`` on ``interface``, e.g. :class:`LiveUpdateBusy`."""
    base = INTERFACES.get(interface, KernelError)
    mixin = ERRNO_CLASSES.get(err)
    if mixin is None:
        return base
    if base is KernelError:
        return mixin
    return _COMBINED[(base, mixin)]


# -- hints ------------------------------------------------------------------
# Keys, most specific first: (op, errno), (interface, errno), errno.
# A value may be a callable taking the context dict the caller passed.
Hint = str | Callable[[Mapping[str, object]], str | None]

_LU_SLOT = ("the LU mark ioctl slot (nr 0x95) answered with {errname}: this kernel has no "
            "IOMMU_HWPT_LU_* ioctl of the selected ABI revision (on upstream 7.3 nr 0x95 is "
            "IOAS_NOIOMMU_GET_PA); run `pyiommufd caps` to probe (Linux 7.3 include/uapi/linux/iommufd.h: nr 0x95 is IOMMU_IOAS_NOIOMMU_GET_PA)")

HINTS: dict[object, Hint] = {
    # LUO (Linux 7.3 kernel/liveupdate/luo_session.c and luo_file.c)
    ("open(/dev/liveupdate)", E.EBUSY): lambda ctx: (
        "/dev/liveupdate is exclusive: another process holds it"
        + (f" (pid {', '.join(map(str, cast(Iterable[int], ctx['holders'])))})" if ctx.get("holders") else "")
        + "; hand your fds to `pyiommufd agent` instead of opening it twice"),
    ("open(/dev/liveupdate)", E.ENOENT): "no /dev/liveupdate: boot with CONFIG_LIVEUPDATE, "
        "`liveupdate=on` and KHO enabled (kho=on or KEXEC_HANDOVER_ENABLE_DEFAULT)",
    ("open(/dev/liveupdate)", E.EIO): "the incoming live-update state could not be "
        "deserialized: a preserved file type has no handler (or another compatible version) "
        "in this kernel (Linux 7.3 kernel/liveupdate/luo_session.c and luo_file.c)",
    ("LIVEUPDATE_IOCTL_CREATE_SESSION", E.EEXIST): "an outgoing session with this name exists already",
    ("LIVEUPDATE_IOCTL_CREATE_SESSION", E.EINVAL): "session names are 1 to 63 bytes",
    ("LIVEUPDATE_IOCTL_RETRIEVE_SESSION", E.ENOENT): "no incoming session of this name: "
        "there was no live update yet, or the previous kernel did not preserve it",
    ("LIVEUPDATE_IOCTL_RETRIEVE_SESSION", E.EINVAL): "this incoming session was retrieved "
        "already (retrieve it once and keep the fd; the agent may hold it: `pyiommufd status`), "
        "or the name is empty or too long",
    ("LIVEUPDATE_SESSION_PRESERVE_FD", E.EEXIST): "this token is used already in this session",
    ("LIVEUPDATE_SESSION_PRESERVE_FD", E.EBUSY): "this file (for a memfd: this inode) is "
        "preserved already, maybe in another session",
    ("LIVEUPDATE_SESSION_PRESERVE_FD", E.ENOENT): lambda ctx: (
        "no live-update handler for this file type in this kernel, or a file it depends on is "
        "not preserved in this session yet; order is memfd -> iommufd -> vfio cdev, all in one "
        "session (the series' patch 14/14: memfd, then iommufd, then cdev, in one session)"
        + (f"; this file is {ctx['kind']}" if ctx.get("kind") else "")),
    ("LIVEUPDATE_SESSION_PRESERVE_FD", E.EINVAL): "on a series kernel: a marked HWPT maps "
        "something other than a memfd sealed SEAL|GROW|SHRINK before MAP_FILE, or the device's "
        "HWPT is not marked; on any kernel: PRESERVE_FD needs an outgoing (created) session "
        "(the series' patch 11/14, iommufd preservation; the series' patches 12-13/14, VFIO cdev preservation)",
    ("LIVEUPDATE_SESSION_PRESERVE_FD", E.EOPNOTSUPP): "the IOMMU driver cannot preserve this "
        "domain or device (only Intel VT-d in the series), or the memfd carries seals LUO "
        "cannot preserve, or the device has PASID attachments (the series' patches 12-13/14, VFIO cdev preservation)",
    ("LIVEUPDATE_SESSION_RETRIEVE_FD", E.ENOENT): "no file with this token in the session",
    ("LIVEUPDATE_SESSION_RETRIEVE_FD", E.EOPNOTSUPP): "Phase 1 of the series cannot restore "
        "an iommufd: the preserved HWPTs stay kernel-owned (the series' cover letter: what Phase 1 restores after the kexec); the error is sticky",
    ("LIVEUPDATE_SESSION_RETRIEVE_FD", E.ENODEV): "no VFIO device matches the preserved one: "
        "bind it to vfio-pci first (`pyiommufd bind BDF`); a failed retrieve is sticky",
    ("LIVEUPDATE_SESSION_RETRIEVE_FD", E.EINVAL): "RETRIEVE_FD needs an incoming (retrieved) session",
    ("LIVEUPDATE_SESSION_FINISH", E.EBUSY): lambda ctx: (
        "a preserved file's handler is not ready to finish (nothing changed; retry later): a "
        "vfio device must be retrieved and bound first, and a session holding an iommufd can "
        "never finish in Phase 1 (the series' cover letter: what Phase 1 restores after the kexec); unretrieved memfds do not block finish, "
        "they are dropped by it"
        + (f"; unretrieved tokens: {ctx['unretrieved']}" if ctx.get("unretrieved") else "")),
    ("LIVEUPDATE_SESSION_FINISH", E.EINVAL): "FINISH needs an incoming (retrieved) session",
    ("luo", E.E2BIG): "this kernel's LUO structs are smaller than ours: ABI mismatch",
    # iommufd (the series' patch 10/14, IOMMU_HWPT_LU_SET_PRESERVE; the series' patch 11/14, iommufd preservation)
    ("IOMMU_HWPT_LU_SET_PRESERVE", E.EADDRINUSE): "another HWPT of this iommufd is marked "
        "with this token already; tokens are unique per iommufd (the series' patch 10/14, IOMMU_HWPT_LU_SET_PRESERVE)",
    ("IOMMU_HWPT_LU_MARK_PRESERVE", E.EADDRINUSE): "another HWPT of this iommufd is marked "
        "with this token already; tokens are unique per iommufd (the series' patch 10/14, IOMMU_HWPT_LU_SET_PRESERVE)",
    ("IOMMU_HWPT_LU_SET_PRESERVE", E.ENOENT): "hwpt_id does not name a paging HWPT of this iommufd",
    ("IOMMU_HWPT_LU_MARK_PRESERVE", E.ENOENT): "hwpt_id does not name a paging HWPT of this iommufd",
    ("IOMMU_HWPT_LU_SET_PRESERVE", E.EINVAL): _LU_SLOT.format(errname="EINVAL"),
    ("IOMMU_HWPT_LU_MARK_PRESERVE", E.EINVAL): _LU_SLOT.format(errname="EINVAL"),
    ("IOMMU_HWPT_LU_SET_PRESERVE", E.ENOTTY): _LU_SLOT.format(errname="ENOTTY") +
        "; a series kernel built without CONFIG_IOMMU_LIVEUPDATE also says ENOTTY",
    ("IOMMU_HWPT_LU_MARK_PRESERVE", E.ENOTTY): _LU_SLOT.format(errname="ENOTTY") +
        "; a series kernel built without CONFIG_IOMMU_LIVEUPDATE also says ENOTTY",
    ("IOMMU_HWPT_LU_SET_PRESERVE", E.E2BIG): _LU_SLOT.format(errname="E2BIG"),
    ("IOMMU_HWPT_LU_MARK_PRESERVE", E.E2BIG): _LU_SLOT.format(errname="E2BIG"),
    ("IOMMU_IOAS_MAP", E.EBUSY): "the IOAS is immutable while a marked HWPT on it is "
        "preserved; close the session to unpreserve (the series' patch 11/14, iommufd preservation)",
    ("IOMMU_IOAS_MAP_FILE", E.EBUSY): "the IOAS is immutable while a marked HWPT on it is "
        "preserved; close the session to unpreserve (the series' patch 11/14, iommufd preservation)",
    ("IOMMU_IOAS_COPY", E.EBUSY): "the destination IOAS is immutable while preserved (the series' patch 11/14, iommufd preservation)",
    ("IOMMU_IOAS_UNMAP", E.EBUSY): "the IOAS is immutable while a marked HWPT on it is "
        "preserved; close the session to unpreserve (the series' patch 11/14, iommufd preservation)",
    ("IOMMU_IOAS_UNMAP", E.ENOENT): "no mapping covers exactly this IOVA range",
    ("IOMMU_IOAS_MAP", E.EFAULT): "the VA is not ordinary memory (a PCI BAR?): map BARs "
        "with VFIO_DEVICE_FEATURE_DMA_BUF and IOMMU_IOAS_MAP_FILE",
    ("IOMMU_IOAS_MAP", E.ENOMEM): "pinned pages count against RLIMIT_MEMLOCK: raise it, "
        "use CAP_IPC_LOCK, or set IOMMU_OPTION_RLIMIT_MODE",
    ("IOMMU_IOAS_MAP_FILE", E.ENOMEM): "pinned pages count against RLIMIT_MEMLOCK: raise it, "
        "use CAP_IPC_LOCK, or set IOMMU_OPTION_RLIMIT_MODE",
    ("IOMMU_DESTROY", E.EBUSY): "the object is still in use (attached device, dependent "
        "HWPT or vIOMMU, or a live-update mark that pins it)",
    ("IOMMU_HWPT_ALLOC", E.EOPNOTSUPP): "the IOMMU driver does not support these flags or data type",
    ("open(/dev/iommu)", E.ENOENT): "no /dev/iommu: the kernel needs CONFIG_IOMMUFD",
    ("open(vfio cdev)", E.ENOENT): "no such cdev: bind the device to vfio-pci (`pyiommufd bind "
        "BDF`); the kernel needs CONFIG_VFIO_DEVICE_CDEV",
    ("IOMMU_IOAS_MAP", E.EEXIST): "the fixed IOVA range overlaps an existing mapping",
    ("IOMMU_IOAS_MAP_FILE", E.EEXIST): "the fixed IOVA range overlaps an existing mapping",
    ("IOMMU_IOAS_MAP", E.EINVAL): "the IOVA or VA is not aligned to the IOAS (page size once a "
        "domain is attached), or falls in a reserved range such as the MSI window",
    ("IOMMU_IOAS_MAP_FILE", E.EINVAL): "the file cannot be mapped by file (not a memfd?), or the "
        "range runs past its end, or the IOVA is unaligned or reserved",
    ("IOMMU_IOAS_CHANGE_PROCESS", E.EINVAL): "only MAP_FILE mappings can move to another "
        "process; a user-VA mapping (IOMMU_IOAS_MAP) is present",
    ("IOMMU_IOAS_MAP", E.ENOSPC): "no free IOVA range of this size fits in the allowed IOVAs",
    ("IOMMU_IOAS_MAP_FILE", E.ENOSPC): "no free IOVA range of this size fits in the allowed IOVAs",
    ("IOMMU_IOAS_COPY", E.ENOSPC): "no free IOVA range of this size fits in the allowed IOVAs",
    ("IOMMU_OPTION", E.EBUSY): "RLIMIT_MODE can only change before any object exists",
    ("IOMMU_VFIO_IOAS", E.ENODEV): "no compat IOAS has been set",
    ("IOMMU_HWPT_INVALIDATE", E.EINVAL): "only nested HWPTs and vIOMMUs take invalidations",
    ("IOMMU_HWPT_SET_DIRTY_TRACKING", E.EOPNOTSUPP): "allocate the HWPT with dirty_tracking=True; "
        "check get_hw_info().dirty_tracking",
    ("IOMMU_HWPT_GET_DIRTY_BITMAP", E.EOPNOTSUPP): "allocate the HWPT with dirty_tracking=True; "
        "check get_hw_info().dirty_tracking",
    ("IOMMU_IOAS_NOIOMMU_GET_PA", E.EOPNOTSUPP): "the kernel has no CONFIG_IOMMUFD_NOIOMMU",
    ("IOMMU_IOAS_NOIOMMU_GET_PA", E.E2BIG): "nr 0x95 is the IOMMU live-update mark ioctl on "
        "this kernel, not NOIOMMU_GET_PA (Linux 7.3 include/uapi/linux/iommufd.h: nr 0x95 is IOMMU_IOAS_NOIOMMU_GET_PA)",
    ("VFIO_DEVICE_BIND_IOMMUFD", E.EINVAL): "this fd is bound already, or a VF token was given for a non-VF",
    ("VFIO_DEVICE_RESET", E.EINVAL): "the device has no reset method",
    ("VFIO_DEVICE_SET_IRQS", E.EINVAL): "only one interrupt type (INTx, MSI, MSI-X) can be active at a time",
    ("VFIO_DEVICE_FEATURE", E.ENOTTY): "this kernel or driver lacks the feature (DMA_BUF needs "
        "CONFIG_VFIO_PCI_DMABUF)",
    ("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", E.ENODEV): "no slot or bus reset is possible for this device",
    ("sysfs", E.EACCES): "writing sysfs needs root",
    ("sysfs", E.ENOENT): "no such PCI device or driver",
    ("iommufd", E.ENOENT): "no object with this id in this iommufd, or of the wrong type",
    ("iommufd", E.ENOTTY): "this kernel does not know this iommufd ioctl: too old, or built "
        "without the option that adds it",
    ("iommufd", E.E2BIG): "the kernel's struct is smaller than ours and our tail is not "
        "zero: ABI mismatch",
    # VFIO (the series' patches 12-13/14, VFIO cdev preservation; the series' cover letter: what Phase 1 restores after the kexec)
    ("VFIO_DEVICE_BIND_IOMMUFD", E.EPERM): "the device's DMA is owned by someone else: after "
        "a live update it belongs to the preserved iommufd (retrieve the cdev from its session; "
        "the series' cover letter: what Phase 1 restores after the kexec); otherwise MSI cannot be isolated (no interrupt remapping and "
        "iommufd.allow_unsafe_interrupts=0)",
    ("VFIO_DEVICE_BIND_IOMMUFD", E.EBUSY): "the device's group is open through the legacy "
        "/dev/vfio/N interface",
    ("VFIO_DEVICE_ATTACH_IOMMUFD_PT", E.EBUSY): "the device is being reset, or the PASID is attached already",
    ("open(vfio cdev)", E.EBUSY): "the cdev is open elsewhere, or its group is in use by the legacy container API",
    ("vfio", E.ENOTTY): "this kernel or device does not support this VFIO ioctl",
    # memfd and sysfs
    ("F_ADD_SEALS", E.EPERM): "the memfd is sealed F_SEAL_SEAL already, or was created "
        "without MFD_ALLOW_SEALING",
    ("ftruncate", E.EPERM): "a preserved memfd's size is frozen until it is unpreserved "
        "(Linux 7.3 mm/memfd_luo.c), or it is sealed against growing/shrinking",
    ("sysfs", E.EBUSY): "the device refuses this driver: after a live update only a "
        "driver_managed_dma driver such as vfio-pci may bind a preserved device (the series' cover letter: what Phase 1 restores after the kexec)",
    ("sysfs", E.ENODEV): "the driver does not match this device; set driver_override first",
    ("kexec", E.EPERM): "kexec needs CAP_SYS_BOOT, and kexec_load_disabled must be 0",
    ("kexec", E.EINVAL): "a preserved file refused to freeze (a vfio device with interrupts "
        "still enabled, the series' patches 12-13/14, VFIO cdev preservation), or the kernel image is not loadable",
    E.EMFILE: lambda ctx: _emfile_hint(),
    E.EACCES: "permission denied: run as root",
    E.EPERM: "operation not permitted: run as root (CAP_SYS_ADMIN, CAP_SYS_BOOT)",
    E.ENOTTY: "the kernel does not know this ioctl",
    E.E2BIG: "our struct is larger than the kernel's and the tail is not zero: ABI mismatch",
}


def _emfile_hint() -> str:
    from .rlimits import emfile_hint  # resource is imported only when EMFILE happens

    return emfile_hint()


def hint_for(op: str, interface: str, err: int, context: Mapping[str, object] | None = None) -> str | None:
    for key in ((op, err), (interface, err), err):
        hint = HINTS.get(key)
        if hint is None:
            continue
        if callable(hint):
            hint = hint(context or {})
        if hint:
            return hint
    return None


def make_error(op: str, interface: str, err: int, *, context: Mapping[str, object] | None = None,
               detail: str | None = None) -> KernelError:
    """Build the typed error for ``op`` failing with ``err``."""
    return error_class(interface, err)(op, err, hint_for(op, interface, err, context), detail)


def _token_list(tokens: list[int], shown: int = 8) -> str:
    if len(tokens) <= shown:
        return ", ".join(hex(t) for t in tokens)
    return ", ".join(hex(t) for t in tokens[:shown - 1]) + f", ... {tokens[-1]:#x}"


def partial(error: KernelError, index: int, total: int, verb: str, tokens: list[Any],
            done: Any) -> KernelError:
    """Say in ``error`` that item ``index`` of a bulk call of ``total`` items
    failed, and what was already ``verb`` before it (``tokens``: the ids of
    those, for the message; ``done``: the results, kept on the error as
    ``error.done``, with ``error.index``)."""
    if index:
        shown = _token_list(tokens) if tokens and isinstance(tokens[0], int) else ", ".join(map(str, tokens[:8]))
        what = f"the {index} before it {'is' if index == 1 else 'are'} {verb} ({shown})"
    else:
        what = f"nothing was {verb}"
    note = f"item {index + 1} of {total} failed; {what}"
    error.detail = f"{error.detail}; {note}" if error.detail else note
    error.index = index
    error.done = done
    return error


def from_oserror(exc: OSError, op: str, interface: str, *, context: Mapping[str, object] | None = None,
                 detail: str | None = None) -> KernelError:
    return make_error(op, interface, exc.errno or E.EIO, context=context, detail=detail)
