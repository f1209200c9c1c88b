"""Generates pyiommufd._uapi (cffi out-of-line ABI mode) while building.

The declarations come from include-bindings/*.h; the generated module needs
only _cffi_backend at import time: no compiler, no pycparser.
"""
import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_builder():
    path = os.path.join(HERE, "src", "pyiommufd", "_uapi_build.py")
    spec = importlib.util.spec_from_file_location("_uapi_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithUapi(build_py):
    def run(self):
        super().run()
        builder = _load_builder()
        if self.editable_mode:
            target = os.path.join(HERE, "src", "pyiommufd", "_uapi.py")
        else:
            target = os.path.join(self.build_lib, "pyiommufd", "_uapi.py")
        builder.emit(target)


setup(cmdclass={"build_py": BuildPyWithUapi})
