"""The fake kernel's file table: ``struct file`` objects behind real fds.

Every fake file is backed by a *real* placeholder fd, so fd numbers are real
and unique, ``os.dup``/SCM_RIGHTS work and a child process can inherit them:

* memfds are real ``memfd_create`` fds (bytes, size, seals, mmap are real);
* ``/dev/iommu``, ``/dev/liveupdate``, LUO sessions, VFIO cdevs... are real,
  otherwise unused memfds named ``pyiommufd-fake:<what>``.

A file is identified by its placeholder's ``(st_dev, st_ino)``. fd numbers
the fake has not seen (an ``os.dup`` done behind its back, an fd received
over a socket) are resolved lazily with ``fstat``; when several open files
share one inode (a memfd re-opened through ``/proc/self/fd``) ``kcmp(2)``
picks the right one.

Each :class:`OpenFile` also keeps one private, close-on-exec duplicate of
its placeholder (``kfd``): the kernel's own reference to the file, used to
read and write a memfd whose user fds are all closed but which LUO or an
IOAS mapping still pins. A file is released when the last fd the fake knows
of is closed (``Backend.close``) and no kernel-side reference remains.
"""
from __future__ import annotations

import ctypes
import errno as E
import mmap as _mmap
import os
from typing import TYPE_CHECKING, Any, Callable, Iterator, Self

from .uaccess import fail

if TYPE_CHECKING:   # pragma: no cover
    from .uaccess import UserMemory

SYS_KCMP = 312          # x86_64
KCMP_FILE = 0
PLACEHOLDER_PREFIX = "pyiommufd-fake:"
F_ADD_SEALS = 1033
F_GET_SEALS = 1034


class Inode:
    """A fake inode, keyed by the placeholder's (st_dev, st_ino)."""

    def __init__(self, key: tuple[int, int]) -> None:
        self.key = key
        self.files: list["OpenFile"] = []


