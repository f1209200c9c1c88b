"""pyiommufd.vm.seedflow on the host: step names of both programs, outcomes,
the records a guest stage prints, and the VM job it builds."""
from __future__ import annotations

import errno as E
import json
from types import SimpleNamespace

import pytest

from pyiommufd.vm import runner, seedflow

STAGE1_REPORT = {"stage": 1, "result": "pass", "after": "kexec", "counts": {"PASS": 1}, "steps": [
    {"index": 1, "name": "bind the cdev to an iommufd", "status": "PASS", "errno": None,
     "detail": "", "op": "bind"}]}

# A C test shaped like patch 14's (our own text): asserts after each call, the
# early preserves that must fail, then the real ones, then a second session.
C_SOURCE = """\
int setup(int iommufd, int cdev_fd)
{
\tret = ioctl(cdev_fd, VFIO_DEVICE_BIND_IOMMUFD, &bind);
\tksft_assert(!ret);
\tret = ioctl(iommufd, IOMMU_IOAS_ALLOC, &alloc);
\tksft_assert(!ret);
\tret = ioctl(iommufd, IOMMU_HWPT_LU_SET_PRESERVE, &mark);
\tksft_assert(!ret);
}
int main(void)
{
\tret = luo_session_preserve_fd(session, cdev_fd, cdev_token);
\tksft_assert(ret);
\tret = luo_session_preserve_fd(session, iommufd, token);
\tksft_assert(ret);
\tret = luo_session_preserve_fd(session, memfd, memfd_token);
\tksft_assert(!ret);
\tret = luo_session_preserve_fd(session, iommufd, token);
\tksft_assert(!ret);
\tret = luo_session_preserve_fd(session, cdev_fd, cdev_token);
\tksft_assert(!ret);
\tret = luo_session_preserve_fd(session, memfd, memfd_token);
\tksft_assert(!ret);
\tret = luo_session_preserve_fd(session, iommufd, token);
\tksft_assert(!ret);
\tret = luo_session_preserve_fd(session, cdev_fd, cdev_token);
\tksft_assert(!ret);
\tcdev_fd = luo_session_retrieve_fd(session, cdev_token);
\tksft_assert(cdev_fd > 0);
\tiommufd = luo_session_retrieve_fd(session, token);
\tksft_assert(iommufd < 0);
\tret = luo_session_finish(session);
\tksft_assert(ret);
}
"""


def test_c_asserts_map_to_the_operation_before_them():
    steps = seedflow.c_assert_steps(C_SOURCE)
    assert [steps[n] for n in sorted(steps)] == [
        "bind", "ioas_alloc", "mark",
        "preserve_cdev_first", "preserve_iommufd_first", "preserve_memfd", "preserve_iommufd",
        "preserve_cdev", "preserve_memfd_again", "preserve_iommufd_again", "preserve_cdev_again",
        "retrieve_cdev", "retrieve_iommufd", "finish"]


def test_the_c_asserts_map_to_seed_operations_pyiommufd_names_too():
    from pyiommufd.selftest import SeedOp

    assert set(seedflow.c_assert_steps(C_SOURCE).values()) <= {op.value for op in SeedOp}


def test_c_outcome_reads_bail_out_lines():
    line = sorted(n for n, op in seedflow.c_assert_steps(C_SOURCE).items() if op == "preserve_cdev")[0]
    out = ("# [STAGE 1] ...\n"
           f"Bail out! Failed: !ret at iommufd_liveupdate.c {line}: No such file or directory\n")
    got = seedflow.c_outcome(out, 1, 1, C_SOURCE)
    assert (got.passed, got.first_failure, got.errno) == (False, "preserve_cdev", E.ENOENT)
    assert seedflow.c_outcome("", 0, 2, C_SOURCE).passed


def test_python_outcome_is_the_first_step_that_did_not_pass():
    report = {"stage": 1, "result": "unsupported", "steps": [
        {"name": "preserve memfd", "status": "PASS", "errno": None, "detail": "", "op": "preserve_memfd"},
        {"name": "preserve cdev", "status": "SKIP", "errno": E.ENOENT, "reason": "kernel-lacks",
         "detail": "kernel lacks a vfio-pci live-update handler", "op": "preserve_cdev"}]}
    got = seedflow.python_outcome(report, 4)
    assert (got.passed, got.first_failure, got.errno, got.exit) == (False, "preserve_cdev", E.ENOENT, 4)
    report = {"stage": 2, "result": "pass", "steps": [
        {"name": "retrieve cdev (token 0x1)", "status": "PASS", "errno": None, "detail": "", "op": "retrieve_cdev"}]}
    assert seedflow.python_outcome(report, 0).passed


