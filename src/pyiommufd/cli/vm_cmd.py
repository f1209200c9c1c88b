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
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import click

from .. import exitcodes
from .abi_option import SPELLED, lu_abi_option, option_lu_abi
from .output import CommandError, echo_json, error_object, exit_with, json_option, report_error

if TYPE_CHECKING:   # the VM modules are imported only when a command runs
    from ..backend import Backend
    from ..vm.kernel import KernelBuildError, KernelRecipe
    from ..vm.runner import VmResult

T = TypeVar("T")

TIMEOUT_EXIT = exitcodes.VM_TIMEOUT
DEFAULT_TIMEOUT = 600.0
DEFAULT_SELFTEST_TIMEOUT = 1800.0
#: virtio-net (modern, disable-legacy=on): the device the runner puts behind the vIOMMU
VIRTIO_VENDOR = 0x1AF4
VIRTIO_NET_IDS = (0x1041, 0x1000)


def _progress(message: str) -> None:
    click.echo(message, err=True)


def _runner(machine: str) -> ModuleType:
    """The runner module; exit 4 if QEMU is needed and missing."""
    from ..vm import runner

    if machine == "qemu":
        try:
            runner.find_qemu()
        except runner.VmError as exc:
            raise CommandError(str(exc), exitcodes.UNSUPPORTED) from None
    return runner


def _run_vm(fn: Callable[[], T]) -> T:
    """Call ``fn()`` (a runner call), mapping VmError to one error line."""
    from ..vm import runner

    try:
        return fn()
    except runner.VmError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log = f" (log: {exc.log})" if getattr(exc, "log", None) else ""
        raise CommandError(f"the VM could not start: {reason}{log}", exitcodes.KERNEL_ERROR) from None


def _exit_for(res: VmResult) -> int:
    if res.timed_out:
        return TIMEOUT_EXIT
    return res.exit_code


def _pyiommufd_argv() -> list[str]:
    """How the guest runs ``pyiommufd`` (the host's python and checkout are
    visible at the same paths in the guest)."""
    from ..vm import runner

    return [runner.python_executable(), "-c", "from pyiommufd.cli import main; main()"]


@click.group("vm")
def vm() -> None:
    """Run commands or the seed flow in a QEMU guest on a real Linux 7.3 kernel."""


def _recipe(patches: tuple[str, ...], fragments: tuple[str, ...]) -> KernelRecipe:
    """The kernel recipe of ``--patch``/``--config`` (exit 2 for a missing file)."""
    from ..vm import kernel

    try:
        return kernel.KernelRecipe.of(patches, fragments)
    except kernel.KernelBuildError as exc:
        raise CommandError(str(exc)) from None


def _kernel_error(exc: KernelBuildError) -> CommandError:
    from ..vm import kernel

    if isinstance(exc, kernel.PatchError):
        return CommandError(str(exc), exitcodes.BAD_INPUT)
    first = str(exc).splitlines()[0] if str(exc) else "kernel build failed"
    log = f" (log: {exc.log})" if exc.log else ""
    return CommandError(f"{first}{log}", exitcodes.KERNEL_ERROR)


_PATCH_HELP = ("A patch to apply (-p1, no fuzz) to the pristine 7.3 tree; repeat for a series, "
               "in order.")
_CONFIG_HELP = "A config fragment (CONFIG_X=y lines) on top of the VM tier's; repeatable."


@vm.command("build-kernel")
@click.option("--patch", "patches", multiple=True, metavar="FILE", help=_PATCH_HELP)
@click.option("--config", "fragments", multiple=True, metavar="FRAGMENT", help=_CONFIG_HELP)
@click.option("--force", is_flag=True, help="Rebuild even if the cache has the kernel.")
@click.option("--jobs", "-j", type=int, default=None, help="make -j (default: all CPUs).")
@json_option
def build_kernel(patches: tuple[str, ...], fragments: tuple[str, ...], force: bool,
                 jobs: int | None, as_json: bool) -> None:
    """Build (or find in the cache) a guest kernel and print its bzImage path:
    Debian's 7.3.4 with the VM tier's config, plus --patch files applied in
    order (a hunk that needs fuzz is refused) and --config fragments. A tree
    that has CONFIG_IOMMU_LIVEUPDATE gets it. Cached by base version, config
    and patch hashes."""
    from ..vm import kernel

    if jobs is not None and jobs < 1:
        raise CommandError(f"--jobs must be at least 1, not {jobs}")
    recipe = _recipe(patches, fragments)
    try:
        image = kernel.build_kernel(force=force, jobs=jobs, progress=_progress, recipe=recipe)
    except kernel.KernelBuildError as exc:
        raise _kernel_error(exc) from None
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


