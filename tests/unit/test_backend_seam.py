"""What production code asks the backend instead of checking which class it is."""
import os
import subprocess

import pytest

from pyiommufd.agent import AgentUnavailable, client as agent_client
from pyiommufd.backend import LinuxBackend, use
from pyiommufd_testing import FakeKernel


def test_only_linux_says_other_processes_share_its_kernel():
    assert LinuxBackend().shared_with_other_processes is True
    assert FakeKernel().shared_with_other_processes is False


def test_a_backend_other_processes_share_gets_a_spawned_agent(monkeypatch, sockdir):
    class SharedFake(FakeKernel):
        shared_with_other_processes = True

    spawned = []

    def fake_run(cmd, **kwargs):
        spawned.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "no daemon in this test\n")

    monkeypatch.setattr(agent_client.subprocess, "run", fake_run)
    path = os.path.join(sockdir, "agent.sock")
    with SharedFake() as k, pytest.raises(AgentUnavailable, match="no daemon in this test"):
        agent_client.ensure_running(path, backend=k)
    [cmd] = spawned
    assert cmd[1:4] == ["-m", "pyiommufd.agent", "--background"] and path in cmd
    assert path not in agent_client.in_process_agents()


def test_a_process_local_backend_gets_an_agent_thread(monkeypatch, sockdir):
    monkeypatch.setattr(agent_client.subprocess, "run", lambda *a, **kw: pytest.fail("spawned a daemon"))
    path = os.path.join(sockdir, "agent.sock")
    with FakeKernel() as k, use(k):
        c = agent_client.ensure_running(path, backend=k)
        try:
            assert c.ping()["pid"] == os.getpid()
            assert path in agent_client.in_process_agents()
        finally:
            agent_client.in_process_agents()[path].shutdown(release=True)


def test_agent_background_refuses_a_process_local_backend(capsys, sockdir):
    from cli_support import error_lines, run_cli

    with FakeKernel() as k, use(k):
        r = run_cli(capsys, "agent", "start", "--background", "--socket", os.path.join(sockdir, "a.sock"))
    assert r.code == 2, (r.out, r.err)
    [err] = error_lines(r.err)
    assert "--background needs the Linux backend" in err
