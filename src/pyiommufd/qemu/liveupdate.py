"""The VMM live update: a QEMU VM that survives a kexec of its host.

The guest RAM is a sealed memfd pyiommufd makes and a :class:`~pyiommufd.holder.Holder`
keeps in the VM's LUO session (named as the VM) from launch on; QEMU maps it
``share=on``. An update saves the VM's device and CPU state with QEMU's
``cpr-reboot`` migration mode and ``x-ignore-shared`` (the RAM stays where it
is) into a second memfd, so nothing touches a disk, preserves it beside the
RAM, stops QEMU, and kexecs. After the kexec, resume retrieves both, starts
QEMU with ``-incoming defer`` on them and continues the VM.

The session, per VM::

    token 0  the manifest (pyiommufd.manifest), with the VM's record (``vmm``):
             its Machine, the QEMU it ran on, the update's phases
    token 1  the guest RAM memfd (preserved at launch)
    token 2  the VM state memfd (preserved at update, sha256 in the manifest)

What a running VM needs between commands (QEMU's pid, its QMP socket, the
Machine) is in ``<runtime_dir>/<name>/vm.json``; the runtime directory is
under /run and does not survive the kexec, the session does.

Failures keep the VM: a save that fails leaves QEMU running the guest; a
failure after QEMU stopped resumes it from the saved state on this kernel
(:func:`abort`); a retrieve that fails after the kexec names the token and
leaves every other file held.
"""
from __future__ import annotations

import enum
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import errors, kexec
from ..backend import Backend, get_backend
from ..errors import UsageError
from ..fdobject import FileKind
from ..holder import FileToHold, Holder
from ..manifest import MANIFEST_TOKEN, Entry, Manifest, read_from_fd, write_to_memfd
from ..memfd import MemFD, Seal
from .binary import Feature, Qemu
from .errors import QemuDied, QmpFailed, VmmError, VmNotFound
from .machine import Machine
from .monitor import Monitor, wait_exit

RAM_TOKEN = 1
STATE_TOKEN = 2
STATE_SEALS = Seal.WRITE | Seal.SEAL | Seal.GROW | Seal.SHRINK
#: QEMU's migration settings on both sides: only the state moves, the shared RAM stays
CAPABILITIES = [{"capability": "x-ignore-shared", "state": True}]
PARAMETERS = {"mode": "cpr-reboot"}
NEEDS = {Feature.SHARED_RAM, Feature.CPR_REBOOT}

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


class Owner(enum.Enum):
    """Who spends a phase of the blackout."""
    PYIOMMUFD = "pyiommufd"
    QEMU = "qemu"
    KERNEL = "kernel"


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    owner: Owner

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seconds": round(self.seconds, 4), "owner": self.owner.value}

    @classmethod
    def from_dict(cls, data: Any) -> "Phase":
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) \
                or not isinstance(data.get("seconds"), (int, float)):
            raise UsageError(f"VM record: a phase must be {{name, seconds, owner}}, not {data!r}")
        try:
            owner = Owner(data.get("owner"))
        except ValueError:
            raise UsageError(f"VM record: unknown phase owner {data.get('owner')!r}") from None
        return cls(data["name"], float(data["seconds"]), owner)


#: the blackout's phases, in order: the update's, then the resume's after the kexec
UPDATE_PHASES = ("save", "preserve state", "quit", "manifest")
RESUME_PHASES = UPDATE_PHASES + ("kexec and boot", "resume start", "retrieve", "verify", "qemu start",
                                 "load", "cont")
#: the phases the issue's budget leaves out of pyiommufd's share: QEMU's own save
#: and load, and the kexec with the boot
NOT_OURS = ("save", "load", "kexec and boot")


