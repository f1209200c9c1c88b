"""Someone else talks to the agent's socket: random and truncated messages,
random SCM_RIGHTS payloads, a non-root peer, a swapped or foreign socket
path, and 100 clients at once. The agent must answer (or drop) each
connection, keep every session as it was unless a request legitimately
succeeded, and leak no fd."""
from __future__ import annotations

import copy
import errno
import json
import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pyiommufd import errors, exitcodes
from pyiommufd.agent import AgentClient, AgentServer, AgentUnavailable, in_process_agents
from pyiommufd.agent import protocol as P
from pyiommufd.backend import LinuxBackend
from pyiommufd.memfd import MemFD

NOBODY = 65534
# A nobody child can reach no path at all when "/" itself is closed to other
# users, as in a chroot whose root directory was made by mktemp -d (0700).
AS_NOBODY = pytest.mark.skipif(
    os.geteuid() != 0 or not os.stat("/").st_mode & 0o001,
    reason="needs root to drop to nobody, and a / that other users may search")
HYPOTHESIS = settings(max_examples=150, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Target:
    """An agent on the fake kernel holding session 'vm0' with one memfd."""

    def __init__(self, kernel, sockdir):
        self.k = kernel
        self.path = os.path.join(sockdir, "agent.sock")
        self.server = AgentServer(self.path, backend=kernel, timeout=2.0).serve_in_thread()
        self.client = AgentClient(self.path, timeout=10)
        self.client.create_session("vm0")
        ram = MemFD.create("guest-ram", 4096, backend=kernel)
        ram.write(b"precious")
        self.client.preserve("vm0", 1, ram, {"name": "guest-ram"})
        ram.close()

    def sessions(self):
        return self.client.status()["sessions"]

    def raw(self, data: bytes, fds=(), *, reply: bool = True):
        """Send raw bytes (fds with the first byte), end our side, and read the
        reply frame if one comes. Returns (reply or None, fds received)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(self.path)
            if data:
                try:
                    if fds:
                        s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
                    else:
                        s.sendall(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass
            s.shutdown(socket.SHUT_WR)
            if not reply:
                return None, []
            try:
                return P.recv_message(s)
            except (P.ConnectionClosed, ConnectionResetError):
                return None, []
        finally:
            s.close()


@pytest.fixture
def target(fake_kernel, sockdir):
    t = Target(fake_kernel, sockdir)
    _TARGETS.append(t)
    yield t
    _TARGETS.remove(t)
    t.server.shutdown()
    for path, srv in in_process_agents().items():
        if path.startswith(sockdir):
            srv.shutdown()


_TARGETS: list = []


def _open_fds() -> int:
    """This process's open fds, once the agent has closed its end of every
    connection (after its reply)."""
    deadline = time.monotonic() + 5
    while any(t.server.connections_in_flight() for t in _TARGETS) and time.monotonic() < deadline:
        time.sleep(0.005)
    return len(os.listdir("/proc/self/fd"))


def _frame(obj) -> bytes:
    payload = json.dumps(obj).encode()
    return struct.pack("!I", len(payload)) + payload


def _still_fine(target, before, fds_before, reply, *, may_change: bool = False):
    assert target.client.ping()["pid"] == os.getpid()      # still answering
    if reply is not None:
        assert isinstance(reply, dict) and "ok" in reply
    if not (may_change and reply is not None and reply.get("ok")):
        assert target.sessions() == before
    # every fd the agent received and did not keep is closed again
    assert _open_fds() == fds_before


# -- random and truncated messages --------------------------------------------------
@HYPOTHESIS
@given(data=st.binary(max_size=512))
def test_random_bytes_never_crash_the_agent_or_change_it(target, data):
    before, fds_before = target.sessions(), _open_fds()
    reply, got = target.raw(data)
    assert got == []
    _still_fine(target, before, fds_before, reply)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
ARG_NAMES = ["name", "session", "token", "fd", "meta", "force", "direction", "sessions", "liveupdate",
             "manifest", "files", "state", "kind"]


@HYPOTHESIS
@given(op=st.sampled_from(P.OPS + ("nope", "", "__init__")),
       version=st.sampled_from([1, 1, 1, 0, 2, "1", None]),
       args=st.dictionaries(st.sampled_from(ARG_NAMES), JSON, max_size=5) | JSON,
       cut=st.none() | st.integers(0, 400))
def test_random_and_truncated_requests_are_refused_without_harm(target, op, version, args, cut):
    # stop with force would end the agent: a legitimate request, not a hostile one
    if op == "stop":
        op = "status"
    frame = _frame({"v": version, "op": op, "args": args})
    if cut is not None:
        frame = frame[:cut]
    before, fds_before = target.sessions(), _open_fds()
    reply, got = target.raw(frame)
    for fd in got:
        os.close(fd)
    _still_fine(target, before, fds_before, reply, may_change=True)
    if cut is not None and cut < len(_frame({"v": version, "op": op, "args": args})):
        assert reply is None or reply["ok"] is False


def test_a_deeply_nested_request_is_refused_not_fatal(target):
    before = target.sessions()
    payload = b"[" * 200000 + b"]" * 200000
    reply, _ = target.raw(struct.pack("!I", len(payload)) + payload)
    assert reply["ok"] is False and "not JSON" in reply["error"]["message"]
    _still_fine(target, before, _open_fds(), None)


def test_a_frame_announcing_more_than_the_limit_is_refused(target):
    reply, _ = target.raw(struct.pack("!I", P.MAX_MESSAGE + 1))
    assert reply["ok"] is False and "announced" in reply["error"]["message"]


# -- every field of every op, given the wrong type ------------------------------------
class Holding(Target):
    """An agent holding incoming 'old' (token 1 retrieved, token 2 pending) and
    outgoing 'vm0' (token 1) and 'vm1' (tokens 1, 2), all memfds; incoming
    'older' waits in LUO, not yet retrieved."""

    def __init__(self, kernel, sockdir):
        self.k = kernel
        self.path = os.path.join(sockdir, "agent.sock")
        self.client = AgentClient(self.path, timeout=10)
        self.server = AgentServer(self.path, backend=kernel, timeout=2.0).serve_in_thread()
        self._fill({"old": (1, 2), "older": (1,)})
        self.server.shutdown(release=False)
        kernel.kexec()
        self.server = AgentServer(self.path, backend=kernel, timeout=2.0).serve_in_thread()
        self.client.retrieve_session("old", manifest=False)
        os.close(self.client.retrieve("old", 1))
        self._fill({"vm0": (1,), "vm1": (1, 2)})

    def _fill(self, sessions):
        for name, tokens in sessions.items():
            self.client.create_session(name)
            for token in tokens:
                ram = MemFD.create(f"{name}-{token}", 4096, backend=self.k)
                ram.write(b"precious")
                self.client.preserve(name, token, ram, {"name": f"{name}-{token}"})
                ram.close()


@pytest.fixture
def holding(fake_kernel, sockdir):
    t = Holding(fake_kernel, sockdir)
    _TARGETS.append(t)
    yield t
    _TARGETS.remove(t)
    t.server.shutdown()


ABSENT = object()       # the key left out
NOT_BOOL = ["yes", "no", "true", "false", "", 0, 1, 0.0, 1.0, [], [True], {}, {"force": True}]
NOT_TOKEN = ["1", "0x1", "", 1.0, 2.5, -1, -(1 << 64), 1 << 64, True, False, [], [1], {}, {"token": 1}]
NOT_NAME = [0, 1, 1.5, True, False, [], ["vm0"], {}, {"name": "vm0"}]
NOT_INDEX = ["0", "", 0.0, 1.5, -1, True, False, [], [0], {}]
NOT_LIST = [{}, {"0": 2}, "", "abc", 0, 1, 1.5, True, False]
NOT_OBJECT = [[], ["token"], "", "x", 0, 1, 1.5, True, False]
NOT_STRING = [0, 1, 1.5, True, False, [], ["memfd"], {}]
NOT_DIRECTION = ["sideways", "Outgoing", ""] + NOT_STRING
MISSING = [ABSENT, None]

# op -> (valid arguments that would change what the agent holds, the fds they
# name, {field: wrong values}); only wrong values are ever sent
WRONG_TYPES = {
    "ping": ({}, [], {}),
    "status": ({}, [], {}),
    "create_session": ({"name": "fresh"}, [], {("name",): NOT_NAME + MISSING}),
    "preserve": ({"session": "vm0", "token": 7, "fd": 0, "meta": {"name": "extra", "kind": "memfd"}},
                 ["fake-memfd"], {
                     ("session",): NOT_NAME + MISSING, ("token",): NOT_TOKEN + MISSING, ("fd",): NOT_INDEX,
                     ("meta",): NOT_OBJECT, ("meta", "name"): NOT_STRING, ("meta", "kind"): NOT_STRING}),
    "preserve_many": ({"session": "vm0", "files": [{"token": 8, "fd": 0, "meta": {"name": "a", "kind": "memfd"}},
                                                   {"token": 9, "fd": 1}]},
                      ["fake-memfd", "fake-memfd"], {
                          ("session",): NOT_NAME + MISSING, ("files",): NOT_LIST + MISSING,
                          ("files", 0): NOT_OBJECT, ("files", 0, "meta"): NOT_OBJECT,
                          ("files", 0, "meta", "name"): NOT_STRING, ("files", 0, "meta", "kind"): NOT_STRING,
                          ("files", 0, "token"): NOT_TOKEN, ("files", 0, "fd"): NOT_INDEX,
                          ("files", 1): NOT_OBJECT, ("files", 1, "token"): NOT_TOKEN + MISSING,
                          ("files", 1, "fd"): NOT_INDEX + MISSING}),
    "adopt": ({"liveupdate": None, "sessions": [{
                  "name": "adoptee", "direction": "outgoing", "fd": 0, "files": [{
                      "token": 5, "fd": 1, "kind": "memfd", "name": "ram", "state": "preserved",
                      "meta": {"name": "ram", "kind": "memfd"}}]}]},
              ["pipe", "fake-memfd"], {
                  ("liveupdate",): NOT_INDEX, ("sessions",): NOT_LIST, ("sessions", 0): NOT_OBJECT,
                  ("sessions", 0, "name"): NOT_NAME + MISSING, ("sessions", 0, "direction"): NOT_DIRECTION,
                  ("sessions", 0, "fd"): NOT_INDEX + MISSING, ("sessions", 0, "files"): NOT_LIST,
                  ("sessions", 0, "files", 0): NOT_OBJECT,
                  ("sessions", 0, "files", 0, "token"): NOT_TOKEN + MISSING,
                  ("sessions", 0, "files", 0, "fd"): NOT_INDEX,
                  ("sessions", 0, "files", 0, "kind"): NOT_STRING,
                  ("sessions", 0, "files", 0, "name"): NOT_STRING,
                  ("sessions", 0, "files", 0, "state"): NOT_STRING,
                  ("sessions", 0, "files", 0, "meta"): NOT_OBJECT,
                  ("sessions", 0, "files", 0, "meta", "name"): NOT_STRING,
                  ("sessions", 0, "files", 0, "meta", "kind"): NOT_STRING}),
    "retrieve_session": ({"name": "older", "manifest": False}, [], {
        ("name",): NOT_NAME + MISSING, ("manifest",): NOT_BOOL}),
    "retrieve": ({"session": "old", "token": 2}, [], {
        ("session",): NOT_NAME + MISSING, ("token",): NOT_TOKEN + MISSING}),
    "retrieve_many": ({"session": "old", "tokens": [2, 1]}, [], {
        ("session",): NOT_NAME + MISSING, ("tokens",): NOT_LIST + MISSING,
        ("tokens", 0): NOT_TOKEN, ("tokens", 1): NOT_TOKEN}),
    "lend": ({"session": "vm0", "tokens": [1]}, [], {
        ("session",): NOT_NAME + MISSING, ("tokens",): NOT_LIST + MISSING, ("tokens", 0): NOT_TOKEN}),
    "finish": ({"session": "old"}, [], {("session",): NOT_NAME + MISSING}),
    "release": ({"session": "vm1", "force": True, "direction": "outgoing"}, [], {
        ("session",): NOT_NAME + MISSING, ("force",): NOT_BOOL, ("direction",): NOT_DIRECTION}),
    "stop": ({"force": True}, [], {("force",): NOT_BOOL}),
}
NOT_ARGS = [[], [{}], "", "x", 0, 1, 1.5, True, False]


def _path_name(path) -> str:
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


def _paths(value, prefix=()):
    """Every field of a request's arguments, as paths of keys and list indices."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        yield prefix + (key,)
        yield from _paths(inner, prefix + (key,))


def _with(args, path, value):
    out = copy.deepcopy(args)
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is ABSENT:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


def test_the_wrong_type_table_covers_every_field_of_every_op():
    assert set(WRONG_TYPES) == set(P.OPS)
    for op, (args, _, wrong) in WRONG_TYPES.items():
        assert set(_paths(args)) == set(wrong), op


def _refused_without_harm(target, op, args, fd_kinds, *, error_type, names):
    """Send ``{op, args}`` with fresh fds of ``fd_kinds``; the reply must be a
    refusal of ``error_type`` saying ``names``, and nothing may change."""
    before, fds_before = target.client.status(), _open_fds()
    fds = [_make_fd(kind, target.k) for kind in fd_kinds]
    try:
        reply, got = target.raw(_frame({"v": 1, "op": op, "args": args}), fds)
    finally:
        for fd in fds:
            target.k.close(fd)
    for fd in got:
        os.close(fd)
    what = f"{op} {args!r}: {reply!r}"
    assert got == [], what
    assert reply is not None and reply["ok"] is False, what
    assert reply["error"]["type"] == error_type and names in reply["error"]["message"], what
    assert target.client.status() == before, what        # every session and file still held
    assert _open_fds() == fds_before, what


@pytest.mark.parametrize("op", P.OPS)
def test_every_field_of_every_op_refuses_a_wrong_type(holding, op):
    args, fd_kinds, wrong = WRONG_TYPES[op]
    for path, values in wrong.items():
        for value in values:
            _refused_without_harm(holding, op, _with(args, path, value), fd_kinds,
                                  error_type="usage", names=repr(_path_name(path)))
    for value in NOT_ARGS:
        _refused_without_harm(holding, op, value, fd_kinds, error_type="agent", names="args")


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_the_protocol_version_is_an_integer(holding, version):
    before = holding.client.status()
    reply, _ = holding.raw(_frame({"v": version, "op": "stop", "args": {"force": True}}))
    assert reply["ok"] is False and "protocol version" in reply["error"]["message"]
    assert holding.client.status() == before


@pytest.mark.parametrize("call", [lambda c: c.stop(force="yes"), lambda c: c.stop(force=1),
                                  lambda c: c.release("vm1", force="false", direction="outgoing"),
                                  lambda c: c.retrieve_session("older", manifest="no")],
                         ids=["stop-force-yes", "stop-force-1", "release-force-false", "retrieve-manifest-no"])
def test_a_client_sees_a_wrong_type_as_bad_input(holding, call):
    before = holding.client.status()
    with pytest.raises(errors.UsageError) as info:
        call(holding.client)
    assert exitcodes.exit_code_for(info.value) == exitcodes.BAD_INPUT == 2
    assert holding.client.status() == before


# -- random SCM_RIGHTS payloads -------------------------------------------------------
def _make_fd(kind: str, k) -> int:
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    if kind == "socket":
        a, b = socket.socketpair()
        b.close()
        return a.detach()
    if kind == "devnull":
        return os.open("/dev/null", os.O_RDWR)
    if kind == "directory":
        return os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)
    if kind == "eventfd":
        return os.eventfd(0)
    if kind == "host-memfd":     # a memfd the fake kernel never saw
        return os.memfd_create("stranger")
    if kind == "fake-memfd":
        m = MemFD.create("fake", 4096, backend=k)
        return m.detach()
    raise AssertionError(kind)


