"""pyiommufd.luo on the fake kernel: what the crosscheck tier doesn't cover."""
import errno as E
import os

import pytest

from pyiommufd import errors, luo
from pyiommufd.fdobject import FileKind
from pyiommufd.luo import LiveUpdate, Session
from pyiommufd.memfd import MemFD


@pytest.mark.parametrize("name", ["a\0b", "x" * 65, b"bytes", "\udcff"])
def test_names_the_kernel_field_cannot_carry_are_refused_before_the_kernel(fake_kernel, name):
    with LiveUpdate.open() as lu:
        with pytest.raises(errors.UsageError):
            lu.create_session(name)


@pytest.mark.parametrize("name", ["", "x" * 64])
def test_names_the_kernel_can_judge_get_its_einval(fake_kernel, name):
    with LiveUpdate.open() as lu:
        with pytest.raises(errors.InvalidArgument):
            lu.create_session(name)


@pytest.mark.parametrize("name", ["", "x" * 64])
def test_the_flows_check_refuses_what_luo_would(name):
    with pytest.raises(errors.UsageError, match="1 to 63 bytes"):
        luo.check_session_name(name)


@pytest.mark.parametrize("name, shown", [("vm\n0", "\\n"), ("\x01", "\\x01"), ("vm\t", "\\t"),
                                         ("a\x7f", "\\x7f"), ("a\x85b", "\\x85"), ("a\x00b", "\\x00")])
def test_the_flows_check_refuses_control_characters_in_one_line(name, shown):
    with pytest.raises(errors.UsageError, match="control character") as info:
        luo.check_session_name(name)
    assert "\n" not in str(info.value) and f"character {shown}:" in str(info.value)


def test_a_too_long_name_with_newlines_is_shown_in_one_line():
    with pytest.raises(errors.UsageError, match="1 to 63 bytes") as info:
        luo.check_session_name("\n" * 70)
    assert "\n" not in str(info.value) and "(70 characters)" in str(info.value)


@pytest.mark.parametrize("name", ["vm0", "vm 0", "vmé-ü", "a.b_c:d"])
def test_printable_names_pass_the_flows_check(name):
    assert luo.check_session_name(name) == name.encode()


@pytest.mark.parametrize("token", [-1, 1 << 64, "1", True, 1.0])
def test_bad_tokens_are_refused(fake_kernel, token):
    with LiveUpdate.open() as lu, lu.create_session("t") as session, MemFD.create("m", 4096) as m:
        with pytest.raises(errors.UsageError):
            session.preserve(m, token)


def test_preserve_records_tokens_and_kinds(fake_kernel):
    with LiveUpdate.open() as lu, lu.create_session("rec") as session, MemFD.create("m", 4096) as m:
        record = session.preserve(m, (1 << 64) - 1)
        assert record.kind is FileKind.MEMFD and record.fd == m.fileno()
        assert session.preserved == {(1 << 64) - 1: record}
        assert "outgoing" in repr(session)


def test_retrieve_gives_a_typed_file_and_a_second_retrieve_keeps_the_first(fake_kernel):
    lu = LiveUpdate.open()
    session = lu.create_session("twice")
    with MemFD.create("ram", 4096) as ram:
        ram.write(b"ram")
        session.preserve(ram, 1)
    fake_kernel.kexec()
    for gone in (lu, session):
        gone.detach()
    with LiveUpdate.open() as lu, lu.retrieve_session("twice") as incoming:
        first = incoming.retrieve(1)
        second = incoming.retrieve(1)
        assert (first.token, second.token) == (1, 1) and first.fd != second.fd
        assert first.kind is FileKind.MEMFD and second.kind is FileKind.MEMFD
        # the session still knows the first fd; the second is the caller's alone
        assert incoming.retrieved == {1: first}
        assert incoming.retrieved[1].fd == first.fileno()
        for got in (first, second):
            with MemFD.from_fd(got.fd) as m:
                assert m.read(3) == b"ram"
        incoming.finish()


def test_direction_misuse_is_a_usage_error(fake_kernel):
    with LiveUpdate.open() as lu, lu.create_session("dir") as session:
        with pytest.raises(errors.UsageError, match="outgoing"):
            session.retrieve(1)
        with pytest.raises(errors.UsageError, match="outgoing"):
            session.finish()


