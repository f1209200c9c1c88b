"""Host-side tests of the VM runner and the in-guest agent.

``machine="local"`` runs the agent and its stages as host processes; a kexec is
simulated (the stage exits with a special status after writing kexec.json and
the runner "boots" again), so the whole stage/kexec bookkeeping is exercised
without QEMU."""
from __future__ import annotations

import json
import os
import socket
import sys
import textwrap
import time

import pytest

from pyiommufd.vm import guest, initramfs, runner


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYIOMMUFD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# -- command lines and jobs ----------------------------------------------------------

def test_qemu_command_line():
    cmd = runner.qemu_command("/k/bzImage", "/k/initrd", "/r/share", "/r/serial.log",
                              pycache="/c/pycache")
    text = " ".join(cmd)
    assert cmd[0] == "qemu-system-x86_64"
    assert "-accel tcg" in text and "kvm" not in text
    assert "-machine q35,kernel-irqchip=split" in text
    assert "-no-reboot" in cmd
    assert cmd.index("intel-iommu,intremap=on") < cmd.index(
        "virtio-net-pci,disable-legacy=on,iommu_platform=on,netdev=n0")
    assert "user,id=n0,restrict=on" in cmd
    assert f"local,path=/,mount_tag={initramfs.HOSTROOT_TAG},security_model=none,readonly=on," \
           "multidevs=remap" in cmd
    assert any(a.startswith(f"local,path=/r/share,mount_tag={initramfs.RESULTS_TAG},")
               and "readonly" not in a for a in cmd)
    assert any(a.startswith(f"local,path=/c/pycache,mount_tag={initramfs.PYCACHE_TAG},")
               for a in cmd)
    assert cmd[cmd.index("-serial") + 1] == "file:/r/serial.log"
    append = cmd[cmd.index("-append") + 1].split()
    for word in ("console=ttyS0", "intel_iommu=on", "liveupdate=on", "panic=-1"):
        assert word in append
    assert cmd[cmd.index("-kernel") + 1] == "/k/bzImage"
    assert cmd[cmd.index("-initrd") + 1] == "/k/initrd"


def test_kernel_cmdline_extra_words():
    assert runner.kernel_cmdline(["foo=1"]).endswith(" foo=1")


def test_command_job_with_kexec_stages():
    job = runner.command_job(["a"], cwd="/w")
    assert [s.to_json() for s in job.stages] == [
        {"argv": ["a"], "env": {}, "cwd": "/w", "kexec": "none", "needs_kexec": False}]
    job = runner.command_job(["a"], kexec_stages=2, cwd="/w")
    assert [(s.argv, s.kexec, s.needs_kexec) for s in job.stages] == [
        (["a"], "agent", False), (["a"], "agent", True), (["a"], "none", True)]
    job = runner.command_job(["a"], kexec_stages=[["b"]], cwd="/w")
    assert [(s.argv, s.kexec, s.needs_kexec) for s in job.stages] == [
        (["a"], "agent", False), (["b"], "none", True)]
    with pytest.raises(ValueError):
        runner.command_job([])
    with pytest.raises(ValueError):
        runner.Stage(["x"], kexec="sometimes").to_json()


def test_masked_paths_are_refused_or_bound_back(tmp_path):
    assert runner.masked_in_guest("/tmp/x") == "/tmp"
    assert runner.masked_in_guest("/run") == "/run"
    assert runner.masked_in_guest("/tmpfoo") is None
    assert runner.masked_in_guest("/work/main") is None
    with pytest.raises(runner.VmError, match="under /proc"):
        runner.check_job_paths(runner.Job([runner.Stage(["true"], cwd="/proc/self")]))
    # a checkout under /tmp (as CI may clone it) is bind-mounted back into the guest
    inner = tmp_path / "clone" / "tests"
    inner.mkdir(parents=True)
    job = runner.Job([runner.Stage(["true"], cwd=str(tmp_path / "clone")),
                      runner.Stage(["true"], cwd=str(inner))])
    runner.check_job_paths(job)
    binds = runner.guest_binds(job)
    assert str((tmp_path / "clone").resolve()) in binds
    assert str(inner.resolve()) not in binds  # nested in the clone: one bind covers it
    assert "PYIOMMUFD_BINDS=" in runner.boot_env(binds)


