"""Revisions of the out-of-tree IOMMU live-update ioctl, and a safe probe.

| revision | ioctl | struct | token | nr |
|---|---|---|---|---|
| ``lu-v1`` | IOMMU_HWPT_LU_SET_PRESERVE | ``{u32 size, u32 hwpt_id, u32 hwpt_token}``, 12 bytes | u32 | 0x95 |
| ``lu-v2`` | IOMMU_HWPT_LU_MARK_PRESERVE | ``{u32 size, u32 hwpt_id, u64 hwpt_token}``, 16 bytes | u64 | 0x95 |

Upstream 7.3 gives nr 0x95 to IOMMU_IOAS_NOIOMMU_GET_PA, and every iommufd
ioctl is ``_IO(';', nr)``, so the request number alone cannot say which ioctl
a kernel has there (Linux 7.3 include/uapi/linux/iommufd.h: nr 0x95 is IOMMU_IOAS_NOIOMMU_GET_PA). The revision is therefore explicit: an
argument (``abi=``), or ``--lu-abi`` / ``PYIOMMUFD_LU_ABI`` on the command line
(the CLI reads the variable; the library does not) — or ``probe``, which asks
the kernel in a way that never runs a foreign handler (see :func:`probe_lu_abi`).
:func:`parse_lu_abi` is the one parser of these spellings. A kernel that moved
the ioctl to another nr is reached with ``nr=`` or ``PYIOMMUFD_LU_NR``.
"""
from __future__ import annotations

import errno as E
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from . import errors, ioctl
from ._uapi import ffi
from .backend import Backend, get_backend
from .errors import AbiError, UsageError

if TYPE_CHECKING:
    from _typeshed import HasFileno

IOMMUFD_TYPE = 0x3B
DEFAULT_NR = 0x95
ENV_ABI = "PYIOMMUFD_LU_ABI"
ENV_NR = "PYIOMMUFD_LU_NR"


@dataclass(frozen=True)
class LuAbi:
    name: str
    ioctl_name: str
    struct: str
    token_bits: int
    nr: int = DEFAULT_NR
    source: str = ""

    @property
    def request(self) -> int:
        return ioctl.IO(IOMMUFD_TYPE, self.nr)

    @property
    def size(self) -> int:
        return int(ffi.sizeof(self.struct))

    @property
    def ioctl_def(self) -> ioctl.IoctlDef:
        return ioctl.IoctlDef(self.ioctl_name, self.request, self.struct, "iommufd")

    def with_nr(self, nr: int) -> "LuAbi":
        if not 0 <= nr <= 0xFF:
            raise UsageError(f"an ioctl nr is 0..0xff, not {nr:#x}")
        return replace(self, nr=nr)

    def check_token(self, token: int) -> int:
        limit = (1 << self.token_bits) - 1
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= limit:
            raise UsageError(f"{self.name} HWPT tokens are integers from 0 to {limit:#x}, not {token!r}")
        return token

    def mark(self, backend: Backend | None, iommufd_fd: int, hwpt_id: int, token: int) -> None:
        """Mark HWPT ``hwpt_id`` of ``iommufd_fd`` for preservation under ``token``."""
        self.check_token(token)
        ioctl.call(get_backend(backend), iommufd_fd, self.ioctl_def, hwpt_id=hwpt_id,
                   hwpt_token=token, detail=f"{self.name} at nr {self.nr:#x}, hwpt {hwpt_id}, token {token:#x}")


LU_V1 = LuAbi("lu-v1", "IOMMU_HWPT_LU_SET_PRESERVE", "struct iommu_hwpt_lu_set_preserve", 32,
              source="[PATCH 10/14] of the v1 series (the series' patch 10/14, IOMMU_HWPT_LU_SET_PRESERVE)")
LU_V2 = LuAbi("lu-v2", "IOMMU_HWPT_LU_MARK_PRESERVE", "struct iommu_hwpt_lu_mark_preserve", 64,
              source="post-review rename and u64 token (the series' review: IOMMU_HWPT_LU_MARK_PRESERVE with a u64 token)")
