"""Talking to the holder agent: :class:`AgentClient`, :func:`ensure_running`
and :func:`hand_over`.

Each call opens one connection, sends one request (with fds by SCM_RIGHTS)
and reads one reply. Errors the agent hit come back as the same
:mod:`pyiommufd.errors` class (errno, op, hint and detail included); when
nothing answers, :class:`~pyiommufd.agent.protocol.AgentUnavailable`
(``exit_code`` 7) is raised.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Iterable

from .. import errors
from ..backend import Backend, get_backend
from ..errors import UsageError
from ..fdobject import FileKind, fd_of
from . import protocol as P
from .protocol import AgentProtocolError, AgentUnavailable

#: in-process agents started by ensure_running() for a non-Linux backend (the fake kernel)
_IN_PROCESS: dict[str, Any] = {}
_IN_PROCESS_LOCK = threading.Lock()


class AgentClient:
    """A client of the agent on ``socket_path`` (default: ``$PYIOMMUFD_AGENT_SOCKET``
    or ``/run/pyiommufd/agent.sock``)."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *, timeout: float = 60.0):
        self.socket_path = P.default_socket_path(socket_path)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<AgentClient {self.socket_path}>"

    # -- plumbing ---------------------------------------------------------------
    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                try:
                    sock.connect(self.socket_path)
                    break
                except BlockingIOError:
                    # EAGAIN: the agent's listen backlog is full for a moment
                    if time.monotonic() > deadline:
                        raise socket.timeout from None
                    time.sleep(0.01)
        except (FileNotFoundError, ConnectionRefusedError, socket.timeout) as exc:
            sock.close()
            reason = "no socket" if isinstance(exc, FileNotFoundError) else (
                "connection refused" if isinstance(exc, ConnectionRefusedError) else "timed out")
            raise AgentUnavailable(f"no pyiommufd agent answers on {self.socket_path} ({reason}); "
                                   "start one with `pyiommufd agent --background`") from None
        except OSError as exc:
            sock.close()
            raise AgentUnavailable(f"cannot reach the pyiommufd agent on {self.socket_path}: "
                                   f"{exc.strerror or exc}") from None
        # whoever listens gets our fds (guest RAM): only root or ourselves
        try:
            pid, uid, _ = P.peer_credentials(sock)
        except OSError as exc:
            sock.close()
            raise AgentUnavailable(f"cannot tell who listens on {self.socket_path}: {exc.strerror}") from None
        if uid not in (0, os.geteuid()):
            sock.close()
            raise AgentUnavailable(f"the process listening on {self.socket_path} (pid {pid}) runs as uid {uid}, "
                                   "not root or us: refusing to talk to it")
        return sock

    def call(self, op: str, fds: Iterable[int] = (), **args: Any) -> tuple[dict[str, Any], list[int]]:
        """Send request ``op`` with ``args`` and ``fds``; return ``(result, fds)``.
        The caller owns the returned fds."""
        sock = self._connect()
        try:
            try:
                try:
                    P.send_message(sock, P.request(op, **args), fds)
                except (BrokenPipeError, ConnectionResetError):
                    # the agent may have answered before reading (e.g. refused this peer
                    # after SO_PEERCRED) and closed: its reply is still queued for us
                    pass
                reply, got = P.recv_message(sock)
            except socket.timeout:
                raise AgentUnavailable(f"the agent on {self.socket_path} did not answer "
                                       f"{op!r} within {self.timeout:g}s") from None
            except P.ConnectionClosed:
                raise AgentUnavailable(f"the agent on {self.socket_path} closed the connection "
                                       f"without answering {op!r}") from None
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise AgentUnavailable(f"the agent on {self.socket_path} dropped the connection: "
                                       f"{exc.strerror}") from None
        finally:
            sock.close()
        if not isinstance(reply, dict) or "ok" not in reply:
            _close_fds(got)
            raise AgentProtocolError(f"malformed agent reply: {reply!r}")
        if not reply["ok"]:
            _close_fds(got)
            raise P.decode_error(reply.get("error"))
        result = reply.get("result")
        return (result if isinstance(result, dict) else {}), got

    def _simple(self, op: str, **args: Any) -> dict[str, Any]:
        result, got = self.call(op, **args)
        _close_fds(got)
        return result

    # -- requests -------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        """The agent's pid, euid, version, socket, backend and /dev/liveupdate state."""
        return self._simple("ping")

    def is_running(self) -> bool:
        try:
            self.ping()
            return True
        except AgentUnavailable:
            return False

    def status(self) -> dict[str, Any]:
        """``{"agent": {...}, "sessions": [{name, direction, tokens: [{token, kind, name,
        meta, state, held}]}]}``."""
        return self._simple("status")

    def create_session(self, name: str) -> dict[str, Any]:
        return self._simple("create_session", name=name)

    def preserve(self, session: str, token: int, file: Any, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send ``file`` (an fd or an object with ``fileno()``) to the agent,
        which keeps its own reference and preserves it under ``token`` in its
        outgoing ``session``. ``meta`` (``kind``, ``name`` and anything
        JSON-able) shows in ``status``. Kernel errors re-raise typed."""
        fd = fd_of(file)
        meta = dict(meta or {})
        if "kind" not in meta and isinstance(getattr(file, "kind", None), FileKind):
            meta["kind"] = file.kind.value
        if "name" not in meta and isinstance(getattr(file, "name", None), str):
            meta["name"] = file.name
        result, got = self.call("preserve", [fd], session=session, token=token, meta=meta, fd=0)
        _close_fds(got)
        return result

    def preserve_many(self, session: str, files: list[tuple[int, Any, dict[str, Any] | None]]) -> list[dict[str, Any]]:
        """:meth:`preserve` of every ``(token, file, meta)``, in order, with as
        few requests as SCM_RIGHTS allows (253 fds each); the agent preserves
        each request's files with one bulk call. On a kernel error the
        files before the failed one stay preserved; the error's ``index`` is
        the failed item's index in ``files``."""
        out: list[dict[str, Any]] = []
        for first in range(0, len(files), P.MAX_FDS):
            chunk = files[first:first + P.MAX_FDS]
            wire, fds = [], []
            for token, file, meta in chunk:
                meta = dict(meta or {})
                if "kind" not in meta and isinstance(getattr(file, "kind", None), FileKind):
                    meta["kind"] = file.kind.value
                if "name" not in meta and isinstance(getattr(file, "name", None), str):
                    meta["name"] = file.name
                fds.append(fd_of(file))
                wire.append({"token": token, "fd": len(fds) - 1, "meta": meta})
            try:
                result, got = self.call("preserve_many", fds, session=session, files=wire)
            except errors.KernelError as exc:
                if first and isinstance(getattr(exc, "index", None), int):
                    exc.index += first
                    exc.detail = f"{exc.detail}; {first} files of earlier requests are preserved too"
                raise
            _close_fds(got)
            out.extend(result.get("files") or [])
        return out

    def adopt(self, *, liveupdate: Any = None, sessions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Hand over already-open fds. ``liveupdate``: the ``/dev/liveupdate``
        fd (or object) or None. ``sessions``: ``[{"name", "direction",
        "session": fd_or_obj, "files": [{"token", "file": fd_or_obj_or_None,
        "kind", "name", "meta"}]}]``."""
        fds: list[int] = []

        def index(obj: Any) -> int:
            fds.append(fd_of(obj))
            return len(fds) - 1

        wire_sessions: list[dict[str, Any]] = []
        wire = {"liveupdate": None if liveupdate is None else index(liveupdate), "sessions": wire_sessions}
        for spec in sessions or []:
            files: list[dict[str, Any]] = []
            entry = {"name": spec["name"], "direction": spec.get("direction", "outgoing"),
                     "fd": index(spec["session"]), "files": files}
            for f in spec.get("files", []):
                obj = f.get("file")
                files.append({"token": f["token"], "fd": None if obj is None else index(obj),
                                       "kind": f.get("kind"), "name": f.get("name"),
                                       "meta": f.get("meta") or {}, "state": f.get("state")})
            wire_sessions.append(entry)
        result, got = self.call("adopt", fds, **wire)
        _close_fds(got)
        return result

    def retrieve_session(self, name: str, *, manifest: bool = True) -> dict[str, Any]:
        """Retrieve incoming session ``name`` into the agent (idempotent: a
        session the agent holds already is reported with ``already_held``).
        With ``manifest`` the agent also retrieves token 0 and reads it."""
        return self._simple("retrieve_session", name=name, manifest=manifest)

    def retrieve(self, session: str, token: int) -> int:
        """Retrieve ``token`` of incoming ``session``; returns a new fd the
        caller owns (close-on-exec). The agent keeps its own reference."""
        result, got = self.call("retrieve", session=session, token=token)
        if len(got) != 1:
            _close_fds(got)
            raise AgentProtocolError(f"retrieve answered with {len(got)} fds instead of 1")
        return got[0]

    def retrieve_many(self, session: str, tokens: list[int]) -> dict[int, int]:
        """:meth:`retrieve` of every token, in order, in as few requests as
        SCM_RIGHTS allows; returns ``{token: fd}`` (the caller owns the fds).
        On a kernel error the tokens before the failed one stay retrieved
        in the agent (retrieve them again for their fds); fds of earlier
        requests are closed; the error's ``index`` is the failed token's
        index in ``tokens``."""
        out: dict[int, int] = {}
        try:
            for first in range(0, len(tokens), P.MAX_FDS):
                chunk = list(tokens[first:first + P.MAX_FDS])
                try:
                    _, got = self.call("retrieve_many", session=session, tokens=chunk)
                except errors.KernelError as exc:
                    if isinstance(getattr(exc, "index", None), int):
                        exc.index += first
                    raise
                if len(got) != len(chunk):
                    _close_fds(got)
                    raise AgentProtocolError(f"retrieve_many answered with {len(got)} fds for {len(chunk)} tokens")
                out.update(zip(chunk, got))
        except BaseException:
            _close_fds(out.values())
            raise
        return out

    def lend(self, session: str, tokens: list[int]) -> dict[int, int]:
        """Copies of the fds the agent holds for ``tokens`` of outgoing
        ``session``, ``{token: fd}`` (the caller owns them); nothing changes in
        the agent or the kernel."""
        _, got = self.call("lend", session=session, tokens=list(tokens))
        if len(got) != len(tokens):
            _close_fds(got)
            raise AgentProtocolError(f"lend answered with {len(got)} fds for {len(tokens)} tokens")
        return dict(zip(tokens, got))

    def finish(self, session: str) -> dict[str, Any]:
        return self._simple("finish", session=session)

    def release(self, session: str, force: bool = False, direction: str | None = None) -> dict[str, Any]:
        return self._simple("release", session=session, force=force, direction=direction)

    def stop(self, force: bool = False) -> dict[str, Any]:
        return self._simple("stop", force=force)




def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _wait_until_answering(client: AgentClient, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.ping()
        except AgentUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def ensure_running(socket_path: str | os.PathLike[str] | None = None, backend: Backend | None = None, *,
                   timeout: float = P.START_TIMEOUT) -> AgentClient:
    """An :class:`AgentClient` for a running agent; start one if none answers.

    With a backend whose kernel state other processes share (Linux) a
    background daemon is spawned (``python -m pyiommufd.agent --background``,
    a fresh process, so it inherits none of the caller's fds). Otherwise (the
    fake kernel) the agent runs in a daemon thread of this process."""
    client = AgentClient(socket_path)
    if client.is_running():
        return client
    be = get_backend(backend)
    if be.shared_with_other_processes:
        cmd = [sys.executable, "-m", "pyiommufd.agent", "--background", "--socket", client.socket_path]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=timeout, close_fds=True)
        if proc.returncode != 0:
            message = (proc.stderr or proc.stdout).strip().splitlines()
            raise AgentUnavailable(f"could not start the agent: {message[-1] if message else proc.returncode}")
    else:
        from .server import AgentServer

        with _IN_PROCESS_LOCK:
            if not client.is_running():
                old = _IN_PROCESS.pop(client.socket_path, None)
                if old is not None:
                    old.shutdown(release=False)
                _IN_PROCESS[client.socket_path] = AgentServer(client.socket_path, backend=be).serve_in_thread()
    _wait_until_answering(client, timeout)
    return client


def crash_exposure(status: dict[str, Any]) -> tuple[bool, str]:
    """``(safe, sentence)``: what a crash of the agent would lose, from its
    ``status`` reply. Without systemd's fd store every held session dies with
    the agent's fds."""
    info = status.get("agent", {})
    store = info.get("fdstore") or {}
    sessions = status.get("sessions", [])
    held = ", ".join(f"session {s['name']!r} ({s['direction']}, {len(s.get('tokens', []))} file(s))"
                     for s in sessions)
    if store.get("enabled") and not store.get("error"):
        return True, (f"fd store: systemd keeps a copy of the agent's {store.get('stored', 0)} fd(s); "
                      "a crash loses nothing, a restart takes them back")
    if store.get("enabled"):
        return False, (f"fd store failing ({store['error']}): a crash of the agent may lose "
                       f"{held or 'nothing now'}")
    if not sessions:
        return True, "no fd store (not started by systemd with FileDescriptorStoreMax=); it holds no session now"
    return False, ("no fd store (not started by systemd with FileDescriptorStoreMax=): if the agent crashes "
                   f"or is killed, the kernel drops {held}")


def in_process_agents() -> dict[str, Any]:
    """Agents :func:`ensure_running` started in this process (socket -> server)."""
    return dict(_IN_PROCESS)


def hand_over(liveupdate: Any, session: Any, files: list[tuple[int, Any, dict[str, Any]]],
              socket_path: str | os.PathLike[str] | None = None) -> AgentClient:
    """Give an open ``/dev/liveupdate`` (``liveupdate``: object, fd or None),
    one session (a :class:`~pyiommufd.luo.Session`) and the files already
    preserved (or retrieved) in it to the agent. ``files`` is a list of
    ``(token, fd_or_obj_or_None, meta)``; ``meta`` may carry ``kind`` and
    ``name``. Afterwards the caller may close its own copies: the agent holds
    the session fd, so nothing is unpreserved."""
    from ..luo import Session

    if not isinstance(session, Session):
        raise UsageError(f"hand_over needs a pyiommufd.luo.Session, not {type(session).__name__}")
    backend = getattr(session, "backend", None)
    client = ensure_running(socket_path, backend=backend)
    entries = []
    for item in files:
        try:
            token, obj, meta = item
        except (TypeError, ValueError):
            raise UsageError("hand_over files are (token, fd_or_obj, meta) tuples") from None
        meta = dict(meta or {})
        kind = meta.pop("kind", None) or (obj.kind.value if isinstance(getattr(obj, "kind", None), FileKind)
                                          else None)
        name = meta.pop("name", None) or (obj.name if isinstance(getattr(obj, "name", None), str) else None)
        entries.append({"token": token, "file": obj, "kind": kind, "name": name, "meta": meta})
    client.adopt(liveupdate=liveupdate, sessions=[{
        "name": session.name, "direction": "incoming" if session.incoming else "outgoing",
        "session": session, "files": entries}])
    return client


__all__ = ["AgentClient", "ensure_running", "hand_over", "in_process_agents", "crash_exposure"]
