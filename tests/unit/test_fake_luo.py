"""The fake kernel's LUO (upstream 7.3, seed-spec 4.1): /dev/liveupdate,
session ioctls, the generic dispatch and size rules."""
import errno
import os

import pytest

from pyiommufd import errors, ioctl
from pyiommufd._uapi import ffi
from pyiommufd_testing import FakeKernel

D = None  # filled from the kt fixture's Defs


@pytest.fixture(autouse=True)
def _defs(kt):
    global D
    D = kt.D


def raw_ioctl(kernel, fd, request, struct, **fields):
    """An ioctl with an explicit struct and request, bypassing IoctlDef."""
    arg = ioctl.new(struct, **fields)
    kernel.ioctl(fd, request, ioctl.buffer_of(arg))
    return arg


# -- /dev/liveupdate ------------------------------------------------------------------
def test_device_exists_only_with_liveupdate_on():
    with FakeKernel(liveupdate=False) as k:
        assert not k.files.exists("/dev/liveupdate")
        assert "liveupdate=on" not in k.files.read_text("/proc/cmdline")
        with pytest.raises(FileNotFoundError):
            k.open("/dev/liveupdate")
    with FakeKernel() as k:
        assert k.files.exists("/dev/liveupdate")
        assert "liveupdate=on" in k.files.read_text("/proc/cmdline")


def test_liveupdate_is_exclusive(fake_kernel, kt):
    first = kt.luo()
    with pytest.raises(OSError) as exc:
        kt.luo()
    assert exc.value.errno == errno.EBUSY
    fake_kernel.close(first)
    fake_kernel.close(kt.luo())


def test_dup_does_not_release_the_device(fake_kernel, kt):
    first = kt.luo()
    second = fake_kernel.dup(first)
    fake_kernel.close(first)
    with pytest.raises(OSError, match="busy"):
        kt.luo()
    fake_kernel.close(second)
    kt.luo()


def test_non_root_cannot_open(kt):
    with FakeKernel(euid=1000) as k:
        with pytest.raises(PermissionError):
            k.open("/dev/liveupdate")


# -- CREATE_SESSION / RETRIEVE_SESSION / GET_NAME ------------------------------------------
def test_create_session_returns_a_session_fd(fake_kernel, kt):
    s = kt.create_session(kt.luo(), "iommufd-test")
    assert fake_kernel.files.readlink(f"/proc/self/fd/{s}") == "anon_inode:[luo_session] iommufd-test"
    name = ioctl.call(fake_kernel, s, D.GET_NAME).name
    assert ffi.string(ffi.cast("char *", ffi.addressof(name))) == b"iommufd-test"
    assert not os.get_inheritable(s)


@pytest.mark.parametrize("name", [b"", b"x" * 64])
def test_session_name_length(fake_kernel, kt, name):
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, kt.luo(), D.CREATE_SESSION, name=name)


def test_63_byte_name_is_fine(fake_kernel, kt):
    kt.create_session(kt.luo(), "y" * 63)


def test_duplicate_outgoing_name(fake_kernel, kt):
    luo = kt.luo()
    kt.create_session(luo, "a")
    with pytest.raises(errors.AlreadyExists):
        kt.create_session(luo, "a")


def test_closing_the_session_frees_the_name(fake_kernel, kt):
    luo = kt.luo()
    fake_kernel.close(kt.create_session(luo, "a"))
    kt.create_session(luo, "a")


def test_retrieve_session_before_any_update(fake_kernel, kt):
    with pytest.raises(errors.NotFound) as exc:
        kt.retrieve_session(kt.luo(), "iommufd-test")
    assert exc.value.errno == errno.ENOENT


def test_get_name_reserved_must_be_zero(fake_kernel, kt):
    s = kt.create_session(kt.luo(), "a")
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, s, D.GET_NAME, reserved=1)


