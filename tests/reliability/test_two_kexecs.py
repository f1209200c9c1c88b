"""Two kexecs in a row, with the holder agent started afresh after each, in a VM
of its own (the plugin's guest does one kexec): memfds preserved through the
agent come through both, and one retrieved after the first kexec can be
preserved again for the second. Runs where the guest has LUO (every kernel of
the tier); the guest program checks, the host reads its verdict."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyiommufd_testing.pytest_plugin import KernelTarget, kernel_targets
from pyiommufd.vm import kernel as vmkernel, runner

GUEST_PROGRAM = Path(__file__).with_name("guest_two_kexecs.py")
TIMEOUT = 600.0


def pytest_generate_tests(metafunc):
    if "target" in metafunc.fixturenames:
        targets = kernel_targets(metafunc.config)
        metafunc.parametrize("target", targets, ids=[t.name for t in targets])


def test_two_kexecs_with_a_fresh_agent_each_time(target: KernelTarget):
    if target.unavailable:
        why = f"kernel {target.name}: {target.unavailable}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"the VM did not run (CI=true makes this a failure): {why}")
        pytest.skip(f"the VM did not run: {why}")
    image = vmkernel.resolve_kernel(target.user_kernel, progress=print, recipe=target.recipe())
    argv = [runner.python_executable(), str(GUEST_PROGRAM)]
    job = runner.command_job(argv + ["1"], kexec_stages=[argv + ["2"], argv + ["3"]], env=target.env)
    res = runner.run(job, kernel=str(image.bzimage), timeout=TIMEOUT, progress=print)
    for stage in res.stages:
        print(f"{stage.describe()}\n{stage.output()}")
    print(f"VM: {res.summary()}")
    assert res.ok, f"{res.summary()}\nserial log tail:\n{res.serial_tail(30)}"
    assert res.boot_count == 3
    for n in (1, 2, 3):
        assert f"two kexecs: stage {n} ok" in res.stages[n - 1].output()
