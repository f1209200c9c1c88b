"""memfds: the only guest-RAM backing the series can preserve.

An HWPT is preservable only if every mapping of its IOAS came from
``IOMMU_IOAS_MAP_FILE`` of a memfd that was sealed F_SEAL_SEAL|GROW|SHRINK
**before** the map: the kernel samples the seals at map time (the series' patch 11/14, iommufd preservation).
On 7.3, a preserved memfd's size is frozen (Linux 7.3 mm/memfd_luo.c) and hugetlb
memfds cannot be preserved at all.
"""
from __future__ import annotations

import enum
import mmap as _mmap
import os
import re
from typing import Iterable

from . import errors, ioctl
from .backend import Backend, get_backend
from .errors import UsageError
from .fdobject import FdObject, FileKind


class Seal(enum.IntFlag):
    SEAL = ioctl.const("F_SEAL_SEAL")
    SHRINK = ioctl.const("F_SEAL_SHRINK")
    GROW = ioctl.const("F_SEAL_GROW")
    WRITE = ioctl.const("F_SEAL_WRITE")
    FUTURE_WRITE = ioctl.const("F_SEAL_FUTURE_WRITE")
    EXEC = ioctl.const("F_SEAL_EXEC")


#: The seals IOMMU live update needs on a memfd at MAP_FILE time (the series' patch 11/14, iommufd preservation).
LIVE_UPDATE_SEALS = Seal.SEAL | Seal.GROW | Seal.SHRINK

MFD_CLOEXEC = ioctl.const("MFD_CLOEXEC")
MFD_ALLOW_SEALING = ioctl.const("MFD_ALLOW_SEALING")
MFD_HUGETLB = ioctl.const("MFD_HUGETLB")
F_ADD_SEALS = ioctl.const("F_ADD_SEALS")
F_GET_SEALS = ioctl.const("F_GET_SEALS")


#: every seal 7.3 memfd LUO can preserve (MEMFD_LUO_ALL_SEALS, Linux 7.3 mm/memfd_luo.c); others: EOPNOTSUPP
LUO_PRESERVABLE_SEALS = Seal.SEAL | Seal.SHRINK | Seal.GROW | Seal.WRITE | Seal.FUTURE_WRITE | Seal.EXEC
WRITE_SEALS = Seal.WRITE | Seal.FUTURE_WRITE
SEAL_NAMES = tuple(s.name.lower() for s in Seal)  # type: ignore[union-attr]  # members have names


