"""The holder agent end to end, in-process, on the fake kernel: sessions and
files handed over by SCM_RIGHTS, status, refusals, a simulated kexec, then
retrieve and finish through a fresh agent. Also ``hand_over`` (adopt)."""
from __future__ import annotations

import errno
import os

import pytest

from pyiommufd import errors
from pyiommufd.agent import (AgentClient, AgentRefused, AgentServer, ensure_running, hand_over,
                             in_process_agents)
from pyiommufd.luo import LiveUpdate
from pyiommufd.manifest import MANIFEST_TOKEN, Entry, Manifest, write_to_memfd
from pyiommufd.memfd import MemFD


class Env:
    """A fake kernel plus the agent currently serving on ``path``."""

    def __init__(self, kernel, path):
        self.k = kernel
        self.path = path
        self.server = AgentServer(path, backend=kernel).serve_in_thread()
        self.client = AgentClient(path)

    def memfd(self, name: str, data: bytes, size: int = 1 << 20) -> MemFD:
        m = MemFD.create(name, size, backend=self.k)
        m.write(data)
        return m

    def kexec(self) -> None:
        """The agent process dies with the old kernel (its fds are gone), the
        fake boots the new kernel, a fresh agent starts."""
        self.server.shutdown(release=False)
        for srv in in_process_agents().values():
            srv.shutdown(release=False)
        self.k.kexec()
        self.server = AgentServer(self.path, backend=self.k).serve_in_thread()

    def read(self, fd: int, n: int) -> bytes:
        return self.k.pread(fd, n, 0)


def _env(kernel, sockdir):
    env = Env(kernel, os.path.join(sockdir, "agent.sock"))
    yield env
    env.server.shutdown()
    for path, srv in in_process_agents().items():
        if path.startswith(sockdir):
            srv.shutdown()


@pytest.fixture
def env(fake_kernel, sockdir):
    yield from _env(fake_kernel, sockdir)


@pytest.fixture
def senv(series_kernel, sockdir):
    yield from _env(series_kernel, sockdir)


def test_agent_holds_liveupdate_exclusively(env):
    assert env.client.ping()["liveupdate"]["held"] is True
    with pytest.raises(errors.LiveUpdateError) as info:
        LiveUpdate.open(backend=env.k)
    assert info.value.errno == errno.EBUSY
    assert "pyiommufd agent" in str(info.value)


def test_end_to_end_memfds(env):
    c = env.client
    created = c.create_session("vm0")
    assert created["direction"] == "outgoing" and created["tokens"] == []
    ram = env.memfd("guest-ram", b"guest memory")
    rom = env.memfd("rom", b"firmware", size=4096)
    c.preserve("vm0", 0x10, ram, {"size": 1 << 20})
    c.preserve("vm0", 0x11, rom.fd, {"kind": "memfd", "name": "rom"})
    # the caller closes its copies: the agent's references keep them preserved
    ram.close()
    rom.close()
    st = c.status()
    (session,) = st["sessions"]
    assert session["name"] == "vm0" and session["direction"] == "outgoing"
    assert [(t["token"], t["kind"], t["name"], t["state"]) for t in session["tokens"]] == [
        (0x10, "memfd", "guest-ram", "preserved"), (0x11, "memfd", "rom", "preserved")]
    assert session["tokens"][0]["meta"] == {"size": 1 << 20}

    # the same token again: EEXIST, typed, with the hint
    extra = env.memfd("extra", b"")
    with pytest.raises(errors.LiveUpdateError) as info:
        c.preserve("vm0", 0x10, extra)
    assert isinstance(info.value, errors.AlreadyExists) and "token is used already" in str(info.value)
    extra.close()

    # nothing that would drop the preserved state without force
    with pytest.raises(AgentRefused, match="unpreserves its 2 file"):
        c.stop()
    with pytest.raises(AgentRefused, match="force"):
        c.release("vm0")
    assert c.is_running()

    env.kexec()
    info = c.retrieve_session("vm0")
    assert info["direction"] == "incoming" and info["already_held"] is False
    assert "no token 0" in info["manifest_error"]
    assert c.retrieve_session("vm0")["already_held"] is True     # idempotent in the agent
    fd = c.retrieve("vm0", 0x10)
    assert env.read(fd, 12) == b"guest memory"
    again = c.retrieve("vm0", 0x10)          # the agent keeps a reference: hand it out again
    assert again != fd and env.read(again, 12) == b"guest memory"
    for x in (fd, again):
        os.close(x)
    assert env.read(c.retrieve("vm0", 0x11), 8) == b"firmware"
    with pytest.raises(errors.LiveUpdateError) as info:
        c.retrieve("vm0", 0x99)
    assert info.value.errno == errno.ENOENT
    st = c.status()["sessions"][0]
    assert {t["token"]: t["state"] for t in st["tokens"]} == {0x10: "retrieved", 0x11: "retrieved",
                                                              0x99: "failed"}
    done = c.finish("vm0")
    assert done["finished"] == "vm0"
    assert c.status()["sessions"] == []
    # finished: the agent let go of /dev/liveupdate's session; a stop needs no force now
    assert c.stop()["stopping"] is True


