"""The fake kernel's host files (:class:`pyiommufd.hostfs.HostFiles`).

``/sys``, ``/proc`` and ``/dev`` are the kernel's: served from its model
(:mod:`.sysfs`), with a write's side effects (bind, unbind,
driver_override, remove). Every other path lives in a temporary directory
tree of this fake's own, made on first use and removed when the fake shuts
down or is collected: ``/boot`` as the kernel's package left it (see
:meth:`FakeHostFiles.install`), and what a test puts there with
:meth:`FakeHostFiles.put`. Nothing of the real host's is ever read or
written, by these methods or by the fake's ``open(2)``.
"""
from __future__ import annotations

import errno as E
import os
import posixpath
import re
import shutil
import tempfile
import weakref
from typing import TYPE_CHECKING, Callable, Protocol, TypeVar

from pyiommufd.backend import oserror

from .sysfs import FakeFs, is_kernel_path

if TYPE_CHECKING:   # pragma: no cover
    from .boot import Boot


class _Kernel(Protocol):
    """What the host files need of :class:`~.kernel.FakeKernel` (not
    imported: the kernel module imports this one)."""

    @property
    def fs(self) -> FakeFs: ...
    @property
    def boot(self) -> Boot: ...


T = TypeVar("T")


def _remove_tree(root: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:        # a forked child that exits leaves its parent's tree alone
        shutil.rmtree(root, ignore_errors=True)


class FakeHostFiles:
    def __init__(self, kernel: _Kernel) -> None:
        self._kernel: _Kernel = weakref.proxy(kernel)
        self._root: str | None = None
        self._removal: weakref.finalize[[str, int], FakeHostFiles] | None = None
        self._closed = False
        #: path -> content of what the kernel's packages installed, for a tree made later
        self._installed: dict[str, bytes] = {}

    # -- the tree of unmodelled paths --------------------------------------------------------
    @property
    def root(self) -> str:
        """The temporary directory that stands for ``/`` outside the kernel's paths."""
        if self._closed:
            raise RuntimeError("this FakeKernel was shut down: its host files are gone")
        if self._root is None:
            self._root = tempfile.mkdtemp(prefix="pyiommufd-fake-root-")
            self._removal = weakref.finalize(self, _remove_tree, self._root, os.getpid())
            for path, data in self._installed.items():
                self._write(path, data, 0o644)
        return self._root

    def close(self) -> None:
        """Remove the tree: the kernel is shut down. Its own paths still answer."""
        self._closed = True
        if self._removal is not None:
            self._removal()

    def install(self, contents: dict[str, bytes]) -> None:
        """Files a kernel package puts on the disk (``/boot``): written now if
        the tree exists, else when it is made (most fakes never look)."""
        self._installed.update(contents)
        if self._root is not None and not self._closed:
            for path, data in contents.items():
                self._write(path, data, 0o644)

    def fake_path_of(self, real: str) -> str:
        """A real path as the fake host sees it (a file of the tree loses the root)."""
        if self._root is not None and (real == self._root or real.startswith(self._root + "/")):
            return real[len(self._root):] or "/"
        return real

    def open_in_tree(self, path: str, flags: int) -> int:
        """``open(2)`` of a path outside the kernel's: a real fd of the tree's file."""
        try:
            local = self._unmodelled(path)
            if local is None:
                raise oserror(E.ENOENT, path)
            return os.open(local, flags)
        except OSError as exc:
            raise oserror(exc.errno or E.EIO, path) from None

    def _local(self, path: str) -> str:
        if not path.startswith("/"):
            raise oserror(E.ENOENT, path)     # the library names host files absolutely
        return self.root + posixpath.normpath(path)

    def put(self, path: str, data: str | bytes, mode: int = 0o644) -> None:
        """Make ``path`` (outside the kernel's paths) hold ``data``."""
        if is_kernel_path(path):
            raise ValueError(f"{path} is the fake kernel's to model, not a test's to put")
        self._write(path, data.encode() if isinstance(data, str) else data, mode)

    def _write(self, path: str, data: bytes, mode: int) -> None:
        local = self._local(path)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as f:
            f.write(data)
        os.chmod(local, mode)

    def _unmodelled(self, path: str) -> str | None:
        """Where an unmodelled ``path`` is, or None while there is no tree to look in."""
        if self._closed or (self._root is None and not self._installed and path.startswith("/")):
            return None
        return self._local(path)

    def _serve(self, path: str, modelled: Callable[[str], T], in_tree: Callable[[str], T]) -> T:
        """``modelled(path)`` for the kernel's paths, else ``in_tree`` on the
        path's place in the tree; an error names ``path`` as the caller gave it."""
        try:
            if is_kernel_path(path):
                return modelled(path)
            local = self._unmodelled(path)
            if local is None:
                raise oserror(E.ENOENT, path)
            return in_tree(local)
        except OSError as exc:
            raise oserror(exc.errno or E.EIO, path) from None

    # -- HostFiles ----------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        if is_kernel_path(path):
            return self._kernel.fs.exists(path)
        local = self._unmodelled(path)
        return local is not None and os.path.exists(local)

    def is_dir(self, path: str) -> bool:
        if is_kernel_path(path):
            return self._kernel.fs.is_dir(path)
        local = self._unmodelled(path)
        return local is not None and os.path.isdir(local)

    def read_bytes(self, path: str) -> bytes:
        return self._serve(path, self._kernel.fs.read_bytes, _read_file)

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode()

    def write_text(self, path: str, text: str) -> None:
        if not is_kernel_path(path):
            # only the kernel's files are written through here (sysfs attributes)
            raise oserror(E.EROFS, path)
        try:
            self._kernel.fs.write_text(path, text)
        except OSError as exc:
            raise oserror(exc.errno or E.EIO, path) from None

    def listdir(self, path: str) -> list[str]:
        return self._serve(path, self._kernel.fs.listdir, lambda local: sorted(os.listdir(local)))

    def readlink(self, path: str) -> str:
        own_fd = re.fullmatch(r"/proc/self/fd/(\d+)", path)
        if own_fd:
            # Linux knows every fd, also one that came by SCM_RIGHTS: the fake learns it now
            self._kernel.boot.table.lookup(int(own_fd[1]))
        return self._serve(path, self._kernel.fs.readlink, lambda local: os.readlink(local))

    def realpath(self, path: str) -> str:
        if is_kernel_path(path):
            return self._kernel.fs.realpath(path)
        local = self._unmodelled(path)
        if local is None:
            return posixpath.normpath(path)
        return self.fake_path_of(os.path.realpath(local))


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
