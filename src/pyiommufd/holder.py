"""Who holds a live update's files until the kexec: the :class:`Holder` protocol.

A flow that must outlive its own process (the VMM live update: launch, update
and resume are separate commands, and QEMU exits in between) hands its files
to a holder and asks for them back. The flows depend on this protocol, not on
the agent daemon:

* :class:`AgentHolder` talks to ``pyiommufd agent`` over its socket (the CLI's
  holder: it outlives every command, and with systemd's fd store itself);
* :class:`InProcessHolder` keeps the sessions in this process (a VMM that
  holds its own files, and the tests).

Both answer with the session layer's records: :class:`~pyiommufd.luo.PreservedFile`
and :class:`~pyiommufd.luo.RetrievedFile`, each retrieved or lent file an fd
the caller owns (``close()``, or use it as a context manager). The holder keeps
its own reference to every file until ``finish`` or ``release``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

from .backend import Backend, get_backend
from .errors import UsageError
from .fdobject import FileKind, fd_of
from .luo import LiveUpdate, PreservedFile, RetrievedFile, Session

if TYPE_CHECKING:
    from _typeshed import HasFileno


@dataclass(frozen=True)
class FileToHold:
    """A file to preserve under ``token``; ``name`` and ``meta`` are what the
    holder shows in its status (``meta`` JSON-able)."""
    token: int
    file: int | HasFileno
    name: str | None = None
    kind: FileKind | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


class Holder(Protocol):
    def create_session(self, name: str) -> None:
        """A new outgoing session ``name``."""

    def preserve_many(self, session: str, files: Sequence[FileToHold]) -> list[PreservedFile]:
        """Preserve ``files`` in order in outgoing ``session``; the holder keeps
        a reference to each. On a kernel error the files before it stay preserved."""

    def lend(self, session: str, tokens: Sequence[int]) -> dict[int, RetrievedFile]:
        """New fds of files held in outgoing ``session`` (before any kexec)."""

    def retrieve_session(self, name: str) -> None:
        """Take incoming session ``name`` (after a kexec)."""

    def retrieve_many(self, session: str, tokens: Sequence[int]) -> dict[int, RetrievedFile]:
        """Retrieve ``tokens`` of incoming ``session``: new fds the caller owns."""

    def finish(self, session: str) -> None:
        """Finish incoming ``session``; the holder lets go of its files."""

    def release(self, session: str, *, incoming: bool) -> None:
        """Let go of ``session`` without finishing it: an outgoing session's
        files are unpreserved."""


class AgentHolder:
    """The :class:`Holder` behind ``pyiommufd agent``. ``connect`` makes the
    agent client on first use (so a command that fails its own checks first
    starts no agent); typed loosely so that this module never imports the agent."""

    def __init__(self, connect: Callable[[], Any], backend: Backend | None = None) -> None:
        self._connect = connect
        self._client: Any = None
        self.backend = get_backend(backend)

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._connect()
        return self._client

    def create_session(self, name: str) -> None:
        self.client.create_session(name)

    def preserve_many(self, session: str, files: Sequence[FileToHold]) -> list[PreservedFile]:
        wire = []
        for f in files:
            meta = dict(f.meta)
            if f.name is not None:
                meta["name"] = f.name
            if f.kind is not None:
                meta["kind"] = f.kind.value
            wire.append((f.token, f.file, meta))
        self.client.preserve_many(session, wire)
        return [PreservedFile(f.token, fd_of(f.file), f.kind) for f in files]

    def _records(self, fds: dict[int, int]) -> dict[int, RetrievedFile]:
        return {token: RetrievedFile(token, fd, self.backend) for token, fd in fds.items()}

    def lend(self, session: str, tokens: Sequence[int]) -> dict[int, RetrievedFile]:
        return self._records(self.client.lend(session, list(tokens)))

    def retrieve_session(self, name: str) -> None:
        self.client.retrieve_session(name, manifest=False)

    def retrieve_many(self, session: str, tokens: Sequence[int]) -> dict[int, RetrievedFile]:
        return self._records(self.client.retrieve_many(session, list(tokens)))

    def finish(self, session: str) -> None:
        self.client.finish(session)

    def release(self, session: str, *, incoming: bool) -> None:
        self.client.release(session, force=True, direction="incoming" if incoming else "outgoing")


class InProcessHolder:
    """A :class:`Holder` in this process, over one open ``/dev/liveupdate``."""

    def __init__(self, liveupdate: LiveUpdate) -> None:
        self.liveupdate = liveupdate
        self.backend = liveupdate.backend
        self._sessions: dict[tuple[str, bool], Session] = {}
        self._files: dict[tuple[str, bool], dict[int, int]] = {}

    def _session(self, name: str, incoming: bool) -> Session:
        try:
            return self._sessions[(name, incoming)]
        except KeyError:
            way = "incoming" if incoming else "outgoing"
            raise UsageError(f"this holder has no {way} session {name!r}") from None

    def create_session(self, name: str) -> None:
        if (name, False) in self._sessions:
            raise UsageError(f"this holder has an outgoing session {name!r} already")
        self._sessions[(name, False)] = self.liveupdate.create_session(name)
        self._files[(name, False)] = {}

    def preserve_many(self, session: str, files: Sequence[FileToHold]) -> list[PreservedFile]:
        s = self._session(session, False)
        held = self._files[(session, False)]
        try:
            done = s.preserve_many([(f.file, f.token) for f in files])
        except Exception as exc:
            for f in files[:getattr(exc, "index", 0)]:
                held[f.token] = self.backend.dup(fd_of(f.file))
            raise
        for f in files:
            held[f.token] = self.backend.dup(fd_of(f.file))
        return done

    def lend(self, session: str, tokens: Sequence[int]) -> dict[int, RetrievedFile]:
        self._session(session, False)
        held = self._files[(session, False)]
        missing = [t for t in tokens if t not in held]
        if missing:
            raise UsageError(f"session {session!r} holds no file at token(s) "
                             f"{', '.join(hex(t) for t in missing)}")
        return {t: RetrievedFile(t, self.backend.dup(held[t]), self.backend) for t in tokens}

    def retrieve_session(self, name: str) -> None:
        if (name, True) not in self._sessions:
            self._sessions[(name, True)] = self.liveupdate.retrieve_session(name)
            self._files[(name, True)] = {}

    def retrieve_many(self, session: str, tokens: Sequence[int]) -> dict[int, RetrievedFile]:
        s = self._session(session, True)
        held = self._files[(session, True)]
        todo = [t for t in tokens if t not in held]
        if todo:
            got = s.retrieve_all(todo)
            held.update((t, r.fd) for t, r in got.items())
        return {t: RetrievedFile(t, self.backend.dup(held[t]), self.backend) for t in tokens}

    def finish(self, session: str) -> None:
        self._session(session, True).finish()
        self._drop(session, True)

    def release(self, session: str, *, incoming: bool) -> None:
        self._session(session, incoming)
        self._drop(session, incoming)

    def _drop(self, name: str, incoming: bool) -> None:
        # the session fd first: closing it unpreserves while our references still exist
        self._sessions.pop((name, incoming)).close()
        for fd in self._files.pop((name, incoming)).values():
            self.backend.close(fd)

    def close(self) -> None:
        for name, incoming in list(self._sessions):
            self._drop(name, incoming)


__all__ = ["Holder", "FileToHold", "AgentHolder", "InProcessHolder"]
