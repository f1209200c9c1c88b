"""The VMM guide and the operator's runbook say what the code does: the QEMU
lines, the commands and their options, the blackout table's phases."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click

from pyiommufd.cli import cli
from pyiommufd.qemu.liveupdate import RESUME_PHASES, Blackout
from pyiommufd.qemu.machine import Machine

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "vmm-guide.md"
RUNBOOK = ROOT / "docs" / "runbook-vmm.md"


def _blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, re.S)


def test_the_guides_qemu_lines_are_what_launch_adds():
    machine = Machine("vm0", 256 << 20)
    args = machine.command(ram_fd=5, qmp_socket="/run/pyiommufd/qemu/vm0/qmp.sock")
    lines = [f"{opt} {value}" for opt, value in zip(args[::2], args[1::2])]
    assert "\n".join(lines) + "\n" in _blocks(GUIDE.read_text())


def _command(path: list[str]) -> click.Command:
    ctx = click.Context(cli)
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group), f"{' '.join(path)}: {name} is not a subcommand"
        sub = command.get_command(ctx, name)
        assert sub is not None, f"no command pyiommufd {' '.join(path)}"
        command = sub
    return command


def test_every_command_in_the_runbook_exists_with_its_options():
    text = RUNBOOK.read_text()
    commands = [ln.split("pyiommufd ", 1)[1] for ln in text.splitlines()
                if re.match(r"^\s*(\$|#) (\.venv/bin/)?pyiommufd ", ln)]
    assert len(commands) >= 8
    seen = set()
    for line in commands:
        words = shlex.split(line.split(" -- ")[0])
        path = [w for w in words if not w.startswith("-")][:2]
        command = _command(path[:1])
        if isinstance(command, click.Group):
            command = _command(path)
        else:
            path = path[:1]
        options = {o for p in command.params for o in getattr(p, "opts", [])}
        for w in words:
            if w.startswith("--"):
                assert w.split("=")[0] in options, f"pyiommufd {' '.join(path)} has no option {w}"
        seen.add(" ".join(path))
    assert {"qemu launch", "qemu update", "qemu resume", "qemu status", "qemu abort"} <= seen


def test_the_runbooks_blackout_table_has_every_phase_in_order():
    text = RUNBOOK.read_text()
    header = Blackout(()).table().splitlines()[0]
    assert header in text
    table = text[text.index(header):].splitlines()
    phases = [ln.split("  ")[0].strip() for ln in table[1:len(RESUME_PHASES) + 1]]
    assert tuple(phases) == RESUME_PHASES


def test_the_readme_names_the_demo_the_guide_and_the_runbook():
    text = (ROOT / "README.md").read_text()
    assert "pyiommufd vm live-update-demo" in text
    assert "(docs/vmm-guide.md)" in text and "(docs/runbook-vmm.md)" in text
