"""The seed flow (the series' ``iommufd_liveupdate`` test) in the VM, in the
cover letter's order, by either program: ``pyiommufd selftest`` or patch 14's
C selftest built from the kernel's own tree.

In the guest, one boot each (:func:`guest_stage`, run by the hidden
``pyiommufd vm guest-selftest`` command):

1. bind the virtio-net device to vfio-pci; stage 1; kexec while the files are
   held (``pyiommufd selftest --kexec`` from its own process, after it wrote
   its report to ``--report``'s file on the results share; the C test forks
   a holder and exits, then the guest agent kexecs);
2. after the kexec, render stage 1's report from that file (pyiommufd); bind
   the device to a non-VFIO driver (pci-pf-stub), which must fail with EBUSY
   while the device is preserved; bind it to vfio-pci; stage 2.

Each stage prints ``# seedflow {json}`` records that the host reads back
(:func:`parse_records`) into a :class:`SeedFlowResult`: per stage, the exit
status and the first step that did not pass, as a seed operation
(:class:`pyiommufd.selftest.SeedOp`, which the C test's asserts map to too) and
an errno, so the two programs can be compared step for step.
"""
from __future__ import annotations

import errno as E
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:   # imported lazily at run time: the guest side needs none of them
    from ..backend import Backend
    from . import runner
    from .kernel import KernelRecipe

RECORD = "# seedflow "
PROGRAMS = ("pyiommufd", "c")
NON_VFIO_DRIVER = "pci-pf-stub"
ENV_C_SELFTEST = "PYIOMMUFD_VM_C_SELFTEST"

# -- operation names ----------------------------------------------------------------------
# The C test's calls -> the same operation names; its asserts are numbered by
# source line, so the line of a failed assert names the call before it.
_C_CALLS = [
    (r"VFIO_DEVICE_BIND_IOMMUFD", "bind"),
    (r"IOMMU_IOAS_ALLOC", "ioas_alloc"),
    (r"IOMMU_HWPT_ALLOC", "hwpt_alloc"),
    (r"VFIO_DEVICE_ATTACH_IOMMUFD_PT", "attach"),
    (r"IOMMU_IOAS_MAP_FILE", "map_file"),
    (r"IOMMU_HWPT_LU_(SET|MARK)_PRESERVE", "mark"),
    (r"luo_session_preserve_fd\(session, (cdev_fd|iommufd|memfd)", "preserve"),
    (r"luo_session_retrieve_fd\(session, cdev_token", "retrieve_cdev"),
    (r"luo_session_retrieve_fd\(session, token", "retrieve_iommufd"),
    (r"luo_session_finish", "finish"),
]
_C_FILE_KIND = {"cdev_fd": "cdev", "iommufd": "iommufd", "memfd": "memfd"}


def c_assert_steps(source: str) -> dict[int, str]:
    """``{line of a ksft_assert: operation}`` for the C selftest's source. A
    preserve of the same kind is ``preserve_<kind>`` the first time it is
    expected to work, ``preserve_<kind>_first`` when it precedes that (the
    refused early tries) and ``preserve_<kind>_again`` in the second session."""
    steps: dict[int, str] = {}
    last: str | None = None
    seen: dict[str, int] = {}
    early = {"cdev": True, "iommufd": True}
    for lineno, line in enumerate(source.splitlines(), 1):
        for pattern, op in _C_CALLS:
            m = re.search(pattern, line)
            if not m:
                continue
            if op == "preserve":
                kind = _C_FILE_KIND[m.group(1)]
                n = seen.get(kind, 0)
                seen[kind] = n + 1
                if kind in early and early[kind]:
                    op = f"preserve_{kind}_first"
                    early[kind] = False
                elif n <= (1 if kind in early else 0):
                    op = f"preserve_{kind}"
                else:
                    op = f"preserve_{kind}_again"
            last = op
            break
        if "ksft_assert(" in line and "define" not in line and last is not None:
            steps[lineno] = last
    return steps


_BAIL = re.compile(r"Bail out! Failed: (?P<cond>.*) at \S+ (?P<line>\d+): (?P<error>.*)$")
_STRERROR = {os.strerror(n): n for n in range(1, 134)}


@dataclass
class StageOutcome:
    stage: int
    exit: int | None
    passed: bool
    first_failure: str | None = None    # canonical operation of the first step that did not pass
    errno: int | None = None
    detail: str = ""

    def describe(self) -> str:
        if self.passed:
            return f"stage {self.stage}: pass"
        err = f" {os.strerror(self.errno)} ({_errname(self.errno)})" if self.errno else ""
        return f"stage {self.stage}: stopped at {self.first_failure or '?'}{err}"


