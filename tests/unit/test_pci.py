"""pyiommufd.pci against the fake kernel's /sys/bus/pci."""
from __future__ import annotations

import pytest

from pyiommufd import errors, pci
from pyiommufd.backend import Backend
from pyiommufd_testing import FakeKernel, FakePciDevice
from pyiommufd.vfio import VfioDevice

BDF = "0000:00:03.0"


class Untouchable(Backend):
    """Fails the test on any syscall: proves validation happens first."""

    name = "untouchable"

    def __getattribute__(self, name):
        if name in ("name", "__class__", "__dict__"):
            return object.__getattribute__(self, name)
        raise AssertionError(f"backend.{name} was called")


@pytest.fixture
def two_devices():
    from pyiommufd import backend
    kernel = FakeKernel(devices=[
        FakePciDevice(bdf=BDF, vendor=0x1AF4, device=0x1041, driver="virtio-pci", iommu_group=3),
        FakePciDevice(bdf="0000:00:04.0", vendor=0x8086, device=0x10D3, driver=None, iommu_group=4),
    ])
    with backend.use(kernel):
        try:
            yield kernel
        finally:
            kernel.shutdown()


# -- BDF parsing --------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("00:03.0", "0000:00:03.0"),
    ("0000:00:03.0", "0000:00:03.0"),
    ("0000:AF:1F.7", "0000:af:1f.7"),
    ("0001:00:00.1", "0001:00:00.1"),
    ("10000:e1:00.0", "10000:e1:00.0"),     # VMD domains are wider than 4 digits
])
def test_normalize_bdf(text, expected):
    assert pci.normalize_bdf(text) == expected
    assert pci.is_bdf(text)


@pytest.mark.parametrize("text", [
    "", "0:3.0", "00:3.0", "00:03", "00:03.8", "0000:00:20.0", "000:00:03.0", "0000:00:03.0\n",
    " 0000:00:03.0", "0000:00:03.0/../../..", "../0000:00:03.0", "0000:g0:03.0", "vfio0",
    "/dev/vfio/devices/vfio0",
])
def test_normalize_bdf_rejects(text):
    with pytest.raises(errors.UsageError):
        pci.normalize_bdf(text)
    assert not pci.is_bdf(text)


def test_normalize_bdf_rejects_non_strings():
    with pytest.raises(errors.UsageError):
        pci.normalize_bdf(3)  # type: ignore[arg-type]


def test_bdf_from_parts():
    assert pci.bdf_from_parts(0, 0, 0x18) == "0000:00:03.0"
    assert pci.bdf_from_parts(1, 0xAF, 0xFF) == "0001:af:1f.7"


@pytest.mark.parametrize("call", [
    lambda be: pci.PciDevice("00:03", be),
    lambda be: pci.PciDevice("0000:00:03.0\n", be),
    lambda be: VfioDevice.open("00:3.0", backend=be),
])
def test_bad_bdf_fails_before_any_syscall(call):
    with pytest.raises(errors.UsageError):
        call(Untouchable())


def test_bad_driver_names_fail_before_any_write(fake_kernel):
    dev = pci.PciDevice(BDF)
    for bad in ("", "../vfio-pci", "vfio pci", "vfio-pci\n"):
        with pytest.raises(errors.UsageError):
            dev.set_driver_override(bad)
        with pytest.raises(errors.UsageError):
            dev.bind(bad)
    assert dev.driver_override is None


# -- reading sysfs ------------------------------------------------------------------
def test_properties(fake_kernel):
    dev = pci.PciDevice("00:03.0")
    assert dev.bdf == BDF and dev.path == f"/sys/bus/pci/devices/{BDF}"
    assert dev.exists
    assert dev.require() is dev
    assert (dev.vendor, dev.device, dev.class_code) == (0x1AF4, 0x1041, 0x020000)
    assert dev.driver == "virtio-pci"
    assert dev.driver_override is None
    assert dev.iommu_group == 3
    assert dev.vfio_cdev is None and dev.vfio_cdev_name is None
    assert repr(dev) == f"<PciDevice {BDF}>"
    assert dev == pci.PciDevice(BDF) and hash(dev) == hash(pci.PciDevice("00:03.0"))


