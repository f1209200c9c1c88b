"""The VMM live update with a real QEMU 11.1 and a real nested Linux guest.

``test_qemu_on_host.py`` runs QEMU on this host over the fake kernel's LUO (a
simulated kexec), for the flows' failure paths; ``test_vm_survives_kexec.py``
runs the whole demonstration in a test VM on every kernel of the tier, across
a real kexec. Both are tier ``vm``: they need the fetched QEMU and a built
kernel, and with CI=true a missing one fails instead of skipping.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from pyiommufd import backend
from pyiommufd.qemu import binary
from pyiommufd.vm import kernel as vmkernel, nested_guest
from pyiommufd_testing.fake import FakeKernel
from pyiommufd_testing.host_vm import mark_as_vm_tier, vm_did_not_run


def pytest_collection_modifyitems(config, items):
    mark_as_vm_tier(config, items, "vmm")


@pytest.fixture(scope="session")
def qemu11() -> binary.Qemu:
    try:
        qemu = binary.resolve(progress=print)
        qemu.missing(set(binary.Feature))       # asked once, here: the guests read the answers
        return qemu
    except binary.QemuError as exc:
        vm_did_not_run("the VMM tests", str(exc))


@pytest.fixture(scope="session")
def nested_kernel() -> str:
    try:
        return str(vmkernel.resolve_kernel(None, progress=print).bzimage)
    except vmkernel.KernelBuildError as exc:
        vm_did_not_run("the VMM tests", f"no kernel for the nested guest: {exc}")


@pytest.fixture(scope="session")
def nested_initrd() -> str:
    return str(nested_guest.build_initramfs())


@pytest.fixture
def fake() -> Iterator[FakeKernel]:
    kernel = FakeKernel()
    with backend.use(kernel):
        try:
            yield kernel
        finally:
            kernel.shutdown()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # short: QMP sockets live here, and AF_UNIX paths are limited to 107 bytes
    d = Path(tempfile.mkdtemp(prefix="pyiommufd-vmm-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    from demo_results import REPORTS

    if not REPORTS:
        return
    tr = terminalreporter
    tr.section("VMM live update: a nested Linux guest across a real kexec of its host, per kernel")
    for kernel, report in REPORTS.items():
        tr.write_line(f"[{kernel}]")
        for line in report.splitlines():
            tr.write_line(f"  {line}")
