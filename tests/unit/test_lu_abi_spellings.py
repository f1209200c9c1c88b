"""One set of LU ABI spellings everywhere (issue 17): every spelling works in
every command that takes ``--lu-abi`` (plan, preserve, selftest, vm selftest),
in a plan file, in ``$PYIOMMUFD_LU_ABI`` and in Python's ``abi=``; a bad
spelling is refused by each with exit 2 and one error line."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest

from pyiommufd import abi, agent
from pyiommufd.backend import use
from pyiommufd.errors import UsageError
from pyiommufd.iommufd import IOMMUFD
from pyiommufd_testing import FakeKernel, FakePciDevice

import cli_support

CDEV = "/dev/vfio/devices/vfio0"
# written out, not taken from abi.SPELLINGS: dropping a spelling there must fail here
EXPECTED = {"lu-v1": "lu-v1", "v1": "lu-v1", "set": "lu-v1",
            "lu-v2": "lu-v2", "v2": "lu-v2", "mark": "lu-v2", "probe": "probe",
            "LU-V1": "lu-v1", "Mark": "lu-v2", "SET": "lu-v1", "PROBE": "probe"}
SPELLINGS = list(EXPECTED)
BAD = "lu-v9"


def kernel_for(expected: str) -> str:
    """The flavour that answers the spelling's revision; a probe finds lu-v1,
    which is not what an unprobed default would be."""
    return "lu-v1" if expected == "probe" else expected


@pytest.fixture
def env(monkeypatch, tmp_path):
    sockdir = tempfile.mkdtemp(prefix="pyiommufd-t", dir="/tmp")
    sock = os.path.join(sockdir, "agent.sock")
    monkeypatch.setenv("PYIOMMUFD_AGENT_SOCKET", sock)
    monkeypatch.setenv("PYIOMMUFD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PYIOMMUFD_CACHE", str(tmp_path / "cache"))
    for name in ("PYIOMMUFD_LU_ABI", "PYIOMMUFD_LU_NR", "PYIOMMUFD_DEBUG", "PYIOMMUFD_IN_GUEST",
                 "PYIOMMUFD_VM_SIMULATE", "PYIOMMUFD_VM_RESULTS"):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path
    server = agent.in_process_agents().get(sock)
    if server is not None:
        server.shutdown(release=False)
    shutil.rmtree(sockdir, ignore_errors=True)


def plan_file(tmp_path, lu_abi: str) -> str:
    path = tmp_path / "plan.toml"
    path.write_text(f'''
session = "s"
lu_abi = "{lu_abi}"
[[memfd]]
name = "ram"
size = "64K"
[[iommufd]]
name = "i0"
  [[iommufd.ioas]]
  name = "ioas0"
  mappings = [{{ memfd = "ram" }}]
  [[iommufd.hwpt]]
  name = "hwpt0"
  ioas = "ioas0"
  device = "dev0"
  lu_token = 7
[[device]]
name = "dev0"
cdev = "{CDEV}"
hwpt = "hwpt0"
''')
    return str(path)


OPTIONS = ["--session", "s", "--memfd", "ram:64K", "--device", CDEV]


def invocations(tmp_path, spelling: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Every way a command line can carry the spelling: argv and environment."""
    return {
        "plan --lu-abi": (["plan", *OPTIONS, "--lu-abi", spelling], {}),
        "plan FILE": (["plan", plan_file(tmp_path, spelling)], {}),
        "plan $PYIOMMUFD_LU_ABI": (["plan", *OPTIONS], {"PYIOMMUFD_LU_ABI": spelling}),
        "preserve --lu-abi": (["preserve", *OPTIONS, "--lu-abi", spelling], {}),
        "preserve --plan FILE": (["preserve", "--plan", plan_file(tmp_path, spelling)], {}),
        "preserve $PYIOMMUFD_LU_ABI": (["preserve", *OPTIONS], {"PYIOMMUFD_LU_ABI": spelling}),
        "selftest --lu-abi": (["selftest", CDEV, "--no-hold", "--lu-abi", spelling], {}),
        "selftest $PYIOMMUFD_LU_ABI": (["selftest", CDEV, "--no-hold"], {"PYIOMMUFD_LU_ABI": spelling}),
    }


WAYS = [
    "plan --lu-abi", "plan FILE", "plan $PYIOMMUFD_LU_ABI", "preserve --lu-abi", "preserve --plan FILE",
    "preserve $PYIOMMUFD_LU_ABI", "selftest --lu-abi", "selftest $PYIOMMUFD_LU_ABI"]


