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
from typing import Any, Callable, Iterator, Mapping

from . import errors
from ._record import record
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
    return int(ffi.integer_const(name))


# How an ioctl takes its argument.
ARG_STRUCT = "struct"   # pointer to a struct with a size/argsz field
ARG_VALUE = "value"     # an integer passed by value (legacy VFIO)
ARG_NONE = "none"       # no argument

# cffi ships no types: a cdata (struct pointer, array) or buffer is Any.
CData = Any
# Error context and detail, or callables that make them only on failure.
Context = Mapping[str, object] | Callable[[], Mapping[str, object]] | None
Detail = str | Callable[[], str] | None


class IoctlDef:
    """One ioctl: request number, argument struct, interface, size field.

    Immutable. The cffi types are built once, by :meth:`prepare` (objects
    call it when they open, so the first call costs no more than the rest),
    or on first use. :meth:`take` and :meth:`give` lend out preallocated
    argument structs for hot paths (see the rule there)."""

    __slots__ = ("name", "request", "struct", "interface", "size_field", "arg",
                 "_ptype", "_size", "_template", "_free")
    name: str
    request: int
    struct: str | None
    interface: str
    size_field: str | None
    arg: str
    _ptype: Any  # the cffi pointer type, once built
    _size: int
    _template: bytes
    _free: list[tuple[Any, Any]]  # (struct, buffer) pairs to lend out

    def __init__(self, name: str, request: int, struct: str | None, interface: str,
                 size_field: str | None = "size", arg: str = ARG_STRUCT):
        setattr_ = object.__setattr__
        setattr_(self, "name", name)
        setattr_(self, "request", request)
        setattr_(self, "struct", struct)
        setattr_(self, "interface", interface)
        setattr_(self, "size_field", size_field)
        setattr_(self, "arg", arg)
        setattr_(self, "_ptype", None)
        setattr_(self, "_size", 0)
        setattr_(self, "_template", b"")
        setattr_(self, "_free", [])

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"IoctlDef is immutable: cannot set {name!r}")

    def _key(self) -> tuple[object, ...]:
        return (self.name, self.request, self.struct, self.interface, self.size_field, self.arg)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"IoctlDef(name={self.name!r}, request={self.request!r}, struct={self.struct!r}, "
                f"interface={self.interface!r}, size_field={self.size_field!r}, arg={self.arg!r})")

    @property
    def nr(self) -> int:
        return ioc_nr(self.request)

    @property
    def struct_size(self) -> int:
        return ffi.sizeof(self.struct) if self.struct else 0

    def prepare(self) -> "IoctlDef":
        """Build the cffi pointer type, the size and a zeroed template with
        the size field set. Idempotent; returns self."""
        if self._ptype is None and self.struct is not None and self.arg == ARG_STRUCT:
            ptype = ffi.typeof(f"{self.struct} *")
            size = ffi.sizeof(ptype.item)
            probe = ffi.new(ptype)
            if self.size_field:
                setattr(probe, self.size_field, size)
            object.__setattr__(self, "_template", bytes(ffi.buffer(probe)))
            object.__setattr__(self, "_size", size)
            object.__setattr__(self, "_ptype", ptype)
        return self

    def fresh(self) -> CData:
        """A new zeroed struct with its size field set (a cdata pointer)."""
        ptype = self._ptype
        if ptype is None:
            ptype = self.prepare()._ptype
        arg = ffi.new(ptype)
        if self.size_field:
            setattr(arg, self.size_field, self._size)
        return arg

    # Preallocated structs for hot paths. The rule: a struct taken is owned by
    # exactly one call until that call gives it back, so threads and
    # re-entrant calls never share one (list.pop/append are atomic under the
    # GIL; an empty pool allocates). take() returns it zeroed with the size
    # set; give it back only after every output field has been read, and
    # never hand it (or its buffer) to the caller. A call that raises simply
    # does not give it back.
    def take(self) -> tuple[CData, CData]:
        """``(struct, buffer)`` from the pool, zeroed, size field set."""
        try:
            arg, buf = self._free.pop()
        except IndexError:
            arg = self.fresh()
            return arg, ffi.buffer(arg)
        buf[:] = self._template
        return arg, buf

    def give(self, pair: tuple[CData, CData]) -> None:
        self._free.append(pair)

    # Bulk calls build every struct first, in one array, then only issue.
    def array(self, n: int) -> CData:
        """``n`` zeroed structs in one allocation, each with its size field set."""
        if self._ptype is None:
            self.prepare()
        array = ffi.new(f"{self.struct}[]", n)
        if n and self.size_field:
            ffi.buffer(array)[:] = self._template * n
        return array

    def buffers(self, array: CData, n: int) -> list[CData]:
        """The buffer of each struct of :meth:`array`."""
        return [ffi.buffer(array + i) for i in range(n)]


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


def prepare(*idefs: IoctlDef) -> None:
    """Build the types of ``idefs`` now (when a device opens), not on first call."""
    for idef in idefs:
        if idef._ptype is None:
            idef.prepare()


def new(idef: IoctlDef | str, extra: int = 0, **fields: Any) -> CData:
    """Allocate ``idef``'s struct (plus ``extra`` trailing bytes), zeroed,
    with its size field set and ``fields`` assigned."""
    struct: str | None
    if isinstance(idef, str):
        struct, size_field = idef, None
    else:
        if not extra:
            arg = idef.fresh()
            for key, value in fields.items():
                setattr(arg, key, value)
            return arg
        struct, size_field = idef.struct, idef.size_field
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


