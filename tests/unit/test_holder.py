"""The Holder protocol: the agent's client and the in-process holder answer
alike, with records that own their fds, across a (simulated) kexec."""
from __future__ import annotations

import os

import pytest

from pyiommufd import errors
from pyiommufd.agent import ensure_running
from pyiommufd.agent.client import in_process_agents
from pyiommufd.backend import get_backend
from pyiommufd.fdobject import FileKind
from pyiommufd.holder import AgentHolder, FileToHold, InProcessHolder
from pyiommufd.luo import LiveUpdate, PreservedFile, RetrievedFile
from pyiommufd.memfd import MemFD

PAGE = 4096


def _holder(kind: str, sockdir: str):
    if kind == "in-process":
        return InProcessHolder(LiveUpdate.open())
    sock = os.path.join(sockdir, f"agent-{len(in_process_agents())}.sock")
    return AgentHolder(lambda: ensure_running(sock))


@pytest.fixture(params=["in-process", "agent"])
def kind(request):
    return request.param


@pytest.fixture(autouse=True)
def no_agent_left(fake_kernel, sockdir):
    yield
    # the agents this test started, before its fake kernel goes
    for path, srv in in_process_agents().items():
        if path.startswith(sockdir):
            srv.shutdown(release=False)


def _memfd(name: str, byte: bytes) -> MemFD:
    m = MemFD.create(name, PAGE)
    m.write(byte * PAGE)
    m.seal_for_live_update()
    return m


def test_preserve_lend_retrieve_finish(fake_kernel, sockdir, kind):
    holder = _holder(kind, sockdir)
    holder.create_session("s")
    a, b = _memfd("a", b"a"), _memfd("b", b"b")
    done = holder.preserve_many("s", [FileToHold(1, a, "a", FileKind.MEMFD), FileToHold(2, b, "b")])
    assert [(p.token, type(p)) for p in done] == [(1, PreservedFile), (2, PreservedFile)]
    a.close()
    b.close()                                   # the holder keeps its own references
    lent = holder.lend("s", [2])
    with lent[2] as copy:
        assert isinstance(copy, RetrievedFile) and os.pread(copy.fd, 1, 0) == b"b"
    assert lent[2].fd == -1                     # closed by the context manager
    with pytest.raises(errors.UsageError, match="0x7"):
        holder.lend("s", [7])
    with pytest.raises(errors.PyiommufdError):
        holder.create_session("s")              # one outgoing session of a name

    fake_kernel.kexec()
    holder = _holder(kind, sockdir)
    holder.retrieve_session("s")
    got = holder.retrieve_many("s", [1, 2])
    assert sorted(got) == [1, 2]
    assert os.pread(got[1].fd, 1, 0) == b"a" and got[1].kind is FileKind.MEMFD
    again = holder.retrieve_many("s", [2])      # asked again: another fd of the same file
    assert again[2].fd != got[2].fd and os.pread(again[2].fd, 1, 0) == b"b"
    for f in (*got.values(), *again.values()):
        f.close()
    holder.finish("s")
    with pytest.raises(errors.PyiommufdError):
        holder.retrieve_many("s", [1])


def test_release_unpreserves_an_outgoing_session(fake_kernel, sockdir, kind):
    holder = _holder(kind, sockdir)
    holder.create_session("s")
    m = _memfd("a", b"a")
    holder.preserve_many("s", [FileToHold(1, m)])
    holder.release("s", incoming=False)
    holder.create_session("s")                  # the name is free again
    holder.release("s", incoming=False)
    fake_kernel.kexec()
    holder = _holder(kind, sockdir)
    with pytest.raises(errors.NotFound):
        holder.retrieve_session("s")            # nothing was preserved at the kexec


def test_a_kernel_refusal_part_way_keeps_the_files_before_it(fake_kernel, sockdir, kind):
    holder = _holder(kind, sockdir)
    holder.create_session("s")
    good = _memfd("a", b"a")
    no_handler = get_backend().eventfd()        # LUO has no handler for an eventfd: ENOENT
    with pytest.raises(errors.NotFound) as exc:
        holder.preserve_many("s", [FileToHold(1, good), FileToHold(2, no_handler)])
    assert getattr(exc.value, "index", None) == 1
    with holder.lend("s", [1])[1] as copy:
        assert os.pread(copy.fd, 1, 0) == b"a"


def test_the_agent_holder_starts_no_agent_until_it_is_used(fake_kernel, sockdir):
    sock = os.path.join(sockdir, "lazy.sock")
    holder = AgentHolder(lambda: ensure_running(sock))
    assert not os.path.exists(sock)
    holder.create_session("s")
    assert os.path.exists(sock)