def _print_stage_output(res: VmResult) -> None:
    for stage in res.stages:
        out = stage.output()
        if len(res.stages) > 1:
            click.echo(f"--- guest {stage.describe()} ---")
        if out:
            click.echo(out, nl=not out.endswith("\n"))


def _result_json(res: VmResult, code: int, message: str | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"exit_code": code, "timed_out": res.timed_out, "kernel_release": res.kernel_release,
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
def run(kernel: str | None, timeout: float, memory: str, cpus: int, append: tuple[str, ...],
        dry_run: bool, machine: str, as_json: bool, command: tuple[str, ...]) -> None:
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
              "(default: the cached build of --patch/--config, or of the pristine tree).")
@click.option("--patch", "patches", multiple=True, metavar="FILE", help=_PATCH_HELP)
@click.option("--config", "fragments", multiple=True, metavar="FRAGMENT", help=_CONFIG_HELP)
@click.option("--program", type=click.Choice(["pyiommufd", "c"]), default="pyiommufd",
              show_default=True, help="Which selftest runs: ours, or patch 14's C test built "
              "from the patched tree.")
@click.option("--c-selftest", default=None, metavar="PATH",
              help="With --program c and --kernel: the C selftest binary to run.")
@lu_abi_option(help=f"For the guest's selftest: {SPELLED} (default: probe).")
@click.option("--lu-nr", default=None, metavar="NR",
              help="The LU ioctl's nr in that kernel (e.g. 0x96), as $PYIOMMUFD_LU_NR in the guest.")
@click.option("--session", "session_name", default="iommufd-test", show_default=True)
@click.option("--timeout", type=float, default=DEFAULT_SELFTEST_TIMEOUT, show_default=True,
              help="Hard limit in seconds for the whole run (two boots under TCG).")
@click.option("--machine", type=click.Choice(["qemu", "local"]), default="qemu", hidden=True)
@json_option
def selftest(kernel: str | None, patches: tuple[str, ...], fragments: tuple[str, ...],
             program: str, c_selftest: str | None, lu_abi: str | None, lu_nr: str | None,
             session_name: str, timeout: float, machine: str, as_json: bool) -> None:
    """Boot the VM and run the series' selftest in the cover letter's order:
    bind the virtio-net device to vfio-pci, stage 1, kexec into the same
    kernel, try a non-VFIO driver (must be refused while the device is
    preserved), bind vfio-pci again, stage 2."""
    from .. import abi, luo
    from ..vm import kernel as vmkernel, seedflow

    _check_timeout(timeout)
    _check_kernel(kernel)
    if kernel is not None and (patches or fragments):
        raise CommandError("--kernel boots a bzImage as it is: --patch and --config build one")
    if c_selftest is not None and not os.path.isfile(c_selftest):
        raise CommandError(f"--c-selftest {c_selftest}: no such file")
    luo.check_session_name(session_name)
    lu_abi = option_lu_abi(lu_abi)
    env: dict[str, str] = {}
    if lu_nr is not None:
        env[abi.ENV_NR] = f"{abi.parse_nr(lu_nr):#x}"
    recipe = _recipe(patches, fragments)
    _runner(machine)   # exit 4 when QEMU is missing
    try:
        result, res = _run_vm(lambda: seedflow.run(
            program, kernel=kernel, recipe=recipe, c_selftest=c_selftest, timeout=timeout,
            progress=_progress, session=session_name, lu_abi=lu_abi, env=env, machine=machine))
    except vmkernel.KernelBuildError as exc:
        raise _kernel_error(exc) from None
    if not as_json:
        _print_stage_output(res)
        click.echo(f"# vm selftest ({result.kernel}): {result.describe()}")
    code = _exit_for(res)
    if code == 0:
        if as_json:
            echo_json(dict(_result_json(res, 0, None), seed_flow=result.as_dict()))
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
        outcome = result.stage(failed.number)
        why = f"guest stage {failed.number}: " + (
            detail or (outcome.describe() if outcome else f"exit status {failed.exit}"))
    else:
        why = f"guest {failed.describe()} (serial log: {res.serial_log})"
    if as_json:
        echo_json(dict(_result_json(res, code, why), seed_flow=result.as_dict()))
    exit_with(report_error(why, code))


