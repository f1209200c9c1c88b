"""User memory as the fake kernel sees it: the ioctl argument and the user
pointers embedded in it.

The fake runs in the caller's process, so a "user pointer" is simply an
address in this process. Before the fake touches one it checks the address
range against ``/proc/self/maps`` (readable, and writable for writes), so a
bogus pointer gives ``EFAULT`` exactly where the kernel's ``copy_*_user``
would, instead of crashing the interpreter.

The ioctl argument itself is the writable buffer the caller handed to
``Backend.ioctl``; the fake never reads or writes past its end (bytes past
the buffer count as unreadable, hence ``EFAULT``; the real kernel would read
whatever follows in memory).

Struct layouts come from :mod:`pyiommufd._uapi` (our declarations of the
7.3 ABI); request numbers are *not* taken from there: the fake hard-codes
the kernel's own command numbers, so a wrong constant in the bindings shows
up as ENOTTY instead of being masked.
"""
from __future__ import annotations

import bisect
import errno as E
from functools import lru_cache
from typing import Any, NoReturn

from pyiommufd._uapi import ffi
from pyiommufd.backend import oserror

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
ULONG_MAX = U64_MAX          # x86_64
PAGE_SIZE = 4096
HPAGE_SIZE = 2 << 20         # x86_64 THP size (CONFIG_TRANSPARENT_HUGEPAGE)

# A cffi object (struct pointer, array, ctype): cffi ships no types.
CData = Any


def fail(err: int) -> NoReturn:
    """Raise the OSError the syscall would fail with."""
    raise oserror(err)


# -- struct layout helpers ---------------------------------------------------
def _find_field(ctype: CData, name: str) -> tuple[int, int] | None:
    """(offset, size) of field ``name`` in ``ctype``, looking into anonymous
    unions/structs the way C does."""
    for fname, field in ctype.fields or ():
        if fname == name:
            return int(field.offset), int(ffi.sizeof(field.type))
        if not fname and field.type.kind in ("struct", "union"):
            found = _find_field(field.type, name)
            if found:
                return int(field.offset) + found[0], found[1]
    return None


@lru_cache(maxsize=None)
def field_span(struct: str, name: str) -> tuple[int, int]:
    """(offset, size) of ``struct``'s field ``name``."""
    found = _find_field(ffi.typeof(struct), name)
    if found is None:
        raise KeyError(f"{struct} has no field {name}")
    return found


@lru_cache(maxsize=None)
def offsetofend(struct: str, name: str) -> int:
    off, size = field_span(struct, name)
    return off + size


@lru_cache(maxsize=None)
def sizeof(struct: str) -> int:
    return int(ffi.sizeof(struct))


def has_struct(struct: str) -> bool:
    try:
        ffi.typeof(struct)
        return True
    except (ffi.error, KeyError, TypeError):
        return False


def getf(obj: CData, name: str) -> Any:
    """Field access that survives Python's name mangling of ``__reserved``."""
    return getattr(obj, name)


def setf(obj: CData, name: str, value: Any) -> None:
    setattr(obj, name, value)


# -- process memory map --------------------------------------------------------
class ProcessMaps:
    """A lazily read snapshot of ``/proc/self/maps`` for one syscall."""

    def __init__(self) -> None:
        self._starts: list[int] | None = None
        self._entries: list[tuple[int, int, str]] = []

    def _load(self) -> None:
        entries = []
        with open("/proc/self/maps") as f:
            for line in f:
                rng, perms = line.split(None, 2)[:2]
                lo, hi = rng.split("-")
                entries.append((int(lo, 16), int(hi, 16), perms))
        entries.sort()
        self._entries = entries
        self._starts = [e[0] for e in entries]

    def accessible(self, addr: int, length: int, write: bool = False) -> bool:
        if length == 0:
            return True
        if addr <= 0 or addr + length > (1 << 47):
            return False
        if self._starts is None:
            self._load()
        assert self._starts is not None
        need = "w" if write else "r"
        cur, end = addr, addr + length
        while cur < end:
            i = bisect.bisect_right(self._starts, cur) - 1
            if i < 0:
                return False
            lo, hi, perms = self._entries[i]
            if not (lo <= cur < hi) or need not in perms:
                return False
            cur = hi
        return True