REVISIONS = {abi.name: abi for abi in (LU_V1, LU_V2)}
PROBE: Literal["probe"] = "probe"
# Every spelling, the same for --lu-abi, $PYIOMMUFD_LU_ABI, a plan's lu_abi and
# abi= (case-insensitive): the revision's name, its series version, its verb.
SPELLINGS: dict[str, str] = {"lu-v1": "lu-v1", "v1": "lu-v1", "set": "lu-v1",
                             "lu-v2": "lu-v2", "v2": "lu-v2", "mark": "lu-v2", PROBE: PROBE}
CHOICES = tuple(SPELLINGS)


def parse_nr(text: str | int | None) -> int | None:
    if text is None or text == "":
        return None
    try:
        nr = text if isinstance(text, int) else int(str(text), 0)
    except ValueError:
        raise UsageError(f"not an ioctl nr: {text!r} (use e.g. 0x96)") from None
    if not 0 <= nr <= 0xFF:
        raise UsageError(f"an ioctl nr is 0..0xff, not {text!r}")
    return nr


def configured_nr() -> int:
    """The LU ioctl's nr: ``$PYIOMMUFD_LU_NR`` (e.g. 0x96 on the rebased series), else 0x95."""
    try:
        nr = parse_nr(os.environ.get(ENV_NR))
    except UsageError as exc:
        raise UsageError(f"${ENV_NR}: {exc}") from None
    return DEFAULT_NR if nr is None else nr


def parse_lu_abi(spelling: str | LuAbi) -> LuAbi | Literal["probe"]:
    """The revision ``spelling`` names (one of :data:`SPELLINGS`, any case), or
    :data:`PROBE` for a probe request. Anything else is a one-line UsageError."""
    if isinstance(spelling, LuAbi):
        return spelling
    key = SPELLINGS.get(spelling.lower()) if isinstance(spelling, str) else None
    if key is None:
        raise UsageError(f"unknown LU ABI revision {spelling!r}; known: {', '.join(CHOICES)}")
    return PROBE if key == PROBE else REVISIONS[key]


def canonical_lu_abi(spelling: str | LuAbi) -> str:
    """``lu-v1``, ``lu-v2`` or ``probe`` for any accepted spelling (UsageError otherwise)."""
    choice = parse_lu_abi(spelling)
    return choice if choice == PROBE else choice.name


def lookup(name: str) -> LuAbi:
    """The revision ``name`` spells; ``probe`` is not one (UsageError)."""
    choice = parse_lu_abi(name)
    if not isinstance(choice, LuAbi):
        raise UsageError(f"{name!r} asks for a probe, not an LU ABI revision")
    return choice


@dataclass
class ProbeResult:
    """What the kernel has at the LU ioctl's slot on ``/dev/iommu``."""

    nr: int
    status: str  # "lu-v1", "lu-v2", "lu-unknown", "foreign", "absent", "error"
    errnos: dict[int, int | None] = field(default_factory=dict)  # probe size -> errno (None: success)
    reason: str = ""

    @property
    def abi(self) -> LuAbi | None:
        base = REVISIONS.get(self.status)
        return base.with_nr(self.nr) if base else None

    @property
    def supported(self) -> bool:
        return self.abi is not None

    def as_dict(self) -> dict[str, object]:
        return {"nr": hex(self.nr), "status": self.status, "supported": self.supported,
                "errnos": {str(k): errors.errname(v) for k, v in self.errnos.items()},
                "reason": self.reason}


def _probe_once(be: Backend, iommufd_fd: int, request: int, size: int) -> int | None:
    # hwpt_id 0 never names an object (ids start at 1), so a live-update
    # handler fails its lookup with ENOENT and changes nothing.
    buf = bytearray(16)
    buf[0:4] = size.to_bytes(4, "little")
    try:
        be.ioctl(iommufd_fd, request, buf)
    except OSError as exc:
        return exc.errno
    return None