def test_release_force_unpreserves(env):
    c = env.client
    c.create_session("a")
    ram = env.memfd("ram", b"x")
    c.preserve("a", 1, ram)
    out = c.release("a", force=True)
    assert out["released"] == "a" and "unpreserves" in out["warning"]
    # unpreserved: the same memfd can go into a new session (else EBUSY, seed-spec 4.1)
    c.create_session("b")
    c.preserve("b", 1, ram)
    ram.close()
    assert [s["name"] for s in c.status()["sessions"]] == ["b"]


def test_stop_force_releases_everything(env):
    c = env.client
    c.create_session("a")
    ram = env.memfd("ram", b"x")
    c.preserve("a", 1, ram)
    ram.close()
    out = c.stop(force=True)
    assert out["warnings"] and "unpreserves" in out["warnings"][0]
    env.server._thread.join(5)
    assert not c.is_running()
    # /dev/liveupdate is free again
    LiveUpdate.open(backend=env.k).close()


def test_session_with_manifest(env):
    c = env.client
    c.create_session("vm1")
    ram = env.memfd("guest-ram", b"abc")
    manifest = Manifest("vm1", [Entry(5, "memfd", "guest-ram", size=1 << 20, seals=[])],
                        kernel_release=env.k.kernel_release())
    mfd = write_to_memfd(manifest, env.k)
    c.preserve("vm1", MANIFEST_TOKEN, mfd, {"kind": "manifest"})
    c.preserve("vm1", 5, ram)
    mfd.close()
    ram.close()
    env.kexec()
    info = c.retrieve_session("vm1")
    assert info["manifest"] is True
    tokens = {t["token"]: t for t in info["tokens"]}
    assert tokens[0]["state"] == "retrieved" and tokens[0]["kind"] == "manifest"
    assert tokens[5]["state"] == "pending" and tokens[5]["name"] == "guest-ram"
    assert info["unretrieved"] == [5]
    assert env.read(c.retrieve("vm1", 5), 3) == b"abc"


def test_stock_kernel_refuses_an_iommufd_with_the_typed_error(env):
    from pyiommufd.iommufd import IOMMUFD

    c = env.client
    c.create_session("s")
    with IOMMUFD.open(backend=env.k) as ictx:
        with pytest.raises(errors.LiveUpdateError) as info:
            c.preserve("s", 1, ictx, {"kind": "iommufd"})
    assert isinstance(info.value, errors.NotFound)
    assert info.value.op == "LIVEUPDATE_SESSION_PRESERVE_FD"
    assert "no live-update handler" in info.value.hint
    assert c.status()["sessions"][0]["tokens"] == []


def _preserve_device_stack(senv):
    """memfd -> iommufd -> cdev through the agent, as the series' selftest does."""
    from pyiommufd import pci
    from pyiommufd.iommufd import IOMMUFD
    from pyiommufd.vfio import VfioDevice

    k = senv.k
    pci.PciDevice("0000:00:03.0", k).bind_vfio()
    ram = senv.memfd("buffer", b"dma me")
    ram.seal_for_live_update()
    ictx = IOMMUFD.open(backend=k)
    dev = VfioDevice.open("0000:00:03.0", backend=k)
    dev.bind(ictx)
    ioas = ictx.alloc_ioas()
    hwpt = ictx.alloc_hwpt(dev, ioas)
    dev.attach(hwpt)
    ioas.map_file(ram)
    c = senv.client
    c.create_session("iommufd-test")
    # out of order first: the cdev before its iommufd, the iommufd before its memfd (seed-spec 3.3)
    hwpt.mark_preserved(0x789012, abi="lu-v2")
    with pytest.raises(errors.NotFound):
        c.preserve("iommufd-test", 0x654321, dev)
    with pytest.raises(errors.NotFound):
        c.preserve("iommufd-test", 0x123456, ictx)
    c.preserve("iommufd-test", 0x890123, ram)
    c.preserve("iommufd-test", 0x123456, ictx, {"kind": "iommufd"})
    c.preserve("iommufd-test", 0x654321, dev)
    for obj in (dev, ictx, ram):
        obj.close()


