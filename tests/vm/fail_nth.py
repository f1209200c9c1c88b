"""Systematic kernel fault injection for the VM tier: fail the 1st, 2nd, 3rd, ...
allocation a library flow makes in the kernel, until a run completes with no
fault injected (the idea of the kernel's ``iommufd_fail_nth`` selftest, for
pyiommufd's own flows).

The kernel side (``CONFIG_FAULT_INJECTION`` gives ``/proc/<pid>/task/<tid>/fail-nth``;
``FAILSLAB`` and ``FAIL_PAGE_ALLOC`` are what it fails): writing N arms the
calling thread, every later ``should_fail`` of a slab or page allocation in it
counts down, and the Nth fails. Reading it back gives what is left, so 0 means
the fault was injected.

At every injection point the driver checks:

* the flow raised nothing, or a typed :class:`pyiommufd.errors.PyiommufdError`;
* the process has exactly the fds it had before;
* the same flow succeeds at once without injection;
* the kernel logged no WARNING, BUG or Oops.
"""
from __future__ import annotations

import gc
import os
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable, Protocol

from pyiommufd import errors

DEBUGFS = "/sys/kernel/debug"
#: By default both fault types skip allocations that may sleep (GFP_KERNEL: nearly every
#: allocation iommufd and LUO make) and fail_page_alloc skips order 0. The highmem filter
#: stays on: it only spares user pages (the interpreter's own page faults), which would
#: otherwise take the injected fault outside the flow under test.
KNOBS = {
    "failslab/ignore-gfp-wait": "N",
    "fail_page_alloc/ignore-gfp-wait": "N",
    "fail_page_alloc/min-order": "0",
    # no stack dump per injected fault: thousands of them would flood the serial console
    "failslab/verbose": "0",
    "fail_page_alloc/verbose": "0",
}
#: what the kernel prints for a bug of its own (an injected fault is not one)
KERNEL_COMPLAINTS = ("WARNING:", "BUG:", "Oops", "kernel BUG", "general protection fault",
                     "UBSAN:", "KASAN:")
#: a flow that still hits a fault after this many points is looping, not finishing
MAX_POINTS = 2000


def configure_kernel() -> dict[str, str]:
    """Set the debugfs knobs (:data:`KNOBS`); return their old values."""
    if not os.path.isdir(f"{DEBUGFS}/failslab"):
        raise RuntimeError(f"{DEBUGFS}/failslab missing: no CONFIG_FAILSLAB or "
                           "CONFIG_FAULT_INJECTION_DEBUG_FS, or debugfs not mounted")
    old = {}
    for knob, value in KNOBS.items():
        path = f"{DEBUGFS}/{knob}"
        with open(path) as f:
            old[knob] = f.read().strip()
        with open(path, "w") as f:
            f.write(value)
    return old


def restore_kernel(old: dict[str, str]) -> None:
    for knob, value in old.items():
        with open(f"{DEBUGFS}/{knob}", "w") as f:
            f.write(value)


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd")) - 1       # minus listdir's own directory fd


class KernelLog:
    """New records of the kernel log (``/dev/kmsg``) since the last :meth:`new`."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.lseek(self.fd, 0, os.SEEK_END)

    def new(self) -> list[str]:
        lines = []
        while True:
            try:
                rec = os.read(self.fd, 8192)
            except BlockingIOError:
                return lines
            except BrokenPipeError:           # records overwritten before we read them
                continue
            text = rec.decode(errors="replace")
            lines.append(text.split(";", 1)[-1].rstrip("\n"))

    def complaints(self) -> list[str]:
        return [line for line in self.new() if any(c in line for c in KERNEL_COMPLAINTS)]

    def close(self) -> None:
        os.close(self.fd)


class Injector(Protocol):
    def arm(self, nth: int) -> None: ...

    def disarm(self) -> bool: ...


class FailNth:
    """A thread's ``fail-nth`` file (by default the calling thread's), opened once so
    that arming costs one write."""

    def __init__(self, pid: int | None = None, tid: int | None = None) -> None:
        self.tid = tid or threading.get_native_id()
        where = "self" if pid is None else str(pid)
        self.fd = os.open(f"/proc/{where}/task/{self.tid}/fail-nth", os.O_RDWR | os.O_CLOEXEC)

    def arm(self, nth: int) -> None:
        os.pwrite(self.fd, str(nth).encode(), 0)

    def disarm(self) -> bool:
        """Stop injecting; True if the armed fault was injected."""
        left = int(os.pread(self.fd, 32, 0).decode().strip() or "0")
        os.pwrite(self.fd, b"0", 0)
        return left == 0

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Flow:
    """``act`` is the part under injection; ``setup`` builds what it needs and
    ``cleanup`` undoes it, both without injection. ``act`` gets ``setup``'s result."""

    name: str
    act: Callable[[object], object]
    setup: Callable[[], object] = lambda: None
    cleanup: Callable[[object, object], None] = lambda state, result: None
    #: who takes the fault: by default the thread that runs ``act``
    injector: Injector | None = None
    #: the fds that must come back to where they were (by default this process's)
    fd_count: Callable[[], int] = open_fd_count


