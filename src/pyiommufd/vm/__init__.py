"""The real-kernel VM tier: guest kernel build, initramfs, QEMU runner and
in-guest agent (two-stage kexec jobs).

Public entry points (imported lazily, so ``import pyiommufd.vm`` is cheap)::

    run_command(argv, *, kernel=None, timeout=600, kexec_stages=None, progress=print) -> VmResult
    run(job, *, kernel=None, timeout=600, log=None, progress=print) -> VmResult
    build_kernel(*, jobs=None, progress=print, force=False) -> KernelImage
    kexec_same_kernel()      # inside the guest: kexec into the same kernel/initrd/cmdline
"""
from __future__ import annotations

from typing import Any

_LAZY = {
    "run": "runner", "run_command": "runner", "command_job": "runner", "Job": "runner",
    "Stage": "runner", "VmResult": "runner", "StageResult": "runner", "VmError": "runner",
    "DEFAULT_TIMEOUT": "runner",
    "build_kernel": "kernel", "resolve_kernel": "kernel", "KernelImage": "kernel",
    "KernelBuildError": "kernel",
    "build_initramfs": "initramfs",
    "kexec_same_kernel": "guest", "in_guest": "guest",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'pyiommufd.vm' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value
