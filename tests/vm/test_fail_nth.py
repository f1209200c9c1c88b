"""Kernel fault injection (fail-nth) over pyiommufd's flows on the real kernel.

Each flow runs with its 1st, 2nd, 3rd, ... kernel allocation failed until a run
sees no fault (``fail_nth.Driver``). The summary (flows × injection points,
failures) goes into the VM tier's terminal summary through the ``vm summary``
report section.

The live-update tests preserve a witness memfd *before* any fault and check
after the kexec that it retrieves intact; stage 2 injects faults into
RETRIEVE_FD, RETRIEVE_SESSION and FINISH of sessions prepared in stage 1. The
agent test injects into the agent's worker thread that serves the preserve. The flows
that preserve an iommufd oops the series' kernel and run in VMs of their own
(``tests/reliability/test_fail_nth_oops.py``).
"""
from __future__ import annotations

import mmap
import os
import socket
import time

import pytest

from pyiommufd import errors
from pyiommufd.agent import AgentClient
from pyiommufd.iommufd import IOMMUFD
from pyiommufd.memfd import LIVE_UPDATE_SEALS, MemFD
from pyiommufd.vfio import VfioDevice

import agent_process
import fail_nth as F
from retrieved import retrieved_memfd

PAGE = mmap.PAGESIZE
WITNESS_SESSION, WITNESS_TOKEN = "fail-nth-witness", 0x77
RETRIEVE_SESSION = "fail-nth-retrieve"
RETRIEVE_TOKENS = 64               # one fresh token per retrieve injection point
FINISH_SESSIONS = 48               # one fresh session per finish injection point


def assert_clean(results: list[F.FlowResult]) -> None:
    bad = [r for r in results if r.failures or not r.completed]
    assert not bad, F.summary(results)
    assert all(r.points > 0 for r in results), \
        "a flow was never hit by an injected fault: the driver injected nothing\n" + F.summary(results)


def one_page_memfd(name: str) -> MemFD:
    """Sealed as MAP_FILE for live update wants it."""
    memfd = MemFD.create(name, PAGE)
    memfd.write(os.urandom(PAGE))
    memfd.add_seals(LIVE_UPDATE_SEALS)
    return memfd


def preserve_one_page(lu_stage, session_name: str, token: int, key: str):
    """A new session holding one fresh page under ``token``; its sha256 is saved
    as ``key`` for stage 2."""
    session = lu_stage.liveupdate.create_session(session_name)
    with one_page_memfd(session_name) as memfd:
        session.preserve(memfd, token)
        lu_stage.save(key, memfd.sha256())
    return session


# -- iommufd: IOAS and HWPT ------------------------------------------------------------------

def iommufd_flows(device_cdev: str) -> list[F.Flow]:
    buf = mmap.mmap(-1, PAGE)
    memfd = one_page_memfd("fail-nth-map-file")

    def with_ioas():
        iommufd = IOMMUFD.open()
        return iommufd, iommufd.alloc_ioas()

    def close_all(state, result):
        state[0].close()

    def ioas_alloc(_):
        with IOMMUFD.open() as iommufd:
            iommufd.alloc_ioas()

    def mapped_ioas():
        iommufd, ioas = with_ioas()
        return iommufd, ioas, ioas.map(buf)

    def copy_setup():
        iommufd, src, iova = mapped_ioas()
        return iommufd, src, iova, iommufd.alloc_ioas()

    def bound_device():
        iommufd, ioas = with_ioas()
        device = VfioDevice.open(device_cdev)
        return iommufd, ioas, device, device.bind(iommufd)

    def hwpt_alloc_attach(state):
        iommufd, ioas, device, dev_id = state
        hwpt = iommufd.alloc_hwpt(dev_id, ioas)
        device.attach(hwpt)

    def close_device(state, result):
        state[2].close()
        state[0].close()

    return [
        F.Flow("IOAS alloc", ioas_alloc),
        F.Flow("IOAS map", lambda s: s[1].map(buf), with_ioas, close_all),
        F.Flow("IOAS map_file", lambda s: s[1].map_file(memfd, 0, PAGE), with_ioas, close_all),
        F.Flow("IOAS copy", lambda s: s[3].copy(s[1], s[2], PAGE), copy_setup, close_all),
        F.Flow("IOAS unmap", lambda s: s[1].unmap(s[2], PAGE), mapped_ioas, close_all),
        F.Flow("HWPT alloc + attach", hwpt_alloc_attach, bound_device, close_device),
    ]


