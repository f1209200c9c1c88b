"""The seed selftest flow (seed-spec 3) on the fake kernel, both stages."""
import errno as E

import pytest

from pyiommufd import pci, selftest
from pyiommufd.luo import LiveUpdate

BDF = "0000:00:03.0"


@pytest.fixture
def vfio_bound():
    def bind():
        pci.PciDevice(BDF).bind_vfio()
    return bind


def names(report):
    return [s.name for s in report.steps]


def test_stock_73_runs_to_the_missing_iommufd_handler(fake_kernel, vfio_bound):
    vfio_bound()
    report = selftest.run(BDF)
    assert report.stage == 1
    assert report.result == "unsupported"
    assert report.lacking == ("kernel lacks an iommufd live-update handler "
                              "(ENOENT from LIVEUPDATE_SESSION_PRESERVE_FD)")
    by_name = {s.name: s for s in report.steps}
    mark = by_name["mark HWPT for preservation"]
    assert mark.status == "SKIP" and "kernel lacks" in mark.detail and "NOIOMMU_GET_PA" in mark.detail
    assert by_name["preserve memfd"].status == "PASS"
    assert report.steps[-1].name == "preserve iommufd" and report.steps[-1].status == "SKIP"
    assert report.steps[-1].errno == E.ENOENT
    assert not any(s.status == "FAIL" for s in report.steps)
    assert report.handles is None
    # everything was released: /dev/liveupdate can be opened again, the session name is free
    with LiveUpdate.open() as lu:
        lu.create_session(selftest.SESSION_NAME).close()


@pytest.mark.parametrize("kernel_fixture, abi", [("series_kernel", "lu-v2"), ("series_kernel_v1", "lu-v1")])
def test_both_stages_pass_through_a_simulated_kexec(request, kernel_fixture, abi, vfio_bound):
    fake = request.getfixturevalue(kernel_fixture)
    vfio_bound()
    seen = []
    stage1 = selftest.run(BDF, on_step=seen.append)
    assert stage1.stage == 1 and stage1.result == "pass", stage1.to_ktap()
    assert stage1.lu_abi == abi
    assert seen == stage1.steps
    expected_failures = [s for s in stage1.steps if "fails" in s.name]
    assert [s.errno for s in expected_failures] == [E.ENOENT, E.ENOENT]
    assert [t for t, _, _ in stage1.handles.files] == [0x890123, 0x123456, 0x654321]

    fake.kexec()
    vfio_bound()
    stage2 = selftest.run(BDF)
    assert stage2.stage == 2 and stage2.result == "pass", stage2.to_ktap()
    errnos = {s.name.split(" (")[0]: s.errno for s in stage2.steps if "fails" in s.name}
    assert errnos == {"retrieve iommufd": E.EOPNOTSUPP,
                      "bind the retrieved cdev to a new iommufd fails": E.EPERM,
                      "finish the session fails": E.EBUSY}


def test_wrong_lu_revision_fails_the_mark_with_a_hint(series_kernel, vfio_bound):
    vfio_bound()
    report = selftest.run(BDF, lu_abi="lu-v1")  # 12 bytes to a 16-byte kernel
    assert report.result == "fail"
    failed = [s for s in report.steps if s.status == "FAIL"]
    assert len(failed) == 1 and failed[0].errno == E.EINVAL
    assert "IOMMU_HWPT_LU_SET_PRESERVE" in failed[0].name


def test_stage1_failure_unpreserves_everything(series_kernel, vfio_bound):
    vfio_bound()
    report = selftest.run(BDF, lu_abi="lu-v1")
    assert report.handles is None
    with LiveUpdate.open() as lu:
        assert lu.try_retrieve_session(selftest.SESSION_NAME) is None
        lu.create_session(selftest.SESSION_NAME).close()


def test_busy_liveupdate_is_a_failed_first_step(series_kernel, vfio_bound):
    vfio_bound()
    with LiveUpdate.open():
        report = selftest.run(BDF)
    assert report.result == "fail" and report.steps[0].errno == E.EBUSY
    assert "exclusive" in report.steps[0].detail


def test_no_liveupdate_device_is_unsupported(vfio_bound):
    from pyiommufd.backend import use
    from pyiommufd.testing import FakeKernel

    with FakeKernel(liveupdate=False) as fake, use(fake):
        vfio_bound()
        report = selftest.run(BDF)
    assert report.result == "unsupported" and "/dev/liveupdate" in report.lacking


def test_ktap_and_json_render_every_step(series_kernel, vfio_bound):
    vfio_bound()
    report = selftest.run(BDF)
    ktap = report.to_ktap().splitlines()
    assert ktap[0] == "KTAP version 1" and ktap[2] == f"1..{len(report.steps)}"
    assert ktap[3] == "ok 1 open /dev/liveupdate"
    assert ktap[-1].startswith("# stage 1: PASS")
    data = report.as_dict()
    assert data["counts"]["PASS"] == len(report.steps) and data["lu_abi"] == "lu-v2"
    report.close()