def parse_seals(value: str | Iterable[str] | int | None) -> Seal:
    """Seals from a string (``"seal,grow|shrink"``, ``"live-update"``,
    ``"none"``, ``F_SEAL_*`` names), a list of names, or an int bit mask."""
    if isinstance(value, bool):
        raise UsageError(f"not seals: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"not seals: {value!r}")
        return Seal(value)
    if isinstance(value, str):
        words = re.split(r"[,|\s]+", value.strip())
    elif isinstance(value, list) and all(isinstance(w, str) for w in value):
        words = value
    else:
        raise UsageError(f"not seals: {value!r}")
    result = Seal(0)
    for word in words:
        word = word.strip().lower().replace("-", "_").removeprefix("f_seal_")
        if word in ("", "none"):
            continue
        if word in ("live_update", "lu"):
            result |= LIVE_UPDATE_SEALS
        elif word in SEAL_NAMES:
            result |= Seal[word.upper()]
        else:
            raise UsageError(f"unknown seal {word!r} (known: {', '.join(SEAL_NAMES)}, live-update, none)")
    return result


def seal_names(seals: int) -> list[str]:
    """Lower-case names of the set seal bits; unknown bits as one hex number."""
    names = [s.name.lower() for s in Seal if s.value & int(seals)]  # type: ignore[union-attr]
    rest = int(seals) & ~int(LUO_PRESERVABLE_SEALS)
    if rest:
        names.append(f"{rest:#x}")
    return names


class MemFD(FdObject):
    kind = FileKind.MEMFD

    def __init__(self, fd: int, *, name: str | None = None, backend: Backend | None = None,
                 owned: bool = True):
        super().__init__(fd, backend=backend, owned=owned)
        self.name = name

    @classmethod
    def create(cls, name: str = "pyiommufd", size: int = 0, *, sealing: bool = True,
               cloexec: bool = True, hugetlb: bool = False, backend: Backend | None = None) -> "MemFD":
        if size < 0:
            raise UsageError(f"memfd size must be >= 0, not {size}")
        if len(name.encode()) > 249:
            raise UsageError("memfd names are at most 249 bytes")
        be = get_backend(backend)
        flags = (MFD_ALLOW_SEALING if sealing else 0) | (MFD_CLOEXEC if cloexec else 0) | \
            (MFD_HUGETLB if hugetlb else 0)
        try:
            fd = be.memfd_create(name, flags)
        except OSError as exc:
            raise errors.from_oserror(exc, "memfd_create", "memfd") from None
        memfd = cls(fd, name=name, backend=be)
        if size:
            try:
                memfd.resize(size)
            except BaseException:
                memfd.close()
                raise
        return memfd

    @classmethod
    def from_fd(cls, fd: int, *, backend: Backend | None = None, owned: bool = True) -> "MemFD":
        return cls(fd, backend=backend, owned=owned)

    # -- size and seals ----------------------------------------------------
    @property
    def size(self) -> int:
        return self.backend.fstat_size(self.fd)

    def resize(self, size: int) -> None:
        if size < 0:
            raise UsageError(f"memfd size must be >= 0, not {size}")
        try:
            self.backend.ftruncate(self.fd, size)
        except OSError as exc:
            raise errors.from_oserror(exc, "ftruncate", "memfd", detail=f"to {size} bytes") from None

    @property
    def seals(self) -> Seal:
        try:
            return Seal(self.backend.fcntl(self.fd, F_GET_SEALS))
        except OSError as exc:
            raise errors.from_oserror(exc, "F_GET_SEALS", "memfd") from None

    def add_seals(self, seals: Seal | int) -> None:
        try:
            self.backend.fcntl(self.fd, F_ADD_SEALS, int(seals))
        except OSError as exc:
            raise errors.from_oserror(exc, "F_ADD_SEALS", "memfd", detail=str(Seal(seals))) from None

    def seal_for_live_update(self) -> None:
        """Add F_SEAL_SEAL|GROW|SHRINK. Do it before ``IOAS.map_file``."""
        missing = LIVE_UPDATE_SEALS & ~self.seals
        if missing:
            self.add_seals(missing)

    @property
    def sealed_for_live_update(self) -> bool:
        return LIVE_UPDATE_SEALS & self.seals == LIVE_UPDATE_SEALS

    # -- contents ----------------------------------------------------------
    def write(self, data: bytes, offset: int = 0) -> int:
        if offset < 0:
            raise UsageError(f"offset must be >= 0, not {offset}")
        done = 0
        view = memoryview(data)
        while done < len(view):
            try:
                done += self.backend.pwrite(self.fd, bytes(view[done:]), offset + done)
            except OSError as exc:
                raise errors.from_oserror(exc, "pwrite", "memfd") from None
        return done

    def read(self, length: int | None = None, offset: int = 0) -> bytes:
        if length is None:
            length = max(self.size - offset, 0)
        chunks, done = [], 0
        while done < length:
            try:
                chunk = self.backend.pread(self.fd, length - done, offset + done)
            except OSError as exc:
                raise errors.from_oserror(exc, "pread", "memfd") from None
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)

    def sha256(self, chunk: int = 1 << 20) -> str:
        import hashlib  # only for verification: hashlib loads OpenSSL

        digest = hashlib.sha256()
        size, offset = self.size, 0
        while offset < size:
            data = self.read(min(chunk, size - offset), offset)
            if not data:
                break
            digest.update(data)
            offset += len(data)
        return digest.hexdigest()

    def mmap(self, length: int | None = None, offset: int = 0,
             prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE) -> _mmap.mmap:
        return self.backend.mmap(self.fd, self.size if length is None else length, offset, prot)

    def __repr__(self) -> str:
        if self.closed:
            return f"<MemFD {self.name!r} closed>"
        return f"<MemFD {self.name!r} fd={self._fd}>"


def page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")