FD_KINDS = ["pipe", "socket", "devnull", "directory", "eventfd", "host-memfd", "fake-memfd"]


@HYPOTHESIS
@given(op=st.sampled_from(["preserve", "adopt", "ping", "retrieve", "create_session"]),
       kinds=st.lists(st.sampled_from(FD_KINDS), max_size=6),
       index=st.one_of(st.integers(-2, 8), st.none(), st.text(max_size=2)),
       token=st.one_of(st.integers(0, 3), st.integers(-1, 1 << 65)),
       session=st.sampled_from(["vm0", "other", ""]))
def test_random_fds_never_change_what_the_agent_holds(target, op, kinds, index, token, session):
    fds_before = _open_fds()
    fds = [_make_fd(kind, target.k) for kind in kinds]
    before = target.sessions()
    args = {"session": session, "token": token, "fd": index}
    if op == "adopt":
        args = {"liveupdate": index, "sessions": [{"name": session or "evil", "fd": index,
                                                    "files": [{"token": token, "fd": index}]}]}
    elif op == "create_session":
        args = {"name": "vm0"}      # exists already: must be refused
    try:
        reply, got = target.raw(_frame({"v": 1, "op": op, "args": args}), fds)
    finally:
        for fd in fds:
            target.k.close(fd)
    assert got == []
    # only a memfd preserved under a new token of vm0 may change anything
    legit = op == "preserve" and session == "vm0" and kinds and token not in (1,) \
        and isinstance(index, int) and 0 <= index < len(kinds) and kinds[index] in ("fake-memfd", "host-memfd")
    if reply is not None and reply["ok"] and op not in ("ping", "retrieve"):
        assert legit, reply
        target.client.release("vm0", force=True)
        target.client.create_session("vm0")
        ram = MemFD.create("guest-ram", 4096, backend=target.k)
        ram.write(b"precious")
        target.client.preserve("vm0", 1, ram, {"name": "guest-ram"})
        ram.close()
        return
    _still_fine(target, before, fds_before, reply)


