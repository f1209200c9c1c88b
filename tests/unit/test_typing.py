"""py.typed is true: mypy, with the settings in pyproject.toml ([tool.mypy]:
strict on the runtime package, pyiommufd_testing left out), finds nothing.
The public names import with their real types, not Any."""
import os
import textwrap
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy is not installed (pip install .[test])")

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"


def run_mypy(*args: str, cache_dir: Path) -> tuple[str, int]:
    cwd = os.getcwd()
    os.chdir(ROOT)  # [tool.mypy] names its files relative to the project
    try:
        stdout, stderr, status = mypy_api.run(["--config-file", str(PYPROJECT),
                                               "--cache-dir", str(cache_dir), *args])
    finally:
        os.chdir(cwd)
    return stdout + stderr, status


def test_runtime_package_has_no_mypy_error(tmp_path):
    out, status = run_mypy(cache_dir=tmp_path)
    assert status == 0, out
    assert "Success: no issues found" in out, out


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
