"""``pyiommufd selftest``: the series' ``iommufd_liveupdate`` test, stage 1 or 2.

KTAP on stdout: the version and plan lines once the stage is known, one result
line per step as it completes, comments (``#``) for everything else, and
kselftest's ``# Totals:`` line last. Exit code: 0 pass, 1 fail, 4 the kernel
lacks what the series adds, 2 bad device, 5 ``/dev/liveupdate`` held
elsewhere, 6 not permitted.

After a passing stage 1 the preserved files must stay open until the kexec
(closing the session unpreserves them, the C test's step 20):

* ``--hold`` (default) hands them to ``pyiommufd agent`` and returns, like the
  C test's ``daemonize_and_wait()``; the operator then kexecs;
* ``--kexec KERNEL`` loads KERNEL with kexec_file_load and reboots into it
  from this very process, which still holds every fd.

``--report FILE`` writes the ``--json`` document to FILE, durably, before a
kexec or the exit: a report on stdout may die in a pipe with the reboot.
"""
from __future__ import annotations

import errno as E
import os
import re
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

import click

from .. import exitcodes
from .abi_option import lu_abi_option, resolve_lu_abi
from .output import (CommandError, echo_json, error_object, exit_with, json_document, json_option,
                     report_error, write_durably)

if TYPE_CHECKING:
    from ..backend import Backend
    from ..selftest import Report, Step

DEFAULT_SESSION = "iommufd-test"


def resolve_device(device: str, backend: Backend) -> str:
    """The VFIO cdev path for DEVICE (a cdev path, ``vfioN`` or a BDF), resolved
    as :meth:`pyiommufd.vfio.VfioDevice.open` does. Raises exit code 2 for
    anything that does not name an existing cdev."""
    from .. import errors, vfio

    try:
        path, bdf = vfio.cdev_path(device, backend)
    except errors.KernelError as exc:   # no such PCI device, or not on vfio-pci
        raise CommandError(exc.detail or str(exc)) from None
    if bdf is not None:
        return path
    if re.fullmatch(r"/dev/vfio/(\d+|noiommu-\d+|vfio)", os.path.normpath(path)):
        raise errors.UsageError(f"{path} is a legacy VFIO group/container node; the series preserves "
                                f"device cdevs ({vfio.CDEV_DIR}/vfioN) only")
    if not backend.files.exists(path):
        raise CommandError(f"no such device node {path} (is the device bound to vfio-pci? "
                           "`pyiommufd devices` shows the cdevs)")
    real = backend.files.realpath(path)
    if not re.fullmatch(rf"{vfio.CDEV_DIR}/vfio\d+", real):
        raise CommandError(f"{path} is not a VFIO device cdev ({vfio.CDEV_DIR}/vfioN)")
    return path


def _validate(session_name: str, lu_abi: str | None) -> str | None:
    from .. import luo

    luo.check_session_name(session_name)  # UsageError -> 2
    return resolve_lu_abi(lu_abi)  # a bad --lu-abi or $PYIOMMUFD_LU_* -> 2, before the run


def _first_failure(report: Report) -> Step | None:
    from ..selftest import StepStatus

    return next((s for s in report.steps if s.status is StepStatus.FAIL), None)


def _failure_exit(report: Report) -> tuple[int, str]:
    """Exit code and message for a report that did not pass."""
    if report.result == "unsupported":
        return exitcodes.UNSUPPORTED, report.lacking or "the kernel lacks a capability the test needs"
    step = _first_failure(report)
    if step is None:
        return exitcodes.CHECK_FAILED, f"selftest stage {report.stage} failed"
    from ..selftest import StepReason

    where = f"step {step.index} ({step.name})"
    # a device node that would not open says something about this host, not the kernel's rules
    if step.reason is StepReason.CANNOT_OPEN and step.errno == E.EBUSY:
        return exitcodes.BUSY, step.detail
    if step.reason is StepReason.CANNOT_OPEN and step.errno in (E.EACCES, E.EPERM):
        return exitcodes.NOT_PERMITTED, f"{where}: {step.detail}"
    return exitcodes.CHECK_FAILED, f"selftest stage {report.stage or '?'} failed at {where}: {step.detail}"


