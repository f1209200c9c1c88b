"""The Live Update Orchestrator: ``/dev/liveupdate`` and its sessions.

Two kernel facts shape this API (Linux 7.3 kernel/liveupdate/luo_session.c and luo_file.c):

* ``/dev/liveupdate`` can be open in one place at a time (EBUSY otherwise);
  :class:`LiveUpdate` is that one open file.
* Closing an outgoing session's fd unpreserves everything in it. A
  :class:`Session` therefore never closes itself behind your back: keep it
  (or hand it to ``pyiommufd agent``) until the kexec.
"""
from __future__ import annotations

import errno as E
import os
import re
from typing import TYPE_CHECKING, Any, Iterable

from . import errors, ioctl
from ._record import record
from ._uapi import ffi
from .backend import Backend
from .errors import UsageError
from .fdobject import FdObject, FileKind, fd_of

if TYPE_CHECKING:
    from _typeshed import HasFileno

DEVICE = "/dev/liveupdate"
SESSION_NAME_MAX = 63
TOKEN_MAX = (1 << 64) - 1

CREATE_SESSION = ioctl.define("LIVEUPDATE_IOCTL_CREATE_SESSION", "struct liveupdate_ioctl_create_session", "luo")
RETRIEVE_SESSION = ioctl.define("LIVEUPDATE_IOCTL_RETRIEVE_SESSION", "struct liveupdate_ioctl_retrieve_session", "luo")
PRESERVE_FD = ioctl.define("LIVEUPDATE_SESSION_PRESERVE_FD", "struct liveupdate_session_preserve_fd", "luo")
RETRIEVE_FD = ioctl.define("LIVEUPDATE_SESSION_RETRIEVE_FD", "struct liveupdate_session_retrieve_fd", "luo")
FINISH = ioctl.define("LIVEUPDATE_SESSION_FINISH", "struct liveupdate_session_finish", "luo")
GET_NAME = ioctl.define("LIVEUPDATE_SESSION_GET_NAME", "struct liveupdate_session_get_name", "luo")


# C0, DEL and C1: what would break a message, a log line or an fd name in two
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _escaped(text: str) -> str:
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def _shown(name: str, limit: int = 40) -> str:
    """``name`` for a message: quoted, undecodable bytes and control characters
    escaped, long ones cut."""
    try:  # a byte that is not UTF-8 came from argv as a lone surrogate: show the byte
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    if len(text) <= limit:
        return f"'{_escaped(text)}'"
    return f"'{_escaped(text[:limit])}…' ({len(text)} characters)"


def session_name_bytes(name: str) -> bytes:
    """``name`` as the kernel's ``char name[64]`` gets it. Refuses only what
    those bytes cannot say: a name that is no UTF-8 string, has a NUL (the
    kernel would read a shorter name) or overflows the field. The kernel
    judges the rest: an empty name, or 64 bytes with no room for the NUL, is
    its EINVAL (luo_session.c, luo_session_create)."""
    raw = _encoded(name)
    if b"\0" in raw:
        raise UsageError("session name may not contain NUL")
    if len(raw) > SESSION_NAME_MAX + 1:
        raise UsageError(f"session name {_shown(name)} is {len(raw)} bytes: the kernel's field "
                         f"holds {SESSION_NAME_MAX + 1}")
    return raw


def check_session_name(name: str) -> bytes:
    """A name LUO accepts, 1 to 63 bytes, without control characters: the
    flows' (CLI, plans, manifests, the agent) check before they start, so a
    bad name fails before anything is done. The kernel would take a newline;
    the name ends up in messages, logs and fd names that it would split."""
    raw = _encoded(name)
    if not 1 <= len(raw) <= SESSION_NAME_MAX:
        raise UsageError(f"session name must be 1 to {SESSION_NAME_MAX} bytes, {_shown(name)} is {len(raw)}")
    control = _CONTROL.search(name)
    if control is not None:
        raise UsageError(f"session name {_shown(name)} contains the control character "
                         f"{_escaped(control.group())}: use printable characters")
    return session_name_bytes(name)


