"""The raw layer, for kernel testers: send exactly the bytes you built and
get the kernel's own answer back.

The object model (:mod:`pyiommufd.iommufd`, :mod:`pyiommufd.luo`, ...)
fills every struct correctly and raises typed errors. A kernel test needs
the opposite: a size field that lies, a buffer shorter or longer than the
struct, a non-zero tail, a request number nobody declared, and the errno
as a value to compare. This module does that, and nothing more:

* :class:`Struct` is a struct of our cffi declarations (``include-bindings/``)
  in a byte buffer of any length. Its size field is set to that length
  unless you set the field yourself (``size=4``); fields are read and
  written by name, bytes by offset.
* :func:`ioctl` sends a :class:`Struct` (or any writable buffer, or an
  integer for value-style ioctls) through the backend seam, exactly as it
  is, and returns a :class:`Result`: the syscall's return value and errno.
  ``check=True`` raises the typed error instead, as the object model would.

Nothing here validates what the kernel judges: no size, length, flag or
request number is refused. What is refused (:class:`~pyiommufd.errors.UsageError`)
is only what cannot be expressed as bytes: an unknown struct type, a
field that does not exist or whose value does not fit it, a read-only
buffer the kernel could not write its answer into.
"""
from __future__ import annotations

import errno as _errno
from typing import Any

from . import errors
from . import ioctl as _ioctl
from ._record import record
from ._uapi import ffi
from .backend import Backend, get_backend

__all__ = ["Result", "Struct", "ioctl", "offsetofend", "open_device", "request_of"]


@record(frozen=True)
class Result:
    """What the kernel answered: ``value`` is the syscall's return value
    (0, or a new fd for the ioctls that make one), ``errno`` is 0 on
    success; a failed call has ``value`` -1."""

    value: int
    errno: int

    @property
    def ok(self) -> bool:
        return self.errno == 0

    @property
    def errname(self) -> str:
        """``"EINVAL"``, ``"E2BIG"``...; ``"OK"`` on success."""
        if not self.errno:
            return "OK"
        return _errno.errorcode.get(self.errno, f"errno {self.errno}")


class Struct:
    """A C struct of our declarations in a buffer of ``nbytes`` bytes.

    ``nbytes`` defaults to ``sizeof(ctype)``; it may be smaller (the kernel
    is sent only ``nbytes`` bytes; fields past them can still be written
    here but do not travel) or larger (a tail of zero bytes, see
    :meth:`tail`). The size field (``size``, or ``argsz`` for VFIO structs)
    is set to ``nbytes``; every keyword is a field, assigned after that, so
    ``size=4`` (or ``argsz=...``) makes the size field say anything.
    ``ctype`` and ``nbytes`` are positional, so fields named ``length`` or
    ``size`` never clash with them.
    """

    __slots__ = ("ctype", "nbytes", "_backing", "_view")

    ctype: str
    nbytes: int
    _backing: bytearray
    _view: Any  # the cffi pointer over _backing

    def __init__(self, ctype: str | _ioctl.IoctlDef, nbytes: int | None = None, /, **fields: Any) -> None:
        if isinstance(ctype, _ioctl.IoctlDef):
            if ctype.struct is None:
                raise errors.UsageError(f"{ctype.name} takes no struct")
            ctype = ctype.struct
        try:
            struct_size = int(ffi.sizeof(ctype))
        except (ffi.error, TypeError) as exc:
            raise errors.UsageError(f"unknown struct type {ctype!r}: {exc}") from None
        if nbytes is None:
            nbytes = struct_size
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise errors.UsageError(f"nbytes must be a non-negative integer, not {nbytes!r}")
        self.ctype = ctype
        self.nbytes = nbytes
        self._backing = bytearray(max(nbytes, struct_size))
        self._view = ffi.from_buffer(f"{ctype} *", self._backing, require_writable=True)
        size_field = self.size_field
        if size_field is not None:
            self.set(**{size_field: nbytes})
        self.set(**fields)

    @property
    def size_field(self) -> str | None:
        """``"argsz"`` or ``"size"``, the field the kernel versions the struct by."""
        names = {name for name, _ in ffi.typeof(self.ctype).fields or ()}
        # argsz first: some VFIO structs also have a "size" that is not theirs
        return next((name for name in ("argsz", "size") if name in names), None)

    @property
    def view(self) -> Any:
        """The cffi pointer over the buffer (for arrays and nested fields)."""
        return self._view

    def set(self, **fields: Any) -> "Struct":
        """Assign fields by name (bytes to char arrays); returns self."""
        for name, value in fields.items():
            try:
                setattr(self._view, name, value)
            except (AttributeError, TypeError, OverflowError, IndexError) as exc:
                raise errors.UsageError(f"{self.ctype}.{name} = {value!r}: {exc}") from None
        return self

    def get(self, name: str) -> Any:
        """A field's value as the kernel left it (ints as int, char arrays as bytes)."""
        try:
            value = getattr(self._view, name)
        except AttributeError as exc:
            raise errors.UsageError(f"{self.ctype} has no field {name!r}") from exc
        if isinstance(value, ffi.CData) and ffi.typeof(value).kind == "array":
            if ffi.typeof(value).item.cname == "char":
                return ffi.string(value)
        return value

    def offset(self, name: str) -> int:
        return int(ffi.offsetof(self.ctype, name))

    def tail(self, data: bytes, at: int | None = None) -> "Struct":
        """Write ``data`` into the buffer at ``at`` (default: just past the
        declared struct), e.g. a non-zero byte in a grown struct's tail."""
        start = ffi.sizeof(self.ctype) if at is None else at
        if start < 0 or start + len(data) > len(self._backing):
            raise errors.UsageError(f"{len(data)} bytes at {start} do not fit the "
                                    f"{len(self._backing)}-byte buffer")
        self._backing[start:start + len(data)] = data
        return self

    @property
    def buffer(self) -> memoryview:
        """The ``nbytes`` bytes the kernel is sent (writable, live)."""
        return memoryview(self._backing)[:self.nbytes]

    def __bytes__(self) -> bytes:
        return bytes(self.buffer)

    def __repr__(self) -> str:
        size_field = self.size_field
        size = f", {size_field}={getattr(self._view, size_field)}" if size_field else ""
        return f"<Struct {self.ctype} nbytes={self.nbytes}{size}>"


