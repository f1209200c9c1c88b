"""The series' ``iommufd_liveupdate`` selftest, step for step (the C test in
the series' patch "selftests/iommu: Add a live update test").

:func:`run` detects the stage the way the C test does, by retrieving the
session: none yet means stage 1 (before kexec), one means stage 2 (after).
The stage fixes the plan (:data:`STAGE1_PLAN`, :data:`STAGE2_PLAN`); steps a
stopped run never reached are reported as SKIP, so the plan always holds.

Each step is a :class:`Step`: PASS, FAIL, SKIP, or XFAIL for an expected
failure the kernel produced ("preserving the cdev before its iommufd fails").
An ordering check counts only where the kernel demonstrably has the handler
for that file kind (its positive preserve succeeded later in the run): LUO's
ENOENT also means "no handler for this file type", so without one the check
proves nothing and is a SKIP. Steps are passed to ``on_step`` in order, an
ordering check once that is settled.

A kernel that lacks what the series adds ends the run with
``result == "unsupported"`` and :attr:`Report.lacking` naming it, instead of
a failure: on upstream 7.3 that is the missing iommufd live-update handler.

Stage 1 leaves its files preserved in an open session: keep
:attr:`Report.handles` alive until the kexec (``pyiommufd selftest --hold``
hands them to the agent, ``--kexec`` reboots while holding them).
"""
from __future__ import annotations

import enum
import errno as E
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, TypeVar

from . import abi as lu_abi_mod
from . import errors
from .backend import Backend, get_backend
from .fdobject import FileKind
from .iommufd import IOMMUFD
from .luo import LiveUpdate, Session
from .memfd import LIVE_UPDATE_SEALS, MemFD
from .vfio import VfioDevice

_T = TypeVar("_T")

SESSION_NAME = "iommufd-test"
BUFFER_SIZE = 1 << 20
SEED_IOVA = 1 << 32  # passed without FIXED_IOVA, as the seed does: the kernel picks


#: Stage 1 (before the kexec), one name per step; runs record the same steps
#: with details (the device, the revision) in some names.
STAGE1_PLAN = (
    "open /dev/liveupdate", "retrieve session", "create session", "open /dev/iommu",
    "memfd_create with MFD_ALLOW_SEALING", "ftruncate memfd to 1 MiB",
    "seal memfd SEAL|GROW|SHRINK before mapping", "open VFIO cdev", "VFIO_DEVICE_BIND_IOMMUFD",
    "IOMMU_IOAS_ALLOC", "IOMMU_HWPT_ALLOC", "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
    "IOMMU_IOAS_MAP_FILE of the sealed memfd", "mark HWPT for preservation",
    "preserve cdev before its iommufd", "preserve iommufd before its memfd",
    "preserve memfd", "preserve iommufd", "preserve cdev",
    "close the session (unpreserves everything)", "create session again",
    "preserve memfd again", "preserve iommufd again", "preserve cdev again",
)
#: Stage 2 (after the kexec).
STAGE2_PLAN = (
    "open /dev/liveupdate", "retrieve session", "retrieve cdev", "retrieve iommufd",
    "open a new /dev/iommu", "bind the retrieved cdev to a new iommufd", "finish the session",
)


class StepStatus(enum.StrEnum):
    """A step's result, as KTAP and kselftest say it."""

    PASS = "PASS"
    XFAIL = "XFAIL"   # an expected failure happened
    FAIL = "FAIL"
    SKIP = "SKIP"


STATUSES = tuple(StepStatus)


class StepReason(enum.StrEnum):
    """Why a step has its status."""

    SUCCEEDED = "succeeded"                       # PASS
    REFUSED_AS_EXPECTED = "refused-as-expected"   # XFAIL
    REFUSED = "refused"                           # FAIL: a step that must succeed did not
    CANNOT_OPEN = "cannot-open"                   # FAIL: a device node would not open (held, not permitted)
    WRONG_ERRNO = "wrong-errno"                   # FAIL: refused, but not with the errno the series says
    ACCEPTED = "accepted"                         # FAIL: the kernel accepted what it must refuse
    KERNEL_LACKS = "kernel-lacks"                 # SKIP: a capability the test needs is missing
    ORDER_NOT_TESTED = "order-not-tested"         # SKIP: ENOENT could mean a missing handler
    NOT_RUN = "not-run"                           # SKIP: the run stopped before it


