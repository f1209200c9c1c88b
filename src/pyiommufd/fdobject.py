"""Ownership of one file descriptor, shared by every fd-backed object."""
from __future__ import annotations

from .backend import Backend, get_backend
from .errors import UsageError


class FdObject:
    """Owns ``fd`` (unless ``owned=False``) and closes it through the backend.

    ``detach()`` gives the fd away, e.g. to a VMM that inherits it; after
    that the object no longer closes it and may not be used.
    """

    kind = "file"

    def __init__(self, fd: int, *, backend: Backend | None = None, owned: bool = True):
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            raise UsageError(f"not a file descriptor: {fd!r}")
        self._fd: int | None = fd
        self._owned = owned
        self.backend = get_backend(backend)

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise UsageError(f"{type(self).__name__} is closed or detached")
        return self._fd

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def detach(self) -> int:
        """Stop owning the fd and return it."""
        fd = self.fd
        self._fd = None
        return fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and self._owned:
            self.backend.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else f"fd={self._fd}"
        return f"<{type(self).__name__} {state}>"


def fd_of(obj) -> int:
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
    return fileno()
