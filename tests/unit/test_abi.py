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


def test_env_selects_revision(monkeypatch):
    monkeypatch.setenv("PYIOMMUFD_LU_ABI", "lu-v1")
    assert abi.select_lu_abi(None) is abi.LU_V1


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
