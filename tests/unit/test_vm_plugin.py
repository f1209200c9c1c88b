"""The pyiommufd_vm pytest plugin, driven through pytester with the simulated
"local" machine (the guest pytest runs as a host process; the kexec is
simulated), plus the cases where the VM tier cannot run."""
from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

TESTS = '''
import os, pytest

@pytest.mark.pyiommufd_vm
def test_pass():
    print("hello from guest")
    assert os.environ["PYIOMMUFD_IN_GUEST"] == "1"

@pytest.mark.pyiommufd_vm
def test_fail():
    x = 3
    assert x == 4

@pytest.mark.pyiommufd_vm
def test_skip():
    pytest.skip("not today")

@pytest.mark.pyiommufd_vm
def test_warns():
    import warnings
    warnings.warn(UserWarning("careful in the guest"))

def test_host():
    assert "PYIOMMUFD_IN_GUEST" not in os.environ

@pytest.mark.pyiommufd_kexec
def test_two_stages(lu_stage):
    if lu_stage.stage == 1:
        lu_stage.save("answer", {"x": 42})
        lu_stage.keep(object())
        return
    assert lu_stage.load("answer") == {"x": 42}
    assert lu_stage.load("nothing", None) is None

@pytest.mark.pyiommufd_kexec
def test_stage2_fails(lu_stage):
    assert lu_stage.stage == 1

@pytest.mark.pyiommufd_kexec
def test_stage1_fails(lu_stage):
    assert lu_stage.stage == 2
'''


@pytest.fixture
def vm_pytester(pytester, tmp_path, monkeypatch):
    monkeypatch.setenv("PYIOMMUFD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("PYIOMMUFD_IN_GUEST", raising=False)
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider -p pyiommufd_testing.pytest_plugin\n")
    return pytester


def _run(pytester, *args):
    return pytester.runpytest_subprocess("--vm-machine", "local", "-rA", *args, timeout=180)


def test_outcomes_come_from_the_guest(vm_pytester):
    vm_pytester.makepyfile(test_a=TESTS)
    result = _run(vm_pytester)
    result.assert_outcomes(passed=4, failed=3, skipped=1, warnings=None)
    out = result.stdout.str()
    # guest traceback and captured output reach the host report
    assert "assert 3 == 4" in out and "hello from guest" in out
    result.stdout.fnmatch_lines([
        "*= VM tier =*",
        "[[]vm *[]] test_a.py::test_pass PASSED",
        "[[]vm *[]] test_a.py::test_fail FAILED",
        "[[]vm *[]] test_a.py::test_skip SKIPPED",
        "[[]vm * -> kexec -> *[]] test_a.py::test_two_stages PASSED (stage 1 PASSED, stage 2 PASSED)",
        "[[]vm * -> kexec -> *[]] test_a.py::test_stage2_fails FAILED (stage 1 PASSED, stage 2 FAILED)",
        "[[]vm *[]] test_a.py::test_stage1_fails FAILED (stage 1 FAILED; stage 2 skipped)",
        "VM tier on kernel stock (pristine 7.3.4): 7 of 7 vm test(s) ran in the guest on Linux * "
        "(2 boot(s), 1 kexec(s)*",
    ])
    result.stdout.fnmatch_lines(["[[]vm stock[]] guest warning (stage 1) test_a.py::test_warns: "
                                 "UserWarning: careful in the guest (*test_a.py:*)"])
    assert "SKIPPED [1] test_a.py:15: not today" in out
    assert "VM problems" not in out          # pytest's exit 1 is not a VM problem
    # every vm report carries the kernel release
    assert "ran in the VM on kernel stock, Linux" in out


def test_no_kexec_tests_means_one_stage(vm_pytester):
    vm_pytester.makepyfile(test_b='''
        import pytest
        @pytest.mark.pyiommufd_vm
        def test_one():
            pass
    ''')
    result = _run(vm_pytester)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["VM tier on kernel stock (pristine 7.3.4): 1 of 1 vm test(s) ran in the guest on Linux * "
                                 "(1 boot(s), 0 kexec(s)*"])


