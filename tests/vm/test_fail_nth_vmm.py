"""fail-nth over the VMM live update's update and abort, on the real kernel:
whatever allocation fails, the flow ends with a typed error or succeeds, no
fd leaks, and the VM is never lost (afterwards QEMU runs it, and its session
holds the guest RAM and nothing else).

The VM is a paused QEMU 11.1 (``-S``, no guest to boot: QEMU restarts at
every injection point); faults hit the allocations of this thread: memfds,
the QMP socket, and the session's preserve ioctls (the holder is in this
process). Resume's retrieve needs a kexec per point; its QEMU start and load
are abort's, which runs here."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from pyiommufd import errors
from pyiommufd.holder import InProcessHolder
from pyiommufd.qemu import binary, liveupdate as lu
from pyiommufd.qemu.machine import Machine
from pyiommufd.qemu.monitor import Monitor

import fail_nth as F

NAME = "fail-nth-vm"
ARGS = ("-S", "-nodefaults", "-display", "none", "-machine", "q35", "-accel", "tcg")


class Vm:
    """The VM under test and the checks that it is not lost."""

    def __init__(self, holder: InProcessHolder, qemu: binary.Qemu, runtime: Path) -> None:
        self.holder, self.qemu, self.runtime = holder, qemu, runtime
        self.lost: list[str] = []

    def ensure_running(self, where: str) -> None:
        vm = lu.RuntimeVm.load(self.runtime, NAME)
        if vm.state is lu.VmState.UPDATED:          # stopped after a save: bring it back
            lu.abort(NAME, qemu=self.qemu, holder=self.holder, runtime_dir=self.runtime)
            vm = lu.RuntimeVm.load(self.runtime, NAME)
        if not lu.alive(vm.pid):
            self.lost.append(f"{where}: QEMU is gone")
            return
        assert vm.pid is not None
        mon = Monitor(vm.qmp_socket, pid=vm.pid, timeout=30)
        try:
            status = mon.status()
        finally:
            mon.close()
        if status not in ("running", "prelaunch", "paused"):
            self.lost.append(f"{where}: QEMU's VM is {status!r}")
        try:
            self.holder.lend(NAME, [lu.STATE_TOKEN])[lu.STATE_TOKEN].close()
            self.lost.append(f"{where}: the session still holds a VM state")
        except errors.UsageError:
            pass
        try:
            self.holder.lend(NAME, [lu.RAM_TOKEN])[lu.RAM_TOKEN].close()
        except errors.UsageError:
            self.lost.append(f"{where}: the session no longer holds the guest RAM")


@pytest.fixture
def vm(lu_stage):
    if lu_stage.stage == 2:
        pytest.skip("stage 1 only: nothing of it crosses the kexec")
    qemu = binary.resolve(fetch_missing=False)
    holder = InProcessHolder(lu_stage.liveupdate)
    runtime = Path(tempfile.mkdtemp(prefix="fail-nth-vmm-"))
    lu.launch(Machine(NAME, 64 << 20, ARGS), qemu=qemu, holder=holder, runtime_dir=runtime)
    v = Vm(holder, qemu, runtime)
    yield v
    lu.stop(NAME, holder=holder, runtime_dir=runtime)


@pytest.mark.pyiommufd_kexec
def test_fail_nth_over_update_and_abort_never_loses_the_vm(driver, vm):
    def update(_: object) -> object:
        return lu.update(NAME, qemu=vm.qemu, holder=vm.holder, runtime_dir=vm.runtime)

    def after_update(_: object, result: object) -> None:
        vm.ensure_running("after update")

    def saved() -> object:
        lu.update(NAME, qemu=vm.qemu, holder=vm.holder, runtime_dir=vm.runtime)
        return None

    def abort(_: object) -> object:
        return lu.abort(NAME, qemu=vm.qemu, holder=vm.holder, runtime_dir=vm.runtime)

    def after_abort(_: object, result: object) -> None:
        vm.ensure_running("after abort")

    results = [driver.run(F.Flow("qemu update", update, cleanup=after_update)),
               driver.run(F.Flow("qemu abort", abort, setup=saved, cleanup=after_abort))]
    bad = [r for r in results if r.failures or not r.completed]
    assert not bad, F.summary(results)
    assert not vm.lost, "\n".join(vm.lost)
    assert all(r.points > 0 for r in results), F.summary(results)