def test_a_venv_under_tmp_is_bound_into_the_guest_with_the_checkout(tmp_path, monkeypatch):
    """A newcomer's clone in /tmp with its .venv: the guest must see the venv
    (its bin/python and site-packages), not only the checkout's src."""
    clone = tmp_path / "clone"
    venv, src = clone / ".venv", clone / "src"
    (venv / "bin").mkdir(parents=True)
    src.mkdir()
    (venv / "bin" / "python").symlink_to(sys.executable)     # a venv's python: a link out of /tmp
    monkeypatch.setattr(runner.sys, "prefix", str(venv))
    monkeypatch.setattr(runner.sys, "executable", str(venv / "bin" / "python"))
    monkeypatch.setattr(runner, "checkout_src", lambda: src)
    job = runner.Job([runner.Stage(["true"], cwd="/")])
    runner.check_job_paths(job)
    binds = runner.guest_binds(job)
    assert str(venv.resolve()) in binds and str(src.resolve()) in binds
    assert runner.python_executable() == str(venv / "bin" / "python")


def test_missing_qemu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(runner.VmError, match="qemu-system-x86_64 not found"):
        runner.run_command(["true"], progress=None)


def test_boot_env_is_shell_quoted():
    text = runner.boot_env()
    keys = dict(line.split("=", 1) for line in text.splitlines())
    assert set(keys) == {"PYIOMMUFD_PYTHON", "PYIOMMUFD_PYTHONPATH", "PYIOMMUFD_PATH",
                         "PYIOMMUFD_CACHE", "PYIOMMUFD_BINDS"}
    assert keys["PYIOMMUFD_PYTHONPATH"].strip("'") == str(runner.checkout_src())


# -- collecting results ------------------------------------------------------------------

def _share(tmp_path, job, state, stages, **files):
    share = tmp_path / "run" / "share"
    share.mkdir(parents=True)
    guest.write_json(share / guest.JOB, job)
    guest.write_json(share / guest.STATE, state)
    for rec in stages:
        guest.write_json(share / f"stage-{rec['stage']}.json", rec)
    for name, text in files.items():
        (share / name.replace("_", "-")).write_text(text)
    return share


def test_collect_merges_stage_records(tmp_path):
    job = runner.Job([runner.Stage(["a"]), runner.Stage(["b"], needs_kexec=True)]).to_json()
    state = {"boots": [{"n": 1, "release": "7.3.4", "via": "boot"},
                       {"n": 2, "release": "7.3.4", "via": "kexec"}], "running": None}
    stages = [{"stage": 1, "argv": ["a"], "ended_by": "kexec", "exit": None, "release": "7.3.4",
               "boot": 1, "duration": 3.0},
              {"stage": 2, "argv": ["b"], "ended_by": "exit", "exit": 0, "release": "7.3.4",
               "boot": 2, "duration": 1.5}]
    res = runner.collect(_share(tmp_path, job, state, stages), tmp_path / "serial.log",
                         returncode=0)
    assert res.ok and res.exit_code == 0 and res.boot_count == 2
    assert res.kernel_release == "7.3.4"
    assert [s.ended_by for s in res.stages] == ["kexec", "exit"]
    assert res.timings == {"stage1": 3.0, "stage2": 1.5}


def test_collect_reports_lost_and_timed_out_stages(tmp_path):
    job = runner.Job([runner.Stage(["a"], kexec="self"),
                      runner.Stage(["b"], needs_kexec=True)]).to_json()
    state = {"boots": [{"n": 1, "release": "7.3.4", "via": "boot"}], "running": 0}
    stages = [{"stage": 1, "argv": ["a"], "ended_by": None, "boot": 1, "release": "7.3.4"}]
    share = _share(tmp_path, job, state, stages)
    guest.write_json(share / guest.KEXEC, {"stage": 1, "boot": 1, "by": "stage", "time": 0})
    res = runner.collect(share, tmp_path / "serial.log", timeout=60, timed_out=True,
                         returncode=-9)
    assert not res.ok and res.exit_code == 124
    assert [s.ended_by for s in res.stages] == ["lost", "lost"]
    assert "requested a kexec" in res.stages[0].reason
    assert "timed out after 60s" in res.stages[1].reason