def test_no_vm_tests_means_no_vm(vm_pytester):
    vm_pytester.makepyfile(test_c="def test_host():\n    pass\n")
    result = _run(vm_pytester)
    result.assert_outcomes(passed=1)
    assert "VM tier" not in result.stdout.str()
    assert "[vm" not in result.stdout.str()


def test_no_vm_option_deselects_loudly(vm_pytester):
    vm_pytester.makepyfile(test_a=TESTS)
    result = _run(vm_pytester, "--no-vm")
    result.assert_outcomes(passed=1, deselected=7)
    result.stdout.fnmatch_lines(["*VM tier NOT run: --no-vm deselected 7 vm test(s)*"])


def test_unavailable_vm_skips_outside_ci(vm_pytester):
    vm_pytester.makepyfile(test_a=TESTS)
    result = vm_pytester.runpytest_subprocess("--vm-kernel", "/nonexistent/bzImage", "-rs",
                                              timeout=120)
    result.assert_outcomes(passed=1, skipped=7)
    result.stdout.fnmatch_lines([
        "*VM tier did NOT run on kernel user: *",
        "7 vm test(s) SKIPPED.",
    ])
    assert "VM tier did not run:" in result.stdout.str()   # the skip reason


def test_unavailable_vm_fails_in_ci(vm_pytester, monkeypatch):
    monkeypatch.setenv("CI", "true")
    vm_pytester.makepyfile(test_a=TESTS)
    result = vm_pytester.runpytest_subprocess("--vm-kernel", "/nonexistent/bzImage",
                                              timeout=120)
    result.assert_outcomes(passed=1, failed=7)
    result.stdout.fnmatch_lines(["*VM tier did NOT run on kernel user: *", "7 vm test(s) FAILED (CI=true)."])


def test_host_fixtures_are_torn_down_around_vm_items(vm_pytester):
    vm_pytester.makepyfile(test_d='''
        import pytest
        @pytest.fixture(scope="module")
        def res():
            yield 1
        def test_host_a(res):
            pass
        @pytest.mark.pyiommufd_vm
        def test_vm():
            pass
    ''', test_e='''
        def test_host_b():
            pass
    ''')
    result = _run(vm_pytester, "-p", "no:randomly")
    result.assert_outcomes(passed=3)


def test_lu_stage_outside_the_vm(pytester, monkeypatch):
    monkeypatch.delenv("PYIOMMUFD_IN_GUEST", raising=False)
    pytester.makepyfile(test_f='''
        import pytest
        def test_plain(lu_stage):
            pass
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "pyiommufd_testing.pytest_plugin", timeout=60)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*lu_stage fixture is for @pytest.mark.pyiommufd_kexec tests only*"])


def test_guest_side_reorders_kexec_tests_last(pytester, tmp_path, monkeypatch):
    share = tmp_path / "share"
    share.mkdir()
    monkeypatch.setenv("PYIOMMUFD_IN_GUEST", "1")
    monkeypatch.setenv("PYIOMMUFD_VM_RESULTS", str(share))
    monkeypatch.setenv("PYIOMMUFD_VM_PYTEST_REPORT", "pytest-1.jsonl")
    monkeypatch.setenv("PYIOMMUFD_LU_STAGE", "1")
    monkeypatch.setenv("PYIOMMUFD_VM_SIMULATE", "1")
    monkeypatch.delenv("PYIOMMUFD_VM_KERNEL", raising=False)
    pytester.makepyfile(test_g='''
        import pytest
        @pytest.mark.pyiommufd_kexec
        def test_k(lu_stage):
            assert lu_stage.stage == 1
        @pytest.mark.pyiommufd_vm
        def test_v():
            pass
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "pyiommufd_testing.pytest_plugin", "-v", timeout=60)
    out = result.stdout.str()
    assert out.index("test_g.py::test_v") < out.index("test_g.py::test_k")
    lines = (share / "pytest-1.jsonl").read_text().splitlines()
    import json
    recs = [json.loads(line) for line in lines]
    assert recs[0]["kind"] == "collected" and recs[0]["nodeids"] == ["test_g.py::test_v",
                                                                     "test_g.py::test_k"]
    assert {r["report"]["nodeid"] for r in recs if r["kind"] == "test"} == {
        "test_g.py::test_v", "test_g.py::test_k"}
    pending = json.loads((share / "kexec-pending.json").read_text())
    assert pending["nodeids"] == ["test_g.py::test_k"]
    # no kernel to kexec into outside the runner: the failure is recorded
    assert "PYIOMMUFD_VM_KERNEL" in (share / "kexec-error.txt").read_text()


