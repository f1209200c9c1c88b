"""The agent's request handlers: one ``_op_<name>`` per request of
:data:`pyiommufd.agent.protocol.OPS`, each taking the request's arguments and
fds and answering ``(result, fds to send back)``."""
from __future__ import annotations

import errno as E
import logging
import os
import reprlib
from typing import Any, Callable, NamedTuple

from .. import errors
from ..backend import Backend
from ..errors import UsageError
from ..fdobject import FileKind
from ..luo import TOKEN_MAX, LiveUpdate, PreservedFile, RetrievedFile, Session, check_session_name, fd_target, kind_of_fd
from . import protocol as P
from . import sdnotify
from .protocol import AgentRefused
from .registry import FileState, HeldFile, HeldSession, Registry, close_fd

log = logging.getLogger("pyiommufd.agent")


class RequestFds:
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
            close_fd(self.backend, fd)


# -- request fields -------------------------------------------------------------
# Every field is checked against its JSON type and never coerced: "false" is
# not false, 1.0 and true are not the token 1, {} is not an empty list. A
# field that is absent or null takes its default (clients send null for what
# they leave out); without a default it is required.
class Field(NamedTuple):
    """What a request field must be; ``expected`` is what the refusal says."""

    expected: str
    ok: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


BOOL = Field("true or false", lambda v: isinstance(v, bool))
STRING = Field("a string", lambda v: isinstance(v, str))
TOKEN = Field("an integer from 0 to 2**64-1", lambda v: _is_int(v) and 0 <= v <= TOKEN_MAX)
FD_INDEX = Field("the index of an fd sent with the request", lambda v: _is_int(v) and v >= 0)
LIST = Field("a list", lambda v: isinstance(v, list))
OBJECT = Field("an object", lambda v: isinstance(v, dict))
DIRECTION = Field('"outgoing" or "incoming"', lambda v: v in ("outgoing", "incoming"))

_REQUIRED: Any = object()
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object"}


def _shown(value: Any) -> str:
    """``value`` for a refusal: its JSON type and a short repr (a hostile value may be huge)."""
    if value is None:
        return "null"
    return f"{_JSON_TYPES.get(type(value), type(value).__name__)} {reprlib.repr(value)}"


def _check(value: Any, field: Field, path: str) -> Any:
    if not field.ok(value):
        raise UsageError(f"request argument {path!r} must be {field.expected}, not {_shown(value)}")
    return value


def _field(obj: dict[str, Any], key: str, field: Field, where: str = "", default: Any = _REQUIRED) -> Any:
    """``obj[key]`` (named ``where.key`` in a refusal) if it is what ``field`` says."""
    path = f"{where}.{key}" if where else key
    value = obj.get(key)
    if value is None:
        if default is _REQUIRED:
            raise UsageError(f"request argument {path!r} ({field.expected}) is missing")
        return default
    return _check(value, field, path)


def _elements(obj: dict[str, Any], key: str, field: Field, where: str = "",
              default: Any = _REQUIRED) -> list[tuple[str, Any]]:
    """The list ``obj[key]`` as ``(path, element)``, each element checked as ``field``."""
    path = f"{where}.{key}" if where else key
    items = _field(obj, key, LIST, where, default)
    return [(f"{path}[{i}]", _check(v, field, f"{path}[{i}]")) for i, v in enumerate(items)]


def _meta(obj: dict[str, Any], where: str = "") -> dict[str, Any]:
    """A file's ``meta``: any object, but the ``name`` and ``kind`` the agent reads are strings."""
    meta = dict(_field(obj, "meta", OBJECT, where, {}))
    path = f"{where}.meta" if where else "meta"
    _field(meta, "name", STRING, path, None)
    _field(meta, "kind", STRING, path, None)
    return meta


#: a handler's answer: the result, and the fds to send with it
Reply = tuple[dict[str, Any], list[int]]
#: a file to preserve: token, fd, kind, the rest of its meta
PreserveItem = tuple[int, int, FileKind, dict[str, Any]]


