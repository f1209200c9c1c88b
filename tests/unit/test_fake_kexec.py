"""Simulated kexec: kexec_file_load, reboot(KEXEC), the LUO hand-over,
incoming sessions (seed-spec 3.3-3.4, 4.1)."""
import errno
import os

import pytest

from pyiommufd import errors, ioctl
from pyiommufd.backend import LINUX_REBOOT_CMD_KEXEC, KEXEC_FILE_NO_INITRAMFS, KEXEC_FILE_UNLOAD
from pyiommufd_testing import FakeKernel, SimulatedKexec


def load_image(k, cmdline=None):
    kernel = k.open(f"/boot/vmlinuz-{k.kernel_release()}", os.O_RDONLY)
    initrd = k.open(f"/boot/initrd.img-{k.kernel_release()}", os.O_RDONLY)
    k.kexec_file_load(kernel, initrd, cmdline if cmdline is not None else k.files.read_text("/proc/cmdline").strip(), 0)


# -- kexec_file_load / reboot ----------------------------------------------------------
def test_reboot_without_image_is_einval(fake_kernel):
    with pytest.raises(OSError) as exc:
        fake_kernel.reboot(LINUX_REBOOT_CMD_KEXEC)
    assert exc.value.errno == errno.EINVAL
    assert fake_kernel.boot_count == 1


def test_kexec_file_load_checks(fake_kernel):
    with pytest.raises(OSError) as exc:
        fake_kernel.kexec_file_load(-1, -1, "", KEXEC_FILE_NO_INITRAMFS)
    assert exc.value.errno == errno.EBADF
    kernel = fake_kernel.open(f"/boot/vmlinuz-{fake_kernel.kernel_release()}", os.O_RDONLY)
    with pytest.raises(OSError) as exc:
        fake_kernel.kexec_file_load(kernel, -1, "", 0)        # initrd needed
    assert exc.value.errno == errno.EBADF
    with pytest.raises(OSError) as exc:
        fake_kernel.kexec_file_load(kernel, -1, "", 0x1000)
    assert exc.value.errno == errno.EINVAL
    fake_kernel.kexec_file_load(kernel, -1, "console=ttyS0", KEXEC_FILE_NO_INITRAMFS)
    assert fake_kernel.files.read_text("/sys/kernel/kexec_loaded") == "1\n"
    fake_kernel.kexec_file_load(-1, -1, "", KEXEC_FILE_UNLOAD)
    assert fake_kernel.files.read_text("/sys/kernel/kexec_loaded") == "0\n"


def test_kexec_needs_root():
    with FakeKernel(euid=1000) as k:
        with pytest.raises(PermissionError):
            k.kexec_file_load(0, 0, "", KEXEC_FILE_NO_INITRAMFS)
        with pytest.raises(PermissionError):
            k.reboot(LINUX_REBOOT_CMD_KEXEC)


def test_kexec_load_disabled(fake_kernel):
    fake_kernel.files.write_text("/proc/sys/kernel/kexec_load_disabled", "1")
    with pytest.raises(PermissionError):
        load_image(fake_kernel)


def test_reboot_raises_simulated_kexec_and_closes_every_fd(fake_kernel, kt):
    luo = kt.luo()
    iommufd = kt.iommufd()
    mfd = kt.memfd()
    load_image(fake_kernel)
    with pytest.raises(SimulatedKexec) as exc:
        fake_kernel.reboot(LINUX_REBOOT_CMD_KEXEC)
    assert not isinstance(exc.value, Exception)
    assert exc.value.boot_count == fake_kernel.boot_count == 2
    for fd in (luo, iommufd, mfd):
        with pytest.raises(OSError):
            os.fstat(fd)
    assert fake_kernel.known_fds() == {}
    assert not fake_kernel.kexec_loaded
    kt.luo()            # the new boot's /dev/liveupdate is free