@pytest.mark.parametrize("spelling", ["vfio cdev", "a VFIO device cdev", "cdev", "Memfd"])
def test_the_agent_takes_kinds_only_by_their_stable_value(env, spelling):
    c = env.client
    c.create_session("kinds")
    ram = env.memfd("ram", b"x")
    with pytest.raises(errors.UsageError, match="unknown file kind"):
        c.preserve("kinds", 1, ram, {"kind": spelling})
    c.preserve("kinds", 2, ram, {"kind": "memfd"})
    # what an object says it is travels as its stable value
    c.preserve("kinds", 3, env.memfd("rom", b"y"))
    kinds = {t["token"]: t["kind"] for t in c.status()["sessions"][0]["tokens"]}
    assert kinds == {2: "memfd", 3: "memfd"}


def test_series_stage2_through_the_agent(senv):
    c = senv.client
    _preserve_device_stack(senv)
    kinds = {t["token"]: t["kind"] for t in c.status()["sessions"][0]["tokens"]}
    assert kinds == {0x890123: "memfd", 0x123456: "iommufd", 0x654321: "vfio-cdev"}
    senv.kexec()
    from pyiommufd import pci

    pci.PciDevice("0000:00:03.0", senv.k).bind_vfio()
    c.retrieve_session("iommufd-test", manifest=False)
    cdev = c.retrieve("iommufd-test", 0x654321)
    os.close(cdev)
    with pytest.raises(errors.LiveUpdateError) as info:
        c.retrieve("iommufd-test", 0x123456)
    assert isinstance(info.value, errors.NotSupported)
    assert "Phase 1" in info.value.hint
    assert senv.read(c.retrieve("iommufd-test", 0x890123), 6) == b"dma me"
    with pytest.raises(errors.LiveUpdateError) as info:
        c.finish("iommufd-test")
    assert isinstance(info.value, errors.Busy)
    # the session stays with the agent: finish failed, nothing was dropped
    assert c.status()["sessions"][0]["name"] == "iommufd-test"
    with pytest.raises(AgentRefused, match="attempts FINISH"):
        c.stop()


def test_hand_over_outgoing(env, sockdir):
    env.server.shutdown()           # no agent: hand_over starts one (in-process on the fake)
    path = os.path.join(sockdir, "handover.sock")
    lu = LiveUpdate.open(backend=env.k)
    session = lu.create_session("held")
    ram = env.memfd("guest-ram", b"selftest data")
    session.preserve(ram, 0x890123)
    client = hand_over(lu, session, [(0x890123, ram, {"name": "buffer", "note": "selftest"})], socket_path=path)
    # the caller's copies go away; the agent's keep everything preserved
    for obj in (ram, session, lu):
        obj.close()
    st = client.status()
    assert st["agent"]["liveupdate"]["held"] is True       # adopted
    (s,) = st["sessions"]
    assert s["adopted"] and s["direction"] == "outgoing"
    assert s["tokens"][0]["name"] == "buffer" and s["tokens"][0]["meta"] == {"note": "selftest"}
    with pytest.raises(AgentRefused):
        client.stop()
    env.path = path
    env.kexec()
    client.retrieve_session("held")
    assert env.read(client.retrieve("held", 0x890123), 13) == b"selftest data"
    client.finish("held")


def test_hand_over_incoming(env):
    c = env.client
    c.create_session("s")
    ram = env.memfd("ram", b"before")
    c.preserve("s", 3, ram)
    ram.close()
    env.server.shutdown(release=False)
    env.k.kexec()
    # a stage-2 program retrieved the session itself, then hands it to the agent
    lu = LiveUpdate.open(backend=env.k)
    session = lu.retrieve_session("s")
    fd = session.retrieve(3).fd
    env.server = AgentServer(env.path, backend=env.k, open_liveupdate=False).serve_in_thread()
    hand_over(lu, session, [(3, fd, {"kind": "memfd", "name": "ram"})], socket_path=env.path)
    os.close(fd)
    session.close()      # would attempt FINISH if it were the last reference
    lu.close()
    st = c.status()["sessions"][0]
    assert st["direction"] == "incoming" and st["tokens"][0]["state"] == "retrieved"
    assert env.read(c.retrieve("s", 3), 6) == b"before"
    c.finish("s")