class RequestHandlers(Registry):
    """The requests, run one at a time under the registry's lock."""

    def _info(self) -> dict[str, Any]:
        """Who the agent is (its socket, pid, version): the server's to say."""
        raise NotImplementedError

    def request_stop(self, *, release: bool = True) -> None:
        """Stop serving: the server's to do."""
        raise NotImplementedError

    def _op_ping(self, args: dict[str, Any], fds: RequestFds) -> Reply:
        return self._info(), []

    def _op_status(self, args: dict[str, Any], fds: RequestFds) -> Reply:
        sessions = [s.as_dict() for s in sorted(self.sessions.values(), key=lambda s: (s.name, s.incoming))]
        return {"agent": self._info(), "sessions": sessions}, []

    def _op_create_session(self, args: dict[str, Any], fds: RequestFds) -> Reply:
        name = _field(args, "name", STRING)
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

    def _op_preserve(self, args: dict[str, Any], fds: RequestFds) -> Reply:
        session = _field(args, "session", STRING)
        token = _field(args, "token", TOKEN)
        meta = _meta(args)
        index = _field(args, "fd", FD_INDEX, default=0)
        held = self._session(session, incoming=False)
        fd = fds.get(index, "preserve")
        if token in held.files:
            # the kernel says EEXIST too; answer without touching it
            raise errors.make_error("LIVEUPDATE_SESSION_PRESERVE_FD", "luo", E.EEXIST,
                                    detail=f"session {held.name!r}, token {token:#x}")
        kind = P.parse_kind(meta.pop("kind", None)) or kind_of_fd(self.backend, fd)
        name = meta.pop("name", None)
        held.session.preserve(fd, token)
        fds.keep(fd)
        held.files[token] = HeldFile(token, kind, name, meta, held.session.preserved[token], FileState.PRESERVED)
        log.info("preserved token %#x (%s %s) in %r", token, kind, name or "", held.name)
        self._store_file(held, held.files[token])
        return held.files[token].as_dict(), []

    def _op_preserve_many(self, args: dict[str, Any], fds: RequestFds) -> Reply:
        """``files``: ``[{"token", "fd" (index), "meta"}]``, preserved in order
        by one :meth:`Session.preserve_many`. Everything is checked first; on a
        failure part-way the files before it stay preserved and held."""
        session = _field(args, "session", STRING)
        specs = [(_field(spec, "token", TOKEN, where), _field(spec, "fd", FD_INDEX, where), _meta(spec, where))
                 for where, spec in _elements(args, "files", OBJECT)]
        held = self._session(session, incoming=False)
        items: list[PreserveItem] = []
        seen: set[int] = set()
        for token, index, meta in specs:
            fd = fds.get(index, f"preserve_many token {token:#x}")
            if token in held.files or token in seen:
                raise errors.make_error("LIVEUPDATE_SESSION_PRESERVE_FD", "luo", E.EEXIST,
                                        detail=f"session {held.name!r}, token {token:#x}")
            seen.add(token)
            kind = P.parse_kind(meta.pop("kind", None)) or kind_of_fd(self.backend, fd)
            items.append((token, fd, kind, meta))
        try:
            held.session.preserve_many([(fd, token) for token, fd, _, _ in items])
        except errors.KernelError as exc:
            self._hold_preserved(held, items[:getattr(exc, "index", 0)], fds)
            raise
        return {"files": self._hold_preserved(held, items, fds)}, []

    def _hold_preserved(self, held: HeldSession, items: list[PreserveItem], fds: RequestFds
                        ) -> list[dict[str, Any]]:
        out = []
        for token, fd, kind, meta in items:
            name = meta.pop("name", None)
            fds.keep(fd)
            f = held.files[token] = HeldFile(token, kind, name, meta, held.session.preserved[token],
                                             FileState.PRESERVED)
            self._store_file(held, f)
            out.append(f.as_dict())
        log.info("preserved %d files in %r", len(items), held.name)
        return out

    def _op_adopt(self, args: dict[str, Any], fds: RequestFds) -> Reply:
        lu_index = _field(args, "liveupdate", FD_INDEX, default=None)
        plans = []
        for where, spec in _elements(args, "sessions", OBJECT, default=[]):
            name = _field(spec, "name", STRING, where)
            check_session_name(name)
            direction = _field(spec, "direction", DIRECTION, where, "outgoing")
            incoming = direction == "incoming"
            if (name, incoming) in self.sessions:
                raise UsageError(f"adopt: the agent holds {direction} session {name!r} already")
            session_fd = fds.get(_field(spec, "fd", FD_INDEX, where), f"adopt session {name!r}")
            files = []
            seen: set[int] = set()
            for fwhere, f in _elements(spec, "files", OBJECT, where, []):
                token = _field(f, "token", TOKEN, fwhere)
                if token in seen:
                    raise UsageError(f"adopt: token {token:#x} listed twice in session {name!r}")
                seen.add(token)
                index = _field(f, "fd", FD_INDEX, fwhere, None)
                ffd = None if index is None else fds.get(index, f"adopt token {token:#x}")
                meta = _meta(f, fwhere)
                said = P.parse_kind(_field(f, "kind", STRING, fwhere, None) or meta.pop("kind", None))
                state = _field(f, "state", STRING, fwhere, None)
                said_state = None if state is None else FileState.parse(state)
                fname = _field(f, "name", STRING, fwhere, None) or meta.pop("name", None)
                files.append((token, ffd, fname, meta, said, said_state))
            self._check_session_fd(session_fd, name)
            plans.append((name, incoming, session_fd, files))
        lu_fd = None if lu_index is None else fds.get(lu_index, "adopt /dev/liveupdate")
        if lu_fd is not None and self.liveupdate is None:
            target = fd_target(self.backend, lu_fd)
            if target != self.liveupdate_path:
                raise UsageError(f"adopt: the fd sent as /dev/liveupdate is not {self.liveupdate_path} "
                                 f"({target or 'unknown'})")
        # everything checked: take the fds
        adopted: list[dict[str, Any]] = []
        result: dict[str, Any] = {"liveupdate": None, "sessions": adopted}
        if lu_fd is not None:
            if self.liveupdate is None:
                self.liveupdate = LiveUpdate(fds.keep(lu_fd), backend=self.backend)
                self.liveupdate_error = None
                result["liveupdate"] = "adopted"
                log.info("adopted /dev/liveupdate (fd %d)", lu_fd)
                self._store(sdnotify.LUO_NAME, lu_fd)
            else:
                result["liveupdate"] = "already held"
        for name, incoming, session_fd, files in plans:
            session = Session(fds.keep(session_fd), name, incoming=incoming, backend=self.backend)
            held = HeldSession(name, session, incoming=incoming, adopted=True)
            for token, ffd, fname, meta, said, said_state in files:
                if ffd is not None:
                    fds.keep(ffd)
                kind = said or (kind_of_fd(self.backend, ffd) if ffd is not None else FileKind.OTHER)
                record: PreservedFile | RetrievedFile | None = None
                if incoming:
                    state = said_state or (FileState.RETRIEVED if ffd is not None else FileState.PENDING)
                    if state is FileState.RETRIEVED and ffd is not None:
                        record = session.record_retrieved(token, ffd, kind)
                else:
                    state = FileState.PRESERVED
                    preserved = session.preserved[token] = PreservedFile(token, ffd if ffd is not None else -1, kind)
                    record = preserved if ffd is not None else None
                held.files[token] = HeldFile(token, kind, fname, meta, record, state)
            if incoming:
                if 0 in held.files and held.files[0].fd is not None:
                    self._load_manifest(held, held.files[0].fd)
                session.expected_tokens = set(held.files)
            self.sessions[held.key] = held
            adopted.append(held.as_dict())
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
    def _op_retrieve_session(self, args: dict[str, Any], fds: RequestFds) -> Reply:
        name = _field(args, "name", STRING)
        check_session_name(name)
        with_manifest = _field(args, "manifest", BOOL, default=True)
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

        if with_manifest:
            try:
                got = session.retrieve(MANIFEST_TOKEN)
            except errors.NotFound:
                held.manifest_error = "no token 0: this session has no pyiommufd manifest"
            except errors.KernelError as exc:
                held.files[MANIFEST_TOKEN] = HeldFile(MANIFEST_TOKEN, FileKind.MANIFEST, MANIFEST_NAME, state=FileState.FAILED,
                                                      error=P.encode_error(exc))
                held.manifest_error = f"retrieving token 0 failed: {exc}"
            else:
                held.files[MANIFEST_TOKEN] = HeldFile(MANIFEST_TOKEN, FileKind.MANIFEST, MANIFEST_NAME, record=got,
                                                      state=FileState.RETRIEVED)
                self._store_file(held, held.files[MANIFEST_TOKEN])
                self._load_manifest(held, got.fd)
        out = held.as_dict()
        out["already_held"] = False
        return out, []

    def _op_retrieve(self, args: dict[str, Any], fds: RequestFds) -> Reply:
        session = _field(args, "session", STRING)
        token = _field(args, "token", TOKEN)
        held = self._session(session, incoming=True)
        f = held.files.get(token)
        if f is not None and f.fd is not None:
            return f.as_dict(), [f.fd]
        try:
            got = held.session.retrieve(token)
        except errors.KernelError as exc:
            if f is None:
                f = held.files[token] = HeldFile(token, FileKind.OTHER)
            f.state, f.error = FileState.FAILED, P.encode_error(exc)
            raise
        if f is None:
            f = held.files[token] = HeldFile(token, got.kind)
        f.record, f.state, f.error = got, FileState.RETRIEVED, None
        log.info("retrieved token %#x (%s %s) of %r", token, f.kind, f.name or "", held.name)
        self._store_file(held, f)
        return f.as_dict(), [got.fd]

    def _op_retrieve_many(self, args: dict[str, Any], fds: RequestFds) -> Reply:
        """``tokens``, retrieved in order (those held already are not asked
        again) by one :meth:`Session.retrieve_all`; answers ``files`` and one
        fd per token. On a failure part-way the ones before it stay held."""
        session = _field(args, "session", STRING)
        tokens: list[int] = [t for _, t in _elements(args, "tokens", TOKEN)]
        held = self._session(session, incoming=True)
        todo = [t for t in tokens if held.files.get(t) is None or held.files[t].fd is None]
        try:
            got = held.session.retrieve_all(todo)
        except errors.KernelError as exc:
            index = getattr(exc, "index", 0)
            self._hold_retrieved(held, exc.done)
            f = held.files.get(todo[index])
            if f is None:
                f = held.files[todo[index]] = HeldFile(todo[index], FileKind.OTHER)
            f.state, f.error = FileState.FAILED, P.encode_error(exc)
            exc.index = tokens.index(todo[index])
            raise
        self._hold_retrieved(held, got)
        out_fds = [fd for fd in (held.files[t].fd for t in tokens) if fd is not None]   # each one is held now
        return {"files": [held.files[t].as_dict() for t in tokens]}, out_fds

    def _hold_retrieved(self, held: HeldSession, got: dict[int, RetrievedFile]) -> None:
        for token, record in got.items():
            f = held.files.get(token)
            if f is None:
                f = held.files[token] = HeldFile(token, record.kind)
            f.record, f.state, f.error = record, FileState.RETRIEVED, None
        log.info("retrieved %d tokens of %r", len(got), held.name)

    def _op_lend(self, args: dict[str, Any], fds: RequestFds) -> Reply:
        """Copies of the fds of ``tokens`` of an outgoing session, for a holder
        that takes its files back before any kexec (a VMM resuming a VM whose
        update was aborted). The agent keeps its own; nothing is unpreserved."""
        session = _field(args, "session", STRING)
        tokens: list[int] = [t for _, t in _elements(args, "tokens", TOKEN)]
        held = self._session(session, incoming=False)
        out = []
        for token in tokens:
            f = held.files.get(token)
            if f is None or f.fd is None:
                raise UsageError(f"lend: session {held.name!r} holds no file at token {token:#x}")
            out.append(f)
        return {"files": [f.as_dict() for f in out]}, [f.fd for f in out if f.fd is not None]

    def _op_finish(self, args: dict[str, Any], fds: RequestFds) -> Reply:
        held = self._session(_field(args, "session", STRING), incoming=True)
        held.session.finish()
        log.info("finished session %r", held.name)
        self._close_session(held)
        del self.sessions[held.key]
        return {"finished": held.name, "released_tokens": sorted(held.files)}, []

    def _op_release(self, args: dict[str, Any], fds: RequestFds) -> Reply:
        name = _field(args, "session", STRING)
        force = _field(args, "force", BOOL, default=False)
        direction = _field(args, "direction", DIRECTION, default=None)
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
    def _op_stop(self, args: dict[str, Any], fds: RequestFds) -> Reply:
        force = _field(args, "force", BOOL, default=False)
        warnings = self.holding_state()
        if warnings and not force:
            raise AgentRefused("the agent holds live-update state: " + "; ".join(warnings) +
                               "; stopping would drop it (stop --force to do it anyway)")
        self.request_stop()
        return {"stopping": True, "pid": os.getpid(), "warnings": warnings}, []
