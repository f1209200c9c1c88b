"""The kernel's own KTAP reader, ``tools/testing/kunit/kunit_parser.py`` of
the Linux 7.3 tree the VM tier unpacks, parses ``pyiommufd selftest``'s
output (from the fake kernel) with 0 errors and the right counts.

kunit_parser knows SKIP but not XFAIL: an XFAIL line is an ``ok`` with a
directive, so it counts as passed there.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from pyiommufd import agent
from pyiommufd_testing import SimulatedKexec

from cli_support import run_cli

BDF = "0000:00:03.0"

PARSE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import kunit_parser, kunit_printer
test = kunit_parser.parse_run_tests(sys.stdin.read().splitlines(), kunit_printer.Printer(print=False))
c = test.counts
print(json.dumps({"status": test.status.name, "expected": test.expected_count,
                  "passed": c.passed, "failed": c.failed, "crashed": c.crashed,
                  "skipped": c.skipped, "errors": c.errors,
                  "names": [t.name for t in test.subtests]}))
"""


@pytest.fixture(scope="module")
def kunit_dir() -> str:
    from pyiommufd.vm import debian

    try:
        tree = debian.kernel_source_tree()
    except Exception as exc:  # noqa: BLE001 - any reason means: no parser to run
        reason = (f"cannot obtain the Linux 7.3 tree with kunit_parser.py "
                  f"(linux-source-7.3 {debian.LINUX_PACKAGE_VERSION}): {type(exc).__name__}: {exc}")
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    path = tree / "tools" / "testing" / "kunit"
    assert (path / "kunit_parser.py").is_file(), path
    return str(path)


@pytest.fixture(autouse=True)
def cli_env(monkeypatch, tmp_path):
    sockdir = tempfile.mkdtemp(prefix="pyiommufd-k", dir="/tmp")  # AF_UNIX paths are short
    sock = os.path.join(sockdir, "agent.sock")
    monkeypatch.setenv("PYIOMMUFD_AGENT_SOCKET", sock)
    monkeypatch.setenv("PYIOMMUFD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("PYIOMMUFD_LU_ABI", raising=False)
    monkeypatch.delenv("PYIOMMUFD_LU_NR", raising=False)
    yield
    server = agent.in_process_agents().get(sock)
    if server is not None:
        server.shutdown(release=False)
    shutil.rmtree(sockdir, ignore_errors=True)


def kunit_parse(kunit_dir: str, ktap: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PARSE, kunit_dir], input=ktap,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def selftest_output(capsys, *args: str, code: int) -> str:
    assert run_cli(capsys, "bind", BDF).code == 0
    r = run_cli(capsys, "selftest", BDF, *args)
    assert r.code == code, (r.out, r.err)
    return r.out


def test_stock_73_output(kunit_dir, fake_kernel, capsys):
    out = selftest_output(capsys, code=4)
    parsed = kunit_parse(kunit_dir, out)
    assert parsed["errors"] == 0, out
    assert (parsed["expected"], parsed["passed"], parsed["failed"], parsed["skipped"]) == (24, 14, 0, 10)
    assert parsed["crashed"] == 0 and parsed["status"] == "SUCCESS"
    assert parsed["names"][14] == "preserve cdev before its iommufd"


def test_series_stage1_and_stage2_output(kunit_dir, series_kernel, capsys):
    stage1 = selftest_output(capsys, "--no-hold", code=0)
    parsed = kunit_parse(kunit_dir, stage1)
    assert parsed["errors"] == 0, stage1
    assert (parsed["expected"], parsed["passed"], parsed["failed"], parsed["skipped"]) == (24, 24, 0, 0)

    assert run_cli(capsys, "bind", BDF).code == 0
    with pytest.raises(SimulatedKexec):
        run_cli(capsys, "selftest", BDF, "--kexec", "/boot/vmlinuz-7.3.4")
    capsys.readouterr()
    stage2 = selftest_output(capsys, code=0)
    parsed = kunit_parse(kunit_dir, stage2)
    assert parsed["errors"] == 0, stage2
    assert (parsed["expected"], parsed["passed"], parsed["failed"], parsed["skipped"]) == (7, 7, 0, 0)


def test_failed_run_output(kunit_dir, series_kernel, capsys):
    """lu-v1's struct on an lu-v2 kernel: step 14 fails, the rest is not run."""
    out = selftest_output(capsys, "--lu-abi", "v1", "--no-hold", code=1)
    parsed = kunit_parse(kunit_dir, out)
    assert parsed["errors"] == 0, out
    assert (parsed["expected"], parsed["passed"], parsed["failed"], parsed["skipped"]) == (24, 13, 1, 10)
    assert parsed["status"] == "FAILURE"


def test_the_parser_finds_errors_in_what_we_used_to_print(kunit_dir):
    """The check has teeth: the old layout (plan after the results, a line
    without '#') is an error for kunit_parser."""
    old = "KTAP version 1\n# comment\nok 1 a\nok 2 b\n1..2\n[STAGE 1] text\n"
    assert kunit_parse(kunit_dir, old)["errors"] > 0