def run(capsys, monkeypatch, flavour: str, argv: list[str], environ: dict[str, str]) -> cli_support.Result:
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    with FakeKernel(lu_abi=flavour, devices=[FakePciDevice(driver="vfio-pci")]) as k, use(k):
        return cli_support.run_cli(capsys, *argv, "--json")


def test_the_library_accepts_exactly_these_spellings():
    assert set(abi.SPELLINGS) == {s.lower() for s in SPELLINGS}
    assert set(abi.CHOICES) == set(abi.SPELLINGS)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_parse_lu_abi(spelling):
    choice = abi.parse_lu_abi(spelling)
    assert (choice if choice == abi.PROBE else choice.name) == EXPECTED[spelling]
    assert abi.canonical_lu_abi(spelling) == EXPECTED[spelling]


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("way", WAYS)
def test_every_spelling_in_every_command(way, spelling, env, capsys, monkeypatch):
    expected = EXPECTED[spelling]
    argv, environ = invocations(env, spelling)[way]
    r = run(capsys, monkeypatch, kernel_for(expected), argv, environ)
    assert r.code == 0, (r.out, r.err)
    assert cli_support.error_lines(r.err) == []
    doc = json.loads(r.out)
    if argv[0] == "plan":               # the plan only names the revision; a probe stays a probe
        assert doc["lu_abi"] == expected
    elif argv[0] == "preserve":         # the revision the HWPT was marked with
        assert doc["lu_abi"] == kernel_for(expected)
    else:
        assert doc["lu_abi"] == kernel_for(expected) and doc["result"] == "pass", doc


@pytest.mark.parametrize("way", WAYS)
def test_a_bad_spelling_is_one_error_line_and_exit_2(way, env, capsys, monkeypatch):
    argv, environ = invocations(env, BAD)[way]
    r = run(capsys, monkeypatch, "lu-v2", argv, environ)
    assert r.code == 2, (r.out, r.err)
    assert "Traceback" not in r.out + r.err
    [line] = cli_support.error_lines(r.err)
    assert f"unknown LU ABI revision '{BAD}'" in line and "mark" in line, line   # names the spellings
    assert json.loads(r.out)["error"]["code"] == 2


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_vm_selftest_passes_every_spelling_to_the_guest(spelling, env, capsys, monkeypatch):
    from pyiommufd.cli.output import CommandError
    from pyiommufd.vm import seedflow

    def fake_run(program, **kw):        # stop where the guest would start
        raise CommandError(f"guest gets lu_abi={kw['lu_abi']}", 3)

    monkeypatch.setattr(seedflow, "run", fake_run)
    r = cli_support.run_cli(capsys, "vm", "selftest", "--machine", "local", "--lu-abi", spelling)
    assert r.code == 3, (r.out, r.err)
    assert cli_support.error_lines(r.err) == [f"pyiommufd: error: guest gets lu_abi={EXPECTED[spelling]}"]


def test_vm_selftest_refuses_a_bad_spelling(env, capsys):
    r = cli_support.run_cli(capsys, "vm", "selftest", "--machine", "local", "--lu-abi", BAD)
    assert r.code == 2
    [line] = cli_support.error_lines(r.err)
    assert f"unknown LU ABI revision '{BAD}'" in line


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_python_abi_argument(spelling, monkeypatch):
    monkeypatch.delenv("PYIOMMUFD_LU_NR", raising=False)
    expected = kernel_for(EXPECTED[spelling])
    with FakeKernel(lu_abi=expected, devices=[FakePciDevice(driver="vfio-pci")]) as k, use(k), \
            IOMMUFD.open() as iommufd:
        assert abi.select_lu_abi(spelling, iommufd=iommufd).name == expected
        from pyiommufd.vfio import VfioDevice

        with VfioDevice.open(CDEV) as dev:
            dev.bind(iommufd)
            hwpt = iommufd.alloc_hwpt(dev, iommufd.alloc_ioas())
            hwpt.mark_preserved(5, abi=spelling)
            assert hwpt.preserve_abi == expected


def test_python_refuses_a_bad_spelling(series_kernel):
    with pytest.raises(UsageError, match=f"unknown LU ABI revision '{BAD}'"):
        abi.select_lu_abi(BAD)
    with pytest.raises(UsageError):
        abi.parse_lu_abi("")


def test_the_library_does_not_read_the_variable(monkeypatch):
    """$PYIOMMUFD_LU_ABI is the command line's: Python's default is the probe."""
    monkeypatch.setenv("PYIOMMUFD_LU_ABI", "lu-v1")
    monkeypatch.delenv("PYIOMMUFD_LU_NR", raising=False)
    with FakeKernel(lu_abi="lu-v2") as k, use(k), IOMMUFD.open() as iommufd:
        assert abi.select_lu_abi(None, iommufd=iommufd).name == "lu-v2"