class SeedOp(enum.StrEnum):
    """The seed flow's operations, named as the series' C selftest's calls are
    (pyiommufd.vm.seedflow compares the two programs by them)."""

    BIND = "bind"
    IOAS_ALLOC = "ioas_alloc"
    HWPT_ALLOC = "hwpt_alloc"
    ATTACH = "attach"
    MAP_FILE = "map_file"
    MARK = "mark"
    PRESERVE_CDEV_FIRST = "preserve_cdev_first"
    PRESERVE_IOMMUFD_FIRST = "preserve_iommufd_first"
    PRESERVE_MEMFD = "preserve_memfd"
    PRESERVE_IOMMUFD = "preserve_iommufd"
    PRESERVE_CDEV = "preserve_cdev"
    PRESERVE_MEMFD_AGAIN = "preserve_memfd_again"
    PRESERVE_IOMMUFD_AGAIN = "preserve_iommufd_again"
    PRESERVE_CDEV_AGAIN = "preserve_cdev_again"
    RETRIEVE_CDEV = "retrieve_cdev"
    RETRIEVE_IOMMUFD = "retrieve_iommufd"
    BIND_NEW_IOMMUFD = "bind_new_iommufd"
    FINISH = "finish"


@dataclass(frozen=True)
class Tokens:
    """The C test's tokens."""

    iommufd: int = 0x123456
    cdev: int = 0x654321
    hwpt: int = 0x789012
    memfd: int = 0x890123


@dataclass
class Step:
    index: int
    name: str
    status: StepStatus
    expected: str = ""
    detail: str = ""
    errno: int | None = None
    reason: StepReason = StepReason.SUCCEEDED
    #: the seed flow operation this step is, if it is one
    op: SeedOp | None = None

    @property
    def errname(self) -> str | None:
        return errors.errname(self.errno) if self.errno else None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Step":
        """A step of a ``selftest --json`` report (:meth:`Report.as_dict`)."""
        status = StepStatus(data["status"])
        reason = data.get("reason")
        op = data.get("op")
        return cls(int(data.get("index", 0)), str(data["name"]), status, str(data.get("expected", "")),
                   str(data.get("detail", "")), data.get("errno"),
                   StepReason(reason) if reason else _DEFAULT_REASON[status], SeedOp(op) if op else None)


_DEFAULT_REASON = {StepStatus.PASS: StepReason.SUCCEEDED, StepStatus.XFAIL: StepReason.REFUSED_AS_EXPECTED,
                   StepStatus.FAIL: StepReason.REFUSED, StepStatus.SKIP: StepReason.NOT_RUN}


@dataclass
class Handles:
    """What stage 1 leaves preserved; closing the session unpreserves it all."""

    liveupdate: LiveUpdate
    session: Session
    files: list[tuple[int, object, dict[str, Any]]] = field(default_factory=list)
    others: list[object] = field(default_factory=list)

    def close(self) -> None:
        for obj in [self.session, *(f[1] for f in self.files), *self.others, self.liveupdate]:
            close = getattr(obj, "close", None)
            if close is not None:
                close()


@dataclass
class Report:
    stage: int = 0
    steps: list[Step] = field(default_factory=list)
    result: str = "pass"  # pass, fail, unsupported
    lacking: str | None = None
    lu_abi: str | None = None
    handles: Handles | None = None
    #: the step that ended the run early (a FAIL, or the SKIP naming what the kernel lacks);
    #: the SKIPs after it were not run
    stopped_at: int | None = None

    @property
    def passed(self) -> bool:
        return self.result == "pass"

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "result": self.result, "lacking": self.lacking, "lu_abi": self.lu_abi,
            "stopped_at": self.stopped_at,
            "steps": [dict(asdict(s), errname=s.errname) for s in self.steps],
            "counts": self.counts(),
        }

    def counts(self) -> dict[str, int]:
        return {k.value: sum(s.status is k for s in self.steps) for k in StepStatus}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def to_ktap(self) -> str:
        """The whole run as KTAP: plan first, a comment for each non-result
        line, kselftest's ``# Totals:`` line last."""
        lines = ["KTAP version 1", f"1..{len(self.steps)}", f"# iommufd_liveupdate stage {self.stage}"]
        lines += [format_step_ktap(s) for s in self.steps]
        lines += [summary_line(self), totals_line(self)]
        return "\n".join(lines)

    def close(self) -> None:
        if self.handles is not None:
            self.handles.close()
            self.handles = None


