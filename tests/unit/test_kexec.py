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
