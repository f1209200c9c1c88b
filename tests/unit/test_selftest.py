"""The series' selftest flow on the fake kernel, both stages."""
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
    handler_step = report.steps[17]
    assert report.stopped_at == 18 and report.as_dict()["stopped_at"] == 18
    assert handler_step.name == "preserve iommufd" and handler_step.status == "SKIP"
    assert handler_step.errno == E.ENOENT and handler_step.detail == report.lacking
    # the plan holds: what the run never reached is reported as not run
    assert [s.name for s in report.steps[18:]] == list(selftest.STAGE1_PLAN[18:])
    assert all(s.status == "SKIP" and s.detail == f"not run: {report.lacking}" for s in report.steps[18:])
    assert {s.reason for s in report.steps[18:]} == {selftest.StepReason.NOT_RUN}
    assert handler_step.reason is selftest.StepReason.KERNEL_LACKS and handler_step.op is selftest.SeedOp.PRESERVE_IOMMUFD
    assert not any(s.status in ("FAIL", "XFAIL") for s in report.steps)
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
    expected_failures = [s for s in stage1.steps if s.status == "XFAIL"]
    assert [(s.name, s.errno) for s in expected_failures] == [
        ("preserve cdev before its iommufd", E.ENOENT), ("preserve iommufd before its memfd", E.ENOENT)]
    assert [t for t, _, _ in stage1.handles.files] == [0x890123, 0x123456, 0x654321]

    fake.kexec()
    vfio_bound()
    stage2 = selftest.run(BDF)
    assert stage2.stage == 2 and stage2.result == "pass", stage2.to_ktap()
    errnos = {s.name.split(" (")[0]: s.errno for s in stage2.steps if s.status == "XFAIL"}
    assert errnos == {"retrieve iommufd": E.EOPNOTSUPP,
                      "bind the retrieved cdev to a new iommufd": E.EPERM,
                      "finish the session": E.EBUSY}
    assert len(stage2.steps) == len(selftest.STAGE2_PLAN)
    # each step says which seed operation it is and why it has its status
    ops = [s.op for s in stage1.steps + stage2.steps if s.op is not None]
    assert sorted(set(ops)) == sorted(selftest.SeedOp) and len(ops) == len(selftest.SeedOp)
    assert {s.reason for s in stage1.steps + stage2.steps if s.status is selftest.StepStatus.XFAIL} == {
        selftest.StepReason.REFUSED_AS_EXPECTED}
    assert {s.reason for s in stage1.steps + stage2.steps if s.status is selftest.StepStatus.PASS} == {
        selftest.StepReason.SUCCEEDED}
    assert stage1.as_dict()["steps"][3]["reason"] == "succeeded"


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
    assert report.steps[0].reason is selftest.StepReason.CANNOT_OPEN


def test_no_liveupdate_device_is_unsupported(vfio_bound):
    from pyiommufd.backend import use
    from pyiommufd_testing import FakeKernel

    with FakeKernel(liveupdate=False) as fake, use(fake):
        vfio_bound()
        report = selftest.run(BDF)
    assert report.result == "unsupported" and "/dev/liveupdate" in report.lacking


def test_ktap_and_json_render_every_step(series_kernel, vfio_bound):
    vfio_bound()
    report = selftest.run(BDF)
    ktap = report.to_ktap().splitlines()
    assert ktap[:2] == ["KTAP version 1", f"1..{len(report.steps)}"]
    assert ktap[3] == "ok 1 open /dev/liveupdate"
    assert ktap[-2].startswith("# stage 1: PASS")
    assert ktap[-1] == "# Totals: pass:22 fail:0 xfail:2 xpass:0 skip:0 error:0"
    data = report.as_dict()
    assert data["counts"] == {"PASS": 22, "XFAIL": 2, "FAIL": 0, "SKIP": 0} and data["lu_abi"] == "lu-v2"
    report.close()


# -- expected failures count only where the kernel has the handler ------------------------------

def test_ordering_checks_are_skipped_without_the_handlers(fake_kernel, vfio_bound):
    """Stock 7.3 answers ENOENT to any iommufd or cdev preserve: no handler.
    That ENOENT must not pass for "the order was enforced"."""
    vfio_bound()
    report = selftest.run(BDF)
    cdev_first, iommufd_first = report.steps[14:16]
    assert (cdev_first.status, cdev_first.errno) == ("SKIP", E.ENOENT)
    assert "no vfio-pci preserve succeeded in this run" in cdev_first.detail
    assert (iommufd_first.status, iommufd_first.errno) == ("SKIP", E.ENOENT)
    assert "this kernel has no iommufd live-update handler (step 18)" in iommufd_first.detail
    assert report.counts()["XFAIL"] == 0


def test_an_ordering_check_counts_once_its_handler_is_shown(series_kernel, vfio_bound):
    """A series kernel without the vfio-pci handler: the iommufd order check is
    an XFAIL (iommufd preserve worked), the cdev one a SKIP."""
    luo = series_kernel.boot.luo
    luo.handlers = [h for h in luo.handlers if h.compatible != "vfio-pci-v1"]
    vfio_bound()
    report = selftest.run(BDF)
    assert report.result == "unsupported" and "vfio-pci live-update handler" in report.lacking
    by_index = {s.index: s for s in report.steps}
    assert by_index[16].status == "XFAIL" and by_index[18].status == "PASS"
    assert by_index[19].status == "SKIP" and by_index[19].errno == E.ENOENT
    assert by_index[15].status == "SKIP"
    assert "no vfio-pci live-update handler (step 19)" in by_index[15].detail


def test_ordering_checks_are_reported_in_order_once_settled(series_kernel, vfio_bound):
    vfio_bound()
    seen, plans = [], []
    report = selftest.run(BDF, on_step=lambda s: seen.append((s.index, s.status)),
                          on_plan=lambda n: plans.append((n, len(seen))))
    assert plans == [(24, 0)]                      # the plan comes before any step
    assert [i for i, _ in seen] == list(range(1, 25))
    assert seen[14] == (15, "XFAIL") and seen[15] == (16, "XFAIL")
    report.close()


def test_a_run_stopped_before_the_stage_is_known_plans_what_it_did(vfio_bound):
    from pyiommufd.backend import use
    from pyiommufd_testing import FakeKernel

    with FakeKernel(liveupdate=False) as fake, use(fake):
        vfio_bound()
        plans = []
        report = selftest.run(BDF, on_plan=plans.append)
    assert plans == [1] and len(report.steps) == 1 and report.stage == 0
