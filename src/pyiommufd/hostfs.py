"""Host files: what pyiommufd reads and writes in sysfs, procfs and /dev as
files, apart from the syscall seam (:mod:`pyiommufd.backend`).

A :class:`~pyiommufd.backend.Backend` carries one :class:`HostFiles` as its
``files``. The real one, :class:`LinuxHostFiles`, is plain file I/O on this
machine; the fake kernel's serves its own tree and nothing of the host's.
Methods raise plain :class:`OSError` with ``errno`` and the path set.
"""
from __future__ import annotations

import os
from typing import Protocol, runtime_checkable


@runtime_checkable
class HostFiles(Protocol):
    """Files of the kernel's pseudo file systems, as the library uses them."""

    def exists(self, path: str) -> bool: ...

    def is_dir(self, path: str) -> bool:
        """``path`` is a directory, or a symlink to one."""
        ...

    def read_text(self, path: str) -> str: ...

    def read_bytes(self, path: str) -> bytes: ...

    def write_text(self, path: str, text: str) -> None:
        """One write(2) of the whole value, as a sysfs attribute wants it."""
        ...

    def listdir(self, path: str) -> list[str]:
        """The entries of ``path``, sorted."""
        ...

    def readlink(self, path: str) -> str: ...

    def realpath(self, path: str) -> str: ...


class LinuxHostFiles:
    """This machine's files."""

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def read_text(self, path: str) -> str:
        with open(path) as f:
            return f.read()

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def write_text(self, path: str, text: str) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def readlink(self, path: str) -> str:
        return os.readlink(path)

    def realpath(self, path: str) -> str:
        return os.path.realpath(path)


__all__ = ["HostFiles", "LinuxHostFiles"]
