"""`pyiommufd --help` must not import the heavy modules (behaviour, not timing).

Each case runs a fresh interpreter under ``-X importtime`` and reads the list of
modules it imported from stderr.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("cffi", "_cffi_backend", "pyiommufd._uapi", "pyiommufd.iommufd", "pyiommufd.vm.runner")
ENTRY = "from pyiommufd.cli import main; main()"


def imported_modules(code: str, *args: str) -> tuple[set[str], subprocess.CompletedProcess]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *args],
                          capture_output=True, text=True, timeout=60)
    modules = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":   # the header line
                modules.add(name)
    return modules, proc


def test_import_cli_is_light():
    modules, proc = imported_modules("import pyiommufd.cli")
    assert proc.returncode == 0, proc.stderr
    assert "pyiommufd.cli" in modules
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_top_level_help_is_light():
    modules, proc = imported_modules(ENTRY, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Commands:" in proc.stdout and "selftest" in proc.stdout
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    # --help does not even import a subcommand module
    assert not {m for m in modules if m.startswith("pyiommufd.cli.")}


@pytest.mark.parametrize("args", [
    ["selftest", "--help"], ["doctor", "--help"], ["caps", "--help"], ["devices", "--help"],
    ["bind", "--help"], ["unbind", "--help"], ["vm", "--help"], ["vm", "run", "--help"],
    ["vm", "selftest", "--help"], ["vm", "build-kernel", "--help"], ["exit-codes"],
], ids=lambda a: " ".join(a))
def test_subcommand_help_is_light(args):
    modules, proc = imported_modules(ENTRY, *args)
    assert proc.returncode == 0, proc.stderr
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


@pytest.mark.parametrize("module", ["pyiommufd.agent.protocol", "pyiommufd.exitcodes"])
def test_agent_protocol_and_exit_codes_do_not_import_click(module):
    modules, proc = imported_modules(f"import {module}")
    assert proc.returncode == 0, proc.stderr
    assert module in modules
    assert "click" not in modules and "pyiommufd.cli" not in modules
