"""Importing pyiommufd needs neither a C compiler nor pycparser: _uapi is a
generated cffi ABI-mode module (pyiommufd._uapi_build)."""
import subprocess
import sys

CODE = """
import sys
sys.modules["pycparser"] = None          # any import of it now fails
import pyiommufd, pyiommufd.iommufd, pyiommufd.vfio, pyiommufd.luo, pyiommufd.memfd
import pyiommufd.kexec, pyiommufd.abi, pyiommufd.selftest, pyiommufd_testing.fake
from pyiommufd._uapi import ffi
assert ffi.sizeof("struct iommu_ioas_map_file") == 40
assert "cffi.cparser" not in sys.modules and "cffi.recompiler" not in sys.modules
print("ok")
"""


def test_import_without_compiler_or_pycparser():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                          env={"PATH": "/nonexistent", "CC": "/bin/false"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_generated_module_uses_only_the_cffi_backend():
    import pyiommufd._uapi as uapi

    source = open(uapi.__file__).read()
    assert "import _cffi_backend" in source and "pycparser" not in source


WALK_ALL = """
import importlib, pkgutil, sys
import pyiommufd
for module in pkgutil.walk_packages(pyiommufd.__path__, "pyiommufd."):
    if module.name != "pyiommufd.__main__":   # importing it runs the CLI
        importlib.import_module(module.name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("pyiommufd_testing", "pytest", "_pytest"))
print(len([m for m in sys.modules if m.startswith("pyiommufd.")]), leaked)
"""


def test_no_module_of_pyiommufd_imports_the_harness_or_pytest():
    proc = subprocess.run([sys.executable, "-c", WALK_ALL], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    imported, leaked = proc.stdout.split(" ", 1)
    assert int(imported) > 20   # the walk did reach the subpackages
    assert leaked.strip() == "[]"
