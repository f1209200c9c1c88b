"""Set-up and packaging: the README's commands are the ones CI and bootstrap
use, the version and dependency floors live in one place each, the licence is
shipped."""
import re
import shutil
import subprocess
import sys
import zipfile
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


def _build_wheel(tmp_path: Path) -> Path:
    """The root's wheel, built by pip from a copy of the files the build reads
    (a stale build/ in the checkout must not decide what ships)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "_uapi.py")
    for tree in ("src", "include-bindings"):
        shutil.copytree(ROOT / tree, source / tree, ignore=skip)
    out = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                           "--no-deps", "-w", str(out), str(source)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("pyiommufd-*.whl")
    return wheel


def test_the_wheel_ships_no_fake_kernel_and_no_pytest_plugin(tmp_path):
    with zipfile.ZipFile(_build_wheel(tmp_path)) as wheel:
        names = wheel.namelist()
        entry_points = next((wheel.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")), "")
    assert "pyiommufd/iommufd.py" in names and "pyiommufd/_uapi.py" in names
    harness = [n for n in names if "testing" in n.split("/")[0] or "/testing/" in n
               or "fake" in n or "pytest_plugin" in n]
    assert harness == []
    assert "pytest11" not in entry_points
    assert "pyiommufd.cli:main" in entry_points


def test_the_test_extra_names_the_harness_distribution_of_this_repository():
    assert "pyiommufd-testing" in PYPROJECT["project"]["optional-dependencies"]["test"]
    harness = tomllib.loads((ROOT / "testing" / "pyproject.toml").read_text())["project"]
    assert harness["name"] == "pyiommufd-testing"
    assert "pyiommufd" in harness["dependencies"]
    assert "entry-points" not in harness   # the plugin stays opt-in (-p)
    assert "-p pyiommufd_testing.pytest_plugin" in PYPROJECT["tool"]["pytest"]["ini_options"]["addopts"]
