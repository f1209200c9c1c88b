"""The agent's wire protocol and socket hygiene, without a kernel: framing
with SCM_RIGHTS, typed errors across the socket, SO_PEERCRED checks, socket
and directory modes, stale sockets."""
from __future__ import annotations

import errno
import os
import socket
import stat
import struct

import pytest

from pyiommufd import errors
from pyiommufd.agent import AgentClient, AgentPermissionDenied, AgentRefused, AgentUnavailable
from pyiommufd.agent import protocol as P
from pyiommufd.agent.server import AgentServer, default_authorize
from pyiommufd.backend import LinuxBackend


@pytest.fixture
def agent(sockdir):
    server = AgentServer(os.path.join(sockdir, "agent.sock"), backend=LinuxBackend(), open_liveupdate=False)
    server.serve_in_thread()
    yield server
    server.shutdown()


def test_framing_carries_fds():
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        P.send_message(a, {"hello": "world", "n": [1, 2]}, [r, w])
        obj, fds = P.recv_message(b)
        assert obj == {"hello": "world", "n": [1, 2]}
        assert len(fds) == 2
        # received fds are close-on-exec and refer to the same pipe
        assert all(not os.get_inheritable(fd) for fd in fds)
        os.write(fds[1], b"ping")
        assert os.read(r, 4) == b"ping"
        for fd in fds:
            os.close(fd)
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_large_message_without_fds():
    a, b = socket.socketpair()
    try:
        blob = "x" * (3 << 20)
        import threading

        t = threading.Thread(target=P.send_message, args=(a, {"blob": blob}))
        t.start()
        obj, fds = P.recv_message(b)
        t.join()
        assert obj["blob"] == blob and fds == []
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("raw,match", [
    (b"", "closed"),
    (struct.pack("!I", 10) + b"{}", "after 2 of 10"),
    (struct.pack("!I", P.MAX_MESSAGE + 1), "announced"),
    (struct.pack("!I", 3) + b"{x}", "not JSON"),
])
def test_bad_frames(raw, match):
    a, b = socket.socketpair()
    try:
        a.sendall(raw)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(P.AgentProtocolError, match=match):
            P.recv_message(b)
    finally:
        a.close()
        b.close()


def test_kernel_errors_keep_their_class():
    exc = errors.make_error("LIVEUPDATE_SESSION_FINISH", "luo", errno.EBUSY,
                            context={"unretrieved": ["0x123456"]}, detail="session 'vm0'")
    back = P.decode_error(P.encode_error(exc))
    assert type(back) is type(exc)
    assert isinstance(back, errors.LiveUpdateError) and isinstance(back, errors.Busy)
    assert (back.op, back.errno, back.hint, back.detail) == (exc.op, exc.errno, exc.hint, exc.detail)
    assert "0x123456" in str(back)


@pytest.mark.parametrize("exc,cls", [
    (errors.UsageError("bad"), errors.UsageError),
    (errors.PlanError(["a", "b"]), errors.PlanError),
    (errors.AbiError("no"), errors.AbiError),
    (AgentRefused("held"), AgentRefused),
    (OSError(errno.EIO, "io"), OSError),
    (RuntimeError("boom"), P.AgentInternalError),
])
def test_other_errors(exc, cls):
    back = P.decode_error(P.encode_error(exc))
    assert isinstance(back, cls)


def test_decode_garbage():
    assert isinstance(P.decode_error("nope"), P.AgentProtocolError)
    assert isinstance(P.decode_error({"type": "kernel"}), P.AgentProtocolError)


def test_exit_codes():
    assert AgentUnavailable("x").exit_code == 7
    assert AgentPermissionDenied("x").exit_code == 6
    assert AgentRefused("x").exit_code == 5


def test_socket_path_env(monkeypatch):
    monkeypatch.delenv(P.ENV_SOCKET, raising=False)
    assert P.default_socket_path() == "/run/pyiommufd/agent.sock"
    monkeypatch.setenv(P.ENV_SOCKET, "/tmp/x.sock")
    assert P.default_socket_path() == "/tmp/x.sock"
    assert P.default_socket_path("/tmp/y.sock") == "/tmp/y.sock"
    assert AgentClient().socket_path == "/tmp/x.sock"


