"""Run a job (a list of stages) in a QEMU guest on the VM-tier kernel.

``run(job)`` gets the kernel (cached build or ``--kernel``) and the initramfs,
creates a run directory, starts QEMU (TCG, q35, emulated VT-d with interrupt
remapping, a virtio-net device behind the vIOMMU to hand to vfio-pci, the
host's / read-only over 9p, a writable 9p results share), follows the guest's
progress, kills QEMU when the hard timeout expires and returns a
:class:`VmResult`.

Run directory: ``<cache_root>/runs/<UTC time>-<pid>/`` holding ``share/`` (the
results share: job.json, state.json, stage-N.json/.log, events.jsonl,
dmesg-N.txt, pytest reports), ``serial.log``, ``qemu.log`` (QEMU's own
stdout/stderr) and ``qemu.cmd``. The newest :data:`KEEP_RUNS` runs are kept
(older ones are removed once they are 6 hours old).
"""
from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from . import debian, guest, initramfs
from .accel import ACCELS, choose as choose_accel
from .kernel import STOCK, KernelBuildError, KernelImage, KernelRecipe, resolve_kernel

Progress = Callable[[str], None]

QEMU = "qemu-system-x86_64"
DEFAULT_TIMEOUT = 600.0
# A first boot that has not started the agent after this long is killed and
# retried (at most DEFAULT_BOOT_RETRIES times): normal boots take 5-15 s.
DEFAULT_BOOT_TIMEOUT = 90.0
DEFAULT_BOOT_RETRIES = 2
DEFAULT_MEMORY = "2G"
DEFAULT_SMP = 2
KEEP_RUNS = 20
# no_timer_check: under TCG on a busy host the IO-APIC timer check's delay loop is
# unreliable and the boot panics "timer doesn't work through Interrupt-remapped
# IO-APIC" (seen in 3 of 12 boots at load 4 on 2 cores).
CMDLINE = ("console=ttyS0", "intel_iommu=on", "liveupdate=on", "panic=-1", "oops=panic",
           "no_timer_check", "loglevel=6")


class VmError(RuntimeError):
    """The VM could not be started at all (no QEMU, kernel build failed...)."""

    def __init__(self, reason: str, *, log: Path | None = None):
        super().__init__(reason)
        self.reason = reason
        self.log = log


# -- jobs ----------------------------------------------------------------------------

@dataclass
class Stage:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    kexec: str = "none"          # "none" | "self" | "agent"  (see pyiommufd.vm.guest)
    needs_kexec: bool = False

    def to_json(self) -> dict[str, Any]:
        if self.kexec not in ("none", "self", "agent"):
            raise ValueError(f"Stage.kexec must be none, self or agent, not {self.kexec!r}")
        return {"argv": [str(a) for a in self.argv], "env": dict(self.env), "cwd": self.cwd,
                "kexec": self.kexec, "needs_kexec": self.needs_kexec}


@dataclass
class Job:
    stages: list[Stage]
    env: dict[str, str] = field(default_factory=dict)

    def to_json(self, kernel: str | None = None, initrd: str | None = None) -> dict[str, Any]:
        return {"version": 1, "stages": [s.to_json() for s in self.stages], "env": dict(self.env),
                "kernel": kernel, "initrd": initrd}


def command_job(argv: Sequence[str], *, kexec_stages: int | Sequence[Sequence[str]] | None = None,
                cwd: str | None = None, env: dict[str, str] | None = None) -> Job:
    """One stage running ``argv``; with ``kexec_stages`` more stages, each after a
    kexec the agent performs once the previous stage exited 0 (``int``: run
    ``argv`` again that many times; a list: those commands)."""
    if not argv:
        raise ValueError("empty command")
    if kexec_stages is None:
        follow: list[list[str]] = []
    elif isinstance(kexec_stages, int):
        follow = [list(argv)] * kexec_stages
    else:
        follow = [list(a) for a in kexec_stages]
    cwd = cwd or os.getcwd()
    stages = [Stage(list(argv), cwd=cwd, kexec="agent" if follow else "none")]
    for k, a in enumerate(follow):
        stages.append(Stage(a, cwd=cwd, needs_kexec=True,
                            kexec="agent" if k + 1 < len(follow) else "none"))
    return Job(stages, env=dict(env or {}))


