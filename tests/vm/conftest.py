"""Fixtures for the VM tier. These tests run inside the QEMU guest (the
pyiommufd pytest plugin boots it and runs pytest there); on the host they are
only collected."""
from __future__ import annotations

import gc
import os
import warnings
from dataclasses import dataclass

import pytest

VIRTIO_VENDOR = 0x1AF4
NETWORK_CLASS = 0x02          # PCI base class "network controller"
PCI_DEVICES = "/sys/bus/pci/devices"


@pytest.fixture(scope="session")
def kernel_release() -> str:
    """``uname -r`` of the kernel the test runs on (printed into the report)."""
    release = os.uname().release
    print(f"kernel release: {release}")
    return release


def find_virtio_net() -> str | None:
    """BDF of the guest's virtio-net device: the one behind the vIOMMU that the
    VM tier hands to vfio-pci. The virtio-9p devices (same vendor) carry the
    host root and the results; they must never be touched."""
    from pyiommufd.pci import PciDevice

    for bdf in sorted(os.listdir(PCI_DEVICES)):
        dev = PciDevice(bdf)
        try:
            if dev.vendor == VIRTIO_VENDOR and dev.class_code >> 16 == NETWORK_CLASS:
                return dev.bdf
        except OSError:
            continue
    return None


@dataclass
class VfioDevice:
    bdf: str
    cdev: str            # /dev/vfio/devices/vfioN
    binding: object      # pyiommufd.pci.VfioBinding


@pytest.fixture
def vfio_device(request):
    """The virtio-net device bound to vfio-pci (driver_override + drivers_probe),
    as ``VfioDevice(bdf, cdev, binding)``; restored to its driver afterwards.

    In ``@pytest.mark.pyiommufd_kexec`` tests the device is left on vfio-pci at teardown:
    a preserved device must stay with vfio-pci through the kexec."""
    from pyiommufd.pci import PciDevice

    bdf = find_virtio_net()
    if bdf is None:
        pytest.fail("no virtio-net PCI device in the guest (the VM runner adds one)")
    dev = PciDevice(bdf)
    binding = dev.bind_vfio()
    cdev = binding.vfio_cdev
    if cdev is None or not os.path.exists(cdev):
        binding.restore()
        pytest.fail(f"{bdf} is on vfio-pci but has no VFIO cdev (CONFIG_VFIO_DEVICE_CDEV?)")
    print(f"vfio device: {bdf} -> {cdev}")
    yield VfioDevice(bdf, cdev, binding)
    if request.node.get_closest_marker("pyiommufd_kexec") is not None:
        return
    # Unbinding vfio-pci blocks until every fd of the device is closed: a test
    # that failed with the cdev still open (its frames keep the objects alive)
    # would hang the guest here. Leave the device on vfio-pci then.
    gc.collect()
    from pyiommufd.luo import holders_of
    from pyiommufd.backend import get_backend

    holders = holders_of(get_backend(), cdev)
    if holders:
        warnings.warn(f"{cdev} is still open (pids {holders}); {bdf} left on vfio-pci")
        return
    binding.restore()


@pytest.fixture(scope="session")
def kernel_caps():
    """What this kernel has (pyiommufd_testing.capabilities.KernelCaps): the LU
    ioctl at the configured nr, an iommufd and a vfio-pci live-update handler.
    Probed once in stage 1 with the test device on vfio-pci, and kept in the
    results share for stage 2 (after a kexec a preserved device cannot be used
    for probing)."""
    from pathlib import Path

    from pyiommufd.pci import PciDevice
    from pyiommufd_testing import pytest_plugin
    from pyiommufd_testing.capabilities import KernelCaps, probe

    saved = Path(os.environ.get("PYIOMMUFD_VM_RESULTS") or "/run/pyiommufd-results") / "kernel-caps.json"
    if os.environ.get("PYIOMMUFD_LU_STAGE") == "2" and saved.exists():
        caps = KernelCaps.load(saved)
    else:
        bdf = find_virtio_net()
        binding = PciDevice(bdf).bind_vfio() if bdf else None
        try:
            caps = probe(liveupdate=pytest_plugin._SHARED.get("liveupdate"),
                         vfio_cdev=binding.vfio_cdev if binding else None)
        finally:
            if binding is not None:
                binding.restore()
        try:
            caps.save(saved)
        except OSError:
            pass
    print(f"kernel capabilities: {caps.describe()}")
    return caps


@pytest.fixture
def driver(request):
    """The fail-nth driver (tests/vm/fail_nth.py) with the kernel set up for it;
    its summary goes into the VM tier's terminal summary."""
    import fail_nth as F
    from pyiommufd_testing.pytest_plugin import SUMMARY_SECTION

    old = F.configure_kernel()
    log, nth = F.KernelLog(), F.FailNth()
    drv = F.Driver(log, nth)
    yield drv
    nth.close()
    log.close()
    F.restore_kernel(old)
    if not drv.results:
        return
    text = F.summary(drv.results)
    print(text)
    request.node.add_report_section("call", SUMMARY_SECTION, f"fail-nth, {request.node.name}:\n{text}")