def _errname(n: int | None) -> str:
    return E.errorcode.get(n, str(n)) if n else "-"


@dataclass
class SeedFlowResult:
    program: str
    kernel: str
    stages: list[StageOutcome] = field(default_factory=list)
    non_vfio_bind_errno: int | None = None   # after the kexec; None: not tried
    non_vfio_bind_result: str | None = None  # "EBUSY", "bound", "not tried"
    log: str = ""

    def stage(self, n: int) -> StageOutcome | None:
        return next((s for s in self.stages if s.stage == n), None)

    def steps(self) -> list[tuple[int, str | None, int | None, bool]]:
        return [(s.stage, s.first_failure, s.errno, s.passed) for s in self.stages]

    def as_dict(self) -> dict[str, Any]:
        return {"program": self.program, "kernel": self.kernel,
                "non_vfio_bind": self.non_vfio_bind_result,
                "stages": [{"stage": s.stage, "passed": s.passed, "first_failure": s.first_failure,
                            "errno": s.errno, "detail": s.detail} for s in self.stages]}

    def describe(self) -> str:
        parts = [s.describe() for s in self.stages] or ["no stage ran"]
        if self.non_vfio_bind_result is not None:
            parts.insert(1, f"{NON_VFIO_DRIVER} bind after kexec: {self.non_vfio_bind_result}")
        return f"{self.program}: " + "; ".join(parts)