@dataclass(frozen=True)
class Blackout:
    """From the VM's stop to its running again, phase by phase."""
    phases: tuple[Phase, ...]

    @property
    def total(self) -> float:
        return sum(p.seconds for p in self.phases)

    @property
    def pyiommufd_share(self) -> float:
        """What pyiommufd spends or drives: everything but QEMU's save and
        load and the kexec with the boot."""
        return sum(p.seconds for p in self.phases if p.name not in NOT_OURS)

    @property
    def pyiommufd_own(self) -> float:
        """What pyiommufd's own code spends (its phases alone)."""
        return sum(p.seconds for p in self.phases if p.owner is Owner.PYIOMMUFD)

    def as_dict(self) -> dict[str, Any]:
        total = self.total
        return {"phases": [p.as_dict() for p in self.phases], "total": round(total, 4),
                "pyiommufd_share": round(self.pyiommufd_share, 4),
                "pyiommufd_share_fraction": round(self.pyiommufd_share / total, 4) if total else None,
                "pyiommufd_own": round(self.pyiommufd_own, 4)}

    def table(self) -> str:
        total = self.total or 1.0
        lines = [f"{'phase':<22} {'owner':<10} {'seconds':>8} {'share':>6}"]
        for p in self.phases:
            lines.append(f"{p.name:<22} {p.owner.value:<10} {p.seconds:>8.3f} {p.seconds / total:>6.1%}")
        lines.append(f"{'blackout':<22} {'':<10} {self.total:>8.3f}")
        lines.append(f"pyiommufd's share (all but save, load, kexec and boot): "
                     f"{self.pyiommufd_share:.3f} s = {self.pyiommufd_share / total:.1%} (goal <= 10%); "
                     f"its own code {self.pyiommufd_own:.3f} s")
        return "\n".join(lines)


# -- the runtime record of a VM on this kernel ------------------------------------------

class VmState(enum.Enum):
    RUNNING = "running"          # QEMU runs the guest
    UPDATED = "updated"          # saved and preserved, QEMU stopped: kexec, or abort


@dataclass
class RuntimeVm:
    """``<runtime_dir>/<name>/vm.json``: what the commands between launch and
    the kexec need to find a VM."""
    machine: Machine
    state: VmState
    pid: int | None
    qmp_socket: str
    qemu_binary: str
    log: str
    #: whether the guest ran when it was saved (a VM paused or never started stays so)
    was_running: bool = True

    @staticmethod
    def directory(runtime_dir: Path, name: str) -> Path:
        return runtime_dir / name

    def save(self, runtime_dir: Path) -> None:
        d = self.directory(runtime_dir, self.machine.name)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = {"machine": self.machine.as_dict(), "state": self.state.value, "pid": self.pid,
               "qmp_socket": self.qmp_socket, "qemu_binary": self.qemu_binary, "log": self.log,
               "was_running": self.was_running}
        tmp = d / "vm.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, d / "vm.json")

    @classmethod
    def load(cls, runtime_dir: Path, name: str) -> "RuntimeVm":
        path = cls.directory(runtime_dir, name) / "vm.json"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise VmNotFound(f"no VM {name!r} was launched here ({path} is missing); "
                             "`pyiommufd qemu status` lists them") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: unreadable VM record: {exc}") from None
        try:
            return cls(Machine.from_dict(doc["machine"]), VmState(doc["state"]), doc.get("pid"),
                       str(doc["qmp_socket"]), str(doc["qemu_binary"]), str(doc["log"]),
                       bool(doc.get("was_running", True)))
        except (KeyError, ValueError, TypeError) as exc:
            raise UsageError(f"{path}: damaged VM record ({exc})") from None


def list_vms(runtime_dir: Path) -> list[RuntimeVm]:
    if not runtime_dir.is_dir():
        return []
    return [RuntimeVm.load(runtime_dir, d.name) for d in sorted(runtime_dir.iterdir())
            if (d / "vm.json").is_file()]


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# -- results -----------------------------------------------------------------------------

@dataclass
class Launched:
    machine: Machine
    pid: int
    qmp_socket: str
    log: str
    preserve_seconds: float
    start_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"vm": self.machine.name, "pid": self.pid, "memory": self.machine.memory,
                "qmp_socket": self.qmp_socket, "log": self.log, "session": self.machine.name,
                "ram_token": RAM_TOKEN, "preserve_ram_seconds": round(self.preserve_seconds, 4),
                "qemu_start_seconds": round(self.start_seconds, 4)}


@dataclass
class Updated:
    machine: Machine
    state_size: int
    state_sha256: str
    phases: list[Phase]
    kexec: bool

    def as_dict(self) -> dict[str, Any]:
        return {"vm": self.machine.name, "session": self.machine.name, "state_bytes": self.state_size,
                "state_sha256": self.state_sha256, "tokens": {"manifest": MANIFEST_TOKEN,
                                                              "ram": RAM_TOKEN, "state": STATE_TOKEN},
                "phases": [p.as_dict() for p in self.phases], "kexec": self.kexec}