def _encoded(name: str) -> bytes:
    if not isinstance(name, str):
        raise UsageError(f"session name must be a string, not {type(name).__name__}")
    try:
        return name.encode()
    except UnicodeEncodeError:
        raise UsageError(f"session name {_shown(name)} is not valid UTF-8") from None


def check_token(token: object) -> int:
    """``token`` if it is a LUO token (an int from 0 to 2**64-1); else UsageError."""
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= TOKEN_MAX:
        raise UsageError(f"a LUO token is an integer from 0 to 2**64-1, not {token!r}")
    return token


# A memfd LUO gives back after a kexec is made by the kernel without the
# "memfd:" prefix of memfd_create() (mm/memfd_luo.c: memfd_alloc_file("")).
RETRIEVED_MEMFD_PATH = "/ (deleted)"
_F_GET_SEALS = ioctl.const("F_GET_SEALS")


def _has_seals(backend: Backend, fd: int) -> bool:
    """F_GET_SEALS answers only for shmem and hugetlbfs files."""
    try:
        backend.fcntl(fd, _F_GET_SEALS)
    except OSError:
        return False
    return True


def fd_target(backend: Backend, fd: int) -> str | None:
    """What ``/proc/self/fd/FD`` points at (None when it cannot be read)."""
    try:
        return backend.files.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def kind_of_fd(backend: Backend, fd: int) -> FileKind:
    """What kind of file ``fd`` is, from /proc/self/fd (OTHER when unknown)."""
    target = fd_target(backend, fd)
    if target is None:
        return FileKind.OTHER
    return _kind_of_target(backend, fd, target)


def _kind_of_target(backend: Backend, fd: int, target: str) -> FileKind:
    if target.startswith("/memfd:") or (target == RETRIEVED_MEMFD_PATH and _has_seals(backend, fd)):
        return FileKind.MEMFD
    if target == "/dev/iommu":
        return FileKind.IOMMUFD
    if target.startswith("/dev/vfio/devices/") or "vfio-device" in target:
        return FileKind.VFIO_CDEV
    if target == "/dev/vfio/vfio":
        return FileKind.VFIO_CONTAINER
    if target.startswith("/dev/vfio/"):
        return FileKind.VFIO_GROUP
    return FileKind.OTHER


def describe_fd(backend: Backend, fd: int) -> str | None:
    """What ``fd`` is, in words, for hints and messages."""
    target = fd_target(backend, fd)
    if target is None:
        return None
    kind = _kind_of_target(backend, fd, target)
    if kind is FileKind.OTHER:
        return target
    if kind in (FileKind.VFIO_GROUP, FileKind.VFIO_CONTAINER):
        return "a VFIO group (only cdevs can be preserved)"
    return kind.description


def _kind_of(obj: object) -> FileKind | None:
    """The kind an object says it is (None for a bare fd)."""
    kind = getattr(obj, "kind", None)
    return kind if isinstance(kind, FileKind) else None


def holders_of(backend: Backend, path: str = DEVICE) -> list[int]:
    """PIDs that have ``path`` open (scans /proc/*/fd)."""
    pids: list[int] = []
    try:
        entries = backend.files.listdir("/proc")
    except OSError:
        return pids
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            fds = backend.files.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if backend.files.readlink(f"/proc/{entry}/fd/{fd}") == path:
                    pids.append(int(entry))
                    break
            except OSError:
                continue
    return pids


# Built when /dev/liveupdate opens, so that after a kexec the first
# retrieve (inside the blackout) does not pay for building cffi types.
_HOT_IOCTLS = (CREATE_SESSION, RETRIEVE_SESSION, PRESERVE_FD, RETRIEVE_FD, FINISH)


