"""``pyiommufd vm``: a QEMU guest on the VM-tier Linux 7.3 kernel.

* ``vm build-kernel`` builds (or finds in the cache) the guest kernel;
* ``vm run -- CMD...`` runs CMD in a fresh guest and exits with its status;
* ``vm selftest`` is the seed flow end to end: in the guest it binds the
  virtio-net device (behind the emulated VT-d) to vfio-pci, runs
  ``pyiommufd selftest <device> --kexec <VM kernel> --initrd <VM initrd>``
  (stage 1, which kexecs from its own process while holding every fd), and
  after the kexec binds the device again and runs ``pyiommufd selftest
  <device>`` (stage 2). On stock 7.3 stage 1 ends "kernel lacks an iommufd
  live-update handler" and the command exits 4.

Exit codes: the guest command's (``vm run``), the failing guest stage's
(``vm selftest``), 4 when QEMU is missing, 3 when the VM cannot start
otherwise, 124 when the VM timed out. ``pyiommufd.vm.runner`` is imported only
when a command runs.
"""
from __future__ import annotations

import math
import os
import re
import shlex
import sys

import click

from . import exitcodes
from .output import CommandError, echo_json, error_object, exit_with, json_option, report_error

TIMEOUT_EXIT = exitcodes.VM_TIMEOUT
DEFAULT_TIMEOUT = 600.0
DEFAULT_SELFTEST_TIMEOUT = 1800.0
#: virtio-net (modern, disable-legacy=on): the device the runner puts behind the vIOMMU
VIRTIO_VENDOR = 0x1AF4
VIRTIO_NET_IDS = (0x1041, 0x1000)


def _progress(message: str) -> None:
    click.echo(message, err=True)


def _runner(machine: str):
    """The runner module; exit 4 if QEMU is needed and missing."""
    from ..vm import runner

    if machine == "qemu":
        try:
            runner.find_qemu()
        except runner.VmError as exc:
            raise CommandError(str(exc), exitcodes.UNSUPPORTED) from None
    return runner


def _run_vm(fn):
    """Call ``fn()`` (a runner call), mapping VmError to one error line."""
    from ..vm import runner

    try:
        return fn()
    except runner.VmError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log = f" (log: {exc.log})" if getattr(exc, "log", None) else ""
        raise CommandError(f"the VM could not start: {reason}{log}", exitcodes.KERNEL_ERROR) from None


def _exit_for(res) -> int:
    if res.timed_out:
        return TIMEOUT_EXIT
    return res.exit_code


def _pyiommufd_argv() -> list[str]:
    """How the guest runs ``pyiommufd`` (the host's python and checkout are
    visible at the same paths in the guest)."""
    from ..vm import runner

    return [runner.python_executable(), "-c", "from pyiommufd.cli import main; main()"]


@click.group("vm")
def vm():
    """Run commands or the seed flow in a QEMU guest on a real Linux 7.3 kernel."""


@vm.command("build-kernel")
@click.option("--force", is_flag=True, help="Rebuild even if the cache has the kernel.")
@click.option("--jobs", "-j", type=int, default=None, help="make -j (default: all CPUs).")
@json_option
def build_kernel(force, jobs, as_json):
    """Build (or find in the cache) the guest kernel and print its bzImage path."""
    from ..vm import kernel

    if jobs is not None and jobs < 1:
        raise CommandError(f"--jobs must be at least 1, not {jobs}")
    try:
        image = kernel.build_kernel(force=force, jobs=jobs, progress=_progress)
    except kernel.KernelBuildError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "kernel build failed"
        log = f" (log: {exc.log})" if exc.log else ""
        raise CommandError(f"{first}{log}", exitcodes.KERNEL_ERROR) from None
    _progress(f"[kernel] {image.describe()}")
    if as_json:
        echo_json({"bzimage": str(image.bzimage), "description": image.describe()})
    else:
        click.echo(str(image.bzimage))


def _check_timeout(timeout: float) -> float:
    if not (timeout > 0 and math.isfinite(timeout)):
        raise CommandError(f"--timeout must be a positive number of seconds, not {timeout}")
    return timeout


def _check_kernel(kernel: str | None) -> None:
    if kernel is not None and not os.path.isfile(kernel):
        raise CommandError(f"--kernel {kernel}: no such file")


def _print_stage_output(res) -> None:
    for stage in res.stages:
        out = stage.output()
        if len(res.stages) > 1:
            click.echo(f"--- guest {stage.describe()} ---")
        if out:
            click.echo(out, nl=not out.endswith("\n"))


