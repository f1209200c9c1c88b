"""The rules of the series "iommu: Add live update state preservation", the same
code on the fake (stock 7.3, and the series as rebased onto 7.3.4: lu-v1 at
0x96, no vfio-pci handler) and on every real kernel of the vm tier.

Each test asks the kernel what it has (:mod:`pyiommufd_testing.capabilities`)
and asserts the outcome that follows: the series' rule where the kernel has
the mark ioctl and the iommufd handler, and the stock answer (no mark ioctl,
LUO's ENOENT for an iommufd) where it does not. Nothing is skipped for being
inconvenient on one kernel.
"""
from __future__ import annotations

import contextlib
import gc
import mmap
import os
from dataclasses import dataclass, field

import pytest

from pyiommufd import backend as backend_mod, errors
from pyiommufd.abi import ENV_NR
from pyiommufd.iommufd import IOMMUFD
from pyiommufd.luo import LiveUpdate
from pyiommufd.memfd import MemFD
from pyiommufd_testing.capabilities import KernelCaps, probe
from pyiommufd.vfio import VfioDevice

MiB = 1 << 20
IOVA = 1 << 32
TOK_HWPT, TOK_MEMFD, TOK_IOMMUFD, TOK_CDEV = 0x789012, 0x890123, 0x123456, 0x654321


def _virtio_net_bdf(be) -> str:
    from pyiommufd import pci

    for info in pci.list_devices(be):
        if info.vendor == 0x1AF4 and info.class_code >> 16 == 0x02:
            return info.bdf
    pytest.fail("no virtio-net PCI device (the VM runner and the fake both have one)")


@dataclass
class Rig:
    """One kernel, its capabilities, and the test device on vfio-pci."""
    name: str
    backend: backend_mod.Backend
    cdev: str
    caps: KernelCaps
    #: anonymous memory for non-file mappings; outlives every IOAS of the test
    anon: mmap.mmap = field(default_factory=lambda: mmap.mmap(-1, 2 * 4096))
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def close(self) -> None:
        self.stack.close()
        gc.collect()          # a failed map's buffer export dies with its frame
        self.anon.close()

    def device_setup(self, memfd: MemFD | None = None, *, sealed: bool = True):
        """The seed's stage-1 objects up to the mark: iommufd, device bound and
        attached to an HWPT on an IOAS with 1 MiB of a memfd mapped by file."""
        iommufd = self.stack.enter_context(IOMMUFD.open())
        device = self.stack.enter_context(VfioDevice.open(self.cdev))
        dev_id = device.bind(iommufd)
        ioas = iommufd.alloc_ioas()
        hwpt = iommufd.alloc_hwpt(dev_id, ioas)
        device.attach(hwpt)
        if memfd is None:
            memfd = self.stack.enter_context(MemFD.create("guest-ram", MiB))
            if sealed:
                memfd.seal_for_live_update()
        ioas.map_file(memfd, 0, MiB, iova=IOVA)
        return iommufd, device, dev_id, ioas, hwpt, memfd

    def liveupdate(self) -> LiveUpdate:
        return self.stack.enter_context(LiveUpdate.open())


KERNELS = [
    pytest.param("fake-stock", marks=pytest.mark.unit),
    pytest.param("fake-series", marks=pytest.mark.unit),
    pytest.param("real", marks=[pytest.mark.vm, pytest.mark.pyiommufd_vm]),
]


@pytest.fixture(params=KERNELS)
def rig(request, monkeypatch):
    if request.param == "real":
        be: backend_mod.Backend = backend_mod.LinuxBackend()
        fake = None
    else:
        from pyiommufd_testing import FakeKernel

        if request.param == "fake-series":   # the series as rebased onto 7.3.4
            fake = FakeKernel(lu_abi="lu-v1", lu_nr=0x96, vfio_lu_handler=False)
            monkeypatch.setenv(ENV_NR, "0x96")
        else:
            fake = FakeKernel()
            monkeypatch.delenv(ENV_NR, raising=False)
        be = fake
    with backend_mod.use(be):
        from pyiommufd.pci import PciDevice

        binding = PciDevice(_virtio_net_bdf(be)).bind_vfio()
        caps = probe()
        print(f"{request.param}: {caps.describe()}")
        rig = Rig(request.param, be, binding.vfio_cdev, caps)
        try:
            yield rig
        finally:
            rig.close()
            if fake is None:
                binding.restore()
    if fake is not None:
        fake.shutdown()