class LiveUpdate(FdObject):
    """The one open ``/dev/liveupdate`` of this process."""

    kind = FileKind.LIVEUPDATE

    def __init__(self, fd: int, *, backend: Backend | None = None, owned: bool = True):
        super().__init__(fd, backend=backend, owned=owned)
        ioctl.prepare(*_HOT_IOCTLS)

    @classmethod
    def open(cls, path: str = DEVICE, *, backend: Backend | None = None) -> "LiveUpdate":
        from .backend import get_backend

        be = get_backend(backend)
        try:
            fd = be.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            context = {"holders": holders_of(be, path)} if exc.errno == E.EBUSY else None
            raise errors.from_oserror(exc, "open(/dev/liveupdate)", "luo", context=context) from None
        return cls(fd, backend=be)

    def create_session(self, name: str) -> "Session":
        raw = session_name_bytes(name)
        arg = ioctl.call(self.backend, self.fd, CREATE_SESSION, name=raw, detail=lambda: f"session {name!r}")
        return Session(arg.fd, name, incoming=False, backend=self.backend)

    def retrieve_session(self, name: str) -> "Session":
        raw = session_name_bytes(name)
        arg = ioctl.call(self.backend, self.fd, RETRIEVE_SESSION, name=raw, detail=lambda: f"session {name!r}")
        return Session(arg.fd, name, incoming=True, backend=self.backend)

    def try_retrieve_session(self, name: str) -> "Session | None":
        """Retrieve ``name``, or None when there is no such incoming session
        (the seed test's stage detection, the series' patch 14/14, tools/testing/selftests/iommu/iommufd_liveupdate.c)."""
        try:
            return self.retrieve_session(name)
        except errors.NotFound:
            return None


@record
class PreservedFile:
    token: int
    fd: int
    kind: FileKind | None


class RetrievedFile:
    """A file retrieved from an incoming session: ``token``, the new ``fd``
    (the caller's to close) and its :class:`FileKind`. The kind is asked of
    /proc on first use, so a retrieve stays one ioctl in the blackout window."""

    __slots__ = ("token", "fd", "_backend", "_kind")

    def __init__(self, token: int, fd: int, backend: Backend, kind: FileKind | None = None):
        self.token = token
        self.fd = fd
        self._backend = backend
        self._kind = kind

    @property
    def kind(self) -> FileKind:
        if self._kind is None:
            self._kind = kind_of_fd(self._backend, self.fd)
        return self._kind

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Close the fd (the caller owns it); a second close does nothing."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self._backend.close(fd)

    def __enter__(self) -> "RetrievedFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RetrievedFile):
            return NotImplemented
        return (self.token, self.fd) == (other.token, other.fd)

    def __hash__(self) -> int:
        return hash((self.token, self.fd))

    def __repr__(self) -> str:
        kind = "?" if self._kind is None else self._kind.value
        return f"RetrievedFile(token={self.token:#x}, fd={self.fd}, kind={kind})"