def find_test_device(backend: Backend | None = None) -> str:
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
@click.option("--program", type=click.Choice(["pyiommufd", "c"]), default="pyiommufd")
@click.option("--lu-abi", default=None)
@click.option("--device", default=None, help="BDF (default: the virtio-net device).")
def guest_selftest(stage: int, session_name: str, program: str, lu_abi: str | None,
                   device: str | None) -> None:
    """(in the guest) one stage of the seed flow (pyiommufd.vm.seedflow)."""
    from .. import pci
    from ..backend import get_backend
    from ..vm import guest, seedflow

    if not guest.in_guest() or guest.simulated():
        raise CommandError("guest-selftest runs only inside the QEMU guest of `pyiommufd vm selftest` "
                           "(it rebinds a PCI device and kexecs)")
    be = get_backend()
    bdf = pci.normalize_bdf(device) if device else find_test_device(be)
    kernel = os.environ.get(guest.ENV_KERNEL)
    if stage == 1 and program == "pyiommufd" and not kernel:
        raise CommandError(f"${guest.ENV_KERNEL} is not set: guest-selftest runs inside "
                           "`pyiommufd vm selftest` only")
    code = seedflow.guest_stage(stage, program, bdf, session=session_name, lu_abi=lu_abi,
                                argv0=_pyiommufd_argv(), kexec_kernel=kernel,
                                initrd=os.environ.get(guest.ENV_INITRD),
                                c_selftest=os.environ.get(seedflow.ENV_C_SELFTEST),
                                say=click.echo)
    exit_with(code)


DEFAULT_BENCH_TIMEOUT = 1800.0


def bench_script() -> Path:
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
@json_option
def bench(kernel: str | None, quick: bool, timeout: float, as_json: bool) -> None:
    """pyiommufd against C on the real kernel: every case of benchmarks/bench.py
    in one boot and one kexec, then the table of Python/C ratios and a summary
    line (`bench: N cases, goals met X/Y`). Start-up cases also run on the host."""
    import subprocess
    import tempfile

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
    report = subprocess.run([py, str(script), "report", str(host), str(results)]
                            + (["--json"] if as_json else []), capture_output=True, text=True)
    bad = failed is not None or res.timed_out
    if not (as_json and bad):
        click.echo(report.stdout, nl=False)
    if report.returncode != 0:
        click.echo(report.stderr, err=True, nl=False)
    if not as_json:
        click.echo(f"# results: {results} and {host}; kernel {res.kernel_release or '?'}")
    if bad:
        # bad: failed is None only when the VM timed out
        why = (f"the VM timed out after {timeout:.0f}s" if res.timed_out or failed is None
               else f"guest {failed.describe()}") + f" (serial log: {res.serial_log})"
        code = _exit_for(res) or 1
        if as_json:
            echo_json({"error": error_object(code, why)})
        exit_with(report_error(why, code))
    exit_with(0)


@vm.command("live-update-demo")
@click.option("--kernel", default=None, metavar="PATH",
              help="bzImage of the test VM, the host that kexecs (default: the cached stock build).")
@click.option("--patch", "patches", multiple=True, metavar="FILE", help=_PATCH_HELP)
@click.option("--config", "fragments", multiple=True, metavar="FRAGMENT", help=_CONFIG_HELP)
@click.option("--timeout", type=float, default=1200.0, show_default=True,
              help="Hard limit in seconds for the whole run (two boots and a nested guest under TCG).")
@json_option
def live_update_demo(kernel: str | None, patches: tuple[str, ...], fragments: tuple[str, ...],
                     timeout: float, as_json: bool) -> None:
    """A nested Linux guest survives a real kexec of its host: in the test VM,
    `pyiommufd qemu launch`, `update`, the kexec, `resume`. Prints the nested
    guest's counter before and after, and the blackout budget."""
    from ..vm import kernel as vmkernel, vmm_demo

    _check_timeout(timeout)
    _check_kernel(kernel)
    _runner("qemu")
    recipe = _recipe(patches, fragments)
    if kernel is None:
        try:
            kernel = str(vmkernel.resolve_kernel(None, progress=_progress, recipe=recipe).bzimage)
        except vmkernel.KernelBuildError as exc:
            raise _kernel_error(exc) from None
    result = _run_vm(lambda: vmm_demo.run_demo(kernel, progress=_progress, timeout=timeout))
    if as_json:
        echo_json({"ok": result.ok, "problems": result.problems, "tick_before": result.tick_before,
                   "tick_after": result.tick_after, "boots": len(result.boots), "kexecs": result.kexecs,
                   "kernel_release": result.kernel_release, "blackout": result.blackout})
    else:
        click.echo(result.report())
    if not result.ok:
        exit_with(report_error(result.problems[0], exitcodes.CHECK_FAILED, as_json=as_json) if not as_json
                  else exitcodes.CHECK_FAILED)
    exit_with(0)