def test_records_round_trip(capsys):
    seedflow.emit("stage", stage=1, exit=None, passed=True, first_failure=None, errno=None)
    seedflow.emit("non-vfio-bind", driver="pci-pf-stub", result="EBUSY", errno=E.EBUSY)
    seedflow.emit("stage", stage=2, exit=0, passed=True, first_failure=None, errno=None)
    text = "noise\n" + capsys.readouterr().out + "# seedflow {broken\n"
    res = seedflow.result_from_records("c", "7.3.4 + x.patch", seedflow.parse_records(text))
    assert [(s.stage, s.passed) for s in res.stages] == [(1, True), (2, True)]
    assert res.non_vfio_bind_errno == E.EBUSY
    assert res.describe() == ("c: stage 1: pass; pci-pf-stub bind after kexec: EBUSY; stage 2: pass")


def test_a_stage_1_that_kexecd_without_a_report_is_missing_not_passed(capsys, tmp_path):
    """Only stage 1's report says it passed; its kexec alone says nothing of
    its steps, so a lost report shows as a missing stage 1."""
    seedflow.emit("stage", stage=2, exit=0, passed=True, first_failure=None, errno=None)
    stage2_log = tmp_path / "stage-2.log"
    stage2_log.write_text(capsys.readouterr().out)
    vm = SimpleNamespace(stages=[runner.StageResult(1, [], "kexec"),
                                 runner.StageResult(2, [], "exit", 0, log=stage2_log)])
    res = seedflow.collect("pyiommufd", "standin", vm)
    assert res.stage(1) is None
    assert [(s.stage, s.passed) for s in res.stages] == [(2, True)]


def test_the_job_kexecs_from_the_holder_for_pyiommufd_and_from_the_agent_for_c():
    py = seedflow.job("pyiommufd", python="/usr/bin/python3")
    c = seedflow.job("c", python="/usr/bin/python3", c_selftest="/k/iommufd_liveupdate",
                     env={"PYIOMMUFD_LU_NR": "0x96"})
    assert [s.kexec for s in py.stages] == ["self", "none"]
    assert [s.kexec for s in c.stages] == ["agent", "none"]
    assert all(s.needs_kexec for s in c.stages[1:])
    assert c.stages[0].env == {seedflow.ENV_C_SELFTEST: "/k/iommufd_liveupdate"}
    assert c.env == {"PYIOMMUFD_LU_NR": "0x96"}
    assert json.dumps(c.to_json())        # what the guest agent reads
    assert "--program" in c.stages[1].argv and c.stages[1].argv[-1] == "2"


def test_stage_2_renders_the_report_stage_1_wrote_before_its_kexec(capsys, monkeypatch, tmp_path):
    """Stage 1 kexecs from the selftest's own process, so its parent never
    renders its report: stage 2 renders it from the --report file."""
    from pyiommufd.vm import guest

    monkeypatch.setenv(guest.ENV_RESULTS, str(tmp_path))
    (tmp_path / "selftest-stage-1.json").write_text(json.dumps(STAGE1_REPORT))
    said = []
    seedflow._render_stage1_report(said.append)
    records = seedflow.parse_records(capsys.readouterr().out)
    assert [(r["stage"], r["passed"]) for r in records if r["event"] == "stage"] == [(1, True)]
    assert any(line.startswith("ok 1 ") for line in said), said


def test_stage_2_says_when_stage_1_left_no_report(capsys, monkeypatch, tmp_path):
    from pyiommufd.vm import guest

    monkeypatch.setenv(guest.ENV_RESULTS, str(tmp_path))
    said = []
    seedflow._render_stage1_report(said.append)
    assert said == [f"# stage 1 left no report ({tmp_path / 'selftest-stage-1.json'})"]
    assert seedflow.parse_records(capsys.readouterr().out) == []


def test_stage_2_renders_stage_1s_report_before_it_touches_the_device(capsys, monkeypatch, tmp_path):
    """A stage 2 that fails at its first step still shows stage 1's report."""
    from pyiommufd.vm import guest

    monkeypatch.setenv(guest.ENV_RESULTS, str(tmp_path))
    (tmp_path / "selftest-stage-1.json").write_text(json.dumps(STAGE1_REPORT))

    def device_gone(bdf):
        raise OSError(E.ENODEV, "no such device")

    monkeypatch.setattr(seedflow, "try_non_vfio_bind", device_gone)
    with pytest.raises(OSError):
        seedflow.guest_stage(2, "pyiommufd", "0000:00:03.0", session="iommufd-test", lu_abi=None,
                             argv0=["pyiommufd"], kexec_kernel=None, initrd=None, c_selftest=None,
                             say=lambda line: None)
    records = seedflow.parse_records(capsys.readouterr().out)
    assert [(r["stage"], r["passed"]) for r in records if r["event"] == "stage"] == [(1, True)]
