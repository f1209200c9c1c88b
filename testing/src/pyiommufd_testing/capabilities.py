"""What the kernel under test can do, learned by asking it, never from its name.

Tests that run on several kernels (the fake, stock 7.3, the series, the series
with the stand-in vfio-pci handler) branch on a :class:`KernelCaps`:

* ``lu_abi``: the series' mark ioctl at the configured nr (``$PYIOMMUFD_LU_NR``,
  else 0x95), found by the side-effect-free probe of :mod:`pyiommufd.abi`;
* ``iommufd_handler``: LUO accepts an iommufd file. Probed by preserving an
  empty iommufd in a scratch session: the series' handler preserves one with no
  marked HWPT, and without a handler LUO answers ENOENT;
* ``vfio_handler``: LUO accepts a VFIO device cdev. Probed with the whole chain
  the series requires (device bound and attached to a marked HWPT, its iommufd
  preserved first), so that ENOENT can only mean "no handler".

The scratch session is closed at once, which unpreserves everything in it.
"""
from __future__ import annotations

import errno as E
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyiommufd import abi as abi_mod, errors
from pyiommufd.backend import Backend, get_backend

if TYPE_CHECKING:   # pragma: no cover
    from pyiommufd.luo import LiveUpdate, Session

PROBE_SESSION = "pyiommufd-caps-probe"
PROBE_TOKEN_HWPT = 0x5EED
_IOMMUFD_TOKEN, _CDEV_TOKEN = 1, 2


@dataclass(frozen=True)
class KernelCaps:
    lu_nr: int
    lu_status: str                 # the probe's verdict: lu-v1, lu-v2, foreign, absent...
    iommufd_handler: bool
    vfio_handler: bool | None      # None: no VFIO device was at hand to try
    liveupdate: bool = True        # /dev/liveupdate exists

    @property
    def lu_abi(self) -> abi_mod.LuAbi | None:
        base = abi_mod.REVISIONS.get(self.lu_status)
        return base.with_nr(self.lu_nr) if base else None

    @property
    def series(self) -> bool:
        """The mark ioctl and the iommufd handler: what the series adds to iommufd."""
        return self.lu_abi is not None and self.iommufd_handler

    def describe(self) -> str:
        vfio = {True: "yes", False: "no", None: "not probed"}[self.vfio_handler]
        return (f"LU ioctl at {self.lu_nr:#x}: {self.lu_status}; iommufd LUO handler: "
                f"{'yes' if self.iommufd_handler else 'no'}; vfio-pci LUO handler: {vfio}")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> "KernelCaps":
        return cls(**json.loads(path.read_text()))


def _preserve_errno(session: Session, obj: Any, token: int) -> int | None:
    try:
        session.preserve(obj, token)
    except errors.KernelError as exc:
        return exc.errno
    return None


def _handler_answer(err: int | None, what: str) -> bool:
    """True for success, False for LUO's "no handler" ENOENT; anything else
    means the probe's set-up is wrong, which must not pass for an answer."""
    if err not in (None, E.ENOENT):
        raise AssertionError(f"preserving {what} gave {errors.errname(err)}: neither a "
                             "handler's success nor LUO's ENOENT")
    return err is None


def probe(*, liveupdate: LiveUpdate | None = None, vfio_cdev: str | None = None,
          backend: Backend | None = None) -> KernelCaps:
    """Ask the kernel. ``liveupdate`` is an open :class:`pyiommufd.luo.LiveUpdate`
    to use (``/dev/liveupdate`` is exclusive); ``vfio_cdev`` a device cdev on
    vfio-pci that nothing else has bound (its handler is probed only then)."""
    from pyiommufd.luo import LiveUpdate

    be = get_backend(backend)
    result = abi_mod.probe_lu_abi(backend=be)
    if not be.files.exists("/dev/liveupdate"):
        return KernelCaps(result.nr, result.status, False, None, liveupdate=False)
    lu = liveupdate or LiveUpdate.open(backend=be)
    try:
        iommufd_handler = _probe_iommufd(lu, be)
        vfio_handler = None
        if vfio_cdev is not None:
            chain = result.abi if iommufd_handler else None
            vfio_handler = _probe_vfio(lu, vfio_cdev, chain, be)
    finally:
        if liveupdate is None:
            lu.close()
    return KernelCaps(result.nr, result.status, iommufd_handler, vfio_handler)


def _probe_iommufd(lu: LiveUpdate, be: Backend) -> bool:
    from pyiommufd.iommufd import IOMMUFD

    with lu.create_session(PROBE_SESSION) as session, IOMMUFD.open(backend=be) as iommufd:
        return _handler_answer(_preserve_errno(session, iommufd, _IOMMUFD_TOKEN), "an empty iommufd")


def _probe_vfio(lu: LiveUpdate, vfio_cdev: str, lu_abi: abi_mod.LuAbi | None, be: Backend) -> bool:
    """Preserve the cdev with what the series asks for in place: bound, attached
    to a marked HWPT, its iommufd preserved first. Without the series' mark
    ioctl and iommufd handler no vfio-pci handler can accept a cdev (it hands
    the device to the iommufd's handler), so LUO's answer alone is taken."""
    from pyiommufd.iommufd import IOMMUFD
    from pyiommufd.vfio import VfioDevice

    with IOMMUFD.open(backend=be) as iommufd, VfioDevice.open(vfio_cdev, backend=be) as device:
        dev_id = device.bind(iommufd)
        if lu_abi is not None:
            ioas = iommufd.alloc_ioas()
            hwpt = iommufd.alloc_hwpt(dev_id, ioas)
            device.attach(hwpt)
            hwpt.mark_preserved(PROBE_TOKEN_HWPT, abi=lu_abi)
        with lu.create_session(PROBE_SESSION) as session:
            if lu_abi is not None and _preserve_errno(session, iommufd, _IOMMUFD_TOKEN) is not None:
                raise AssertionError("an iommufd with a marked, attached HWPT did not preserve")
            return _handler_answer(_preserve_errno(session, device, _CDEV_TOKEN),
                                   "a bound, attached VFIO cdev")