class _TotalsOnce:
    """Prints the closing ``# Totals:`` line once: before a kexec, else last."""

    def __init__(self, report: Report, as_json: bool) -> None:
        self.report, self.done = report, as_json

    def __call__(self) -> None:
        if not self.done:
            from .. import selftest as lib

            self.done = True
            click.echo(lib.totals_line(self.report))
            sys.stdout.flush()


class _ReportSink:
    """Where the stage's JSON document goes: stdout with ``--json``, and
    ``--report FILE`` (written durably, so it outlives the kexec that follows)."""

    def __init__(self, as_json: bool, path: str | None) -> None:
        self.as_json, self.path = as_json, path

    @staticmethod
    def check_path(path: str) -> None:
        """Refuse an unwritable ``--report`` before anything is preserved."""
        directory = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise CommandError(f"--report {path}: is a directory")
        if not os.path.isdir(directory):
            raise CommandError(f"--report {path}: no such directory {directory}")
        if not os.access(directory, os.W_OK):
            raise CommandError(f"--report {path}: directory {directory} is not writable",
                               exitcodes.NOT_PERMITTED)

    def __call__(self, document: dict[str, Any]) -> None:
        if self.path is not None:
            try:
                write_durably(self.path, json_document(document) + "\n")
            except OSError as exc:
                raise CommandError(f"--report {self.path}: {exc.strerror}",
                                   exitcodes.for_errno(exc.errno)) from None
        if self.as_json:
            echo_json(document)


@click.command("selftest")
@click.argument("device", metavar="CDEV|BDF")
@click.option("--session", "session_name", default=DEFAULT_SESSION, show_default=True,
              help="LUO session name (1 to 63 bytes).")
@lu_abi_option()
@click.option("--kexec", "kexec_kernel", default=None, metavar="KERNEL",
              help="After a passing stage 1, kexec into KERNEL from this process.")
@click.option("--initrd", default=None, metavar="FILE", help="initrd for --kexec.")
@click.option("--cmdline", default=None, metavar="TEXT",
              help="Command line for --kexec (default: the running kernel's).")
@click.option("--report", "report_file", default=None, metavar="FILE",
              help="Also write the JSON report to FILE, synced to disk before any kexec.")
@click.option("--hold/--no-hold", default=True,
              help="After a passing stage 1, hand the fds to `pyiommufd agent` (default), or close "
                   "them (which unpreserves everything).")
@json_option
@click.pass_context
def selftest(ctx: click.Context, device: str, session_name: str, lu_abi: str | None,
             kexec_kernel: str | None, initrd: str | None, cmdline: str | None,
             report_file: str | None, hold: bool, as_json: bool) -> None:
    """Run the series' iommufd_liveupdate selftest on the VFIO cdev CDEV (or the
    device BDF); the stage (1 before kexec, 2 after) is detected by retrieving
    the session."""
    from .. import kexec
    from ..backend import get_backend
    from ..errors import UsageError

    hold_given = ctx.get_parameter_source("hold") == click.core.ParameterSource.COMMANDLINE
    if kexec_kernel is not None and hold_given and hold:
        raise UsageError("--kexec and --hold exclude each other: --kexec keeps the fds in this "
                         "process until the reboot")
    if kexec_kernel is None and (initrd is not None or cmdline is not None):
        raise UsageError("--initrd and --cmdline go with --kexec KERNEL")
    lu_abi = _validate(session_name, lu_abi)
    if report_file is not None:
        _ReportSink.check_path(report_file)
    be = get_backend()
    for what, path in (("--kexec", kexec_kernel), ("--initrd", initrd)):
        if path is not None:
            kexec.check_image(path, what, be)
    cdev = resolve_device(device, be)

    from .. import selftest as lib

    def on_plan(count: int) -> None:
        if not as_json:
            click.echo("KTAP version 1")
            click.echo(f"1..{count}")
            click.echo(f"# pyiommufd selftest: device {cdev}, session {session_name!r}")

    def on_step(step: Step) -> None:
        if not as_json:
            click.echo(lib.format_step_ktap(step))

    report = lib.run(cdev, session_name=session_name, lu_abi=lu_abi, backend=be,
                     on_step=on_step, on_plan=on_plan)
    totals = _TotalsOnce(report, as_json)
    try:
        _finish(report, cdev, session_name, kexec_kernel, initrd, cmdline, hold, as_json,
                _ReportSink(as_json, report_file), be, lib, totals)
    except (Exception, KeyboardInterrupt, SystemExit):
        # a failed hand-over or kexec, or a failed run: closing unpreserves (as it must then)
        report.close()
        raise
    finally:
        totals()
    # passed; after a hand-over the agent holds its own copies of every fd
    report.close()