def _result_json(res, code: int, message: str | None) -> dict:
    doc = {"exit_code": code, "timed_out": res.timed_out, "kernel_release": res.kernel_release,
           "boots": res.boot_count, "serial_log": str(res.serial_log),
           "stages": [{"number": s.number, "ended_by": s.ended_by, "exit": s.exit, "output": s.output()}
                      for s in res.stages]}
    if message is not None:
        doc["error"] = error_object(code, message)
    return doc


_MEMORY = re.compile(r"\d+[MG]?")


def _dry_run(kernel: str | None, memory: str, cpus: int, append: tuple[str, ...], as_json: bool) -> None:
    """Print the QEMU command a run would use (its run directory is made when it runs)."""
    from ..vm import initramfs, kernel as vm_kernel, runner

    if kernel is not None:
        image = kernel
    else:
        cached = vm_kernel.cached_kernel()
        image = str(cached.bzimage) if cached else str(vm_kernel.kernel_dir() / "bzImage")
        if cached is None:
            _progress(f"[vm] no kernel built yet: a run first builds {image}")
    try:
        initrd = str(initramfs.build_initramfs())
    except (initramfs.InitramfsError, OSError) as exc:
        raise CommandError(f"initramfs: {exc}", exitcodes.KERNEL_ERROR) from None
    cmd = runner.qemu_command(image, initrd, "RUN_DIR/share", "RUN_DIR/serial.log", memory=memory, smp=cpus,
                              cmdline=runner.kernel_cmdline(append), pycache=runner.guest_pycache_dir())
    if as_json:
        echo_json({"qemu": cmd})
    else:
        click.echo(shlex.join(cmd))


@vm.command("run", context_settings={"ignore_unknown_options": True})
@click.option("--kernel", default=None, metavar="PATH", help="bzImage to boot (default: the cached build).")
@click.option("--timeout", type=float, default=DEFAULT_TIMEOUT, show_default=True,
              help="Hard limit in seconds; the VM is killed after it.")
@click.option("--memory", default="2G", show_default=True, metavar="SIZE",
              help="Guest RAM, as QEMU's -m takes it (e.g. 1024M, 4G).")
@click.option("--cpus", type=click.IntRange(1, 64), default=2, show_default=True, help="Guest CPUs (-smp).")
@click.option("--append", multiple=True, metavar="PARAM",
              help="Add PARAM to the guest kernel's command line. Repeatable.")
@click.option("--dry-run", is_flag=True, help="Print the QEMU command line and exit.")
@click.option("--machine", type=click.Choice(["qemu", "local"]), default="qemu", hidden=True,
              help="local: run the guest agent as host processes (tests of the plumbing).")
@json_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(kernel, timeout, memory, cpus, append, dry_run, machine, as_json, command):
    """Run COMMAND in the guest (put it after --) and exit with its status."""
    _check_timeout(timeout)
    _check_kernel(kernel)
    if not _MEMORY.fullmatch(memory):
        raise CommandError(f"--memory {memory!r}: give megabytes or a size like 1024M or 4G")
    if any(not a or any(c.isspace() for c in a) for a in append):
        raise CommandError("--append takes one kernel parameter without blanks each time "
                           "(repeat it for more)")
    runner = _runner(machine)
    if dry_run:
        _dry_run(kernel, memory, cpus, append, as_json)
        return
    res = _run_vm(lambda: runner.run_command(list(command), kernel=kernel, timeout=timeout,
                                             progress=_progress, machine=machine, memory=memory,
                                             smp=cpus, extra_cmdline=append))
    if not as_json:
        _print_stage_output(res)
    code = _exit_for(res)
    why = None
    if code != 0:
        stage = res.stages[0] if res.stages else None
        if res.timed_out:
            why = f"the VM timed out after {timeout:.0f}s (serial log: {res.serial_log})"
        elif stage is not None and stage.ended_by == "exit":
            why = f"`{' '.join(command)}` exited with status {stage.exit} in the guest"
        else:
            why = f"{res.error or (stage.describe() if stage else 'no result')} (serial log: {res.serial_log})"
    if as_json:
        echo_json(_result_json(res, code, why))
    if why is not None:
        report_error(why, code)
    exit_with(code)


def _last_error_line(text: str) -> str | None:
    lines = [ln for ln in text.splitlines() if ln.startswith("pyiommufd: error: ")]
    return lines[-1][len("pyiommufd: error: "):] if lines else None


@vm.command("selftest")
@click.option("--kernel", default=None, metavar="PATH", help="bzImage to boot and kexec into "
              "(default: the cached build).")