def test_fail_nth_iommufd(driver, vfio_device):
    for flow in iommufd_flows(vfio_device.cdev):
        driver.run(flow)
    assert_clean(driver.results)


# -- live update: session create, preserve; retrieve and finish after the kexec -------------------

@pytest.mark.pyiommufd_kexec
def test_fail_nth_live_update(driver, lu_stage):
    lu = lu_stage.liveupdate
    if lu_stage.stage == 1:
        witness = preserve_one_page(lu_stage, WITNESS_SESSION, WITNESS_TOKEN, "witness")
        counter = iter(range(1, 1 << 30))

        def fresh_session():
            return lu.create_session(f"fail-nth-{next(counter)}")

        def close_session(session, result):
            session.close()

        def session_create(_):
            lu.create_session(f"fail-nth-{next(counter)}").close()

        memfd = one_page_memfd("fail-nth-preserve")
        flows = [F.Flow("session create", session_create),
                 F.Flow("preserve memfd", lambda s: s.preserve(memfd, 1), fresh_session, close_session)]
        # preserve of an iommufd under fail-nth oopses the series' kernel (README, "Reliability"):
        # it runs in a VM of its own, tests/reliability/test_fail_nth_oops.py
        for flow in flows:
            driver.run(flow)

        # what stage 2 retrieves and finishes under injection
        retrieve = lu.create_session(RETRIEVE_SESSION)
        digests = {}
        for token in range(1, RETRIEVE_TOKENS + 1):
            with one_page_memfd(f"fail-nth-r{token}") as m:
                retrieve.preserve(m, token)
                digests[str(token)] = m.sha256()
        finishing = []
        for i in range(FINISH_SESSIONS):
            s = lu.create_session(f"fail-nth-finish-{i}")
            with one_page_memfd(f"fail-nth-f{i}") as m:
                s.preserve(m, 1)
            finishing.append(s)
        lu_stage.save("retrieve", digests)
        lu_stage.keep(witness, retrieve, *finishing)
        assert_clean(driver.results)
        return

    # stage 2: the memfd preserved before every fault
    witness = lu.retrieve_session(WITNESS_SESSION)
    with retrieved_memfd(witness, WITNESS_TOKEN) as memfd:
        assert memfd.sha256() == lu_stage.load("witness"), "the witness memfd changed"
    witness.finish()
    witness.close()

    digests = {int(k): v for k, v in lu_stage.load("retrieve").items()}
    session = lu.retrieve_session(RETRIEVE_SESSION)
    tokens = iter(sorted(digests))
    used: list[int] = []

    def next_token():
        used.append(next(tokens))
        return used[-1]

    def check_retrieved(token, memfd):
        if memfd is not None:
            with memfd:
                assert memfd.sha256() == digests[token]

    retrieved = driver.run(F.Flow("retrieve", lambda t: retrieved_memfd(session, t), next_token,
                                  check_retrieved))
    # every token a fault hit: does it still retrieve? (mm/memfd_luo.c records a failed
    # retrieve and returns that error again: the kernel's behaviour, not ours)
    for token in used:
        try:
            memfd = retrieved_memfd(session, token)
        except errors.KernelError as exc:
            retrieved.kernel_findings.append(
                f"token {token}: RETRIEVE_FD keeps failing after the injected fault "
                f"({errors.errname(exc.errno)}): the preserved memfd is lost")
            continue
        check_retrieved(token, memfd)

    # retrieve a session, its file, and finish it: one fresh incoming session per run
    names = iter(f"fail-nth-finish-{i}" for i in range(FINISH_SESSIONS))
    tried: list[str] = []

    def next_session() -> str:
        tried.append(next(names))
        return tried[-1]

    finished_ok: set[str] = set()
    reached: dict[str, str] = {}           # the step each session got to: where the fault hit

    def retrieve_and_finish(name: str) -> None:
        reached[name] = "RETRIEVE_SESSION"
        with lu.retrieve_session(name) as s:
            reached[name] = "RETRIEVE_FD"
            retrieved_memfd(s, 1).close()
            reached[name] = "FINISH"
            s.finish()
        finished_ok.add(name)

    finished = driver.run(F.Flow("retrieve session + finish", retrieve_and_finish, next_session))
    for name in tried:           # a session a fault hit: can a retry still finish it?
        if name in finished_ok:
            continue
        hit = reached.get(name)
        try:
            retrieve_and_finish(name)
        except errors.KernelError as exc:
            finished.kernel_findings.append(
                f"{name}: fault during {hit}; the retry's {reached[name]} fails: "
                f"{errors.errname(exc.errno)}")
    session.finish()
    session.close()
    assert_clean(driver.results)


