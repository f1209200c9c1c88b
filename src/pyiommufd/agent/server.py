"""The holder agent: one process that owns ``/dev/liveupdate`` and the LUO
session fds across commands.

Why it exists (Linux 7.3 kernel/liveupdate/luo_session.c and luo_file.c, §8 item 3): ``/dev/liveupdate`` can be open in
one process at a time, closing an outgoing session fd unpreserves everything
in it, and after kexec a retrieved session can be retrieved only once and
closing it attempts FINISH. So whoever preserves must keep the fds open until
the kexec, and whoever restores must keep them until finish. The agent is that
holder; every other command talks to it over a UNIX socket
(:mod:`pyiommufd.agent.protocol`).

* It opens ``/dev/liveupdate`` at start. If that fails (EBUSY: another
  process, e.g. ``pyiommufd selftest --hold``, holds it; ENOENT: no LUO) it
  keeps running without it, reports why in ``status``, retries on the next
  request that needs it, and accepts the handle through ``adopt``.
* Every file it is asked to preserve arrives by SCM_RIGHTS; the agent keeps
  that reference (its own fd) and does PRESERVE_FD on its session fd.
* Retrieved files stay referenced by the agent, so a retrieve can be repeated
  (each reply carries a new reference via SCM_RIGHTS).
* Every connection's peer is checked with SO_PEERCRED: uid 0 or the agent's
  own euid; anybody else gets a clear refusal. The socket is mode 0600 in a
  0700 directory.
* Requests that would drop preserved state (``release`` of an outgoing
  session with files, of an unfinished incoming one, ``stop`` while holding
  such sessions) are refused unless ``force`` is set. Likewise the first
  SIGTERM/SIGINT while holding such state is only logged; a second one
  within 10 s stops the agent. Note that ``systemctl kexec`` stops every
  process before rebooting: use ``pyiommufd kexec`` (or ``kexec -e``),
  which reboot directly while the agent keeps the fds.
"""
from __future__ import annotations

import errno as E
import logging
import os
import select
import selectors
import signal
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import __version__, errors
from ..backend import Backend, get_backend
from ..errors import UsageError
from ..luo import DEVICE, LiveUpdate, Session, PreservedFile, check_session_name, check_token, describe_fd
from . import protocol as P
from . import sdnotify
from .protocol import AgentRefused

log = logging.getLogger("pyiommufd.agent")
log.addHandler(logging.NullHandler())

SOCKET_PATH_MAX = 107  # sizeof(sun_path) - 1
MAX_CONNECTIONS = 64   # served at once; more wait in the listen backlog
BACKLOG = 128
FILE_KINDS = ("memfd", "iommufd", "vfio-cdev", "manifest", "other")


def kind_of_fd(backend: Backend, fd: int) -> str:
    """memfd / iommufd / vfio-cdev / other, from what ``fd`` is."""
    text = describe_fd(backend, fd) or ""
    if text == "a memfd":
        return "memfd"
    if text == "an iommufd":
        return "iommufd"
    if text == "a VFIO device cdev":
        return "vfio-cdev"
    return "other"


@dataclass
class HeldFile:
    """One token of a session as the agent knows it."""

    token: int
    kind: str
    name: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    fd: int | None = None        # the agent's own reference, if it holds one
    state: str = "preserved"     # preserved | retrieved | pending | failed
    error: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {"token": self.token, "token_hex": f"{self.token:#x}", "kind": self.kind, "name": self.name,
               "meta": self.meta, "state": self.state, "held": self.fd is not None}
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class HeldSession:
    name: str
    session: Session
    incoming: bool
    files: dict[int, HeldFile] = field(default_factory=dict)
    adopted: bool = False
    manifest: dict[str, Any] | None = None
    manifest_error: str | None = None
    since: float = field(default_factory=time.time)

    @property
    def direction(self) -> str:
        return "incoming" if self.incoming else "outgoing"

    @property
    def key(self) -> tuple[str, bool]:
        return (self.name, self.incoming)

    def as_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "direction": self.direction, "fd": self.session._fd,
               "adopted": self.adopted, "since": self.since,
               "tokens": [f.as_dict() for f in sorted(self.files.values(), key=lambda f: f.token)]}
        if self.incoming:
            out["manifest"] = self.manifest is not None
            if self.manifest_error:
                out["manifest_error"] = self.manifest_error
            out["unretrieved"] = [f.token for f in self.files.values() if f.state != "retrieved"]
        return out


class _Fds:
    """The fds of one request. Handlers ``take`` what they keep; the rest is
    closed after the request."""

    def __init__(self, backend: Backend, fds: list[int]):
        self.backend = backend
        self.fds = list(fds)
        self.kept: set[int] = set()

    def get(self, index: Any, what: str) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.fds):
            raise UsageError(f"{what}: fd index {index!r} does not name one of the {len(self.fds)} "
                             "file descriptors sent with the request")
        return self.fds[index]

    def keep(self, fd: int) -> int:
        self.kept.add(fd)
        return fd

    def close_rest(self) -> None:
        for fd in self.fds:
            if fd in self.kept:
                continue
            _close(self.backend, fd)


