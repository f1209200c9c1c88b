"""The LU ABI probe and nr 0x95 on stock 7.3, fake and real alike (seed-spec 2.2)."""
import errno as E

import pytest

from pyiommufd import abi, errors
from pyiommufd.iommufd import IOMMUFD


def test_probe_reports_the_73_occupant_and_selects_nothing(kernel):
    """nr 0x95 is 7.3's NOIOMMU_GET_PA unless this kernel's LU ioctl is there
    (the series as posted); the rebased series moved it to 0x96."""
    with IOMMUFD.open() as iommufd:
        configured = abi.probe_lu_abi(iommufd)          # at $PYIOMMUFD_LU_NR, else 0x95
        result = abi.probe_lu_abi(iommufd, nr=abi.DEFAULT_NR)
        if configured.supported and configured.nr == abi.DEFAULT_NR:
            assert result.status == configured.status and result.supported
            return
        assert result.status == "foreign", result.reason
        assert result.errnos == {16: E.EINVAL}
        assert not result.supported
        with pytest.raises(errors.AbiError, match="kernel lacks"):
            abi.select_lu_abi("probe", iommufd=iommufd, nr=abi.DEFAULT_NR)


@pytest.mark.parametrize("revision", [abi.LU_V1, abi.LU_V2])
def test_a_blind_mark_on_73_is_einval_not_a_noiommu_query(kernel, revision):
    with IOMMUFD.open() as iommufd:
        with pytest.raises(errors.InvalidArgument) as info:
            revision.mark(None, iommufd.fileno(), 1, 1)
        assert "NOIOMMU_GET_PA" in info.value.hint


def test_probe_of_an_empty_slot_is_absent(kernel):
    with IOMMUFD.open() as iommufd:
        result = abi.probe_lu_abi(iommufd, nr=0xEE)
        assert result.status == "absent" and result.errnos == {16: E.ENOTTY}
