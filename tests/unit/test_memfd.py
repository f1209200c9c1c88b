"""pyiommufd.memfd on the fake kernel (whose memfds are real memfds)."""
import pytest

from pyiommufd import errors
from pyiommufd.luo import LiveUpdate
from pyiommufd.memfd import LIVE_UPDATE_SEALS, MemFD, Seal, parse_seals


def test_create_size_and_seals(fake_kernel):
    with MemFD.create("ram", 3 * 4096) as m:
        assert m.size == 3 * 4096 and m.seals == Seal(0)
        assert not m.sealed_for_live_update
        m.seal_for_live_update()
        assert m.sealed_for_live_update and m.seals == LIVE_UPDATE_SEALS
        with pytest.raises(errors.PermissionDenied) as info:
            m.resize(4096)  # F_SEAL_SHRINK
        assert isinstance(info.value, errors.MemfdError)


def test_without_sealing_only_seal_seal_is_set(fake_kernel):
    with MemFD.create("nosealing", 4096, sealing=False) as m:
        assert m.seals == Seal.SEAL
        with pytest.raises(errors.PermissionDenied):
            m.seal_for_live_update()


def test_contents_and_checksum(fake_kernel):
    import hashlib

    data = bytes(range(256)) * 64
    with MemFD.create("data", len(data)) as m:
        assert m.write(data, 0) == len(data)
        assert m.read() == data and m.read(4, 256) == data[256:260]
        assert m.sha256() == hashlib.sha256(data).hexdigest()


def test_hugetlb_memfd_cannot_be_preserved(fake_kernel):
    try:
        huge = MemFD.create("huge", hugetlb=True)
    except errors.KernelError as exc:  # no hugetlbfs on this machine
        pytest.skip(f"memfd_create(MFD_HUGETLB) not available: {exc}")
    with huge, LiveUpdate.open() as lu, lu.create_session("huge") as session:
        with pytest.raises(errors.NotFound):
            session.preserve(huge, 1)


@pytest.mark.parametrize("text, expected", [
    ("seal,grow,shrink", LIVE_UPDATE_SEALS), ("live-update", LIVE_UPDATE_SEALS),
    ("write|future-write", Seal.WRITE | Seal.FUTURE_WRITE), ("", Seal(0)),
])
def test_parse_seals(text, expected):
    assert parse_seals(text) == expected


def test_parse_seals_rejects_unknown_names():
    with pytest.raises(errors.UsageError, match="unknown seal 'glue'"):
        parse_seals("seal,glue")


@pytest.mark.parametrize("size", [-1])
def test_negative_sizes_are_refused(fake_kernel, size):
    with pytest.raises(errors.UsageError):
        MemFD.create("neg", size)
    with MemFD.create("ok") as m, pytest.raises(errors.UsageError):
        m.resize(size)