def test_collect_reports_init_errors(tmp_path):
    job = runner.Job([runner.Stage(["a"])]).to_json()
    share = _share(tmp_path, job, {"boots": []}, [], init_error="init: cannot mount\n")
    res = runner.collect(share, tmp_path / "serial.log", returncode=0)
    assert not res.ok and "cannot mount" in res.error


# -- the agent, run locally ------------------------------------------------------------------

def _py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_local_single_stage(tmp_path):
    res = runner.run_command(_py("print('hello', __import__('os').environ['PYIOMMUFD_VM_STAGE'])"),
                             machine="local", progress=None, timeout=60, cwd=str(tmp_path))
    assert res.ok, res.summary()
    assert res.stages[0].output() == "hello 1\n"
    assert res.stages[0].release == os.uname().release
    assert res.boot_count == 1


def test_local_agent_kexec_stages(tmp_path):
    code = "import os; print(os.environ['PYIOMMUFD_VM_STAGE'], os.environ['PYIOMMUFD_VM_BOOT'])"
    lines = []
    res = runner.run_command(_py(code), kexec_stages=2, machine="local", progress=lines.append,
                             timeout=60, cwd=str(tmp_path))
    assert res.ok, res.summary()
    assert [s.output() for s in res.stages] == ["1 1\n", "2 2\n", "3 3\n"]
    assert [b.via for b in res.boots] == ["boot", "kexec", "kexec"]
    assert any("kexec requested by agent in stage 1" in line for line in lines)
    assert any("boot 2 after kexec" in line for line in lines)
    assert "kexec_2" in res.timings and "first_boot" in res.timings


def test_local_failed_stage_stops_the_job(tmp_path):
    res = runner.run_command(_py("raise SystemExit(3)"), kexec_stages=1, machine="local",
                             progress=None, timeout=60, cwd=str(tmp_path))
    assert not res.ok and res.exit_code == 3
    assert res.stages[0].ended_by == "exit" and res.stages[0].exit == 3
    assert res.stages[1].ended_by == "not-run"
    assert "instead of kexec'ing" in res.stages[1].reason


def test_local_stage_kexecs_itself(tmp_path):
    stage1 = _py("""
        import os
        print('before kexec', flush=True)
        from pyiommufd.vm.guest import kexec_same_kernel
        kexec_same_kernel()
        print('not reached')
        """)
    stage2 = _py("import os; print('after', os.environ['PYIOMMUFD_VM_BOOT'])")
    job = runner.Job([runner.Stage(stage1, cwd=str(tmp_path), kexec="self"),
                      runner.Stage(stage2, cwd=str(tmp_path), needs_kexec=True)])
    res = runner.run(job, machine="local", progress=None, timeout=60)
    assert res.ok, res.summary()
    assert res.stages[0].ended_by == "kexec" and res.stages[0].exit is None
    assert res.stages[0].output() == "before kexec\n"
    assert res.stages[1].output() == "after 2\n"
    kx = json.loads((res.share / guest.KEXEC).read_text())
    assert kx["by"] == "stage" and kx["stage"] == 1 and kx["boot"] == 1


def test_local_stage_that_should_kexec_but_exits(tmp_path):
    job = runner.Job([runner.Stage(_py("pass"), cwd=str(tmp_path), kexec="self"),
                      runner.Stage(_py("pass"), cwd=str(tmp_path), needs_kexec=True)])
    res = runner.run(job, machine="local", progress=None, timeout=60)
    assert res.stages[0].ok and res.stages[1].ended_by == "not-run"
    assert not res.ok