class OpenFile:
    """A ``struct file``. Subclasses implement the file operations."""

    kind = "file"
    #: what ``readlink(/proc/self/fd/N)`` shows
    path = "anon_inode:[fake]"

    def __init__(self) -> None:
        self.table: "FileTable | None" = None
        self.inode: Inode | None = None
        self.kfd = -1
        self.fds: set[int] = set()
        self.krefs = 0
        self.released = False
        self.pos = 0

    # -- reference counting ---------------------------------------------------
    def get(self) -> Self:
        """Take a kernel-side reference (``get_file``)."""
        self.krefs += 1
        return self

    def put(self) -> None:
        """Drop a kernel-side reference (``fput``)."""
        self.krefs -= 1
        assert self.krefs >= 0, self
        self.maybe_release()

    @property
    def users(self) -> int:
        return len(self.fds) + self.krefs

    def maybe_release(self) -> None:
        if self.released or self.users:
            return
        self.released = True
        try:
            self.release()
        finally:
            if self.table is not None:
                self.table.forget(self)

    # -- file operations (overridden) -------------------------------------------
    # Every operation gets the user's fd number too: memfds operate on it
    # directly so that the shared file position behaves like the kernel's.
    def release(self) -> None:
        """``f_op->release``: the last reference is gone."""

    def ioctl(self, fd: int, request: int, buf: Any, mem: UserMemory) -> int:
        """``buf``: the caller's argument buffer, or an int for a by-value ioctl."""
        fail(E.ENOTTY)

    def ioctl_int(self, fd: int, request: int, value: int) -> int:
        """A by-value ioctl: for a struct ioctl the value is a pointer the
        fake cannot follow, so the command's first user access is EFAULT."""
        from .uaccess import UserMemory
        return self.ioctl(fd, request, value, UserMemory())

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        fail(E.EINVAL)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        fail(E.EINVAL)

    def read(self, fd: int, length: int) -> bytes:
        fail(E.EINVAL)

    def write(self, fd: int, data: bytes) -> int:
        fail(E.EINVAL)

    def ftruncate(self, fd: int, length: int) -> None:
        fail(E.EINVAL)

    def fstat_size(self, fd: int) -> int:
        return 0

    def fcntl(self, fd: int, cmd: int, arg: int) -> int:
        import fcntl as _fcntl
        if cmd in (F_ADD_SEALS, F_GET_SEALS):
            fail(E.EINVAL)              # not a shmem/hugetlb file
        return _fcntl.fcntl(fd, cmd, arg)

    def mmap(self, fd: int, length: int, offset: int, prot: int) -> _mmap.mmap:
        fail(E.ENODEV)

    def sibling(self) -> "OpenFile | None":
        """A new open file of the same inode, for a re-open the fake did not
        see; None when the file type cannot be re-opened that way."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} fds={sorted(self.fds)} krefs={self.krefs}>"


class FileTable:
    """fd number -> OpenFile, plus inode bookkeeping."""

    def __init__(self) -> None:
        self.by_fd: dict[int, OpenFile] = {}
        self.inodes: dict[tuple[int, int], Inode] = {}
        self.files: list[OpenFile] = []
        #: called with an unknown real fd; may return an OpenFile to adopt it
        self.adopt: Callable[[int], OpenFile | None] | None = None
        #: fd numbers a previous boot's process still believes it owns (see
        #: FakeKernel.close); new fds the fake creates never take them
        self.avoid: set[int] = set()
        self._libc: ctypes.CDLL | None
        try:
            self._libc = ctypes.CDLL(None, use_errno=True)
            self._libc.syscall.restype = ctypes.c_long
        except OSError:     # pragma: no cover
            self._libc = None
        self._kcmp_works = True

    # -- creation --------------------------------------------------------------
    def placeholder(self, what: str) -> int:
        """A real, otherwise unused memfd standing in for a device file."""
        return os.memfd_create(PLACEHOLDER_PREFIX + what, os.MFD_CLOEXEC)

    def fresh(self, fd: int) -> int:
        """Move a newly created fd off the numbers in :attr:`avoid`."""
        if fd not in self.avoid:
            return fd
        import fcntl as _fcntl
        inheritable = os.get_inheritable(fd)
        moved = _fcntl.fcntl(fd, _fcntl.F_DUPFD_CLOEXEC, max(self.avoid) + 1)
        os.close(fd)
        if inheritable:
            os.set_inheritable(moved, True)
        return moved

    def install(self, file: OpenFile, fd: int, *, adopting: bool = False) -> int:
        """Make ``fd`` (a real, fresh fd) the first fd of the new ``file``."""
        if not adopting:
            fd = self.fresh(fd)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        inode = self.inodes.get(key)
        if inode is None:
            inode = self.inodes[key] = Inode(key)
        file.table = self
        file.inode = inode
        file.kfd = os.dup(fd)           # non-inheritable: the kernel's reference
        inode.files.append(file)
        self.files.append(file)
        self._bind(fd, file)
        return fd

    def _bind(self, fd: int, file: OpenFile) -> None:
        old = self.by_fd.get(fd)
        if old is not None and old is not file:
            old.fds.discard(fd)
        self.by_fd[fd] = file
        file.fds.add(fd)

    def add_fd(self, fd: int, file: OpenFile) -> int:
        """Record a new fd (a dup the fake just made) of an existing file."""
        fd = self.fresh(fd)
        self._bind(fd, file)
        return fd

    def forget(self, file: OpenFile) -> None:
        """The file was released: drop it and close the kernel's reference."""
        for fd in list(file.fds):
            self.by_fd.pop(fd, None)
        file.fds.clear()
        if file.kfd >= 0:
            try:
                os.close(file.kfd)
            except OSError:
                pass
            file.kfd = -1
        if file in self.files:
            self.files.remove(file)
        if file.inode is not None:
            if file in file.inode.files:
                file.inode.files.remove(file)
            if not file.inode.files:
                self.inodes.pop(file.inode.key, None)

    # -- lookup ------------------------------------------------------------------
    def _key_of(self, fd: int) -> tuple[int, int] | None:
        try:
            st = os.fstat(fd)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _same_file(self, fd: int, file: OpenFile) -> bool | None:
        """kcmp(KCMP_FILE): None when kcmp is unavailable."""
        if not self._kcmp_works or self._libc is None or file.kfd < 0:
            return None
        pid = os.getpid()
        rc: int = self._libc.syscall(SYS_KCMP, pid, pid, KCMP_FILE, fd, file.kfd)
        if rc < 0:
            self._kcmp_works = False
            return None
        return rc == 0

    def lookup(self, fd: int) -> OpenFile | None:
        """The fake file behind ``fd``; None for a real file the fake does
        not model (or a closed fd)."""
        key = self._key_of(fd)
        if key is None:
            stale = self.by_fd.pop(fd, None)
            if stale is not None:
                stale.fds.discard(fd)
            return None
        file = self.by_fd.get(fd)
        if file is not None and file.inode is not None and file.inode.key == key:
            return file
        if file is not None:        # the number was reused behind our back
            self.by_fd.pop(fd, None)
            file.fds.discard(fd)
        inode = self.inodes.get(key)
        if inode is not None and inode.files:
            verdicts = [(self._same_file(fd, c), c) for c in inode.files]
            for same, candidate in verdicts:
                if same:
                    self._bind(fd, candidate)
                    return candidate
            if any(same is None for same, _ in verdicts):
                self._bind(fd, inode.files[0])       # kcmp unavailable: best guess
                return inode.files[0]
            sibling = inode.files[0].sibling()      # a re-open behind our back
            if sibling is not None:
                self.install(sibling, fd, adopting=True)
                return sibling
            self._bind(fd, inode.files[0])
            return inode.files[0]
        if self.adopt is not None:
            adopted = self.adopt(fd)
            if adopted is not None:
                self.install_existing(adopted, fd)
                return adopted
        return None

    def install_existing(self, file: OpenFile, fd: int) -> None:
        """Adopt an fd the fake did not create (a real memfd or eventfd)."""
        self.install(file, fd, adopting=True)

    def get(self, fd: int) -> OpenFile:
        """``fget``: EBADF for a closed fd; a real file the fake does not
        model comes back as a transient :class:`ForeignFile`."""
        if not isinstance(fd, int) or fd < 0:
            fail(E.EBADF)
        file = self.lookup(fd)
        if file is None:
            key = self._key_of(fd)
            if key is None:
                fail(E.EBADF)
            file = ForeignFile(fd, key)
        return file

    def close(self, fd: int) -> None:
        file = self.lookup(fd)
        os.close(fd)        # raises EBADF like close(2)
        if file is not None:
            self.by_fd.pop(fd, None)
            file.fds.discard(fd)
            file.maybe_release()

    def dup(self, fd: int, newfd: int) -> int:
        file = self.lookup(fd)
        if file is not None:
            return self.add_fd(newfd, file)
        return self.fresh(newfd)

    def known_fds(self) -> Iterator[tuple[int, OpenFile]]:
        return iter(sorted(self.by_fd.items()))

    # -- teardown -----------------------------------------------------------------
    def close_all_fds(self) -> None:
        """The process dies: every fd the fake knows of is closed and the
        files lose those references (release runs for the last one)."""
        for fd, file in sorted(self.by_fd.items()):
            try:
                os.close(fd)
            except OSError:
                pass
            file.fds.discard(fd)
        self.by_fd.clear()
        for file in list(self.files):
            file.maybe_release()

    def abandon(self) -> None:
        """The kernel itself goes away (kexec, shutdown): close every real
        fd the fake holds, user fds and kernel references alike, without
        running any release logic."""
        for fd in sorted(self.by_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.by_fd.clear()
        for file in list(self.files):
            file.released = True
            self.forget(file)
        self.inodes.clear()

class ForeignFile(OpenFile):
    """A real file the fake does not model (a plain file, a pipe...). Not
    tracked: it only exists for the duration of one syscall."""

    kind = "foreign"

    def __init__(self, fd: int, key: tuple[int, int]) -> None:
        super().__init__()
        self.key = key
        try:
            self.path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            self.path = "?"

    def get(self) -> Self:
        return self         # the real kernel holds it; the fake cannot

    def put(self) -> None:
        pass
