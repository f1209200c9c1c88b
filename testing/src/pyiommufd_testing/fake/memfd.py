"""memfds: real ``memfd_create`` files plus the shmem state the fake adds.

The bytes, size and seals of a fake memfd are those of a real memfd. The fake
adds what the host kernel cannot know about:

* **LUO's frozen size** (Linux 7.3 mm/memfd_luo.c; ``shmem_freeze`` in
  K:mm/memfd_luo.c:267 and 351, enforced at K:mm/shmem.c:1359-1361 and
  3266-3268): while a memfd is preserved, ``ftruncate`` to another size and
  writes that would extend it fail with EPERM.
* **hugetlb** (``MFD_HUGETLB``): modelled, not real, so tests do not depend
  on the host's huge pages. A fake hugetlb memfd is a normal memfd the fake
  marks as hugetlb: LUO refuses it (no handler, ENOENT; K:mm/memfd_luo.c:580-586),
  ``ftruncate`` needs a multiple of 2 MiB (EINVAL) and ``write``/``pwrite``
  fail with EINVAL (hugetlbfs has no write_iter).
* **pinned folios**: ``F_ADD_SEALS`` adding ``F_SEAL_WRITE`` (or
  ``F_SEAL_EXEC`` on an executable memfd, which implies it) waits for
  folios with extra references and gives up with EBUSY
  (``memfd_wait_for_pins``, K:mm/memfd.c:157-209, called at 294-304;
  F_SEAL_EXEC at 288-292). The host kernel cannot see the fake's pins, so
  the fake counts them on the inode (:attr:`ShmemInode.pins`): an IOAS with
  a domain pins its MAP_FILE pages (``memfd_pin_folios`` in
  K:drivers/iommu/iommufd/pages.c:839, see :mod:`.iopt`) and memfd LUO pins
  every folio of a non-empty memfd it preserves until unpreserve
  (K:mm/memfd_luo.c:133, 231-256). The errors ``memfd_add_seals`` returns
  before that (EPERM for a read-only file or F_SEAL_SEAL, EINVAL for unknown
  seals) still come from the host.

The enforcement covers calls made through the backend only; a direct
``os.ftruncate`` on the fd bypasses it.
"""
from __future__ import annotations

import errno as E
import mmap as _mmap
import os
from typing import TYPE_CHECKING, Any, cast

from .files import F_ADD_SEALS, F_GET_SEALS, OpenFile
from .luo import FileHandler, LuoFile, Session
from .uaccess import HPAGE_SIZE, fail

if TYPE_CHECKING:   # pragma: no cover
    from .boot import Boot


def _memfd(lf: LuoFile) -> MemfdFile:
    """The outgoing file of a memfd entry (the handler preserves nothing else)."""
    return cast(MemfdFile, lf.file)

MFD_CLOEXEC = 0x0001
MFD_ALLOW_SEALING = 0x0002
MFD_HUGETLB = 0x0004
MFD_NOEXEC_SEAL = 0x0008
MFD_EXEC = 0x0010
MFD_HUGE_SHIFT = 26
MFD_HUGE_MASK = 0x3f
MFD_NAME_MAX = 249          # NAME_MAX - strlen("memfd:")

F_SEAL_SEAL = 0x0001
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010
F_SEAL_EXEC = 0x0020
#: MEMFD_LUO_ALL_SEALS (K:include/linux/kho/abi/memfd.h)
LUO_ALL_SEALS = (F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE
                 | F_SEAL_FUTURE_WRITE | F_SEAL_EXEC)

SEEK_DATA = 3
SEEK_HOLE = 4


class ShmemInode:
    """Per-inode state the host kernel does not track for us."""

    def __init__(self, hugetlb: bool = False) -> None:
        self.hugetlb = hugetlb
        self.frozen = False         # SHMEM_F_MAPPING_FROZEN
        #: long-term pins on the folios (IOAS domains, memfd LUO)
        self.pins = 0


