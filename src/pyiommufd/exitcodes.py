"""Exit codes of the ``pyiommufd`` command (documented in README.md), and
:func:`exit_code_for`, the one place an error becomes one.

Free of click on purpose: the agent and the library flows name exit codes
without pulling in the CLI.
"""
from __future__ import annotations

import errno as E

OK = 0
CHECK_FAILED = 1      # a selftest step, a verification or a doctor check failed
BAD_INPUT = 2         # bad arguments or input file (click's own usage errors are 2 too)
KERNEL_ERROR = 3      # the kernel refused an operation
UNSUPPORTED = 4       # the kernel lacks a capability (no handler, no LU ioctl, no /dev/liveupdate)
BUSY = 5              # a resource is held elsewhere (/dev/liveupdate, a device, a session name)
NOT_PERMITTED = 6     # needs root / the operation was not permitted
AGENT_UNREACHABLE = 7 # the holder agent is not running or not answering
VMM_FAILED = 8        # `pyiommufd qemu`: QEMU failed, or lacks what the command needs
INTERNAL_ERROR = 70   # a bug in pyiommufd: an exception nobody expected (sysexits' EX_SOFTWARE)
VM_TIMEOUT = 124      # `pyiommufd vm`: the guest did not finish in time (as timeout(1))

TABLE = [
    (OK, "success"),
    (CHECK_FAILED, "a check failed (selftest FAIL, verification mismatch, doctor problem)"),
    (BAD_INPUT, "bad input: arguments, BDF, token, name, plan file"),
    (KERNEL_ERROR, "the kernel refused an operation"),
    (UNSUPPORTED, "the kernel lacks a capability"),
    (BUSY, "a resource is busy or held elsewhere"),
    (NOT_PERMITTED, "not permitted (run as root)"),
    (AGENT_UNREACHABLE, "the holder agent is not reachable"),
    (VMM_FAILED, "`pyiommufd qemu`: QEMU failed, or lacks what the command needs"),
    (INTERNAL_ERROR, "internal error: a bug in pyiommufd (please report it with the --debug traceback)"),
    (VM_TIMEOUT, "`pyiommufd vm`: the guest did not finish before --timeout"),
]

_BY_ERRNO = {
    E.EBUSY: BUSY, E.EEXIST: BUSY, E.EADDRINUSE: BUSY,
    E.EPERM: NOT_PERMITTED, E.EACCES: NOT_PERMITTED,
    E.ENOTTY: UNSUPPORTED, E.EOPNOTSUPP: UNSUPPORTED,
}


def for_errno(err: int | None) -> int:
    return _BY_ERRNO.get(err or 0, KERNEL_ERROR)


# a NotFound from these says the kernel lacks something, not that a name is wrong
_MISSING_CAPABILITY_OPS = (
    "LIVEUPDATE_SESSION_PRESERVE_FD",   # no live-update handler for this file type
    "open(/dev/liveupdate)", "open(/dev/iommu)",  # no LUO / no iommufd in this kernel
)


def exit_code_for(exc: BaseException) -> int:
    """The exit code of the command that failed with ``exc``."""
    from . import errors

    if isinstance(exc, errors.AbiError):
        return UNSUPPORTED
    if isinstance(exc, errors.UsageError):
        return BAD_INPUT
    if isinstance(exc, errors.VerificationFailed):
        return CHECK_FAILED
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, errors.NotFound) and exc.op in _MISSING_CAPABILITY_OPS:
        return UNSUPPORTED
    if isinstance(exc, OSError):
        return for_errno(exc.errno)
    if isinstance(exc, errors.PyiommufdError):
        return KERNEL_ERROR
    return INTERNAL_ERROR


__all__ = ["OK", "CHECK_FAILED", "BAD_INPUT", "KERNEL_ERROR", "UNSUPPORTED", "BUSY", "NOT_PERMITTED",
           "AGENT_UNREACHABLE", "VMM_FAILED", "INTERNAL_ERROR", "VM_TIMEOUT", "TABLE", "for_errno", "exit_code_for"]
