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
    assert fake_kernel.readlink(f"/proc/self/fd/{fd}") == "/memfd:m (deleted)"


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
