"""fail-nth over the flows that preserve an iommufd (the selftest's stage 1, a plain
preserve) on the kernels that have the series'
iommufd handler, in a VM of its own: on the series v1 the injected fault oopses
the kernel (README, "Reliability"), which would take every other test of a
shared guest down with it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyiommufd.testing.pytest_plugin import KernelTarget, kernel_targets
from pyiommufd.vm import kernel as vmkernel, runner

GUEST_PROGRAM = Path(__file__).with_name("guest_fail_nth_preserving_iommufd.py")
TIMEOUT = 600.0
#: the series v1 checks kho_alloc_preserve() for NULL, but it returns ERR_PTR(-ENOMEM)
SERIES_V1_OOPS = ("series v1: iommufd_liveupdate_preserve() tests kho_alloc_preserve()'s "
                  "ERR_PTR(-ENOMEM) for NULL and writes through it: 'BUG: unable to handle page "
                  "fault for address: fffffffffffffff4', RIP iommufd_liveupdate_preserve+0x4b")


def pytest_generate_tests(metafunc):
    if "target" in metafunc.fixturenames:
        targets = kernel_targets(metafunc.config)
        metafunc.parametrize("target", targets, ids=[t.name for t in targets])


def _unavailable(why: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"the VM did not run (CI=true makes this a failure): {why}")
    pytest.skip(f"the VM did not run: {why}")


@pytest.mark.xfail(strict=True, reason=SERIES_V1_OOPS)
def test_preserve_iommufd_under_fail_nth(target: KernelTarget):
    if target.unavailable:
        _unavailable(f"kernel {target.name}: {target.unavailable}")
    try:
        runner.find_qemu()
        image = vmkernel.resolve_kernel(target.user_kernel, progress=print, recipe=target.recipe())
    except (runner.VmError, vmkernel.KernelBuildError) as exc:
        _unavailable(str(exc))
    job = runner.command_job([runner.python_executable(), str(GUEST_PROGRAM)], env=target.env)
    res = runner.run(job, kernel=str(image.bzimage), timeout=TIMEOUT, progress=print)
    output = res.stages[0].output() if res.stages else ""
    print(output)
    print(f"VM: {res.summary()}")
    if "no iommufd handler" in output:
        pytest.skip(f"kernel {target.name} has no iommufd LUO handler")
    assert res.ok, f"{res.summary()}\nserial log tail:\n{res.serial_tail(30)}"
    assert "0 failures" in output
