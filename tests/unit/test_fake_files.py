"""The fake kernel's file table: real placeholder fds, dup/SCM_RIGHTS/fork,
struct-file identity, release on last close."""
import errno
import os
import socket
import subprocess
import sys

import pytest

from pyiommufd import errors, ioctl
from pyiommufd_testing import FakeKernel


def test_placeholders_are_real_fds(fake_kernel, kt):
    fd = kt.iommufd()
    st = os.fstat(fd)
    assert st.st_ino > 0
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:pyiommufd-fake:/dev/iommu")
    assert fake_kernel.files.readlink(f"/proc/self/fd/{fd}") == "/dev/iommu"
    assert fake_kernel.known_fds()[fd] == "/dev/iommu"


def test_open_flags_control_inheritance(fake_kernel):
    assert not os.get_inheritable(fake_kernel.open("/dev/iommu"))
    assert os.get_inheritable(fake_kernel.open("/dev/iommu", os.O_RDWR))


def test_reopening_a_path_makes_a_new_file(fake_kernel, kt):
    a, b = kt.iommufd(), kt.iommufd()
    assert kt.ioas(a) == 1 and kt.ioas(b) == 1          # separate contexts


def test_dup_shares_the_file(fake_kernel, kt):
    a = kt.iommufd()
    b = fake_kernel.dup(a)
    ioas = kt.ioas(a)
    kt.destroy(b, ioas)
    with pytest.raises(errors.NotFound):
        kt.destroy(a, ioas)


def test_os_dup_behind_the_fakes_back_is_resolved_lazily(fake_kernel, kt):
    a = kt.iommufd()
    b = os.dup(a)
    ioas = kt.ioas(b)
    kt.destroy(a, ioas)


def test_f_dupfd_cloexec_is_tracked(fake_kernel, kt):
    a = kt.iommufd()
    b = fake_kernel.fcntl(a, 1030, 100)         # F_DUPFD_CLOEXEC
    assert b >= 100
    fake_kernel.close(a)
    kt.ioas(b)


def test_scm_rights_passes_the_same_file(fake_kernel, kt):
    a = kt.iommufd()
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        socket.send_fds(left, [b"x"], [a])
        _, fds, _, _ = socket.recv_fds(right, 1, 1)
    ioas = kt.ioas(fds[0])
    kt.destroy(a, ioas)


def test_child_process_reads_an_inherited_memfd(fake_kernel, kt):
    fd = kt.memfd(size=4096, data=b"hello")
    code = f"import os; print(os.pread({fd}, 5, 0).decode())"
    out = subprocess.run([sys.executable, "-c", code], pass_fds=[fd], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "hello"


def test_close_of_unknown_fd_is_ebadf(fake_kernel):
    with pytest.raises(OSError) as exc:
        fake_kernel.close(987654)
    assert exc.value.errno == errno.EBADF


def test_release_runs_at_last_close_only(fake_kernel, kt):
    luo = kt.luo()
    s = kt.create_session(luo, "a")
    s2 = fake_kernel.dup(s)
    fake_kernel.close(s)
    with pytest.raises(errors.AlreadyExists):       # the session still exists
        kt.create_session(luo, "a")
    fake_kernel.close(s2)
    kt.create_session(luo, "a")


def test_reopen_through_proc(fake_kernel, kt):
    mfd = kt.memfd(size=4096, data=b"abc")
    again = fake_kernel.open(f"/proc/self/fd/{mfd}")
    assert os.fstat(again).st_ino == os.fstat(mfd).st_ino
    assert fake_kernel.pread(again, 3, 0) == b"abc"
    s = kt.create_session(kt.luo(), "a")
    with pytest.raises(OSError) as exc:
        fake_kernel.open(f"/proc/self/fd/{s}")
    assert exc.value.errno == errno.ENXIO


def test_memfd_created_behind_the_backend_is_adopted(fake_kernel, kt):
    fd = os.memfd_create("outside", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    kt.preserve(kt.create_session(kt.luo(), "a"), fd, 1)
    assert fake_kernel.files.readlink(f"/proc/self/fd/{fd}") == "/memfd:outside (deleted)"
    with pytest.raises(OSError) as exc:
        fake_kernel.ftruncate(fd, 8192)
    assert exc.value.errno == errno.EPERM


def test_shutdown_closes_everything():
    k = FakeKernel()
    fds = [k.open("/dev/iommu"), k.open("/dev/liveupdate"), k.memfd_create("m", 0)]
    k.shutdown()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    with pytest.raises(RuntimeError):
        k.open("/dev/iommu")


def test_ioctl_on_a_real_file_is_enotty(fake_kernel, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        arg = ioctl.new("struct iommu_destroy", size=8)
        with pytest.raises(OSError) as exc:
            fake_kernel.ioctl(fd, 0x3B80, ioctl.buffer_of(arg))
        assert exc.value.errno == errno.ENOTTY
    finally:
        os.close(fd)


def test_ioctl_on_closed_fd_is_ebadf(fake_kernel):
    arg = ioctl.new("struct iommu_destroy", size=8)
    with pytest.raises(OSError) as exc:
        fake_kernel.ioctl(987654, 0x3B80, ioctl.buffer_of(arg))
    assert exc.value.errno == errno.EBADF


def test_an_fd_received_by_scm_rights_shows_its_fake_file_in_proc():
    """Linux knows every fd of a process; the fake learns one it did not hand
    out when it is asked about it, so no caller has to introduce it first."""
    with FakeKernel() as k:
        iommufd = k.open("/dev/iommu")
        a, b = socket.socketpair(socket.AF_UNIX)
        try:
            socket.send_fds(a, [b"x"], [iommufd])
            _, [received], _, _ = socket.recv_fds(b, 1, 1)
            assert received != iommufd
            assert k.files.readlink(f"/proc/self/fd/{received}") == "/dev/iommu"
            k.close(received)
        finally:
            a.close()
            b.close()
            k.close(iommufd)
