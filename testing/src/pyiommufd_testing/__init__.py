"""Test support: a fake Linux 7.3 kernel behind the backend seam.

>>> from pyiommufd_testing import FakeKernel
>>> from pyiommufd.backend import use
>>> with FakeKernel(lu_abi="lu-v2") as fake, use(fake):
...     ...   # pyiommufd code runs against the fake

:class:`FakeKernel` implements every :class:`pyiommufd.backend.Backend`
method at the byte level (the ioctl buffers the real kernel would get),
models stock 7.3 (``lu_abi=None``) or a kernel carrying the live-update
series (``"lu-v1"``/``"lu-v2"``), and simulates kexec: ``reboot(KEXEC)``
hands the open LUO sessions to a new boot and raises
:class:`SimulatedKexec`; ``FakeKernel.kexec()`` does the same from a test
and returns normally.
"""
# Lazy: the pytest plugin lives in this package and loads in every pytest
# run, which should not pay for importing the whole fake kernel.
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # pragma: no cover
    from .fake import FakeKernel as FakeKernel, FakePciDevice as FakePciDevice, SimulatedKexec as SimulatedKexec

__all__ = ["FakeKernel", "FakePciDevice", "SimulatedKexec"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import fake

        return getattr(fake, name)
    raise AttributeError(f"module 'pyiommufd_testing' has no attribute {name!r}")
