"""memfds in the fake kernel: memfd_create checks, hugetlb, LUO's frozen size
(seed-spec 4.3)."""
import errno
import os

import pytest

from pyiommufd import errors

MFD_CLOEXEC, MFD_ALLOW_SEALING, MFD_HUGETLB, MFD_NOEXEC_SEAL, MFD_EXEC = 1, 2, 4, 8, 0x10


@pytest.mark.parametrize("flags", [0x40, MFD_EXEC | MFD_NOEXEC_SEAL, 21 << 26])
def test_memfd_create_flag_checks(fake_kernel, flags):
    with pytest.raises(OSError) as exc:
        fake_kernel.memfd_create("m", flags)
    assert exc.value.errno == errno.EINVAL


def test_memfd_name_too_long(fake_kernel):
    with pytest.raises(OSError) as exc:
        fake_kernel.memfd_create("n" * 250, 0)
    assert exc.value.errno == errno.EINVAL


def test_memfd_is_real(fake_kernel):
    fd = fake_kernel.memfd_create("m", MFD_ALLOW_SEALING | MFD_CLOEXEC)
    fake_kernel.ftruncate(fd, 8192)
    assert os.fstat(fd).st_size == 8192 == fake_kernel.fstat_size(fd)
    with fake_kernel.mmap(fd, 8192) as m:
        m[10:13] = b"abc"
    assert fake_kernel.pread(fd, 3, 10) == b"abc"
    assert fake_kernel.files.readlink(f"/proc/self/fd/{fd}") == "/memfd:m (deleted)"


def test_hugetlb_memfd_rules(fake_kernel, kt):
    fd = fake_kernel.memfd_create("huge", MFD_HUGETLB | MFD_ALLOW_SEALING)
    with pytest.raises(OSError) as exc:
        fake_kernel.ftruncate(fd, 4096)
    assert exc.value.errno == errno.EINVAL
    fake_kernel.ftruncate(fd, 2 << 20)
    with pytest.raises(OSError) as exc:
        fake_kernel.pwrite(fd, b"x", 0)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(errors.NotFound):        # no LUO handler for hugetlb
        kt.preserve(kt.create_session(kt.luo(), "a"), fd, 1)


def test_seals_are_real(fake_kernel):
    fd = fake_kernel.memfd_create("m", MFD_ALLOW_SEALING)
    fake_kernel.fcntl(fd, 1033, 0x4)            # F_SEAL_GROW
    with pytest.raises(PermissionError):
        fake_kernel.ftruncate(fd, 4096)
    nosealing = fake_kernel.memfd_create("m", 0)
    assert fake_kernel.fcntl(nosealing, 1034) == 0x1        # F_SEAL_SEAL


def test_seal_fcntl_on_a_device_file_is_einval(fake_kernel, kt):
    with pytest.raises(OSError) as exc:
        fake_kernel.fcntl(kt.iommufd(), 1034)
    assert exc.value.errno == errno.EINVAL


def test_preserved_memfd_size_is_frozen(fake_kernel, kt):
    fd = kt.memfd(size=8192, seals=None)
    kt.preserve(kt.create_session(kt.luo(), "a"), fd, 1)
    fake_kernel.ftruncate(fd, 8192)                 # same size: fine
    for size in (4096, 16384):
        with pytest.raises(OSError) as exc:
            fake_kernel.ftruncate(fd, size)
        assert exc.value.errno == errno.EPERM
    fake_kernel.pwrite(fd, b"in", 8190)
    with pytest.raises(OSError) as exc:
        fake_kernel.pwrite(fd, b"out", 8190)
    assert exc.value.errno == errno.EPERM
    os.lseek(fd, 8191, os.SEEK_SET)
    with pytest.raises(OSError) as exc:
        fake_kernel.write(fd, b"xx")
    assert exc.value.errno == errno.EPERM


def test_freeze_covers_every_open_file_of_the_inode(fake_kernel, kt):
    fd = kt.memfd(size=8192, seals=None)
    again = fake_kernel.open(f"/proc/self/fd/{fd}")
    kt.preserve(kt.create_session(kt.luo(), "a"), fd, 1)
    with pytest.raises(OSError) as exc:
        fake_kernel.ftruncate(again, 0)
    assert exc.value.errno == errno.EPERM


def test_memfd_without_sealing_is_preservable(fake_kernel, kt):
    fd = fake_kernel.memfd_create("m", 0)
    kt.preserve(kt.create_session(kt.luo(), "a"), fd, 1)


# -- F_SEAL_WRITE and pinned folios (memfd_wait_for_pins, mm/memfd.c:157-209) --------------------
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
F_SEAL_SEAL, F_SEAL_WRITE, F_SEAL_EXEC = 0x1, 0x8, 0x20


def _seal_write(kernel, fd, seals=F_SEAL_WRITE):
    with pytest.raises(OSError) as exc:
        kernel.fcntl(fd, F_ADD_SEALS, seals)
    return exc.value.errno


def _attached_ioas(kt):
    kt.vfio_pci()
    iommufd, cdev = kt.iommufd(), kt.cdev()
    devid = kt.bind(cdev, iommufd)
    ioas = kt.ioas(iommufd)
    hwpt = kt.hwpt(iommufd, devid, ioas)
    kt.attach(cdev, hwpt)
    return iommufd, cdev, ioas, hwpt