# -- dispatch and size rules ------------------------------------------------------------------
def test_unknown_session_nr_is_einval(fake_kernel, kt):
    s = kt.create_session(kt.luo(), "a")
    with pytest.raises(OSError) as exc:
        raw_ioctl(fake_kernel, s, ioctl.IO(0xBA, 0x44), "struct liveupdate_session_finish")
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        raw_ioctl(fake_kernel, s, ioctl.IO(0xBA, 0x00), "struct liveupdate_session_finish")
    assert exc.value.errno == errno.EINVAL


def test_unknown_device_nr_is_einval(fake_kernel, kt):
    with pytest.raises(OSError) as exc:
        raw_ioctl(fake_kernel, kt.luo(), ioctl.IO(0xBA, 0x02), "struct liveupdate_session_finish")
    assert exc.value.errno == errno.EINVAL


def test_wrong_type_in_known_slot_is_enotty(fake_kernel, kt):
    s = kt.create_session(kt.luo(), "a")
    with pytest.raises(OSError) as exc:
        raw_ioctl(fake_kernel, s, ioctl.IO(0x3B, 0x43), "struct liveupdate_session_get_name")
    assert exc.value.errno == errno.ENOTTY


def test_size_below_min_is_einval(fake_kernel, kt):
    s = kt.create_session(kt.luo(), "a")
    arg = ioctl.new(D.PRESERVE_FD, fd=kt.memfd(), token=1)
    arg.size = 12           # token ends at 16
    with pytest.raises(OSError) as exc:
        fake_kernel.ioctl(s, D.PRESERVE_FD.request, ioctl.buffer_of(arg, 16))
    assert exc.value.errno == errno.EINVAL


def test_nonzero_tail_is_e2big_and_zero_tail_is_fine(fake_kernel, kt):
    s = kt.create_session(kt.luo(), "a")
    mfd = kt.memfd()
    arg = ioctl.new(D.PRESERVE_FD, extra=8, fd=mfd, token=1)
    buf = ioctl.buffer_of(arg)
    assert len(buf) == 24
    buf[20] = b"\x01"
    with pytest.raises(OSError) as exc:
        fake_kernel.ioctl(s, D.PRESERVE_FD.request, buf)
    assert exc.value.errno == errno.E2BIG
    buf[20] = b"\x00"
    fake_kernel.ioctl(s, D.PRESERVE_FD.request, buf)


def test_size_past_the_buffer_is_efault(fake_kernel, kt):
    s = kt.create_session(kt.luo(), "a")
    arg = ioctl.new(D.PRESERVE_FD, fd=kt.memfd(), token=1)
    arg.size = 64
    with pytest.raises(OSError) as exc:
        fake_kernel.ioctl(s, D.PRESERVE_FD.request, ffi.buffer(arg))
    assert exc.value.errno == errno.EFAULT


# -- PRESERVE_FD ---------------------------------------------------------------------------------
def test_preserve_memfd(fake_kernel, kt):
    s = kt.create_session(kt.luo(), "a")
    kt.preserve(s, kt.memfd(), 0x890123)


def test_token_reuse_in_session(fake_kernel, kt):
    s = kt.create_session(kt.luo(), "a")
    kt.preserve(s, kt.memfd(), 7)
    with pytest.raises(errors.AlreadyExists):
        kt.preserve(s, kt.memfd(), 7)


def test_same_token_in_another_session_is_fine(fake_kernel, kt):
    luo = kt.luo()
    kt.preserve(kt.create_session(luo, "a"), kt.memfd(), 7)
    kt.preserve(kt.create_session(luo, "b"), kt.memfd(), 7)


def test_token_checked_before_fd(fake_kernel, kt):
    s = kt.create_session(kt.luo(), "a")
    kt.preserve(s, kt.memfd(), 7)
    with pytest.raises(errors.AlreadyExists):
        kt.preserve(s, 999, 7)


def test_bad_fd(fake_kernel, kt):
    s = kt.create_session(kt.luo(), "a")
    with pytest.raises(errors.BadFd):
        kt.preserve(s, 999, 1)