def test_next_boot_uses_the_image_cmdline(fake_kernel, kt):
    load_image(fake_kernel, "root=/dev/vda console=ttyS0")      # no liveupdate=on
    with pytest.raises(SimulatedKexec):
        fake_kernel.reboot(LINUX_REBOOT_CMD_KEXEC)
    assert fake_kernel.files.read_text("/proc/cmdline") == "root=/dev/vda console=ttyS0\n"
    assert not fake_kernel.files.exists("/dev/liveupdate")


# -- hand-over of sessions -------------------------------------------------------------------
def test_only_open_outgoing_sessions_are_handed_over(fake_kernel, kt):
    luo = kt.luo()
    kt.preserve(kt.create_session(luo, "kept"), kt.memfd(), 1)
    fake_kernel.close(kt.create_session(luo, "closed"))
    fake_kernel.kexec()
    luo = kt.luo()
    kt.retrieve_session(luo, "kept")
    with pytest.raises(errors.NotFound):
        kt.retrieve_session(luo, "closed")


def test_empty_session_is_handed_over(fake_kernel, kt):
    kt.create_session(kt.luo(), "empty")
    fake_kernel.kexec()
    s = kt.retrieve_session(kt.luo(), "empty")
    kt.finish(s)


def test_retrieve_session_twice_is_einval(fake_kernel, kt):
    kt.create_session(kt.luo(), "a")
    fake_kernel.kexec()
    luo = kt.luo()
    kt.retrieve_session(luo, "a")
    with pytest.raises(errors.InvalidArgument):
        kt.retrieve_session(luo, "a")


def test_incoming_and_outgoing_names_are_separate(fake_kernel, kt):
    kt.create_session(kt.luo(), "a")
    fake_kernel.kexec()
    luo = kt.luo()
    kt.create_session(luo, "a")
    kt.retrieve_session(luo, "a")


def test_memfd_contents_seals_size_and_position_survive(fake_kernel, kt):
    luo = kt.luo()
    s = kt.create_session(luo, "a")
    mfd = kt.memfd(size=3 << 20, seals=None)
    fake_kernel.pwrite(mfd, b"head", 0)
    fake_kernel.pwrite(mfd, b"tail", (3 << 20) - 4)
    fake_kernel.fcntl(mfd, 1033, 0x1 | 0x2 | 0x4)
    os.lseek(mfd, 12345, os.SEEK_SET)
    kt.preserve(s, mfd, 0x890123)
    fake_kernel.pwrite(mfd, b"late", 4096)         # written after preserve, before kexec
    fake_kernel.kexec()
    s = kt.retrieve_session(kt.luo(), "a")
    new = kt.retrieve(s, 0x890123)
    assert fake_kernel.fstat_size(new) == 3 << 20
    assert fake_kernel.pread(new, 4, 0) == b"head"
    assert fake_kernel.pread(new, 4, 4096) == b"late"
    assert fake_kernel.pread(new, 4, (3 << 20) - 4) == b"tail"
    assert fake_kernel.fcntl(new, 1034) == 0x7
    assert os.lseek(new, 0, os.SEEK_CUR) == 12345
    # memfd_luo makes the file itself (memfd_alloc_file("")): no "memfd:" prefix, as on 7.3
    assert fake_kernel.files.readlink(f"/proc/self/fd/{new}") == "/ (deleted)"


def test_retrieve_unknown_token(fake_kernel, kt):
    kt.preserve(kt.create_session(kt.luo(), "a"), kt.memfd(), 1)
    fake_kernel.kexec()
    s = kt.retrieve_session(kt.luo(), "a")
    with pytest.raises(errors.NotFound):
        kt.retrieve(s, 2)


def test_repeated_retrieve_gives_new_fd_to_same_file(fake_kernel, kt):
    kt.preserve(kt.create_session(kt.luo(), "a"), kt.memfd(data=b"x"), 1)
    fake_kernel.kexec()
    s = kt.retrieve_session(kt.luo(), "a")
    first = kt.retrieve(s, 1)
    os.lseek(first, 100, os.SEEK_SET)
    second = kt.retrieve(s, 1)
    assert first != second
    assert os.fstat(first).st_ino == os.fstat(second).st_ino
    assert os.lseek(second, 0, os.SEEK_CUR) == 100        # same struct file
    assert not os.get_inheritable(second)


