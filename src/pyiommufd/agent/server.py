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

import logging
import os
import queue
import selectors
import signal
import socket
import stat
import threading
import time
from types import FrameType
from typing import Any, Callable, Literal

from .. import __version__, errors
from ..backend import Backend, get_backend
from ..errors import UsageError
from ..luo import DEVICE
from . import protocol as P
from . import sdnotify
from .handlers import RequestFds, RequestHandlers
from .protocol import AgentRefused

log = logging.getLogger("pyiommufd.agent")
log.addHandler(logging.NullHandler())

SOCKET_PATH_MAX = 107  # sizeof(sun_path) - 1
MAX_CONNECTIONS = 64   # accepted and not yet answered; more wait in the listen backlog
WORKERS = 16           # threads that serve connections, all started with the agent
BACKLOG = 128


def default_authorize(euid: int) -> Callable[[int, int, int], str | None]:
    """uid 0 and the agent's own euid may talk to it; nobody else."""

    def authorize(pid: int, uid: int, gid: int) -> str | None:
        if uid == 0 or uid == euid:
            return None
        return (f"peer pid {pid} runs as uid {uid}; this agent (euid {euid}) accepts only uid 0 "
                f"and uid {euid}")

    return authorize


class AgentServer(RequestHandlers):
    """The agent. ``start()`` binds the socket and opens ``/dev/liveupdate``;
    ``serve_forever()`` answers requests until ``stop``; ``serve_in_thread()``
    does both in a daemon thread (unit tests, in-process agents);
    ``shutdown()`` stops and closes everything it holds (which unpreserves
    outgoing sessions, as the kernel would on process exit)."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *, backend: Backend | None = None,
                 open_liveupdate: bool = True, liveupdate_path: str = DEVICE,
                 peercred: Callable[[socket.socket], tuple[int, int, int]] | None = None,
                 authorize: Callable[[int, int, int], str | None] | None = None,
                 timeout: float = 10.0, notify: "sdnotify.Notifier | None | Literal['environ']" = "environ",
                 inherited: list[tuple[int, str]] | None = None):
        self.socket_path = P.default_socket_path(socket_path)
        if len(os.fsencode(self.socket_path)) > SOCKET_PATH_MAX:
            raise UsageError(f"agent socket path is longer than {SOCKET_PATH_MAX} bytes: {self.socket_path}")
        # systemd's fd store: a copy of every fd we hold, so a crash of this
        # process loses nothing (sdnotify); "environ" reads $NOTIFY_SOCKET
        notifier = sdnotify.Notifier.from_environ() if isinstance(notify, str) else notify
        super().__init__(get_backend(backend), liveupdate_path, notifier)
        self.open_liveupdate = open_liveupdate
        self.euid = os.geteuid()
        self._peercred = peercred or P.peer_credentials
        self._authorize = authorize or default_authorize(self.euid)
        self.timeout = timeout
        self.started = time.time()
        self._sock: socket.socket | None = None
        self._wake_r = self._wake_w = -1
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._connections: queue.SimpleQueue[socket.socket | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._in_flight = 0                             # accepted, not yet answered and closed
        self._in_flight_changed = threading.Condition()
        self._bound_inode: tuple[int, int] | None = None
        self.inherited = list(inherited or [])

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> "AgentServer":
        from ..rlimits import raise_nofile

        raise_nofile()  # the agent holds every preserved and retrieved fd
        self._bind()
        try:
            self._start_workers()
            if self.inherited:
                self._take_back(self.inherited)
                self.inherited = []
            if self.open_liveupdate:
                self._try_open_liveupdate()
        except BaseException:
            self._stop_workers()        # an agent that failed to start leaves nothing running
            self._close_listener()
            self._close_wake_pipe()
            raise
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


    def serve_forever(self) -> None:
        if self._sock is None:
            self.start()
        listener = self._sock
        assert listener is not None     # start() bound it
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select(timeout=1.0):
                    if key.fileobj is listener:
                        try:
                            conn, _ = listener.accept()
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
            self._stop_workers()
            if getattr(self, "_release_on_exit", True):
                self._release_everything()
            self._stopped.set()
            log.info("agent stopped")

    def _start_workers(self) -> None:
        """Every thread that will serve a connection starts here, before the
        agent holds anything. A thread started per connection would start
        under whatever memory pressure that moment has, and a MemoryError in
        CPython's thread bootstrap leaves ``Thread.start()`` waiting forever:
        the agent would stop answering while holding every session."""
        for n in range(WORKERS):
            worker = threading.Thread(target=self._work, name=f"pyiommufd-agent-worker-{n}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def _stop_workers(self) -> None:
        """Connections already queued are answered first; then each worker
        takes one ``None`` and ends."""
        for _ in self._workers:
            self._connections.put(None)
        for worker in self._workers:
            worker.join(self.timeout + 1)
        self._workers = []

    def _dispatch(self, conn: socket.socket) -> None:
        """Queue ``conn`` for a worker, so a slow or silent peer holds up only
        the worker serving it; requests still run one at a time (``_lock``).
        At most ``MAX_CONNECTIONS`` wait or are served; more stay in the backlog."""
        with self._in_flight_changed:
            while self._in_flight >= MAX_CONNECTIONS:
                if not self._in_flight_changed.wait(timeout=1.0) and self._stopping.is_set():
                    conn.close()
                    return
            self._in_flight += 1
        self._connections.put(conn)

    def connections_in_flight(self) -> int:
        """Connections accepted and not yet answered and closed."""
        with self._in_flight_changed:
            return self._in_flight

    def _work(self) -> None:
        while True:
            try:
                conn = self._connections.get()
                if conn is None:
                    return
                self._handle(conn)
            except Exception:  # noqa: BLE001 - a worker outlives a failed allocation, even in logging
                continue

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._serve_connection(conn)
        except Exception:  # noqa: BLE001 - nothing a peer sends may end the agent
            log.exception("serving a connection failed")
        finally:
            with self._in_flight_changed:
                self._in_flight -= 1
                self._in_flight_changed.notify()

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
            self._stop_workers()
            if release:
                self._release_everything()
        self._close_wake_pipe()

    def _close_wake_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = -1

    def install_signal_handlers(self, grace: float = 10.0) -> None:
        """SIGTERM/SIGINT stop the agent, except while it holds preserved or
        unfinished sessions: then the first signal is only logged (a service
        manager or a stray kill must not unpreserve everything) and a second
        one within ``grace`` seconds stops it. SIGHUP is ignored."""
        last = [0.0]

        def handler(signum: int, frame: FrameType | None) -> None:
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
        fds = RequestFds(self.backend, raw_fds)
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
    def _parse(msg: Any) -> tuple[str, dict[str, Any]]:
        if not isinstance(msg, dict):
            raise P.AgentProtocolError("a request is a JSON object")
        version = msg.get("v")
        # true == 1 and 1.0 == 1 in Python, not in the protocol
        if isinstance(version, bool) or not isinstance(version, int) or version != P.VERSION:
            raise P.AgentProtocolError(f"protocol version {version!r} is not {P.VERSION}")
        op = msg.get("op")
        if op not in P.OPS:
            raise P.AgentProtocolError(f"unknown request {op!r} (known: {', '.join(P.OPS)})")
        args = msg.get("args")
        if args is None:
            args = {}
        elif not isinstance(args, dict):     # not even [] or "" stands for "no arguments"
            raise P.AgentProtocolError("request args must be a JSON object")
        return op, args
    def _info(self) -> dict[str, Any]:
        if self.liveupdate is not None:
            lu = {"held": True, "fd": self.liveupdate.fileno(), "path": self.liveupdate_path}
        else:
            lu = {"held": False, "path": self.liveupdate_path, "error": self.liveupdate_error}
        return {"pid": os.getpid(), "euid": self.euid, "version": __version__, "socket": self.socket_path,
                "backend": self.backend.name, "started": self.started, "liveupdate": lu,
                "fdstore": self._fdstore_info()}

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


__all__ = ["AgentServer", "default_authorize"]
