"""Set-up and packaging: the README's commands are the ones CI and bootstrap
use, the version and dependency floors live in one place each, the licence is
shipped."""
import re
import tomllib
from pathlib import Path

import pyiommufd

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def readme_shell_commands() -> list[str]:
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", README, re.S)]


def test_ci_runs_the_readme_test_command_exactly():
    test_command = next(c for c in readme_shell_commands() if "pytest" in c)
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_readme_commands_use_the_venv_that_bootstrap_makes():
    bootstrap = (ROOT / "tools" / "bootstrap.sh").read_text()
    assert "venv=.venv\n" in bootstrap
    for command in readme_shell_commands()[:2]:
        first, second = command.split(" && ")
        assert first == "tools/bootstrap.sh"
        assert second.startswith(".venv/bin/"), command


def test_bootstrap_hides_no_failure():
    script = (ROOT / "tools" / "bootstrap.sh").read_text()
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assert "set -euo pipefail" in code
    assert "|| true" not in code and "2>/dev/null | grep -v" not in code
    # pip only ever runs inside the venv (PEP 668)
    assert all(line.lstrip().startswith('"$venv/bin/python" -m pip')
               for line in code.splitlines() if "-m pip " in line)


def test_version_has_one_source():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "pyiommufd.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+", pyiommufd.__version__)


def test_cli_version_is_the_package_version(capsys):
    from cli_support import run_cli

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"pyiommufd, version {pyiommufd.__version__}"


def test_license_file_matches_the_metadata():
    text = (ROOT / "LICENSE").read_text()
    assert PYPROJECT["project"]["license"] == "MIT" and text.startswith("MIT License")
    assert "Copyright (c) the pyiommufd authors" in text
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]


def test_build_and_runtime_cffi_floors_agree():
    build = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("cffi")]
    runtime = [r for r in PYPROJECT["project"]["dependencies"] if r.startswith("cffi")]
    assert build == runtime == ["cffi>=1.15.1"]  # Debian bookworm's python3-cffi
