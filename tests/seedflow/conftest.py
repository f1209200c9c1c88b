"""The seed flow across a real kexec, one VM run per kernel and program, driven
from the host (the programs need the VM for themselves: each one binds the
test device, holds /dev/liveupdate and kexecs). Tier ``vm``."""
from __future__ import annotations

import os

import pytest

from seedflow_results import RESULTS


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/seedflow/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.vm)
            if config.getoption("no_vm", False):
                item.add_marker(pytest.mark.skip(reason="--no-vm"))


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("seed flow: pyiommufd selftest and the series' C selftest, side by side")
    for kernel, programs in RESULTS.items():
        tr.write_line(f"{kernel}:")
        for program in ("pyiommufd", "c"):
            if program in programs:
                tr.write_line(f"  {programs[program]}")
