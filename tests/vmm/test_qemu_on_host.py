"""The VMM live update's flows with a real QEMU 11.1 running a real nested Linux
guest on this host, over the fake kernel's LUO (whose memfds are real memfds,
so QEMU maps the very pages the session preserves). A simulated kexec stands
for the host's; the real one is test_vm_survives_kexec.py's.

The nested guest counts and keeps a RAM pattern (pyiommufd.vm.nested_guest):
"not rebooted" is one boot line, ticks 1, 2, 3... with no restart and a
growing uptime, and every check of the pattern equal to the first."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from pyiommufd import errors
from pyiommufd.holder import InProcessHolder
from pyiommufd.luo import LiveUpdate
from pyiommufd.qemu import liveupdate as lu
from pyiommufd.qemu.errors import QemuDied, VmmError
from pyiommufd.qemu.machine import Machine
from pyiommufd.qemu.monitor import Monitor
from pyiommufd.vm import nested_guest
from pyiommufd.vm.vmm_demo import nested_qemu_args

MIB = 1 << 20
WAIT = 120.0


class NestedVm:
    def __init__(self, workdir: Path, kernel: str, initrd: str, name: str = "vm0", extra: tuple[str, ...] = ()):
        self.console = workdir / f"{name}-console.log"
        self.machine = Machine(name, 128 * MIB, tuple(nested_qemu_args(kernel, initrd, str(self.console))) + extra)
        self.runtime = workdir / "run"

    def state(self) -> nested_guest.ConsoleState:
        return nested_guest.parse_console(self.console.read_text() if self.console.exists() else "")

    def wait_tick(self, number: int) -> nested_guest.ConsoleState:
        deadline = time.monotonic() + WAIT
        while True:
            s = self.state()
            if s.ticks and s.ticks[-1].number >= number:
                return s
            assert time.monotonic() < deadline, f"no tick {number} in {WAIT} s: {self.console.read_text()[-300:]}"
            time.sleep(0.2)

    def wait_check_after(self, tick: int) -> nested_guest.ConsoleState:
        deadline = time.monotonic() + WAIT
        while True:
            s = self.state()
            if any(n > tick for n, _ in s.checks):
                return s
            assert time.monotonic() < deadline, f"no pattern check after tick {tick} in {WAIT} s"
            time.sleep(0.2)

    def assert_never_rebooted(self) -> None:
        s = self.state()
        assert len(s.boots) == 1, f"the nested guest booted {len(s.boots)} times"
        assert [t.number for t in s.ticks] == list(range(1, len(s.ticks) + 1)), "the counter restarted"
        assert {t.boot for t in s.ticks} == {s.boots[0][0]}
        assert all(b.uptime >= a.uptime for a, b in zip(s.ticks, s.ticks[1:])), "uptime went backwards"
        assert s.checks and all(d == s.boots[0][1] for _, d in s.checks), "the RAM pattern changed"


@pytest.fixture
def vm(workdir, nested_kernel, nested_initrd) -> NestedVm:
    return NestedVm(workdir, nested_kernel, nested_initrd)


def _holder() -> InProcessHolder:
    return InProcessHolder(LiveUpdate.open())


def _launch(vm: NestedVm, qemu11, holder) -> lu.Launched:
    launched = lu.launch(vm.machine, qemu=qemu11, holder=holder, runtime_dir=vm.runtime)
    vm.wait_tick(3)
    return launched


def _resume_and_check(vm: NestedVm, qemu11, last: int) -> None:
    """After the (simulated) kexec: resume with a new holder, see the guest go
    on past tick ``last`` unrebooted, then stop it."""
    holder = _holder()
    lu.resume("vm0", qemu=qemu11, holder=holder, runtime_dir=vm.runtime)
    try:
        vm.wait_tick(last + 2)
        vm.wait_check_after(last)
        vm.assert_never_rebooted()
    finally:
        lu.stop("vm0", holder=holder, runtime_dir=vm.runtime)


def _qemu_pids(name: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            if b"qemu-system" in cmd and f"{name}-console.log".encode() in cmd:
                out.append(int(pid))
    return out


def test_the_nested_guest_survives_a_simulated_kexec(fake, qemu11, vm):
    holder = _holder()
    launched = _launch(vm, qemu11, holder)
    updated = lu.update("vm0", qemu=qemu11, holder=holder, runtime_dir=vm.runtime)
    assert tuple(p.name for p in updated.phases) == lu.UPDATE_PHASES
    assert updated.state_size > 0 and not lu.alive(launched.pid), "QEMU must be gone after the update"
    last = vm.state().ticks[-1].number
    time.sleep(2)
    assert vm.state().ticks[-1].number == last, "the guest ticked while its QEMU was stopped"

    fake.kexec()
    holder = _holder()
    resumed = lu.resume("vm0", qemu=qemu11, holder=holder, runtime_dir=vm.runtime)
    try:
        vm.wait_tick(last + 3)
        vm.wait_check_after(last)
        vm.assert_never_rebooted()
        assert tuple(p.name for p in resumed.blackout.phases) == lu.RESUME_PHASES
        # finished, and re-armed: the new outgoing session holds the guest RAM, nothing else
        with pytest.raises(errors.UsageError):
            holder._session("vm0", True)
        assert list(holder.lend("vm0", [lu.RAM_TOKEN])) == [lu.RAM_TOKEN]
        with pytest.raises(errors.UsageError, match="0x2"):
            holder.lend("vm0", [lu.STATE_TOKEN])
    finally:
        lu.stop("vm0", holder=holder, runtime_dir=vm.runtime)
    assert not lu.alive(resumed.pid)


def test_abort_runs_the_vm_again_here_and_a_second_update_works(fake, qemu11, vm):
    holder = _holder()
    _launch(vm, qemu11, holder)
    lu.update("vm0", qemu=qemu11, holder=holder, runtime_dir=vm.runtime)
    last = vm.state().ticks[-1].number
    aborted = lu.abort("vm0", qemu=qemu11, holder=holder, runtime_dir=vm.runtime)
    assert not aborted.after_kexec and lu.alive(aborted.pid)
    vm.wait_tick(last + 2)
    # the session is as launch left it: the RAM only, so the next update can preserve a new state
    with pytest.raises(errors.UsageError):
        holder.lend("vm0", [lu.STATE_TOKEN])
    lu.update("vm0", qemu=qemu11, holder=holder, runtime_dir=vm.runtime)
    last = vm.state().ticks[-1].number
    fake.kexec()
    _resume_and_check(vm, qemu11, last)


def test_a_save_qemu_refuses_leaves_the_vm_running_and_nothing_preserved(fake, qemu11, workdir, nested_kernel,
                                                                          nested_initrd):
    # a migration blocker: ivshmem in peer mode (master=off) cannot be migrated
    blocker = ("-object", "memory-backend-ram,id=peer,size=1M,share=on",
               "-device", "ivshmem-plain,memdev=peer,master=off")
    vm = NestedVm(workdir, nested_kernel, nested_initrd, extra=blocker)
    holder = _holder()
    launched = _launch(vm, qemu11, holder)
    try:
        with pytest.raises(VmmError, match="save of VM 'vm0' failed .*ivshmem.*the VM runs on"):
            lu.update("vm0", qemu=qemu11, holder=holder, runtime_dir=vm.runtime)
        assert lu.alive(launched.pid)
        assert Monitor(launched.qmp_socket, pid=launched.pid).status() == "running"
        with pytest.raises(errors.UsageError):
            holder.lend("vm0", [lu.STATE_TOKEN])
        last = vm.state().ticks[-1].number
        vm.wait_tick(last + 2)
    finally:
        lu.stop("vm0", holder=holder, runtime_dir=vm.runtime)


def test_qemu_killed_during_the_save_is_one_clear_error_and_the_ram_stays_held(fake, qemu11, vm, monkeypatch):
    holder = _holder()
    launched = _launch(vm, qemu11, holder)
    wait_migration = Monitor.wait_migration

    def killed(self, timeout):
        os.kill(launched.pid, signal.SIGKILL)
        return wait_migration(self, timeout)

    monkeypatch.setattr(Monitor, "wait_migration", killed)
    with pytest.raises(QemuDied, match="QEMU died during the update of VM 'vm0'.*guest RAM is still preserved"):
        lu.update("vm0", qemu=qemu11, holder=holder, runtime_dir=vm.runtime)
    ram = holder.lend("vm0", [lu.RAM_TOKEN])[lu.RAM_TOKEN]
    with ram:
        assert os.fstat(ram.fd).st_size == 128 * MIB
    with pytest.raises(QemuDied, match="is gone"):
        lu.update("vm0", qemu=qemu11, holder=holder, runtime_dir=vm.runtime)
    lu.stop("vm0", holder=holder, runtime_dir=vm.runtime)
    assert not _qemu_pids("vm0")


def test_launch_refuses_a_second_vm_of_the_same_name_and_leaves_the_first_alone(fake, qemu11, vm):
    holder = _holder()
    launched = _launch(vm, qemu11, holder)
    try:
        with pytest.raises(errors.UsageError, match="VM 'vm0' is running already"):
            lu.launch(vm.machine, qemu=qemu11, holder=holder, runtime_dir=vm.runtime)
        assert lu.alive(launched.pid) and _qemu_pids("vm0") == [launched.pid]
    finally:
        lu.stop("vm0", holder=holder, runtime_dir=vm.runtime)


def test_a_qemu_that_cannot_start_leaves_no_session(fake, qemu11, workdir, nested_kernel, nested_initrd):
    vm = NestedVm(workdir, nested_kernel, nested_initrd, extra=("-device", "no-such-device"))
    holder = _holder()
    with pytest.raises(QemuDied, match="no-such-device"):
        lu.launch(vm.machine, qemu=qemu11, holder=holder, runtime_dir=vm.runtime)
    with pytest.raises(errors.UsageError, match="no outgoing session 'vm0'"):
        holder.lend("vm0", [lu.RAM_TOKEN])
    holder.create_session("vm0")       # the name is free again


def test_a_retrieve_that_fails_after_the_kexec_names_the_file_and_keeps_the_others(fake, qemu11, vm):
    import errno

    holder = _holder()
    _launch(vm, qemu11, holder)
    lu.update("vm0", qemu=qemu11, holder=holder, runtime_dir=vm.runtime)
    fake.kexec()
    holder = _holder()                  # LUO reads the handed-over sessions at this open
    # the memfd handler's retrieve of the VM state failed (say, an allocation): LUO keeps that status
    session = next(s for s in fake.boot.luo.incoming if s.name == b"vm0")
    next(f for f in session.files if f.token == lu.STATE_TOKEN).retrieve_status = -errno.ENOMEM
    with pytest.raises(errors.KernelError, match="the VM state of VM 'vm0' could not be retrieved") as exc:
        lu.resume("vm0", qemu=qemu11, holder=holder, runtime_dir=vm.runtime)
    assert exc.value.errno == errno.ENOMEM
    assert not _qemu_pids("vm0"), "no QEMU starts without its state"
    with holder.retrieve_many("vm0", [lu.RAM_TOKEN])[lu.RAM_TOKEN] as ram:   # the guest RAM is still there
        assert os.fstat(ram.fd).st_size == 128 * MIB


def test_update_with_a_kernel_kexecs_into_it_and_resume_finds_the_vm(fake, qemu11, vm):
    from pyiommufd_testing import SimulatedKexec

    fake.files.put("/boot/vmlinuz-next", b"MZ" + bytes(1024))
    holder = _holder()
    _launch(vm, qemu11, holder)
    with pytest.raises(SimulatedKexec):
        lu.update("vm0", qemu=qemu11, holder=holder, runtime_dir=vm.runtime, kexec_kernel="/boot/vmlinuz-next")
    assert fake.boot_count == 2
    last = vm.state().ticks[-1].number
    _resume_and_check(vm, qemu11, last)


def test_update_refuses_a_missing_kernel_before_it_touches_the_vm(fake, qemu11, vm):
    holder = _holder()
    launched = _launch(vm, qemu11, holder)
    try:
        with pytest.raises(errors.UsageError, match="no such file"):
            lu.update("vm0", qemu=qemu11, holder=holder, runtime_dir=vm.runtime, kexec_kernel="/boot/nope")
        assert Monitor(launched.qmp_socket, pid=launched.pid).status() == "running"
        with pytest.raises(errors.UsageError):
            holder.lend("vm0", [lu.STATE_TOKEN])
    finally:
        lu.stop("vm0", holder=holder, runtime_dir=vm.runtime)


def test_a_paused_vm_is_saved_and_brought_back_paused(fake, qemu11, workdir, nested_kernel, nested_initrd):
    vm = NestedVm(workdir, nested_kernel, nested_initrd, extra=("-S",))
    holder = _holder()
    lu.launch(vm.machine, qemu=qemu11, holder=holder, runtime_dir=vm.runtime)
    lu.update("vm0", qemu=qemu11, holder=holder, runtime_dir=vm.runtime)
    aborted = lu.abort("vm0", qemu=qemu11, holder=holder, runtime_dir=vm.runtime)
    try:
        mon = Monitor(aborted.qmp_socket, pid=aborted.pid)
        try:
            assert mon.status() in ("paused", "prelaunch"), "abort must not start a guest that was not running"
        finally:
            mon.close()
        assert not vm.state().ticks
    finally:
        lu.stop("vm0", holder=holder, runtime_dir=vm.runtime)


def test_a_kexec_that_fails_resumes_the_vm_here(fake, qemu11, vm):
    fake.files.put("/boot/vmlinuz-next", b"MZ" + bytes(1024))
    fake.boot.kexec_load_disabled = True          # kernel.kexec_load_disabled=1: kexec_file_load is EPERM
    holder = _holder()
    _launch(vm, qemu11, holder)
    with pytest.raises(errors.KexecError):
        lu.update("vm0", qemu=qemu11, holder=holder, runtime_dir=vm.runtime, kexec_kernel="/boot/vmlinuz-next")
    assert fake.boot_count == 1
    running = lu.RuntimeVm.load(vm.runtime, "vm0")
    try:
        assert running.state is lu.VmState.RUNNING and lu.alive(running.pid)
        last = vm.state().ticks[-1].number
        vm.wait_tick(last + 2)
        with pytest.raises(errors.UsageError):
            holder.lend("vm0", [lu.STATE_TOKEN])      # as launch left it: the next update can go
    finally:
        lu.stop("vm0", holder=holder, runtime_dir=vm.runtime)