def test_heavy_plugins_load_in_the_guest_only_when_needed(pytester):
    from pyiommufd_testing import pytest_plugin as plug

    pytester.makepyfile(test_h='''
        import pytest
        from hypothesis import given, strategies as st
        @pytest.mark.pyiommufd_vm
        def test_plain():
            pass
        @pytest.mark.pyiommufd_vm
        @given(st.integers())
        def test_prop(x):
            pass
    ''')
    items, _ = pytester.inline_genitems("-p", "no:cacheprovider")
    by_name = {it.name: it for it in items}
    assert plug._uses_hypothesis(by_name["test_prop"])
    assert not plug._uses_hypothesis(by_name["test_plain"])
    assert plug._uses_fixture("tmp_path")(by_name["test_plain"]) is False


def _ini(pytester, kernels: str) -> None:
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider -p pyiommufd_testing.pytest_plugin\n"
                     f"pyiommufd_vm_kernels =\n{kernels}")


ONE_VM_TEST = '''
import pytest
@pytest.mark.pyiommufd_vm
def test_one():
    pass
'''


def test_every_vm_test_runs_on_every_listed_kernel(vm_pytester):
    # a "patched" kernel whose patch exists; the local machine ignores the kernel itself
    vm_pytester.makefile(".patch", fix="--- a/x\n+++ b/x\n")
    _ini(vm_pytester, "    stock\n    patched fix.patch PYIOMMUFD_LU_NR=0x96\n")
    vm_pytester.makepyfile(test_k='''
import os, pytest
@pytest.mark.pyiommufd_vm
def test_env():
    if os.environ["PYIOMMUFD_VM_TARGET"] == "patched":
        assert os.environ["PYIOMMUFD_LU_NR"] == "0x96"
    else:
        assert "PYIOMMUFD_LU_NR" not in os.environ
@pytest.mark.pyiommufd_kexec
def test_k(lu_stage):
    pass
''')
    result = _run(vm_pytester)
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines([
        "*= VM tier =*",
        "kernels: stock (pristine 7.3.4); patched (7.3.4 + fix.patch)",
        "[[]vm stock *[]] test_k.py::test_env PASSED",
        "*test_k.py::test_k PASSED*",
        "VM tier on kernel stock (pristine 7.3.4): 2 of 2 vm test(s) ran*",
        "[[]vm patched *[]] test_k.py::test_env@patched PASSED",
        "*test_k.py::test_k@patched PASSED*",
        "VM tier on kernel patched (7.3.4 + fix.patch): 2 of 2 vm test(s) ran*",
    ])


def test_a_kernel_whose_patch_is_missing_is_skipped_loudly(vm_pytester):
    _ini(vm_pytester, "    stock\n    series ../nowhere/series.patch\n")
    vm_pytester.makepyfile(test_m=ONE_VM_TEST)
    result = _run(vm_pytester)
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines([
        "*VM tier did NOT run on kernel series: kernel series: patch ../nowhere/series.patch "
        "not found*",
        "1 vm test(s) SKIPPED.",
    ])