# -- preserve through the agent: the fault hits the agent's thread that serves the request ---------

AGENT_SOCKET = "/tmp/pyiommufd-fail-nth/agent.sock"
AGENT_WITNESS_SESSION = "fail-nth-agent-witness"


class AgentWorkerInjector:
    """Arms fail-nth of the agent's worker thread that serves our next connection.
    The agent's workers start with it and outlive each request, so, as for the
    test's own thread, the armed worker's fail-nth is read back afterwards (0: the
    fault was injected) and reset. Idle workers wait for a connection in futex(2);
    the one serving ours waits on our socket in poll(2) or recvmsg(2)."""

    IDLE = "202"                                   # futex
    ON_OUR_SOCKET = ("7", "271", "47")             # poll, ppoll, recvmsg

    def __init__(self, pid: int) -> None:
        self.pid, self.nth = pid, 0
        self.armed: F.FailNth | None = None

    def _workers(self) -> dict[int, str]:
        """Each worker thread's syscall (the main thread, tid == pid, accepts)."""
        found = {}
        for tid in agent_process.threads(self.pid) - {self.pid}:
            try:
                found[tid] = agent_process.syscall(self.pid, tid)
            except FileNotFoundError:              # a thread that just ended
                continue
        return found

    def arm(self, nth: int) -> None:
        self.nth = nth

    def disarm(self) -> bool:
        self.nth = 0
        self.wait_idle()
        armed, self.armed = self.armed, None
        assert armed is not None, "armed, but the request never reached an agent worker"
        try:
            return armed.disarm()
        finally:
            armed.close()

    def wait_idle(self) -> None:
        deadline = time.monotonic() + 30
        while busy := {tid: call for tid, call in self._workers().items() if call != self.IDLE}:
            assert time.monotonic() < deadline, f"the agent's workers never go idle: {busy}"
            time.sleep(0.01)

    def connected(self) -> None:
        if not self.nth:
            return
        deadline = time.monotonic() + 30
        while len(serving := [tid for tid, call in self._workers().items() if call in self.ON_OUR_SOCKET]) != 1:
            assert time.monotonic() < deadline, f"no single agent worker took our connection: {self._workers()}"
            time.sleep(0.005)
        self.armed = F.FailNth(self.pid, serving[0])
        self.armed.arm(self.nth)

    def fd_count(self) -> int:
        """Ours and the agent's, once its workers are idle."""
        self.wait_idle()
        return F.open_fd_count() + agent_process.fd_count(self.pid)


class InjectingClient(AgentClient):
    def __init__(self, socket_path: str, injector: AgentWorkerInjector) -> None:
        super().__init__(socket_path)
        self.injector = injector

    def _connect(self) -> socket.socket:
        self.injector.wait_idle()
        sock = super()._connect()
        self.injector.connected()
        return sock