def _one_line(text: str) -> str:
    # a '#' in a name would end it early for KTAP readers, a newline the line
    return " ".join(text.split()).replace("#", "%23")


def format_step_ktap(step: Step) -> str:
    """``ok N name``, ``ok N name # SKIP why``, ``ok N name # XFAIL why`` or
    ``not ok N name # why`` (KTAP v1 result lines with their directives)."""
    name, detail = _one_line(step.name), " ".join(step.detail.split())
    if step.status in (StepStatus.SKIP, StepStatus.XFAIL):
        return f"ok {step.index} {name} # {step.status.value} {detail}".rstrip()
    prefix = "ok" if step.status is StepStatus.PASS else "not ok"
    tail = f" # {detail}" if detail else ""
    return f"{prefix} {step.index} {name}{tail}"


def summary_line(report: Report) -> str:
    counts = report.counts()
    stage = f"stage {report.stage}" if report.stage else "before stage detection"
    text = f"# {stage}: {report.result.upper()} (pass {counts['PASS']}, xfail {counts['XFAIL']}, " \
           f"fail {counts['FAIL']}, skip {counts['SKIP']})"
    if report.lacking:
        text += f": {report.lacking}"
    return text


def totals_line(report: Report) -> str:
    """kselftest's closing line (``ksft_print_cnts()``); we never count an
    unexpected pass (it is a FAIL) or a test-harness error."""
    c = report.counts()
    return (f"# Totals: pass:{c['PASS']} fail:{c['FAIL']} xfail:{c['XFAIL']} xpass:0 "
            f"skip:{c['SKIP']} error:0")


class _Stop(Exception):
    """Ends the run after a step that later steps depend on."""