def buffer_of(arg: CData, length: int | None = None) -> CData:
    """The writable bytes the kernel sees for ``arg``."""
    if length is None:
        length = ffi.sizeof(ffi.typeof(arg).item)
        size = _declared_size(arg)
        if size is not None:
            length = max(length, size)
    return ffi.buffer(arg, length)


def _declared_size(arg: CData) -> int | None:
    # argsz first: VFIO structs such as vfio_region_info and
    # vfio_iommu_type1_dma_map also have a "size" field that is not theirs.
    item = ffi.typeof(arg).item
    names = {name for name, _ in item.fields or ()} if item.kind == "struct" else ()
    for name in ("argsz", "size"):
        if name in names:
            return int(getattr(arg, name))
    return None


def raw_ioctl(backend: Backend) -> Callable[[int, int, CData], Any]:
    """The function the hot paths call as ``f(fd, request, buffer)``, as the
    backend provides it (:meth:`Backend.ioctl_function`): the seam stays the
    backend's, and the real one hands out ``fcntl.ioctl`` itself."""
    return backend.ioctl_function()


def failure(exc: OSError, idef: IoctlDef, context: Context = None,
            detail: Detail = None) -> errors.KernelError:
    """The typed error for ``idef`` failing with ``exc``. ``context`` and
    ``detail`` may be callables, run only here: error context costs nothing
    on success."""
    if isinstance(exc, errors.KernelError):
        return exc
    if callable(context):
        context = context()
    if callable(detail):
        detail = detail()
    return errors.from_oserror(exc, idef.name, idef.interface, context=context, detail=detail)


def issue(backend: Backend, fd: int, idef: IoctlDef, buf: CData, context: Context = None,
          detail: Detail = None) -> int:
    """``backend.ioctl`` with the failure typed; the hot paths' one layer."""
    try:
        return backend.ioctl(fd, idef.request, buf)
    except errors.KernelError:
        raise
    except OSError as exc:
        raise failure(exc, idef, context, detail) from None


def invoke_raw(backend: Backend, fd: int, idef: IoctlDef, buf: CData, *,
               context: Context = None, detail: Detail = None) -> int:
    """Issue ``idef`` with a raw writable buffer and return the syscall's own
    result (a new fd for VFIO_GROUP_GET_DEVICE_FD and the DMA_BUF feature)."""
    return int(issue(backend, fd, idef, buf, context, detail) or 0)


def _struct_buffer(idef: IoctlDef, arg: CData) -> CData:
    """The bytes of ``arg``: the struct, or more when its size field says so
    (argsz-extended VFIO replies, trailing arrays)."""
    ptype = idef._ptype
    if ptype is not None and ffi.typeof(arg) is ptype:
        if idef.size_field and getattr(arg, idef.size_field) > idef._size:
            return ffi.buffer(arg, getattr(arg, idef.size_field))
        return ffi.buffer(arg)
    return buffer_of(arg)


def invoke(backend: Backend, fd: int, idef: IoctlDef, arg: CData = None, *,
           context: Context = None, detail: Detail = None) -> Any:
    """Issue ``idef`` on ``fd`` with ``arg`` (a cdata struct pointer, an int for
    value-style ioctls, or None). Returns ``arg`` for structs, else the result."""
    if idef.arg == ARG_STRUCT:
        issue(backend, fd, idef, _struct_buffer(idef, arg), context, detail)
        return arg
    try:
        return backend.ioctl_int(fd, idef.request, 0 if arg is None else int(arg))
    except OSError as exc:
        raise failure(exc, idef, context, detail) from None


def call(backend: Backend, fd: int, idef: IoctlDef, /, *, context: Context = None,
         detail: Detail = None, **fields: Any) -> CData:
    """Allocate, fill, issue; return the struct as the kernel left it.

    ``backend``, ``fd`` and ``idef`` are positional-only, so struct fields
    named ``fd`` (IOMMU_IOAS_MAP_FILE, LIVEUPDATE_SESSION_PRESERVE_FD) can be
    passed as keywords. ``context`` and ``detail`` may be callables (run
    only on failure)."""
    if idef.arg != ARG_STRUCT:
        return invoke(backend, fd, idef, fields.get("value"), context=context, detail=detail)
    arg = idef.fresh()
    for key, value in fields.items():
        setattr(arg, key, value)
    # a caller may set the size field itself (a grown or a probe size)
    buf = _struct_buffer(idef, arg) if idef.size_field in fields else ffi.buffer(arg)
    try:
        backend.ioctl(fd, idef.request, buf)
    except errors.KernelError:
        raise
    except OSError as exc:
        raise failure(exc, idef, context, detail) from None
    return arg


def call_growing(backend: Backend, fd: int, idef: IoctlDef, /, *, count_field: str, ptr_field: str,
                 elem_type: str, initial: int = 8, max_tries: int = 8,
                 **fields: Any) -> tuple[CData, list[CData]]:
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


def call_with_caps(backend: Backend, fd: int, idef: IoctlDef, /,
                   **fields: Any) -> tuple[CData, bytes]:
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


@record(frozen=True)
class Capability:
    """One entry of a VFIO capability chain (``struct vfio_info_cap_header``)."""

    id: int
    version: int
    offset: int
    data: bytes  # from the header's start to the next entry (or the end)

    def view(self, struct: str) -> tuple[CData, CData]:
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