def offsetofend(ctype: str, field: str) -> int:
    """Where ``field`` of ``ctype`` ends: the size of a struct's version that
    ends at that field (the kernel's ``min_size``)."""
    try:
        member = dict(ffi.typeof(ctype).fields or ())[field]
    except (ffi.error, KeyError, TypeError) as exc:
        raise errors.UsageError(f"{ctype} has no field {field!r}: {exc}") from None
    return int(member.offset + ffi.sizeof(member.type))


def request_of(name: str) -> int:
    """The request number of an ioctl declared in include-bindings (e.g.
    ``"IOMMU_IOAS_ALLOC"``); any other integer can be sent as well."""
    try:
        return _ioctl.const(name)
    except (ffi.error, AttributeError, KeyError) as exc:
        raise errors.UsageError(f"no constant {name!r} in include-bindings: {exc}") from None


def open_device(path: str, *, backend: Backend | None = None) -> int:
    """Open ``path`` (``/dev/iommu``, a VFIO cdev, ``/dev/liveupdate``)
    through the backend seam; the caller owns and closes the fd
    (``backend.close(fd)``). Errors are the backend's ``OSError``."""
    return get_backend(backend).open(path)


def ioctl(fd: int, request: int | str | _ioctl.IoctlDef, arg: Struct | Any = None, *,
          backend: Backend | None = None, check: bool = False, interface: str | None = None) -> Result:
    """Send ``arg`` as it is with ``request`` on ``fd`` through the backend seam.

    ``request`` is a number, a constant's name or an :class:`~pyiommufd.ioctl.IoctlDef`.
    ``arg`` is a :class:`Struct` (its ``nbytes`` bytes go), any writable
    buffer (``bytearray``, ``memoryview``, a cffi buffer), an ``int`` (passed
    by value, the legacy VFIO style) or None (value 0).

    Returns the kernel's :class:`Result`. With ``check=True`` a failure
    raises the typed error instead (:class:`~pyiommufd.errors.KernelError`
    subclasses, as the object model raises them); its interface is the
    IoctlDef's, else ``interface`` (default ``"iommufd"``)."""
    be = get_backend(backend)
    idef: _ioctl.IoctlDef | None = request if isinstance(request, _ioctl.IoctlDef) else None
    number = idef.request if idef is not None else request_of(request) if isinstance(request, str) else request
    if isinstance(number, bool) or not isinstance(number, int):
        raise errors.UsageError(f"an ioctl request is an int, a name or an IoctlDef, not {request!r}")
    try:
        if arg is None or (isinstance(arg, int) and not isinstance(arg, bool)):
            value = be.ioctl_int(fd, number, arg or 0)
        else:
            value = be.ioctl(fd, number, _writable(arg))
    except OSError as exc:
        if check:
            if idef is None:
                name = request if isinstance(request, str) else f"ioctl {number:#x}"
                idef = _ioctl.IoctlDef(name, number, None, interface or "iommufd")
            raise _ioctl.failure(exc, idef) from None
        return Result(-1, exc.errno or _errno.EIO)
    return Result(int(value or 0), 0)


def _writable(arg: Any) -> Any:
    if isinstance(arg, Struct):
        return arg.buffer
    try:
        view = memoryview(arg)
    except TypeError:
        raise errors.UsageError(f"an ioctl argument is a Struct, a writable buffer or an int, "
                                f"not {type(arg).__name__}") from None
    if view.readonly:
        raise errors.UsageError("the ioctl argument is read-only: the kernel could not write its "
                                "answer (use a bytearray or a Struct)")
    return arg