def _finish(report: Report, cdev: str, session_name: str, kexec_kernel: str | None,
            initrd: str | None, cmdline: str | None, hold: bool, as_json: bool, emit: _ReportSink,
            be: Backend, lib: ModuleType, totals: _TotalsOnce) -> None:
    extra: dict[str, Any] = {"device": cdev, "session": session_name}
    if not as_json:
        click.echo(lib.summary_line(report))
    if report.result != "pass":
        code, message = _failure_exit(report)
        first = _first_failure(report)
        errno = first.errno if first is not None else None
        emit(dict(report.as_dict(), **extra, after=None, error=error_object(code, message, errno)))
        if not as_json:
            totals()
        exit_with(report_error(message, code))
    if report.stage != 1:
        emit(dict(report.as_dict(), **extra, after=None))
        if not as_json:
            click.echo(f"# result: PASS (stage {report.stage})")
            totals()
        return
    if kexec_kernel is not None:
        _kexec(report, kexec_kernel, initrd, cmdline, as_json, emit, extra, be, totals)
        return  # not reached: _kexec reboots or raises
    if not hold:
        emit(dict(report.as_dict(), **extra, after="closed"))
        if not as_json:
            click.echo("# result: PASS (stage 1); --no-hold: closing the session unpreserves everything")
            totals()
        return
    from .. import agent

    h = report.handles
    assert h is not None, "a passing stage 1 keeps its handles"
    try:
        client = agent.hand_over(h.liveupdate, h.session, h.files)
    except agent.AgentError as exc:  # exit 7 (or the agent error's own code)
        raise CommandError(f"stage 1 passed, but the agent did not take the files ({exc}); closing "
                           "the session unpreserves everything: run again, or use --kexec",
                           getattr(exc, "exit_code", exitcodes.AGENT_UNREACHABLE)) from None
    try:
        pid = client.ping().get("pid")
    except agent.AgentError:
        pid = None
    where = f" (pid {pid}, socket {client.socket_path})" if pid else f" (socket {client.socket_path})"
    emit(dict(report.as_dict(), **extra, after="held", agent_pid=pid))
    if not as_json:
        click.echo(f"# result: PASS (stage 1): session {session_name!r} with "
                   f"{len(h.files)} files is held by the pyiommufd agent{where}")
        click.echo("# [STAGE 1] You may now perform the kexec (then bind the device to vfio-pci "
                   "and run this again for stage 2).")
        totals()


def _kexec(report: Report, kernel: str, initrd: str | None, cmdline: str | None, as_json: bool,
           emit: _ReportSink, extra: dict[str, Any], be: Backend, totals: _TotalsOnce) -> None:
    emit(dict(report.as_dict(), **extra, after="kexec", kexec={
        "kernel": kernel, "initrd": initrd, "cmdline": cmdline}))
    from .. import kexec

    # The reboot ends this process at once: what it printed must leave its buffers first.
    _flush_std()
    used = kexec.load(kernel, initrd, cmdline, backend=be)
    if not as_json:
        click.echo(f"# result: PASS (stage 1); kexec into {kernel}"
                   + (f" with initrd {initrd}" if initrd else "") + f", cmdline {used!r}")
        click.echo(f"# session {extra['session']!r} stays preserved across the reboot; "
                   "run this again afterwards for stage 2")
    totals()
    _flush_std()
    kexec.execute(backend=be)  # returns only by raising


def _flush_std() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
