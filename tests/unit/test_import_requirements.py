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