def test_missing_device(fake_kernel):
    dev = pci.PciDevice("0000:00:1f.0")
    assert not dev.exists
    with pytest.raises(errors.SysfsError) as info:
        dev.require()
    assert isinstance(info.value, errors.NotFound)
    with pytest.raises(errors.NotFound) as info:
        dev.vendor
    assert isinstance(info.value, errors.SysfsError)
    assert dev.driver is None and dev.iommu_group is None and dev.vfio_cdev is None
    snap = dev.info()
    assert snap.bdf == "0000:00:1f.0" and snap.vendor is None and snap.driver is None


def test_info_and_list_devices(two_devices):
    infos = pci.list_devices()
    assert [i.bdf for i in infos] == [BDF, "0000:00:04.0"]
    first, second = infos
    assert first == pci.PciDevice(BDF).info()
    assert first.as_dict() == {"bdf": BDF, "vendor": 0x1AF4, "device": 0x1041, "class_code": 0x020000,
                               "driver": "virtio-pci", "driver_override": None, "iommu_group": 3,
                               "vfio_cdev": None}
    assert second.driver is None and second.vendor == 0x8086 and second.iommu_group == 4
    assert pci.PciDevice.list_devices() == infos


def test_list_devices_shows_cdevs(two_devices):
    pci.PciDevice("0000:00:04.0").bind_vfio()
    by_bdf = {i.bdf: i for i in pci.list_devices()}
    assert by_bdf["0000:00:04.0"].driver == "vfio-pci"
    assert by_bdf["0000:00:04.0"].vfio_cdev.startswith("/dev/vfio/devices/vfio")
    assert by_bdf[BDF].vfio_cdev is None
    found = pci.find_by_cdev(by_bdf["0000:00:04.0"].vfio_cdev)
    assert found == pci.PciDevice("0000:00:04.0")
    assert pci.find_by_cdev("vfio99") is None


# -- binding ----------------------------------------------------------------------------
def test_bind_vfio_and_restore(fake_kernel):
    dev = pci.PciDevice(BDF)
    binding = dev.bind_vfio()
    assert isinstance(binding, pci.VfioBinding)
    assert (binding.original_driver, binding.original_override, binding.bdf) == ("virtio-pci", None, BDF)
    assert dev.driver == "vfio-pci" and dev.driver_override == "vfio-pci"
    assert dev.vfio_cdev == "/dev/vfio/devices/vfio0" == binding.vfio_cdev
    assert dev.original_driver == "virtio-pci"
    assert dev.restore() == "virtio-pci"
    assert dev.driver == "virtio-pci" and dev.driver_override is None and dev.vfio_cdev is None


def test_binding_is_a_context_manager(fake_kernel):
    dev = pci.PciDevice(BDF)
    with dev.bind_vfio() as binding:
        assert dev.driver == "vfio-pci"
        with VfioDevice.open(BDF) as cdev:
            assert cdev.path == binding.vfio_cdev
    assert dev.driver == "virtio-pci"


def test_bind_vfio_twice_keeps_the_original(fake_kernel):
    dev = pci.PciDevice(BDF)
    dev.bind_vfio()
    again = dev.bind_vfio()
    assert again.original_driver == "virtio-pci"
    assert dev.restore() == "virtio-pci"


def test_bind_vfio_of_a_device_already_on_vfio(fake_kernel):
    pci.PciDevice(BDF).bind_vfio()
    other = pci.PciDevice(BDF)          # a fresh object: it did not move the device
    binding = other.bind_vfio()
    assert binding.original_driver == "vfio-pci"
    # restore() without our own bind only undoes a vfio-pci override
    assert other.restore() == "virtio-pci"
    assert other.driver_override is None