def test_more_fds_than_one_message_carries_are_all_closed(target):
    before, fds_before = target.sessions(), _open_fds()
    frame = _frame({"v": 1, "op": "ping", "args": {}})
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(target.path)
    pipes = [os.pipe() for _ in range(P.MAX_FDS)]
    reads = [r for r, _ in pipes]
    try:
        # the frame in two parts, each with SCM_MAX_FD fds: 506 fds for one request
        for part in (frame[:3], frame[3:]):
            s.sendmsg([part], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(reads)}i", *reads))])
        reply, got = P.recv_message(s)
    finally:
        s.close()
        for r, w in pipes:
            os.close(r)
    assert reply["ok"] is True and got == []
    # the agent closed all its copies: every pipe's read end is gone, so writes fail
    for _, w in pipes:
        with pytest.raises(BrokenPipeError):
            os.write(w, b"x")
        os.close(w)
    _still_fine(target, before, fds_before, reply)


def test_adopt_refuses_fds_that_are_not_what_they_claim(target):
    before = target.sessions()
    r, w = os.pipe()
    try:
        with pytest.raises(errors.UsageError, match="not a LUO session"):
            target.client.adopt(sessions=[{"name": "evil", "session": r, "files": []}])
        target.server.liveupdate.close()         # let it need a /dev/liveupdate again
        target.server.liveupdate = None
        with pytest.raises(errors.UsageError, match="not /dev/liveupdate"):
            target.client.adopt(liveupdate=w)
    finally:
        os.close(r)
        os.close(w)
    assert target.sessions() == before