class MemfdFile(OpenFile):
    kind = "memfd"

    def __init__(self, name: str, shmem: ShmemInode, *, by_syscall: bool = True) -> None:
        super().__init__()
        self.name = name
        self.shmem = shmem
        # memfd_create() names the file "memfd:<name>"; a memfd the kernel makes
        # itself (memfd_luo's retrieve: memfd_alloc_file("")) shows as "/ (deleted)"
        self.path = f"/memfd:{name} (deleted)" if by_syscall else f"/{name} (deleted)"

    # helpers on the kernel's own reference
    def size(self) -> int:
        return os.fstat(self.kfd).st_size

    def seals(self) -> int:
        import fcntl as _fcntl
        return _fcntl.fcntl(self.kfd, F_GET_SEALS)

    # -- file operations ---------------------------------------------------------
    def _check_extend(self, pos: int, length: int) -> None:
        if self.shmem.hugetlb:
            fail(E.EINVAL)
        if self.shmem.frozen and length and pos + length > self.size():
            fail(E.EPERM)

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        self._check_extend(offset, len(data))
        return os.pwrite(fd, data, offset)

    def read(self, fd: int, length: int) -> bytes:
        return os.read(fd, length)

    def write(self, fd: int, data: bytes) -> int:
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        self._check_extend(pos, len(data))
        return os.write(fd, data)

    def ftruncate(self, fd: int, length: int) -> None:
        if length < 0:
            fail(E.EINVAL)
        if self.shmem.hugetlb and length % HPAGE_SIZE:
            fail(E.EINVAL)
        if self.shmem.frozen and length != self.size():
            fail(E.EPERM)
        os.ftruncate(fd, length)

    def fstat_size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def fcntl(self, fd: int, cmd: int, arg: int) -> int:
        import fcntl as _fcntl
        if cmd == F_ADD_SEALS and self.shmem.pins and self._adds_write_seal(fd, arg):
            fail(E.EBUSY)       # memfd_wait_for_pins (K:mm/memfd.c:298-303)
        return _fcntl.fcntl(fd, cmd, arg)

    def _adds_write_seal(self, fd: int, seals: int) -> bool:
        """Would ``memfd_add_seals`` (K:mm/memfd.c:232-312) get as far as
        ``memfd_wait_for_pins``? False when an earlier check fails (the host
        then gives that error) or F_SEAL_WRITE is there already."""
        import fcntl as _fcntl
        if _fcntl.fcntl(fd, _fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            return False                                    # EPERM (270-271)
        if seals & ~LUO_ALL_SEALS:
            return False                                    # EINVAL (272-273)
        current = _fcntl.fcntl(fd, F_GET_SEALS)
        if current & F_SEAL_SEAL:
            return False                                    # EPERM (283-286)
        if seals & F_SEAL_EXEC and os.fstat(fd).st_mode & 0o111:
            seals |= F_SEAL_WRITE                           # 288-292
        return bool(seals & F_SEAL_WRITE and not current & F_SEAL_WRITE)

    def mmap(self, fd: int, length: int, offset: int, prot: int) -> _mmap.mmap:
        return _mmap.mmap(fd, length, flags=_mmap.MAP_SHARED, prot=prot, offset=offset)

    def sibling(self) -> "MemfdFile":
        """Another open file of the same inode (a re-open)."""
        return MemfdFile(self.name, self.shmem)

    # -- live update ----------------------------------------------------------------
    def snapshot(self) -> "MemfdImage":
        """What memfd LUO hands over: size, seals, position and the data
        extents (holes are skipped, so a sparse memfd stays cheap)."""
        size = self.size()
        seals = self.seals()
        pos = os.lseek(self.kfd, 0, os.SEEK_CUR)
        extents: list[tuple[int, bytes]] = []
        # a private open file, so SEEK_DATA does not move the shared offset
        probe = os.open(f"/proc/self/fd/{self.kfd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            off = 0
            while off < size:
                try:
                    start = os.lseek(probe, off, SEEK_DATA)
                except OSError as exc:
                    if exc.errno == E.ENXIO:
                        break
                    raise
                end = os.lseek(probe, start, SEEK_HOLE)
                extents.append((start, os.pread(probe, end - start, start)))
                off = end
        finally:
            os.close(probe)
        return MemfdImage(size, seals, pos, extents)


class MemfdImage:
    """A preserved memfd in KHO memory."""

    def __init__(self, size: int, seals: int, pos: int, extents: list[tuple[int, bytes]]):
        self.size = size
        self.seals = seals
        self.pos = pos
        self.extents = extents

    def restore(self) -> int:
        """``memfd_luo_retrieve``: a new memfd (``MFD_ALLOW_SEALING``) with the
        contents, size, seals and position (K:mm/memfd_luo.c:518-578)."""
        import fcntl as _fcntl
        fd = os.memfd_create("", MFD_ALLOW_SEALING | MFD_CLOEXEC)
        try:
            for off, data in self.extents:
                os.pwrite(fd, data, off)
            os.ftruncate(fd, self.size)
            if self.seals:
                _fcntl.fcntl(fd, F_ADD_SEALS, self.seals)
            os.lseek(fd, self.pos, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return fd


def check_memfd_flags(name: str, flags: int) -> tuple[int, bool]:
    """memfd_create(2) argument checks; returns (host flags, hugetlb)."""
    known = MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB | MFD_NOEXEC_SEAL | MFD_EXEC
    hugetlb = bool(flags & MFD_HUGETLB)
    huge_bits = flags & (MFD_HUGE_MASK << MFD_HUGE_SHIFT)
    if flags & ~(known | (MFD_HUGE_MASK << MFD_HUGE_SHIFT)):
        fail(E.EINVAL)
    if huge_bits and not hugetlb:
        fail(E.EINVAL)
    if (flags & MFD_EXEC) and (flags & MFD_NOEXEC_SEAL):
        fail(E.EINVAL)
    if len(name.encode()) > MFD_NAME_MAX:
        fail(E.EINVAL)
    return flags & ~(MFD_HUGETLB | (MFD_HUGE_MASK << MFD_HUGE_SHIFT)), hugetlb


def is_real_memfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
    except OSError:
        return False


def adopt_memfd(fd: int) -> MemfdFile:
    """A real memfd created behind the backend's back."""
    target = os.readlink(f"/proc/self/fd/{fd}")
    name = target[len("/memfd:"):].removesuffix(" (deleted)")
    hugetlb = os.fstat(fd).st_blksize > 4096
    return MemfdFile(name, ShmemInode(hugetlb=hugetlb))



class MemfdLuoHandler(FileHandler):
    """memfd LUO, compatible ``memfd-v2`` (K:mm/memfd_luo.c; Linux 7.3 mm/memfd_luo.c):

    * only shmem-backed, unlinked files (K:mm/memfd_luo.c:580-586): hugetlb
      memfds and plain files have no handler, hence LUO's ENOENT;
    * keyed by inode, so two open files of one memfd collide with EBUSY
      (K:mm/memfd_luo.c:588-591);
    * preserving freezes the size (EPERM on resize) until unpreserve
      (K:mm/memfd_luo.c:267, 351);
    * seals outside MEMFD_LUO_ALL_SEALS give EOPNOTSUPP (K:mm/memfd_luo.c:276-286);
    * no ``can_finish``: an unretrieved memfd never blocks FINISH;
    * retrieve makes a new memfd (``MFD_ALLOW_SEALING``) with the contents,
      size, seals and file position (K:mm/memfd_luo.c:518-578).
    """

    compatible = "memfd-v2"

    def can_preserve(self, file: OpenFile) -> bool:
        return isinstance(file, MemfdFile) and not file.shmem.hugetlb

    def get_id(self, file: OpenFile) -> Any:
        return ("inode", file.inode.key if file.inode else id(file))

    def preserve(self, lf: LuoFile, session: Session) -> None:
        file = _memfd(lf)
        file.shmem.frozen = True
        seals = file.seals()
        if seals & ~LUO_ALL_SEALS:
            file.shmem.frozen = False
            fail(E.EOPNOTSUPP)
        if -(-file.size() // 4096) > 0xffffffff:
            file.shmem.frozen = False
            fail(E.EFBIG)
        # memfd_luo_preserve_folios pins every folio (K:mm/memfd_luo.c:133);
        # an empty memfd has none
        lf.private = file.size() > 0       # "the folios are pinned"
        if lf.private:
            file.shmem.pins += 1

    def unpreserve(self, lf: LuoFile, session: Session) -> None:
        file = _memfd(lf)
        file.shmem.frozen = False
        if lf.private:                      # memfd_luo_unpreserve_folios
            lf.private = False
            file.shmem.pins -= 1

    def handover(self, lf: LuoFile) -> MemfdImage:
        return _memfd(lf).snapshot()

    def retrieve(self, lf: LuoFile, boot: Boot) -> tuple[OpenFile, int]:
        image = lf.data
        if image is None:
            fail(E.EINVAL)
        if image.seals & ~LUO_ALL_SEALS:
            fail(E.EOPNOTSUPP)
        fd = image.restore()
        file = MemfdFile("", ShmemInode(), by_syscall=False)
        fd = boot.table.install(file, fd)
        return file, fd