# -- a live agent without a kernel -------------------------------------------------------------
def test_ping_and_modes(agent, sockdir):
    client = AgentClient(agent.socket_path)
    info = client.ping()
    assert info["pid"] == os.getpid() and info["socket"] == agent.socket_path
    assert info["liveupdate"]["held"] is False
    st = os.stat(agent.socket_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_new_directory_is_0700(sockdir):
    path = os.path.join(sockdir, "sub", "agent.sock")
    server = AgentServer(path, backend=LinuxBackend(), open_liveupdate=False).serve_in_thread()
    try:
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    finally:
        server.shutdown()
    assert not os.path.exists(path)


def test_nothing_answers(sockdir):
    client = AgentClient(os.path.join(sockdir, "none.sock"))
    assert client.is_running() is False
    with pytest.raises(AgentUnavailable, match="no pyiommufd agent answers"):
        client.status()


def test_stale_socket_is_replaced(sockdir):
    path = os.path.join(sockdir, "agent.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()  # a socket file nobody listens on
    server = AgentServer(path, backend=LinuxBackend(), open_liveupdate=False).serve_in_thread()
    try:
        assert AgentClient(path).ping()["pid"] == os.getpid()
    finally:
        server.shutdown()


def test_second_agent_refused(agent):
    with pytest.raises(AgentRefused, match="already running"):
        AgentServer(agent.socket_path, backend=LinuxBackend(), open_liveupdate=False).start()


def test_refuses_to_replace_a_regular_file(sockdir):
    path = os.path.join(sockdir, "agent.sock")
    open(path, "w").close()
    with pytest.raises(errors.UsageError, match="not a socket"):
        AgentServer(path, backend=LinuxBackend(), open_liveupdate=False).start()


def test_socket_path_too_long():
    with pytest.raises(errors.UsageError, match="longer than"):
        AgentServer("/tmp/" + "x" * 200, backend=LinuxBackend())


def test_default_authorize():
    auth = default_authorize(1000)
    assert auth(1, 0, 0) is None
    assert auth(1, 1000, 1000) is None
    assert "uid 1001" in auth(42, 1001, 1001)


def test_peer_with_other_uid_is_rejected(sockdir):
    # the real SO_PEERCRED says uid 0 here; inject a peer running as uid 4242
    path = os.path.join(sockdir, "agent.sock")
    server = AgentServer(path, backend=LinuxBackend(), open_liveupdate=False,
                         peercred=lambda conn: (P.peer_credentials(conn)[0], 4242, 4242))
    server.euid = 1000
    server._authorize = default_authorize(1000)
    server.serve_in_thread()
    try:
        with pytest.raises(AgentPermissionDenied, match="uid 4242") as info:
            AgentClient(path).ping()
        assert info.value.exit_code == 6
    finally:
        server.shutdown()


def test_rejection_reaches_a_client_still_sending(sockdir):
    # the agent refuses before reading: a large request gets EPIPE on send, and
    # the client must still read the refusal queued for it
    path = os.path.join(sockdir, "agent.sock")
    server = AgentServer(path, backend=LinuxBackend(), open_liveupdate=False,
                         peercred=lambda conn: (1, 4242, 4242))
    server.serve_in_thread()
    try:
        for _ in range(5):
            with pytest.raises(AgentPermissionDenied):
                AgentClient(path).call("ping", blob="x" * (4 << 20))
    finally:
        server.shutdown()


def test_peercred_reports_this_process(agent):
    seen = []
    real = agent._peercred
    agent._peercred = lambda conn: seen.append(real(conn)) or seen[-1]
    AgentClient(agent.socket_path).ping()
    pid, uid, gid = seen[0]
    assert (pid, uid, gid) == (os.getpid(), os.geteuid(), os.getegid())


def test_protocol_errors_are_answered(agent):
    s = socket.socket(socket.AF_UNIX)
    s.connect(agent.socket_path)
    P.send_message(s, {"v": 1, "op": "format_disk", "args": {}})
    reply, fds = P.recv_message(s)
    s.close()
    assert reply["ok"] is False and "unknown request" in reply["error"]["message"]
    s = socket.socket(socket.AF_UNIX)
    s.connect(agent.socket_path)
    P.send_message(s, {"v": 99, "op": "ping"})
    reply, _ = P.recv_message(s)
    s.close()
    assert "protocol version" in reply["error"]["message"]


def test_unused_fds_are_closed_by_the_agent(agent):
    r, w = os.pipe()
    try:
        # ping takes no fds: the agent must close its copy, so the pipe sees EOF
        result, got = AgentClient(agent.socket_path).call("ping", [w])
        assert got == []
        os.close(w)
        w = -1
        assert os.read(r, 1) == b""
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_requests_needing_liveupdate_fail_typed(agent):
    with pytest.raises(errors.KernelError) as info:
        AgentClient(agent.socket_path).create_session("x")
    # this host has no /dev/liveupdate, or someone else holds it
    assert info.value.errno in (errno.ENOENT, errno.EBUSY)
    assert info.value.op == "open(/dev/liveupdate)"


def test_usage_errors_cross_the_socket(agent):
    client = AgentClient(agent.socket_path)
    with pytest.raises(errors.UsageError, match="session name must be"):
        client.create_session("")
    with pytest.raises(errors.UsageError, match="holds no outgoing session"):
        client.preserve("nope", 1, 0)
    with pytest.raises(errors.UsageError, match="holds no incoming session"):
        client.retrieve("nope", 1)
    with pytest.raises(errors.UsageError, match="holds no session"):
        client.release("nope")


def test_stop_without_sessions(agent):
    client = AgentClient(agent.socket_path)
    assert client.stop()["stopping"] is True
    agent._thread.join(5)
    assert not client.is_running()
    assert not os.path.exists(agent.socket_path)


def test_ensure_running_spawns_a_daemon_with_the_linux_backend(sockdir):
    import time

    from pyiommufd.agent import ensure_running

    path = os.path.join(sockdir, "spawned.sock")
    r, w = os.pipe()
    os.set_inheritable(w, True)     # even an inheritable fd of ours must not reach the daemon
    client = ensure_running(path, backend=LinuxBackend())
    try:
        info = client.ping()
        assert info["pid"] != os.getpid() and info["backend"] == "linux"
        ours = os.readlink(f"/proc/self/fd/{w}")
        theirs = [os.readlink(f"/proc/{info['pid']}/fd/{fd}") for fd in os.listdir(f"/proc/{info['pid']}/fd")]
        assert ours not in theirs
        assert ensure_running(path, backend=LinuxBackend()).ping()["pid"] == info["pid"]
    finally:
        os.close(r)
        os.close(w)
        client.stop(force=True)
    deadline = time.monotonic() + 10
    while client.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not client.is_running()