def test_adopt_validation(env):
    c = env.client
    lu_fd = 0
    with pytest.raises(errors.UsageError, match="fd index"):
        c.call("adopt", [], sessions=[{"name": "x", "fd": 0}])
    with pytest.raises(errors.UsageError, match="direction"):
        c.call("adopt", [lu_fd], sessions=[{"name": "x", "fd": 0, "direction": "sideways"}])
    c.create_session("dup")
    with pytest.raises(errors.UsageError, match="already"):
        c.call("adopt", [lu_fd], sessions=[{"name": "dup", "fd": 0}])
    with pytest.raises(errors.UsageError, match="twice"):
        c.call("adopt", [lu_fd, lu_fd], sessions=[{"name": "y", "fd": 0, "files": [
            {"token": 1, "fd": 1}, {"token": 1, "fd": 1}]}])
    with pytest.raises(errors.UsageError, match="file state must be one of preserved, retrieved, "
                                                "pending, failed, not 'lost'"):
        c.call("adopt", [lu_fd], sessions=[{"name": "z", "fd": 0, "direction": "incoming",
                                            "files": [{"token": 1, "state": "lost"}]}])
    assert [s["name"] for s in c.status()["sessions"]] == ["dup"]


def test_ensure_running_starts_an_in_process_agent(fake_kernel, sockdir):
    path = os.path.join(sockdir, "auto.sock")
    client = ensure_running(path, backend=fake_kernel)
    try:
        assert client.ping()["backend"] == "fake"
        assert ensure_running(path, backend=fake_kernel).socket_path == path
        assert path in in_process_agents()
    finally:
        in_process_agents()[path].shutdown()


def test_wrong_direction_and_unknown_sessions(env):
    c = env.client
    c.create_session("out")
    with pytest.raises(errors.UsageError, match="only as outgoing"):
        c.retrieve("out", 1)
    with pytest.raises(errors.UsageError, match="only as outgoing"):
        c.finish("out")
    with pytest.raises(errors.LiveUpdateError) as info:
        c.create_session("out")
    assert info.value.errno == errno.EEXIST
    with pytest.raises(errors.LiveUpdateError) as info:
        c.retrieve_session("never")
    assert info.value.errno == errno.ENOENT and "no live update yet" in info.value.hint


def test_signal_while_holding_state_needs_a_second_one(env, monkeypatch):
    import signal

    handlers = {}
    monkeypatch.setattr(signal, "signal", lambda sig, h: handlers.__setitem__(sig, h))
    env.server.install_signal_handlers(grace=60)
    term = handlers[signal.SIGTERM]
    c = env.client
    c.create_session("s")
    ram = env.memfd("ram", b"x")
    c.preserve("s", 1, ram)
    ram.close()
    term(signal.SIGTERM, None)
    assert c.is_running()              # first signal: logged, ignored
    term(signal.SIGTERM, None)         # second one within the grace period: stop
    env.server._thread.join(5)
    assert not c.is_running()


def test_signal_without_state_stops_at_once(env, monkeypatch):
    import signal

    handlers = {}
    monkeypatch.setattr(signal, "signal", lambda sig, h: handlers.__setitem__(sig, h))
    env.server.install_signal_handlers()
    handlers[signal.SIGINT](signal.SIGINT, None)
    env.server._thread.join(5)
    assert not env.client.is_running()


def test_bulk_preserve_and_retrieve_through_the_agent(env):
    env.client.create_session("bulk")
    files = [env.memfd(f"m{i}", bytes([(i + 1) % 256]) * 8, size=4096) for i in range(300)]  # two requests
    done = env.client.preserve_many("bulk", [(i + 1, m, {"name": f"m{i}"}) for i, m in enumerate(files)])
    assert [d["token"] for d in done] == list(range(1, 301)) and done[0]["kind"] == "memfd"
    held = {t["token"]: t for t in env.client.status()["sessions"][0]["tokens"]}
    assert len(held) == 300 and held[300]["name"] == "m299"
    for m in files:
        m.close()
    env.kexec()
    env.client.retrieve_session("bulk", manifest=False)
    fds = env.client.retrieve_many("bulk", list(range(1, 301)))
    assert [env.read(fds[t], 1) for t in (1, 256, 300)] == [b"\x01", bytes([256 % 256]), bytes([300 % 256])]
    again = env.client.retrieve_many("bulk", [1, 2])   # held by the agent: asked again without the kernel
    assert env.read(again[2], 1) == b"\x02"


