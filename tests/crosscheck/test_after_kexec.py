"""After a real kexec, what a session with a memfd (and, where the kernel has
the series' iommufd handler, an iommufd) gives back: the same code on the fake
(stock, and the series as rebased) and, as a two-stage kexec test, on every
real kernel. The series' facts: the memfd comes back whole; its iommufd
cannot be retrieved (EOPNOTSUPP); the session cannot finish (EBUSY)."""
from __future__ import annotations

import pytest

from pyiommufd import backend as backend_mod, errors
from pyiommufd.abi import ENV_NR
from pyiommufd.iommufd import IOMMUFD
from pyiommufd.luo import LiveUpdate
from pyiommufd.memfd import MemFD
from pyiommufd_testing.capabilities import probe

SESSION = "after-kexec"
TOK_MEMFD, TOK_IOMMUFD = 0xA1, 0xA2
DATA = b"preserved across the kexec " * 151


def stage1(lu: LiveUpdate, keep) -> dict:
    """Preserve; return what stage 2 must expect (saved across the kexec)."""
    caps = probe(liveupdate=lu)
    memfd = MemFD.create("after-kexec", 4096 * 2)
    memfd.write(DATA)
    iommufd = IOMMUFD.open()
    session = lu.create_session(SESSION)
    session.preserve(memfd, TOK_MEMFD)
    if caps.iommufd_handler:
        session.preserve(iommufd, TOK_IOMMUFD)
    else:
        with pytest.raises(errors.NotFound):
            session.preserve(iommufd, TOK_IOMMUFD)
    keep(memfd, iommufd, session)
    return {"iommufd_preserved": caps.iommufd_handler}


def stage2(lu: LiveUpdate, expect: dict) -> None:
    session = lu.retrieve_session(SESSION)
    with MemFD.from_fd(session.retrieve(TOK_MEMFD).fd) as memfd:
        assert memfd.read(len(DATA)) == DATA
    if expect["iommufd_preserved"]:
        with pytest.raises(errors.NotSupported):       # the series cannot restore an iommufd
            session.retrieve(TOK_IOMMUFD)
        with pytest.raises(errors.Busy):                # so the session can never finish
            session.finish()
    else:
        with pytest.raises(errors.NotFound):
            session.retrieve(TOK_IOMMUFD)
        session.finish()


@pytest.mark.parametrize("side", [
    pytest.param("fake-stock", marks=pytest.mark.unit),
    pytest.param("fake-series", marks=pytest.mark.unit),
    pytest.param("real", marks=[pytest.mark.vm, pytest.mark.pyiommufd_kexec]),
])
def test_what_a_session_gives_back_after_kexec(side, request, monkeypatch):
    if side == "real":
        lu_stage = request.getfixturevalue("lu_stage")
        if lu_stage.stage == 1:
            lu_stage.save("expect", stage1(lu_stage.liveupdate, lu_stage.keep))
        else:
            stage2(lu_stage.liveupdate, lu_stage.load("expect"))
        return
    from pyiommufd_testing import FakeKernel

    if side == "fake-series":
        fake = FakeKernel(lu_abi="lu-v1", lu_nr=0x96, vfio_lu_handler=False)
        monkeypatch.setenv(ENV_NR, "0x96")
    else:
        fake = FakeKernel()
        monkeypatch.delenv(ENV_NR, raising=False)
    with backend_mod.use(fake):
        kept: list = []
        lu = LiveUpdate.open()
        expect = stage1(lu, lambda *objs: kept.extend(objs))
        assert expect["iommufd_preserved"] == (side == "fake-series")
        fake.kexec()
        with LiveUpdate.open() as lu2:
            stage2(lu2, expect)
    fake.shutdown()
