"""The VM tier itself: the guest runs our 7.3 kernel with the options the
fragment asks for, the vfio fixture yields a cdev, and a memfd preserved in a
LUO session survives a real kexec."""
from __future__ import annotations

import gzip
import hashlib
import os
import stat

import pytest

from pyiommufd.vm import kernel as vmkernel

CORE_OPTIONS = ("CONFIG_IOMMUFD", "CONFIG_VFIO_DEVICE_CDEV", "CONFIG_INTEL_IOMMU",
                "CONFIG_IRQ_REMAP", "CONFIG_KEXEC_FILE", "CONFIG_KEXEC_HANDOVER",
                "CONFIG_LIVEUPDATE", "CONFIG_LIVEUPDATE_MEMFD")


def _running_config() -> str:
    with gzip.open("/proc/config.gz", "rt") as f:
        return f.read()


def test_guest_runs_the_vm_kernel(kernel_release):
    image = os.environ.get("PYIOMMUFD_VM_KERNEL")
    assert image, "the VM runner passes the booted bzImage in PYIOMMUFD_VM_KERNEL"
    assert vmkernel.bzimage_release(image) == kernel_release
    assert kernel_release.startswith("7.3") or "/kernels/" not in image


def test_running_config_has_the_fragment(kernel_release):
    config = _running_config()
    image = os.path.realpath(os.environ.get("PYIOMMUFD_VM_KERNEL", ""))
    if os.path.dirname(image) == str(vmkernel.kernel_dir()):
        # Our own build: every option of kernel.fragment must be there.
        assert vmkernel.missing_options(vmkernel.fragment_text(), config) == []
    else:
        # A user kernel (--vm-kernel): at least what the VM tier needs.
        have = vmkernel.parse_config(config)
        assert [o for o in CORE_OPTIONS if have.get(o) != "y"] == []


def test_kernel_command_line():
    words = open("/proc/cmdline").read().split()
    for need in ("intel_iommu=on", "liveupdate=on", "console=ttyS0"):
        assert need in words


@pytest.mark.parametrize("path", ["/dev/iommu", "/dev/liveupdate", "/dev/vfio/vfio"])
def test_char_devices(path):
    assert stat.S_ISCHR(os.stat(path).st_mode), path


def test_emulated_vtd_is_active():
    units = [n for n in os.listdir("/sys/class/iommu") if n.startswith("dmar")]
    assert units, os.listdir("/sys/class/iommu")


def test_vfio_fixture_yields_a_cdev(vfio_device):
    from pyiommufd.pci import PciDevice

    st = os.stat(vfio_device.cdev)
    assert stat.S_ISCHR(st.st_mode)
    assert vfio_device.cdev.startswith("/dev/vfio/devices/vfio")
    assert PciDevice(vfio_device.bdf).driver == "vfio-pci"
    assert PciDevice(vfio_device.bdf).iommu_group is not None
    fd = os.open(vfio_device.cdev, os.O_RDWR | os.O_CLOEXEC)
    os.close(fd)


_LEAKED: list[tuple[str, int]] = []


def test_vfio_fixture_teardown_with_a_leaked_cdev_fd(vfio_device):
    # Unbinding vfio-pci waits for every fd of the device: the fixture must see
    # the open fd and leave the device alone instead of hanging the guest.
    _LEAKED.append((vfio_device.bdf, os.open(vfio_device.cdev, os.O_RDWR | os.O_CLOEXEC)))


def test_leaked_cdev_fd_closed_and_device_restored():
    from pyiommufd.pci import PciDevice

    assert _LEAKED, "runs after test_vfio_fixture_teardown_with_a_leaked_cdev_fd"
    bdf, fd = _LEAKED.pop()
    dev = PciDevice(bdf)
    assert dev.driver == "vfio-pci"          # the fixture left it there
    os.close(fd)
    assert dev.restore() == "virtio-pci"


SESSION = "pyiommufd-vm-infra"
TOKEN = 0x5EED
SIZE = 64 * 1024


@pytest.mark.pyiommufd_kexec
def test_memfd_survives_kexec(lu_stage, kernel_release):
    from pyiommufd.memfd import MemFD

    lu = lu_stage.liveupdate
    if lu_stage.stage == 1:
        data = os.urandom(SIZE)
        memfd = MemFD.create("vm-infra", SIZE)
        memfd.write(data)
        session = lu.create_session(SESSION)
        session.preserve(memfd, TOKEN)
        lu_stage.save("sha256", hashlib.sha256(data).hexdigest())
        lu_stage.save("release", kernel_release)
        lu_stage.save("boot", lu_stage.boot)
        lu_stage.keep(session, memfd)
        return
    session = lu.retrieve_session(SESSION)
    fd = session.retrieve(TOKEN).fd
    memfd = MemFD.from_fd(fd)
    assert memfd.size == SIZE
    assert hashlib.sha256(memfd.read(SIZE)).hexdigest() == lu_stage.load("sha256")
    assert kernel_release == lu_stage.load("release")
    assert lu_stage.boot > lu_stage.load("boot")
    memfd.close()
    session.finish()
    session.close()
