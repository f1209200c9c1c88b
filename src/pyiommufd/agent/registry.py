"""The agent's bookkeeping: the sessions and files it holds, its
``/dev/liveupdate``, and the copies of those fds in systemd's fd store.

What the agent holds (one :class:`HeldSession` per session fd, one
:class:`HeldFile` per token) outlives any one request; the request handlers
(:mod:`.handlers`) change it, the server (:mod:`.server`) serves them.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .. import errors
from ..backend import Backend
from ..errors import UsageError
from ..fdobject import FileKind
from ..luo import LiveUpdate, PreservedFile, RetrievedFile, Session, kind_of_fd
from . import sdnotify

log = logging.getLogger("pyiommufd.agent")


class FileState(str, Enum):
    """Where a token the agent knows of stands; the value is what status shows."""

    PRESERVED = "preserved"     # outgoing: in the session, for the next kernel
    RETRIEVED = "retrieved"     # incoming: the agent holds the new fd
    PENDING = "pending"         # incoming: known (manifest, hand-over), not retrieved yet
    FAILED = "failed"           # incoming: the kernel refused its retrieve (``error``)

    @classmethod
    def parse(cls, value: object) -> "FileState":
        try:
            return cls(value)
        except ValueError:
            raise UsageError(f"file state must be one of {', '.join(s.value for s in cls)}, "
                             f"not {value!r}") from None


@dataclass
class HeldFile:
    """One token of a session as the agent knows it."""

    token: int
    kind: FileKind
    name: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: the session's record of the file while the agent holds a reference: its fd is that reference
    record: PreservedFile | RetrievedFile | None = None
    state: FileState = FileState.PRESERVED
    error: dict[str, Any] | None = None

    @property
    def fd(self) -> int | None:
        """The agent's own reference, if it holds one."""
        return None if self.record is None else self.record.fd

    def as_dict(self) -> dict[str, Any]:
        out = {"token": self.token, "token_hex": f"{self.token:#x}", "kind": self.kind.value, "name": self.name,
               "meta": self.meta, "state": self.state.value, "held": self.fd is not None}
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
        out: dict[str, Any] = {"name": self.name, "direction": self.direction, "fd": self.session.fileno(),
               "adopted": self.adopted, "since": self.since,
               "tokens": [f.as_dict() for f in sorted(self.files.values(), key=lambda f: f.token)]}
        if self.incoming:
            out["manifest"] = self.manifest is not None
            if self.manifest_error:
                out["manifest_error"] = self.manifest_error
            out["unretrieved"] = [f.token for f in self.files.values() if f.state is not FileState.RETRIEVED]
        return out


def close_fd(backend: Backend, fd: int | None) -> None:
    if fd is None:
        return
    try:
        backend.close(fd)
    except OSError:
        try:
            os.close(fd)
        except OSError:
            pass


class Registry:
    """What the agent holds, and how it lets go of it."""

    def __init__(self, backend: Backend, liveupdate_path: str, notifier: "sdnotify.Notifier | None"):
        self.backend = backend
        self.liveupdate_path = liveupdate_path
        self.liveupdate: LiveUpdate | None = None
        self.liveupdate_error: str | None = None
        self.sessions: dict[tuple[str, bool], HeldSession] = {}
        self.notifier = notifier
        self.stored: set[str] = set()
        self.restored: dict[str, Any] | None = None
        # the requests, and letting go of everything, run one at a time
        self._lock = threading.RLock()

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
    def holding_state(self) -> list[str]:
        """Why stopping now would drop live-update state (empty: it would not)."""
        return [w for w in (self._release_warning(s) for s in list(self.sessions.values())) if w]
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
            close_fd(self.backend, f.fd)
            f.record = None
        log.info("closed %s session %r", held.direction, held.name)
    @staticmethod
    def _release_warning(held: HeldSession) -> str | None:
        if not held.incoming and held.files:
            return (f"closing outgoing session {held.name!r} unpreserves its {len(held.files)} "
                    f"file(s) (tokens {', '.join(hex(t) for t in sorted(held.files))})")
        if held.incoming:
            return (f"closing incoming session {held.name!r} attempts FINISH; if that fails the "
                    "session stays in the kernel, un-retrievable, until the next live update")
        return None
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
            zero.kind, zero.name = FileKind.MANIFEST, M.MANIFEST_NAME
        for entry in manifest.entries:
            f = held.files.get(entry.token)
            if f is None:
                if not held.incoming:
                    continue  # an outgoing file we hold no fd of: nothing to say about it
                f = held.files[entry.token] = HeldFile(entry.token, entry.kind, state=FileState.PENDING)
            f.kind, f.name = entry.kind, entry.name
            f.meta = {k: v for k, v in entry.as_dict().items() if k not in ("token", "kind", "name")}
        held.session.expected_tokens = set(manifest.tokens)

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
        self._store(sdnotify.session_fdname(held.name, held.incoming), held.session.fileno())

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
                close_fd(self.backend, fd)
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
                close_fd(self.backend, fd)
        for fd, text, name in parsed:
            if name.what != "session" or name.session is None:
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
                close_fd(self.backend, fd)
                continue
            held = HeldSession(name.session, session, incoming=name.incoming, adopted=True)
            self.sessions[held.key] = held
            self.stored.add(text)
        for fd, text, name in parsed:
            if name.what != "file" or name.session is None or name.token is None:
                continue
            owner = self.sessions.get((name.session, name.incoming))
            if owner is None or name.token in owner.files:
                # its session fd is gone: the kernel dropped that session with it
                lost.append(text)
                close_fd(self.backend, fd)
                if self.notifier is not None:
                    self.notifier.remove(text)
                continue
            held = owner
            kind = kind_of_fd(self.backend, fd)
            record: PreservedFile | RetrievedFile
            if name.incoming:
                record = held.session.record_retrieved(name.token, fd, kind)
                state = FileState.RETRIEVED
            else:
                record = held.session.preserved[name.token] = PreservedFile(name.token, fd, kind)
                state = FileState.PRESERVED
            held.files[name.token] = HeldFile(name.token, kind, record=record, state=state)
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
