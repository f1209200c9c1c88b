"""`pyiommufd selftest` against the fake kernel: streaming KTAP, exit codes,
hand-over to the agent, in-process kexec and stage 2."""
from __future__ import annotations

import ast
import errno as E
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from pyiommufd import agent, luo
from pyiommufd.backend import use
from cli_support import error_lines, run_cli
from pyiommufd_testing import FakeKernel, FakePciDevice, SimulatedKexec

BDF = "0000:00:03.0"
CDEV = "/dev/vfio/devices/vfio0"
KTAP_LINE = re.compile(r"^(ok|not ok) (\d+) \S.*$")


@pytest.fixture(autouse=True)
def cli_env(monkeypatch, tmp_path):
    """A private agent socket and bind-state directory; in-process agents stopped afterwards."""
    sockdir = tempfile.mkdtemp(prefix="pyiommufd-t", dir="/tmp")  # AF_UNIX paths are short
    sock = os.path.join(sockdir, "agent.sock")
    monkeypatch.setenv("PYIOMMUFD_AGENT_SOCKET", sock)
    monkeypatch.setenv("PYIOMMUFD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("PYIOMMUFD_LU_ABI", raising=False)
    monkeypatch.delenv("PYIOMMUFD_LU_NR", raising=False)
    yield sock
    server = agent.in_process_agents().get(sock)
    if server is not None:
        server.shutdown(release=False)
    shutil.rmtree(sockdir, ignore_errors=True)


def bind(capsys) -> None:
    r = run_cli(capsys, "bind", BDF)
    assert r.code == 0, r.err
    assert r.out.strip() == CDEV


def ktap_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if KTAP_LINE.match(ln)]


TOTALS = re.compile(r"^# Totals: pass:(\d+) fail:(\d+) xfail:(\d+) xpass:0 skip:(\d+) error:0$")


def assert_well_formed(out: str) -> list[str]:
    """KTAP as kernel tools read it: version, plan, results numbered 1..plan,
    '#' before everything else, kselftest's Totals line last and right."""
    all_lines = out.splitlines()
    lines = ktap_lines(out)
    assert all_lines[:2] == ["KTAP version 1", f"1..{len(lines)}"], all_lines[:3]
    assert [int(KTAP_LINE.match(ln).group(2)) for ln in lines] == list(range(1, len(lines) + 1))
    others = [ln for ln in all_lines[2:] if not KTAP_LINE.match(ln)]
    assert all(ln.startswith("#") for ln in others), others
    totals = TOTALS.match(all_lines[-1])
    assert totals, all_lines[-1]
    passed, failed, xfailed, skipped = map(int, totals.groups())
    assert passed == sum(ln.startswith("ok ") and " # " not in ln for ln in lines) + \
        sum(bool(re.search(r"^ok \d+ [^#]* # (?!SKIP|XFAIL)", ln)) for ln in lines)
    assert failed == sum(ln.startswith("not ok ") for ln in lines)
    assert xfailed == sum(" # XFAIL " in ln for ln in lines)
    assert skipped == sum(" # SKIP " in ln for ln in lines)
    return lines


# -- stock 7.3 -------------------------------------------------------------------------------

def test_stock_kernel_reports_unsupported_exit_4(fake_kernel, capsys):
    bind(capsys)
    r = run_cli(capsys, "selftest", BDF)
    assert r.code == 4, (r.out, r.err)
    lines = assert_well_formed(r.out)
    # no iommufd/vfio handler: ENOENT there says nothing about the order
    assert "ok 15 preserve cdev before its iommufd # SKIP order not tested: got ENOENT" in lines[14]
    assert "ok 16 preserve iommufd before its memfd # SKIP order not tested: got ENOENT, but this " \
           "kernel has no iommufd live-update handler (step 18)" in lines[15]
    assert not any("XFAIL" in ln for ln in lines)
    assert lines[17].startswith("ok 18 preserve iommufd # SKIP kernel lacks")
    assert all(" # SKIP not run: kernel lacks an iommufd" in ln for ln in lines[18:]) and len(lines) == 24
    assert not any(ln.startswith("not ok") for ln in lines)
    assert "UNSUPPORTED" in r.out
    [err] = error_lines(r.err)
    assert "kernel lacks a" in err and "iommufd live-update handler" in err
    assert r.err.count("\n") == 1 and "Traceback" not in r.err
    # nothing stays preserved: a new session of the same name can be created
    with luo.LiveUpdate.open() as lu:
        lu.create_session("iommufd-test").close()


