"""Cross-check: each test here runs against the fake kernel (tier unit, on the
host) and against the real Linux 7.3 kernel (tier vm, in the QEMU guest). Any
disagreement is a bug in the fake (pyiommufd.testing)."""
from dataclasses import dataclass

import pytest

from pyiommufd import backend as backend_mod


@dataclass
class Kernel:
    name: str
    backend: backend_mod.Backend


@pytest.fixture(params=[pytest.param("fake", marks=pytest.mark.unit),
                        pytest.param("real", marks=pytest.mark.vm)])
def kernel(request):
    if request.param == "fake":
        from pyiommufd.testing import FakeKernel

        fake = FakeKernel()
        with backend_mod.use(fake):
            yield Kernel("fake", fake)
        fake.shutdown()
    else:
        real = backend_mod.LinuxBackend()
        with backend_mod.use(real):
            yield Kernel("real", real)
