"""Test support: a fake Linux 7.3 kernel behind the backend seam.

>>> from pyiommufd.testing import FakeKernel
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
from .fake import FakeKernel, FakePciDevice, SimulatedKexec

__all__ = ["FakeKernel", "FakePciDevice", "SimulatedKexec"]
