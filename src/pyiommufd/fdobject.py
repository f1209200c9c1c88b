"""Ownership of one file descriptor, shared by every fd-backed object."""
from __future__ import annotations

import enum
import errno as E
import os
from typing import TYPE_CHECKING, Any, ClassVar, Self

from . import errors, ioctl
from .backend import Backend, get_backend
from .errors import UsageError

if TYPE_CHECKING:
    from _typeshed import HasFileno


class FileKind(enum.StrEnum):
    """What kind of file an fd is: the one vocabulary of the objects, the
    agent, its messages and the manifest. The values are stable (the manifest
    and the agent protocol carry them); :attr:`description` is for prose."""

    MEMFD = "memfd"
    IOMMUFD = "iommufd"
    VFIO_CDEV = "vfio-cdev"
    VFIO_GROUP = "vfio-group"
    VFIO_CONTAINER = "vfio-container"
    LIVEUPDATE = "liveupdate"
    LUO_SESSION = "luo-session"
    #: token 0 of a pyiommufd session: a sealed memfd holding the manifest
    MANIFEST = "manifest"
    OTHER = "other"

    @property
    def description(self) -> str:
        """The kind in a sentence: "a memfd", "a VFIO device cdev"..."""
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    FileKind.MEMFD: "a memfd", FileKind.IOMMUFD: "an iommufd", FileKind.VFIO_CDEV: "a VFIO device cdev",
    FileKind.VFIO_GROUP: "a VFIO group", FileKind.VFIO_CONTAINER: "a VFIO container",
    FileKind.LIVEUPDATE: "/dev/liveupdate", FileKind.LUO_SESSION: "a LUO session",
    FileKind.MANIFEST: "the pyiommufd manifest", FileKind.OTHER: "some other file",
}


def open_path(backend: Backend, path: str, op: str, interface: str) -> int:
    """``open(path, O_RDWR|O_CLOEXEC)`` with the failure as a typed error."""
    try:
        return backend.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.make_error(op, interface, exc.errno or E.EIO, detail=path) from None


class FdObject:
    """Owns ``fd`` (unless ``owned=False``) and closes it through the backend.

    ``detach()`` gives the fd away, e.g. to a VMM that inherits it; after
    that the object no longer closes it and may not be used. Subclasses whose
    fds may safely close when garbage-collected set ``close_on_gc``; LUO
    handles never do, because closing a session unpreserves it.
    """

    kind: ClassVar[FileKind] = FileKind.OTHER
    _what = "file"
    close_on_gc = False

    def __init__(self, fd: int, *, backend: Backend | None = None, owned: bool = True):
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            raise UsageError(f"not a file descriptor: {fd!r}")
        self._fd: int | None = fd
        self._owned = owned
        self.backend = get_backend(backend)

    @property
    def owned(self) -> bool:
        return self._owned

    def fileno(self) -> int:
        if self._fd is None:
            raise UsageError(f"the {self._what} is closed or detached")
        return self._fd

    @property
    def fd(self) -> int:
        return self.fileno()

    @property
    def closed(self) -> bool:
        return self._fd is None

    def detach(self) -> int:
        """Stop owning the fd and return it."""
        fd = self.fileno()
        self._fd = None
        return fd

    def _on_close(self) -> None:
        """Hook run before the fd is closed."""

    def close(self) -> None:
        """Close the fd (when owned). Idempotent."""
        if self._fd is None:
            return
        self._on_close()
        fd, self._fd = self._fd, None
        if self._owned:
            self.backend.close(fd)

    def __del__(self) -> None:
        if self.close_on_gc and getattr(self, "_fd", None) is not None and self._owned:
            try:
                self.close()
            except Exception:  # noqa: BLE001 - never raise from a finalizer
                pass

    def _call(self, idef: ioctl.IoctlDef, *, context: ioctl.Context = None, detail: ioctl.Detail = None,
              **fields: Any) -> ioctl.CData:
        return ioctl.call(self.backend, self.fileno(), idef, context=context, detail=detail, **fields)

    def _invoke(self, idef: ioctl.IoctlDef, arg: ioctl.CData, *, context: ioctl.Context = None,
                detail: ioctl.Detail = None) -> Any:
        return ioctl.invoke(self.backend, self.fileno(), idef, arg, context=context, detail=detail)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else f"fd={self._fd}"
        return f"<{type(self).__name__} {state}>"


def fd_of(obj: int | HasFileno) -> int:
    """The fd number of an int or of an object with ``fileno()``."""
    if isinstance(obj, bool):
        raise UsageError(f"not a file descriptor: {obj!r}")
    if isinstance(obj, int):
        if obj < 0:
            raise UsageError(f"not a file descriptor: {obj}")
        return obj
    fileno = getattr(obj, "fileno", None)
    if fileno is None:
        raise UsageError(f"{type(obj).__name__} has no file descriptor")
    fd: int = fileno()
    return fd
