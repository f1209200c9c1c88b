"""The session manifest: a JSON memfd preserved at the reserved token 0.

A live-update session is opaque after kexec: LUO hands back files by token
and nothing else. pyiommufd therefore writes a small JSON document into a
memfd and preserves it **first**, under the **reserved token 0**, in the same
session as everything it describes (the convention systemd's FD store over
LUO uses: one session, token 0 is a mapping memfd; anchors.md §3 "LUO
consumers"). Stage 2 retrieves token 0, reads what every other token is and
in which order to retrieve it, and needs no outside state. Token 0 is
therefore never available to plans or other files in a pyiommufd session.

Format (``version`` 1)::

    {
      "format": "pyiommufd-manifest", "version": 1,
      "creator": "pyiommufd 0.1.0", "created": "2026-05-01T12:00:00Z",
      "kernel_release": "7.3.4", "session": "vm0",
      "lu_abi": "lu-v1", "lu_nr": 149,          # null when no HWPT was marked
      "entries": [                              # in preservation order
        {"token": 1, "kind": "memfd", "name": "guest-ram", "size": 1048576,
         "seals": ["seal", "shrink", "grow"], "sha256": "…" | null},
        {"token": 2, "kind": "iommufd", "name": "iommufd0",
         "ioas": [{"id": 2, "name": "ioas0", "mappings": [
             {"iova": 4294967296, "length": 1048576, "memfd_token": 1,
              "memfd": "guest-ram", "offset": 0, "prot": ["read", "write"]}]}],
         "hwpts": [{"id": 3, "name": "hwpt0", "lu_token": 7901202, "ioas": "ioas0",
                    "device": "dev0"}]},
        {"token": 3, "kind": "vfio-cdev", "name": "dev0", "bdf": "0000:00:03.0",
         "cdev": "/dev/vfio/devices/vfio0", "iommufd_token": 2, "hwpt": "hwpt0"}
      ]
    }

``checksum`` is ``sha256:`` and the SHA-256 of the document without it (keys
sorted, no spaces): a manifest edited after pyiommufd wrote it, or damaged,
is refused. A manifest without one (from a pyiommufd before it) is still read,
since live updates cross versions; restore then relies on checking every file
against it.

Tokens are JSON integers (hex strings such as ``"0x10"`` are accepted on
input). Unknown members are ignored, so a same-version writer may add
fields; a higher ``version`` is refused with a clear error.

The manifest memfd is sealed ``F_SEAL_WRITE|SEAL|GROW|SHRINK`` after writing.
All four are in the set 7.3's memfd LUO preserves and re-applies
(``MEMFD_LUO_ALL_SEALS = SEAL|SHRINK|GROW|WRITE|FUTURE_WRITE|EXEC``,
Linux 7.3 mm/memfd_luo.c), so the document stays read-only across the kexec.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Literal, overload

from .backend import Backend, get_backend
from . import memfd
from .errors import UsageError
from .fdobject import FileKind
from .memfd import seal_names

if TYPE_CHECKING:
    from _typeshed import HasFileno

    from .memfd import MemFD, Seal

FORMAT = "pyiommufd-manifest"
VERSION = 1
MANIFEST_TOKEN = 0
MANIFEST_NAME = "pyiommufd-manifest"
MAX_SIZE = 16 << 20
TOKEN_MAX = (1 << 64) - 1

#: the kinds an entry may have (written as their stable values)
KINDS = (FileKind.MEMFD, FileKind.IOMMUFD, FileKind.VFIO_CDEV, FileKind.OTHER)
#: preservation (and retrieval) order: memfd -> iommufd -> vfio cdev (the series' patch 14/14: memfd, then iommufd, then cdev, in one session)
KIND_ORDER = {FileKind.MEMFD: 0, FileKind.IOMMUFD: 1, FileKind.VFIO_CDEV: 2, FileKind.OTHER: 3}
#: retrieval order after kexec: memfds, then cdevs, then iommufds (whose retrieve
#: fails with EOPNOTSUPP in Phase 1 of the series, the series' cover letter: what Phase 1 restores after the kexec), as the
#: series' selftest does (the series' patch 14/14, tools/testing/selftests/iommu/iommufd_liveupdate.c)
RETRIEVE_ORDER = {FileKind.MEMFD: 0, FileKind.VFIO_CDEV: 1, FileKind.IOMMUFD: 2, FileKind.OTHER: 3}
PROTS = ("read", "write")


def _fail(where: str, message: str) -> UsageError:
    return UsageError(f"malformed manifest: {where}: {message}")


def _token(value: Any, where: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise _fail(where, f"not a token: {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= TOKEN_MAX:
        raise _fail(where, f"a token is an integer from 0 to 2**64-1, not {value!r}")
    return value


@overload
def _uint(value: Any, where: str, *, optional: Literal[False] = False) -> int: ...
@overload
def _uint(value: Any, where: str, *, optional: bool) -> int | None: ...


def _uint(value: Any, where: str, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(where, f"expected a non-negative integer, not {value!r}")
    return value


@overload
def _str(value: Any, where: str, *, optional: Literal[False] = False) -> str: ...
@overload
def _str(value: Any, where: str, *, optional: bool) -> str | None: ...


def _str(value: Any, where: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or (not value and not optional):
        raise _fail(where, f"expected a non-empty string, not {value!r}")
    return value


def _dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"expected an object, not {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(where, f"expected a list, not {type(value).__name__}")
    return value


@dataclass
class Mapping:
    """One IOMMU_IOAS_MAP_FILE of a memfd of this session."""

    iova: int
    length: int
    memfd_token: int
    memfd: str
    offset: int = 0
    prot: list[str] = field(default_factory=lambda: ["read", "write"])

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Mapping":
        data = _dict(data, where)
        prot = _list(data.get("prot", ["read", "write"]), f"{where}.prot")
        for p in prot:
            if p not in PROTS:
                raise _fail(f"{where}.prot", f"unknown protection {p!r} (known: {', '.join(PROTS)})")
        return cls(iova=_uint(data.get("iova"), f"{where}.iova"),
                   length=_uint(data.get("length"), f"{where}.length"),
                   memfd_token=_token(data.get("memfd_token"), f"{where}.memfd_token"),
                   memfd=_str(data.get("memfd"), f"{where}.memfd"),
                   offset=_uint(data.get("offset", 0), f"{where}.offset"),
                   prot=list(prot))


@dataclass
class Ioas:
    id: int
    name: str
    mappings: list[Mapping] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Ioas":
        data = _dict(data, where)
        return cls(id=_uint(data.get("id"), f"{where}.id"), name=_str(data.get("name"), f"{where}.name"),
                   mappings=[Mapping.from_dict(m, f"{where}.mappings[{i}]")
                             for i, m in enumerate(_list(data.get("mappings"), f"{where}.mappings"))])


@dataclass
class Hwpt:
    id: int
    name: str
    lu_token: int
    ioas: str
    device: str | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Hwpt":
        data = _dict(data, where)
        return cls(id=_uint(data.get("id"), f"{where}.id"), name=_str(data.get("name"), f"{where}.name"),
                   lu_token=_token(data.get("lu_token"), f"{where}.lu_token"),
                   ioas=_str(data.get("ioas"), f"{where}.ioas"),
                   device=_str(data.get("device"), f"{where}.device", optional=True))


@dataclass
class Entry:
    """One preserved file. Kind-specific members are None for other kinds."""

    token: int
    kind: FileKind
    name: str
    # memfd
    size: int | None = None
    seals: list[str] | None = None
    sha256: str | None = None
    # iommufd
    ioas: list[Ioas] | None = None
    hwpts: list[Hwpt] | None = None
    # vfio-cdev
    bdf: str | None = None
    cdev: str | None = None
    iommufd_token: int | None = None
    hwpt: str | None = None
    # other
    description: str | None = None

    def __post_init__(self) -> None:
        self.kind = FileKind(self.kind)   # a caller's stable value becomes the enum

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        out["kind"] = self.kind.value
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Entry":
        data = _dict(data, where)
        kind = next((k for k in KINDS if k.value == data.get("kind")), None)
        if kind is None:
            raise _fail(f"{where}.kind", f"unknown kind {data.get('kind')!r} "
                        f"(known: {', '.join(k.value for k in KINDS)})")
        entry = cls(token=_token(data.get("token"), f"{where}.token"), kind=kind,
                    name=_str(data.get("name"), f"{where}.name"))
        if kind is FileKind.MEMFD:
            entry.size = _uint(data.get("size"), f"{where}.size")
            seals = _list(data.get("seals"), f"{where}.seals")
            for s in seals:
                if s not in memfd.SEAL_NAMES:
                    raise _fail(f"{where}.seals", f"unknown seal {s!r} (known: {', '.join(memfd.SEAL_NAMES)})")
            entry.seals = list(seals)
            digest = _str(data.get("sha256"), f"{where}.sha256", optional=True)
            if digest is not None and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
                raise _fail(f"{where}.sha256", "expected 64 lower-case hex digits")
            entry.sha256 = digest
        elif kind is FileKind.IOMMUFD:
            entry.ioas = [Ioas.from_dict(x, f"{where}.ioas[{i}]")
                          for i, x in enumerate(_list(data.get("ioas"), f"{where}.ioas"))]
            entry.hwpts = [Hwpt.from_dict(x, f"{where}.hwpts[{i}]")
                           for i, x in enumerate(_list(data.get("hwpts"), f"{where}.hwpts"))]
        elif kind is FileKind.VFIO_CDEV:
            entry.bdf = _str(data.get("bdf"), f"{where}.bdf", optional=True)
            entry.cdev = _str(data.get("cdev"), f"{where}.cdev", optional=True)
            if entry.bdf is None and entry.cdev is None:
                raise _fail(where, "a vfio-cdev entry needs bdf or cdev")
            if data.get("iommufd_token") is not None:
                entry.iommufd_token = _token(data.get("iommufd_token"), f"{where}.iommufd_token")
            entry.hwpt = _str(data.get("hwpt"), f"{where}.hwpt", optional=True)
        else:
            entry.description = _str(data.get("description"), f"{where}.description", optional=True)
        return entry


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _creator() -> str:
    from . import __version__

    return f"pyiommufd {__version__}"


@dataclass
class Manifest:
    session: str
    entries: list[Entry] = field(default_factory=list)
    kernel_release: str = ""
    lu_abi: str | None = None
    lu_nr: int | None = None
    creator: str = field(default_factory=_creator)
    created: str = field(default_factory=_now)
    version: int = VERSION
    #: the VMM live update's record of the VM (JSON: :mod:`pyiommufd.qemu.machine` parses it)
    vmm: dict[str, Any] | None = None

    # -- queries -------------------------------------------------------------
    def entry(self, token: int) -> Entry | None:
        return next((e for e in self.entries if e.token == token), None)

    def by_name(self, name: str) -> Entry | None:
        return next((e for e in self.entries if e.name == name), None)

    @property
    def tokens(self) -> list[int]:
        """Every token of the session, the manifest's own (0) first."""
        return [MANIFEST_TOKEN] + [e.token for e in self.entries]

    def preserve_order(self) -> list[Entry]:
        """Entries in preservation order: memfd, iommufd, cdev (the series' patch 14/14: memfd, then iommufd, then cdev, in one session)."""
        return sorted(self.entries, key=lambda e: KIND_ORDER[e.kind])

    def retrieve_order(self) -> list[Entry]:
        """Entries in the order stage 2 retrieves them: memfds, cdevs, iommufds."""
        return sorted(self.entries, key=lambda e: RETRIEVE_ORDER[e.kind])

    # -- validation ------------------------------------------------------------
    def validate(self) -> "Manifest":
        """Check cross references; raises :class:`UsageError`."""
        if self.version > VERSION:
            raise UsageError(f"manifest format version {self.version} is newer than this pyiommufd "
                             f"understands (at most {VERSION}): upgrade pyiommufd for stage 2")
        if self.version < 1:
            raise _fail("version", f"{self.version} is not a version")
        from .luo import check_session_name

        try:
            check_session_name(self.session)
        except UsageError as exc:
            raise _fail("session", str(exc)) from None
        tokens: dict[int, str] = {}
        names: set[str] = set()
        for i, entry in enumerate(self.entries):
            where = f"entries[{i}] ({entry.name!r})"
            if entry.token == MANIFEST_TOKEN:
                raise _fail(where, "token 0 is reserved for the manifest itself")
            if entry.token in tokens:
                raise _fail(where, f"token {entry.token:#x} is used by {tokens[entry.token]!r} too")
            if entry.name in names:
                raise _fail(where, f"name {entry.name!r} is used twice")
            tokens[entry.token] = entry.name
            names.add(entry.name)
        memfds = {e.token: e for e in self.entries if e.kind is FileKind.MEMFD}
        for entry in self.entries:
            if entry.kind is FileKind.IOMMUFD:
                ioas_names = {x.name for x in entry.ioas or []}
                for ioas in entry.ioas or []:
                    for m in ioas.mappings:
                        target = memfds.get(m.memfd_token)
                        if target is None:
                            raise _fail(f"{entry.name}.{ioas.name}", f"maps token {m.memfd_token:#x}, "
                                        "which is not a memfd of this session")
                        if target.size is not None and m.offset + m.length > target.size:
                            raise _fail(f"{entry.name}.{ioas.name}", f"maps {target.name!r} past its end")
                lu_tokens: set[int] = set()
                for hwpt in entry.hwpts or []:
                    if hwpt.ioas not in ioas_names:
                        raise _fail(f"{entry.name}.{hwpt.name}", f"unknown IOAS {hwpt.ioas!r}")
                    if hwpt.lu_token in lu_tokens:
                        raise _fail(f"{entry.name}.{hwpt.name}", f"HWPT token {hwpt.lu_token:#x} used twice")
                    lu_tokens.add(hwpt.lu_token)
            elif entry.kind is FileKind.VFIO_CDEV and entry.iommufd_token is not None:
                target = self.entry(entry.iommufd_token)
                if target is None or target.kind is not FileKind.IOMMUFD:
                    raise _fail(entry.name, f"iommufd_token {entry.iommufd_token:#x} is not an iommufd "
                                "of this session")
        return self

    # -- JSON ------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": self.version, "creator": self.creator,
                "created": self.created, "kernel_release": self.kernel_release,
                "session": self.session, "lu_abi": self.lu_abi, "lu_nr": self.lu_nr,
                "manifest_token": MANIFEST_TOKEN,
                "entries": [e.as_dict() for e in self.entries],
                **({} if self.vmm is None else {"vmm": self.vmm})}

    def to_json(self, *, indent: int | None = 1) -> str:
        self.validate()
        doc = self.as_dict()
        doc["checksum"] = checksum(doc)
        return json.dumps(doc, indent=indent, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        data = _dict(data, "document")
        if "checksum" in data:
            expected = checksum({k: v for k, v in data.items() if k != "checksum"})
            if data["checksum"] != expected:
                raise UsageError("manifest at token 0 fails its checksum: it was changed after pyiommufd "
                                 "wrote it, or is damaged; refusing to use it")
        if data.get("format") != FORMAT:
            raise _fail("format", f"expected {FORMAT!r}, got {data.get('format')!r} "
                        "(is token 0 of this session a pyiommufd manifest?)")
        version = data.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise _fail("version", f"expected an integer, not {version!r}")
        if version > VERSION:
            raise UsageError(f"manifest format version {version} is newer than this pyiommufd "
                             f"understands (at most {VERSION}): upgrade pyiommufd for stage 2")
        token = data.get("manifest_token", MANIFEST_TOKEN)
        if token != MANIFEST_TOKEN:
            raise _fail("manifest_token", f"must be {MANIFEST_TOKEN}, not {token!r}")
        lu_abi = _str(data.get("lu_abi"), "lu_abi", optional=True)
        manifest = cls(
            session=_str(data.get("session"), "session"),
            entries=[Entry.from_dict(e, f"entries[{i}]")
                     for i, e in enumerate(_list(data.get("entries"), "entries"))],
            kernel_release=_str(data.get("kernel_release", ""), "kernel_release", optional=True) or "",
            lu_abi=lu_abi,
            lu_nr=_uint(data.get("lu_nr"), "lu_nr", optional=True),
            creator=_str(data.get("creator", ""), "creator", optional=True) or "",
            created=_str(data.get("created", ""), "created", optional=True) or "",
            version=version,
            vmm=None if data.get("vmm") is None else _dict(data.get("vmm"), "vmm"))
        return manifest.validate()

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        if isinstance(text, bytes):
            try:
                text = text.decode()
            except UnicodeDecodeError as exc:
                raise _fail("document", f"not UTF-8: {exc}") from None
        if not text.strip():
            raise _fail("document", "empty (token 0 holds no manifest)")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if not text.rstrip().endswith("}"):     # a document always ends with its object
                raise _fail("document", f"truncated: the JSON stops after {len(text.encode())} bytes "
                            f"({exc.msg})") from None
            raise _fail("document", f"not JSON: {exc}") from None
        except RecursionError:
            raise _fail("document", "not JSON this reader accepts: nested too deeply") from None
        return cls.from_dict(data)


def checksum(doc: dict[str, Any]) -> str:
    """``sha256:<hex>`` of ``doc`` as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def manifest_seals() -> Seal:
    """The seals the manifest memfd gets after writing: WRITE|SEAL|GROW|SHRINK,
    all within 7.3 memfd LUO's ``MEMFD_LUO_ALL_SEALS`` (Linux 7.3 mm/memfd_luo.c)."""
    from .memfd import Seal

    return Seal.WRITE | Seal.SEAL | Seal.GROW | Seal.SHRINK


def write_to_memfd(manifest: Manifest, backend: Backend | None = None) -> MemFD:
    """Write ``manifest`` into a new memfd, seal it and return the
    :class:`~pyiommufd.memfd.MemFD` (preserve it at token 0 before anything else)."""
    from .memfd import MemFD

    data = manifest.to_json().encode()
    if len(data) > MAX_SIZE:
        raise UsageError(f"manifest too large ({len(data)} bytes, at most {MAX_SIZE})")
    memfd = MemFD.create(MANIFEST_NAME, len(data), sealing=True, backend=get_backend(backend))
    try:
        memfd.write(data, 0)
        memfd.add_seals(manifest_seals())
    except BaseException:
        memfd.close()
        raise
    return memfd


def read_from_fd(fd: int | HasFileno, backend: Backend | None = None) -> Manifest:
    """Read and validate the manifest in ``fd`` (an int or an object with
    ``fileno()``, e.g. token 0 retrieved after kexec)."""
    from .fdobject import fd_of

    be = get_backend(backend)
    raw_fd = fd_of(fd)
    try:
        size = be.fstat_size(raw_fd)
    except OSError as exc:
        raise UsageError(f"cannot read the manifest: {os.strerror(exc.errno or 0)}") from None
    if size > MAX_SIZE:
        raise _fail("document", f"{size} bytes is larger than a manifest can be ({MAX_SIZE})")
    chunks, done = [], 0
    while done < size:
        try:
            chunk = be.pread(raw_fd, size - done, done)
        except OSError as exc:
            raise UsageError(f"cannot read the manifest: {os.strerror(exc.errno or 0)}") from None
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return Manifest.from_json(b"".join(chunks))


def sorted_entries(entries: Iterable[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: KIND_ORDER[e.kind])


__all__ = ["FORMAT", "VERSION", "MANIFEST_TOKEN", "KINDS", "Manifest", "Entry", "Ioas", "Hwpt", "Mapping",
           "write_to_memfd", "read_from_fd", "manifest_seals", "seal_names"]
