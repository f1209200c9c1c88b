"""The agent under systemd: sd_notify datagrams (READY, FDSTORE with the fds,
FDSTOREREMOVE) received by a notify socket of the test's own, and a restart
that takes the fds back through $LISTEN_FDS/$LISTEN_FDNAMES. Without the fd
store a crash of the agent loses the sessions; with it, nothing is lost."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st

from pyiommufd import errors
from pyiommufd.agent import AgentClient, AgentServer, in_process_agents
from pyiommufd.agent import sdnotify
from pyiommufd.manifest import MANIFEST_TOKEN, Entry, Manifest, write_to_memfd
from pyiommufd.memfd import MemFD
from pyiommufd_testing.service_manager import NotifySocket


@pytest.fixture
def manager(fake_kernel, sockdir):
    ns = NotifySocket(os.path.join(sockdir, "notify"), fake_kernel)
    yield ns
    ns.close()


def _agent(kernel, sockdir, manager, inherited=None) -> AgentServer:
    notifier = sdnotify.Notifier(manager.address) if manager is not None else None
    return AgentServer(os.path.join(sockdir, "agent.sock"), backend=kernel, notify=notifier,
                       inherited=inherited).serve_in_thread()


def _crash(server: AgentServer) -> None:
    """The agent process dies: it stops answering and every fd it held is
    closed by the kernel, with no goodbye to the service manager."""
    server.notifier = None
    server.shutdown(release=True)


def _restart(kernel, sockdir, manager) -> AgentServer:
    """systemd starts the agent again and hands it a copy of every stored fd,
    at consecutive numbers, named in $LISTEN_FDNAMES."""
    base = max(int(x) for x in os.listdir("/proc/self/fd")) + 1
    names = []
    for i, (name, fd) in enumerate(manager.store):
        os.dup2(fd, base + i, inheritable=True)
        names.append(name)
    env = sdnotify.listen_env(names, os.getpid())
    inherited = sdnotify.listen_fds(env, start=base)
    assert env == {} and len(inherited) == len(names)       # unset, so no child takes them
    return _agent(kernel, sockdir, manager, inherited)


def _memfd(kernel, name: str, data: bytes, size: int = 1 << 20) -> MemFD:
    m = MemFD.create(name, size, backend=kernel)
    m.write(data)
    return m


def test_ready_and_every_held_fd_is_stored_under_its_name(fake_kernel, sockdir, manager):
    server = _agent(fake_kernel, sockdir, manager)
    try:
        startup = manager.drain()
        # READY=1 comes last: by then /dev/liveupdate is held and stored
        assert [m.get("READY") for m in startup] == [None, "1"] and startup[0]["FDNAME"] == "luo"
        c = AgentClient(server.socket_path)
        c.create_session("vm 0:a/b")        # a name with characters FDNAME may not carry
        ram = _memfd(fake_kernel, "guest-ram", b"ram")
        c.preserve("vm 0:a/b", 0x10, ram)
        manager.drain()
        assert manager.names() == ["luo", "session/out/vm%200%3Aa%2Fb", "file/out/vm%200%3Aa%2Fb/0x10"]
        stored = dict(manager.store)
        # the stored fd is the very memfd that was preserved, not merely a name
        assert os.fstat(stored["file/out/vm%200%3Aa%2Fb/0x10"]).st_ino == os.fstat(ram.fd).st_ino
        assert all(sdnotify.valid_fdname(n) for n in manager.names())
        assert c.status()["agent"]["fdstore"]["stored"] == 3
        ram.close()

        c.release("vm 0:a/b", force=True)
        removed = [m["FDNAME"] for m in manager.drain() if m.get("FDSTOREREMOVE") == "1"]
        assert sorted(removed) == ["file/out/vm%200%3Aa%2Fb/0x10", "session/out/vm%200%3Aa%2Fb"]
        assert manager.names() == ["luo"]
    finally:
        server.shutdown()


def test_abstract_notify_socket(fake_kernel, sockdir):
    address = f"@pyiommufd-test-{os.getpid()}-{time.monotonic_ns()}"
    ns = NotifySocket(address, fake_kernel)
    try:
        server = _agent(fake_kernel, sockdir, ns)
        server.shutdown()
        assert "1" in [m.get("READY") for m in ns.drain()]
    finally:
        ns.close()


def test_without_the_fd_store_a_crash_loses_the_session(fake_kernel, sockdir):
    server = _agent(fake_kernel, sockdir, None)
    c = AgentClient(server.socket_path)
    c.create_session("vm0")
    ram = _memfd(fake_kernel, "guest-ram", b"ram")
    c.preserve("vm0", 1, ram)
    ram.close()
    _crash(server)
    fake_kernel.kexec()
    server = _agent(fake_kernel, sockdir, None)
    try:
        with pytest.raises(errors.LiveUpdateError) as info:
            c.retrieve_session("vm0")
        assert isinstance(info.value, errors.NotFound)
    finally:
        server.shutdown()


def test_a_restarted_agent_takes_its_sessions_back_and_the_kexec_keeps_them(fake_kernel, sockdir, manager):
    server = _agent(fake_kernel, sockdir, manager)
    c = AgentClient(server.socket_path)
    c.create_session("vm0")
    manifest = Manifest("vm0", [Entry(5, "memfd", "guest-ram", size=1 << 20, seals=[])],
                        kernel_release=fake_kernel.kernel_release())
    mfd = write_to_memfd(manifest, fake_kernel)
    c.preserve("vm0", MANIFEST_TOKEN, mfd, {"kind": "manifest"})
    ram = _memfd(fake_kernel, "guest-ram", b"guest memory")
    c.preserve("vm0", 5, ram)
    c.create_session("scratch")
    for obj in (mfd, ram):
        obj.close()
    before = c.status()["sessions"]
    manager.drain()

    _crash(server)
    server = _restart(fake_kernel, sockdir, manager)
    st = c.status()
    restored = st["agent"]["fdstore"]["restored"]
    assert restored["sessions"] == 2 and restored["files"] == 2 and restored["lost"] == []
    assert [(s["name"], s["direction"]) for s in st["sessions"]] == [("scratch", "outgoing"), ("vm0", "outgoing")]
    tokens = {t["token"]: t for t in st["sessions"][1]["tokens"]}
    # kinds and names come back from the manifest at token 0
    assert {t: (x["kind"], x["name"], x["state"]) for t, x in tokens.items()} == {
        0: ("manifest", "pyiommufd-manifest", "preserved"), 5: ("memfd", "guest-ram", "preserved")}
    assert [t["token"] for t in before[1]["tokens"]] == sorted(tokens)
    # it still refuses to drop them, and still holds /dev/liveupdate
    assert st["agent"]["liveupdate"]["held"] is True
    with pytest.raises(Exception, match="unpreserves"):
        c.stop()

    server.shutdown(release=False)
    for srv in in_process_agents().values():
        srv.shutdown(release=False)
    fake_kernel.kexec()
    manager.store.clear()       # the old kernel's fds are gone with it
    server = _agent(fake_kernel, sockdir, None)
    try:
        assert c.retrieve_session("vm0")["manifest"] is True
        fd = c.retrieve("vm0", 5)
        assert fake_kernel.pread(fd, 12, 0) == b"guest memory"
        os.close(fd)
    finally:
        server.shutdown(release=False)


def test_a_file_whose_session_is_gone_is_dropped_from_the_store(fake_kernel, sockdir, manager):
    server = _agent(fake_kernel, sockdir, manager)
    c = AgentClient(server.socket_path)
    c.create_session("vm0")
    ram = _memfd(fake_kernel, "ram", b"x")
    c.preserve("vm0", 1, ram)
    ram.close()
    manager.drain()
    # the session's stored copy is lost (someone ran FDSTOREREMOVE by hand)
    (session_fd,) = [fd for name, fd in manager.store if name == "session/out/vm0"]
    manager.store.remove(("session/out/vm0", session_fd))
    fake_kernel.close(session_fd)
    _crash(server)
    server = _restart(fake_kernel, sockdir, manager)
    try:
        st = c.status()
        assert st["sessions"] == []
        assert st["agent"]["fdstore"]["restored"]["lost"] == ["file/out/vm0/0x1"]
        manager.drain()
        assert "file/out/vm0/0x1" not in manager.names()
    finally:
        server.shutdown()


def test_a_stored_fd_that_is_not_the_named_session_is_ignored(fake_kernel, sockdir, manager):
    server = _agent(fake_kernel, sockdir, manager)
    c = AgentClient(server.socket_path)
    c.create_session("real")
    manager.drain()
    # a store entry whose name lies about what the fd is
    (real_fd,) = [fd for name, fd in manager.store if name == "session/out/real"]
    manager.store.append(("session/out/other", os.dup(real_fd)))
    fake_kernel.fstat_size(manager.store[-1][1])
    _crash(server)
    server = _restart(fake_kernel, sockdir, manager)
    try:
        st = c.status()
        assert [s["name"] for s in st["sessions"]] == ["real"]
        assert st["agent"]["fdstore"]["restored"]["ignored"] == ["session/out/other"]
    finally:
        server.shutdown()


def test_listen_fds_only_for_this_pid():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert sdnotify.listen_fds(env) == []
    assert env == {}            # unset all the same: they were not for us, nor for our children
    assert sdnotify.listen_fds({"LISTEN_FDS": "1"}, unset=False) == []
    r, w = os.pipe()
    try:
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"}     # no names: "unknown"
        assert sdnotify.listen_fds(env, start=min(r, w)) == [(min(r, w), "unknown"), (max(r, w), "unknown")]
        assert not os.get_inheritable(r) and not os.get_inheritable(w)
    finally:
        os.close(r)
        os.close(w)


@settings(max_examples=150, deadline=None)
@given(name=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1)
       .filter(lambda s: len(s.encode()) <= 63),
       token=st.integers(0, (1 << 64) - 1), incoming=st.booleans())
def test_every_session_name_and_token_gives_a_valid_fdname_that_parses_back(name, token, incoming):
    for what in ("session", "file"):
        fdname = sdnotify.fdname(sdnotify.FdName(what, name, incoming, token if what == "file" else None))
        assert sdnotify.valid_fdname(fdname) and ":" not in fdname and len(fdname) <= 255
        assert sdnotify.parse_fdname(fdname) == sdnotify.FdName(what, name, incoming,
                                                               token if what == "file" else None)


@pytest.mark.parametrize("text", ["", "luo2", "session/out", "session/up/x", "file/out/x/12",
                                  "file/out/x/0xzz", "file/out/%zz/0x1", "session/out/a b",
                                  "file/in/x/0x10000000000000000"])
def test_names_that_are_not_ours_parse_to_none(text):
    assert sdnotify.parse_fdname(text) is None


def test_invalid_fdnames_are_never_sent(tmp_path):
    notifier = sdnotify.Notifier(str(tmp_path / "none"))
    for bad in ("a:b", "x" * 256, "tab\there", "é"):
        with pytest.raises(ValueError):
            notifier.store(bad, 0)
    assert notifier.sent == 0


def test_a_gone_service_manager_does_not_stop_the_agent(fake_kernel, sockdir):
    server = AgentServer(os.path.join(sockdir, "agent.sock"), backend=fake_kernel,
                         notify=sdnotify.Notifier(os.path.join(sockdir, "nobody-listens"))).serve_in_thread()
    try:
        c = AgentClient(server.socket_path)
        c.create_session("vm0")
        info = c.ping()["fdstore"]
        assert info["enabled"] is True and info["stored"] == 0
        assert "nobody-listens" in info["error"]
    finally:
        server.shutdown()


def test_the_agent_process_sends_ready_to_notify_socket(sockdir):
    ns = NotifySocket(os.path.join(sockdir, "notify"))
    path = os.path.join(sockdir, "agent.sock")
    env = dict(os.environ, NOTIFY_SOCKET=ns.address, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "pyiommufd.agent", "--socket", path], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not ns.messages:
            ns.drain()
            time.sleep(0.05)
        assert ns.messages and ns.messages[0]["READY"] == "1"
        AgentClient(path).stop()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ns.close()


def test_the_shipped_unit_file_is_the_one_the_readme_shows():
    import configparser
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    text = (root / "contrib/systemd/pyiommufd-agent.service").read_text()
    assert f"```ini\n{text}```" in (root / "README.md").read_text()
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(text)
    service = unit["Service"]
    assert service["Type"] == "notify" and int(service["FileDescriptorStoreMax"]) >= 256
    assert service["FileDescriptorStorePreserve"] == "yes"
    assert "pyiommufd.agent" in service["ExecStart"]