@pytest.mark.pyiommufd_kexec
def test_fail_nth_preserve_through_the_agent(driver, lu_stage):
    lu = lu_stage.liveupdate
    if lu_stage.stage == 2:
        session = lu.retrieve_session(AGENT_WITNESS_SESSION)
        with retrieved_memfd(session, 1) as memfd:
            assert memfd.sha256() == lu_stage.load("witness")
        session.finish()
        session.close()
        return

    os.makedirs(os.path.dirname(AGENT_SOCKET), mode=0o700, exist_ok=True)
    log_file = os.path.join(os.path.dirname(AGENT_SOCKET), "agent.log")
    client = agent_process.start_agent(AGENT_SOCKET, log_file=log_file)
    pid = client.ping()["pid"]
    try:
        client.adopt(liveupdate=lu)
        client.create_session(AGENT_WITNESS_SESSION)
        with one_page_memfd("fail-nth-agent-witness") as witness:
            client.preserve(AGENT_WITNESS_SESSION, 1, witness)
            lu_stage.save("witness", witness.sha256())

        injector = AgentWorkerInjector(pid)
        injecting = InjectingClient(AGENT_SOCKET, injector)
        memfd = one_page_memfd("fail-nth-agent")
        counter = iter(range(1 << 30))

        def fresh_session() -> str:
            name = f"fail-nth-agent-{next(counter)}"
            client.create_session(name)
            return name

        def release(name: str, result: object) -> None:
            client.release(name, force=True)

        driver.run(F.Flow("preserve through the agent", lambda name: injecting.preserve(name, 1, memfd),
                          fresh_session, release, injector=injector, fd_count=injector.fd_count))
        assert client.is_running(), "the agent died under fault injection"
    except BaseException:
        print(agent_process.describe(pid, log_file))
        agent_process.kill_and_wait(pid)
        raise
    # the agent keeps the witness session through the kexec
    assert_clean(driver.results)


# -- a retrieve that a fault failed cannot be retried: the kernel's, written down ----------------

STICKY_SESSION, STICKY_TOKEN = "fail-nth-sticky", 0x5
RETRIEVE_IS_STICKY = (
    "Linux 7.3 LUO: a RETRIEVE_FD whose handler failed (here an injected ENOMEM/ENOSPC in "
    "memfd_luo_retrieve) is recorded and every later RETRIEVE_FD of that token returns an error: "
    "the preserved memfd is lost (README, Reliability)")


@pytest.mark.pyiommufd_kexec
def test_a_retrieve_failed_by_a_fault_can_be_retried(lu_stage, request):
    lu = lu_stage.liveupdate
    if lu_stage.stage == 1:
        lu_stage.keep(preserve_one_page(lu_stage, STICKY_SESSION, STICKY_TOKEN, "sha256"))
        return

    # only the retry is the kernel's: a set-up problem must fail as an AssertionError
    request.applymarker(pytest.mark.xfail(strict=True, raises=errors.KernelError,
                                          reason=RETRIEVE_IS_STICKY))
    session = lu.retrieve_session(STICKY_SESSION)
    old = F.configure_kernel()
    nth = F.FailNth()
    try:
        nth.arm(1)
        try:
            retrieved_memfd(session, STICKY_TOKEN).close()
        except errors.KernelError as exc:
            first: errors.KernelError | None = exc
        else:
            first = None
        injected = nth.disarm()
    finally:
        nth.close()
        F.restore_kernel(old)
    assert injected and first is not None, "the first allocation of RETRIEVE_FD did not fail"
    print(f"RETRIEVE_FD with its 1st allocation failed: {first}")
    with retrieved_memfd(session, STICKY_TOKEN) as memfd:     # the retry, without injection
        assert memfd.sha256() == lu_stage.load("sha256")
    session.finish()
    session.close()