def parse_records(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith(RECORD):
            try:
                out.append(json.loads(line[len(RECORD):]))
            except ValueError:
                continue
    return out


def result_from_records(program: str, kernel: str, records: list[dict[str, Any]],
                        log: str = "") -> SeedFlowResult:
    """A stage is in the result only if its record is: one whose report was
    lost is missing, never taken for a pass because a kexec followed."""
    res = SeedFlowResult(program, kernel, log=log)
    for rec in records:
        if rec.get("event") == "stage":
            res.stages.append(StageOutcome(rec["stage"], rec.get("exit"), rec["passed"],
                                           rec.get("first_failure"), rec.get("errno"),
                                           rec.get("detail", "")))
        elif rec.get("event") == "non-vfio-bind":
            res.non_vfio_bind_errno = rec.get("errno")
            res.non_vfio_bind_result = rec.get("result")
    return res


# -- outcomes of each program ---------------------------------------------------------------

def python_outcome(report: dict[str, Any], exit_code: int | None) -> StageOutcome:
    """From ``pyiommufd selftest --json``: the first step that did not pass (a
    FAIL, or a SKIP that ended the run because the kernel lacks something),
    named by its seed operation (its display name when it is none)."""
    from ..selftest import Step, StepStatus

    stage = report.get("stage") or 0
    steps = [Step.from_dict(s) for s in report.get("steps", [])]
    stopped = report.get("stopped_at")
    bad = next((s for s in steps if s.index == stopped), None) if stopped else None
    if bad is None:
        bad = next((s for s in steps if s.status is StepStatus.FAIL), None)
    if bad is None and report.get("result") != "pass":
        bad = next((s for s in steps if s.status is StepStatus.SKIP), None)
    if bad is None:
        return StageOutcome(stage, exit_code, report.get("result") == "pass")
    return StageOutcome(stage, exit_code, False, bad.op.value if bad.op else bad.name, bad.errno, bad.detail)


def c_outcome(output: str, exit_code: int | None, stage: int, source: str) -> StageOutcome:
    """From the C test's output: its exit status and, for a failed assert, the
    operation before that line and the errno its message names."""
    if exit_code == 0:
        return StageOutcome(stage, exit_code, True)
    for line in output.splitlines():
        m = _BAIL.search(line)
        if m:
            op = c_assert_steps(source).get(int(m.group("line")), f"line {m.group('line')}")
            return StageOutcome(stage, exit_code, False, op, _STRERROR.get(m.group("error").strip()),
                                line.strip())
    return StageOutcome(stage, exit_code, False, None, None, output.strip()[-300:])


# -- in the guest -----------------------------------------------------------------------------

def emit(event: str, **fields: Any) -> None:
    print(RECORD + json.dumps({"event": event, **fields}, sort_keys=True), flush=True)


def try_non_vfio_bind(bdf: str, driver: str = NON_VFIO_DRIVER,
                      backend: Backend | None = None) -> tuple[str, int | None]:
    """Bind ``driver`` (not VFIO) to the device; give it back if it took it.
    Returns ``("EBUSY", errno)`` when refused, ``("bound", None)`` when it bound."""
    from .. import errors, pci

    dev = pci.PciDevice(bdf, backend)
    dev.set_driver_override(driver)
    try:
        if dev.driver is not None:
            dev.unbind()
        try:
            dev.bind(driver)
        except errors.KernelError as exc:
            return errors.errname(exc.errno), exc.errno
        bound = dev.driver
        if bound is not None:
            dev.unbind()
        return ("bound" if bound == driver else f"not bound ({bound or 'no driver'})"), None
    finally:
        dev.set_driver_override(None)


def guest_stage(stage: int, program: str, bdf: str, *, session: str, lu_abi: str | None,
                argv0: list[str], kexec_kernel: str | None, initrd: str | None,
                c_selftest: str | None, say: Callable[[str], None] = print) -> int:
    """One stage in the guest. Stage 1 of the pyiommufd program replaces this
    process (it kexecs from itself); everything else returns an exit code."""
    from .. import pci

    if stage == 2 and program == "pyiommufd":
        _render_stage1_report(say)   # first: a failure later in this stage must not lose it
    if stage == 2:
        result, err = try_non_vfio_bind(bdf)
        say(f"# bind {bdf} to {NON_VFIO_DRIVER} after the kexec: {result}")
        emit("non-vfio-bind", driver=NON_VFIO_DRIVER, result=result, errno=err)
    dev = pci.PciDevice(bdf)
    say(f"+ bind {bdf} to vfio-pci   # was: {dev.driver or 'no driver'}")
    dev.bind_vfio()
    cdev = dev.vfio_cdev
    say(f"  {bdf}: vfio-pci, cdev {cdev}")
    if program == "c":
        if cdev is None:   # the C test needs the cdev path; a None argv item would be a TypeError
            raise RuntimeError(f"{bdf}: vfio-pci exposes no cdev")
        return _c_stage(stage, cdev, c_selftest, say)
    report_file = _report_path(stage)
    args = ["selftest", bdf, "--session", session, "--json", "--report", str(report_file)]
    if lu_abi:
        args += ["--lu-abi", lu_abi]
    if stage == 1:
        assert kexec_kernel is not None, "the caller checks that stage 1 has a kernel to kexec"
        args += ["--kexec", kexec_kernel] + (["--initrd", initrd] if initrd else [])
    say("+ pyiommufd " + " ".join(args))
    sys.stdout.flush()
    # A stage 1 that passes kexecs from the child, and this process dies with
    # it: its report is rendered from --report's file after the kexec, by stage 2.
    report_file.unlink(missing_ok=True)
    proc = subprocess.run(argv0 + args, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    report = _read_report(report_file)
    if report is None:
        output = (proc.stdout + proc.stderr).strip()
        say(output)
        emit("stage", stage=stage, exit=proc.returncode, passed=False, first_failure=None,
             errno=None, detail=output[-300:])
        return proc.returncode or 1
    _render(report, stage, say, exit_code=proc.returncode)
    if proc.stderr.strip():
        say(proc.stderr.rstrip())      # its error line, after the steps it explains
    return proc.returncode


def _report_path(stage: int) -> Path:
    from . import guest

    return guest.results_dir() / f"selftest-stage-{stage}.json"


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def _render_stage1_report(say: Callable[[str], None]) -> None:
    """Stage 1 kexec'd from its own process before its parent could render
    its report: the report it wrote to the results share is rendered now."""
    path = _report_path(1)
    report = _read_report(path)
    if report is None:
        say(f"# stage 1 left no report ({path})")
        return
    say(f"# stage 1's report, written before its kexec ({path}):")
    _render(report, 1, say, exit_code=None)


def _render(report: dict[str, Any], stage: int, say: Callable[[str], None],
            exit_code: int | None) -> StageOutcome:
    """Print a ``pyiommufd selftest --json`` report as KTAP result lines and
    emit its stage record."""
    from .. import selftest as lib

    for s in report.get("steps", []):
        say(lib.format_step_ktap(lib.Step.from_dict(s)))
    counts = report.get("counts", {})
    say(f"# stage {report.get('stage')}: {str(report.get('result')).upper()} " +
        ", ".join(f"{k.lower()} {v}" for k, v in counts.items()))
    out = python_outcome(report, exit_code)
    emit("stage", stage=out.stage or stage, exit=exit_code, passed=out.passed,
         first_failure=out.first_failure, errno=out.errno, detail=out.detail)
    return out


def _c_stage(stage: int, cdev: str, binary: str | None, say: Callable[[str], None]) -> int:
    if not binary or not os.path.isfile(binary):
        say(f"# no C selftest binary ({binary or 'none given'}): this kernel's tree lacks patch 14")
        emit("stage", stage=stage, exit=None, passed=False, first_failure="no-binary", errno=None,
             detail="the kernel's tree has no iommufd_liveupdate.c")
        return 4
    source = Path(binary).with_name("iommufd_liveupdate.c")
    say(f"+ {binary} {cdev}")
    proc = subprocess.run([binary, cdev], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=300)
    sys.stdout.write(proc.stdout)
    sys.stdout.write(proc.stderr)
    text = source.read_text() if source.is_file() else ""
    out = c_outcome(proc.stdout + proc.stderr, proc.returncode, stage, text)
    emit("stage", stage=stage, exit=proc.returncode, passed=out.passed,
         first_failure=out.first_failure, errno=out.errno, detail=out.detail)
    return proc.returncode


# -- on the host ------------------------------------------------------------------------------

def guest_argv(python: str) -> list[str]:
    """How the guest runs ``pyiommufd`` (the host's python and checkout are
    visible at the same paths in the guest)."""
    return [python, "-c", "from pyiommufd.cli import main; main()"]


def job(program: str, *, python: str, session: str = "iommufd-test",
        lu_abi: str | None = None, device: str | None = None, c_selftest: str | None = None,
        env: dict[str, str] | None = None) -> runner.Job:
    """The two-stage VM job of the seed flow by ``program``."""
    from . import runner

    if program not in PROGRAMS:
        raise ValueError(f"program must be one of {PROGRAMS}, not {program!r}")
    base = guest_argv(python) + ["vm", "guest-selftest", "--session", session,
                                 "--program", program]
    if lu_abi:
        base += ["--lu-abi", lu_abi]
    if device:
        base += ["--device", device]
    stage_env = {ENV_C_SELFTEST: c_selftest} if c_selftest else {}
    # pyiommufd kexecs from the process that holds the files; the C test leaves
    # a forked holder behind and exits 0, and then the guest agent kexecs.
    return runner.Job([
        runner.Stage(base + ["--stage", "1"], cwd="/", env=stage_env,
                     kexec="self" if program == "pyiommufd" else "agent"),
        runner.Stage(base + ["--stage", "2"], cwd="/", env=stage_env, needs_kexec=True),
    ], env=dict(env or {}))


def collect(program: str, label: str, res: runner.VmResult) -> SeedFlowResult:
    """The :class:`SeedFlowResult` of a finished VM run of :func:`job`."""
    text = "\n".join(s.output() for s in res.stages)
    return result_from_records(program, label, parse_records(text), text)


def run(program: str, *, kernel: str | None = None, recipe: KernelRecipe | None = None,
        c_selftest: str | None = None, timeout: float = 1800.0,
        progress: Callable[[str], None] = print, session: str = "iommufd-test",
        lu_abi: str | None = None, env: dict[str, str] | None = None, machine: str = "qemu",
        **options: Any) -> tuple[SeedFlowResult, runner.VmResult]:
    """Boot the VM on ``kernel`` (a bzImage) or the kernel of ``recipe``, run the
    seed flow by ``program`` across a real kexec; return ``(SeedFlowResult,
    VmResult)``. The C program is the one built from the kernel's tree unless
    ``c_selftest`` names another."""
    from . import kernel as vmkernel, runner

    image = vmkernel.resolve_kernel(kernel, progress=progress,
                                    recipe=recipe or vmkernel.STOCK) if machine == "qemu" else None
    if program == "c" and c_selftest is None and image is not None and image.c_selftest:
        c_selftest = str(image.c_selftest)
    env = dict(env or {})
    if image is not None and image.lu_nr is not None:
        env.setdefault("PYIOMMUFD_LU_NR", f"{image.lu_nr:#x}")   # what the tree declares
    j = job(program, python=runner.python_executable(), session=session, lu_abi=lu_abi,
            c_selftest=c_selftest, env=env)
    res = runner.run(j, kernel=str(image.bzimage) if image else kernel, timeout=timeout,
                     progress=progress, machine=machine, **options)
    label = (image.label if image else None) or (image.release if image else None) or "?"
    return collect(program, label, res), res