def test_restore_of_an_originally_unbound_device(two_devices):
    dev = pci.PciDevice("0000:00:04.0")
    assert dev.driver is None
    dev.bind_vfio()
    assert dev.driver == "vfio-pci"
    assert dev.restore() is None
    assert dev.driver is None and dev.driver_override is None


def test_restore_keeps_a_foreign_override(fake_kernel):
    dev = pci.PciDevice(BDF)
    dev.unbind()
    dev.set_driver_override("pci-stub")
    dev.probe()
    assert dev.driver == "pci-stub"
    assert dev.restore() == "pci-stub"          # not ours to undo
    assert dev.driver_override == "pci-stub"


def test_bind_vfio_of_a_missing_device(fake_kernel):
    with pytest.raises(errors.SysfsError) as info:
        pci.PciDevice("0000:00:1f.0").bind_vfio()
    assert isinstance(info.value, errors.NotFound)


def test_unbind_probe_and_explicit_bind(fake_kernel):
    dev = pci.PciDevice(BDF)
    assert dev.unbind() == "virtio-pci"
    assert dev.driver is None
    assert dev.unbind() is None                 # idempotent
    dev.probe()
    assert dev.driver == "virtio-pci"
    dev.unbind()
    dev.bind("virtio-pci")
    assert dev.driver == "virtio-pci"


def test_set_driver_override(fake_kernel):
    dev = pci.PciDevice(BDF)
    dev.set_driver_override("vfio-pci")
    assert dev.driver_override == "vfio-pci"
    dev.set_driver_override(None)
    assert dev.driver_override is None


def test_sysfs_write_errors_are_typed(fake_kernel):
    dev = pci.PciDevice(BDF)
    dev.unbind()
    with pytest.raises(errors.SysfsError) as info:
        dev.bind("pci-pf-stub")                 # its ID table does not match: ENODEV
    err = info.value
    assert isinstance(err, errors.NoDevice) and err.interface == "sysfs"
    assert err.op == "write(/sys/bus/pci/drivers/pci-pf-stub/bind)"
    assert "driver_override" in err.hint
    dev.probe()
    with pytest.raises(errors.SysfsError) as info:
        dev.bind("virtio-pci")                  # bound already: EBUSY
    assert isinstance(info.value, errors.Busy)


def test_sysfs_writes_need_root():
    from pyiommufd import backend
    kernel = FakeKernel(euid=1000)
    with backend.use(kernel):
        try:
            dev = pci.PciDevice(BDF)
            assert dev.driver == "virtio-pci"   # reading is fine
            with pytest.raises(errors.SysfsError) as info:
                dev.bind_vfio()
            assert isinstance(info.value, errors.PermissionDenied)
        finally:
            kernel.shutdown()


def test_restore_after_a_live_update_is_refused(series_kernel, kt):
    """After kexec a preserved device takes only vfio-pci: giving it back to its
    original driver fails with EBUSY from sysfs (seed-spec 4.7)."""
    iommufd, memfd_fd, cdev, ioas, hwpt, devid = kt.device_setup()
    luo_fd = kt.luo()
    session = kt.create_session(luo_fd, "pci")
    kt.preserve(session, memfd_fd, 1)
    kt.preserve(session, iommufd, 2)
    kt.preserve(session, cdev, 3)
    series_kernel.kexec()
    dev = pci.PciDevice(BDF)
    assert dev.driver is None                   # virtio-pci lost the boot-time probe
    binding = dev.bind_vfio()
    assert binding.original_driver is None and dev.driver == "vfio-pci"
    dev.original_driver = "virtio-pci"          # as a bind-state file would remember it
    with pytest.raises(errors.SysfsError) as info:
        dev.restore()
    assert isinstance(info.value, errors.Busy)
    assert "vfio-pci" in info.value.hint and "cover letter" in info.value.hint