class _Runner:
    """Records steps, holds ordering checks until the kernel showed the handler
    they depend on, and passes settled steps to ``on_step`` in order."""

    def __init__(self, backend: Backend, on_step: Callable[[Step], None] | None,
                 on_plan: Callable[[int], None] | None):
        self.backend = backend
        self.report = Report()
        self.on_step = on_step
        self.on_plan = on_plan
        self.plan: tuple[str, ...] | None = None
        self.opened: list[Any] = []  # objects with close()
        self.unsettled: dict[int, str] = {}  # step index -> file kind whose handler it needs
        self.handlers_seen: set[str] = set()
        self.handlers_missing: dict[str, int] = {}  # file kind -> the step that showed it
        self.emitted = 0

    def set_plan(self, plan: tuple[str, ...]) -> None:
        self.plan = plan
        if self.on_plan:
            self.on_plan(len(plan))
        self._emit()

    def _emit(self) -> None:
        if self.plan is None:
            return
        steps = self.report.steps
        while self.emitted < len(steps) and steps[self.emitted].index not in self.unsettled:
            if self.on_step:
                self.on_step(steps[self.emitted])
            self.emitted += 1

    def record(self, name: str, status: StepStatus, reason: StepReason, expected: str = "", detail: str = "",
               err: int | None = None, *, needs_handler: str | None = None, op: SeedOp | None = None) -> Step:
        step = Step(len(self.report.steps) + 1, name, status, expected, detail, err, reason, op)
        self.report.steps.append(step)
        if status is StepStatus.FAIL and self.report.result == "pass":
            self.report.result = "fail"
        if needs_handler is not None and needs_handler not in self.handlers_seen:
            self.unsettled[step.index] = needs_handler
        self._emit()
        return step

    def handler_works(self, kind: str) -> None:
        """A preserve of ``kind`` succeeded: its handler exists, so the ordering
        checks that got ENOENT for it tested the order."""
        self.handlers_seen.add(kind)
        for index, needed in list(self.unsettled.items()):
            if needed == kind:
                del self.unsettled[index]
        self._emit()

    def finish(self) -> None:
        """Settle what is left: unverified ordering checks and unreached steps
        become SKIPs, and a run that stopped before the stage was known gets
        the plan of what it did."""
        for index, kind in sorted(self.unsettled.items()):
            step = self.report.steps[index - 1]
            got = step.errname or "the error"
            if kind in self.handlers_missing:
                why = (f"this kernel has no {kind} live-update handler (step "
                       f"{self.handlers_missing[kind]}), and without one LUO answers ENOENT whatever the order")
            else:
                why = (f"a kernel without {_article(kind)} {kind} live-update handler answers ENOENT too, "
                       f"and no {kind} preserve succeeded in this run to rule that out")
            step.status, step.reason = StepStatus.SKIP, StepReason.ORDER_NOT_TESTED
            step.detail = f"order not tested: got {got}, but {why}"
        self.unsettled.clear()
        if self.plan is None:
            self.set_plan(tuple(s.name for s in self.report.steps))
            return
        reason = self.report.lacking or next(
            (f"step {s.index} failed" for s in self.report.steps if s.status is StepStatus.FAIL),
            "the run stopped early")
        for name in self.plan[len(self.report.steps):]:
            self.record(name, StepStatus.SKIP, StepReason.NOT_RUN, "", f"not run: {reason}")
        self._emit()

    def must(self, name: str, fn: Callable[[], _T], *, expected: str = "succeeds",
             lacking: Callable[[OSError], str | None] | None = None,
             detail: Callable[[_T], str] | None = None, handler: str | None = None,
             opens: bool = False, op: SeedOp | None = None) -> _T:
        """Run a step that must succeed; stop the run if it does not. ``handler``
        names the file kind whose live-update handler a success proves;
        ``opens``: the step opens a device node, so its failure says more
        about the host (held, not permitted) than about the kernel's rules."""
        try:
            value = fn()
        except (errors.PyiommufdError, OSError) as exc:
            err = getattr(exc, "errno", None)
            missing = lacking(exc) if lacking and isinstance(exc, OSError) else None
            if missing:
                self.report.result, self.report.lacking = "unsupported", missing
                if handler is not None:
                    self.handlers_missing[handler] = len(self.report.steps) + 1
                self.record(name, StepStatus.SKIP, StepReason.KERNEL_LACKS, expected, missing, err, op=op)
            else:
                reason = StepReason.CANNOT_OPEN if opens else StepReason.REFUSED
                self.record(name, StepStatus.FAIL, reason, expected, str(exc), err, op=op)
            self.report.stopped_at = len(self.report.steps)
            raise _Stop from None
        if hasattr(value, "close") and value is not None:
            self.opened.append(value)
        self.record(name, StepStatus.PASS, StepReason.SUCCEEDED, expected, detail(value) if detail else "", op=op)
        if handler is not None:
            self.handler_works(handler)
        return value

    def must_fail(self, name: str, fn: Callable[[], object], *, expected_errno: int | None = None,
                  why: str = "", needs_handler: str | None = None, op: SeedOp | None = None) -> Step:
        """A step the kernel must refuse (with ``expected_errno`` if given).
        With ``needs_handler``, the refusal counts only once a preserve of that
        file kind has succeeded (see :meth:`finish`)."""
        expected = f"fails with {errors.errname(expected_errno)}" if expected_errno else "fails"
        try:
            value = fn()
        except errors.KernelError as exc:
            if expected_errno is None or exc.errno == expected_errno:
                note = f"{exc.errname}" + (f": {why}" if why else "")
                return self.record(name, StepStatus.XFAIL, StepReason.REFUSED_AS_EXPECTED, expected, note,
                                   exc.errno, needs_handler=needs_handler, op=op)
            return self.record(name, StepStatus.FAIL, StepReason.WRONG_ERRNO, expected,
                               f"failed with {exc.errname}, not {errors.errname(expected_errno)}: {exc}",
                               exc.errno, op=op)
        if hasattr(value, "close"):
            self.opened.append(value)
        return self.record(name, StepStatus.FAIL, StepReason.ACCEPTED, expected, "the kernel accepted it", op=op)


def _no_device(what: str) -> Callable[[OSError], str | None]:
    def check(exc: OSError) -> str | None:
        if exc.errno in (E.ENOENT, E.ENODEV, E.ENXIO):
            return f"kernel lacks {what}"
        return None
    return check


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _no_handler(kind: str) -> Callable[[OSError], str | None]:
    def check(exc: OSError) -> str | None:
        if exc.errno == E.ENOENT:
            return (f"kernel lacks {_article(kind)} {kind} live-update handler "
                    "(ENOENT from LIVEUPDATE_SESSION_PRESERVE_FD)")
        return None
    return check


