"""What the host-driven VM tests share (tests/seedflow, tests/reliability):
tests that need a VM run of their own, one per kernel of the tier, rather than
the plugin's shared guest."""
from __future__ import annotations

import os
from typing import Any, NoReturn

import pytest

from pyiommufd.vm import kernel as vmkernel, runner

from .pytest_plugin import KernelTarget, kernel_targets


def parametrize_by_kernel(metafunc: Any) -> None:
    """A test taking ``target`` runs once per kernel of ``pyiommufd_vm_kernels``."""
    if "target" in metafunc.fixturenames:
        targets = kernel_targets(metafunc.config)
        metafunc.parametrize("target", targets, ids=[t.name for t in targets])


def mark_as_vm_tier(config: Any, items: list[Any], folder: str) -> None:
    """The tests under ``folder`` are tier ``vm``; ``--no-vm`` skips them."""
    for item in items:
        if f"/{folder}/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.vm)
            if config.getoption("no_vm", False):
                item.add_marker(pytest.mark.skip(reason="--no-vm"))


def vm_did_not_run(what: str, why: str) -> NoReturn:
    """A skip that says so, or under CI=true a failure: in CI every tier must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} did not run (CI=true makes this a failure): {why}")
    pytest.skip(f"{what} did not run: {why}")


def kernel_image(target: KernelTarget, what: str = "the VM") -> vmkernel.KernelImage:
    """``target``'s kernel, built or taken from the cache; QEMU must be there."""
    if target.unavailable:
        vm_did_not_run(what, f"kernel {target.name}: {target.unavailable}")
    try:
        runner.find_qemu()
        return vmkernel.resolve_kernel(target.user_kernel, progress=print, recipe=target.recipe())
    except (runner.VmError, vmkernel.KernelBuildError) as exc:
        vm_did_not_run(what, str(exc))
