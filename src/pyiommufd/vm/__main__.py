"""``python -m pyiommufd.vm``: run a command in the VM, build the kernel, or
self-test the VM tier (until the ``pyiommufd vm`` CLI group exists).

    python -m pyiommufd.vm run [--kernel PATH] [--timeout S] [--kexec-stages N] -- CMD...
    python -m pyiommufd.vm build-kernel [--force] [-j N]
    python -m pyiommufd.vm selftest [--kernel PATH] [--timeout S]
"""
from __future__ import annotations

import argparse
import sys

from . import kernel as _kernel
from . import runner


def _print_result(res: runner.VmResult) -> None:
    print(res.summary())
    if not res.ok:
        for s in res.stages:
            if not s.ok and s.output():
                tail = "\n".join(s.output().splitlines()[-30:])
                print(f"--- stage {s.number} output (tail) ---\n{tail}")
        print(f"--- serial log (tail): {res.serial_log} ---\n{res.serial_tail(30)}")


def selftest(*, kernel: str | None = None, timeout: float = 300.0,
             progress: runner.Progress = print) -> runner.VmResult:
    """Boot, check the guest basics, kexec, check again: the VM tier works."""
    check = ("import os,sys; r=os.uname().release; "
             "need=['/dev/iommu','/dev/liveupdate']; miss=[p for p in need if not os.path.exists(p)]; "
             "print('guest', r, 'missing:', miss); sys.exit(1 if miss else 0)")
    return runner.run_command([sys.executable, "-c", check], kernel=kernel, timeout=timeout,
                              kexec_stages=1, progress=progress)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyiommufd.vm")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run CMD in the VM")
    r.add_argument("--kernel")
    r.add_argument("--timeout", type=float, default=runner.DEFAULT_TIMEOUT)
    r.add_argument("--kexec-stages", type=int, default=None,
                   help="run CMD again N times, each after a kexec")
    r.add_argument("command", nargs=argparse.REMAINDER)
    b = sub.add_parser("build-kernel", help="build (or show) the cached VM kernel")
    b.add_argument("--force", action="store_true")
    b.add_argument("-j", "--jobs", type=int)
    s = sub.add_parser("selftest", help="boot, kexec, boot: check the VM tier works")
    s.add_argument("--kernel")
    s.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build-kernel":
            img = _kernel.build_kernel(force=args.force, jobs=args.jobs)
            print(img.describe())
            return 0
        if args.cmd == "selftest":
            res = selftest(kernel=args.kernel, timeout=args.timeout)
        else:
            cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not cmd:
                ap.error("run: no command given (use: run -- CMD...)")
            res = runner.run_command(cmd, kernel=args.kernel, timeout=args.timeout,
                                     kexec_stages=args.kexec_stages)
    except (runner.VmError, _kernel.KernelBuildError) as exc:
        print(f"pyiommufd vm: {exc}", file=sys.stderr)
        return 2
    _print_result(res)
    return res.exit_code


if __name__ == "__main__":
    sys.exit(main())
