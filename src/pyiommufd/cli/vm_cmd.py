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

import os
import sys

import click

from . import exitcodes
from .output import CommandError, exit_with

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
def build_kernel(force, jobs):
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
    click.echo(str(image.bzimage))


def _check_timeout(timeout: float) -> float:
    if not timeout > 0:
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


@vm.command("run", context_settings={"ignore_unknown_options": True})
@click.option("--kernel", default=None, metavar="PATH", help="bzImage to boot (default: the cached build).")
@click.option("--timeout", type=float, default=DEFAULT_TIMEOUT, show_default=True,
              help="Hard limit in seconds; the VM is killed after it.")
@click.option("--machine", type=click.Choice(["qemu", "local"]), default="qemu", hidden=True,
              help="local: run the guest agent as host processes (tests of the plumbing).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(kernel, timeout, machine, command):
    """Run COMMAND in the guest (put it after --) and exit with its status."""
    _check_timeout(timeout)
    _check_kernel(kernel)
    runner = _runner(machine)
    res = _run_vm(lambda: runner.run_command(list(command), kernel=kernel, timeout=timeout,
                                             progress=_progress, machine=machine))
    _print_stage_output(res)
    code = _exit_for(res)
    if code != 0:
        stage = res.stages[0] if res.stages else None
        if res.timed_out:
            why = f"the VM timed out after {timeout:.0f}s (serial log: {res.serial_log})"
        elif stage is not None and stage.ended_by == "exit":
            why = f"`{' '.join(command)}` exited with status {stage.exit} in the guest"
        else:
            why = f"{res.error or (stage.describe() if stage else 'no result')} (serial log: {res.serial_log})"
        click.echo(f"pyiommufd: error: {why}", err=True)
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
def selftest(kernel, lu_abi, session_name, timeout, machine):
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
    _print_stage_output(res)
    code = _exit_for(res)
    if code == 0:
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
    click.echo(f"pyiommufd: error: {why}", err=True)
    exit_with(code)


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


DEFAULT_BENCH_TIMEOUT = 1800.0


def bench_script():
    """benchmarks/bench.py of this checkout (the suite is not installed)."""
    from ..vm import runner

    path = runner.checkout_src().parent / "benchmarks" / "bench.py"
    if not path.is_file():
        raise CommandError(f"no {path}: `vm bench` runs from a pyiommufd checkout", exitcodes.BAD_INPUT)
    return path


@vm.command("bench")
@click.option("--kernel", default=None, metavar="PATH", help="bzImage to boot and kexec into "
              "(default: the cached build).")
@click.option("--quick", is_flag=True, help="Fewer repetitions (a smoke run).")
@click.option("--timeout", type=float, default=DEFAULT_BENCH_TIMEOUT, show_default=True,
              help="Hard limit in seconds for the whole run (two boots under TCG).")
def bench(kernel, quick, timeout):
    """pyiommufd against C on the real kernel: every case of benchmarks/bench.py
    in one boot and one kexec, then the table of Python/C ratios and a summary
    line (`bench: N cases, goals met X/Y`). Start-up cases also run on the host."""
    import subprocess
    import tempfile
    from pathlib import Path

    from ..vm import debian

    _check_timeout(timeout)
    _check_kernel(kernel)
    runner = _runner("qemu")
    script = bench_script()
    # the C twin is built here, where the guest can read it (the host root is its root)
    out_dir = debian.cache_root() / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    c_binary = out_dir / "bench_c"
    py = runner.python_executable()
    _progress(f"[bench] compiling {script.parent / 'c' / 'bench.c'}")
    subprocess.run([py, str(script), "compile", "--dest", str(c_binary)], check=True)
    host = Path(tempfile.mkdtemp(prefix="pyiommufd-bench-"))
    _progress("[bench] start-up cases on the host")
    subprocess.run([py, str(script), "startup", "--out", str(host), "--suffix", "@host",
                    "--c-binary", str(c_binary)], check=True)
    stage1 = [py, str(script), "stage1", "--c-binary", str(c_binary)] + (["--quick"] if quick else [])
    stage2 = [py, str(script), "stage2", "--c-binary", str(c_binary)]
    job = runner.Job([runner.Stage(stage1, cwd="/", kexec="self"),
                      runner.Stage(stage2, cwd="/", needs_kexec=True)])
    res = _run_vm(lambda: runner.run(job, kernel=kernel, timeout=timeout, progress=_progress))
    results = res.run_dir / "share" / "bench"
    failed = next((s for s in res.stages if not s.ok), None)
    if failed is not None or res.timed_out:
        _print_stage_output(res)
    report = subprocess.run([py, str(script), "report", str(host), str(results)],
                            capture_output=True, text=True)
    click.echo(report.stdout, nl=False)
    if report.returncode != 0:
        click.echo(report.stderr, err=True, nl=False)
    click.echo(f"# results: {results} and {host}; kernel {res.kernel_release or '?'}")
    if failed is not None or res.timed_out:
        why = (f"the VM timed out after {timeout:.0f}s" if res.timed_out
               else f"guest {failed.describe()}")
        click.echo(f"pyiommufd: error: {why} (serial log: {res.serial_log})", err=True)
        exit_with(_exit_for(res) or 1)
    exit_with(0)
