"""kill -9 of the holder agent loses nothing while a second holder keeps dups of
its fds: the fd store's contract, on the real kernel and across a real kexec.

This test process plays systemd: the agent runs with ``$NOTIFY_SOCKET`` at a
datagram socket of ours and pushes every fd it holds there (``FDSTORE=1``,
``FDNAME=session/out/<name>``, ``file/out/<name>/<token>``). We keep them, kill
the agent with SIGKILL and kexec. The control: a second session whose stored fds
we drop before the kill is unpreserved at once (its memfd is no longer frozen)
and is gone after the kexec.
"""
from __future__ import annotations

import mmap
import os

import pytest

from pyiommufd import errors
from pyiommufd.agent.sdnotify import file_fdname, session_fdname
from pyiommufd.memfd import MemFD
from pyiommufd_testing.service_manager import NotifySocket

from agent_process import kill_and_wait, start_agent
from retrieved import retrieved_memfd

pytestmark = pytest.mark.pyiommufd_kexec

AGENT_DIR = "/tmp/pyiommufd-holder"
KEPT, DROPPED = "holder-kept", "holder-dropped"
TOKENS = (0x1, 0x2, 0xF00D)
PAGE = mmap.PAGESIZE


def is_frozen(memfd: MemFD) -> bool:
    """A preserved memfd cannot change size (EPERM); an unpreserved one can."""
    try:
        memfd.resize(memfd.size + PAGE)
    except errors.PermissionDenied:
        return True
    memfd.resize(memfd.size - PAGE)
    return False


def test_sigkill_of_the_agent_loses_nothing_the_fd_store_holds(lu_stage):
    lu = lu_stage.liveupdate
    if lu_stage.stage == 1:
        os.makedirs(AGENT_DIR, mode=0o700, exist_ok=True)
        store = NotifySocket(f"{AGENT_DIR}/notify")
        client = start_agent(f"{AGENT_DIR}/agent.sock", NOTIFY_SOCKET=store.address)
        pid = client.ping()["pid"]
        ours: dict[str, list[MemFD]] = {}
        digests: dict[str, str] = {}
        try:
            client.adopt(liveupdate=lu)          # /dev/liveupdate is exclusive: share ours
            for name in (KEPT, DROPPED):
                client.create_session(name)
                ours[name] = []
                for token in TOKENS:
                    memfd = MemFD.create(f"{name}-{token:#x}", PAGE)
                    memfd.write(os.urandom(PAGE))
                    client.preserve(name, token, memfd)
                    ours[name].append(memfd)
                    digests[f"{name}/{token}"] = memfd.sha256()
            store.drain()
        except BaseException:
            kill_and_wait(pid)
            raise
        for name in (KEPT, DROPPED):
            expected = {session_fdname(name, False)} | {file_fdname(name, False, t) for t in TOKENS}
            assert expected <= set(store.names()), f"the agent stored {sorted(store.names())}"
        for name in {n for n in store.names() if DROPPED in n} | {"luo"}:
            store.drop(name)
        assert all(is_frozen(m) for ms in ours.values() for m in ms)

        kill_and_wait(pid)
        assert not client.is_running()
        assert all(is_frozen(m) for m in ours[KEPT]), "the kept session lost a file at the kill"
        assert not any(is_frozen(m) for m in ours[DROPPED]), \
            "the control session outlived its last holder"
        lu_stage.save("sha256", digests)
        lu_stage.keep(store)
        print(f"stage 1: agent {pid} preserved {len(TOKENS)} memfds in each of {KEPT!r} and "
              f"{DROPPED!r} and stored {len(store.store)} fds with us; we dropped {DROPPED!r}'s; "
              f"after SIGKILL {KEPT!r}'s memfds are still frozen (preserved), {DROPPED!r}'s not")
        return

    digests = lu_stage.load("sha256")
    assert lu.try_retrieve_session(DROPPED) is None, "the control session came through the kexec"
    session = lu.retrieve_session(KEPT)
    for token in TOKENS:
        with retrieved_memfd(session, token) as memfd:
            assert memfd.sha256() == digests[f"{KEPT}/{token}"], f"token {token:#x} changed"
    session.finish()
    session.close()
    print(f"stage 2: {KEPT!r}: all {len(TOKENS)} memfds intact after SIGKILL of their agent and "
          f"the kexec; {DROPPED!r} (no holder left) is gone")
