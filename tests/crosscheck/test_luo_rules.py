"""Upstream 7.3 LUO rules (seed-spec 4.1; the cases of the kernel's
tools/testing/selftests/liveupdate/liveupdate.c), the same code on the fake
and on the real kernel."""
import os

import pytest

from pyiommufd import errors, ioctl, luo
from pyiommufd.iommufd import IOMMUFD
from pyiommufd.luo import LiveUpdate
from pyiommufd.memfd import MemFD


@pytest.fixture
def lu(kernel):
    handle = LiveUpdate.open()
    yield handle
    handle.close()


def test_liveupdate_is_exclusive(lu):
    with pytest.raises(errors.Busy) as info:
        LiveUpdate.open()
    assert isinstance(info.value, errors.LiveUpdateError)


def test_liveupdate_can_be_opened_again_after_close(kernel):
    LiveUpdate.open().close()
    LiveUpdate.open().close()


def test_duplicate_session_name_is_eexist(lu):
    first = lu.create_session("dup")
    try:
        with pytest.raises(errors.AlreadyExists):
            lu.create_session("dup")
    finally:
        first.close()


def test_session_name_can_be_reused_after_close(lu):
    lu.create_session("again").close()
    lu.create_session("again").close()


@pytest.mark.parametrize("name", ["", "x" * 64])
def test_kernel_rejects_empty_and_unterminated_names(lu, name):
    # the object model sends them: the EINVAL is the kernel's own
    with pytest.raises(errors.InvalidArgument) as info:
        lu.create_session(name)
    assert info.value.op == "LIVEUPDATE_IOCTL_CREATE_SESSION"


def test_longest_name_is_63_bytes(lu):
    lu.create_session("n" * 63).close()


def test_retrieve_before_any_live_update_is_enoent(lu):
    with pytest.raises(errors.NotFound):
        lu.retrieve_session("never-preserved")


def test_get_name_returns_the_name(lu):
    with lu.create_session("named") as session:
        assert session.get_name() == "named"


def test_token_reuse_in_a_session_is_eexist(lu):
    with lu.create_session("tokens") as session, MemFD.create("a", 4096) as a, MemFD.create("b", 4096) as b:
        session.preserve(a, 1)
        with pytest.raises(errors.AlreadyExists):
            session.preserve(b, 1)


def test_same_memfd_twice_is_ebusy_even_across_sessions(lu):
    with lu.create_session("s1") as s1, lu.create_session("s2") as s2, MemFD.create("m", 4096) as m:
        s1.preserve(m, 1)
        with pytest.raises(errors.Busy):
            s1.preserve(m, 2)
        with pytest.raises(errors.Busy):
            s2.preserve(m, 3)


def test_closing_a_session_unpreserves_its_files(lu):
    with MemFD.create("m", 4096) as m:
        with lu.create_session("first") as first:
            first.preserve(m, 1)
        with lu.create_session("second") as second:
            second.preserve(m, 1)


def test_preserved_memfd_size_is_frozen_until_unpreserved(lu):
    with MemFD.create("frozen", 8192) as m:
        with lu.create_session("freeze") as session:
            session.preserve(m, 7)
            with pytest.raises(errors.PermissionDenied):
                m.resize(4096)
        m.resize(4096)
        assert m.size == 4096


def test_bad_fd_is_ebadf(lu):
    with lu.create_session("badfd") as session:
        with pytest.raises(errors.BadFd):
            session.preserve(4000, 1)


def test_file_without_handler_is_enoent(lu):
    read_end, write_end = os.pipe()
    try:
        with lu.create_session("pipe") as session:
            with pytest.raises(errors.NotFound) as info:
                session.preserve(read_end, 1)
            assert "no live-update handler" in info.value.hint
    finally:
        os.close(read_end)
        os.close(write_end)


def test_an_iommufd_is_preserved_only_by_a_kernel_with_its_handler(lu):
    """Stock 7.3 has no LUO handler for an iommufd (ENOENT); the series adds one,
    which preserves an iommufd with nothing marked. Which one this kernel is,
    the mark ioctl at the configured nr tells, independently of LUO."""
    from pyiommufd import abi

    with IOMMUFD.open() as iommufd:
        series = abi.probe_lu_abi(iommufd).supported
    with lu.create_session("iommufd") as session, IOMMUFD.open() as iommufd:
        if series:
            session.preserve(iommufd, 1)
        else:
            with pytest.raises(errors.NotFound):
                session.preserve(iommufd, 1)


def test_finish_on_an_outgoing_session_is_einval(lu):
    with lu.create_session("outgoing") as session:
        with pytest.raises(errors.InvalidArgument):
            ioctl.call(session.backend, session.fileno(), luo.FINISH)


def test_retrieve_fd_on_an_outgoing_session_is_einval(lu):
    with lu.create_session("outgoing2") as session:
        with pytest.raises(errors.InvalidArgument):
            ioctl.call(session.backend, session.fileno(), luo.RETRIEVE_FD, token=1)


def test_finish_with_reserved_bits_is_einval_before_anything_else(lu):
    with lu.create_session("reserved") as session:
        with pytest.raises(errors.InvalidArgument):
            ioctl.call(session.backend, session.fileno(), luo.FINISH, reserved=1)


def test_undersized_struct_is_einval(lu):
    arg = ioctl.new(luo.CREATE_SESSION, name=b"small")
    arg.size = 8
    with pytest.raises(errors.InvalidArgument):
        ioctl.invoke(lu.backend, lu.fileno(), luo.CREATE_SESSION, arg)


def test_non_zero_tail_past_the_kernel_struct_is_e2big(lu):
    arg = ioctl.new(luo.CREATE_SESSION, extra=8, name=b"tail")
    ioctl.buffer_of(arg)[72] = b"\x01"
    with pytest.raises(errors.TooBig):
        ioctl.invoke(lu.backend, lu.fileno(), luo.CREATE_SESSION, arg)


def test_zero_tail_past_the_kernel_struct_is_accepted(lu):
    arg = ioctl.new(luo.CREATE_SESSION, extra=8, name=b"zero-tail")
    ioctl.invoke(lu.backend, lu.fileno(), luo.CREATE_SESSION, arg)
    lu.backend.close(int(arg.fd))


def test_unknown_session_ioctl_nr_is_einval(lu):
    unknown = ioctl.IoctlDef("LIVEUPDATE_SESSION_0x4f", ioctl.IO(0xBA, 0x4F),
                             "struct liveupdate_session_finish", "luo")
    with lu.create_session("unknown-nr") as session:
        with pytest.raises(errors.InvalidArgument):
            ioctl.call(session.backend, session.fileno(), unknown)


def test_unknown_device_ioctl_nr_is_einval(lu):
    unknown = ioctl.IoctlDef("LIVEUPDATE_0x0f", ioctl.IO(0xBA, 0x0F), "struct liveupdate_session_finish", "luo")
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(lu.backend, lu.fileno(), unknown)


def test_known_nr_with_another_type_is_enotty(lu):
    foreign = ioctl.IoctlDef("0xbb00", ioctl.IO(0xBB, 0x00), "struct liveupdate_ioctl_create_session", "luo")
    with pytest.raises(errors.NoSuchIoctl):
        ioctl.call(lu.backend, lu.fileno(), foreign, name=b"x")