def _no_series(rig: Rig) -> bool:
    """Stock 7.3: no mark ioctl at the configured nr and no iommufd handler.
    The two come together in the series; a kernel with one and not the other
    would be a new case for these tests to learn."""
    assert rig.caps.series or (rig.caps.lu_abi is None and not rig.caps.iommufd_handler), \
        rig.caps.describe()
    return not rig.caps.series


def _marked(rig: Rig, hwpt) -> bool:
    """Mark ``hwpt`` where the kernel has the series; without it the probe finds
    no mark ioctl. Returns whether it was marked."""
    if _no_series(rig):
        with pytest.raises(errors.AbiError):
            hwpt.mark_preserved(TOK_HWPT)
        return False
    hwpt.mark_preserved(TOK_HWPT, abi=rig.caps.lu_abi)
    return True


# -- the mark ioctl ---------------------------------------------------------------------------

def test_mark(rig):
    iommufd, device, dev_id, ioas, hwpt, memfd = rig.device_setup()
    if not _marked(rig, hwpt):
        return
    lu = rig.caps.lu_abi
    hwpt.mark_preserved(TOK_HWPT, abi=lu)                 # same HWPT, same token: fine
    with pytest.raises(errors.NotFound):
        lu.mark(rig.backend, iommufd.fileno(), 9999, 1)   # no such id
    with pytest.raises(errors.NotFound):
        lu.mark(rig.backend, iommufd.fileno(), ioas.id, 1)  # an IOAS is not a paging HWPT
    other = iommufd.alloc_hwpt(dev_id, ioas)
    with pytest.raises(errors.AddressInUse):
        other.mark_preserved(TOK_HWPT, abi=lu)            # the token is taken in this iommufd


def test_re_mark_after_preserve(rig):
    iommufd, device, dev_id, ioas, hwpt, memfd = rig.device_setup()
    if not _marked(rig, hwpt):
        return
    session = rig.stack.enter_context(rig.liveupdate().create_session("re-mark"))
    session.preserve(memfd, TOK_MEMFD)
    session.preserve(iommufd, TOK_IOMMUFD)
    hwpt.mark_preserved(TOK_HWPT + 1, abi=rig.caps.lu_abi)


# -- preserve order and what iommufd preserve checks ----------------------------------------

def test_preserve_order(rig):
    iommufd, device, dev_id, ioas, hwpt, memfd = rig.device_setup()
    series = _marked(rig, hwpt)
    session = rig.stack.enter_context(rig.liveupdate().create_session("order"))
    with pytest.raises(errors.NotFound):
        session.preserve(device, TOK_CDEV)                # cdev before its iommufd
    with pytest.raises(errors.NotFound):
        session.preserve(iommufd, TOK_IOMMUFD)            # iommufd before its memfd
    session.preserve(memfd, TOK_MEMFD)
    if series:
        session.preserve(iommufd, TOK_IOMMUFD)
    else:
        with pytest.raises(errors.NotFound):              # no iommufd handler at all
            session.preserve(iommufd, TOK_IOMMUFD)


def _iommufd_preserve_errno(rig, iommufd, memfd=None) -> int | None:
    with rig.liveupdate() as lu, lu.create_session("checks") as session:
        if memfd is not None:
            session.preserve(memfd, TOK_MEMFD)
        try:
            session.preserve(iommufd, TOK_IOMMUFD)
        except errors.KernelError as exc:
            return exc.errno
        return None


@pytest.mark.parametrize("case", ["unsealed", "no-seal-seal", "sealed-after-map", "not-preserved",
                                  "anonymous"])