# -- results -------------------------------------------------------------------------

@dataclass
class StageResult:
    number: int
    argv: list[str]
    ended_by: str                   # exit | kexec | reboot | not-run | lost
    exit: int | None = None
    release: str | None = None
    boot: int | None = None
    duration: float | None = None
    reason: str | None = None
    log: Path | None = None

    @property
    def ok(self) -> bool:
        return self.ended_by == "kexec" or (self.ended_by == "exit" and self.exit == 0)

    def describe(self) -> str:
        what = {"exit": f"exit {self.exit}", "kexec": "ended by kexec",
                "reboot": "guest rebooted", "not-run": f"not run ({self.reason})",
                "lost": f"no result ({self.reason})"}.get(self.ended_by, self.ended_by)
        dur = f" in {self.duration:.1f}s" if self.duration is not None else ""
        on = f" on {self.release}" if self.release else ""
        return f"stage {self.number}: {what}{dur}{on}"

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace") if self.log else ""
        except OSError:
            return ""


@dataclass
class BootRecord:
    n: int
    release: str
    via: str                      # boot | kexec | reboot
    cmdline: str = ""
    uptime: float = 0.0           # guest uptime when the agent started
    seen_after: float | None = None  # host seconds since QEMU started


@dataclass
class VmResult:
    ok: bool
    stages: list[StageResult]
    boots: list[BootRecord]
    kernel: KernelImage | None
    initrd: Path | None
    run_dir: Path
    share: Path
    serial_log: Path
    timeout: float
    timed_out: bool = False
    qemu_returncode: int | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def boot_count(self) -> int:
        return len(self.boots)

    @property
    def kernel_release(self) -> str | None:
        if self.boots:
            return self.boots[0].release
        return self.kernel.release if self.kernel else None

    @property
    def exit_code(self) -> int:
        """0 when every stage succeeded; 124 on timeout; else the first failing
        stage's exit status (or 1)."""
        if self.ok:
            return 0
        if self.timed_out:
            return 124
        for s in self.stages:
            if not s.ok:
                return s.exit if isinstance(s.exit, int) and s.exit > 0 else 1
        return 1

    def serial_tail(self, lines: int = 40) -> str:
        return _tail(self.serial_log, lines)

    def summary(self) -> str:
        rel = self.kernel_release or "?"
        parts = [f"VM {'ok' if self.ok else 'FAILED'}: Linux {rel}, {self.boot_count} boot(s)"]
        if "total" in self.timings:
            parts.append(f"{self.timings['total']:.1f}s")
        if self.timed_out:
            parts.append(f"TIMED OUT after {self.timeout:.0f}s")
        if self.error:
            parts.append(self.error)
        lines = [", ".join(parts)]
        lines += ["  " + s.describe() for s in self.stages]
        lines.append(f"  serial log: {self.serial_log}")
        return "\n".join(lines)


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    data = data.replace("\r", "")
    return "\n".join(data.splitlines()[-lines:])


# -- QEMU ----------------------------------------------------------------------------

def kernel_cmdline(extra: Iterable[str] = ()) -> str:
    return " ".join([*CMDLINE, *extra])


def qemu_command(kernel: str | os.PathLike[str], initrd: str | os.PathLike[str], share: str | os.PathLike[str],
                 serial_log: str | os.PathLike[str], *, cmdline: str | None = None,
                 memory: str = DEFAULT_MEMORY, smp: int = DEFAULT_SMP, qemu: str = QEMU,
                 host_root: str = "/", pycache: str | os.PathLike[str] | None = None,
                 extra: Sequence[str] = (), accel: str = "tcg") -> list[str]:
    """The QEMU command line; ``accel`` is ``tcg`` or ``kvm`` (see :mod:`.accel`)."""
    return [
        qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", "q35,kernel-irqchip=split", "-accel", ACCELS[accel],
        "-cpu", "max", "-m", str(memory), "-smp", str(smp),
        # The vIOMMU must come before the PCI devices it translates for.
        "-device", "intel-iommu,intremap=on",
        "-kernel", os.fspath(kernel), "-initrd", os.fspath(initrd),
        "-append", cmdline if cmdline is not None else kernel_cmdline(),
        "-serial", f"file:{os.fspath(serial_log)}", "-monitor", "none",
        "-virtfs", f"local,path={host_root},mount_tag={initramfs.HOSTROOT_TAG},"
                   "security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={os.fspath(share)},mount_tag={initramfs.RESULTS_TAG},"
                   "security_model=none,multidevs=remap",
        *(["-virtfs", f"local,path={os.fspath(pycache)},mount_tag={initramfs.PYCACHE_TAG},"
                      "security_model=none,multidevs=remap"] if pycache else []),
        # The device handed to vfio-pci in the guest; its DMA goes through the vIOMMU.
        # restrict=on: the user-mode network sends nothing off the machine.
        "-netdev", "user,id=n0,restrict=on",
        "-device", "virtio-net-pci,disable-legacy=on,iommu_platform=on,netdev=n0",
        *extra,
    ]


def find_qemu(qemu: str = QEMU) -> str:
    path = shutil.which(qemu)
    if path is None:
        raise VmError(f"{qemu} not found: install QEMU (Debian: apt-get install qemu-system-x86)")
    return path


# -- run directory ---------------------------------------------------------------------

def runs_root() -> Path:
    return debian.cache_root() / "runs"


def new_run_dir() -> Path:
    root = runs_root()
    root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    d = root / f"{stamp}-{os.getpid()}"
    k = 1
    while d.exists():
        k += 1
        d = root / f"{stamp}-{os.getpid()}-{k}"
    (d / "share").mkdir(parents=True)
    _prune(root, keep=KEEP_RUNS)
    return d


def _prune(root: Path, keep: int, min_age: float = 6 * 3600) -> None:
    """Remove all but the newest ``keep`` runs; never one younger than
    ``min_age`` seconds (it may belong to a VM that is still running)."""
    runs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name)
    now = time.time()
    for old in runs[:-keep] if len(runs) > keep else []:
        try:
            if now - old.stat().st_mtime < min_age:
                continue
        except OSError:
            continue
        shutil.rmtree(old, ignore_errors=True)


# The guest sees the host's / read-only, except these: its own tmpfs, devtmpfs, proc, sysfs.
GUEST_MASKED = ("/tmp", "/run", "/dev", "/proc", "/sys")
# Host paths under these tmpfs mounts are bind-mounted back into the guest (a
# CI checkout in /tmp works); paths under the other three cannot be shown.
GUEST_BINDABLE = ("/tmp", "/run")


def masked_in_guest(path: str | os.PathLike[str]) -> str | None:
    """The guest mount that hides ``path`` (e.g. ``/tmp``), or None if the guest sees it."""
    real = os.path.realpath(path)
    for top in GUEST_MASKED:
        if real == top or real.startswith(top + "/"):
            return top
    return None


def _job_paths(job: "Job") -> list[tuple[str, str]]:
    # the environment too: a venv under /tmp holds the interpreter the guest runs, whose
    # real binary (pyenv, /usr) may lie elsewhere
    needed = [("the pyiommufd checkout", str(checkout_src())),
              ("the Python environment", sys.prefix),
              ("the Python interpreter", python_executable())]
    needed += [(f"the working directory of stage {k}", str(s.cwd))
               for k, s in enumerate(job.stages, 1) if s.cwd]
    return needed


def guest_binds(job: "Job") -> list[str]:
    """Host directories under /tmp or /run the guest must see: bind-mounted
    back over its tmpfs by /init, outermost first, none nested in another."""
    binds: list[str] = []
    for _what, path in _job_paths(job):
        real = os.path.realpath(path)
        if masked_in_guest(real) not in GUEST_BINDABLE or real in GUEST_BINDABLE:
            continue
        if not os.path.isdir(real):
            real = os.path.dirname(real)
        binds.append(real)
    binds.sort(key=len)
    kept: list[str] = []
    for b in binds:
        if not any(b == k or b.startswith(k + "/") for k in kept):
            kept.append(b)
    return kept


def check_job_paths(job: "Job") -> None:
    """Raise :class:`VmError` if the job needs a host path the guest cannot see."""
    for what, path in _job_paths(job):
        top = masked_in_guest(path)
        real = os.path.realpath(path)
        if top in GUEST_BINDABLE and real != top and not any(c.isspace() for c in real):
            continue
        if top:
            raise VmError(f"{what} ({path}) is under {top}, which the guest replaces with its "
                          f"own {top}: the guest cannot see it (move it elsewhere)")


def guest_pycache_dir() -> Path:
    """Writable byte-code cache of the guest (its ``PYTHONPYCACHEPREFIX``)."""
    d = debian.cache_root() / "guest-pycache"
    d.mkdir(parents=True, exist_ok=True)
    return d


def checkout_src() -> Path:
    """The ``src`` directory this pyiommufd is imported from (same path in the guest)."""
    import pyiommufd
    return Path(pyiommufd.__file__).resolve().parent.parent


def python_executable() -> str:
    """This interpreter, as invoked: a venv's ``bin/python`` is a symlink, and
    resolving it would lose the venv (its ``pyvenv.cfg`` and site-packages)."""
    return os.path.abspath(sys.executable)


def boot_env(binds: Sequence[str] = ()) -> str:
    py = python_executable()
    path = os.pathsep.join([os.path.dirname(py), "/usr/local/sbin", "/usr/local/bin",
                            "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    values = {"PYIOMMUFD_PYTHON": py, "PYIOMMUFD_PYTHONPATH": str(checkout_src()),
              "PYIOMMUFD_PATH": path, "PYIOMMUFD_CACHE": str(debian.cache_root()),
              "PYIOMMUFD_BINDS": " ".join(binds)}
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())


# -- running -----------------------------------------------------------------------------

class _Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.t0


def run(job: Job, *, kernel: str | os.PathLike[str] | None = None, timeout: float = DEFAULT_TIMEOUT,
        log: str | os.PathLike[str] | None = None, progress: Progress | None = print,
        machine: str = "qemu", memory: str = DEFAULT_MEMORY, smp: int = DEFAULT_SMP,
        extra_cmdline: Sequence[str] = (), qemu: str = QEMU,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        boot_retries: int = DEFAULT_BOOT_RETRIES,
        recipe: KernelRecipe = STOCK) -> VmResult:
    """Run ``job`` in a fresh VM; see the module docstring. The kernel is
    ``kernel`` (a bzImage) if given, else the cached or built kernel of
    ``recipe`` (patches and config fragments on the pristine 7.3 tree).

    ``machine="local"`` runs the agent and its stages as host processes (a kexec
    becomes "the stage exits, the agent starts again"), for tests of the
    plumbing; ``kernel`` is ignored then.

    A first boot that does not reach the agent within ``boot_timeout`` seconds
    is killed and started again (``boot_retries`` times at most; no stage has
    run then, so this is safe). ``timeout`` bounds the whole run, retries
    included.

    Raises :class:`VmError` when the VM cannot be started at all.
    """
    say = progress or (lambda _msg: None)
    clock = _Clock()

    def step(msg: str) -> None:
        say(f"[vm +{clock():.1f}s] {msg}")

    timings: dict[str, float] = {}
    kimage: KernelImage | None = None
    initrd: Path | None = None
    if machine == "qemu":
        qemu_path = find_qemu(qemu)
        check_job_paths(job)
        try:
            kimage = resolve_kernel(kernel, progress=say, recipe=recipe)
        except KernelBuildError as exc:
            raise VmError(f"kernel build failed: {exc}", log=exc.log) from exc
        timings["kernel"] = clock()
        step(f"kernel: {kimage.describe()}")
        try:
            initrd = initramfs.build_initramfs()
        except (initramfs.InitramfsError, OSError) as exc:
            raise VmError(f"initramfs: {exc}") from exc
        timings["initramfs"] = clock() - timings["kernel"]
    elif machine != "local":
        raise ValueError(f"machine must be 'qemu' or 'local', not {machine!r}")

    run_dir = new_run_dir()
    share = run_dir / "share"
    serial = Path(log) if log else run_dir / "serial.log"
    serial.parent.mkdir(parents=True, exist_ok=True)
    serial.write_bytes(b"")
    guest.write_json(share / guest.JOB, job.to_json(
        str(kimage.bzimage) if kimage else "/simulated/bzImage",
        str(initrd) if initrd else "/simulated/initrd"))
    (share / "boot.env").write_text(boot_env(guest_binds(job) if machine == "qemu" else ()))

    starter: _QemuStarter | _LocalStarter
    if machine == "qemu":
        assert kimage is not None and initrd is not None   # resolved above for QEMU
        pycache = guest_pycache_dir()
        try:
            accel, accel_why = choose_accel(qemu_path, str(kimage.bzimage), say=step)
        except ValueError as exc:
            raise VmError(str(exc)) from None
        cmd = qemu_command(kimage.bzimage, initrd, share, serial, memory=memory, smp=smp,
                           qemu=qemu_path, cmdline=kernel_cmdline(extra_cmdline),
                           pycache=pycache, accel=accel)
        (run_dir / "qemu.cmd").write_text(shlex.join(cmd) + "\n")
        starter = _QemuStarter(cmd, run_dir / "qemu.log")
        step(f"starting QEMU ({accel.upper()}: {accel_why}; timeout {timeout:.0f}s; "
             f"serial log {serial})")
    else:
        starter = _LocalStarter(share, serial)
        step(f"starting local agent (simulated VM; timeout {timeout:.0f}s)")

    res = _supervise(starter, share, serial, timeout, step, clock, len(job.stages),
                     boot_timeout=boot_timeout, boot_retries=boot_retries)
    res.kernel, res.initrd, res.run_dir, res.timings = kimage, initrd, run_dir, {**timings,
                                                                                **res.timings}
    res.timings["total"] = clock()
    step(f"VM finished: {res.boot_count} boot(s), "
         + ", ".join(s.describe() for s in res.stages)
         + (f"; TIMED OUT after {timeout:.0f}s" if res.timed_out else "")
         + (f"; {res.error}" if res.error and not res.timed_out else ""))
    return res


class _QemuStarter:
    def __init__(self, cmd: list[str], log: Path):
        self.cmd, self.log = cmd, log

    def start(self) -> subprocess.Popen[bytes]:
        out = open(self.log, "ab")
        try:
            return subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()

    can_retry = True

    def restart(self, rc: int) -> bool:
        return False

    def final_rc(self, rc: int) -> int:
        return rc


class _LocalStarter:
    def __init__(self, share: Path, serial: Path):
        self.share, self.serial = share, serial

    def start(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.update({guest.ENV_SIMULATE: "1", guest.ENV_IN_GUEST: "1",
                    guest.ENV_RESULTS: str(self.share),
                    "PYTHONPATH": os.pathsep.join(
                        [str(checkout_src())] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                 else []))})
        out = open(self.serial, "ab")
        try:
            return subprocess.Popen([sys.executable, "-m", "pyiommufd.vm.guest"],
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        finally:
            out.close()

    can_retry = False

    def restart(self, rc: int) -> bool:
        return rc == guest.SIMULATED_KEXEC_EXIT

    def final_rc(self, rc: int) -> int:
        return 0 if rc in (0, 1) else rc   # 1: a stage failed, like a clean poweroff


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except OSError:
        proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        proc.wait()


class _Events:
    """Follows events.jsonl; reports each event once with the host time it was seen."""

    def __init__(self, path: Path):
        self.path, self.offset, self.buf = path, 0, b""

    def poll_peek(self) -> bool:
        """Has the guest written anything yet?"""
        try:
            return self.path.stat().st_size > 0
        except OSError:
            return False

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


def _supervise(starter: _QemuStarter | _LocalStarter, share: Path, serial: Path, timeout: float, step: Progress,
               clock: _Clock, nstages: int, boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
               boot_retries: int = DEFAULT_BOOT_RETRIES) -> VmResult:
    events = _Events(share / guest.EVENTS)
    seen: dict[str, float] = {}
    boots_seen: dict[int, float] = {}
    timed_out = False
    rc: int | None = None
    t_start = clock()
    deadline = t_start + timeout
    attempt = 1
    t_attempt = t_start
    proc = starter.start()
    try:
        while True:
            exited = proc.poll()
            if (not boots_seen and attempt <= boot_retries and starter.can_retry
                    and clock() < deadline
                    and (clock() - t_attempt > boot_timeout or exited is not None)
                    and not events.poll_peek() and not (share / "init-error").exists()):
                # No stage has run yet, so booting again is safe. (Seen under TCG:
                # a rare early-boot hang or panic; the serial log of the failed
                # attempt is kept as serial.attempt<N>.log.)
                why = (f"QEMU exited ({exited}) before the guest reached the agent"
                       if exited is not None else
                       f"the guest did not reach the agent within {boot_timeout:.0f}s")
                step(f"{why} (attempt {attempt}); booting again")
                _kill(proc)
                kept = serial.with_name(f"{serial.stem}.attempt{attempt}{serial.suffix}")
                try:
                    os.replace(serial, kept)
                except OSError:
                    pass
                seen[f"boot_attempt{attempt}_failed"] = clock() - t_attempt
                attempt += 1
                t_attempt = clock()
                proc = starter.start()
                continue
            for ev in events.poll():
                now = clock()
                kind = ev.get("ev")
                if kind == "boot":
                    boots_seen[ev["n"]] = now
                    how = {"kexec": " after kexec", "reboot": " after an unexpected reboot"}.get(
                        ev.get("via") or "", "")
                    step(f"boot {ev['n']}{how}: Linux {ev.get('release')} "
                         f"(guest uptime {ev.get('uptime', 0):.1f}s at agent start)")
                    if ev["n"] == 1:
                        seen["first_boot"] = now - t_attempt
                    elif "kexec" in seen:
                        seen[f"kexec_{ev['n']}"] = now - seen.pop("kexec")
                elif kind == "stage-start":
                    seen[f"stage{ev['stage']}_start"] = now
                    step(f"stage {ev['stage']}/{nstages} started")
                elif kind == "stage-end":
                    st = seen.get(f"stage{ev['stage']}_start")
                    dur = f" after {now - st:.1f}s" if st is not None else ""
                    what = "ended by kexec" if ev.get("ended_by") == "kexec" else \
                        f"exited with status {ev.get('exit')}"
                    step(f"stage {ev['stage']}/{nstages} {what}{dur}")
                elif kind == "stage-skip":
                    step(f"stage {ev['stage']}/{nstages} not run: {ev.get('reason')}")
                elif kind == "kexec":
                    seen["kexec"] = now
                    step(f"kexec requested by {ev.get('by')} in stage {ev.get('stage')}")
                elif kind == "kexec-failed":
                    step(f"kexec FAILED in stage {ev.get('stage')}")
                elif kind == "done":
                    step(f"agent done (status {ev.get('status')}); powering off")
            rc = proc.poll()
            if rc is not None:
                if starter.restart(rc):
                    proc = starter.start()
                    continue
                rc = starter.final_rc(rc)
                break
            if clock() >= deadline:
                timed_out = True
                step(f"TIMEOUT after {timeout:.0f}s: killing the VM")
                _kill(proc)
                rc = proc.returncode
                break
            time.sleep(0.2)
    except BaseException:
        _kill(proc)
        raise
    for ev in events.poll():   # late events
        if ev.get("ev") == "boot":
            boots_seen.setdefault(ev["n"], clock())
    timings = {k: v for k, v in seen.items() if not k.endswith("_start") and k != "kexec"}
    return collect(share, serial, timeout=timeout, timed_out=timed_out, returncode=rc,
                   nstages=nstages, boots_seen=boots_seen, timings=timings)


def collect(share: Path, serial: Path, *, timeout: float = 0.0, timed_out: bool = False,
            returncode: int | None = None, nstages: int | None = None,
            boots_seen: dict[int, float] | None = None,
            timings: dict[str, float] | None = None) -> VmResult:
    """Build a :class:`VmResult` from a results share (after the VM is gone)."""
    job = guest.read_json(share / guest.JOB) or {"stages": []}
    state = guest.read_json(share / guest.STATE) or {"boots": []}
    nstages = len(job["stages"]) if nstages is None else nstages
    boots = [BootRecord(b["n"], b.get("release", "?"), b.get("via", "boot"), b.get("cmdline", ""),
                        b.get("uptime", 0.0), (boots_seen or {}).get(b["n"]))
             for b in state.get("boots", [])]
    problems: list[str] = []
    for name in ("init-error", "agent-error"):
        p = share / name
        if p.exists():
            problems.append(f"{name}: {p.read_text(errors='replace').strip()[-2000:]}")
    if timed_out:
        lost_reason = f"the VM timed out after {timeout:.0f}s"
    elif not boots:
        lost_reason = "the guest never started the agent"
    else:
        lost_reason = "the VM stopped before this stage finished"
    stages: list[StageResult] = []
    running = state.get("running")
    for k in range(1, nstages + 1):
        rec = guest.read_json(share / f"stage-{k}.json")
        log = share / f"stage-{k}.log"
        argv = job["stages"][k - 1]["argv"] if k - 1 < len(job["stages"]) else []
        if rec is None:
            stages.append(StageResult(k, argv, "lost", reason=lost_reason,
                                      log=log if log.exists() else None))
            continue
        ended = rec.get("ended_by")
        if ended is None:         # started, never finished (timeout, crash, poweroff)
            ended = "lost"
            if running == k - 1 and (share / guest.KEXEC).exists():
                kx = guest.read_json(share / guest.KEXEC) or {}
                if kx.get("stage") == k:
                    lost_reason = (f"stage {k} requested a kexec but the next boot never "
                                   f"reached the agent ({lost_reason})")
            rec["reason"] = lost_reason
        stages.append(StageResult(k, rec.get("argv", argv), ended, rec.get("exit"),
                                  rec.get("release"), rec.get("boot"), rec.get("duration"),
                                  rec.get("reason"), log if log.exists() else None))
    panic = _kernel_panic(serial)
    if panic:
        problems.insert(0, f"guest kernel panic: {panic}")
        for st in stages:
            if st.ended_by == "lost":
                st.reason = f"guest kernel panic: {panic}"
    ok = (not timed_out and bool(stages) and all(s.ok for s in stages) and not problems
          and (returncode in (0, None)))
    error = None
    if timed_out:
        error = f"timed out after {timeout:.0f}s"
    elif problems:
        error = "; ".join(problems)
    elif returncode not in (0, None):
        error = f"QEMU exited with status {returncode}"
    elif not boots:
        error = "the guest never started the agent"
    res = VmResult(ok, stages, boots, None, None, share.parent, share, serial, timeout, timed_out,
                   returncode, error, dict(timings or {}))
    for s in stages:
        if s.duration is not None:
            res.timings[f"stage{s.number}"] = s.duration
    return res


def _kernel_panic(serial: Path) -> str | None:
    """The reason of the last ``Kernel panic - not syncing: ...`` in the serial log."""
    text = _tail(serial, 400)
    marker = "Kernel panic - not syncing: "
    for line in reversed(text.splitlines()):
        k = line.find(marker)
        if k >= 0:
            return line[k + len(marker):].strip() or "(no reason given)"
    return None


# -- convenience -----------------------------------------------------------------------

def run_command(argv: Sequence[str], *, kernel: str | os.PathLike[str] | None = None,
                timeout: float = DEFAULT_TIMEOUT,
                kexec_stages: int | Sequence[Sequence[str]] | None = None,
                progress: Progress | None = print, cwd: str | None = None,
                env: dict[str, str] | None = None, log: str | os.PathLike[str] | None = None,
                machine: str = "qemu", memory: str = DEFAULT_MEMORY, smp: int = DEFAULT_SMP,
                extra_cmdline: Sequence[str] = (), recipe: KernelRecipe = STOCK,
                **options: Any) -> VmResult:
    """Run ``argv`` in the guest (cwd: the current directory, same path in the
    guest). ``kexec_stages``: see :func:`command_job`; ``options`` go to
    :func:`run` (memory, smp, extra_cmdline...). Raises :class:`VmError` when
    the VM cannot start."""
    job = command_job(argv, kexec_stages=kexec_stages, cwd=cwd, env=env)
    return run(job, kernel=kernel, timeout=timeout, progress=progress, log=log, machine=machine,
               memory=memory, smp=smp, extra_cmdline=extra_cmdline, recipe=recipe, **options)


__all__ = ["run", "run_command", "command_job", "collect", "qemu_command", "kernel_cmdline",
           "Job", "Stage", "StageResult", "BootRecord", "VmResult", "VmError", "find_qemu",
           "DEFAULT_TIMEOUT", "CMDLINE"]
