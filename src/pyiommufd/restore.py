"""Stage 2 of a live update, the twin of :func:`pyiommufd.planner.execute`:
retrieve an incoming session through the agent as its manifest (token 0)
describes it, in the kernel's order, and check what came back.

:func:`restore_session` does the work and returns a :class:`Restored`
report; ``pyiommufd restore`` only renders it (and, with ``--exec``, hands
the fds to a command).
"""
from __future__ import annotations

import enum
import errno as E
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import errors
from . import manifest as M
from .backend import Backend
from .errors import VerificationFailed
from .fdobject import FileKind
from .manifest import MANIFEST_TOKEN, Entry, Manifest

if TYPE_CHECKING:
    from .agent.client import AgentClient


class TokenStatus(enum.Enum):
    """What happened to one token of the session."""

    RETRIEVED = "retrieved"
    #: a cdev whose device is not on vfio-pci: not asked for (a failed retrieve is sticky)
    NOT_BOUND = "not-bound"
    #: an iommufd in Phase 1 of the series: EOPNOTSUPP is what the kernel must say
    EXPECTED_FAILURE = "expected-failure"
    FAILED = "failed"


@dataclass
class RestoredToken:
    token: int
    kind: FileKind
    name: str
    status: TokenStatus
    fd: int | None = None
    bdf: str | None = None
    note: str | None = None
    error: str | None = None
    errno: int | None = None
    size: int | None = None
    #: "ok", or what differs from the manifest (only with verify)
    verify: str | None = None

    @property
    def details(self) -> str | None:
        return self.verify or self.note or self.error

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"token": self.token, "kind": self.kind.value, "name": self.name}
        if self.bdf is not None:
            out["bdf"] = self.bdf
        out["status"] = self.status.value
        for key in ("note", "error"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.errno is not None:
            out["errno"] = errors.errname(self.errno)
        if self.fd is not None:
            out["fd"] = self.fd
        if self.status is TokenStatus.RETRIEVED and self.kind is FileKind.MEMFD:
            out["size"] = self.size
        if self.verify is not None:
            out["verify"] = self.verify
        return out


@dataclass
class Restored:
    """The outcome of :func:`restore_session`. ``fds`` are this process's
    own references (``{token: fd}``, the manifest's included): the caller
    closes them (:meth:`close`), the agent keeps its own until finish."""

    session: str
    already_held: bool
    manifest: Manifest
    tokens: list[RestoredToken]
    fds: dict[int, int]
    verified: bool | None
    #: the first retrieve the kernel refused (an expected iommufd EOPNOTSUPP aside)
    first_error: errors.KernelError | None = None
    unbound: list[str] = field(default_factory=list)
    mismatches: int = 0

    def failure(self) -> errors.PyiommufdError | None:
        """Why this restore did not succeed, most important first (None: it did)."""
        if self.first_error is not None:
            return self.first_error
        if self.unbound:
            return VerificationFailed(
                f"not retrieved: the cdev of {', '.join(self.unbound)}, which is not bound to vfio-pci; bind it "
                f"(`pyiommufd bind {self.unbound[0]}`, or restore --bind-vfio) and run restore again (a failed "
                "retrieve would be sticky)")
        if self.mismatches:
            return VerificationFailed(f"{self.mismatches} file(s) differ from the manifest")
        return None

    def by_token(self, token: int) -> RestoredToken:
        return next(t for t in self.tokens if t.token == token)

    def as_dict(self) -> dict[str, Any]:
        return {"session": self.session, "already_held": self.already_held, "manifest": self.manifest.as_dict(),
                "tokens": [t.as_dict() for t in self.tokens], "verified": self.verified}

    def close(self, backend: Backend) -> None:
        for fd in self.fds.values():
            try:
                backend.close(fd)
            except OSError:
                pass
        self.fds.clear()


def restore_session(client: AgentClient, backend: Backend, session: str, *, verify: bool = False,
                    bind_vfio: bool = False) -> Restored:
    """Have the agent retrieve incoming ``session`` and every token its
    manifest lists: memfds (in one request), then cdevs (only of devices on
    vfio-pci; ``bind_vfio`` binds them first), then iommufds. With ``verify``
    every file must be of its entry's kind and every memfd of its size,
    seals and sha256.

    Raises :class:`~pyiommufd.errors.UsageError` when the session has no
    manifest and :class:`~pyiommufd.errors.VerificationFailed` when its
    manifest cannot be trusted; what failed per token is in the report."""
    info = client.retrieve_session(session)
    try:
        fd0 = client.retrieve(session, MANIFEST_TOKEN)
    except errors.NotFound:
        raise errors.UsageError(f"session {session!r} has no manifest at token 0: it was not preserved by "
                                "`pyiommufd preserve` (the agent holds it; retrieve tokens with the Python "
                                "API)") from None
    fds: dict[int, int] = {MANIFEST_TOKEN: fd0}
    bulk: dict[int, int] = {}
    try:
        manifest = M.read_from_fd(fd0, backend)
        check_manifest_fd(backend, fd0, session, manifest)
        done = Restored(session, bool(info.get("already_held", False)), manifest,
                        [RestoredToken(MANIFEST_TOKEN, FileKind.MANIFEST, "manifest", TokenStatus.RETRIEVED, fd=fd0)],
                        fds, None)
        order = manifest.retrieve_order()
        # memfds need no readiness check: retrieve them all in one request;
        # if one fails, the loop below retrieves one by one (and reports it)
        try:
            bulk = client.retrieve_many(session, [e.token for e in order if e.kind is FileKind.MEMFD])
        except errors.KernelError:
            bulk = {}
        for entry in order:
            done.tokens.append(_restore_entry(client, backend, done, entry, bulk, verify, bind_vfio))
        done.verified = (done.mismatches == 0) if verify else None
        return done
    except BaseException:
        for fd in fds.values():
            _close(backend, fd)
        raise
    finally:
        for fd in bulk.values():
            _close(backend, fd)


def _restore_entry(client: AgentClient, backend: Backend, done: Restored, entry: Entry, bulk: dict[int, int],
                   verify: bool, bind_vfio: bool) -> RestoredToken:
    row = RestoredToken(entry.token, entry.kind, entry.name, TokenStatus.FAILED)
    if entry.kind is FileKind.VFIO_CDEV and entry.bdf:
        row.bdf = entry.bdf
        note = vfio_ready(backend, entry.bdf, bind_vfio)
        if note is not None:
            row.status, row.note = TokenStatus.NOT_BOUND, note
            done.unbound.append(entry.bdf)
            return row
    try:
        fd = bulk.pop(entry.token) if entry.token in bulk else client.retrieve(done.session, entry.token)
    except errors.KernelError as exc:
        row.error, row.errno = str(exc), exc.errno
        if entry.kind is FileKind.IOMMUFD and exc.errno == E.EOPNOTSUPP:
            row.status = TokenStatus.EXPECTED_FAILURE
            row.note = ("EOPNOTSUPP: Phase 1 of the series cannot restore an iommufd; the HWPTs stay "
                        "kernel-owned and FINISH will say EBUSY (the series' cover letter: what Phase 1 "
                        "restores after the kexec)")
        else:
            done.first_error = done.first_error or exc
        return row
    done.fds[entry.token] = fd
    row.status, row.fd = TokenStatus.RETRIEVED, fd
    wrong_kind = check_kind(backend, fd, entry.kind) if verify else None
    if wrong_kind:
        row.verify = wrong_kind
        done.mismatches += 1
    elif entry.kind is FileKind.MEMFD:
        row.size = entry.size
        if verify:
            diffs = verify_memfd(backend, fd, entry)
            row.verify = "ok" if not diffs else "; ".join(diffs)
            done.mismatches += bool(diffs)
    return row


def _close(backend: Backend, fd: int) -> None:
    try:
        backend.close(fd)
    except OSError:
        pass


def verify_memfd(backend: Backend, fd: int, entry: Entry) -> list[str]:
    """Differences between a retrieved memfd and its manifest entry."""
    from .manifest import seal_names
    from .memfd import MemFD

    problems = []
    mfd = MemFD.from_fd(fd, backend=backend, owned=False)
    size = mfd.size
    if entry.size is not None and size != entry.size:
        problems.append(f"size {size:#x}, manifest says {entry.size:#x}")
    if entry.seals is not None:
        try:
            got = sorted(seal_names(mfd.seals))
            if got != sorted(entry.seals):
                problems.append(f"seals {'|'.join(got) or '-'}, manifest says {'|'.join(entry.seals) or '-'}")
        except OSError as exc:
            problems.append(f"cannot read the seals: {exc}")
    if entry.sha256 is not None and not problems:
        digest = mfd.sha256()
        if digest != entry.sha256:
            problems.append(f"sha256 {digest[:16]}…, manifest says {entry.sha256[:16]}…")
    return problems


def check_kind(backend: Backend, fd: int, kind: FileKind) -> str | None:
    """None when ``fd`` is the kind of file the manifest says; else what it is."""
    from .luo import describe_fd, kind_of_fd

    if kind is FileKind.OTHER:
        return None
    actual = kind_of_fd(backend, fd)
    if actual == kind:
        return None
    return f"the manifest says {kind.value}, the kernel handed back {describe_fd(backend, fd) or 'something else'}"


def check_manifest_fd(backend: Backend, fd: int, session: str, manifest: Manifest) -> None:
    """Refuse a token 0 that could have been rewritten, or that describes
    another session."""
    from .memfd import MemFD, Seal

    if manifest.session != session:
        raise VerificationFailed(f"the manifest at token 0 of session {session!r} describes session "
                                 f"{manifest.session!r}: refusing to use it")
    problem = check_kind(backend, fd, FileKind.MEMFD)
    if problem is None:
        try:
            sealed = bool(MemFD.from_fd(fd, backend=backend, owned=False).seals & Seal.WRITE)
        except OSError:
            sealed = False
        if not sealed:
            problem = "it is not sealed against writes, so anyone holding it could have changed it"
    if problem:
        raise VerificationFailed(f"the manifest at token 0 of session {session!r} cannot be trusted: {problem}")


def vfio_ready(backend: Backend, bdf: str, bind: bool) -> str | None:
    """None when ``bdf`` is on vfio-pci (after binding it, with ``bind``);
    else why its cdev must not be retrieved yet."""
    from . import pci

    try:
        dev = pci.PciDevice(bdf, backend)
        dev.require()
        driver = dev.driver
        if driver == pci.VFIO_PCI_DRIVER:
            return None
        if bind:
            dev.bind_vfio()
            if dev.driver == pci.VFIO_PCI_DRIVER:
                return None
            return f"bound {bdf} to vfio-pci, but it is on {dev.driver or 'no driver'}"
    except (errors.PyiommufdError, OSError) as exc:
        return f"cannot check {bdf}: {exc}"
    return (f"{bdf} is on {driver or 'no driver'}, not vfio-pci: bind it first (`pyiommufd bind {bdf}` or "
            "--bind-vfio); retrieving now would fail for good (failed retrieves are sticky)")


__all__ = ["restore_session", "Restored", "RestoredToken", "TokenStatus", "check_kind", "check_manifest_fd",
           "verify_memfd", "vfio_ready"]
