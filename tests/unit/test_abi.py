"""LU ABI revisions: explicit selection, nr override, token widths."""
import pytest

from pyiommufd import abi
from pyiommufd.errors import UsageError


def test_revisions_have_the_series_layouts():
    assert abi.LU_V1.size == 12 and abi.LU_V1.token_bits == 32
    assert abi.LU_V2.size == 16 and abi.LU_V2.token_bits == 64
    assert abi.LU_V1.request == abi.LU_V2.request == 0x3B95


@pytest.mark.parametrize("name, expected", [("v1", "lu-v1"), ("lu-v2", "lu-v2"), ("V2", "lu-v2"),
                                            ("mark", "lu-v2"), ("set", "lu-v1")])
def test_lookup_accepts_aliases(name, expected):
    assert abi.lookup(name).name == expected


def test_unknown_revision_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown LU ABI revision 'v9'"):
        abi.select_lu_abi("v9")


def test_nr_override_moves_the_request(monkeypatch):
    monkeypatch.setenv("PYIOMMUFD_LU_NR", "0x96")
    selected = abi.select_lu_abi("v2")
    assert selected.nr == 0x96 and selected.request == 0x3B96


@pytest.mark.parametrize("text", ["0x100", "-1", "banana"])
def test_bad_nr_is_rejected(text):
    with pytest.raises(UsageError):
        abi.parse_nr(text)


def test_v1_tokens_are_u32():
    abi.LU_V1.check_token(0xFFFFFFFF)
    with pytest.raises(UsageError, match="0xffffffff"):
        abi.LU_V1.check_token(1 << 32)
    abi.LU_V2.check_token((1 << 64) - 1)
    with pytest.raises(UsageError):
        abi.LU_V2.check_token(-1)


# -- the probe against the fake kernel, each kernel flavour ---------------------------------
import errno as E  # noqa: E402

from pyiommufd.backend import use  # noqa: E402
from pyiommufd.iommufd import IOMMUFD  # noqa: E402
from pyiommufd_testing import FakeKernel  # noqa: E402


@pytest.mark.parametrize("flavour, nr, status, errnos", [
    (None, None, "foreign", {16: E.EINVAL}),
    ("lu-v1", None, "lu-v1", {16: E.ENOENT, 12: E.ENOENT}),
    ("lu-v2", None, "lu-v2", {16: E.ENOENT, 12: E.EINVAL}),
    ("lu-v2", 0x96, "lu-v2", {16: E.ENOENT, 12: E.EINVAL}),   # a rebased series on a new nr
])
def test_probe_classifies_each_kernel(flavour, nr, status, errnos):
    with FakeKernel(lu_abi=flavour, lu_nr=nr or 0x95) as fake, use(fake), IOMMUFD.open() as iommufd:
        result = abi.probe_lu_abi(iommufd, nr=nr)
        assert (result.status, result.errnos) == (status, errnos), result.reason
        if result.supported:
            assert abi.select_lu_abi("probe", iommufd=iommufd, nr=nr) == result.abi
            assert result.abi.nr == (nr or 0x95)


def test_probe_on_a_moved_series_sees_nothing_at_0x95():
    with FakeKernel(lu_abi="lu-v2", lu_nr=0x96) as fake, use(fake), IOMMUFD.open() as iommufd:
        # 7.3's NOIOMMU_GET_PA still owns 0x95 there
        assert abi.probe_lu_abi(iommufd).status == "foreign"


def test_probe_never_runs_noiommu_get_pa():
    # the size-16 probe must stop at the size check of the 40-byte ioctl
    with FakeKernel() as fake, use(fake), IOMMUFD.open() as iommufd:
        calls = []
        real_ioctl = fake.ioctl

        def spy(fd, request, buf):
            calls.append((request, int.from_bytes(bytes(buf)[:4], "little")))
            return real_ioctl(fd, request, buf)

        fake.ioctl = spy
        abi.probe_lu_abi(iommufd)
        assert calls == [(0x3B95, 16)]