def test_an_idle_connection_does_not_hold_up_others(target):
    idle = []
    try:
        for _ in range(5):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(target.path)
            idle.append(s)
        started = time.monotonic()
        target.client.ping()
        assert time.monotonic() - started < 1.5     # the agent's read timeout is 2 s per connection
    finally:
        for s in idle:
            s.close()


# -- 100 clients at once -----------------------------------------------------------------
def test_100_clients_at_once_lose_and_cross_no_fd(target):
    k = target.k
    n = 100
    barrier = threading.Barrier(n)
    failures: list[BaseException] = []

    def one(i: int) -> None:
        try:
            m = MemFD.create(f"client-{i}", 4096, backend=k)
            m.write(f"client {i:03d}".encode())
            barrier.wait(30)
            client = AgentClient(target.path, timeout=60)
            client.preserve("vm0", 100 + i, m, {"name": f"client-{i}"})
            m.close()
            mine = [t for t in client.status()["sessions"][0]["tokens"] if t["token"] == 100 + i]
            assert [t["name"] for t in mine] == [f"client-{i}"]
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert failures == []
    # no crossed fd: after the kexec each token holds the bytes of the client that sent it
    target.server.shutdown(release=False)
    k.kexec()
    target.server = AgentServer(target.path, backend=k).serve_in_thread()
    c = target.client
    c.retrieve_session("vm0")
    for i in range(n):
        fd = c.retrieve("vm0", 100 + i)
        assert k.pread(fd, 10, 0) == f"client {i:03d}".encode()
        os.close(fd)


