"""The one ioctl layer every interface module uses.

* :class:`IoctlDef` names an ioctl: request number, argument struct, the
  interface it belongs to and its size field (``size`` for iommufd and LUO,
  ``argsz`` for VFIO).
* :func:`call` allocates the struct, fills the size field, issues the ioctl
  through the backend seam and turns errno into a typed error.
* :func:`call_growing` does the EMSGSIZE two-call pattern (IOVA_RANGES,
  HW_INFO): the kernel reports how many entries it has, we grow and retry.
* :func:`call_with_caps` and :func:`walk_caps` handle VFIO's argsz-extended
  replies and capability chains, generically.

Every iommufd, VFIO-cdev and LUO command is ``_IO(type, nr)``: the request
carries neither size nor direction, so the struct's own size field is the
only version signal the kernel gets.
"""
from __future__ import annotations

import errno as E
from dataclasses import dataclass
from typing import Iterator, Mapping

from . import errors
from ._uapi import ffi
from .backend import Backend

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS


def IO(type_: int, nr: int) -> int:
    """``_IO(type, nr)``: no direction, no size."""
    return (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)


def ioc_nr(request: int) -> int:
    return (request >> _IOC_NRSHIFT) & ((1 << _IOC_NRBITS) - 1)


def ioc_type(request: int) -> int:
    return (request >> _IOC_TYPESHIFT) & ((1 << _IOC_TYPEBITS) - 1)


def const(name: str) -> int:
    """An integer constant (``#define`` or enum value) from include-bindings."""
    return ffi.integer_const(name)


# How an ioctl takes its argument.
ARG_STRUCT = "struct"   # pointer to a struct with a size/argsz field
ARG_VALUE = "value"     # an integer passed by value (legacy VFIO)
ARG_NONE = "none"       # no argument


@dataclass(frozen=True)
class IoctlDef:
    name: str
    request: int
    struct: str | None
    interface: str
    size_field: str | None = "size"
    arg: str = ARG_STRUCT

    @property
    def nr(self) -> int:
        return ioc_nr(self.request)

    @property
    def struct_size(self) -> int:
        return ffi.sizeof(self.struct) if self.struct else 0


REGISTRY: dict[str, IoctlDef] = {}


def define(name: str, struct: str | None, interface: str, *, size_field: str | None = None,
           arg: str = ARG_STRUCT, request: int | None = None) -> IoctlDef:
    """Declare an ioctl whose request number is the include-bindings constant ``name``."""
    if size_field is None and arg == ARG_STRUCT:
        size_field = "argsz" if interface == "vfio" else "size"
    idef = IoctlDef(name, const(name) if request is None else request, struct, interface,
                    size_field, arg)
    REGISTRY.setdefault(name, idef)
    return idef


def new(idef: IoctlDef | str, extra: int = 0, **fields):
    """Allocate ``idef``'s struct (plus ``extra`` trailing bytes), zeroed,
    with its size field set and ``fields`` assigned."""
    struct = idef if isinstance(idef, str) else idef.struct
    size_field = None if isinstance(idef, str) else idef.size_field
    base = ffi.sizeof(struct)
    if extra:
        # from_buffer keeps the bytearray alive as long as the pointer lives
        arg = ffi.from_buffer(f"{struct} *", bytearray(base + extra), require_writable=True)
    else:
        arg = ffi.new(f"{struct} *")
    if size_field:
        setattr(arg, size_field, base + extra)
    for key, value in fields.items():
        setattr(arg, key, value)
    return arg


def buffer_of(arg, length: int | None = None):
    """The writable bytes the kernel sees for ``arg``."""
    if length is None:
        length = ffi.sizeof(ffi.typeof(arg).item)
        size = _declared_size(arg)
        if size is not None:
            length = max(length, size)
    return ffi.buffer(arg, length)


def _declared_size(arg) -> int | None:
    # argsz first: VFIO structs such as vfio_region_info and
    # vfio_iommu_type1_dma_map also have a "size" field that is not theirs.
    for name in ("argsz", "size"):
        try:
            return int(getattr(arg, name))
        except AttributeError:
            continue
    return None


def invoke_raw(backend: Backend, fd: int, idef: IoctlDef, buf, *,
               context: Mapping[str, object] | None = None, detail: str | None = None) -> int:
    """Issue ``idef`` with a raw writable buffer and return the syscall's own
    result (a new fd for VFIO_GROUP_GET_DEVICE_FD and the DMA_BUF feature)."""
    try:
        return int(backend.ioctl(fd, idef.request, buf) or 0)
    except errors.KernelError:
        raise
    except OSError as exc:
        raise errors.from_oserror(exc, idef.name, idef.interface, context=context,
                                  detail=detail) from None


