"""RLIMIT_NOFILE: the agent and `preserve` raise the soft limit to the hard
one when they need more fds; EMFILE carries a hint."""
from __future__ import annotations

import errno as E
import os
import resource
import shutil
import tempfile

import pytest

from pyiommufd import errors, rlimits
from pyiommufd.agent import AgentServer
from pyiommufd.memfd import MemFD
from pyiommufd_testing import FakeKernel


@pytest.fixture
def low_nofile():
    """A soft limit just above what is open now; put back afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard RLIMIT_NOFILE ({hard}) leaves no room to test raising the soft one")
    open_now = len(os.listdir("/proc/self/fd"))
    low = open_now + 48
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    yield low, hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_raise_nofile_only_when_needed(low_nofile):
    low, hard = low_nofile
    assert rlimits.raise_nofile(low - 1) == low
    assert rlimits.nofile() == (low, hard)
    assert rlimits.raise_nofile(low + 1) == hard
    assert rlimits.nofile() == (hard, hard)


def test_the_agent_raises_its_soft_limit(fake_kernel, low_nofile):
    _, hard = low_nofile
    d = tempfile.mkdtemp(prefix="pyiommufd-", dir="/tmp")
    server = AgentServer(os.path.join(d, "agent.sock"), backend=fake_kernel).serve_in_thread()
    try:
        assert rlimits.nofile()[0] == hard
    finally:
        server.shutdown()
        shutil.rmtree(d, ignore_errors=True)


def test_preserve_of_more_memfds_than_the_soft_limit_works(fake_kernel, low_nofile, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pyiommufd.cli import cli

    low, hard = low_nofile
    monkeypatch.setenv("PYIOMMUFD_AGENT_SOCKET", str(tmp_path / "agent.sock"))
    count = low  # each memfd is open twice here (ours, then the in-process agent's): far past the limit
    args = ["preserve", "--session", "many"]
    for i in range(count):
        args += ["--memfd", f"m{i}:4K"]
    result = CliRunner().invoke(cli, args)
    try:
        assert result.exit_code == 0, result.output
        assert rlimits.nofile()[0] == hard
        assert f"0x{count:x}" in result.stdout   # the last memfd's token
    finally:
        from pyiommufd.agent import in_process_agents

        for srv in in_process_agents().values():
            srv.shutdown()


class _NoMoreFds(FakeKernel):
    def memfd_create(self, name, flags):
        raise OSError(E.EMFILE, os.strerror(E.EMFILE))


def test_emfile_has_a_hint():
    with pytest.raises(errors.MemfdError) as info:
        MemFD.create("x", backend=_NoMoreFds())
    assert info.value.errno == E.EMFILE
    soft, hard = rlimits.nofile()
    assert f"the soft RLIMIT_NOFILE is {soft} (hard {hard})" in str(info.value)
    assert "raise the hard limit" in str(info.value)


def test_5000_memfds_in_one_session_through_the_cli(fake_kernel, tmp_path, monkeypatch):
    """Issue 11's scale figure: LUO itself took 5000; the CLI (and its agent)
    must too, raising the soft RLIMIT_NOFILE as far as the hard one allows."""
    from click.testing import CliRunner

    from pyiommufd.cli import cli

    count = 5000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * count:
        pytest.skip(f"the hard RLIMIT_NOFILE ({hard}) is below what {count} memfds need here")
    monkeypatch.setenv("PYIOMMUFD_AGENT_SOCKET", str(tmp_path / "agent.sock"))
    args = ["preserve", "--session", "five-thousand"]
    for i in range(count):
        args += ["--memfd", f"m{i}:4K"]
    try:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output[-2000:]
        assert f"0x{count:x}" in result.stdout              # the last memfd's token
        status = CliRunner().invoke(cli, ["status", "--json"])
        import json
        sessions = {s["name"]: s for s in json.loads(status.stdout)["sessions"]}
        assert len(sessions["five-thousand"]["tokens"]) == count + 1   # and the manifest
    finally:
        from pyiommufd.agent import in_process_agents

        for srv in in_process_agents().values():
            srv.shutdown()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