def test_round_trip_through_kexec_with_sticky_errors_and_finish(fake_kernel):
    payload = os.urandom(8192)
    lu = LiveUpdate.open()
    session = lu.create_session("vm0")
    with MemFD.create("ram", len(payload)) as ram:
        ram.write(payload)
        session.preserve(ram, 10)
    fake_kernel.kexec()  # the process "dies": every fd is gone, nothing is closed
    for gone in (lu, session):
        gone.detach()
    with LiveUpdate.open() as lu:
        assert lu.try_retrieve_session("other") is None
        session = lu.retrieve_session("vm0")
        assert session.incoming and session.get_name() == "vm0"
        with pytest.raises(errors.InvalidArgument):
            lu.retrieve_session("vm0")  # a session is retrieved once
        with pytest.raises(errors.UsageError, match="incoming"):
            session.preserve(0, 1)
        with pytest.raises(errors.NotFound):
            session.retrieve(99)
        with MemFD.from_fd(session.retrieve(10).fd) as again:
            assert again.read() == payload and again.size == len(payload)
        # a successful retrieve can be repeated: a new fd, the same file
        with MemFD.from_fd(session.retrieve(10).fd) as twice:
            assert twice.read(16) == payload[:16]
        session.finish()
        session.close()


def test_busy_open_names_the_holder(fake_kernel, monkeypatch):
    monkeypatch.setattr(luo, "holders_of", lambda backend, path=luo.DEVICE: [4242])
    with LiveUpdate.open():
        with pytest.raises(errors.Busy) as info:
            LiveUpdate.open()
    assert "pid 4242" in info.value.hint and info.value.errno == E.EBUSY


def test_detach_hands_the_fd_over(fake_kernel):
    lu = LiveUpdate.open()
    fd = lu.detach()
    lu.close()  # no-op: the fd is no longer ours
    with pytest.raises(errors.Busy):
        LiveUpdate.open()
    fake_kernel.close(fd)
    LiveUpdate.open().close()


def test_session_objects_wrap_existing_fds(fake_kernel):
    with LiveUpdate.open() as lu:
        created = lu.create_session("wrap")
        wrapped = Session(created.detach(), "wrap", incoming=False)
        assert wrapped.get_name() == "wrap"
        wrapped.close()


def test_finish_drops_unretrieved_memfds(fake_kernel):
    # memfd has no can_finish: finishing with it unretrieved succeeds and frees it (7.3)
    lu = LiveUpdate.open()
    session = lu.create_session("drop")
    with MemFD.create("ram", 4096) as ram:
        session.preserve(ram, 1)
    fake_kernel.kexec()
    for gone in (lu, session):
        gone.detach()
    with LiveUpdate.open() as lu, lu.retrieve_session("drop") as session:
        session.finish()
        with pytest.raises(errors.KernelError):
            session.retrieve(1)


def test_a_memfd_luo_gives_back_is_described_as_a_memfd(fake_kernel):
    """memfd_luo makes the retrieved file itself (memfd_alloc_file("")): its
    /proc link is "/ (deleted)", not "/memfd:...", as on the real kernel; it is
    still a memfd to every check that asks what a file is."""
    from pyiommufd.luo import LiveUpdate, describe_fd, kind_of_fd
    from pyiommufd.memfd import MemFD

    lu = LiveUpdate.open()
    session = lu.create_session("described")
    memfd = MemFD.create("ram", 4096)
    session.preserve(memfd, 1)
    fake_kernel.kexec()
    with LiveUpdate.open() as lu2:
        fd = lu2.retrieve_session("described").retrieve(1).fd
        assert fake_kernel.files.readlink(f"/proc/self/fd/{fd}") == "/ (deleted)"
        assert describe_fd(fake_kernel, fd) == "a memfd"
        assert kind_of_fd(fake_kernel, fd) is FileKind.MEMFD
    import os
    r, w = os.pipe()
    assert describe_fd(fake_kernel, r) != "a memfd"
    os.close(r), os.close(w)