def invoke(backend: Backend, fd: int, idef: IoctlDef, arg=None, *,
           context: Mapping[str, object] | None = None, detail: str | None = None):
    """Issue ``idef`` on ``fd`` with ``arg`` (a cdata struct pointer, an int for
    value-style ioctls, or None). Returns ``arg`` for structs, else the result."""
    if idef.arg == ARG_STRUCT:
        invoke_raw(backend, fd, idef, buffer_of(arg), context=context, detail=detail)
        return arg
    try:
        return backend.ioctl_int(fd, idef.request, 0 if arg is None else int(arg))
    except OSError as exc:
        raise errors.from_oserror(exc, idef.name, idef.interface, context=context,
                                  detail=detail) from None


def call(backend: Backend, fd: int, idef: IoctlDef, /, *, context: Mapping[str, object] | None = None,
         detail: str | None = None, **fields):
    """Allocate, fill, issue; return the struct as the kernel left it.

    ``backend``, ``fd`` and ``idef`` are positional-only, so struct fields
    named ``fd`` (IOMMU_IOAS_MAP_FILE, LIVEUPDATE_SESSION_PRESERVE_FD) can be
    passed as keywords."""
    if idef.arg != ARG_STRUCT:
        return invoke(backend, fd, idef, fields.get("value"), context=context, detail=detail)
    return invoke(backend, fd, idef, new(idef, **fields), context=context, detail=detail)


def call_growing(backend: Backend, fd: int, idef: IoctlDef, /, *, count_field: str, ptr_field: str,
                 elem_type: str, initial: int = 8, max_tries: int = 8, **fields):
    """EMSGSIZE two-call pattern: pass an array of ``initial`` entries; if the
    kernel answers EMSGSIZE it has written the needed count into
    ``count_field``; grow to that and call again. Returns ``(struct, list)``.
    """
    count = initial
    for _ in range(max_tries):
        array = ffi.new(f"{elem_type}[]", max(count, 1))
        arg = new(idef, **fields)
        setattr(arg, count_field, count)
        setattr(arg, ptr_field, int(ffi.cast("uintptr_t", array)))
        try:
            invoke(backend, fd, idef, arg)
        except errors.MessageSize:
            needed = int(getattr(arg, count_field))
            if needed <= count:
                raise
            count = needed
            continue
        got = int(getattr(arg, count_field))
        return arg, [array[i] for i in range(min(got, count))]
    raise errors.make_error(idef.name, idef.interface, E.EMSGSIZE,
                            detail="the array kept growing between calls")


def call_with_caps(backend: Backend, fd: int, idef: IoctlDef, /, **fields):
    """VFIO argsz-extended call: if the kernel says it needs a larger argsz
    (capability chain), reallocate and call again. Returns ``(struct, bytes)``
    where ``bytes`` is the whole reply including the capability area."""
    arg = call(backend, fd, idef, **fields)
    base = ffi.sizeof(idef.struct)
    needed = int(arg.argsz)
    if needed <= base:
        return arg, bytes(ffi.buffer(arg, base))
    arg = new(idef, extra=needed - base, **fields)
    invoke(backend, fd, idef, arg)
    return arg, bytes(ffi.buffer(arg, needed))


@dataclass(frozen=True)
class Capability:
    """One entry of a VFIO capability chain (``struct vfio_info_cap_header``)."""

    id: int
    version: int
    offset: int
    data: bytes  # from the header's start to the next entry (or the end)

    def view(self, struct: str):
        """Decode this capability as ``struct`` (a copy, bounds-checked)."""
        size = ffi.sizeof(struct)
        if size > len(self.data):
            raise errors.UsageError(f"capability {self.id} is {len(self.data)} bytes, {struct} needs {size}")
        holder = ffi.new("char[]", self.data)
        return ffi.cast(f"{struct} *", holder), holder


def walk_caps(reply: bytes, first_offset: int) -> Iterator[Capability]:
    """Walk a VFIO capability chain in ``reply`` starting at ``first_offset``.
    Offsets are from the start of the reply; 0 ends the chain. Loops and
    out-of-range offsets raise instead of hanging or reading garbage."""
    header = ffi.sizeof("struct vfio_info_cap_header")
    seen: set[int] = set()
    offset = first_offset
    while offset:
        if offset in seen:
            raise errors.UsageError(f"VFIO capability chain loops at offset {offset}")
        if offset < 0 or offset + header > len(reply):
            raise errors.UsageError(f"VFIO capability offset {offset} is outside the {len(reply)}-byte reply")
        seen.add(offset)
        hdr = ffi.from_buffer("struct vfio_info_cap_header *", reply[offset:offset + header])
        nxt = int(hdr.next)
        end = nxt if nxt > offset else len(reply)
        yield Capability(int(hdr.id), int(hdr.version), offset, reply[offset:end])
        offset = nxt