def _second_boot_during_stage_1(res, stage1_kexec: str) -> dict:
    """The agent's second boot after the first ended while stage 1 ran, leaving
    no kexec.json (as ``pyiommufd selftest --kexec``, a kexec of its own, does)."""
    stages = [runner.Stage(["/bin/false"], cwd="/", kexec=stage1_kexec),
              runner.Stage(_py("print('stage 2 ran')"), cwd="/", needs_kexec=True)]
    guest.write_json(res / guest.JOB, runner.Job(stages).to_json("/k/bzImage", "/k/initrd"))
    guest.write_json(res / guest.STATE, {"next": 0, "running": 0, "last": None,
                                         "boots": [{"n": 1, "via": "boot"}]})
    guest.write_json(res / "stage-1.json", {"stage": 1, "start": 1.0})
    guest.agent(res)
    return guest.read_json(res / guest.STATE)


def test_a_new_boot_during_a_self_kexec_stage_is_its_kexec(tmp_path, monkeypatch):
    monkeypatch.setattr(guest, "dump_dmesg", lambda path: None)
    state = _second_boot_during_stage_1(tmp_path, "self")
    assert state["boots"][1]["via"] == "kexec"
    assert guest.read_json(tmp_path / "stage-1.json")["ended_by"] == "kexec"
    assert guest.read_json(tmp_path / "stage-2.json")["exit"] == 0
    assert (tmp_path / "stage-2.log").read_text() == "stage 2 ran\n"


def test_a_new_boot_during_any_other_stage_is_a_reboot(tmp_path, monkeypatch):
    monkeypatch.setattr(guest, "dump_dmesg", lambda path: None)
    state = _second_boot_during_stage_1(tmp_path, "none")
    assert state["boots"][1]["via"] == "reboot"
    assert guest.read_json(tmp_path / "stage-1.json")["ended_by"] == "reboot"
    assert guest.read_json(tmp_path / "stage-2.json")["ended_by"] == "not-run"


