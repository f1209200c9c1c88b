"""What importing the interface modules loads: none of the heavy standard
modules (dataclasses pulls in inspect, ast, dis; hashlib OpenSSL; uuid and
platform run code at import; ctypes loads libffi), and no cffi types are
built until an object opens."""
import os
import subprocess
import sys

import pyiommufd

SRC = os.path.dirname(os.path.dirname(pyiommufd.__file__))
HEAVY = ("dataclasses", "inspect", "ctypes", "hashlib", "uuid", "platform", "resource")

CODE = """
import sys
before = set(sys.modules)
import pyiommufd.iommufd, pyiommufd.luo, pyiommufd.vfio, pyiommufd.memfd
from pyiommufd import ioctl
new = set(sys.modules) - before
print(" ".join(sorted(m for m in new if m in {heavy!r})))
print(sum(d._ptype is not None for d in ioctl.REGISTRY.values()))
""".format(heavy=set(HEAVY))


def test_interfaces_import_no_heavy_module_and_build_no_type():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0, proc.stderr
    heavy, built = proc.stdout.splitlines()
    assert heavy == "", f"imported by the interface modules: {heavy}"
    assert built == "0"


def test_opening_builds_the_types_of_the_hot_ioctls(fake_kernel):
    from pyiommufd import ioctl, luo
    from pyiommufd.iommufd import IOMMU_IOAS_MAP, IOMMU_IOAS_UNMAP, IOMMUFD

    with IOMMUFD.open():
        assert IOMMU_IOAS_MAP._ptype is not None and IOMMU_IOAS_UNMAP._ptype is not None
    with luo.LiveUpdate.open():
        assert all(d._ptype is not None for d in (luo.RETRIEVE_SESSION, luo.RETRIEVE_FD, luo.FINISH))
    assert isinstance(ioctl.REGISTRY["IOMMU_IOAS_MAP"], ioctl.IoctlDef)