def probe_lu_abi(iommufd: int | HasFileno | None = None, *, nr: int | None = None, backend: Backend | None = None) -> ProbeResult:
    """Find out, without side effects, which LU revision the kernel has.

    | call (all-zero body, hwpt_id 0) | answer | meaning |
    |---|---|---|
    | size 16 | ENOENT | an LU mark ioctl lives at ``nr`` (its id lookup failed) |
    | size 16 | EINVAL | another ioctl with a larger struct (7.3: NOIOMMU_GET_PA, 40 bytes) — it refused the size before running |
    | size 16 | ENOTTY | nothing at ``nr`` (or a series kernel without CONFIG_IOMMU_LIVEUPDATE) |
    | size 12, after ENOENT | ENOENT | lu-v1 (12-byte struct) |
    | size 12, after ENOENT | EINVAL | lu-v2 (16-byte struct) |

    ``iommufd`` is an open ``/dev/iommu`` (object or fd); None opens one.
    ``nr`` defaults to ``$PYIOMMUFD_LU_NR``, else 0x95: only that one number is
    probed, never a scan (a foreign handler with a small struct could run).
    """
    from .fdobject import fd_of

    be = get_backend(backend)
    if nr is None:
        nr = configured_nr()
    request = ioctl.IO(IOMMUFD_TYPE, nr)
    own_fd = None
    if iommufd is None:
        try:
            own_fd = be.open("/dev/iommu", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            return ProbeResult(nr, "error", reason=f"cannot open /dev/iommu: {os.strerror(exc.errno or E.EIO)}")
        fd = own_fd
    else:
        fd = fd_of(iommufd)
    try:
        result = ProbeResult(nr, "error")
        first = _probe_once(be, fd, request, 16)
        result.errnos[16] = first
        if first == E.ENOENT:
            second = _probe_once(be, fd, request, 12)
            result.errnos[12] = second
            if second == E.ENOENT:
                result.status, result.reason = "lu-v1", "12-byte SET_PRESERVE struct accepted"
            elif second == E.EINVAL:
                result.status, result.reason = "lu-v2", "16-byte MARK_PRESERVE struct (12 bytes refused)"
            else:
                result.status = "lu-unknown"
                result.reason = f"an LU ioctl answered size 12 with {errors.errname(second)}"
        elif first == E.EINVAL:
            result.status = "foreign"
            result.reason = (f"nr {nr:#x} belongs to another ioctl with a larger struct "
                             "(upstream 7.3: IOMMU_IOAS_NOIOMMU_GET_PA); it was not run")
        elif first == E.ENOTTY:
            result.status, result.reason = "absent", f"no ioctl at nr {nr:#x}"
        else:
            name = "success" if first is None else errors.errname(first)
            result.reason = f"unexpected answer {name} to the size-16 probe"
        return result
    finally:
        if own_fd is not None:
            be.close(own_fd)


def select_lu_abi(name: str | LuAbi | None = None, *, iommufd: int | HasFileno | None = None, nr: int | None = None,
                  backend: Backend | None = None) -> LuAbi:
    """The revision to use: ``name`` (any spelling :func:`parse_lu_abi`
    takes); ``probe`` or None asks the kernel. ``nr`` (or ``$PYIOMMUFD_LU_NR``)
    moves it. ``$PYIOMMUFD_LU_ABI`` is the CLI's to read, not this function's."""
    if nr is None and os.environ.get(ENV_NR):
        nr = configured_nr()
    choice = parse_lu_abi(PROBE if name is None else name)
    if isinstance(choice, LuAbi):
        return choice if nr is None else choice.with_nr(nr)
    result = probe_lu_abi(iommufd, nr=nr, backend=backend)
    if result.abi is None:
        raise AbiError(f"kernel lacks IOMMU_HWPT_LU_SET_PRESERVE/MARK_PRESERVE at nr {result.nr:#x}: "
                       f"{result.reason}")
    return result.abi


__all__ = ["LuAbi", "LU_V1", "LU_V2", "REVISIONS", "ProbeResult", "probe_lu_abi", "select_lu_abi",
           "lookup", "parse_lu_abi", "canonical_lu_abi", "PROBE", "SPELLINGS", "parse_nr", "configured_nr"]