@click.option("--lu-abi", default=None, metavar="v1|v2|probe", help="Passed to the guest's selftest.")
@click.option("--session", "session_name", default="iommufd-test", show_default=True)
@click.option("--timeout", type=float, default=DEFAULT_SELFTEST_TIMEOUT, show_default=True,
              help="Hard limit in seconds for the whole run (two boots under TCG).")
@click.option("--machine", type=click.Choice(["qemu", "local"]), default="qemu", hidden=True)
@json_option
def selftest(kernel, lu_abi, session_name, timeout, machine, as_json):
    """Boot the VM, bind its virtio-net device to vfio-pci and run the series'
    selftest: stage 1, kexec into the same kernel, stage 2."""
    from .. import abi, luo

    _check_timeout(timeout)
    _check_kernel(kernel)
    luo.check_session_name(session_name)
    if lu_abi is not None and lu_abi.lower() != "probe":
        lu_abi = abi.lookup(lu_abi).name
    runner = _runner(machine)
    base = _pyiommufd_argv() + ["vm", "guest-selftest", "--session", session_name]
    if lu_abi:
        base += ["--lu-abi", lu_abi]
    job = runner.Job([
        runner.Stage(base + ["--stage", "1"], cwd="/", kexec="self"),
        runner.Stage(base + ["--stage", "2"], cwd="/", needs_kexec=True),
    ])
    res = _run_vm(lambda: runner.run(job, kernel=kernel, timeout=timeout, progress=_progress,
                                     machine=machine))
    if not as_json:
        _print_stage_output(res)
    code = _exit_for(res)
    if code == 0:
        if as_json:
            echo_json(_result_json(res, 0, None))
        else:
            click.echo(f"# vm selftest: PASS (stage 1 kexec'd, stage 2 passed on "
                       f"{res.kernel_release or 'the VM kernel'})")
        exit_with(0)
    failed = next((s for s in res.stages if not s.ok), None)
    detail = _last_error_line(failed.output()) if failed is not None else None
    if res.timed_out:
        why = f"the VM timed out after {timeout:.0f}s (serial log: {res.serial_log})"
    elif failed is None:
        why = res.error or "the VM run failed"
    elif failed.ended_by == "exit":
        why = f"guest stage {failed.number}: {detail or f'exit status {failed.exit}'}"
    else:
        why = f"guest {failed.describe()} (serial log: {res.serial_log})"
    if as_json:
        echo_json(_result_json(res, code, why))
    exit_with(report_error(why, code))


def find_test_device(backend=None) -> str:
    """The BDF of the guest's virtio-net device."""
    from .. import pci

    for info in pci.list_devices(backend):
        if info.vendor == VIRTIO_VENDOR and info.device in VIRTIO_NET_IDS:
            return info.bdf
    raise CommandError("no virtio-net PCI device in this machine (vendor 1af4, device 1041)",
                       exitcodes.BAD_INPUT)


@vm.command("guest-selftest", hidden=True)
@click.option("--stage", type=click.IntRange(1, 2), required=True)
@click.option("--session", "session_name", default="iommufd-test")
@click.option("--lu-abi", default=None)
@click.option("--device", default=None, help="BDF (default: the virtio-net device).")
def guest_selftest(stage, session_name, lu_abi, device):
    """(in the guest) bind the test device to vfio-pci, then exec `pyiommufd selftest`."""
    from .. import pci
    from ..backend import get_backend
    from ..vm import guest

    if not guest.in_guest() or guest.simulated():
        raise CommandError("guest-selftest runs only inside the QEMU guest of `pyiommufd vm selftest` "
                           "(it rebinds a PCI device and kexecs)")
    be = get_backend()
    bdf = pci.normalize_bdf(device) if device else find_test_device(be)
    dev = pci.PciDevice(bdf, be)
    click.echo(f"+ pyiommufd bind {bdf}   # was: {dev.driver or 'no driver'}")
    dev.bind_vfio()
    click.echo(f"  {bdf}: vfio-pci, cdev {dev.vfio_cdev}")
    args = ["selftest", bdf, "--session", session_name]
    if lu_abi:
        args += ["--lu-abi", lu_abi]
    if stage == 1:
        kernel = os.environ.get(guest.ENV_KERNEL)
        initrd = os.environ.get(guest.ENV_INITRD)
        if not kernel:
            raise CommandError(f"${guest.ENV_KERNEL} is not set: guest-selftest runs inside "
                               "`pyiommufd vm selftest` only")
        args += ["--kexec", kernel] + (["--initrd", initrd] if initrd else [])
    click.echo("+ pyiommufd " + " ".join(args))
    sys.stdout.flush()
    sys.stderr.flush()
    argv = _pyiommufd_argv()
    os.execv(argv[0], argv + args)
