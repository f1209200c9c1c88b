"""pyiommufd.kexec on the fake kernel."""
import pytest

from pyiommufd import errors, kexec
from pyiommufd_testing import SimulatedKexec


def test_execute_without_a_loaded_image_is_einval(fake_kernel):
    with pytest.raises(errors.KexecError) as info:
        kexec.execute()
    assert isinstance(info.value, errors.InvalidArgument)


def test_load_reuses_the_cmdline_and_execute_reboots(fake_kernel):
    image = "/srv/bzImage"
    fake_kernel.files.put(image, b"MZ" + bytes(1024))
    used = kexec.load(image)
    assert "liveupdate=on" in used and "BOOT_IMAGE" not in used
    assert kexec.is_loaded()
    boots = fake_kernel.boot_count
    with pytest.raises(SimulatedKexec):
        kexec.execute()
    assert fake_kernel.boot_count == boots + 1


def test_unload(fake_kernel):
    kexec.load("/boot/vmlinuz-7.3.4", cmdline="console=ttyS0")
    kexec.unload()
    assert not kexec.is_loaded()


def test_missing_kernel_image_is_a_typed_error(fake_kernel, tmp_path):
    with pytest.raises(errors.KexecError) as info:
        kexec.load(tmp_path / "nope")
    assert isinstance(info.value, errors.NotFound)


def test_overlong_cmdline_is_refused(fake_kernel, tmp_path):
    with pytest.raises(errors.UsageError):
        kexec.load(tmp_path / "x", cmdline="a" * 5000)


def test_check_image_refuses_a_directory_by_name_even_one_it_cannot_list(tmp_path):
    """The real host: a directory is refused as such, also one without read
    permission (which, for anybody but root, cannot be listed)."""
    from pyiommufd.backend import LinuxBackend

    be = LinuxBackend()
    image = tmp_path / "bzImage"
    image.write_bytes(b"MZ")
    kexec.check_image(str(image), "--kexec", be)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o000)
    for directory in (tmp_path, locked):
        with pytest.raises(errors.UsageError, match="is a directory, not a kernel image"):
            kexec.check_image(str(directory), "--kexec", be)
    with pytest.raises(errors.UsageError, match="no such file"):
        kexec.check_image(str(tmp_path / "none"), "--kexec", be)