def test_retrieved_memfd_is_unfrozen_and_not_preserved(fake_kernel, kt):
    kt.preserve(kt.create_session(kt.luo(), "a"), kt.memfd(seals=None), 1)
    fake_kernel.kexec()
    luo = kt.luo()
    s = kt.retrieve_session(luo, "a")
    new = kt.retrieve(s, 1)
    fake_kernel.ftruncate(new, 8192)
    with pytest.raises(errors.Busy):        # still held by the incoming session
        kt.preserve(kt.create_session(luo, "b"), new, 1)
    kt.finish(s)
    kt.preserve(kt.create_session(luo, "c"), new, 1)


# -- FINISH --------------------------------------------------------------------------------------
def test_finish_reserved_must_be_zero(fake_kernel, kt):
    kt.create_session(kt.luo(), "a")
    fake_kernel.kexec()
    s = kt.retrieve_session(kt.luo(), "a")
    with pytest.raises(errors.InvalidArgument):
        ioctl.call(fake_kernel, s, kt.D.FINISH, reserved=1)


def test_finish_discards_an_unretrieved_memfd(fake_kernel, kt):
    """memfd has no can_finish (K:mm/memfd_luo.c:597-605): FINISH succeeds."""
    kt.preserve(kt.create_session(kt.luo(), "a"), kt.memfd(), 1)
    fake_kernel.kexec()
    s = kt.retrieve_session(kt.luo(), "a")
    kt.finish(s)
    with pytest.raises(errors.NotFound):
        kt.retrieve(s, 1)
    kt.finish(s)            # nothing left: still fine


def test_closing_incoming_session_finishes_it(fake_kernel, kt):
    kt.preserve(kt.create_session(kt.luo(), "a"), kt.memfd(), 1)
    fake_kernel.kexec()
    luo = kt.luo()
    fake_kernel.close(kt.retrieve_session(luo, "a"))
    with pytest.raises(errors.NotFound):
        kt.retrieve_session(luo, "a")


def test_unfinished_incoming_sessions_do_not_survive_another_kexec(fake_kernel, kt):
    kt.preserve(kt.create_session(kt.luo(), "a"), kt.memfd(), 1)
    fake_kernel.kexec()
    fake_kernel.kexec()
    with pytest.raises(errors.NotFound):
        kt.retrieve_session(kt.luo(), "a")


def test_sessions_chain_over_two_kexecs(fake_kernel, kt):
    """A file retrieved after one update can be preserved for the next."""
    kt.preserve(kt.create_session(kt.luo(), "a"), kt.memfd(data=b"gen1"), 1)
    fake_kernel.kexec()
    luo = kt.luo()
    s = kt.retrieve_session(luo, "a")
    new = kt.retrieve(s, 1)
    kt.finish(s)
    kt.preserve(kt.create_session(luo, "b"), new, 2)
    fake_kernel.kexec()
    assert fake_kernel.boot_count == 3
    luo = kt.luo()
    with pytest.raises(errors.NotFound):
        kt.retrieve_session(luo, "a")
    assert fake_kernel.pread(kt.retrieve(kt.retrieve_session(luo, "b"), 2), 4, 0) == b"gen1"


def test_stage1_cleanup_after_the_reboot_does_not_fail(fake_kernel, kt):
    """Unwinding after SimulatedKexec may close fds the kexec closed already:
    that is silent, and new fds never take those numbers."""
    luo = kt.luo()
    session = kt.create_session(luo, "a")
    load_image(fake_kernel)
    try:
        try:
            fake_kernel.reboot(LINUX_REBOOT_CMD_KEXEC)
        finally:
            fake_kernel.close(session)
    except SimulatedKexec:
        pass
    fresh = [kt.iommufd() for _ in range(4)] + [kt.luo()]
    assert luo not in fresh
    fake_kernel.close(luo)                  # the stale close leaves the new files alone
    for fd in fresh:
        os.fstat(fd)
    with pytest.raises(OSError):
        fake_kernel.close(luo)              # only once