@dataclass
class FlowResult:
    name: str
    points: int = 0                        # injection points: runs in which a fault was injected
    typed_errors: int = 0                  # of those, runs that raised a typed error
    failures: list[str] = field(default_factory=list)     # leaks included
    leaks: int = 0                         # injection points after which an fd was left open or closed
    kernel_findings: list[str] = field(default_factory=list)   # the kernel's fault, not ours
    completed: bool = False                # a run went through with no fault injected


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Driver:
    """Runs flows under fail-nth and keeps their results for the summary."""

    def __init__(self, log: KernelLog, nth: FailNth) -> None:
        self.log, self.nth = log, nth
        self.results: list[FlowResult] = []

    def _run_once(self, flow: Flow, nth: int) -> tuple[BaseException | None, bool]:
        injector = flow.injector or self.nth
        state = flow.setup()
        result: object = None
        exc: BaseException | None = None
        gc.disable()            # no finalizer may run (and close an fd) inside the armed window
        try:
            if nth:
                injector.arm(nth)
            try:
                result = flow.act(state)
            except BaseException as e:       # judged below: only typed errors are fine
                exc = e
            finally:
                injected = injector.disarm() if nth else False
        finally:
            gc.enable()
        flow.cleanup(state, result if exc is None else None)
        return exc, injected

    def run(self, flow: Flow) -> FlowResult:
        """Inject at 1, 2, 3, ... until a run sees no fault."""
        res = FlowResult(flow.name)
        self.results.append(res)
        exc, _ = self._run_once(flow, 0)     # warm-up: imports and caches outside the window
        if exc is not None:
            res.failures.append(f"fails without injection: {_describe(exc)}")
            return res
        self.log.new()
        for nth in range(1, MAX_POINTS + 1):
            before = flow.fd_count()
            exc, injected = self._run_once(flow, nth)
            if not injected:
                if exc is not None:
                    res.failures.append(f"nth {nth}: no fault injected, yet {_describe(exc)}")
                res.completed = True
                break
            res.points += 1
            where = f"nth {nth}"
            if exc is not None:
                if isinstance(exc, errors.PyiommufdError):
                    res.typed_errors += 1
                else:
                    res.failures.append(f"{where}: untyped {_describe(exc)}\n"
                                        + "".join(traceback.format_exception(exc)))
            after = flow.fd_count()
            if after != before:
                res.leaks += 1
                res.failures.append(f"{where}: {after - before:+d} fds after {flow.name}")
            rerun, _ = self._run_once(flow, 0)
            if rerun is not None:
                res.failures.append(f"{where}: the re-run without injection failed: {_describe(rerun)}")
            for line in self.log.complaints():
                res.failures.append(f"{where}: kernel log: {line}")
        else:
            res.failures.append(f"still injecting after {MAX_POINTS} points")
        return res


def summary(results: list[FlowResult]) -> str:
    """flows × injection points, and every failure."""
    width = max((len(r.name) for r in results), default=4)
    lines = [f"{'flow':<{width}}  points  typed errors  failures  fd leaks  kernel findings"]
    for r in results:
        lines.append(f"{r.name:<{width}}  {r.points:6d}  {r.typed_errors:12d}  {len(r.failures):8d}"
                     f"  {r.leaks:8d}  {len(r.kernel_findings):15d}")
    total_points = sum(r.points for r in results)
    total_failures = sum(len(r.failures) for r in results)
    total_leaks = sum(r.leaks for r in results)
    lines.append(f"fail-nth: {len(results)} flows x {total_points} injection points, "
                 f"{total_failures} failures, {total_leaks} leaks")
    for r in results:
        for f in r.failures:
            lines.append(f"FAILURE {r.name}: {f}")
        for k in r.kernel_findings:
            lines.append(f"KERNEL {r.name}: {k}")
    return "\n".join(lines)