def _stage1(r: _Runner, luo: LiveUpdate, device: str, session_name: str, tokens: Tokens,
            lu_abi: str | None) -> None:
    be = r.backend
    session = r.must(f"create session {session_name!r}", lambda: luo.create_session(session_name))
    iommufd = r.must("open /dev/iommu", lambda: IOMMUFD.open(backend=be), lacking=_no_device("/dev/iommu"),
                     opens=True)
    memfd = r.must("memfd_create with MFD_ALLOW_SEALING", lambda: MemFD.create("buffer", backend=be))
    r.must("ftruncate memfd to 1 MiB", lambda: memfd.resize(BUFFER_SIZE))
    r.must("seal memfd SEAL|GROW|SHRINK before mapping", lambda: memfd.add_seals(LIVE_UPDATE_SEALS),
           detail=lambda _: f"seals now {int(memfd.seals):#x}")
    cdev = r.must(f"open VFIO cdev {device}", lambda: VfioDevice.open(device, backend=be),
                  lacking=_no_device(f"the VFIO device {device}"), opens=True)
    dev_id = r.must("VFIO_DEVICE_BIND_IOMMUFD", lambda: cdev.bind(iommufd), detail=lambda v: f"dev_id {v}",
                    op=SeedOp.BIND)
    ioas = r.must("IOMMU_IOAS_ALLOC", iommufd.alloc_ioas, detail=lambda v: f"ioas {v.id}", op=SeedOp.IOAS_ALLOC)
    hwpt = r.must("IOMMU_HWPT_ALLOC", lambda: iommufd.alloc_hwpt(dev_id, ioas), detail=lambda v: f"hwpt {v.id}",
                  op=SeedOp.HWPT_ALLOC)
    r.must("VFIO_DEVICE_ATTACH_IOMMUFD_PT", lambda: cdev.attach(hwpt), detail=lambda v: f"pt_id {v}",
           op=SeedOp.ATTACH)
    r.must("IOMMU_IOAS_MAP_FILE of the sealed memfd",
           lambda: ioas.map_file(memfd, 0, BUFFER_SIZE, hint_iova=SEED_IOVA),
           detail=lambda v: f"iova {v:#x}", op=SeedOp.MAP_FILE)

    marked = False
    try:
        abi = lu_abi_mod.select_lu_abi(lu_abi, iommufd=iommufd, backend=be)
    except errors.AbiError as exc:
        r.record("mark HWPT for preservation", StepStatus.SKIP, StepReason.KERNEL_LACKS, "succeeds", str(exc),
                 op=SeedOp.MARK)
    else:
        r.report.lu_abi = abi.name
        r.must(f"{abi.ioctl_name} token {tokens.hwpt:#x} ({abi.name})",
               lambda: hwpt.mark_preserved(tokens.hwpt, abi=abi), op=SeedOp.MARK)
        marked = True

    r.must_fail("preserve cdev before its iommufd",
                lambda: session.preserve(cdev, tokens.cdev), why="iommufd not in this session",
                needs_handler="vfio-pci", op=SeedOp.PRESERVE_CDEV_FIRST)
    r.must_fail("preserve iommufd before its memfd",
                lambda: session.preserve(iommufd, tokens.iommufd), why="memfd not in this session",
                needs_handler="iommufd", op=SeedOp.PRESERVE_IOMMUFD_FIRST)
    r.must("preserve memfd", lambda: session.preserve(memfd, tokens.memfd), handler="memfd",
           op=SeedOp.PRESERVE_MEMFD)
    r.must("preserve iommufd", lambda: session.preserve(iommufd, tokens.iommufd),
           lacking=_no_handler("iommufd"), handler="iommufd", op=SeedOp.PRESERVE_IOMMUFD)
    if not marked:
        # The series refuses a cdev whose HWPT is not marked: nothing more to learn.
        r.record("preserve cdev", StepStatus.SKIP, StepReason.NOT_RUN, "succeeds", "the HWPT could not be marked",
                 op=SeedOp.PRESERVE_CDEV)
        r.report.stopped_at = len(r.report.steps)
        raise _Stop
    r.must("preserve cdev", lambda: session.preserve(cdev, tokens.cdev), lacking=_no_handler("vfio-pci"),
           handler="vfio-pci", op=SeedOp.PRESERVE_CDEV)

    r.must("close the session (unpreserves everything)", session.close)
    session = r.must(f"create session {session_name!r} again", lambda: luo.create_session(session_name))
    r.must("preserve memfd again", lambda: session.preserve(memfd, tokens.memfd), op=SeedOp.PRESERVE_MEMFD_AGAIN)
    r.must("preserve iommufd again", lambda: session.preserve(iommufd, tokens.iommufd),
           op=SeedOp.PRESERVE_IOMMUFD_AGAIN)
    r.must("preserve cdev again", lambda: session.preserve(cdev, tokens.cdev), op=SeedOp.PRESERVE_CDEV_AGAIN)
    r.report.handles = Handles(luo, session, files=[
        (tokens.memfd, memfd, {"kind": FileKind.MEMFD.value, "name": "buffer", "size": BUFFER_SIZE}),
        (tokens.iommufd, iommufd, {"kind": FileKind.IOMMUFD.value, "hwpt_token": tokens.hwpt}),
        (tokens.cdev, cdev, {"kind": FileKind.VFIO_CDEV.value, "device": device}),
    ], others=[hwpt, ioas])