def _wait_for(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_kmsg_follower_copies_each_record_as_the_kernel_logs_it(tmp_path):
    """A stage that kexecs by itself leaves no moment to dump the kernel log:
    each record must be in the file while the stage still runs."""
    kernel, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one read, one record
    reader.setblocking(False)
    log = tmp_path / "dmesg-1.txt"
    try:
        with guest.KmsgFollower(log, open_kmsg=lambda: os.dup(reader.fileno())):
            kernel.send(b"6,101,1500000,-;liveupdate: session 'iommufd-test' preserved\n")
            _wait_for(lambda: log.exists() and "preserved" in log.read_text())
            kernel.send(b"5,102,2250000,-;kexec_core: Starting new kernel\n")
            _wait_for(lambda: "Starting new kernel" in log.read_text())
    finally:
        kernel.close()
        reader.close()
    assert log.read_text() == ("[    1.500000] liveupdate: session 'iommufd-test' preserved\n"
                               "[    2.250000] kexec_core: Starting new kernel\n")


def test_the_agent_follows_the_kernel_log_only_while_a_self_kexec_stage_runs(tmp_path, monkeypatch):
    followed = []

    class Follower:
        def __init__(self, path):
            self.path = path

        def __enter__(self):
            followed.append((self.path.name, guest.read_json(tmp_path / guest.STATE)["running"]))

        def __exit__(self, *exc_info):
            followed.append("stopped")

    monkeypatch.delenv(guest.ENV_SIMULATE, raising=False)
    monkeypatch.setattr(guest, "KmsgFollower", Follower)
    monkeypatch.setattr(guest, "dump_dmesg", lambda path: None)
    stages = [runner.Stage(_py("pass"), cwd="/", kexec="self"), runner.Stage(_py("pass"), cwd="/")]
    guest.write_json(tmp_path / guest.JOB, runner.Job(stages).to_json("/k/bzImage", "/k/initrd"))
    assert guest.agent(tmp_path) == 0
    assert followed == [("dmesg-1.txt", 0), "stopped"]


def test_local_timeout_kills_the_machine(tmp_path):
    t0 = __import__("time").monotonic()
    res = runner.run_command(_py("import time; print('sleeping', flush=True); time.sleep(60)"),
                             machine="local", progress=None, timeout=2, cwd=str(tmp_path))
    assert __import__("time").monotonic() - t0 < 20
    assert res.timed_out and not res.ok and res.exit_code == 124
    assert res.stages[0].ended_by == "lost" and "timed out" in res.stages[0].reason
    assert "sleeping" in res.stages[0].output()


def test_kexec_helper_outside_the_vm_is_refused(monkeypatch):
    monkeypatch.delenv(guest.ENV_KERNEL, raising=False)
    with pytest.raises(RuntimeError, match="only inside the pyiommufd VM"):
        guest.kexec_same_kernel()


def test_blocked_rules():
    assert guest._blocked({}, None) is None
    assert guest._blocked({}, {"stage": 1, "how": "exit", "exit": 0}) is None
    assert "failed with exit status 2" in guest._blocked({}, {"stage": 1, "how": "exit", "exit": 2})
    assert guest._blocked({"needs_kexec": True}, {"stage": 1, "how": "kexec", "exit": None}) is None
    assert "instead of kexec" in guest._blocked({"needs_kexec": True},
                                                {"stage": 1, "how": "exit", "exit": 0})
    assert "rebooted unexpectedly" in guest._blocked({}, {"stage": 1, "how": "reboot",
                                                          "exit": None})


def test_first_boot_that_never_reaches_the_agent_is_retried(tmp_path):
    class Hanging:
        can_retry = True
        starts = 0

        def start(self):
            Hanging.starts += 1
            import subprocess
            if Hanging.starts == 1:       # a boot that hangs
                return subprocess.Popen(["sleep", "60"], start_new_session=True)
            return runner._LocalStarter(share, serial).start()

        def restart(self, rc):
            return False

        def final_rc(self, rc):
            return 0 if rc in (0, 1) else rc

    share = tmp_path / "share"
    share.mkdir()
    serial = tmp_path / "serial.log"
    serial.write_text("attempt 1 output\n")
    job = runner.command_job([sys.executable, "-c", "print('ran')"], cwd=str(tmp_path))
    guest.write_json(share / guest.JOB, job.to_json("/k", "/i"))
    lines = []
    res = runner._supervise(Hanging(), share, serial, 60, lines.append, runner._Clock(), 1,
                            boot_timeout=1.0, boot_retries=1)
    assert Hanging.starts == 2
    assert res.ok, res.summary()
    assert any("booting again" in line for line in lines)
    assert (tmp_path / "serial.attempt1.log").read_text() == "attempt 1 output\n"
    assert "boot_attempt1_failed" in res.timings


def test_prune_keeps_recent_runs(tmp_path):
    import time as _time
    root = tmp_path / "runs"
    for k in range(5):
        d = root / f"2026010{k}-000000-1"
        d.mkdir(parents=True)
        if k < 2:
            old = _time.time() - 7 * 3600
            os.utime(d, (old, old))
    runner._prune(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == [
        "20260102-000000-1", "20260103-000000-1", "20260104-000000-1"]


def test_collect_names_a_kernel_panic(tmp_path):
    job = runner.Job([runner.Stage(["a"])]).to_json()
    state = {"boots": [{"n": 1, "release": "7.3.4", "via": "boot"}], "running": 0}
    share = _share(tmp_path, job, state, [{"stage": 1, "argv": ["a"], "ended_by": None}])
    serial = tmp_path / "serial.log"
    serial.write_text("[ 1.0] x\n[ 12.9] Kernel panic - not syncing: sysrq triggered crash\n"
                      "[ 12.9] CPU: 1 ...\n")
    res = runner.collect(share, serial, returncode=0)
    assert not res.ok
    assert res.error.startswith("guest kernel panic: sysrq triggered crash")
    assert res.stages[0].reason == "guest kernel panic: sysrq triggered crash"


def test_guest_python_is_the_venv_interpreter_not_its_target(tmp_path, monkeypatch):
    """A venv's bin/python is a symlink to the base interpreter; the guest must
    run the symlink, or it loses the venv's site-packages (click, cffi)."""
    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(os.path.realpath(sys.executable))
    monkeypatch.setattr(sys, "executable", str(venv_python))
    assert runner.python_executable() == str(venv_python)
    assert f"PYIOMMUFD_PYTHON={venv_python}\n" in runner.boot_env()
