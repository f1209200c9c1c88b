"""Two kexecs in a row, with the holder agent started afresh after each, in a VM
of its own (the plugin's guest does one kexec): memfds preserved through the
agent come through both, and one retrieved after the first kexec can be
preserved again for the second. Runs where the guest has LUO (every kernel of
the tier); the guest program checks, the host reads its verdict."""
from __future__ import annotations

from pathlib import Path


from pyiommufd_testing.host_vm import kernel_image, parametrize_by_kernel
from pyiommufd_testing.pytest_plugin import KernelTarget
from pyiommufd.vm import runner

GUEST_PROGRAM = Path(__file__).with_name("guest_two_kexecs.py")
TIMEOUT = 600.0


pytest_generate_tests = parametrize_by_kernel


def test_two_kexecs_with_a_fresh_agent_each_time(target: KernelTarget):
    image = kernel_image(target)
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