def test_map_file_into_a_domain_pins_the_memfd_until_unmap(fake_kernel, kt):
    iommufd, _, ioas, _ = _attached_ioas(kt)
    fd = kt.memfd(size=4 * 4096, seals=None)
    kt.map_file(iommufd, ioas, fd, 4 * 4096, iova=0x200000)
    assert _seal_write(fake_kernel, fd) == errno.EBUSY
    assert fake_kernel.fcntl(fd, F_GET_SEALS) == 0           # nothing was added
    fake_kernel.fcntl(fd, F_ADD_SEALS, 0x2 | 0x4)            # other seals still go in
    again = fake_kernel.open(f"/proc/self/fd/{fd}")           # the same inode
    assert _seal_write(fake_kernel, again) == errno.EBUSY
    kt.unmap(iommufd, ioas, 0x200000, 4 * 4096)
    fake_kernel.fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE)
    assert fake_kernel.fcntl(fd, F_GET_SEALS) & F_SEAL_WRITE


def test_no_domain_no_pin(fake_kernel, kt):
    iommufd = kt.iommufd()
    ioas = kt.ioas(iommufd)
    fd = kt.memfd(size=4096, seals=None)
    kt.map_file(iommufd, ioas, fd, 4096, iova=0x100000)
    fake_kernel.fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE)


def test_the_pin_follows_the_domain(fake_kernel, kt):
    """Pinned when the first HWPT is added to an IOAS that has the mapping;
    unpinned when the last one goes away."""
    kt.vfio_pci()
    iommufd, cdev = kt.iommufd(), kt.cdev()
    devid = kt.bind(cdev, iommufd)
    ioas = kt.ioas(iommufd)
    fd = kt.memfd(size=4096, seals=None)
    kt.map_file(iommufd, ioas, fd, 4096, iova=0x100000)
    first, second = kt.hwpt(iommufd, devid, ioas), kt.hwpt(iommufd, devid, ioas)
    assert _seal_write(fake_kernel, fd) == errno.EBUSY
    kt.destroy(iommufd, first)
    assert _seal_write(fake_kernel, fd) == errno.EBUSY         # the second domain still pins
    kt.destroy(iommufd, second)
    fake_kernel.fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE)


def test_closing_the_iommufd_unpins(fake_kernel, kt):
    iommufd, cdev, ioas, _ = _attached_ioas(kt)
    fd = kt.memfd(size=4096, seals=None)
    kt.map_file(iommufd, ioas, fd, 4096, iova=0x100000)
    fake_kernel.close(cdev)
    fake_kernel.close(iommufd)
    fake_kernel.fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE)


def test_a_failed_pin_leaves_no_pin(fake_kernel, kt):
    iommufd, _, ioas, _ = _attached_ioas(kt)
    fd = kt.memfd(size=4096, seals=None)
    with pytest.raises(errors.InvalidArgument):               # past the end of the file
        kt.map_file(iommufd, ioas, fd, 4 * 4096, iova=0x100000)
    fake_kernel.fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE)


def test_earlier_seal_errors_win_over_the_pins(fake_kernel, kt):
    iommufd, _, ioas, _ = _attached_ioas(kt)
    fd = kt.memfd(size=4096, seals=None)
    kt.map_file(iommufd, ioas, fd, 4096, iova=0x100000)
    readonly = fake_kernel.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    assert _seal_write(fake_kernel, readonly) == errno.EPERM   # no FMODE_WRITE
    assert _seal_write(fake_kernel, fd, F_SEAL_WRITE | 0x1000) == errno.EINVAL
    fake_kernel.fcntl(fd, F_ADD_SEALS, F_SEAL_SEAL)
    assert _seal_write(fake_kernel, fd) == errno.EPERM         # sealed


def test_f_seal_exec_on_an_executable_memfd_implies_f_seal_write(fake_kernel, kt):
    iommufd, _, ioas, _ = _attached_ioas(kt)
    fd = kt.memfd(size=4096, seals=None)
    kt.map_file(iommufd, ioas, fd, 4096, iova=0x100000)
    if os.fstat(fd).st_mode & 0o111:
        assert _seal_write(fake_kernel, fd, F_SEAL_EXEC) == errno.EBUSY
    else:       # the host's vm.memfd_noexec made it non-executable: no implication
        fake_kernel.fcntl(fd, F_ADD_SEALS, F_SEAL_EXEC)


def test_memfd_luo_preserve_pins_until_unpreserve(fake_kernel, kt):
    fd = kt.memfd(size=8192, seals=None)
    session = kt.create_session(kt.luo(), "a")
    kt.preserve(session, fd, 1)
    assert _seal_write(fake_kernel, fd) == errno.EBUSY
    fake_kernel.close(session)                                 # unpreserves
    fake_kernel.fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE)


def test_an_empty_preserved_memfd_has_no_folios_to_pin(fake_kernel, kt):
    fd = kt.memfd(size=0, seals=None)
    kt.preserve(kt.create_session(kt.luo(), "a"), fd, 1)
    fake_kernel.fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE)