def test_bulk_preserve_failing_part_way_through_the_agent(env):
    env.client.create_session("part")
    a, b = env.memfd("a", b"A"), env.memfd("b", b"B")
    with pytest.raises(errors.NotFound) as info:
        env.client.preserve_many("part", [(1, a, None), (2, env.k.eventfd(), None), (3, b, None)])
    assert info.value.index == 1
    assert "item 2 of 3 failed; the 1 before it is preserved (0x1)" in str(info.value)
    tokens = [t["token"] for t in env.client.status()["sessions"][0]["tokens"]]
    assert tokens == [1]   # the agent holds what was preserved
    env.kexec()
    env.client.retrieve_session("part", manifest=False)
    with pytest.raises(errors.NotFound) as info:
        env.client.retrieve_many("part", [1, 3])
    assert info.value.index == 1 and "item 2 of 2 failed" in str(info.value)
    assert env.read(env.client.retrieve("part", 1), 1) == b"A"   # retrieved before the failure, held


def test_no_thread_is_started_to_serve_a_connection(env, monkeypatch):
    """Under memory pressure a new thread can die in CPython's bootstrap, and
    ``Thread.start()`` then waits for it forever (seen in the VM under
    fail-nth). The agent starts every serving thread with itself: with thread
    starts that never complete, it still answers every request, more requests
    than it has connection slots, and keeps its sessions."""
    import threading

    from pyiommufd.agent.server import MAX_CONNECTIONS

    env.client.create_session("kept")
    attempts = []

    def bootstrap_dies(function, args, kwargs=None):     # a thread that never runs
        attempts.append(function)
        return 0

    monkeypatch.setattr(threading, "_start_new_thread", bootstrap_dies)
    client = AgentClient(env.path, timeout=5.0)
    for _ in range(MAX_CONNECTIONS + 2):
        assert "kept" in {s["name"] for s in client.status()["sessions"]}
    assert attempts == [], "the agent started a thread to serve a connection"


def test_an_agent_that_cannot_start_its_workers_leaves_nothing_behind(fake_kernel, sockdir, monkeypatch):
    """A worker thread that cannot start (no memory) fails the agent's start
    with that error; the workers already started end and the socket is gone,
    so a later agent can start on the same path."""
    import threading

    path = os.path.join(sockdir, "agent.sock")
    real_start = threading.Thread.start
    started = []

    def third_fails(self):
        if self.name.startswith("pyiommufd-agent-worker-"):
            if len(started) == 2:
                raise RuntimeError("can't start new thread")
            started.append(self)
        return real_start(self)

    fds_before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(threading.Thread, "start", third_fails)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        AgentServer(path, backend=fake_kernel).start()
    monkeypatch.undo()
    assert set(os.listdir("/proc/self/fd")) == fds_before      # no socket, no wake-up pipe
    for worker in started:
        worker.join(5)
        assert not worker.is_alive()
    assert not os.path.exists(path)
    server = AgentServer(path, backend=fake_kernel).serve_in_thread()
    try:
        assert AgentClient(path).ping()["pid"] == os.getpid()
    finally:
        server.shutdown()


def test_a_worker_survives_a_memory_error_in_a_request(env, monkeypatch):
    """A MemoryError while serving one request (a failed allocation) goes back
    to that client; no worker is lost, so every later request is answered."""
    from pyiommufd.agent import server as server_module

    env.client.create_session("kept")
    real_info = type(env.server)._info
    failures = []

    def info_without_memory(self):
        if len(failures) < server_module.WORKERS:
            failures.append(1)
            raise MemoryError()
        return real_info(self)

    monkeypatch.setattr(type(env.server), "_info", info_without_memory)
    for _ in range(server_module.WORKERS):
        with pytest.raises(errors.PyiommufdError):
            env.client.ping()
    assert len(failures) == server_module.WORKERS
    for _ in range(2 * server_module.WORKERS):
        assert env.client.ping()["pid"] == os.getpid()
    assert sum(w.is_alive() for w in env.server._workers) == server_module.WORKERS


def test_a_held_file_is_the_sessions_record_not_a_copy(env):
    """One preserved file: the agent's HeldFile holds the session's own record,
    so the fd the agent keeps is written down once (issue 9)."""
    c = env.client
    c.create_session("one")
    ram = env.memfd("ram", b"x")
    c.preserve("one", 5, ram)
    [held] = [h for h in env.server.sessions.values() if h.name == "one"]
    assert held.files[5].record is held.session.preserved[5]
    assert held.files[5].fd == held.session.preserved[5].fd
    env.kexec()
    c.retrieve_session("one", manifest=False)
    fd = c.retrieve("one", 5)
    [held] = [h for h in env.server.sessions.values() if h.name == "one"]
    assert held.files[5].record is held.session.retrieved[5]
    assert env.read(fd, 1) == b"x"
    c.finish("one")
