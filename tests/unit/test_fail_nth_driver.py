"""The VM tier's fail-nth driver (tests/vm/fail_nth.py), on the host: a
simulated kernel counts a flow's allocations down the way fail-nth does, so
what the driver counts and reports is checked without a guest."""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

from pyiommufd import errors

FAIL_NTH = Path(__file__).resolve().parents[1] / "vm" / "fail_nth.py"


@pytest.fixture(scope="module")
def F():
    name = "fail_nth_under_test"
    spec = importlib.util.spec_from_file_location(name, FAIL_NTH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


class CountingKernel:
    """fail-nth of one thread: ``arm(n)`` and the nth ``allocate()`` fails;
    ``disarm()`` says whether it did, and resets."""

    def __init__(self) -> None:
        self.left = 0
        self.log: list[str] = []

    def arm(self, nth: int) -> None:
        self.left = nth

    def allocate(self) -> None:
        if self.left:
            self.left -= 1
            if not self.left:
                raise MemoryError("injected")

    def disarm(self) -> bool:
        injected = self.left == 0
        self.left = 0
        return injected


class Log:
    def __init__(self, kernel: CountingKernel) -> None:
        self.kernel = kernel

    def new(self) -> list[str]:
        lines, self.kernel.log = self.kernel.log, []
        return lines

    def complaints(self) -> list[str]:
        return [line for line in self.new() if "WARNING:" in line]


class TypedFailure(errors.PyiommufdError):
    pass


def allocating(kernel: CountingKernel, count: int, *, on_fault=None):
    """A flow that makes ``count`` allocations; ``on_fault(n)`` runs for the
    allocation that fails (n counts from 1) and may misbehave."""

    def act(state: object) -> object:
        for n in range(1, count + 1):
            try:
                kernel.allocate()
            except MemoryError:
                if on_fault is not None:
                    on_fault(n)
                raise TypedFailure(f"allocation {n} failed") from None
        return "done"

    return act


def driver(F, kernel: CountingKernel):
    return F.Driver(Log(kernel), kernel)


def test_a_clean_flow_is_hit_at_every_allocation_and_completes(F):
    kernel = CountingKernel()
    drv = driver(F, kernel)
    res = drv.run(F.Flow("five allocations", allocating(kernel, 5)))
    assert (res.points, res.typed_errors, res.failures, res.leaks, res.completed) == (5, 5, [], 0, True)
    text = F.summary(drv.results)
    assert re.search(r"^fail-nth: 1 flows x 5 injection points, 0 failures, 0 leaks$", text, re.M), text


def test_a_leaked_fd_is_a_leak_and_a_failure(F):
    kernel = CountingKernel()
    kept: list[int] = []

    def leak_on_third(n: int) -> None:
        if n == 3:
            kept.append(os.open("/dev/null", os.O_RDONLY))

    try:
        drv = driver(F, kernel)
        res = drv.run(F.Flow("leaky", allocating(kernel, 4, on_fault=leak_on_third)))
    finally:
        for fd in kept:
            os.close(fd)
    assert res.points == 4 and res.leaks == 1
    assert [f for f in res.failures if "+1 fds" in f] == res.failures and len(res.failures) == 1
    assert "nth 3" in res.failures[0]
    assert "4 injection points, 1 failures, 1 leaks" in F.summary(drv.results)


def test_an_untyped_error_and_a_failed_rerun_are_failures(F):
    kernel = CountingKernel()
    broken_after = []

    def untyped_on_second(n: int) -> None:
        if n == 2:
            broken_after.append(True)
            raise KeyError("not a PyiommufdError")

    def act(state: object) -> object:
        if len(broken_after) == 1 and kernel.left == 0:     # the re-run right after the bad point
            broken_after.append(True)
            raise TypedFailure("left broken")
        return allocating(kernel, 3, on_fault=untyped_on_second)(state)

    res = driver(F, kernel).run(F.Flow("untyped", act))
    assert res.points == 3 and res.typed_errors == 2 and res.leaks == 0
    assert any("nth 2: untyped KeyError" in f for f in res.failures)
    assert any("nth 2: the re-run without injection failed" in f for f in res.failures)


def test_a_failure_without_a_fault_ends_the_flow_as_a_failure(F):
    kernel = CountingKernel()

    def act(state: object) -> object:
        try:
            kernel.allocate()
        except MemoryError:
            raise TypedFailure("allocation failed") from None
        if kernel.left:              # armed past this flow's only allocation
            raise TypedFailure("failed with no fault")
        return None

    res = driver(F, kernel).run(F.Flow("fails anyway", act))
    assert res.points == 1 and res.completed
    assert res.failures == ["nth 2: no fault injected, yet TypedFailure: failed with no fault"]


def test_a_kernel_warning_at_a_point_is_a_failure(F):
    kernel = CountingKernel()

    def warn_on_first(n: int) -> None:
        if n == 1:
            kernel.log.append("WARNING: CPU: 0 PID: 1 at somewhere")

    res = driver(F, kernel).run(F.Flow("warns", allocating(kernel, 2, on_fault=warn_on_first)))
    assert res.failures == ["nth 1: kernel log: WARNING: CPU: 0 PID: 1 at somewhere"]