def test_a_missing_patch_fails_in_ci(vm_pytester, monkeypatch):
    monkeypatch.setenv("CI", "true")
    _ini(vm_pytester, "    stock\n    series ../nowhere/series.patch\n")
    vm_pytester.makepyfile(test_m=ONE_VM_TEST)
    result = _run(vm_pytester)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["1 vm test(s) FAILED (CI=true)."])


def test_vm_kernels_option_selects_and_rejects_names(vm_pytester):
    vm_pytester.makefile(".patch", fix="--- a/x\n+++ b/x\n")
    _ini(vm_pytester, "    stock\n    patched fix.patch\n")
    vm_pytester.makepyfile(test_s=ONE_VM_TEST)
    result = _run(vm_pytester, "--vm-kernels", "patched")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["kernels: patched (7.3.4 + fix.patch)"])
    bad = _run(vm_pytester, "--vm-kernels", "nope")
    assert bad.ret != 0
    bad.stderr.fnmatch_lines(["*--vm-kernels: unknown kernel(s) nope; pyiommufd_vm_kernels has "
                              "stock, patched*"])


def test_another_projects_vm_marker_boots_nothing(vm_pytester):
    vm_pytester.makepyfile(test_other='''
import pytest
@pytest.mark.vm
def test_theirs():
    pass
''')
    vm_pytester.makeini("[pytest]\naddopts = -p no:cacheprovider -p pyiommufd_testing.pytest_plugin\n"
                        "markers = vm: their own marker\n")
    result = vm_pytester.runpytest_subprocess("-rA", "--vm-kernel", "/nonexistent/bzImage",
                                              timeout=60)
    result.assert_outcomes(passed=1)
    assert "VM tier" not in result.stdout.str()


def test_the_plugin_is_not_loaded_unless_asked_for(pytester):
    pytester.makepyfile(test_p='''
def test_plugin_absent(pytestconfig):
    assert not pytestconfig.pluginmanager.has_plugin("pyiommufd_testing.pytest_plugin")
''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("form", [["--vm-kernel", "{k}"], ["--vm-kernel={k}"]])
def test_vm_kernel_takes_its_value_in_both_forms(vm_pytester, form):
    """The two-word form must not make pytest collect the bzImage as a test path."""
    kernel_file = vm_pytester.path / "bzImage-not-a-test"
    kernel_file.write_bytes(b"\0" * 64)
    vm_pytester.makepyfile(test_only='''
import pytest
@pytest.mark.pyiommufd_vm
def test_in_vm():
    pass
def test_on_host():
    pass
''')
    args = [a.format(k=kernel_file) for a in form]
    result = vm_pytester.runpytest_subprocess(*args, "test_only.py", "-rs", timeout=120)
    result.assert_outcomes(passed=1, skipped=1)
    assert "ERROR: file or directory not found" not in result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["kernels: user (*bzImage-not-a-test)"])


def test_a_guest_tests_vm_summary_section_is_in_the_vm_tier_summary(vm_pytester):
    vm_pytester.makepyfile(test_s='''
        import pytest
        from pyiommufd_testing.pytest_plugin import SUMMARY_SECTION

        @pytest.mark.pyiommufd_vm
        def test_table(request):
            request.node.add_report_section("call", SUMMARY_SECTION, "flows x points: 7 x 42")

        @pytest.mark.pyiommufd_kexec
        def test_both_stages(lu_stage, request):
            request.node.add_report_section("call", SUMMARY_SECTION, f"table of stage {lu_stage.stage}")

        @pytest.mark.pyiommufd_vm
        def test_other(request):
            request.node.add_report_section("call", "not a summary", "kept out of the summary")
    ''')
    result = _run(vm_pytester)
    result.assert_outcomes(passed=3)
    summary = result.stdout.str().split("VM tier ====")[-1]
    assert "flows x points: 7 x 42" in summary
    assert "stage 1: table of stage 1" in summary and "table of stage 2" in summary
    assert "kept out of the summary" not in summary