class Session(FdObject):
    """A LUO session. Outgoing (created) sessions take ``preserve``; incoming
    (retrieved, after a kexec) sessions take ``retrieve`` and ``finish``."""

    kind = FileKind.LUO_SESSION

    def __init__(self, fd: int, name: str, *, incoming: bool, backend: Backend | None = None,
                 owned: bool = True):
        super().__init__(fd, backend=backend, owned=owned)
        self.name = name
        self.incoming = incoming
        self._ioctl = ioctl.raw_ioctl(self.backend)
        self.preserved: dict[int, PreservedFile] = {}
        #: the first retrieval of each token (a second one gives the caller
        #: another reference, which stays the caller's alone)
        self.retrieved: dict[int, RetrievedFile] = {}
        #: tokens stage 2 expects (from a manifest); used to name unretrieved ones on EBUSY
        self.expected_tokens: set[int] = set()

    def get_name(self) -> str:
        """The session's name as the kernel has it (LIVEUPDATE_SESSION_GET_NAME)."""
        arg = ioctl.call(self.backend, self.fd, GET_NAME)
        name: str = ffi.string(arg.name).decode()
        return name

    def preserve(self, obj: int | HasFileno, token: int) -> PreservedFile:
        """Preserve ``obj`` (an fd, or an object with ``fileno()``) under ``token``.

        Through a series kernel the order is memfd -> iommufd -> VFIO cdev,
        all in this one session (the series' patch 14/14: memfd, then iommufd, then cdev, in one session); ``pyiommufd.planner`` checks
        a whole plan before anything is touched.
        """
        check_token(token)
        if self.incoming:
            raise UsageError(f"session {self.name!r} is incoming (retrieved): it takes retrieve/finish, not preserve")
        fd = fd_of(obj)
        kind = _kind_of(obj)
        arg, buf = pair = PRESERVE_FD.take()
        arg.fd = fd
        arg.token = token
        try:
            self._ioctl(self.fileno(), PRESERVE_FD.request, buf)
        except OSError as exc:
            # what the file is (a /proc read) only matters for the error message
            raise ioctl.failure(exc, PRESERVE_FD,
                                lambda: {"kind": describe_fd(self.backend, fd) if kind is None else kind.description},
                                lambda: f"session {self.name!r}, token {token:#x}") from None
        PRESERVE_FD.give(pair)
        record = PreservedFile(token, fd, kind)
        self.preserved[token] = record
        return record

    def preserve_many(self, items: Iterable[tuple[int | HasFileno, int]]) -> list[PreservedFile]:
        """Preserve each ``(obj, token)`` of ``items``, in order: the bulk
        :meth:`preserve` for the critical path.

        Every item is checked and its struct built before the first ioctl
        (bad input: :class:`UsageError` naming the item, nothing preserved);
        then only the ioctls run. If the kernel refuses item ``i``, the error
        is that item's own typed error, its detail says which item failed and
        which were preserved before it, and it carries ``index`` (of the
        failed item) and ``done`` (the :class:`PreservedFile` records of
        items ``0..i-1``, which stay preserved and are in ``self.preserved``).
        """
        if self.incoming:
            raise UsageError(f"session {self.name!r} is incoming (retrieved): it takes retrieve/finish, not preserve")
        prepared: list[tuple[int, int, FileKind | None]] = []
        for index, item in enumerate(items):
            try:
                obj, token = item
            except (TypeError, ValueError):
                raise UsageError(f"preserve_many: item {index + 1} is not an (object, token) pair: {item!r}") from None
            try:
                # plain ints are the common case: checked inline, else by the full checks
                if token.__class__ is not int or not 0 <= token <= TOKEN_MAX:
                    check_token(token)
                if obj.__class__ is int and obj >= 0:
                    prepared.append((obj, token, None))
                    continue
                fd = fd_of(obj)
            except UsageError as exc:
                raise UsageError(f"preserve_many: item {index + 1}: {exc}") from None
            prepared.append((fd, token, _kind_of(obj)))
        n = len(prepared)
        array = PRESERVE_FD.array(n)
        for entry, (fd, token, _) in zip(array, prepared):
            entry.fd = fd
            entry.token = token
        i, failed = self._issue_each(PRESERVE_FD.request, PRESERVE_FD.buffers(array, n))
        if failed is not None:
            done = self._record_preserved(prepared[:i])
            fd, token, kind = prepared[i]
            error = ioctl.failure(failed, PRESERVE_FD,
                                  lambda: {"kind": describe_fd(self.backend, fd) if kind is None else kind.description},
                                  lambda: f"session {self.name!r}, token {token:#x}")
            raise errors.partial(error, i, n, "preserved", [r.token for r in done], done) from None
        return self._record_preserved(prepared)

    def _issue_each(self, request: int, bufs: Any) -> tuple[int, OSError | None]:
        """The bulk calls' only loop: ``request`` with each prepared buffer in
        turn; how many went through, and the error that stopped it."""
        do_ioctl, sfd = self._ioctl, self.fileno()
        for i, buf in enumerate(bufs):
            try:
                do_ioctl(sfd, request, buf)
            except OSError as exc:
                return i, exc
        return len(bufs), None

    def _record_preserved(self, prepared: list[tuple[int, int, FileKind | None]]) -> list[PreservedFile]:
        out = [PreservedFile(token, fd, kind) for fd, token, kind in prepared]
        self.preserved.update(zip((r.token for r in out), out))
        return out

    def retrieve_all(self, tokens: Iterable[int]) -> dict[int, RetrievedFile]:
        """Retrieve every token of ``tokens``, in order; returns
        ``{token: RetrievedFile}`` (the caller owns the fds). The bulk
        :meth:`retrieve` for the blackout window: the structs are built
        before the first ioctl.

        If the kernel refuses token ``i``, the error is that retrieve's typed
        error; its detail names the failed item and those retrieved before
        it, and it carries ``index`` and ``done`` (``{token: RetrievedFile}``
        of the ones retrieved, also in ``self.retrieved``: close or use them)."""
        if not self.incoming:
            raise UsageError(f"session {self.name!r} is outgoing (created): it takes preserve, not retrieve")
        tokens = list(tokens)
        for index, token in enumerate(tokens):
            try:
                check_token(token)
            except UsageError as exc:
                raise UsageError(f"retrieve_all: item {index + 1}: {exc}") from None
        n = len(tokens)
        array = RETRIEVE_FD.array(n)
        for i, token in enumerate(tokens):
            array[i].token = token
        i, failed = self._issue_each(RETRIEVE_FD.request, RETRIEVE_FD.buffers(array, n))
        done = {tokens[k]: self.record_retrieved(tokens[k], array[k].fd) for k in range(i)}
        if failed is not None:
            token = tokens[i]
            error = ioctl.failure(failed, RETRIEVE_FD, None, lambda: f"session {self.name!r}, token {token:#x}")
            raise errors.partial(error, i, n, "retrieved", list(done), done) from None
        return done

    def retrieve(self, token: int) -> RetrievedFile:
        """Retrieve the file preserved under ``token``; the caller owns the new fd."""
        check_token(token)
        if not self.incoming:
            raise UsageError(f"session {self.name!r} is outgoing (created): it takes preserve, not retrieve")
        arg, buf = pair = RETRIEVE_FD.take()
        arg.token = token
        try:
            self._ioctl(self.fileno(), RETRIEVE_FD.request, buf)
        except OSError as exc:
            raise ioctl.failure(exc, RETRIEVE_FD, None, lambda: f"session {self.name!r}, token {token:#x}") from None
        fd: int = arg.fd
        RETRIEVE_FD.give(pair)
        return self.record_retrieved(token, fd)

    def record_retrieved(self, token: int, fd: int, kind: FileKind | None = None) -> RetrievedFile:
        """Note ``fd`` as ``token``'s retrieved file (a retrieve, or an fd
        handed over that was retrieved elsewhere); the first one stays."""
        got = RetrievedFile(token, fd, self.backend, kind)
        self.retrieved.setdefault(token, got)
        return got

    def finish(self) -> None:
        """Tell the kernel the live update of this session is complete."""
        if not self.incoming:
            raise UsageError(f"session {self.name!r} is outgoing: only retrieved sessions can finish")
        ioctl.call(self.backend, self.fd, FINISH,
                   context=lambda: {"unretrieved": [hex(t) for t in sorted(self.expected_tokens - set(self.retrieved))]},
                   detail=lambda: f"session {self.name!r}")

    def __repr__(self) -> str:
        direction = "incoming" if self.incoming else "outgoing"
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<Session {self.name!r} {direction} {state} preserved={len(self.preserved)}>"
