"""fail-nth over the flows that preserve an iommufd (the selftest's stage 1, a
plain preserve), each in a VM of its own, on the kernels that have the series'
iommufd handler: each oopses the kernel (README, "Reliability"), which would
take every other test of a shared guest down with it. Whether a run reaches
the oops depends on which allocation its faults land on, which varies from run
to run: a run that oopses with the test's own oops (recognised in the serial
log) is an xfail with the evidence; a run that does not must pass with 0
failures; any other oops or failure fails."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyiommufd_testing.host_vm import kernel_image, parametrize_by_kernel
from pyiommufd_testing.pytest_plugin import KernelTarget
from pyiommufd.vm import runner

GUEST_PROGRAM = Path(__file__).with_name("guest_fail_nth_preserving_iommufd.py")
TIMEOUT = 600.0


class KnownOops:
    """The kernel bug a test may run into: its RIP line and its explanation."""

    rip: str
    reason: str


class SeriesV1PreserveOops(KnownOops):
    rip = "RIP: 0010:iommufd_liveupdate_preserve+"
    reason = ("series v1: iommufd_liveupdate_preserve() tests kho_alloc_preserve()'s "
              "ERR_PTR(-ENOMEM) for NULL and writes through it: 'BUG: unable to handle page "
              "fault for address: fffffffffffffff4', RIP iommufd_liveupdate_preserve+0x4b")


class AcpiPrtOops(KnownOops):
    rip = "RIP: 0010:acpi_ut_update_object_reference+"
    reason = ("Linux 7.3 ACPICA: an allocation failed while vfio-pci's open evaluated _PRT "
              "('AE_NO_MEMORY, Could not update object reference count'); the device's close "
              "then evaluates _PRT again and faults in acpi_ut_update_object_reference "
              "(pci_disable_device <- vfio_pci_core_disable)")


pytest_generate_tests = parametrize_by_kernel


def run_flow(target: KernelTarget, flow: str, known: type[KnownOops]) -> None:
    image = kernel_image(target)
    job = runner.command_job([runner.python_executable(), str(GUEST_PROGRAM), flow], env=target.env)
    res = runner.run(job, kernel=str(image.bzimage), timeout=TIMEOUT, progress=print)
    output = res.stages[0].output() if res.stages else ""
    print(output)
    print(f"VM: {res.summary()}")
    if "no iommufd handler" in output:
        pytest.skip(f"kernel {target.name} has no iommufd LUO handler")
    serial = res.serial_log.read_text(errors="replace") if res.serial_log.exists() else ""
    if known.rip in serial and "Kernel panic" in serial:
        evidence = [ln for ln in serial.splitlines()
                    if ln.startswith(("BUG:", "ACPI Error: AE_NO_MEMORY", known.rip))]
        pytest.xfail(known.reason + "\n" + "\n".join(dict.fromkeys(evidence)))
    assert res.ok, f"{res.summary()}\nserial log tail:\n{res.serial_tail(30)}"
    totals = re.search(r"fail-nth: \d+ flows x (\d+) injection points, (\d+) failures", output)
    assert totals, "the guest printed no fail-nth totals"
    assert int(totals[1]) > 0 and int(totals[2]) == 0, totals[0]


def test_selftest_stage1_under_fail_nth(target: KernelTarget):
    run_flow(target, "selftest", AcpiPrtOops)


def test_preserve_iommufd_under_fail_nth(target: KernelTarget):
    run_flow(target, "preserve", SeriesV1PreserveOops)