@dataclass
class Resumed:
    machine: Machine
    pid: int
    qmp_socket: str
    blackout: Blackout
    after_kexec: bool
    rearm_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"vm": self.machine.name, "pid": self.pid, "qmp_socket": self.qmp_socket,
                "after_kexec": self.after_kexec, "blackout": self.blackout.as_dict(),
                "rearm_seconds": round(self.rearm_seconds, 4)}


# -- the flows -----------------------------------------------------------------------------

class _Clock:
    def __init__(self) -> None:
        self.t = time.monotonic()

    def lap(self) -> float:
        now = time.monotonic()
        spent, self.t = now - self.t, now
        return spent


def _start_qemu(qemu: Qemu, machine: Machine, *, ram_fd: int, qmp_socket: str, log: Path,
                incoming: bool, extra_fds: Sequence[int] = (), iommufd_fd: int | None = None,
                device_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    """QEMU in a session of its own (it outlives this command), inheriting
    ``ram_fd`` and the device fds at their numbers, its output in ``log``."""
    try:
        os.unlink(qmp_socket)
    except FileNotFoundError:
        pass
    argv = qemu.command(machine.command(ram_fd=ram_fd, qmp_socket=qmp_socket, incoming=incoming,
                                        iommufd_fd=iommufd_fd, device_fds=device_fds))
    log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(log, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    pass_fds=(ram_fd, *extra_fds, *([iommufd_fd] if iommufd_fd is not None else []),
                                              *device_fds),
                                    start_new_session=True, env=qemu.environment())
        except OSError as exc:
            raise QemuDied(f"cannot start {qemu.binary}: {exc.strerror}") from None


def _log_tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _connect(proc_pid: int, qmp_socket: str, log: Path, timeout: float = 120.0) -> Monitor:
    try:
        return Monitor(qmp_socket, pid=proc_pid, timeout=timeout)
    except QemuDied as exc:
        raise QemuDied(f"{exc}; its log ({log}) ends: {_log_tail(log)}") from None


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_exit(pid, 10)


def launch(machine: Machine, *, qemu: Qemu, holder: Holder, runtime_dir: Path,
           backend: Backend | None = None, progress: Progress = _quiet) -> Launched:
    """Start ``machine`` with its RAM in a new memfd that ``holder`` keeps
    preserved in session ``machine.name`` from now on (outside any blackout)."""
    be = get_backend(backend)
    needs = NEEDS | ({Feature.IOMMUFD, Feature.VFIO_IOMMUFD} if machine.devices else set())
    qemu.require(needs, "pyiommufd qemu launch")
    rt_dir = RuntimeVm.directory(runtime_dir, machine.name)
    try:
        old = RuntimeVm.load(runtime_dir, machine.name)
    except VmNotFound:
        old = None
    if old is not None and (alive(old.pid) or old.state is VmState.UPDATED):
        raise UsageError(f"VM {machine.name!r} is {old.state.value} already"
                         + (f" (QEMU pid {old.pid})" if alive(old.pid) else ""))
    qmp_socket, log = str(rt_dir / "qmp.sock"), rt_dir / "qemu.log"
    clock = _Clock()
    opened: list[Any] = []
    session_made = False
    try:
        ram = MemFD.create(f"{machine.name}-ram", machine.memory, backend=be)
        opened.append(ram)
        ram.seal_for_live_update()
        iommufd_fd, device_fds = _open_devices(machine, be, opened)
        holder.create_session(machine.name)
        session_made = True
        holder.preserve_many(machine.name, [FileToHold(RAM_TOKEN, ram, "guest-ram", FileKind.MEMFD,
                                                       {"vm": machine.name, "size": machine.memory})])
        preserve_seconds = clock.lap()
        progress(f"guest RAM: {machine.memory >> 20} MiB memfd preserved in session {machine.name!r} "
                 f"(token {RAM_TOKEN}) in {preserve_seconds:.2f} s")
        proc = _start_qemu(qemu, machine, ram_fd=ram.fd, qmp_socket=qmp_socket, log=log, incoming=False,
                           iommufd_fd=iommufd_fd, device_fds=device_fds)
        try:
            mon = _connect(proc.pid, qmp_socket, log)
            mon.close()
        except BaseException:
            _kill(proc.pid)
            raise
        start_seconds = clock.lap()
    except BaseException:
        if session_made:
            _release_quietly(holder, machine.name)
        raise
    finally:
        for obj in opened:
            obj.close()
    RuntimeVm(machine, VmState.RUNNING, proc.pid, qmp_socket, str(qemu.binary), str(log)).save(runtime_dir)
    progress(f"QEMU {proc.pid} runs VM {machine.name!r} (QMP {qmp_socket})")
    return Launched(machine, proc.pid, qmp_socket, str(log), preserve_seconds, start_seconds)


def _open_devices(machine: Machine, be: Backend, opened: list[Any]) -> tuple[int | None, list[int]]:
    if not machine.devices:
        return None, []
    from ..iommufd import IOMMUFD
    from ..vfio import VfioDevice

    ictx = IOMMUFD.open(backend=be)
    opened.append(ictx)
    fds = []
    for bdf in machine.devices:
        dev = VfioDevice.open(bdf, backend=be)
        opened.append(dev)
        fds.append(dev.fd)
    return ictx.fd, fds


def _release_quietly(holder: Holder, name: str) -> None:
    try:
        holder.release(name, incoming=False)
    except Exception:  # noqa: BLE001 - the error being reported matters more
        pass


def _running_vm(runtime_dir: Path, name: str) -> RuntimeVm:
    vm = RuntimeVm.load(runtime_dir, name)
    if vm.state is not VmState.RUNNING:
        raise UsageError(f"VM {name!r} is {vm.state.value}: its QEMU stopped after the update; "
                         "kexec, then `pyiommufd qemu resume`, or `pyiommufd qemu abort` to run it here")
    if not alive(vm.pid):
        raise QemuDied(f"QEMU of VM {name!r} (pid {vm.pid}) is gone; its log ({vm.log}) ends: "
                       f"{_log_tail(Path(vm.log))}. The guest RAM is still preserved in session {name!r}; "
                       "its device state is lost")
    return vm


def update(name: str, *, qemu: Qemu, holder: Holder, runtime_dir: Path,
           kexec_kernel: str | None = None, kexec_initrd: str | None = None,
           kexec_cmdline: str | None = None, save_timeout: float = 120.0,
           backend: Backend | None = None, progress: Progress = _quiet) -> Updated:
    """Save VM ``name`` into a memfd, preserve it beside the RAM, stop QEMU;
    then kexec into ``kexec_kernel`` if given (no return on success).

    Until QEMU quits, a failure continues the guest where it was; after, the
    VM is resumed from its saved state on this kernel (:func:`abort`)."""
    be = get_backend(backend)
    vm = _running_vm(runtime_dir, name)
    machine = vm.machine
    if machine.devices:
        raise UsageError(
            f"VM {name!r} has assigned devices ({', '.join(machine.devices)}): the iommufd live-update "
            "series v1 cannot give an iommufd back after a kexec (retrieve: EOPNOTSUPP; a new bind: "
            "EPERM), so QEMU could not take the device again; update refuses rather than lose it")
    if kexec_kernel is not None:
        kexec.check_image(kexec_kernel, "kernel", be)
    assert vm.pid is not None
    mon = Monitor(vm.qmp_socket, pid=vm.pid, timeout=30)
    phases: list[Phase] = []
    state = MemFD.create(f"{name}-state", 0, backend=be)
    try:
        status = mon.status()
        if status not in ("running", "paused", "prelaunch"):
            raise VmmError(f"VM {name!r} is {status!r} in QEMU; update saves a running, paused or "
                           "not yet started VM")
        was_running = status == "running"
        mon.execute("migrate-set-capabilities", capabilities=CAPABILITIES)
        mon.execute("migrate-set-parameters", **PARAMETERS)
        # QEMU opens a file: target write-only and takes from an fd set only an fd
        # of that access mode: a write-only open of the same memfd
        writer = be.open(f"/proc/self/fd/{state.fd}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            fdset = mon.add_fd(writer, f"pyiommufd:{name}:state")
        finally:
            be.close(writer)
        stopped_at = time.time()
        clock = _Clock()
        try:
            try:
                mon.execute("migrate", uri=f"file:/dev/fdset/{fdset}")
            except QmpFailed as exc:
                info = {"status": "failed", "error-desc": str(exc)}
            else:
                info = mon.wait_migration(save_timeout)
        finally:
            try:
                mon.execute("remove-fd", **{"fdset-id": fdset})
            except VmmError:
                pass
        if info.get("status") != "completed":
            _continue(mon, progress, was_running)
            raise VmmError(f"the save of VM {name!r} failed ({info.get('error-desc', info.get('status'))}); "
                           f"the VM {'runs on' if was_running else 'stays paused'}, nothing was preserved")
        phases.append(Phase("save", clock.lap(), Owner.QEMU))
        try:
            state.add_seals(STATE_SEALS)
            size, digest = state.size, state.sha256()
            holder.preserve_many(name, [FileToHold(STATE_TOKEN, state, "vm-state", FileKind.MEMFD,
                                                   {"vm": name, "size": size, "sha256": digest})])
        except BaseException:
            _continue(mon, progress, was_running)
            _reset_session(holder, name, be, progress)
            raise
        phases.append(Phase("preserve state", clock.lap(), Owner.PYIOMMUFD))
        mon.quit()
        if not wait_exit(vm.pid, 30):
            _kill(vm.pid)
        phases.append(Phase("quit", clock.lap(), Owner.QEMU))
    except QemuDied as exc:
        raise QemuDied(f"{exc}. QEMU died during the update of VM {name!r}: its device state is lost; "
                       f"the guest RAM is still preserved in session {name!r}") from None
    finally:
        mon.close()
        state.close()
    vm.state, vm.pid, vm.was_running = VmState.UPDATED, None, was_running
    vm.save(runtime_dir)
    try:
        manifest = Manifest(session=name, kernel_release=os.uname().release, entries=[
            Entry(RAM_TOKEN, FileKind.MEMFD, "guest-ram", size=machine.memory,
                  seals=["seal", "shrink", "grow"]),
            Entry(STATE_TOKEN, FileKind.MEMFD, "vm-state", size=size,
                  seals=["write", "seal", "shrink", "grow"], sha256=digest)],
            vmm={"machine": machine.as_dict(), "stopped_at": stopped_at, "was_running": was_running,
                 "phases": [p.as_dict() for p in phases] + [
                     Phase("manifest", 0.0, Owner.PYIOMMUFD).as_dict()]})
        # a manifest cannot hold its own time: it says 0 here, and Updated has the real one
        doc = write_to_memfd(manifest, be)
        try:
            holder.preserve_many(name, [FileToHold(MANIFEST_TOKEN, doc, "manifest", FileKind.MANIFEST)])
        finally:
            doc.close()
    except BaseException as exc:
        progress(f"the manifest could not be preserved ({exc}); resuming the VM here")
        abort(name, qemu=qemu, holder=holder, runtime_dir=runtime_dir, backend=be, progress=progress)
        raise
    phases.append(Phase("manifest", clock.lap(), Owner.PYIOMMUFD))
    progress(f"VM {name!r} saved ({size} bytes of state, sha256 {digest[:16]}…) and preserved; QEMU stopped")
    result = Updated(machine, size, digest, phases, kexec_kernel is not None)
    if kexec_kernel is not None:
        try:
            kexec.load(kexec_kernel, kexec_initrd, kexec_cmdline, backend=be)
            progress(f"kexec into {kexec_kernel}")
            kexec.execute(backend=be)
        except Exception as exc:        # the kexec did not come: the VM goes on here
            progress(f"the kexec failed ({exc}); resuming the VM here")
            abort(name, qemu=qemu, holder=holder, runtime_dir=runtime_dir, backend=be, progress=progress)
            raise
    return result


def _continue(mon: Monitor, progress: Progress, run: bool) -> None:
    """Let the guest run again after a failed or abandoned save, if it ran before."""
    try:
        if run and mon.status() != "running":
            mon.execute("cont")
        progress("the VM runs on" if run else "the VM stays paused, as it was")
    except VmmError as exc:
        progress(f"could not continue the VM: {exc}")


def _reset_session(holder: Holder, name: str, be: Backend, progress: Progress) -> None:
    """Drop everything but the guest RAM from the session: release it and
    preserve the RAM again (LUO cannot unpreserve one file)."""
    ram = holder.lend(name, [RAM_TOKEN])[RAM_TOKEN]
    with ram:
        holder.release(name, incoming=False)
        holder.create_session(name)
        size = be.fstat_size(ram.fd)
        holder.preserve_many(name, [FileToHold(RAM_TOKEN, ram, "guest-ram", FileKind.MEMFD,
                                               {"vm": name, "size": size})])
    progress(f"session {name!r} holds the guest RAM again, and nothing else")


def _incoming(qemu: Qemu, machine: Machine, ram_fd: int, state_fd: int, runtime_dir: Path,
              phases: list[Phase], clock: _Clock, run: bool) -> tuple[int, str]:
    """Start QEMU on the RAM, load the state, and continue the guest if ``run``
    (it ran when it was saved)."""
    rt_dir = RuntimeVm.directory(runtime_dir, machine.name)
    qmp_socket, log = str(rt_dir / "qmp.sock"), rt_dir / "qemu.log"
    proc = _start_qemu(qemu, machine, ram_fd=ram_fd, qmp_socket=qmp_socket, log=log, incoming=True,
                       extra_fds=(state_fd,))
    try:
        mon = _connect(proc.pid, qmp_socket, log)
        phases.append(Phase("qemu start", clock.lap(), Owner.QEMU))
        try:
            mon.execute("migrate-set-capabilities", capabilities=CAPABILITIES)
            mon.execute("migrate-set-parameters", **PARAMETERS)
            mon.execute("migrate-incoming", uri=f"file:/proc/self/fd/{state_fd}")
            info = mon.wait_migration(120)
            if info.get("status") != "completed":
                raise VmmError(f"QEMU could not load the saved state of VM {machine.name!r}: "
                               f"{info.get('error-desc', info.get('status'))}")
            phases.append(Phase("load", clock.lap(), Owner.QEMU))
            if run and mon.status() != "running":       # QEMU starts the guest itself unless -S
                mon.execute("cont")
                mon.wait_status({"running"}, 30)
            phases.append(Phase("cont", clock.lap(), Owner.QEMU))
        finally:
            mon.close()
    except BaseException:
        _kill(proc.pid)
        raise
    RuntimeVm(machine, VmState.RUNNING, proc.pid, qmp_socket, str(qemu.binary), str(log), run).save(runtime_dir)
    return proc.pid, qmp_socket


def abort(name: str, *, qemu: Qemu, holder: Holder, runtime_dir: Path,
          backend: Backend | None = None, progress: Progress = _quiet) -> Resumed:
    """The kexec did not come: run VM ``name`` again on this kernel from the
    state its update saved, and leave its session as launch left it."""
    be = get_backend(backend)
    vm = RuntimeVm.load(runtime_dir, name)
    if vm.state is VmState.RUNNING and alive(vm.pid):
        raise UsageError(f"VM {name!r} runs (QEMU pid {vm.pid}): there is no update to abort")
    phases: list[Phase] = []
    clock = _Clock()
    files = holder.lend(name, [RAM_TOKEN, STATE_TOKEN])
    try:
        phases.append(Phase("lend", clock.lap(), Owner.PYIOMMUFD))
        pid, qmp = _incoming(qemu, vm.machine, files[RAM_TOKEN].fd, files[STATE_TOKEN].fd, runtime_dir,
                             phases, clock, vm.was_running)
    finally:
        for f in files.values():
            f.close()
    progress(f"VM {name!r} runs again on this kernel (QEMU pid {pid})")
    _reset_session(holder, name, be, progress)
    return Resumed(vm.machine, pid, qmp, Blackout(tuple(phases)), False, clock.lap())


def process_start_wall() -> float:
    """When this process started, on the wall clock."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def resume(name: str, *, qemu: Qemu, holder: Holder, runtime_dir: Path, started: float | None = None,
           backend: Backend | None = None, progress: Progress = _quiet) -> Resumed:
    """After the kexec: retrieve VM ``name``'s session, check its state,
    start QEMU on it, continue the guest, finish the session and preserve the
    RAM in a new one for the next update. ``started``: when the resuming
    command started (wall clock; default: now), so that its start-up counts."""
    be = get_backend(backend)
    if started is None:
        started = time.time()
    qemu.require(NEEDS, "pyiommufd qemu resume")
    flow_start = time.time()
    clock = _Clock()
    holder.retrieve_session(name)
    try:
        got = holder.retrieve_many(name, [MANIFEST_TOKEN, RAM_TOKEN, STATE_TOKEN])
    except errors.KernelError as exc:
        names = ["the manifest", "the guest RAM", "the VM state"]
        index = getattr(exc, "index", None)
        which = names[index] if isinstance(index, int) and 0 <= index < len(names) else "a file"
        exc.detail = (f"{exc.detail + '; ' if exc.detail else ''}{which} of VM {name!r} could not be "
                      f"retrieved; the session and every file retrieved before it stay held "
                      f"(pyiommufd status)")
        raise
    retrieve_seconds = clock.lap()
    try:
        manifest = read_from_fd(got[MANIFEST_TOKEN], be)
        if manifest.vmm is None:
            raise UsageError(f"session {name!r} is not a VM's: its manifest has no VM record")
        machine = Machine.from_dict(manifest.vmm.get("machine"))
        before = [Phase.from_dict(p) for p in manifest.vmm.get("phases", [])]
        stopped_at = manifest.vmm.get("stopped_at")
        _verify(manifest, got, be)
        verify_seconds = clock.lap()
        phases = list(before)
        if isinstance(stopped_at, (int, float)):
            gone = started - stopped_at - sum(p.seconds for p in before)
            phases.append(Phase("kexec and boot", max(gone, 0.0), Owner.KERNEL))
        phases.append(Phase("resume start", flow_start - started, Owner.PYIOMMUFD))
        phases.append(Phase("retrieve", retrieve_seconds, Owner.PYIOMMUFD))
        phases.append(Phase("verify", verify_seconds, Owner.PYIOMMUFD))
        pid, qmp = _incoming(qemu, machine, got[RAM_TOKEN].fd, got[STATE_TOKEN].fd, runtime_dir, phases, clock,
                             manifest.vmm.get("was_running") is not False)
        progress(f"VM {name!r} runs again (QEMU pid {pid})")
        holder.finish(name)
        holder.create_session(name)
        holder.preserve_many(name, [FileToHold(RAM_TOKEN, got[RAM_TOKEN], "guest-ram", FileKind.MEMFD,
                                               {"vm": name, "size": machine.memory})])
        rearm = clock.lap()
        progress(f"session {name!r} finished; the guest RAM is preserved in a new one for the next update")
    finally:
        for f in got.values():
            f.close()
    return Resumed(machine, pid, qmp, Blackout(tuple(phases)), True, rearm)


def _verify(manifest: Manifest, got: dict[int, Any], be: Backend) -> None:
    """The RAM's size and the state's size and sha256, as the manifest says."""
    problems = []
    for token in (RAM_TOKEN, STATE_TOKEN):
        entry = manifest.entry(token)
        if entry is None:
            problems.append(f"the manifest has no token {token}")
            continue
        memfd = MemFD.from_fd(got[token].fd, backend=be, owned=False)
        if entry.size is not None and memfd.size != entry.size:
            problems.append(f"{entry.name}: {memfd.size} bytes, the manifest says {entry.size}")
        if entry.sha256 is not None and memfd.sha256() != entry.sha256:
            problems.append(f"{entry.name}: sha256 differs from the manifest's")
    if problems:
        raise errors.VerificationFailed("the VM's files do not match its manifest: " + "; ".join(problems))


def stop(name: str, *, holder: Holder, runtime_dir: Path) -> None:
    """Quit VM ``name``'s QEMU and release its session (the VM is gone)."""
    vm = RuntimeVm.load(runtime_dir, name)
    if alive(vm.pid):
        assert vm.pid is not None
        try:
            Monitor(vm.qmp_socket, pid=vm.pid, timeout=10).quit()
        except VmmError:
            pass
        if not wait_exit(vm.pid, 30):
            _kill(vm.pid)
    _release_quietly(holder, name)
    shutil.rmtree(RuntimeVm.directory(runtime_dir, name), ignore_errors=True)


__all__ = ["launch", "update", "abort", "resume", "stop", "list_vms", "Launched", "Updated", "Resumed",
           "Blackout", "Phase", "Owner", "UPDATE_PHASES", "RESUME_PHASES", "RuntimeVm", "VmState", "RAM_TOKEN", "STATE_TOKEN"]