def test_stock_kernel_json(fake_kernel, capsys):
    bind(capsys)
    r = run_cli(capsys, "selftest", CDEV, "--json")
    assert r.code == 4
    doc = json.loads(r.out)  # only JSON on stdout: no streaming text
    assert doc["result"] == "unsupported" and doc["stage"] == 1
    assert doc["lacking"].startswith("kernel lacks")
    assert doc["device"] == CDEV and doc["session"] == "iommufd-test"
    assert doc["counts"]["FAIL"] == 0
    assert len(error_lines(r.err)) == 1


# -- series kernel: stage 1 + hold ------------------------------------------------------------

def test_series_stage1_hold_hands_over_to_agent(series_kernel, capsys, cli_env):
    bind(capsys)
    r = run_cli(capsys, "selftest", BDF)
    assert r.code == 0, (r.out, r.err)
    lines = assert_well_formed(r.out)
    assert all(ln.startswith("ok ") and " # SKIP" not in ln for ln in lines)
    assert lines[14] == "ok 15 preserve cdev before its iommufd # XFAIL ENOENT: iommufd not in this session"
    assert lines[15] == "ok 16 preserve iommufd before its memfd # XFAIL ENOENT: memfd not in this session"
    assert r.out.splitlines()[-1] == "# Totals: pass:22 fail:0 xfail:2 xpass:0 skip:0 error:0"
    assert "# stage 1: PASS" in r.out
    assert "You may now perform the kexec" in r.out
    assert r.err == ""
    st = agent.AgentClient(cli_env).status()
    [sess] = [s for s in st["sessions"] if s["name"] == "iommufd-test"]
    assert sess["direction"] == "outgoing"
    assert {t["token"] for t in sess["tokens"]} >= {0x890123, 0x123456, 0x654321}
    # the agent holds /dev/liveupdate: a second selftest finds it busy (exit 5)
    r2 = run_cli(capsys, "selftest", BDF)
    assert r2.code == 5
    [err] = error_lines(r2.err)
    assert "EBUSY" in err and f"pid {os.getpid()}" in err


def test_streams_each_step_as_it_completes(series_kernel, capsys, monkeypatch):
    import pyiommufd.selftest as lib

    bind(capsys)
    seen = []
    real_run = lib.run

    def spy_run(device, *, on_step=None, **kw):
        def wrapped(step):
            on_step(step)
            out = capsys.readouterr().out  # printed before the run went on
            seen.append((step.index, out))
        return real_run(device, on_step=wrapped, **kw)

    monkeypatch.setattr(lib, "run", spy_run)
    r = run_cli(capsys, "selftest", BDF, "--no-hold")
    assert r.code == 0
    assert len(seen) >= 20
    for index, out in seen:
        assert out.splitlines()[-1].startswith(f"ok {index} ")