def test_iommufd_preserve_checks_every_mapping(rig, case):
    """Seals are sampled when the memfd is mapped, the memfd must be in the
    session, and only file mappings are preservable. After each refusal the IOAS
    can be changed again."""
    import errno as E

    memfd = rig.stack.enter_context(MemFD.create("ram", MiB))
    if case == "no-seal-seal":
        from pyiommufd.memfd import Seal
        memfd.add_seals(Seal.GROW | Seal.SHRINK)
    elif case in ("not-preserved", "anonymous"):
        memfd.seal_for_live_update()
    iommufd, device, dev_id, ioas, hwpt, memfd = rig.device_setup(memfd)
    if case == "sealed-after-map":
        memfd.seal_for_live_update()
    if case == "anonymous":
        ioas.map(memoryview(rig.anon)[:4096], IOVA + 16 * MiB)
    if _no_series(rig):
        assert _iommufd_preserve_errno(rig, iommufd, memfd) == E.ENOENT
        return
    hwpt.mark_preserved(TOK_HWPT, abi=rig.caps.lu_abi)
    expected = E.ENOENT if case == "not-preserved" else E.EINVAL
    got = _iommufd_preserve_errno(rig, iommufd, None if case == "not-preserved" else memfd)
    assert got == expected, errors.errname(got)
    ioas.unmap(IOVA, MiB)                                  # mutable again
    ioas.map_file(memfd, 0, MiB, iova=IOVA)


# -- after preserve ---------------------------------------------------------------------------

def _preserved_setup(rig):
    iommufd, device, dev_id, ioas, hwpt, memfd = rig.device_setup()
    hwpt.mark_preserved(TOK_HWPT, abi=rig.caps.lu_abi)
    lu = rig.liveupdate()
    session = rig.stack.enter_context(lu.create_session("preserved"))
    session.preserve(memfd, TOK_MEMFD)
    session.preserve(iommufd, TOK_IOMMUFD)
    return lu, session, iommufd, ioas, memfd


def test_preserved_ioas_and_memfd_are_immutable(rig):
    if _no_series(rig):
        test_preserve_order(rig)    # stock: nothing gets as far as a preserved iommufd
        return
    lu, session, iommufd, ioas, memfd = _preserved_setup(rig)
    spare = rig.stack.enter_context(MemFD.create("spare", MiB))
    spare.seal_for_live_update()
    with pytest.raises(errors.Busy):
        ioas.map(memoryview(rig.anon)[4096:], IOVA + 64 * MiB)
    with pytest.raises(errors.Busy):
        ioas.map_file(spare, 0, MiB, iova=IOVA + 32 * MiB)
    with pytest.raises(errors.Busy):
        ioas.unmap(IOVA, MiB)
    with pytest.raises(errors.PermissionDenied):
        memfd.resize(2 * MiB)                             # LUO froze its size


def test_same_iommufd_again_in_a_session(rig):
    if _no_series(rig):
        test_preserve_order(rig)
        return
    lu, session, iommufd, ioas, memfd = _preserved_setup(rig)
    with pytest.raises(errors.AlreadyExists):
        session.preserve(iommufd, TOK_IOMMUFD)            # the same token
    with pytest.raises(errors.Busy):
        session.preserve(iommufd, TOK_IOMMUFD + 1)        # another token: LUO's EBUSY


def test_closing_the_session_unpreserves(rig):
    iommufd, device, dev_id, ioas, hwpt, memfd = rig.device_setup()
    series = _marked(rig, hwpt)
    lu = rig.liveupdate()
    for _round in range(3):
        with lu.create_session("rounds") as session:
            session.preserve(memfd, TOK_MEMFD)
            if series:
                session.preserve(iommufd, TOK_IOMMUFD)
                with pytest.raises(errors.Busy):
                    ioas.unmap(IOVA, MiB)
        ioas.unmap(IOVA, MiB)                              # closing made it mutable again
        ioas.map_file(memfd, 0, MiB, iova=IOVA)
        memfd.resize(MiB)                                  # and the size unfrozen


def test_kernel_caps_are_consistent(rig):
    """What the probe found agrees with itself: the series brings the ioctl and
    the iommufd handler together, and a vfio-pci handler needs both."""
    caps = probe(vfio_cdev=rig.cdev)
    print(caps.describe())
    assert caps.series == (caps.lu_abi is not None)
    assert caps.series == caps.iommufd_handler
    if caps.vfio_handler:
        assert caps.series
    if rig.name == "fake-series":
        assert caps.lu_status == "lu-v1" and caps.lu_nr == 0x96 and caps.vfio_handler is False
    if rig.name == "fake-stock":
        assert caps.lu_status == "foreign" and caps.lu_nr == 0x95 and caps.vfio_handler is False
    assert os.environ.get(ENV_NR, "0x95") == f"{caps.lu_nr:#x}"