def _close(backend: Backend, fd: int | None) -> None:
    if fd is None:
        return
    try:
        backend.close(fd)
    except OSError:
        try:
            os.close(fd)
        except OSError:
            pass


def _require(args: dict, key: str, kind: type | tuple, what: str | None = None):
    value = args.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise UsageError(f"request argument {key!r} ({what or key}) is missing or has the wrong type")
    return value


def _meta(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError("meta must be a JSON object")
    return dict(value)


def default_authorize(euid: int) -> Callable[[int, int, int], str | None]:
    """uid 0 and the agent's own euid may talk to it; nobody else."""

    def authorize(pid: int, uid: int, gid: int) -> str | None:
        if uid == 0 or uid == euid:
            return None
        return (f"peer pid {pid} runs as uid {uid}; this agent (euid {euid}) accepts only uid 0 "
                f"and uid {euid}")

    return authorize


class AgentServer:
    """The agent. ``start()`` binds the socket and opens ``/dev/liveupdate``;
    ``serve_forever()`` answers requests until ``stop``; ``serve_in_thread()``
    does both in a daemon thread (unit tests, in-process agents);
    ``shutdown()`` stops and closes everything it holds (which unpreserves
    outgoing sessions, as the kernel would on process exit)."""

    def __init__(self, socket_path: str | os.PathLike | None = None, *, backend: Backend | None = None,
                 open_liveupdate: bool = True, liveupdate_path: str = DEVICE,
                 peercred: Callable[[socket.socket], tuple[int, int, int]] | None = None,
                 authorize: Callable[[int, int, int], str | None] | None = None,
                 timeout: float = 10.0, notify: "sdnotify.Notifier | None | str" = "environ",
                 inherited: list[tuple[int, str]] | None = None):
        self.socket_path = P.default_socket_path(socket_path)
        if len(os.fsencode(self.socket_path)) > SOCKET_PATH_MAX:
            raise UsageError(f"agent socket path is longer than {SOCKET_PATH_MAX} bytes: {self.socket_path}")
        self.backend = get_backend(backend)
        self.open_liveupdate = open_liveupdate
        self.liveupdate_path = liveupdate_path
        self.euid = os.geteuid()
        self._peercred = peercred or P.peer_credentials
        self._authorize = authorize or default_authorize(self.euid)
        self.timeout = timeout
        self.liveupdate: LiveUpdate | None = None
        self.liveupdate_error: str | None = None
        self.sessions: dict[tuple[str, bool], HeldSession] = {}
        self.started = time.time()
        self._sock: socket.socket | None = None
        self._wake_r = self._wake_w = -1
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._handlers: set[threading.Thread] = set()
        self._bound_inode: tuple[int, int] | None = None
        # systemd's fd store: a copy of every fd we hold, so a crash of this
        # process loses nothing (sdnotify); "environ" reads $NOTIFY_SOCKET
        self.notifier = sdnotify.Notifier.from_environ() if notify == "environ" else notify
        self.stored: set[str] = set()
        self.inherited = list(inherited or [])
        self.restored: dict[str, Any] | None = None

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> "AgentServer":
        from ..rlimits import raise_nofile

        raise_nofile()  # the agent holds every preserved and retrieved fd
        self._bind()
        if self.inherited:
            self._take_back(self.inherited)
            self.inherited = []
        if self.open_liveupdate:
            self._try_open_liveupdate()
        log.info("pyiommufd agent %s listening on %s (pid %d, backend %s)", __version__,
                 self.socket_path, os.getpid(), self.backend.name)
        if self.notifier is not None:
            self.notifier.ready(f"holding {len(self.sessions)} session(s)")
        return self

    def _bind(self) -> None:
        path = self.socket_path
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
        elif os.path.abspath(path) == P.DEFAULT_SOCKET:
            os.chmod(directory, 0o700)
        self._check_directory(directory)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if stat.S_ISLNK(st.st_mode):
                raise UsageError(f"{path} is a symlink; refusing to use it as the agent socket")
            if not stat.S_ISSOCK(st.st_mode):
                raise UsageError(f"{path} exists and is not a socket; refusing to replace it")
            if st.st_uid not in (0, self.euid):
                raise UsageError(f"{path} is owned by uid {st.st_uid}, not by this agent (euid {self.euid}) "
                                 "or root; refusing to replace it")
            if _answers(path):
                raise AgentRefused(f"an agent is already running on {path} (`pyiommufd agent status`)")
            os.unlink(path)  # stale socket of a dead agent
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(BACKLOG)
        st = os.stat(path)
        self._bound_inode = (st.st_dev, st.st_ino)
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def _check_directory(self, directory: str) -> None:
        """Whoever controls the socket's directory can swap the socket for
        their own and be handed every fd: it must be a real directory, owned
        by root or us, writable by nobody else (unless sticky, like /tmp)."""
        st = os.lstat(directory)
        if stat.S_ISLNK(st.st_mode):
            raise UsageError(f"the agent socket's directory {directory} is a symlink; refusing to use it")
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"the agent socket's directory {directory} is not a directory")
        if st.st_uid not in (0, self.euid):
            raise UsageError(f"the agent socket's directory {directory} is owned by uid {st.st_uid}, not by "
                             f"root or this agent (euid {self.euid}); refusing to use it")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UsageError(f"the agent socket's directory {directory} is writable by others "
                             f"(mode {stat.S_IMODE(st.st_mode):o}); refusing to use it")

    def _try_open_liveupdate(self) -> LiveUpdate | None:
        if self.liveupdate is not None:
            return self.liveupdate
        try:
            self.liveupdate = LiveUpdate.open(self.liveupdate_path, backend=self.backend)
            self.liveupdate_error = None
            log.info("holding %s (fd %d)", self.liveupdate_path, self.liveupdate.fd)
            self._store(sdnotify.LUO_NAME, self.liveupdate.fd)
        except errors.KernelError as exc:
            self.liveupdate_error = str(exc)
            log.warning("cannot open %s: %s", self.liveupdate_path, exc)
        return self.liveupdate

    def _need_liveupdate(self) -> LiveUpdate:
        if self.liveupdate is not None:
            return self.liveupdate
        try:
            self.liveupdate = LiveUpdate.open(self.liveupdate_path, backend=self.backend)
        except errors.KernelError as exc:
            self.liveupdate_error = str(exc)
            raise
        self.liveupdate_error = None
        self._store(sdnotify.LUO_NAME, self.liveupdate.fd)
        return self.liveupdate

    def serve_forever(self) -> None:
        if self._sock is None:
            self.start()
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select(timeout=1.0):
                    if key.fileobj is self._sock:
                        try:
                            conn, _ = self._sock.accept()
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError as exc:       # EMFILE and the like: keep serving
                            log.warning("accept failed: %s", exc)
                            time.sleep(0.1)
                            continue
                        self._dispatch(conn)
                    else:
                        try:
                            os.read(self._wake_r, 64)
                        except BlockingIOError:
                            pass
        finally:
            sel.close()
            self._close_listener()
            for t in list(self._handlers):
                t.join(self.timeout + 1)
            if getattr(self, "_release_on_exit", True):
                self._release_everything()
            self._stopped.set()
            log.info("agent stopped")

    def _dispatch(self, conn: socket.socket) -> None:
        """Serve ``conn`` in a thread of its own, so one slow or silent peer
        holds up nobody; requests still run one at a time (``_lock``)."""
        while not self._slots.acquire(timeout=1.0):
            if self._stopping.is_set():
                conn.close()
                return
        thread = threading.Thread(target=self._handle, args=(conn,), name="pyiommufd-agent-conn", daemon=True)
        self._handlers.add(thread)
        thread.start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._serve_connection(conn)
        except Exception:  # noqa: BLE001 - nothing a peer sends may end the agent
            log.exception("serving a connection failed")
        finally:
            self._handlers.discard(threading.current_thread())
            self._slots.release()

    def serve_in_thread(self) -> "AgentServer":
        if self._sock is None:
            self.start()
        self._thread = threading.Thread(target=self.serve_forever, name="pyiommufd-agent", daemon=True)
        self._thread.start()
        return self

    def request_stop(self, *, release: bool = True) -> None:
        self._release_on_exit = release
        self._stopping.set()
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def shutdown(self, *, release: bool = True, timeout: float = 10.0) -> None:
        """Stop serving and (with ``release``) close every held fd through the
        backend, which unpreserves outgoing sessions. ``release=False`` only
        stops listening: the fds stay open in this process (for a simulated
        kexec, where the old kernel's files vanish anyway)."""
        self.request_stop(release=release)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        elif not self._stopped.is_set():
            self._close_listener()
            if release:
                self._release_everything()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = -1

    def holding_state(self) -> list[str]:
        """Why stopping now would drop live-update state (empty: it would not)."""
        return [w for w in (self._release_warning(s) for s in list(self.sessions.values())) if w]

    def install_signal_handlers(self, grace: float = 10.0) -> None:
        """SIGTERM/SIGINT stop the agent, except while it holds preserved or
        unfinished sessions: then the first signal is only logged (a service
        manager or a stray kill must not unpreserve everything) and a second
        one within ``grace`` seconds stops it. SIGHUP is ignored."""
        last = [0.0]

        def handler(signum, frame):
            holding = self.holding_state()
            now = time.monotonic()
            if holding and now - last[0] > grace:
                last[0] = now
                log.warning("signal %d ignored: %s; send it again within %gs to stop anyway, or use "
                            "`pyiommufd agent stop --force`", signum, "; ".join(holding), grace)
                return
            log.warning("signal %d: stopping; closing the session fds unpreserves outgoing sessions", signum)
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _close_listener(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        sock.close()
        try:
            st = os.stat(self.socket_path)
            if (st.st_dev, st.st_ino) == self._bound_inode:
                os.unlink(self.socket_path)
        except OSError:
            pass

    def _release_everything(self) -> None:
        with self._lock:
            for held in list(self.sessions.values()):
                self._close_session(held)
            self.sessions.clear()
            if self.liveupdate is not None:
                self._unstore(sdnotify.LUO_NAME)
                try:
                    self.liveupdate.close()
                except OSError:
                    pass
                self.liveupdate = None

    def _close_session(self, held: HeldSession) -> None:
        # The session fd first: for an outgoing session the kernel unpreserves
        # while our file references still exist; then our own references.
        # the fd store lets go first, or its copies would keep the session alive
        self._unstore(sdnotify.session_fdname(held.name, held.incoming))
        for f in held.files.values():
            if f.fd is not None:
                self._unstore(sdnotify.file_fdname(held.name, held.incoming, f.token))
        try:
            held.session.close()
        except OSError as exc:
            log.warning("closing session %r: %s", held.name, exc)
        for f in held.files.values():
            _close(self.backend, f.fd)
            f.fd = None
        log.info("closed %s session %r", held.direction, held.name)

    # -- connections -------------------------------------------------------------
    def _serve_connection(self, conn: socket.socket) -> None:
        conn.settimeout(self.timeout)
        try:
            pid, uid, gid = self._peercred(conn)
        except OSError as exc:
            log.warning("SO_PEERCRED failed: %s; dropping the connection", exc)
            return
        reason = self._authorize(pid, uid, gid)
        if reason is not None:
            log.warning("refused peer pid %d uid %d: %s", pid, uid, reason)
            try:
                P.send_message(conn, P.reply_error(P.AgentPermissionDenied(reason)))
            except OSError:
                pass
            return
        try:
            msg, raw_fds = P.recv_message(conn)
        except (P.AgentProtocolError, OSError) as exc:
            log.warning("bad request from pid %d: %s", pid, exc)
            try:
                P.send_message(conn, P.reply_error(P.AgentProtocolError(str(exc))))
            except OSError:
                pass
            return
        fds = _Fds(self.backend, raw_fds)
        out_fds: list[int] = []
        try:
            op, args = self._parse(msg)
            with self._lock:
                result, out_fds = getattr(self, f"_op_{op}")(args, fds)
            reply = P.reply_ok(result)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the client
            if not isinstance(exc, (errors.PyiommufdError, OSError)):
                log.exception("request failed unexpectedly")
            else:
                log.info("request from pid %d failed: %s", pid, exc)
            reply = P.reply_error(exc)
            out_fds = []
        finally:
            fds.close_rest()
        try:
            P.send_message(conn, reply, out_fds)
        except OSError as exc:
            log.warning("could not reply to pid %d: %s", pid, exc)

    @staticmethod
    def _parse(msg: Any) -> tuple[str, dict]:
        if not isinstance(msg, dict):
            raise P.AgentProtocolError("a request is a JSON object")
        if msg.get("v") != P.VERSION:
            raise P.AgentProtocolError(f"protocol version {msg.get('v')!r} is not {P.VERSION}")
        op = msg.get("op")
        if op not in P.OPS:
            raise P.AgentProtocolError(f"unknown request {op!r} (known: {', '.join(P.OPS)})")
        args = msg.get("args") or {}
        if not isinstance(args, dict):
            raise P.AgentProtocolError("request args must be a JSON object")
        return op, args

    # -- lookups -------------------------------------------------------------------
    def _session(self, name: Any, incoming: bool) -> HeldSession:
        if not isinstance(name, str):
            raise UsageError("a session name is required")
        held = self.sessions.get((name, incoming))
        if held is None:
            other = self.sessions.get((name, not incoming))
            direction = "incoming" if incoming else "outgoing"
            if other is not None:
                raise UsageError(f"the agent holds session {name!r} only as {other.direction}, "
                                 f"this request needs it {direction}")
            verb = "retrieve it first (after kexec)" if incoming else "create it first"
            raise UsageError(f"the agent holds no {direction} session {name!r}: {verb}")
        return held

    def _info(self) -> dict[str, Any]:
        if self.liveupdate is not None:
            lu = {"held": True, "fd": self.liveupdate._fd, "path": self.liveupdate_path}
        else:
            lu = {"held": False, "path": self.liveupdate_path, "error": self.liveupdate_error}
        return {"pid": os.getpid(), "euid": self.euid, "version": __version__, "socket": self.socket_path,
                "backend": self.backend.name, "started": self.started, "liveupdate": lu,
                "fdstore": self._fdstore_info()}

    # -- systemd's fd store ------------------------------------------------------------
    def _fdstore_info(self) -> dict[str, Any]:
        if self.notifier is None:
            return {"enabled": False, "stored": 0, "restored": self.restored}
        return {"enabled": True, "notify_socket": self.notifier.address, "stored": len(self.stored),
                "error": self.notifier.error, "restored": self.restored}

    def _store(self, name: str, fd: int | None) -> None:
        if self.notifier is None or fd is None or name in self.stored:
            return
        if self.notifier.store(name, fd):
            self.stored.add(name)

    def _unstore(self, name: str) -> None:
        if self.notifier is None or name not in self.stored:
            return
        self.notifier.remove(name)
        self.stored.discard(name)

    def _store_session(self, held: HeldSession) -> None:
        self._store(sdnotify.session_fdname(held.name, held.incoming), held.session._fd)

    def _store_file(self, held: HeldSession, f: HeldFile) -> None:
        self._store(sdnotify.file_fdname(held.name, held.incoming, f.token), f.fd)

    def _take_back(self, inherited: list[tuple[int, str]]) -> None:
        """Rebuild the bookkeeping from fds a service manager handed back
        (``$LISTEN_FDS``): what each fd is comes from its name, kinds and
        names of files from the session's manifest (token 0) when it has one."""
        parsed: list[tuple[int, str, sdnotify.FdName]] = []
        ignored: list[str] = []
        for fd, text in inherited:
            name = sdnotify.parse_fdname(text)
            if name is None:
                # not ours: leave it in the store, close our copy
                log.warning("fd %d named %r was handed to us but is not one of ours; ignored", fd, text)
                ignored.append(text)
                _close(self.backend, fd)
                continue
            parsed.append((fd, text, name))
        lost: list[str] = []
        for fd, text, name in parsed:
            if name.what != "luo":
                continue
            if self.liveupdate is None:
                self.liveupdate = LiveUpdate(fd, backend=self.backend)
                self.liveupdate_error = None
                self.stored.add(text)
            else:
                _close(self.backend, fd)
        for fd, text, name in parsed:
            if name.what != "session":
                continue
            session = Session(fd, name.session, incoming=name.incoming, backend=self.backend)
            try:
                actual = session.get_name()
            except (errors.PyiommufdError, OSError) as exc:
                actual = f"? ({exc})"
            if actual != name.session or (name.session, name.incoming) in self.sessions:
                log.warning("fd %d named %r is not that session (the kernel calls it %r); ignored",
                            fd, text, actual)
                ignored.append(text)
                _close(self.backend, fd)
                continue
            held = HeldSession(name.session, session, incoming=name.incoming, adopted=True)
            self.sessions[held.key] = held
            self.stored.add(text)
        for fd, text, name in parsed:
            if name.what != "file":
                continue
            held = self.sessions.get((name.session, name.incoming))
            if held is None or name.token in held.files:
                # its session fd is gone: the kernel dropped that session with it
                lost.append(text)
                _close(self.backend, fd)
                if self.notifier is not None:
                    self.notifier.remove(text)
                continue
            kind = kind_of_fd(self.backend, fd)
            if name.incoming:
                held.session.retrieved[name.token] = fd
                state = "retrieved"
            else:
                held.session.preserved[name.token] = PreservedFile(name.token, fd, kind)
                state = "preserved"
            held.files[name.token] = HeldFile(name.token, kind, fd=fd, state=state)
            self.stored.add(text)
        for held in self.sessions.values():
            zero = held.files.get(0)
            if zero is not None and zero.fd is not None:
                self._load_manifest(held, zero.fd)
        if lost:
            log.warning("fds of sessions that no longer exist were dropped: %s", ", ".join(lost))
        self.restored = {"fds": len(inherited), "sessions": len(self.sessions),
                         "files": sum(len(h.files) for h in self.sessions.values()),
                         "ignored": ignored, "lost": lost}
        log.info("took back %d fd(s) from the service manager: %d session(s), %d file(s)", len(inherited),
                 self.restored["sessions"], self.restored["files"])

    # -- requests --------------------------------------------------------------------
    def _op_ping(self, args, fds):
        return self._info(), []

    def _op_status(self, args, fds):
        sessions = [s.as_dict() for s in sorted(self.sessions.values(), key=lambda s: (s.name, s.incoming))]
        return {"agent": self._info(), "sessions": sessions}, []

    def _op_create_session(self, args, fds):
        name = _require(args, "name", str, "session name")
        check_session_name(name)
        if (name, False) in self.sessions:
            raise errors.make_error("LIVEUPDATE_IOCTL_CREATE_SESSION", "luo", E.EEXIST,
                                    detail=f"session {name!r} (held by this agent)")
        session = self._need_liveupdate().create_session(name)
        held = HeldSession(name, session, incoming=False)
        self.sessions[held.key] = held
        log.info("created outgoing session %r (fd %d)", name, session.fd)
        self._store_session(held)
        return held.as_dict(), []

    def _op_preserve(self, args, fds):
        held = self._session(args.get("session"), incoming=False)
        token = check_token(args.get("token"))
        meta = _meta(args.get("meta"))
        fd = fds.get(args.get("fd", 0), "preserve")
        if token in held.files:
            # the kernel says EEXIST too; answer without touching it
            raise errors.make_error("LIVEUPDATE_SESSION_PRESERVE_FD", "luo", E.EEXIST,
                                    detail=f"session {held.name!r}, token {token:#x}")
        held.session.preserve(fd, token)
        kind = P.normalize_kind(meta.pop("kind", None)) or kind_of_fd(self.backend, fd)
        name = meta.pop("name", None)
        held.files[token] = HeldFile(token, str(kind), name, meta, fds.keep(fd), "preserved")
        log.info("preserved token %#x (%s %s) in %r", token, kind, name or "", held.name)
        self._store_file(held, held.files[token])
        return held.files[token].as_dict(), []

    def _op_preserve_many(self, args, fds):
        """``files``: ``[{"token", "fd" (index), "meta"}]``, preserved in order
        by one :meth:`Session.preserve_many`. Everything is checked first; on a
        failure part-way the files before it stay preserved and held."""
        held = self._session(args.get("session"), incoming=False)
        specs = args.get("files")
        if not isinstance(specs, list):
            raise UsageError("preserve_many: files must be a list")
        items, seen = [], set()
        for spec in specs:
            if not isinstance(spec, dict):
                raise UsageError("preserve_many: each file is an object")
            token = check_token(spec.get("token"))
            fd = fds.get(spec.get("fd"), f"preserve_many token {token:#x}")
            if token in held.files or token in seen:
                raise errors.make_error("LIVEUPDATE_SESSION_PRESERVE_FD", "luo", E.EEXIST,
                                        detail=f"session {held.name!r}, token {token:#x}")
            seen.add(token)
            items.append((token, fd, _meta(spec.get("meta"))))
        try:
            held.session.preserve_many([(fd, token) for token, fd, _ in items])
        except errors.KernelError as exc:
            self._hold_preserved(held, items[:getattr(exc, "index", 0)], fds)
            raise
        return {"files": self._hold_preserved(held, items, fds)}, []

    def _hold_preserved(self, held: HeldSession, items, fds) -> list[dict[str, Any]]:
        out = []
        for token, fd, meta in items:
            kind = P.normalize_kind(meta.pop("kind", None)) or kind_of_fd(self.backend, fd)
            name = meta.pop("name", None)
            f = held.files[token] = HeldFile(token, str(kind), name, meta, fds.keep(fd), "preserved")
            self._store_file(held, f)
            out.append(f.as_dict())
        log.info("preserved %d files in %r", len(items), held.name)
        return out

    def _op_adopt(self, args, fds):
        lu_index = args.get("liveupdate")
        specs = args.get("sessions") or []
        if not isinstance(specs, list):
            raise UsageError("adopt: sessions must be a list")
        plans = []
        for spec in specs:
            if not isinstance(spec, dict):
                raise UsageError("adopt: each session is an object")
            name = _require(spec, "name", str, "session name")
            check_session_name(name)
            direction = spec.get("direction", "outgoing")
            if direction not in ("outgoing", "incoming"):
                raise UsageError(f"adopt: direction must be outgoing or incoming, not {direction!r}")
            incoming = direction == "incoming"
            if (name, incoming) in self.sessions:
                raise UsageError(f"adopt: the agent holds {direction} session {name!r} already")
            session_fd = fds.get(spec.get("fd"), f"adopt session {name!r}")
            files = []
            seen: set[int] = set()
            for f in spec.get("files") or []:
                if not isinstance(f, dict):
                    raise UsageError("adopt: each file is an object")
                token = check_token(f.get("token"))
                if token in seen:
                    raise UsageError(f"adopt: token {token:#x} listed twice in session {name!r}")
                seen.add(token)
                ffd = None if f.get("fd") is None else fds.get(f.get("fd"), f"adopt token {token:#x}")
                files.append((token, ffd, f))
            self._check_session_fd(session_fd, name)
            plans.append((name, incoming, session_fd, files, spec))
        lu_fd = None if lu_index is None else fds.get(lu_index, "adopt /dev/liveupdate")
        if lu_fd is not None and self.liveupdate is None:
            if describe_fd(self.backend, lu_fd) != self.liveupdate_path:
                raise UsageError(f"adopt: the fd sent as /dev/liveupdate is not {self.liveupdate_path} "
                                 f"({describe_fd(self.backend, lu_fd) or 'unknown'})")
        # everything checked: take the fds
        result = {"liveupdate": None, "sessions": []}
        if lu_fd is not None:
            if self.liveupdate is None:
                self.liveupdate = LiveUpdate(fds.keep(lu_fd), backend=self.backend)
                self.liveupdate_error = None
                result["liveupdate"] = "adopted"
                log.info("adopted /dev/liveupdate (fd %d)", lu_fd)
                self._store(sdnotify.LUO_NAME, lu_fd)
            else:
                result["liveupdate"] = "already held"
        for name, incoming, session_fd, files, spec in plans:
            session = Session(fds.keep(session_fd), name, incoming=incoming, backend=self.backend)
            held = HeldSession(name, session, incoming=incoming, adopted=True)
            for token, ffd, f in files:
                if ffd is not None:
                    fds.keep(ffd)
                meta = _meta(f.get("meta"))
                kind = P.normalize_kind(f.get("kind") or meta.pop("kind", None)) or (
                    kind_of_fd(self.backend, ffd) if ffd is not None else "other")
                fname = f.get("name") or meta.pop("name", None)
                if incoming:
                    state = f.get("state") or ("retrieved" if ffd is not None else "pending")
                    if state == "retrieved" and ffd is not None:
                        session.retrieved[token] = ffd
                else:
                    state = "preserved"
                    session.preserved[token] = PreservedFile(token, ffd if ffd is not None else -1, kind)
                held.files[token] = HeldFile(token, str(kind), fname, meta, ffd, state)
            if incoming:
                if 0 in held.files and held.files[0].fd is not None:
                    self._load_manifest(held, held.files[0].fd)
                session.expected_tokens = set(held.files)
            self.sessions[held.key] = held
            result["sessions"].append(held.as_dict())
            log.info("adopted %s session %r with %d files", held.direction, name, len(held.files))
            self._store_session(held)
            for f in held.files.values():
                self._store_file(held, f)
        return result, []

    def _check_session_fd(self, fd: int, name: str) -> None:
        """An fd handed over as session ``name`` must be that LUO session."""
        try:
            actual = Session(fd, name, incoming=False, backend=self.backend, owned=False).get_name()
        except (errors.PyiommufdError, OSError):
            raise UsageError(f"adopt: the fd sent as session {name!r} is not a LUO session") from None
        if actual != name:
            raise UsageError(f"adopt: the fd sent as session {name!r} is LUO session {actual!r}")

    def _load_manifest(self, held: HeldSession, fd: int) -> None:
        from .. import manifest as M

        try:
            manifest = M.read_from_fd(fd, self.backend)
        except UsageError as exc:
            held.manifest_error = str(exc)
            return
        held.manifest = manifest.as_dict()
        held.manifest_error = None
        zero = held.files.get(M.MANIFEST_TOKEN)
        if zero is not None:
            zero.kind, zero.name = "manifest", M.MANIFEST_NAME
        for entry in manifest.entries:
            f = held.files.get(entry.token)
            if f is None:
                if not held.incoming:
                    continue  # an outgoing file we hold no fd of: nothing to say about it
                f = held.files[entry.token] = HeldFile(entry.token, entry.kind, state="pending")
            f.kind, f.name = entry.kind, entry.name
            f.meta = {k: v for k, v in entry.as_dict().items() if k not in ("token", "kind", "name")}
        held.session.expected_tokens = set(manifest.tokens)

    def _op_retrieve_session(self, args, fds):
        name = _require(args, "name", str, "session name")
        check_session_name(name)
        held = self.sessions.get((name, True))
        if held is not None:
            out = held.as_dict()
            out["already_held"] = True
            return out, []
        session = self._need_liveupdate().retrieve_session(name)
        held = HeldSession(name, session, incoming=True)
        self.sessions[held.key] = held
        log.info("retrieved incoming session %r (fd %d)", name, session.fd)
        self._store_session(held)
        from ..manifest import MANIFEST_NAME, MANIFEST_TOKEN

        if args.get("manifest", True):
            try:
                fd = session.retrieve(MANIFEST_TOKEN)
            except errors.NotFound:
                held.manifest_error = "no token 0: this session has no pyiommufd manifest"
            except errors.KernelError as exc:
                held.files[MANIFEST_TOKEN] = HeldFile(MANIFEST_TOKEN, "manifest", MANIFEST_NAME, state="failed",
                                                      error=P.encode_error(exc))
                held.manifest_error = f"retrieving token 0 failed: {exc}"
            else:
                held.files[MANIFEST_TOKEN] = HeldFile(MANIFEST_TOKEN, "manifest", MANIFEST_NAME, fd=fd,
                                                      state="retrieved")
                self._store_file(held, held.files[MANIFEST_TOKEN])
                self._load_manifest(held, fd)
        out = held.as_dict()
        out["already_held"] = False
        return out, []

    def _op_retrieve(self, args, fds):
        held = self._session(args.get("session"), incoming=True)
        token = check_token(args.get("token"))
        f = held.files.get(token)
        if f is not None and f.fd is not None:
            return f.as_dict(), [f.fd]
        try:
            fd = held.session.retrieve(token)
        except errors.KernelError as exc:
            if f is None:
                f = held.files[token] = HeldFile(token, "other")
            f.state, f.error = "failed", P.encode_error(exc)
            raise
        if f is None:
            f = held.files[token] = HeldFile(token, kind_of_fd(self.backend, fd))
        f.fd, f.state, f.error = fd, "retrieved", None
        log.info("retrieved token %#x (%s %s) of %r", token, f.kind, f.name or "", held.name)
        self._store_file(held, f)
        return f.as_dict(), [fd]

    def _op_retrieve_many(self, args, fds):
        """``tokens``, retrieved in order (those held already are not asked
        again) by one :meth:`Session.retrieve_all`; answers ``files`` and one
        fd per token. On a failure part-way the ones before it stay held."""
        held = self._session(args.get("session"), incoming=True)
        tokens = args.get("tokens")
        if not isinstance(tokens, list):
            raise UsageError("retrieve_many: tokens must be a list")
        tokens = [check_token(t) for t in tokens]
        todo = [t for t in tokens if held.files.get(t) is None or held.files[t].fd is None]
        try:
            got = held.session.retrieve_all(todo)
        except errors.KernelError as exc:
            index = getattr(exc, "index", 0)
            self._hold_retrieved(held, dict(zip(todo[:index], (held.session.retrieved[t] for t in todo[:index]))))
            f = held.files.get(todo[index])
            if f is None:
                f = held.files[todo[index]] = HeldFile(todo[index], "other")
            f.state, f.error = "failed", P.encode_error(exc)
            exc.index = tokens.index(todo[index])
            raise
        self._hold_retrieved(held, got)
        return {"files": [held.files[t].as_dict() for t in tokens]}, [held.files[t].fd for t in tokens]

    def _hold_retrieved(self, held: HeldSession, got: dict[int, int]) -> None:
        for token, fd in got.items():
            f = held.files.get(token)
            if f is None:
                f = held.files[token] = HeldFile(token, kind_of_fd(self.backend, fd))
            f.fd, f.state, f.error = fd, "retrieved", None
        log.info("retrieved %d tokens of %r", len(got), held.name)

    def _op_finish(self, args, fds):
        held = self._session(args.get("session"), incoming=True)
        held.session.finish()
        log.info("finished session %r", held.name)
        self._close_session(held)
        del self.sessions[held.key]
        return {"finished": held.name, "released_tokens": sorted(held.files)}, []

    def _op_release(self, args, fds):
        name = _require(args, "session", str, "session name")
        force = bool(args.get("force", False))
        direction = args.get("direction")
        if direction not in (None, "outgoing", "incoming"):
            raise UsageError(f"direction must be outgoing or incoming, not {direction!r}")
        if direction is None:
            matches = [s for s in self.sessions.values() if s.name == name]
            if len(matches) > 1:
                raise UsageError(f"the agent holds session {name!r} both outgoing and incoming: "
                                 "say which (direction)")
            if not matches:
                raise UsageError(f"the agent holds no session {name!r}")
            held = matches[0]
        else:
            held = self._session(name, incoming=direction == "incoming")
        warning = self._release_warning(held)
        if warning and not force:
            raise AgentRefused(f"{warning}; pass force to do it anyway")
        self._close_session(held)
        del self.sessions[held.key]
        return {"released": held.name, "direction": held.direction, "warning": warning,
                "tokens": sorted(held.files)}, []

    @staticmethod
    def _release_warning(held: HeldSession) -> str | None:
        if not held.incoming and held.files:
            return (f"closing outgoing session {held.name!r} unpreserves its {len(held.files)} "
                    f"file(s) (tokens {', '.join(hex(t) for t in sorted(held.files))})")
        if held.incoming:
            return (f"closing incoming session {held.name!r} attempts FINISH; if that fails the "
                    "session stays in the kernel, un-retrievable, until the next live update")
        return None

    def _op_stop(self, args, fds):
        force = bool(args.get("force", False))
        warnings = self.holding_state()
        if warnings and not force:
            raise AgentRefused("the agent holds live-update state: " + "; ".join(warnings) +
                               "; stopping would drop it (stop --force to do it anyway)")
        self.request_stop()
        return {"stopping": True, "pid": os.getpid(), "warnings": warnings}, []


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(2.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


# -- daemon ---------------------------------------------------------------------
DEFAULT_LOG = "/run/pyiommufd/agent.log"


def default_log_path(socket_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(socket_path)), "agent.log")


def configure_logging(level: int = logging.INFO, stream=None) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s pyiommufd-agent[%(process)d] %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def run_foreground(socket_path: str | None = None, *, backend: Backend | None = None) -> None:
    """Start, serve until ``stop`` or SIGTERM/SIGINT, close everything.
    Under systemd, fds handed back from its fd store (``$LISTEN_FDS``) are
    taken back first."""
    server = AgentServer(socket_path, backend=backend, inherited=sdnotify.listen_fds()).start()
    server.install_signal_handlers()
    server.serve_forever()


def start_background(socket_path: str | None = None, *, log_file: str | None = None,
                     timeout: float = 15.0) -> int:
    """Daemonize an agent (double fork, setsid, stdio to ``log_file``) and
    return its pid once it listens. Raises the agent's start error otherwise.

    Fork this only from a process that holds nothing worth keeping out of
    the daemon (the CLI spawns ``python -m pyiommufd.agent`` for that)."""
    path = P.default_socket_path(socket_path)
    log_file = log_file or default_log_path(path)
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid:
        os.close(w)
        os.waitpid(pid, 0)
        chunks = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    chunks.append(b" (timed out waiting for it)")
                    break
                ready, _, _ = select.select([r], [], [], left)
                if not ready:
                    continue
                data = os.read(r, 4096)
                if not data:
                    break
                chunks.append(data)
        finally:
            os.close(r)
        status = b"".join(chunks).decode(errors="replace").strip()
        if status.startswith("ok "):
            return int(status.split()[1])
        raise P.AgentUnavailable(f"the background agent did not start: {status or 'no status'} "
                                 f"(log: {log_file})")
    # first child
    try:
        os.close(r)
        os.setsid()
        if os.fork():
            os._exit(0)
        # the daemon
        os.chdir("/")
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), mode=0o700, exist_ok=True)
        logfd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        os.close(null)
        os.close(logfd)
        import sys

        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        configure_logging(stream=sys.stderr)
        try:
            server = AgentServer(path).start()
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            os.write(w, f"error {exc}\n".encode())
            os._exit(1)
        server.install_signal_handlers()
        os.write(w, f"ok {os.getpid()}\n".encode())
        os.close(w)
        try:
            server.serve_forever()
        finally:
            os._exit(0)
    except BaseException as exc:  # noqa: BLE001
        try:
            os.write(w, f"error {type(exc).__name__}: {exc}\n".encode())
        except OSError:
            pass
        os._exit(1)


__all__ = ["AgentServer", "HeldSession", "HeldFile", "default_authorize", "run_foreground",
           "start_background", "configure_logging", "kind_of_fd", "default_log_path"]