class UserMemory:
    """copy_from_user / copy_to_user for one syscall."""

    def __init__(self) -> None:
        self.maps = ProcessMaps()

    def read(self, addr: int, length: int) -> bytes:
        if length == 0:
            return b""
        if not self.maps.accessible(addr, length):
            fail(E.EFAULT)
        return bytes(ffi.buffer(ffi.cast("char *", addr), length))

    def write(self, addr: int, data: bytes) -> None:
        if not data:
            return
        if not self.maps.accessible(addr, len(data), write=True):
            fail(E.EFAULT)
        ffi.memmove(ffi.cast("char *", addr), data, len(data))

    def clear(self, addr: int, length: int) -> None:
        self.write(addr, bytes(length))

    def read_struct(self, struct: str, addr: int) -> tuple[CData, bytes]:
        """A kernel-side copy of a user struct (``copy_from_user``)."""
        raw = self.read(addr, sizeof(struct))
        return ffi.cast(f"{struct} *", ffi.from_buffer(bytearray(raw))), raw

    def read_array(self, elem: str, addr: int, count: int) -> tuple[list[CData], bytearray]:
        size = ffi.sizeof(elem)
        raw = bytearray(self.read(addr, size * count))
        arr = ffi.cast(f"{elem} *", ffi.from_buffer(raw))
        return [arr[i] for i in range(count)], raw


class IoctlArg:
    """The ioctl argument: the caller's writable buffer, plus the kernel's
    copy of the command struct (``ucmd.cmd``)."""

    def __init__(self, buf: Any, mem: UserMemory) -> None:
        self.mem = mem
        self.writable = False
        if isinstance(buf, int):
            # a bare integer is a pointer value the fake cannot trust
            self.ubuf = None
            self.length = 0
        else:
            try:
                self.ubuf = ffi.from_buffer(buf, require_writable=True)
                self.writable = True
            except (TypeError, BufferError):
                # read-only memory (bytes): the kernel's copy_to_user faults
                self.ubuf = ffi.from_buffer(buf)
                self.writable = False
            self.length = len(self.ubuf)
        self.cmd: CData = None
        self.struct: str | None = None
        self.user_size = 0
        self._kbuf: bytearray | None = None

    @property
    def address(self) -> int:
        return int(ffi.cast("uintptr_t", self.ubuf)) if self.ubuf is not None else 0

    # raw user access inside the argument buffer
    def read(self, offset: int, length: int) -> bytes:
        if self.ubuf is None or offset < 0 or offset + length > self.length:
            fail(E.EFAULT)
        return bytes(ffi.buffer(self.ubuf)[offset:offset + length])

    def write(self, offset: int, data: bytes) -> None:
        if self.ubuf is None or not self.writable or offset < 0 or offset + len(data) > self.length:
            fail(E.EFAULT)
        ffi.buffer(self.ubuf)[offset:offset + len(data)] = data

    def get_u32(self, offset: int = 0) -> int:
        """``get_user(u32)`` of the leading size/argsz field."""
        return int.from_bytes(self.read(offset, 4), "little")

    def copy_struct_from_user(self, struct: str, user_size: int) -> CData:
        """``copy_struct_from_user(cmd, sizeof(struct), uarg, user_size)``:
        a shorter user struct is zero-extended, a longer one must be zero
        past the kernel's size (else E2BIG)."""
        ksize = sizeof(struct)
        if user_size > ksize:
            tail = self.read(ksize, user_size - ksize)
            if any(tail):
                fail(E.E2BIG)
        n = min(user_size, ksize)
        kbuf = bytearray(ksize)
        kbuf[:n] = self.read(0, n)
        self._kbuf = kbuf
        self.struct = struct
        self.user_size = user_size
        self.cmd = ffi.cast(f"{struct} *", ffi.from_buffer(kbuf))
        return self.cmd

    def copy_from_user(self, struct: str, minsz: int) -> CData:
        """``copy_from_user(&cmd, uarg, minsz)`` (VFIO style): only the first
        ``minsz`` bytes are read, the rest of the kernel copy is zero."""
        ksize = sizeof(struct)
        kbuf = bytearray(ksize)
        kbuf[:minsz] = self.read(0, minsz)
        self._kbuf = kbuf
        self.struct = struct
        self.cmd = ffi.cast(f"{struct} *", ffi.from_buffer(kbuf))
        return self.cmd

    def copy_more_from_user(self, start: int, end: int) -> None:
        """Read bytes [start, end) of the struct into the kernel copy."""
        assert self._kbuf is not None
        self._kbuf[start:end] = self.read(start, end - start)

    def respond(self, length: int | None = None) -> None:
        """``ucmd_respond``: copy ``min(user_size, sizeof)`` bytes back."""
        assert self._kbuf is not None
        n = len(self._kbuf) if length is None else length
        n = min(self.user_size, n) if self.user_size else n
        self.write(0, bytes(self._kbuf[:n]))

    def copy_field_to_user(self, name: str) -> None:
        """``copy_to_user(&uarg->field, &cmd.field, sizeof(field))``."""
        assert self._kbuf is not None and self.struct is not None
        off, size = field_span(self.struct, name)
        self.write(off, bytes(self._kbuf[off:off + size]))

    def copy_prefix_to_user(self, length: int) -> None:
        """``copy_to_user(uarg, &cmd, length)``."""
        assert self._kbuf is not None
        self.write(0, bytes(self._kbuf[:length]))

    def user_ptr(self, offset: int) -> int:
        """The address of byte ``offset`` of the argument (``arg + 1``...)."""
        return self.address + offset
