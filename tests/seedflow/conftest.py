"""The seed flow across a real kexec, one VM run per kernel and program, driven
from the host (the programs need the VM for themselves: each one binds the
test device, holds /dev/liveupdate and kexecs). Tier ``vm``."""
from __future__ import annotations


from pyiommufd_testing.host_vm import mark_as_vm_tier

from seedflow_results import RESULTS


def pytest_collection_modifyitems(config, items):
    mark_as_vm_tier(config, items, "seedflow")


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