# -- a non-root peer ------------------------------------------------------------------------
def _as_nobody(fn) -> str:
    """Run ``fn`` in a forked child that dropped to uid/gid nobody; its
    return value (a string) comes back through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = fn()
        except BaseException as exc:  # noqa: BLE001
            out = f"child error: {type(exc).__name__}: {exc}"
        os.write(w, out.encode() or b"child: no output")
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        data = os.read(r, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def _ping_raw(path: str) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(path)
    except OSError as exc:
        return f"connect: {errno.errorcode.get(exc.errno)}"
    try:
        s.sendall(_frame({"v": 1, "op": "status", "args": {}}))
    except OSError:
        pass
    head = s.recv(4)
    (length,) = struct.unpack("!I", head)
    body = b""
    while len(body) < length:
        body += s.recv(length - len(body))
    return body.decode()


@AS_NOBODY
def test_a_non_root_peer_cannot_even_connect(target):
    assert _as_nobody(lambda: _ping_raw(target.path)) == "connect: EACCES"


@AS_NOBODY
def test_a_non_root_peer_is_refused_by_its_credentials(target):
    # even if the modes were opened up by mistake, SO_PEERCRED says who it is
    os.chmod(os.path.dirname(target.path), 0o755)
    os.chmod(target.path, 0o666)
    reply = json.loads(_as_nobody(lambda: _ping_raw(target.path)))
    assert reply["ok"] is False and reply["error"]["class"] == "AgentPermissionDenied"
    assert f"uid {NOBODY}" in reply["error"]["message"]
    assert "sessions" not in json.dumps(reply)
    os.chmod(os.path.dirname(target.path), 0o700)


# -- the socket path ------------------------------------------------------------------------
def _server(path):
    return AgentServer(path, backend=LinuxBackend(), open_liveupdate=False)


def test_a_symlink_at_the_socket_path_is_refused(sockdir):
    elsewhere = os.path.join(sockdir, "elsewhere.sock")
    path = os.path.join(sockdir, "agent.sock")
    os.symlink(elsewhere, path)
    with pytest.raises(errors.UsageError, match="is a symlink"):
        _server(path).start()
    assert os.path.islink(path) and not os.path.exists(elsewhere)


def test_a_symlinked_socket_directory_is_refused(sockdir):
    real = os.path.join(sockdir, "real")
    os.mkdir(real, 0o700)
    link = os.path.join(sockdir, "link")
    os.symlink(real, link)
    with pytest.raises(errors.UsageError, match="is a symlink"):
        _server(os.path.join(link, "agent.sock")).start()
    assert os.listdir(real) == []


@pytest.mark.parametrize("mode, owner, problem", [
    (0o700, NOBODY, "owned by uid 65534"),
    (0o777, 0, "writable by others"),
    (0o770, 0, "writable by others"),
])
def test_a_socket_directory_others_control_is_refused(sockdir, mode, owner, problem):
    d = os.path.join(sockdir, "d")
    os.mkdir(d)
    os.chmod(d, mode)
    os.chown(d, owner, owner)
    with pytest.raises(errors.UsageError, match=problem):
        _server(os.path.join(d, "agent.sock")).start()
    assert os.listdir(d) == []


@AS_NOBODY
def test_a_stale_socket_of_another_user_is_not_replaced(sockdir):
    path = os.path.join(sockdir, "agent.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()                       # stale: nobody listens
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(errors.UsageError, match="owned by uid 65534"):
        _server(path).start()
    assert os.stat(path).st_uid == NOBODY


@AS_NOBODY
def test_a_client_refuses_an_agent_run_by_another_user(sockdir):
    """Someone who took over the path would get guest RAM handed to it:
    the client checks who listens before it sends anything."""
    os.chmod(sockdir, 0o755)        # so nobody can reach its own directory
    d = os.path.join(sockdir, "taken")
    os.mkdir(d, 0o755)
    os.chown(d, NOBODY, NOBODY)
    path = os.path.join(d, "agent.sock")
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX)
            s.bind(path)
            os.chmod(path, 0o666)
            s.listen(4)
            os.write(ready_w, b"x")
            conn, _ = s.accept()
            data = conn.recv(1 << 16, socket.MSG_WAITALL)
            os.write(ready_w, b"got %d bytes" % len(data))
        except BaseException as exc:  # noqa: BLE001  (say why, not just die)
            os.write(ready_w, f"child error: {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        first = os.read(ready_r, 1)
        assert first == b"x", first + os.read(ready_r, 4096)
        r, w = os.pipe()
        try:
            with pytest.raises(AgentUnavailable, match=f"runs as uid {NOBODY}"):
                AgentClient(path, timeout=5).preserve("vm0", 1, r)
        finally:
            os.close(r)
            os.close(w)
        os.waitpid(pid, 0)
        assert os.read(ready_r, 100) == b"got 0 bytes"    # nothing, fds least of all, reached it
    finally:
        os.close(ready_r)
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
