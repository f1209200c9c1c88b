"""py.typed is true: mypy, with the settings in pyproject.toml ([tool.mypy]:
strict on the runtime package), finds nothing; with testing/pyproject.toml's
(strict on pyiommufd_testing, the fake kernel and the harness) neither.
The public names import with their real types, not Any."""
import os
import re
import textwrap
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy is not installed (pip install .[test])")

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
TESTING = ROOT / "testing"


def run_mypy(*args: str, cache_dir: Path, project: Path = ROOT) -> tuple[str, int]:
    cwd = os.getcwd()
    os.chdir(project)  # [tool.mypy] names its files relative to the project
    try:
        stdout, stderr, status = mypy_api.run(["--config-file", str(project / "pyproject.toml"),
                                               "--cache-dir", str(cache_dir), *args])
    finally:
        os.chdir(cwd)
    return stdout + stderr, status


def test_runtime_package_has_no_mypy_error(tmp_path):
    out, status = run_mypy(cache_dir=tmp_path)
    assert status == 0, out
    assert "Success: no issues found" in out, out


def test_testing_distribution_has_no_mypy_error(tmp_path):
    out, status = run_mypy(cache_dir=tmp_path, project=TESTING)
    assert status == 0, out
    # it looked at the fake's modules, not at nothing, and in strict mode
    found = re.search(r"Success: no issues found in (\d+) source files", out)
    assert found and int(found[1]) >= 20, out
    assert "strict = true" in (TESTING / "pyproject.toml").read_text()


def test_public_names_have_real_types(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent("""\
        from pyiommufd import IOMMUFD, LiveUpdate, MemFD, PciDevice, VfioDevice
        reveal_type(IOMMUFD)
        reveal_type(LiveUpdate)
        reveal_type(MemFD)
        reveal_type(VfioDevice)
        reveal_type(PciDevice)
        """))
    out, _ = run_mypy(str(probe), cache_dir=tmp_path / "cache")
    revealed = [line for line in out.splitlines() if "Revealed type" in line]
    assert len(revealed) == 5, out
    for name, module in (("IOMMUFD", "iommufd"), ("LiveUpdate", "luo"), ("MemFD", "memfd"),
                         ("VfioDevice", "vfio"), ("PciDevice", "pci")):
        assert any(f"-> pyiommufd.{module}.{name}\"" in line for line in revealed), out
    assert not any("Any" in line.split("->")[-1] for line in revealed), out