def _stage2(r: _Runner, session: Session, tokens: Tokens) -> None:
    be = r.backend
    cdev_fd = r.must(f"retrieve cdev (token {tokens.cdev:#x})", lambda: session.retrieve(tokens.cdev).fd,
                     detail=lambda fd: f"fd {fd}", op=SeedOp.RETRIEVE_CDEV)
    cdev = VfioDevice.from_fd(cdev_fd, backend=be)
    r.opened.append(cdev)
    r.must_fail(f"retrieve iommufd (token {tokens.iommufd:#x})",
                lambda: session.retrieve(tokens.iommufd), why="Phase 1 cannot restore an iommufd",
                op=SeedOp.RETRIEVE_IOMMUFD)
    iommufd = r.must("open a new /dev/iommu", lambda: IOMMUFD.open(backend=be), lacking=_no_device("/dev/iommu"),
                     opens=True)
    r.must_fail("bind the retrieved cdev to a new iommufd", lambda: cdev.bind(iommufd),
                expected_errno=E.EPERM, why="the preserved device's DMA is owned by the old iommufd",
                op=SeedOp.BIND_NEW_IOMMUFD)
    r.must_fail("finish the session", session.finish, why="an iommufd session cannot finish in Phase 1",
                op=SeedOp.FINISH)


def run(device: str, *, session_name: str = SESSION_NAME, lu_abi: str | None = None,
        tokens: Tokens = Tokens(), backend: Backend | None = None,
        on_step: Callable[[Step], None] | None = None,
        on_plan: Callable[[int], None] | None = None) -> Report:
    """Run the stage of the seed selftest this boot is in. ``on_plan`` gets
    the number of steps once the stage is known (before any ``on_step``)."""
    be = get_backend(backend)
    r = _Runner(be, on_step, on_plan)
    keep = False
    try:
        luo = r.must("open /dev/liveupdate", lambda: LiveUpdate.open(backend=be),
                     lacking=_no_device("/dev/liveupdate (LUO disabled: CONFIG_LIVEUPDATE, liveupdate=on)"),
                     opens=True)
        try:
            session = luo.retrieve_session(session_name)
        except errors.NotFound:
            r.report.stage = 1
            r.set_plan(STAGE1_PLAN)
            r.record(f"retrieve session {session_name!r}", StepStatus.PASS, StepReason.SUCCEEDED,
                     "ENOENT before a live update",
                     "no incoming session: stage 1")
            _stage1(r, luo, device, session_name, tokens, lu_abi)
            keep = r.report.result == "pass"
        except (errors.PyiommufdError, OSError) as exc:
            r.record(f"retrieve session {session_name!r}", StepStatus.FAIL, StepReason.REFUSED,
                     "a session or ENOENT", str(exc), getattr(exc, "errno", None))
        else:
            r.report.stage = 2
            r.set_plan(STAGE2_PLAN)
            r.opened.append(session)
            r.record(f"retrieve session {session_name!r}", StepStatus.PASS, StepReason.SUCCEEDED,
                     "a session after kexec",
                     f"fd {session.fileno()}: stage 2")
            _stage2(r, session, tokens)
    except _Stop:
        pass
    finally:
        r.finish()
        if not keep:
            r.report.handles = None
            for obj in reversed(r.opened):
                try:
                    obj.close()
                except (errors.PyiommufdError, OSError):
                    pass
    return r.report