@pytest.mark.parametrize("what", ["iommufd", "plain file", "session", "eventfd"])
def test_no_handler_on_stock_73(fake_kernel, kt, tmp_path, what):
    luo = kt.luo()
    s = kt.create_session(luo, "a")
    if what == "iommufd":
        fd = kt.iommufd()
    elif what == "plain file":
        path = tmp_path / "f"
        path.write_bytes(b"x")
        fd = os.open(path, os.O_RDONLY)
    elif what == "session":
        fd = kt.create_session(luo, "b")
    else:
        fd = fake_kernel.eventfd()
    with pytest.raises(errors.NotFound):
        kt.preserve(s, fd, 1)


def test_vfio_cdev_has_no_handler_on_stock_73(fake_kernel, kt):
    kt.vfio_pci()
    s = kt.create_session(kt.luo(), "a")
    with pytest.raises(errors.NotFound):
        kt.preserve(s, kt.cdev(), 1)


def test_same_file_in_two_sessions_is_ebusy(fake_kernel, kt):
    luo = kt.luo()
    mfd = kt.memfd()
    kt.preserve(kt.create_session(luo, "a"), mfd, 1)
    with pytest.raises(errors.Busy):
        kt.preserve(kt.create_session(luo, "b"), mfd, 2)


def test_memfd_keyed_by_inode(fake_kernel, kt):
    """A re-open of the memfd is another struct file of the same inode."""
    s = kt.create_session(kt.luo(), "a")
    mfd = kt.memfd()
    again = fake_kernel.open(f"/proc/self/fd/{mfd}")
    kt.preserve(s, mfd, 1)
    with pytest.raises(errors.Busy):
        kt.preserve(s, again, 2)
    with pytest.raises(errors.Busy):
        kt.preserve(s, fake_kernel.dup(mfd), 3)


def test_preserve_on_incoming_session_is_einval(fake_kernel, kt):
    luo = kt.luo()
    kt.preserve(kt.create_session(luo, "a"), kt.memfd(), 1)
    fake_kernel.kexec()
    s = kt.retrieve_session(kt.luo(), "a")
    with pytest.raises(errors.InvalidArgument):
        kt.preserve(s, kt.memfd(), 2)


def test_retrieve_and_finish_on_outgoing_session_are_einval(fake_kernel, kt):
    s = kt.create_session(kt.luo(), "a")
    with pytest.raises(errors.InvalidArgument):
        kt.retrieve(s, 1)
    with pytest.raises(errors.InvalidArgument):
        kt.finish(s)


# -- closing sessions -------------------------------------------------------------------------------
def test_closing_outgoing_session_unpreserves(fake_kernel, kt):
    luo = kt.luo()
    s = kt.create_session(luo, "a")
    mfd = kt.memfd(seals=None)
    kt.preserve(s, mfd, 1)
    with pytest.raises(errors.PermissionDenied):
        ioctl_ftruncate(fake_kernel, mfd, 4096)
    fake_kernel.close(s)
    fake_kernel.ftruncate(mfd, 4096)
    kt.preserve(kt.create_session(luo, "b"), mfd, 1)


def ioctl_ftruncate(kernel, fd, size):
    try:
        kernel.ftruncate(fd, size)
    except OSError as exc:
        raise errors.from_oserror(exc, "ftruncate", "memfd") from None


def test_preserved_file_survives_closing_its_fd(fake_kernel, kt):
    s = kt.create_session(kt.luo(), "a")
    mfd = kt.memfd(data=b"payload")
    kt.preserve(s, mfd, 1)
    fake_kernel.close(mfd)
    fake_kernel.kexec()
    s2 = kt.retrieve_session(kt.luo(), "a")
    assert fake_kernel.pread(kt.retrieve(s2, 1), 7, 0) == b"payload"


def test_by_value_call_of_a_struct_ioctl_is_efault(fake_kernel, kt):
    luo = kt.luo()
    assert errno_of(fake_kernel.ioctl_int, luo, D.CREATE_SESSION.request, 0) == errno.EFAULT
    assert errno_of(fake_kernel.ioctl_int, luo, ioctl.IO(0xBA, 0x05), 0) == errno.EINVAL
    assert errno_of(fake_kernel.ioctl_int, kt.memfd(), D.CREATE_SESSION.request, 0) == errno.ENOTTY


def errno_of(fn, *args):
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno
