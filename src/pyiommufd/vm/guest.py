"""The in-guest agent (``python3 -m pyiommufd.vm.guest``), started by ``/init``
on every boot of the VM, including each boot after a kexec.

It works from the results share (``$PYIOMMUFD_VM_RESULTS``, by default
``/run/pyiommufd-results``):

``job.json`` (host)
    ``{"stages": [{"argv", "env", "cwd", "kexec", "needs_kexec"}], "env": {...},
    "kernel": PATH, "initrd": PATH}``.  ``kexec`` says how a stage is expected
    to end: ``"none"`` (it exits; the next stage runs in the same boot),
    ``"self"`` (it may kexec itself, from its own process, with
    :func:`kexec_same_kernel` or any kexec of its own, such as ``pyiommufd
    selftest --kexec``; it never returns then), ``"agent"`` (once it
    exits with status 0 the agent kexecs).  A stage with ``needs_kexec`` runs
    only if the previous stage ended by a kexec; any other stage runs only if
    the previous one exited with status 0.
``state.json`` (agent)
    ``{"next": i, "running": i|null, "boots": [...], "last": {...}}``, the
    index of the next stage persisted across kexecs.
``stage-<n>.json``, ``stage-<n>.log`` (agent; n is 1-based)
    exit code (``null`` when it ended by kexec), ``ended_by``
    (``exit``/``kexec``/``reboot``/``not-run``), ``release`` (``uname -r``),
    ``boot``, ``start``/``end``/``duration`` (guest wall clock), its output.
``kexec.json`` (:func:`kexec_same_kernel`), ``events.jsonl`` (progress, read
by the host while the VM runs), ``dmesg-<boot>.txt`` (the kernel log, when
the agent finishes or :func:`kexec_same_kernel` kexecs, and as it grows while
a ``"self"`` stage runs).

A ``"self"`` stage that kexecs without :func:`kexec_same_kernel` leaves no
``kexec.json`` and no ``kexec`` event: the next boot's agent takes that boot
for the stage's kexec (QEMU runs with ``-no-reboot``, and the local runner
starts the agent again only after a recorded kexec).
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from contextlib import AbstractContextManager, nullcontext
from typing import IO, TYPE_CHECKING, Any, Callable, NoReturn

if TYPE_CHECKING:
    from ..backend import Backend

DEFAULT_RESULTS = "/run/pyiommufd-results"
JOB = "job.json"
STATE = "state.json"
EVENTS = "events.jsonl"
KEXEC = "kexec.json"
KMSG = "/dev/kmsg"

# Local simulation (pyiommufd.vm.runner with machine="local", used by host-side
# unit tests): a "kexec" is the stage exiting with this status after it wrote
# kexec.json; the local runner then "boots" again by starting a new agent.
SIMULATED_KEXEC_EXIT = 197

ENV_RESULTS = "PYIOMMUFD_VM_RESULTS"
ENV_KERNEL = "PYIOMMUFD_VM_KERNEL"
ENV_INITRD = "PYIOMMUFD_VM_INITRD"
ENV_STAGE = "PYIOMMUFD_VM_STAGE"
ENV_BOOT = "PYIOMMUFD_VM_BOOT"
ENV_IN_GUEST = "PYIOMMUFD_IN_GUEST"
ENV_SIMULATE = "PYIOMMUFD_VM_SIMULATE"


# -- shared helpers (also used by the pytest plugin in the guest) --------------------

def results_dir() -> Path:
    return Path(os.environ.get(ENV_RESULTS) or DEFAULT_RESULTS)


def in_guest() -> bool:
    return os.environ.get(ENV_IN_GUEST) == "1"


def simulated() -> bool:
    return os.environ.get(ENV_SIMULATE) == "1"


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def event(kind: str, results: Path | None = None, **fields: Any) -> None:
    """Append one progress event to ``events.jsonl`` (the host tails it)."""
    rec = {"ev": kind, "t": time.time(), "uptime": uptime(), **fields}
    path = (results or results_dir()) / EVENTS
    try:
        with open(path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    except OSError:
        pass


def _open_kmsg() -> int:
    return os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK)


def _kmsg_lines(fd: int) -> list[str]:
    """The records a non-blocking /dev/kmsg ``fd`` has for its reader now, one line each."""
    lines = []
    while True:
        try:
            rec = os.read(fd, 8192)
        except BlockingIOError:
            break
        except OSError:     # EPIPE: overwritten records; keep reading
            continue
        if not rec:
            break
        head, _, msg = rec.decode(errors="replace").partition(";")
        fields = head.split(",")
        stamp = f"[{int(fields[2]) / 1e6:12.6f}] " if len(fields) > 2 and fields[2].isdigit() else ""
        lines.append(stamp + msg.split("\n", 1)[0])
    return lines


def dump_dmesg(path: Path) -> None:
    """Copy the kernel log (/dev/kmsg, non-blocking) to ``path``; best effort."""
    if simulated():
        return
    try:
        fd = _open_kmsg()
    except OSError:
        return
    try:
        lines = _kmsg_lines(fd)
    finally:
        os.close(fd)
    try:
        path.write_text("\n".join(lines) + "\n")
    except OSError:
        pass


class KmsgFollower:
    """Copies the kernel log to ``path`` as it grows, from a thread, while a
    stage that may kexec by itself runs: after such a kexec nothing is left
    in that boot to call :func:`dump_dmesg`. Best effort, like it."""

    def __init__(self, path: Path, open_kmsg: Callable[[], int] = _open_kmsg) -> None:
        self.path, self.open_kmsg = path, open_kmsg
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> KmsgFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self._thread.join(timeout=2.0)

    def _follow(self) -> None:
        try:
            fd = self.open_kmsg()
        except OSError:
            return
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            with open(self.path, "w") as out:
                while not self._stopping.is_set():
                    lines = _kmsg_lines(fd)
                    if lines:   # written through at once: the results share is 9p with cache=none
                        out.write("\n".join(lines) + "\n")
                        out.flush()
                    poller.poll(500)
        except OSError:
            pass
        finally:
            os.close(fd)


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def kexec_same_kernel(*, by: str = "stage", backend: Backend | None = None) -> NoReturn:
    """Kexec into the VM's kernel and initramfs with the current command line
    (``--reuse-cmdline`` semantics), from the calling process, which keeps its
    file descriptors (LUO sessions!) open until the kexec. Never returns; raises
    :class:`pyiommufd.errors.KexecError` if the kexec fails.

    The paths come from ``$PYIOMMUFD_VM_KERNEL``/``$PYIOMMUFD_VM_INITRD``, set
    by the agent for every stage. The next boot's agent sees ``kexec.json``
    and continues with the next stage.
    """
    kernel = os.environ.get(ENV_KERNEL)
    initrd = os.environ.get(ENV_INITRD) or None
    if not kernel:
        raise RuntimeError(f"{ENV_KERNEL} is not set: kexec_same_kernel() works only inside the "
                           "pyiommufd VM (pyiommufd.vm.runner)")
    res = results_dir()
    stage = int(os.environ.get(ENV_STAGE) or 0)
    boot = int(os.environ.get(ENV_BOOT) or 0)
    cmdline = None
    if sys.flags.no_site:       # the agent runs with -S; pyiommufd.kexec needs cffi
        import site
        site.main()
    if not simulated():
        from pyiommufd import kexec
        cmdline = kexec.load(kernel, initrd=initrd, cmdline=None, backend=backend)
    marker = res / KEXEC
    write_json(marker, {"stage": stage, "boot": boot, "by": by, "time": time.time(),
                        "uptime": uptime(), "cmdline": cmdline, "kernel": kernel,
                        "initrd": initrd})
    event("kexec", res, stage=stage, boot=boot, by=by)
    dump_dmesg(res / f"dmesg-{boot}.txt")
    _flush_std()
    os.sync()
    if simulated():
        os._exit(SIMULATED_KEXEC_EXIT)
    from pyiommufd import kexec
    try:
        kexec.execute(backend=backend)
    except BaseException:
        try:
            marker.unlink()
        except OSError:
            pass
        event("kexec-failed", res, stage=stage, boot=boot, by=by)
        raise
    raise AssertionError("unreachable")  # pragma: no cover  (execute() never returns)


# -- the agent ---------------------------------------------------------------------

def _tee(src: IO[bytes], log_path: Path) -> None:
    out = sys.stdout.buffer
    with open(log_path, "ab", buffering=0) as log:
        while True:
            try:
                chunk = os.read(src.fileno(), 65536)
            except OSError:
                break
            if not chunk:
                break
            log.write(chunk)
            try:
                out.write(chunk)
                out.flush()
            except (OSError, ValueError):
                pass


def _run_stage(stage: dict[str, Any], env: dict[str, str], log_path: Path) -> int:
    cwd = stage.get("cwd") or None
    try:
        proc = subprocess.Popen(stage["argv"], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as exc:
        msg = f"pyiommufd-agent: cannot start {stage['argv']!r}: {exc}\n"
        with open(log_path, "a") as f:
            f.write(msg)
        sys.stdout.write(msg)
        return 127
    reader = threading.Thread(target=_tee, args=(proc.stdout, log_path), daemon=True)
    reader.start()
    rc = proc.wait()
    # A daemon the stage left behind may still hold the pipe open: don't wait for it.
    reader.join(timeout=2.0)
    return rc


def _blocked(stage: dict[str, Any], last: dict[str, Any] | None) -> str | None:
    """Why ``stage`` must not run after ``last`` (None: it may run)."""
    if last is None:
        return None
    k = last["stage"]
    if last["how"] == "reboot":
        return f"the guest rebooted unexpectedly during stage {k}"
    if last["how"] == "kexec-failed":
        return f"the kexec after stage {k} failed: {last.get('error')}"
    if stage.get("needs_kexec"):
        if last["how"] != "kexec":
            return f"stage {k} exited with status {last['exit']} instead of kexec'ing"
        return None
    if last["how"] == "exit" and last["exit"] != 0:
        return f"stage {k} failed with exit status {last['exit']}"
    return None


def agent(results: Path | None = None) -> int:
    res = results or results_dir()
    job = read_json(res / JOB)
    if job is None:
        print(f"pyiommufd-agent: no {JOB} in {res}", flush=True)
        return 2
    stages: list[dict[str, Any]] = job["stages"]
    state = read_json(res / STATE) or {"next": 0, "running": None, "boots": [], "last": None}
    n = len(state["boots"]) + 1
    release = os.uname().release
    try:
        cmdline = Path("/proc/cmdline").read_text().strip()
    except OSError:
        cmdline = ""
    boot = {"n": n, "release": release, "cmdline": cmdline, "time": time.time(),
            "uptime": uptime()}
    kx = read_json(res / KEXEC)
    came_by_kexec = bool(kx) and kx.get("boot") == n - 1
    running = state.get("running")
    if not came_by_kexec and running is not None and stages[running].get("kexec") == "self":
        # A stage that kexecs by itself (``pyiommufd selftest --kexec``) leaves no kexec.json.
        # QEMU runs with -no-reboot and the local runner starts again only after a recorded
        # kexec, so another boot while that stage ran is its kexec.
        kx = {"stage": running + 1, "boot": n - 1, "by": "stage", "time": boot["time"]}
        came_by_kexec = True
    boot["via"] = "kexec" if came_by_kexec else ("boot" if n == 1 else "reboot")
    state["boots"].append(boot)
    write_json(res / STATE, state)
    event("boot", res, n=n, release=release, via=boot["via"])
    print(f"pyiommufd-agent: boot {n} ({boot['via']}), Linux {release}, "
          f"up {boot['uptime']:.1f}s", flush=True)

    if running is not None:        # the stage that was running when the last boot ended
        num = running + 1
        rec = read_json(res / f"stage-{num}.json") or {"stage": num}
        if came_by_kexec and kx.get("stage") == num:
            rec.update(ended_by="kexec", exit=None, end=kx["time"], kexec_by=kx.get("by"))
            how = "kexec"
        else:
            rec.update(ended_by="reboot", exit=None, end=boot["time"])
            how = "reboot"
        rec["duration"] = rec["end"] - rec.get("start", rec["end"])
        write_json(res / f"stage-{num}.json", rec)
        event("stage-end", res, stage=num, ended_by=how, exit=None)
        state.update(running=None, next=running + 1, last={"stage": num, "how": how, "exit": None})
        write_json(res / STATE, state)
    elif came_by_kexec and state.get("last") and kx.get("by") == "agent":
        state["last"] = dict(state["last"], how="kexec")
        write_json(res / STATE, state)

    base_env = dict(os.environ)
    base_env.update({k: str(v) for k, v in (job.get("env") or {}).items()})
    if job.get("kernel"):
        base_env[ENV_KERNEL] = job["kernel"]
    if job.get("initrd"):
        base_env[ENV_INITRD] = job["initrd"]
    base_env[ENV_RESULTS] = str(res)
    base_env[ENV_BOOT] = str(n)

    status = 0
    while state["next"] < len(stages):
        i = state["next"]
        num = i + 1
        stage = stages[i]
        why = _blocked(stage, state.get("last"))
        if why:
            for j in range(i, len(stages)):
                write_json(res / f"stage-{j + 1}.json",
                           {"stage": j + 1, "argv": stages[j]["argv"], "ended_by": "not-run",
                            "exit": None, "reason": why})
                event("stage-skip", res, stage=j + 1, reason=why)
            print(f"pyiommufd-agent: stages {num}..{len(stages)} not run: {why}", flush=True)
            state["next"] = len(stages)
            write_json(res / STATE, state)
            status = status or 1
            break
        env = dict(base_env)
        env.update({k: str(v) for k, v in (stage.get("env") or {}).items()})
        env[ENV_STAGE] = str(num)
        rec = {"stage": num, "argv": stage["argv"], "boot": n, "release": release,
               "start": time.time(), "start_uptime": uptime(), "ended_by": None, "exit": None}
        write_json(res / f"stage-{num}.json", rec)
        state["running"] = i
        write_json(res / STATE, state)
        event("stage-start", res, stage=num, boot=n)
        print(f"pyiommufd-agent: stage {num}/{len(stages)}: {' '.join(stage['argv'])}", flush=True)
        kernel_log: AbstractContextManager[object] = nullcontext()
        if stage.get("kexec") == "self" and not simulated():
            kernel_log = KmsgFollower(res / f"dmesg-{n}.txt")
        with kernel_log:
            rc = _run_stage(stage, env, res / f"stage-{num}.log")
        kx = read_json(res / KEXEC)
        if (simulated() and rc == SIMULATED_KEXEC_EXIT and kx
                and kx.get("boot") == n and kx.get("stage") == num):
            return SIMULATED_KEXEC_EXIT      # the local runner "boots" again
        rec.update(exit=rc, ended_by="exit", end=time.time())
        rec["duration"] = rec["end"] - rec["start"]
        write_json(res / f"stage-{num}.json", rec)
        state.update(running=None, next=i + 1, last={"stage": num, "how": "exit", "exit": rc})
        write_json(res / STATE, state)
        event("stage-end", res, stage=num, ended_by="exit", exit=rc)
        print(f"pyiommufd-agent: stage {num} exited with status {rc}", flush=True)
        if rc != 0:
            status = status or 1
        if rc == 0 and stage.get("kexec") == "agent" and i + 1 < len(stages):
            print(f"pyiommufd-agent: kexec after stage {num}", flush=True)
            for key in (ENV_KERNEL, ENV_INITRD, ENV_RESULTS, ENV_BOOT):
                if key in base_env:
                    os.environ[key] = base_env[key]
            os.environ[ENV_STAGE] = str(num)
            try:
                kexec_same_kernel(by="agent")
            except SystemExit:
                raise
            except BaseException as exc:   # the next stage will be reported as not run
                print(f"pyiommufd-agent: kexec failed: {exc}", flush=True)
                event("kexec-failed", res, stage=num, error=str(exc))
                state["last"] = {"stage": num, "how": "kexec-failed", "exit": 0,
                                 "error": str(exc)}
                write_json(res / STATE, state)
    dump_dmesg(res / f"dmesg-{n}.txt")
    event("done", res, status=status, boot=n)
    return status


def main(argv: list[str] | None = None) -> int:
    try:
        return agent()
    except Exception as exc:                 # report, then let /init power off
        import traceback
        traceback.print_exc()
        try:
            (results_dir() / "agent-error").write_text(
                "".join(traceback.format_exception(exc)))
        except OSError:
            pass
        return 3


if __name__ == "__main__":
    sys.exit(main())