def test_no_hold_closes_and_unpreserves(series_kernel, capsys, cli_env):
    bind(capsys)
    r = run_cli(capsys, "selftest", BDF, "--no-hold", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["result"] == "pass" and doc["after"] == "closed"
    assert cli_env not in agent.in_process_agents()
    with luo.LiveUpdate.open() as lu:           # not held by anyone any more
        lu.create_session("iommufd-test").close()  # the session is gone


def test_custom_session_name_and_lu_abi(series_kernel_v1, capsys):
    bind(capsys)
    r = run_cli(capsys, "selftest", BDF, "--session", "s" * 63, "--lu-abi", "v1", "--no-hold")
    assert r.code == 0, (r.out, r.err)
    assert "IOMMU_HWPT_LU_SET_PRESERVE" in r.out and "(lu-v1)" in r.out


def test_wrong_lu_abi_fails_exit_1(series_kernel, capsys):
    """lu-v1's 12-byte struct on an lu-v2 kernel: the mark step fails (a FAIL, not a skip)."""
    bind(capsys)
    r = run_cli(capsys, "selftest", BDF, "--lu-abi", "v1", "--no-hold")
    assert r.code == 1, (r.out, r.err)
    assert any(ln.startswith("not ok") for ln in ktap_lines(r.out))
    [err] = error_lines(r.err)
    assert "failed at step" in err and "IOMMU_HWPT_LU_SET_PRESERVE" in err


def test_agent_unreachable_exit_7_and_unpreserves(series_kernel, capsys, monkeypatch):
    bind(capsys)

    def refuse(*a, **kw):
        raise agent.AgentUnavailable("nothing answers on the agent socket")

    monkeypatch.setattr(agent, "hand_over", refuse)
    r = run_cli(capsys, "selftest", BDF)
    assert r.code == 7
    [err] = error_lines(r.err)
    assert "stage 1 passed, but the agent did not take the files (nothing answers" in err
    with luo.LiveUpdate.open() as lu:           # closed: nothing left preserved
        lu.create_session("iommufd-test").close()


# -- kexec in-process, then stage 2 -----------------------------------------------------------

def test_kexec_then_stage2(series_kernel, capsys):
    bind(capsys)
    with pytest.raises(SimulatedKexec):
        run_cli(capsys, "selftest", BDF, "--kexec", "/boot/vmlinuz-7.3.4",
                "--initrd", "/boot/initrd.img-7.3.4")
    out = capsys.readouterr().out
    assert "# stage 1: PASS" in out and "kexec into /boot/vmlinuz-7.3.4" in out
    assert series_kernel.boot_count == 2
    # after the kexec the preserved device has no driver; vfio-pci may bind it
    bind(capsys)
    r = run_cli(capsys, "selftest", BDF)
    assert r.code == 0, (r.out, r.err)
    assert_well_formed(r.out)
    assert "# stage 2: PASS" in r.out and "# result: PASS (stage 2)" in r.out
    assert re.search(r"ok \d+ bind the retrieved cdev to a new iommufd # XFAIL EPERM", r.out)
    assert r.out.splitlines()[-1] == "# Totals: pass:4 fail:0 xfail:3 xpass:0 skip:0 error:0"


def test_kexec_on_stock_kernel_does_not_reboot(fake_kernel, capsys):
    bind(capsys)
    r = run_cli(capsys, "selftest", BDF, "--kexec", "/boot/vmlinuz-7.3.4")
    assert r.code == 4
    assert fake_kernel.boot_count == 1 and not fake_kernel.kexec_loaded


def test_stage2_json(series_kernel, capsys):
    bind(capsys)
    with pytest.raises(SimulatedKexec):
        run_cli(capsys, "selftest", BDF, "--kexec", "/boot/vmlinuz-7.3.4")
    capsys.readouterr()
    bind(capsys)
    r = run_cli(capsys, "selftest", BDF, "--json")
    assert r.code == 0
    doc = json.loads(r.out)
    assert doc["stage"] == 2 and doc["result"] == "pass"


# -- errors before the run ----------------------------------------------------------------------

def test_not_root_exit_6(capsys):
    with FakeKernel(lu_abi="lu-v2", euid=1000,
                    devices=[FakePciDevice(driver="vfio-pci")]) as k, use(k):
        r = run_cli(capsys, "selftest", CDEV)
    assert r.code == 6, (r.out, r.err)
    [err] = error_lines(r.err)
    assert "EACCES" in err or "ermission" in err


def test_no_liveupdate_is_unsupported(capsys):
    with FakeKernel(lu_abi="lu-v2", liveupdate=False,
                    devices=[FakePciDevice(driver="vfio-pci")]) as k, use(k):
        r = run_cli(capsys, "selftest", CDEV)
    assert r.code == 4
    [err] = error_lines(r.err)
    assert "/dev/liveupdate" in err


@pytest.mark.parametrize("device, message", [
    ("0000:00:09.0", "no PCI device 0000:00:09.0"),
    (BDF, "has no VFIO cdev"),                          # not bound to vfio-pci
    ("/dev/vfio/devices/vfio7", "no such device node"),
    ("vfio7", "no such device node /dev/vfio/devices/vfio7"),
    ("/dev/iommu", "not a VFIO device cdev"),
    ("/dev/vfio/3", "legacy VFIO group"),
    ("eth0", "neither a VFIO cdev"),
    ("00:03.8", "not a PCI address"),
])
def test_bad_device_exit_2(series_kernel, capsys, device, message):
    r = run_cli(capsys, "selftest", device)
    assert r.code == 2, (r.out, r.err)
    [err] = error_lines(r.err)
    assert message in err
    assert r.out == ""          # rejected before the run started


@pytest.mark.parametrize("args, message", [
    (["--session", "x" * 64], "1 to 63 bytes"),
    (["--session", ""], "1 to 63 bytes"),
    (["--lu-abi", "v3"], "unknown LU ABI revision"),
    (["--kexec", "/nonexistent/bzImage"], "no such file"),
    (["--initrd", "/boot/initrd.img-7.3.4"], "go with --kexec"),
    (["--cmdline", "quiet"], "go with --kexec"),
    (["--kexec", "/boot/vmlinuz-7.3.4", "--hold"], "exclude each other"),
    (["--kexec", "/boot/vmlinuz-7.3.4", "--initrd", "/nonexistent"], "no such file"),
    (["--kexec", "/boot/vmlinuz-7.3.4", "--initrd", "/boot"], "is a directory"),
])
def test_bad_options_exit_2(series_kernel, capsys, args, message):
    bind(capsys)
    r = run_cli(capsys, "selftest", BDF, *args)
    assert r.code == 2, (r.out, r.err)
    [err] = error_lines(r.err)
    assert message in err
    assert "Traceback" not in r.err
    assert series_kernel.boot_count == 1


# -- the vm commands (local "machine": the guest agent runs as host processes) ---------------

@pytest.fixture
def vm_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PYIOMMUFD_CACHE", str(tmp_path / "cache"))
    for name in ("PYIOMMUFD_IN_GUEST", "PYIOMMUFD_VM_SIMULATE", "PYIOMMUFD_VM_RESULTS"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "cache"


def test_vm_run_passes_the_exit_code_through(vm_cache, capsys):
    r = run_cli(capsys, "vm", "run", "--machine", "local", "--timeout", "60", "--",
                "sh", "-c", "echo hello from the guest; exit 3")
    assert r.code == 3
    assert "hello from the guest" in r.out
    assert "[vm +" in r.err                          # progress lines go to stderr
    [err] = error_lines(r.err)
    assert "exited with status 3 in the guest" in err


def test_vm_run_success(vm_cache, capsys):
    r = run_cli(capsys, "vm", "run", "--machine", "local", "--timeout", "60", "--", "true")
    assert r.code == 0 and error_lines(r.err) == []


def test_vm_selftest_reports_the_guest_stage(vm_cache, capsys):
    """Under the local simulation the guest half refuses (it would rebind host devices):
    the host command reports guest stage 1's error line and exit code."""
    r = run_cli(capsys, "vm", "selftest", "--machine", "local", "--timeout", "60")
    assert r.code == 2, (r.out, r.err)
    assert "--- guest stage 1: exit 2" in r.out
    assert "--- guest stage 2: not run" in r.out
    [err] = error_lines(r.err)
    assert err.startswith("pyiommufd: error: guest stage 1: guest-selftest runs only inside")


def test_kexec_inside_the_vm_is_the_same_as_outside(series_kernel, capsys, monkeypatch, tmp_path):
    """selftest knows nothing of the pyiommufd VM: with the guest agent's
    environment set it kexecs by itself and leaves nothing in the results
    share (the guest agent tells that kexec from the stage's kexec="self")."""
    from pyiommufd.vm import guest

    monkeypatch.setenv(guest.ENV_IN_GUEST, "1")
    share = tmp_path / "share"
    share.mkdir()
    monkeypatch.setenv(guest.ENV_RESULTS, str(share))
    monkeypatch.setenv(guest.ENV_KERNEL, "/boot/vmlinuz-7.3.4")
    monkeypatch.setenv(guest.ENV_INITRD, "/boot/initrd.img-7.3.4")
    monkeypatch.setenv(guest.ENV_STAGE, "1")
    monkeypatch.setenv(guest.ENV_BOOT, "1")
    monkeypatch.delenv(guest.ENV_SIMULATE, raising=False)
    bind(capsys)
    with pytest.raises(SimulatedKexec):
        run_cli(capsys, "selftest", BDF, "--kexec", "/boot/vmlinuz-7.3.4", "--initrd", "/boot/initrd.img-7.3.4")
    assert series_kernel.boot_count == 2
    assert list(share.iterdir()) == []
    assert "kexec into /boot/vmlinuz-7.3.4 with initrd /boot/initrd.img-7.3.4" in capsys.readouterr().out


def test_report_file_is_on_disk_before_the_kexec_loads(series_kernel, capsys, monkeypatch, tmp_path):
    """--report FILE: the stage's JSON document, durable before kexec_file_load
    and the reboot (a report on stdout can die in a pipe with the reboot)."""
    from pyiommufd import kexec

    (tmp_path / "out").mkdir()
    report = tmp_path / "out" / "stage1.json"
    seen_at_load = []
    real_load = kexec.load

    def load(*args, **kwargs):
        seen_at_load.append(json.loads(report.read_text()))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(kexec, "load", load)
    bind(capsys)
    with pytest.raises(SimulatedKexec):
        run_cli(capsys, "selftest", BDF, "--kexec", "/boot/vmlinuz-7.3.4", "--report", str(report))
    [doc] = seen_at_load
    assert doc["stage"] == 1 and doc["result"] == "pass" and doc["after"] == "kexec"
    assert doc["kexec"]["kernel"] == "/boot/vmlinuz-7.3.4" and doc["session"] == "iommufd-test"
    assert {s["status"] for s in doc["steps"]} <= {"PASS", "XFAIL"} and doc["counts"]["FAIL"] == 0
    assert [p.name for p in report.parent.iterdir()] == ["stage1.json"]     # no temporary left


def test_the_report_and_its_directory_are_synced_before_the_kexec_loads(series_kernel, capsys,
                                                                        monkeypatch, tmp_path):
    """Written is not enough: the reboot drops what is only in the page cache,
    the new name included."""
    from pyiommufd import kexec

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    synced, synced_at_load = [], []
    real_fsync, real_load = os.fsync, kexec.load

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def load(*args, **kwargs):
        synced_at_load.extend(synced)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(kexec, "load", load)
    bind(capsys)
    with pytest.raises(SimulatedKexec):
        run_cli(capsys, "selftest", BDF, "--kexec", "/boot/vmlinuz-7.3.4",
                "--report", str(out_dir / "stage1.json"))
    assert str(out_dir) in synced_at_load
    assert [p for p in synced_at_load if os.path.dirname(p) == str(out_dir)], synced_at_load


def test_a_report_that_cannot_be_written_stops_before_the_kexec(series_kernel, capsys, monkeypatch,
                                                                 tmp_path):
    """Stage 1 passed, but its report would not survive the reboot: no kexec,
    one error line, and the session is closed (which unpreserves it)."""
    from pyiommufd.cli import selftest_cmd

    def disk_full(path, text):
        raise OSError(E.ENOSPC, os.strerror(E.ENOSPC))

    monkeypatch.setattr(selftest_cmd, "write_durably", disk_full)
    bind(capsys)
    r = run_cli(capsys, "selftest", BDF, "--kexec", "/boot/vmlinuz-7.3.4",
                "--report", str(tmp_path / "stage1.json"))
    assert r.code not in (0, None)
    [err] = error_lines(r.err)
    assert "--report" in err and os.strerror(E.ENOSPC) in err
    assert series_kernel.boot_count == 1 and not series_kernel.kexec_loaded
    assert series_kernel.boot.luo.outgoing == []


def test_report_file_matches_the_json_document(fake_kernel, capsys, tmp_path):
    report = tmp_path / "r.json"
    bind(capsys)
    r = run_cli(capsys, "selftest", BDF, "--json", "--report", str(report))
    assert r.code == 4
    assert json.loads(report.read_text()) == json.loads(r.out)


@pytest.mark.parametrize("where, problem, code", [
    ("missing/r.json", "no such directory", 2),
    (".", "is a directory", 2),
])
def test_an_unusable_report_path_is_refused_before_anything_is_preserved(
        series_kernel, capsys, monkeypatch, tmp_path, where, problem, code):
    from pyiommufd import selftest

    bind(capsys)
    runs = []
    monkeypatch.setattr(selftest, "run", lambda *a, **k: runs.append(a))
    r = run_cli(capsys, "selftest", BDF, "--report", str(tmp_path / where))
    assert r.code == code
    [err] = error_lines(r.err)
    assert problem in err and "--report" in err
    assert r.out == "" and runs == []


def _pyiommufd_module_file(name: str) -> Path | None:
    import pyiommufd

    if name != "pyiommufd" and not name.startswith("pyiommufd."):
        return None
    path = Path(pyiommufd.__file__).parent.joinpath(*name.split(".")[1:])
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def pyiommufd_import_graph(root: str) -> set[str]:
    """The pyiommufd modules ``root`` may import, directly or through others:
    every import statement in their source counts, at the top, in a function
    or under TYPE_CHECKING (a lazy import runs only on some paths), and each
    module brings its parent packages."""
    reached: set[str] = set()
    pending = [root]
    while pending:
        name = pending.pop()
        source = _pyiommufd_module_file(name)
        if name in reached or source is None:
            continue
        reached.add(name)
        package = name if source.name == "__init__.py" else name.rpartition(".")[0]
        found = [name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)]
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                found += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                    if node.level else node.module or ""
                found += [base] + [f"{base}.{alias.name}" for alias in node.names]
        pending += found
    return reached


def test_the_import_graph_walk_sees_lazy_imports():
    """The walk below is not vacuous: `vm` imports pyiommufd.vm inside its
    functions only, and the selftest command reaches kexec the same way."""
    assert "pyiommufd.vm.runner" in pyiommufd_import_graph("pyiommufd.cli.vm_cmd")
    assert {"pyiommufd.kexec", "pyiommufd.agent"} <= pyiommufd_import_graph("pyiommufd.cli.selftest_cmd")


def test_the_selftest_command_does_not_reach_the_vm_package():
    """The product's selftest knows nothing of the test VM (issue 9): neither
    it nor anything it imports, on any path, imports pyiommufd.vm."""
    reached = pyiommufd_import_graph("pyiommufd.cli.selftest_cmd")
    assert not {m for m in reached if m == "pyiommufd.vm" or m.startswith("pyiommufd.vm.")}
