"""Live-update preservation plans: validate and order them without touching
the kernel (``pyiommufd plan --dry-run``), then execute them.

A plan is declarative (TOML, JSON, or built from CLI options)::

    session = "vm0"
    lu_abi = "lu-v1"                 # lu-v1 | lu-v2 | probe (default: probe)

    [[memfd]]
    name = "guest-ram"
    size = "1M"                      # bytes, or with K/M/G suffix
    seals = ["seal", "grow", "shrink"]   # or "live-update"
    contents = "random:42"           # zero | random[:SEED] | @PATH | hex:PATTERN
    token = 0x890123                 # LUO token (default: assigned)

    [[iommufd]]
    name = "iommufd0"
    token = 0x123456
      [[iommufd.ioas]]
      name = "ioas0"
      mappings = [{ memfd = "guest-ram", offset = 0, length = "1M", iova = 0x100000000 }]
      [[iommufd.hwpt]]
      name = "hwpt0"
      ioas = "ioas0"
      device = "dev0"                # the device IOMMU_HWPT_ALLOC is done for
      lu_token = 0x789012            # IOMMU_HWPT_LU_* token (per iommufd)

    [[device]]
    name = "dev0"
    bdf = "0000:00:03.0"             # or cdev = "/dev/vfio/devices/vfio0"
    hwpt = "hwpt0"
    token = 0x654321

:func:`validate` returns :class:`Problem` s for every rule the series imposes
(docs/plan-format.md lists them with their sources); :func:`order` returns the
numbered :class:`Operation` s; :func:`check_order` re-checks any operation
sequence against the ordering rules. None of these touch the kernel.
:func:`execute` (at the end) carries a valid plan out through the object
model and preserves through the holder agent.

Token 0 of the session is reserved for the manifest
(:data:`pyiommufd.manifest.MANIFEST_TOKEN`).
"""
from __future__ import annotations

import json
import os
import random
import re
import tomllib
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .errors import UsageError
from .fdobject import FileKind
from .abi import REVISIONS as ABI_REVISIONS
from .abi import lookup as abi_lookup
from .luo import check_session_name
from .manifest import MANIFEST_TOKEN
from .memfd import LIVE_UPDATE_SEALS, LUO_PRESERVABLE_SEALS, seal_names
from .memfd import WRITE_SEALS as MEMFD_WRITE_SEALS

if TYPE_CHECKING:
    from .agent.client import AgentClient
    from .backend import Backend
from .memfd import parse_seals as memfd_parse_seals

PAGE_SIZE = 4096
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

#: what IOMMU live update needs at MAP_FILE time (the series' patch 11/14, iommufd preservation)
LU_SEALS = int(LIVE_UPDATE_SEALS)
#: what 7.3 memfd LUO can preserve (Linux 7.3 mm/memfd_luo.c); anything else: EOPNOTSUPP
LUO_SEALS = int(LUO_PRESERVABLE_SEALS)
WRITE_SEALS = int(MEMFD_WRITE_SEALS)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")


# -- plan model -------------------------------------------------------------------
@dataclass
class Contents:
    """What a memfd is filled with before sealing."""

    kind: str = "zero"          # zero | random | file | pattern
    seed: int = 0
    path: str | None = None
    pattern: bytes = b""

    def describe(self) -> str:
        if self.kind == "random":
            return f"random (seed {self.seed})"
        if self.kind == "file":
            return f"file {self.path}"
        if self.kind == "pattern":
            return f"pattern 0x{self.pattern.hex()}"
        return "zeros"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "random":
            out["seed"] = self.seed
        elif self.kind == "file":
            out["path"] = self.path
        elif self.kind == "pattern":
            out["pattern"] = self.pattern.hex()
        return out


@dataclass
class MemfdSpec:
    name: str
    size: int
    seals: int = LU_SEALS
    contents: Contents = field(default_factory=Contents)
    token: int | None = None
    hugetlb: bool = False
    preserve: bool = True
    sha256: bool = True
    session: str | None = None


@dataclass
class MappingSpec:
    memfd: str
    offset: int = 0
    length: int | None = None   # None: to the end of the memfd
    iova: int | None = None     # None: the kernel picks
    readable: bool = True
    writeable: bool = True
    kind: str = "file"          # only "file" (MAP_FILE) is preservable


@dataclass
class IoasSpec:
    name: str
    mappings: list[MappingSpec] = field(default_factory=list)


@dataclass
class HwptSpec:
    name: str
    ioas: str
    device: str | None = None
    lu_token: int | None = None
    mark: bool = True
    nested: bool = False        # any nesting key: not preservable (the series' patches 12-13/14, VFIO cdev preservation)


@dataclass
class IommufdSpec:
    name: str
    token: int | None = None
    ioas: list[IoasSpec] = field(default_factory=list)
    hwpts: list[HwptSpec] = field(default_factory=list)
    preserve: bool = True
    session: str | None = None


@dataclass
class DeviceSpec:
    name: str
    bdf: str | None = None
    cdev: str | None = None
    hwpt: str | None = None
    token: int | None = None
    preserve: bool = True
    pasid: bool = False         # any PASID attachment: not preservable in v1 (the series' patches 12-13/14, VFIO cdev preservation)
    session: str | None = None

    @property
    def ident(self) -> str:
        return self.bdf or self.cdev or "?"


@dataclass
class Plan:
    session: str
    memfds: list[MemfdSpec] = field(default_factory=list)
    iommufds: list[IommufdSpec] = field(default_factory=list)
    devices: list[DeviceSpec] = field(default_factory=list)
    lu_abi: str | None = None
    manifest: bool = True

    def memfd(self, name: str) -> MemfdSpec | None:
        return next((m for m in self.memfds if m.name == name), None)

    def device(self, name: str) -> DeviceSpec | None:
        return next((d for d in self.devices if d.name == name), None)

    def hwpt(self, name: str) -> tuple[IommufdSpec, HwptSpec] | tuple[None, None]:
        for iommufd in self.iommufds:
            for h in iommufd.hwpts:
                if h.name == name:
                    return iommufd, h
        return None, None

    def as_dict(self) -> dict[str, Any]:
        def clean(obj: Any) -> dict[str, Any]:
            d = asdict(obj)
            return d

        out: dict[str, Any] = {"session": self.session, "lu_abi": self.lu_abi, "manifest": self.manifest,
               "memfds": [], "iommufds": [clean(i) for i in self.iommufds],
               "devices": [clean(d) for d in self.devices]}
        for m in self.memfds:
            d = asdict(m)
            d["seals"] = seal_names(m.seals)
            d["contents"] = m.contents.as_dict()
            out["memfds"].append(d)
        return out


# -- parsing ------------------------------------------------------------------------
_SIZE_RE = re.compile(r"^\s*(0x[0-9a-fA-F]+|\d+)\s*([KMGT]i?B?|[kmgt]|B)?\s*$")
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


#: largest memfd size: ftruncate()'s off_t is a signed 64-bit number
MEMFD_SIZE_MAX = (1 << 63) - 1


def parse_size(value: Any, where: str, *, maximum: int = U64_MAX) -> int:
    """``4096``, ``"4K"``, ``"1M"``, ``"2GiB"``, ``"0x100000"``; at most ``maximum``."""
    if isinstance(value, bool):
        raise UsageError(f"{where}: not a size: {value!r}")
    size = None
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"{where}: a size must be >= 0, not {value}")
        size = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = (m[2] or "").upper().rstrip("B").rstrip("I")
            size = int(m[1], 0) * _UNITS[unit]
    if size is None:
        raise UsageError(f"{where}: not a size: {value!r} (use bytes or e.g. 4K, 1M, 2G)")
    if size > maximum:
        raise UsageError(f"{where}: {size:#x} bytes is more than the largest size, {maximum:#x}")
    return size


def parse_int(value: Any, where: str, *, maximum: int = U64_MAX) -> int:
    if isinstance(value, str):
        try:
            value = int(value.replace("_", ""), 0)
        except ValueError:
            raise UsageError(f"{where}: not an integer: {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{where}: not an integer: {value!r}")
    if not 0 <= value <= maximum:
        raise UsageError(f"{where}: {value:#x} is outside 0..{maximum:#x}")
    return value


def parse_token(value: Any, where: str) -> int | None:
    if value is None:
        return None
    return parse_int(value, where)


def parse_seals(value: Any, where: str) -> int:
    """A list of names, a comma/pipe string (``"seal,grow,shrink"``,
    ``"live-update"``, ``"none"``) or an integer bit mask."""
    try:
        return int(memfd_parse_seals(value))
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


def parse_contents(value: Any, where: str, *, base_dir: str | None = None) -> Contents:
    """``"zero"``, ``"random"``, ``"random:SEED"``, ``"@PATH"``, ``"file:PATH"``,
    ``"hex:PATTERN"`` / ``"0xPATTERN"``, or a table ``{random = SEED}``,
    ``{file = PATH}``, ``{pattern = "hex"}``, ``{zero = true}``."""
    if value is None:
        return Contents()
    if isinstance(value, dict):
        if len(value) != 1:
            raise UsageError(f"{where}: contents is one of zero, random, file, pattern")
        (key, arg), = value.items()
        if key == "zero":
            return Contents()
        if key == "random":
            return Contents("random", seed=parse_int(arg if arg is not True else 0, f"{where}.random"))
        if key in ("file", "path"):
            if not isinstance(arg, str) or not arg:
                raise UsageError(f"{where}.file: a path")
            return Contents("file", path=_resolve(arg, base_dir))
        if key in ("pattern", "hex"):
            return Contents("pattern", pattern=_hex(arg, f"{where}.pattern"))
        raise UsageError(f"{where}: unknown contents {key!r} (zero, random, file, pattern)")
    if not isinstance(value, str):
        raise UsageError(f"{where}: not contents: {value!r}")
    text = value.strip()
    low = text.lower()
    if low in ("zero", "zeros", "zeroes", ""):
        return Contents()
    if low == "random":
        return Contents("random")
    for prefix in ("random:", "random=", "random@"):
        if low.startswith(prefix):
            return Contents("random", seed=parse_int(text[len(prefix):], f"{where} (random seed)"))
    if text.startswith("@"):
        if len(text) == 1:
            raise UsageError(f"{where}: @ needs a path")
        return Contents("file", path=_resolve(text[1:], base_dir))
    if low.startswith("file:"):
        return Contents("file", path=_resolve(text[5:], base_dir))
    if low.startswith("hex:"):
        return Contents("pattern", pattern=_hex(text[4:], where))
    if low.startswith("0x"):
        return Contents("pattern", pattern=_hex(text[2:], where))
    raise UsageError(f"{where}: unknown contents {value!r} (zero, random[:SEED], @PATH, hex:PATTERN)")


def _hex(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise UsageError(f"{where}: a hex string, not {text!r}")
    text = text.strip().removeprefix("0x").replace("_", "")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"{where}: not a hex pattern: {text!r}") from None
    if not raw:
        raise UsageError(f"{where}: empty hex pattern")
    return raw


def _resolve(path: str, base_dir: str | None) -> str:
    path = os.path.expanduser(path)
    if base_dir and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return path


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise UsageError(f"{where}: a name is 1-64 characters of A-Z a-z 0-9 _ . + -, not {value!r}")
    return value


def _bool(value: Any, where: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise UsageError(f"{where}: true or false, not {value!r}")
    return value


def _items(data: dict[str, Any], keys: tuple[str, ...], where: str) -> list[Any]:
    found = [k for k in keys if k in data]
    if len(found) > 1:
        raise UsageError(f"{where}: use one of {', '.join(found)}, not both")
    if not found:
        return []
    value = data[found[0]]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise UsageError(f"{where}.{found[0]}: a list of tables")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise UsageError(f"{where}.{found[0]}[{i}]: a table, not {type(item).__name__}")
    return value


def _check_keys(data: dict[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(sorted(allowed))})")


_NESTING_KEYS = ("parent", "nested", "data_type", "data", "viommu", "nest_parent")
_PASID_KEYS = ("pasid", "pasids")


def plan_from_dict(data: Any, *, base_dir: str | None = None) -> Plan:
    """Build a :class:`Plan`; structural errors raise :class:`UsageError`
    (rule violations are left to :func:`validate`)."""
    if not isinstance(data, dict):
        raise UsageError("a plan is a table/object at the top level")
    _check_keys(data, ("session", "lu_abi", "manifest", "memfd", "memfds", "iommufd", "iommufds",
                       "device", "devices"), "plan")
    session = data.get("session")
    if not isinstance(session, str):
        raise UsageError("plan: `session` (the LUO session name) is required")
    lu_abi = data.get("lu_abi")
    if lu_abi is not None and not isinstance(lu_abi, str):
        raise UsageError(f"plan.lu_abi: a string (lu-v1, lu-v2, probe), not {lu_abi!r}")
    plan = Plan(session=session, lu_abi=lu_abi, manifest=_bool(data.get("manifest"), "plan.manifest", True))
    for i, m in enumerate(_items(data, ("memfd", "memfds"), "plan")):
        w = f"memfd[{i}]"
        _check_keys(m, ("name", "size", "seals", "contents", "fill", "token", "hugetlb", "preserve",
                        "sha256", "session"), w)
        if "contents" in m and "fill" in m:
            raise UsageError(f"{w}: use contents or fill, not both")
        if "size" not in m:
            raise UsageError(f"{w}: `size` is required")
        plan.memfds.append(MemfdSpec(
            name=_name(m.get("name"), f"{w}.name"), size=parse_size(m["size"], f"{w}.size", maximum=MEMFD_SIZE_MAX),
            seals=parse_seals(m.get("seals", "live-update"), f"{w}.seals"),
            contents=parse_contents(m.get("contents", m.get("fill")), f"{w}.contents", base_dir=base_dir),
            token=parse_token(m.get("token"), f"{w}.token"),
            hugetlb=_bool(m.get("hugetlb"), f"{w}.hugetlb", False),
            preserve=_bool(m.get("preserve"), f"{w}.preserve", True),
            sha256=_bool(m.get("sha256"), f"{w}.sha256", True),
            session=m.get("session")))
    for i, x in enumerate(_items(data, ("iommufd", "iommufds"), "plan")):
        w = f"iommufd[{i}]"
        _check_keys(x, ("name", "token", "ioas", "ioases", "hwpt", "hwpts", "preserve", "session"), w)
        spec = IommufdSpec(name=_name(x.get("name", f"iommufd{i}"), f"{w}.name"),
                           token=parse_token(x.get("token"), f"{w}.token"),
                           preserve=_bool(x.get("preserve"), f"{w}.preserve", True),
                           session=x.get("session"))
        for j, a in enumerate(_items(x, ("ioas", "ioases"), w)):
            wa = f"{w}.ioas[{j}]"
            _check_keys(a, ("name", "mappings", "mapping"), wa)
            ioas = IoasSpec(name=_name(a.get("name", f"ioas{j}"), f"{wa}.name"))
            for k, mp in enumerate(_items(a, ("mappings", "mapping"), wa)):
                wm = f"{wa}.mappings[{k}]"
                _check_keys(mp, ("memfd", "offset", "start", "length", "iova", "readable", "writeable",
                                 "kind", "user_va", "va"), wm)
                kind = mp.get("kind", "file")
                if "user_va" in mp or "va" in mp:
                    kind = "va"
                if kind not in ("file", "va", "map", "dmabuf"):
                    raise UsageError(f"{wm}.kind: file (IOMMU_IOAS_MAP_FILE), not {kind!r}")
                memfd = mp.get("memfd")
                if kind == "file":
                    memfd = _name(memfd, f"{wm}.memfd")
                ioas.mappings.append(MappingSpec(
                    memfd=memfd if isinstance(memfd, str) else "",
                    offset=parse_size(mp.get("offset", mp.get("start", 0)), f"{wm}.offset"),
                    length=None if mp.get("length") is None else parse_size(mp["length"], f"{wm}.length"),
                    iova=None if mp.get("iova") is None else parse_int(mp["iova"], f"{wm}.iova"),
                    readable=_bool(mp.get("readable"), f"{wm}.readable", True),
                    writeable=_bool(mp.get("writeable"), f"{wm}.writeable", True),
                    kind="file" if kind == "file" else kind))
            spec.ioas.append(ioas)
        for j, h in enumerate(_items(x, ("hwpt", "hwpts"), w)):
            wh = f"{w}.hwpt[{j}]"
            _check_keys(h, ("name", "ioas", "device", "lu_token", "token", "mark", "preserve")
                        + _NESTING_KEYS, wh)
            if "lu_token" in h and "token" in h:
                raise UsageError(f"{wh}: use lu_token or token, not both")
            ioas_name = h.get("ioas")
            if ioas_name is None and len(spec.ioas) == 1:
                ioas_name = spec.ioas[0].name
            nested = any(h.get(k) not in (None, False, "none", 0) for k in _NESTING_KEYS)
            spec.hwpts.append(HwptSpec(
                name=_name(h.get("name", f"hwpt{j}"), f"{wh}.name"),
                ioas=_name(ioas_name, f"{wh}.ioas"),
                device=None if h.get("device") is None else _name(h.get("device"), f"{wh}.device"),
                lu_token=parse_token(h.get("lu_token", h.get("token")), f"{wh}.lu_token"),
                mark=_bool(h.get("mark", h.get("preserve")), f"{wh}.mark", True),
                nested=nested))
        plan.iommufds.append(spec)
    for i, d in enumerate(_items(data, ("device", "devices"), "plan")):
        w = f"device[{i}]"
        _check_keys(d, ("name", "bdf", "cdev", "hwpt", "token", "preserve", "session") + _PASID_KEYS, w)
        bdf, cdev = d.get("bdf"), d.get("cdev")
        if bdf is not None and not isinstance(bdf, str) or cdev is not None and not isinstance(cdev, str):
            raise UsageError(f"{w}: bdf and cdev are strings")
        plan.devices.append(DeviceSpec(
            name=_name(d.get("name", f"dev{i}"), f"{w}.name"), bdf=bdf, cdev=cdev,
            hwpt=None if d.get("hwpt") is None else _name(d.get("hwpt"), f"{w}.hwpt"),
            token=parse_token(d.get("token"), f"{w}.token"),
            preserve=_bool(d.get("preserve"), f"{w}.preserve", True),
            pasid=any(d.get(k) not in (None, False, [], 0) for k in _PASID_KEYS),
            session=d.get("session")))
    return plan


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read a TOML (``.toml``) or JSON plan file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read plan {path}: {exc.strerror}") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise UsageError(f"plan {path} is not UTF-8 text") from None
    is_json = path.endswith(".json") or (not path.endswith(".toml") and text.lstrip().startswith("{"))
    try:
        data = json.loads(text) if is_json else tomllib.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"plan {path}: not valid JSON: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"plan {path}: not valid TOML: {exc}") from None
    return plan_from_dict(data, base_dir=os.path.dirname(os.path.abspath(path)))


def parse_memfd_option(text: str) -> dict[str, Any]:
    """``NAME:SIZE[:token=T][:fill=zero|random|@FILE|hex:..][:seed=N][:seals=a,b]``
    (the ``--memfd`` CLI option) as a plan table."""
    parts = text.split(":")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise UsageError(f"--memfd {text!r}: expected NAME:SIZE[:token=T][:fill=zero|random|@FILE][:seals=...]")
    out: dict[str, Any] = {"name": parts[0], "size": parts[1]}
    fill, seed = None, None
    rest = parts[2:]
    i = 0
    while i < len(rest):
        part = rest[i]
        key, sep, value = part.partition("=")
        if not sep:
            raise UsageError(f"--memfd {text!r}: {part!r} is not KEY=VALUE")
        if key == "fill" and value.lower() in ("hex", "random", "file") and i + 1 < len(rest) \
                and "=" not in rest[i + 1]:
            value = f"{value}:{rest[i + 1]}"   # fill=hex:abcd, fill=random:7
            i += 1
        if key == "token":
            out["token"] = value
        elif key == "fill":
            fill = value
        elif key == "seed":
            seed = value
        elif key == "seals":
            out["seals"] = value
        elif key == "hugetlb":
            out["hugetlb"] = value.lower() in ("1", "yes", "true", "on")
        else:
            raise UsageError(f"--memfd {text!r}: unknown key {key!r} (token, fill, seed, seals)")
        i += 1
    if seed is not None:
        if fill not in (None, "random"):
            raise UsageError(f"--memfd {text!r}: seed goes with fill=random")
        fill = f"random:{seed}"
    if fill is not None:
        out["contents"] = fill
    return out


def plan_from_options(session: str | None, *, memfds: Iterable[str] = (), devices: Iterable[str] = (),
                      hwpt_tokens: Iterable[str] = (), iommufd_token: str | None = None,
                      device_tokens: Iterable[str] = (), iommufd: bool = False,
                      lu_abi: str | None = None, base_iova: str | None = None) -> Plan:
    """The plan the ``preserve``/``plan`` options describe: the memfds; if
    there are devices (or ``iommufd``/``iommufd_token``), one iommufd with one
    IOAS mapping every memfd whole, one HWPT per device (marked with the
    matching ``--hwpt-token``, else assigned), each device attached to its own."""
    if not session:
        raise UsageError("--session NAME is required (or --plan FILE)")
    memfds, devices = list(memfds), list(devices)
    hwpt_tokens, device_tokens = list(hwpt_tokens), list(device_tokens)
    if not memfds and not devices:
        raise UsageError("nothing to preserve: give --memfd NAME:SIZE and/or --device BDF|CDEV (or --plan FILE)")
    if hwpt_tokens and len(hwpt_tokens) != len(devices):
        raise UsageError(f"{len(hwpt_tokens)} --hwpt-token for {len(devices)} --device: give one per device")
    if device_tokens and len(device_tokens) != len(devices):
        raise UsageError(f"{len(device_tokens)} --device-token for {len(devices)} --device: give one per device")
    if base_iova is not None and not (devices or iommufd or iommufd_token is not None):
        raise UsageError("--iova places the memfds in an IOAS: give --iommufd or --device too "
                         "(without an iommufd nothing is mapped)")
    data: dict[str, Any] = {"session": session, "memfd": [parse_memfd_option(m) for m in memfds]}
    if lu_abi:
        data["lu_abi"] = lu_abi
    if devices or iommufd or iommufd_token is not None:
        iova = None if base_iova is None else parse_int(base_iova, "--iova")
        mappings = []
        for m in data["memfd"]:
            entry: dict[str, Any] = {"memfd": m["name"]}
            if iova is not None:
                entry["iova"] = iova
                size = parse_size(m["size"], f"--memfd {m['name']}")
                iova += -(-size // PAGE_SIZE) * PAGE_SIZE
            mappings.append(entry)
        fd: dict[str, Any] = {"name": "iommufd0", "ioas": [{"name": "ioas0", "mappings": mappings}], "hwpt": []}
        if iommufd_token is not None:
            fd["token"] = iommufd_token
        data["iommufd"] = [fd]
        data["device"] = []
        for i, dev in enumerate(devices):
            hwpt = {"name": f"hwpt{i}", "ioas": "ioas0", "device": f"dev{i}"}
            if hwpt_tokens:
                hwpt["lu_token"] = hwpt_tokens[i]
            fd["hwpt"].append(hwpt)
            key = "cdev" if dev.startswith("/") else "bdf"
            entry = {"name": f"dev{i}", key: dev, "hwpt": f"hwpt{i}"}
            if device_tokens:
                entry["token"] = device_tokens[i]
            data["device"].append(entry)
    return plan_from_dict(data)


# -- validation -----------------------------------------------------------------------
@dataclass
class Problem:
    severity: str   # "error" | "warning"
    code: str
    message: str
    where: str = ""
    ref: str = ""   # a key of pyiommufd.citations.SOURCES

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def describe(self) -> str:
        """``where: message (source)``, without the severity."""
        from .citations import cite

        where = f"{self.where}: " if self.where else ""
        ref = f" ({cite(self.ref)})" if self.ref and cite(self.ref) else ""
        return f"{where}{self.message}{ref}"

    def __str__(self) -> str:
        return f"{self.severity}: {self.describe()}"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def errors_in(problems: Iterable[Problem]) -> list[Problem]:
    return [p for p in problems if p.is_error]


def abi_name(plan: Plan) -> str | None:
    """The LU ABI the plan asks for, normalized; None for probe, unspecified or unknown."""
    if plan.lu_abi is None or plan.lu_abi.lower() == "probe":
        return None
    try:
        return abi_lookup(plan.lu_abi).name
    except UsageError:
        return None


def marked_hwpts(plan: Plan) -> list[tuple[IommufdSpec, HwptSpec]]:
    return [(i, h) for i in plan.iommufds for h in i.hwpts if h.mark]


def memfds_needed_by(plan: Plan, iommufd: IommufdSpec) -> list[str]:
    """Memfds mapped in the IOASes of ``iommufd``'s marked HWPTs: the iommufd
    preserve needs each preserved in the same session first (the series' patch 11/14, iommufd preservation)."""
    ioas_names = {h.ioas for h in iommufd.hwpts if h.mark}
    names: list[str] = []
    for ioas in iommufd.ioas:
        if ioas.name in ioas_names:
            for m in ioas.mappings:
                if m.kind == "file" and m.memfd not in names:
                    names.append(m.memfd)
    return names


def device_iommufd(plan: Plan, device: DeviceSpec) -> IommufdSpec | None:
    if device.hwpt is None:
        return None
    iommufd, _ = plan.hwpt(device.hwpt)
    return iommufd


def validate(plan: Plan) -> list[Problem]:
    """Every rule violation of ``plan``, errors and warnings. Never touches the kernel."""
    problems: list[Problem] = []

    def err(code: str, message: str, where: str = "", ref: str = "") -> None:
        problems.append(Problem("error", code, message, where, ref))

    def warn(code: str, message: str, where: str = "", ref: str = "") -> None:
        problems.append(Problem("warning", code, message, where, ref))

    # session and ABI
    try:
        check_session_name(plan.session)
    except UsageError as exc:
        err("session-name", str(exc), "session", "4.1")
    abi = abi_name(plan)
    if plan.lu_abi is not None and abi is None and plan.lu_abi.lower() != "probe":
        err("lu-abi", f"unknown LU ABI revision {plan.lu_abi!r} (lu-v1, lu-v2, probe)", "lu_abi", "2.1, 2.3")
    for where, obj in ([(f"memfd {m.name!r}", m) for m in plan.memfds]
                       + [(f"iommufd {i.name!r}", i) for i in plan.iommufds]
                       + [(f"device {d.name!r}", d) for d in plan.devices]):
        if obj.session is not None and obj.session != plan.session:
            err("one-session", f"asks for session {obj.session!r}, the plan's is {plan.session!r}: memfds, "
                "iommufds and cdevs must all be in one session (dependencies are looked up only in the "
                "same session)", where, "4.2")

    # names
    seen: dict[str, str] = {}
    for kind, name in ([("memfd", m.name) for m in plan.memfds] + [("iommufd", i.name) for i in plan.iommufds]
                       + [("device", d.name) for d in plan.devices]):
        if name in seen:
            err("name-duplicate", f"name {name!r} is used by a {seen[name]} and a {kind}", name)
        seen[name] = kind
    hwpt_names: dict[str, str] = {}
    for i in plan.iommufds:
        ioas_names = set()
        for a in i.ioas:
            if a.name in ioas_names:
                err("name-duplicate", f"IOAS name {a.name!r} is used twice", f"iommufd {i.name!r}")
            ioas_names.add(a.name)
        for h in i.hwpts:
            if h.name in hwpt_names:
                err("name-duplicate", f"HWPT name {h.name!r} is used twice", f"iommufd {i.name!r}")
            hwpt_names[h.name] = i.name

    # LUO tokens: unique across the session, 0 reserved for the manifest
    tokens: dict[int, str] = {}
    for label, obj in ([(f"memfd {m.name!r}", m) for m in plan.memfds if m.preserve]
                       + [(f"iommufd {i.name!r}", i) for i in plan.iommufds if i.preserve]
                       + [(f"device {d.name!r}", d) for d in plan.devices if d.preserve]):
        if obj.token is None:
            continue
        if obj.token == MANIFEST_TOKEN and plan.manifest:
            err("token-reserved", "token 0 is reserved for the pyiommufd manifest", label, "")
        if obj.token in tokens:
            err("token-duplicate", f"LUO token {obj.token:#x} is used by {tokens[obj.token]} too: tokens are "
                "unique in a session (PRESERVE_FD says EEXIST)", label, "4.1")
        else:
            tokens[obj.token] = label

    # memfds
    memfd_by_name = {m.name: m for m in plan.memfds}
    mapped_by_marked: dict[str, list[str]] = {}
    for i in plan.iommufds:
        for name in memfds_needed_by(plan, i):
            mapped_by_marked.setdefault(name, []).append(i.name)
    writeable_maps = {m.memfd for i in plan.iommufds for a in i.ioas for m in a.mappings if m.writeable}
    for m in plan.memfds:
        where = f"memfd {m.name!r}"
        if m.size <= 0:
            err("memfd-size", "size must be > 0", where)
        if m.hugetlb:
            err("hugetlb", "hugetlb memfds cannot be preserved by 7.3 memfd LUO (PRESERVE_FD says ENOENT), "
                "and an iommufd mapping one can never be preserved", where, "4.3")
        if m.seals & ~LUO_SEALS:
            err("seals-unsupported", f"seal bits {m.seals & ~LUO_SEALS:#x} are outside what memfd LUO "
                "preserves (SEAL|SHRINK|GROW|WRITE|FUTURE_WRITE|EXEC): PRESERVE_FD says EOPNOTSUPP",
                where, "4.3")
        if m.name in mapped_by_marked:
            missing = LU_SEALS & ~m.seals
            if missing:
                err("seals-missing", f"mapped by a marked HWPT of {', '.join(mapped_by_marked[m.name])} but "
                    f"not sealed {'|'.join(s.upper() for s in seal_names(missing))}: the memfd must be "
                    "sealed SEAL|GROW|SHRINK before MAP_FILE (iommufd preserve says EINVAL)", where, "4.4")
            if not m.preserve:
                err("memfd-unpreserved", f"mapped by a marked HWPT of {', '.join(mapped_by_marked[m.name])} "
                    "but not preserved: the iommufd preserve needs it in the same session first (ENOENT)",
                    where, "4.2, 4.4")
        if m.seals & WRITE_SEALS and m.name in writeable_maps:
            warn("seals-write", "sealed against writes but mapped writeable: MAP_FILE with "
                 "IOMMU_IOAS_MAP_WRITEABLE of a write-sealed memfd is refused", where, "4.3")
        elif m.seals & WRITE_SEALS:
            warn("seals-write", "sealed against writes: fine for LUO (memfd-v2 re-applies it), but "
                 "nothing can write this memory after preservation", where, "4.3")
        if m.contents.kind == "pattern" and not m.contents.pattern:
            err("memfd-contents", "empty pattern", where)
        if m.contents.kind == "file" and not (m.contents.path and os.path.isfile(m.contents.path)
                                              and os.access(m.contents.path, os.R_OK)):
            err("memfd-contents", f"cannot read {m.contents.path} to fill it", where)
    if plan.manifest is False:
        warn("no-manifest", "no manifest: stage 2 will not know what the tokens are", "manifest")

    # iommufds, IOAS and HWPTs
    devices_by_name = {d.name: d for d in plan.devices}
    for i in plan.iommufds:
        where = f"iommufd {i.name!r}"
        ioas_by_name = {a.name: a for a in i.ioas}
        for a in i.ioas:
            fixed: list[tuple[int, int, str]] = []
            for k, mp in enumerate(a.mappings):
                w = f"{where} IOAS {a.name!r} mapping {k}"
                if mp.kind != "file":
                    err("mapping-not-file", f"a {mp.kind} mapping: only IOMMU_IOAS_MAP_FILE of a sealed memfd "
                        "is preservable (user-VA and dma-buf mappings make the iommufd preserve fail with "
                        "EINVAL)", w, "4.4")
                    continue
                target = memfd_by_name.get(mp.memfd)
                if target is None:
                    err("mapping-memfd-unknown", f"maps {mp.memfd!r}, which is not a memfd of this plan "
                        "(every mapping must be a memfd preserved in the same session)", w, "4.4")
                    continue
                length = mp.length if mp.length is not None else target.size - mp.offset
                for label, value in (("offset", mp.offset), ("length", length)) + (
                        (("iova", mp.iova),) if mp.iova is not None else ()):
                    if value % PAGE_SIZE:
                        err("mapping-align", f"{label} {value:#x} is not a multiple of the page size "
                            f"({PAGE_SIZE:#x})", w)
                if length <= 0 or mp.offset + length > target.size:
                    err("mapping-range", f"[{mp.offset:#x}, +{max(length, 0):#x}) is outside memfd "
                        f"{target.name!r} ({target.size:#x} bytes)", w)
                elif mp.iova is not None and mp.iova + length - 1 > U64_MAX:
                    err("mapping-iova-range", f"iova {mp.iova:#x} + {length:#x} bytes ends past the 64-bit "
                        "IOVA space", w)
                if not (mp.readable or mp.writeable):
                    err("mapping-prot", "a mapping must be readable, writeable or both", w)
                if mp.iova is not None and length > 0:
                    for start, end, other in fixed:
                        if mp.iova < end and start < mp.iova + length:
                            err("mapping-overlap", f"IOVA [{mp.iova:#x}, +{length:#x}) overlaps {other}", w)
                    fixed.append((mp.iova, mp.iova + length, f"mapping {k}"))
        lu_tokens: dict[int, str] = {}
        for h in i.hwpts:
            w = f"{where} HWPT {h.name!r}"
            if h.nested:
                err("hwpt-nested", "nested HWPTs / vIOMMU cannot be preserved (the series marks paging "
                    "HWPTs only)", w, "4.5")
            if h.ioas not in ioas_by_name:
                err("hwpt-ioas-unknown", f"IOAS {h.ioas!r} is not an IOAS of this iommufd", w)
            if h.device is None:
                err("hwpt-device", "IOMMU_HWPT_ALLOC needs a device bound to this iommufd: name one", w, "3.3")
            elif h.device not in devices_by_name:
                err("hwpt-device-unknown", f"device {h.device!r} is not a device of this plan", w)
            if not h.mark:
                continue
            if h.lu_token is not None:
                bits = ABI_REVISIONS[abi].token_bits if abi else None
                if bits is not None and h.lu_token >= 1 << bits:
                    err("hwpt-token-width", f"LU token {h.lu_token:#x} does not fit {abi}'s u{bits} "
                        "hwpt_token", w, "2.1, 2.3")
                elif bits is None and h.lu_token > U32_MAX:
                    warn("hwpt-token-width", f"LU token {h.lu_token:#x} needs lu-v2 (u64); lu-v1 has a u32 "
                         "hwpt_token", w, "2.1, 2.3")
                if h.lu_token in lu_tokens:
                    err("hwpt-token-duplicate", f"LU token {h.lu_token:#x} is used by HWPT "
                        f"{lu_tokens[h.lu_token]!r} too: tokens are unique per iommufd (EADDRINUSE)", w, "2.1")
                else:
                    lu_tokens[h.lu_token] = h.name
        marked = [h for h in i.hwpts if h.mark]
        if marked and not i.preserve:
            err("iommufd-unpreserved", f"has marked HWPTs ({', '.join(h.name for h in marked)}) but is not "
                "preserved: the marks only take effect when the iommufd is preserved", where, "4.4")
        if i.preserve and not marked:
            warn("iommufd-unmarked", "preserved without a marked HWPT: no IOMMU state will be kept", where, "4.4")

    # devices
    idents: dict[str, str] = {}
    for d in plan.devices:
        where = f"device {d.name!r}"
        if (d.bdf is None) == (d.cdev is None):
            err("device-ident", "give exactly one of bdf or cdev", where)
        elif d.bdf is not None:
            from .pci import normalize_bdf

            try:
                ident = normalize_bdf(d.bdf)
            except UsageError as exc:
                err("device-ident", str(exc), where)
                ident = d.bdf
        else:
            assert d.cdev is not None  # bdf is None here, so cdev is not
            ident = os.path.normpath(d.cdev)
            if not ident.startswith("/dev/vfio/devices/"):
                warn("device-cdev", f"{d.cdev} is not under /dev/vfio/devices/: only VFIO device cdevs can be "
                     "preserved (group fds get ENOENT)", where, "4.5")
        if d.bdf is not None or d.cdev is not None:
            if ident in idents:
                err("device-duplicate", f"{ident} is also device {idents[ident]!r}", where)
            idents[ident] = d.name
        if d.pasid:
            err("device-pasid", "PASID attachments are not preserved by the series (only the RID; agreed to "
                "become EOPNOTSUPP)", where, "4.5")
        if not d.preserve:
            continue
        if d.hwpt is None:
            err("device-unattached", "a preserved device must be attached to a marked HWPT of an iommufd "
                "preserved in the same session", where, "4.5")
            continue
        iommufd, hwpt = plan.hwpt(d.hwpt)
        if iommufd is None or hwpt is None:  # both or neither
            err("device-hwpt-unknown", f"HWPT {d.hwpt!r} is not a HWPT of this plan", where)
            continue
        if not hwpt.mark:
            err("device-hwpt-unmarked", f"attached to HWPT {hwpt.name!r}, which is not marked: cdev preserve "
                "says EINVAL", where, "4.5")
        if hwpt.nested:
            err("device-hwpt-nested", f"attached to nested HWPT {hwpt.name!r}", where, "4.5")
        if not iommufd.preserve:
            err("device-iommufd-unpreserved", f"its iommufd {iommufd.name!r} is not preserved: cdev preserve "
                "says ENOENT", where, "4.2, 4.5")
    # a HWPT is allocated for a device, so that device must be bound to the HWPT's iommufd
    for i in plan.iommufds:
        for h in i.hwpts:
            dev = devices_by_name.get(h.device or "")
            if dev is None or dev.hwpt is None:
                continue
            bound_to, _ = plan.hwpt(dev.hwpt)
            if bound_to is not None and bound_to is not i:
                err("hwpt-device-iommufd", f"allocated for device {dev.name!r}, which is bound to iommufd "
                    f"{bound_to.name!r}", f"iommufd {i.name!r} HWPT {h.name!r}")

    if not any(m.preserve for m in plan.memfds) and not any(i.preserve for i in plan.iommufds) \
            and not any(d.preserve for d in plan.devices):
        err("empty", "the plan preserves nothing", "plan")
    return problems


# -- tokens -------------------------------------------------------------------------
def assign_tokens(plan: Plan) -> Plan:
    """Fill in missing LUO tokens (from 1 up, skipping used ones and the
    manifest's 0) and missing HWPT LU tokens (per iommufd, from 1 up)."""
    specs: tuple[MemfdSpec | IommufdSpec | DeviceSpec, ...] = (*plan.memfds, *plan.iommufds, *plan.devices)
    used = {o.token for o in specs if o.token is not None}
    used.add(MANIFEST_TOKEN)
    nxt = 1
    for obj in specs:
        if obj.token is None and getattr(obj, "preserve", True):
            while nxt in used:
                nxt += 1
            obj.token = nxt
            used.add(nxt)
    for i in plan.iommufds:
        lu_used = {h.lu_token for h in i.hwpts if h.lu_token is not None}
        n = 1
        for h in i.hwpts:
            if h.lu_token is None and h.mark:
                while n in lu_used:
                    n += 1
                h.lu_token = n
                lu_used.add(n)
    return plan


# -- ordering -------------------------------------------------------------------------
@dataclass
class Operation:
    step: int
    action: str
    target: str
    detail: str = ""
    args: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.step:3d}. {self.action:<17} {self.target}" + (f"  ({self.detail})" if self.detail else "")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


ACTIONS = ("create_memfd", "fill", "seal", "open_iommufd", "alloc_ioas", "map_file", "open_device", "bind",
           "alloc_hwpt", "attach", "mark", "create_session", "preserve_manifest", "preserve_memfd",
           "preserve_iommufd", "preserve_cdev")


def order(plan: Plan) -> list[Operation]:
    """The operations that carry ``plan`` out, in an order that satisfies every
    rule: memfds created, filled and sealed before any MAP_FILE; HWPTs marked
    before anything is preserved; the manifest preserved first (token 0); then
    memfd -> iommufd -> cdev, all in the one session. Tokens missing from the
    plan are assigned first (:func:`assign_tokens`). Never touches the kernel."""
    assign_tokens(plan)
    ops: list[Operation] = []
    abi = abi_name(plan) or "probe"

    def add(action: str, target: str, detail: str = "", **args: Any) -> None:
        ops.append(Operation(len(ops) + 1, action, target, detail, args))

    for m in plan.memfds:
        add("create_memfd", m.name, f"{m.size:#x} bytes, MFD_ALLOW_SEALING", memfd=m.name, size=m.size)
        if m.contents.kind != "zero":
            add("fill", m.name, m.contents.describe(), memfd=m.name)
        if m.seals:
            add("seal", m.name, "F_ADD_SEALS " + "|".join(s.upper() for s in seal_names(m.seals)),
                memfd=m.name, seals=m.seals)
    for i in plan.iommufds:
        add("open_iommufd", i.name, "/dev/iommu", iommufd=i.name)
        for a in i.ioas:
            add("alloc_ioas", f"{i.name}/{a.name}", iommufd=i.name, ioas=a.name)
            for mp in a.mappings:
                if mp.kind != "file":
                    continue
                size = mapped_memfd.size if (mapped_memfd := plan.memfd(mp.memfd)) else 0
                length = mp.length if mp.length is not None else size - mp.offset
                where = f"iova {mp.iova:#x}" if mp.iova is not None else "kernel-chosen iova"
                add("map_file", f"{i.name}/{a.name}", f"{mp.memfd} [{mp.offset:#x}, +{length:#x}) at {where}",
                    iommufd=i.name, ioas=a.name, memfd=mp.memfd, offset=mp.offset, length=length, iova=mp.iova)
    bound: set[str] = set()
    for i in plan.iommufds:
        for h in i.hwpts:
            dev = plan.device(h.device or "")
            if dev is not None and dev.name not in bound:
                add("open_device", dev.name, dev.ident, device=dev.name)
                add("bind", dev.name, f"VFIO_DEVICE_BIND_IOMMUFD to {i.name}", device=dev.name, iommufd=i.name)
                bound.add(dev.name)
            add("alloc_hwpt", f"{i.name}/{h.name}", f"on {h.ioas} for {h.device}", iommufd=i.name,
                hwpt=h.name, ioas=h.ioas, device=h.device)
    for d in plan.devices:
        iommufd = device_iommufd(plan, d)
        if d.name not in bound:
            add("open_device", d.name, d.ident, device=d.name)
            if iommufd is not None:
                add("bind", d.name, f"VFIO_DEVICE_BIND_IOMMUFD to {iommufd.name}", device=d.name,
                    iommufd=iommufd.name)
            bound.add(d.name)
        if d.hwpt is not None and iommufd is not None:
            add("attach", d.name, f"VFIO_DEVICE_ATTACH_IOMMUFD_PT to {d.hwpt}", device=d.name, hwpt=d.hwpt,
                iommufd=iommufd.name)
    for i, h in marked_hwpts(plan):
        add("mark", f"{i.name}/{h.name}", f"IOMMU_HWPT_LU_* ({abi}) token {h.lu_token:#x}", iommufd=i.name,
            hwpt=h.name, lu_token=h.lu_token, abi=abi)
    add("create_session", plan.session, "LIVEUPDATE_IOCTL_CREATE_SESSION (held by the agent)",
        session=plan.session)
    if plan.manifest:
        add("preserve_manifest", "manifest", f"token {MANIFEST_TOKEN:#x}, sealed WRITE|SEAL|GROW|SHRINK",
            token=MANIFEST_TOKEN)
    for m in plan.memfds:
        if m.preserve:
            add("preserve_memfd", m.name, f"token {m.token:#x}", memfd=m.name, token=m.token)
    for i in plan.iommufds:
        if i.preserve:
            add("preserve_iommufd", i.name, f"token {i.token:#x}", iommufd=i.name, token=i.token)
    for d in plan.devices:
        if d.preserve:
            add("preserve_cdev", d.name, f"token {d.token:#x}", device=d.name, token=d.token,
                iommufd=getattr(device_iommufd(plan, d), "name", None))
    return ops


def check_order(plan: Plan, ops: list[Operation]) -> list[Problem]:
    """Check an operation sequence (from :func:`order` or hand-made) against
    the ordering rules. Never touches the kernel."""
    problems: list[Problem] = []

    def err(code: str, message: str, op: Operation, ref: str = "") -> None:
        problems.append(Problem("error", code, message, f"step {op.step} {op.action} {op.target}", ref))

    done: dict[tuple[str, str], int] = {}
    sessions = 0
    preserved_any = False
    for op in ops:
        a = op.args
        if op.action == "create_session":
            sessions += 1
            if sessions > 1:
                err("one-session", "a second session: everything must be in one session", op, "4.2")
        elif op.action == "map_file":
            memfd = plan.memfd(a.get("memfd", ""))
            if memfd is not None and ("seal", memfd.name) not in done and memfd.seals:
                err("seal-before-map", f"memfd {memfd.name!r} is mapped before it is sealed: the kernel "
                    "samples the seals at MAP_FILE time", op, "4.4")
        elif op.action == "mark":
            if ("preserve_iommufd", a.get("iommufd")) in done:
                err("mark-after-preserve", f"HWPT {a.get('hwpt')!r} is marked after its iommufd was "
                    "preserved (cdev preserve then says EINVAL; closing the session may oops)", op, "4.9 H1")
        elif op.action.startswith("preserve_"):
            if sessions == 0:
                err("preserve-before-session", "preserve before the session was created", op)
            if op.action == "preserve_manifest":
                if preserved_any:
                    err("manifest-first", "the manifest (token 0) must be preserved before everything else", op)
            elif op.action == "preserve_iommufd":
                iommufd = next((i for i in plan.iommufds if i.name == a.get("iommufd")), None)
                if iommufd is not None:
                    for name in memfds_needed_by(plan, iommufd):
                        if ("preserve_memfd", name) not in done:
                            err("memfd-before-iommufd", f"memfd {name!r} (mapped by a marked HWPT) is not "
                                "preserved yet: iommufd preserve says ENOENT", op, "4.2")
                    for h in iommufd.hwpts:
                        if h.mark and ("mark", h.name) not in done:
                            err("mark-before-preserve", f"HWPT {h.name!r} is not marked yet", op, "4.9 H1")
            elif op.action == "preserve_cdev":
                dev = plan.device(a.get("device", ""))
                iommufd = device_iommufd(plan, dev) if dev is not None else None
                if iommufd is not None and ("preserve_iommufd", iommufd.name) not in done:
                    err("iommufd-before-cdev", f"iommufd {iommufd.name!r} is not preserved yet: cdev "
                        "preserve says ENOENT", op, "4.2")
                if dev is not None and dev.hwpt is not None and ("attach", dev.name) not in done:
                    err("attach-before-preserve", f"device {dev.name!r} is not attached yet", op, "4.5")
            preserved_any = True
        elif op.action in ("attach", "alloc_hwpt"):
            if op.action == "attach" and ("alloc_hwpt", a.get("hwpt")) not in done:
                err("alloc-before-attach", f"HWPT {a.get('hwpt')!r} is not allocated yet", op)
        key_target = {"seal": a.get("memfd"), "mark": a.get("hwpt"), "preserve_iommufd": a.get("iommufd"),
                      "preserve_memfd": a.get("memfd"), "attach": a.get("device"),
                      "alloc_hwpt": a.get("hwpt")}.get(op.action)
        if key_target is not None:
            done[(op.action, key_target)] = op.step
    return problems


def stage2_retrieves(plan: Plan) -> list[dict[str, Any]]:
    """What stage 2 retrieves, in order, and what to expect (the series' cover letter: what Phase 1 restores after the kexec)."""
    out = []
    if plan.manifest:
        out.append({"token": MANIFEST_TOKEN, "kind": "manifest", "name": "manifest", "expect": "ok"})
    for m in plan.memfds:
        if m.preserve:
            out.append({"token": m.token, "kind": "memfd", "name": m.name,
                        "expect": "ok (contents and seals restored)"})
    for d in plan.devices:
        if d.preserve:
            out.append({"token": d.token, "kind": "vfio-cdev", "name": d.name,
                        "expect": "ok after binding the device to vfio-pci; BIND_IOMMUFD then says EPERM"})
    for i in plan.iommufds:
        if i.preserve:
            out.append({"token": i.token, "kind": "iommufd", "name": i.name,
                        "expect": "EOPNOTSUPP in Phase 1 of the series (HWPTs stay kernel-owned)"})
    return out


def report(plan: Plan) -> dict[str, Any]:
    """validate + order + check_order + stage 2, as one JSON-able document."""
    problems = validate(plan)
    ops: list[Operation] = []
    if not errors_in(problems):
        ops = order(plan)
        problems += check_order(plan, ops)
    return {"session": plan.session, "lu_abi": abi_name(plan) or "probe", "valid": not errors_in(problems),
            "operations": [o.as_dict() for o in ops], "stage2": stage2_retrieves(plan) if ops else [],
            "problems": [p.as_dict() for p in problems]}


# -- contents -----------------------------------------------------------------------
def content_chunks(contents: Contents, size: int, chunk: int = 1 << 20) -> Iterable[tuple[int, bytes]]:
    """``(offset, bytes)`` chunks filling ``size`` bytes with ``contents``
    (zero: nothing to write). Deterministic for ``random``."""
    if contents.kind == "zero" or size <= 0:
        return
    if contents.kind == "random":
        rng = random.Random(contents.seed)
        offset = 0
        while offset < size:
            n = min(chunk, size - offset)
            yield offset, rng.randbytes(n)
            offset += n
    elif contents.kind == "pattern":
        pat = contents.pattern
        block = (pat * (chunk // len(pat) + 1))[:chunk - chunk % len(pat) or len(pat)]
        offset = 0
        while offset < size:
            n = min(len(block), size - offset)
            yield offset, block[:n]
            offset += n
    elif contents.kind == "file":
        assert contents.path is not None  # file contents name one
        try:
            f = open(contents.path, "rb")
        except OSError as exc:
            raise UsageError(f"cannot read {contents.path}: {exc.strerror}") from None
        with f:
            offset = 0
            while offset < size:
                data = f.read(min(chunk, size - offset))
                if not data:
                    break
                yield offset, data
                offset += len(data)



# -- execution (touches the kernel) -----------------------------------------------------
@dataclass
class Executed:
    """What :func:`execute` built and preserved."""

    plan: Plan
    manifest: Any = None                      # pyiommufd.manifest.Manifest
    preserved: list[dict[str, Any]] = field(default_factory=list)
    lu_abi: str | None = None
    objects: dict[str, Any] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"session": self.plan.session, "lu_abi": self.lu_abi, "preserved": self.preserved,
                "manifest": self.manifest.as_dict() if self.manifest is not None else None}


def execute(plan: Plan, client: AgentClient, *, backend: Backend | None = None, ops: list[Operation] | None = None,
            progress: Callable[[Operation], None] | None = None,
            notify: Callable[[str], None] | None = None) -> Executed:
    """Carry out a valid ``plan``: create and seal memfds, open and map the
    iommufds, open/bind/attach devices, mark HWPTs, then create the session
    **in the agent** (``client``, an :class:`~pyiommufd.agent.AgentClient`),
    preserve the manifest at token 0 and every file in order through it.

    Raises :class:`~pyiommufd.errors.PlanError` for an invalid plan before
    touching the kernel. If a step fails after the session was created, the
    session is released in the agent (which unpreserves what was preserved)
    and the error re-raised (``notify`` is told). On return, this process's
    own fds are closed: the agent holds the references that matter."""
    from . import manifest as M
    from .abi import LuAbi, select_lu_abi
    from .backend import get_backend
    from .errors import PlanError
    from .iommufd import IOMMUFD
    from .memfd import MemFD
    from .vfio import VfioDevice

    be = get_backend(backend)
    problems = errors_in(validate(plan))
    if not problems:
        if ops is None:
            ops = order(plan)
        problems = errors_in(check_order(plan, ops))
    if problems:
        raise PlanError([p.describe() for p in problems])
    assert ops is not None  # ordered above, the plan being valid

    memfds: dict[str, MemFD] = {}
    iommufds: dict[str, IOMMUFD] = {}
    ioases: dict[tuple[str, str], Any] = {}
    hwpts: dict[str, Any] = {}
    devices: dict[str, VfioDevice] = {}
    mapped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    digests: dict[str, str] = {}
    result = Executed(plan, objects={"memfds": memfds, "iommufds": iommufds, "devices": devices,
                                     "hwpts": hwpts})
    lu: LuAbi | None = None
    session_created = False
    manifest_fd: MemFD | None = None

    def memfd_spec(name: str) -> MemfdSpec:
        spec = plan.memfd(name)
        assert spec is not None, name
        return spec

    def device_spec(name: str) -> DeviceSpec:
        spec = plan.device(name)
        assert spec is not None, name
        return spec

    def token(spec: MemfdSpec | IommufdSpec | DeviceSpec | HwptSpec) -> int:
        value = spec.lu_token if isinstance(spec, HwptSpec) else spec.token
        assert value is not None, spec.name  # assign_tokens() gave every preserved object one
        return value

    def build_manifest() -> M.Manifest:
        entries = []
        for m in plan.memfds:
            if not m.preserve:
                continue
            if m.sha256 and m.name not in digests:
                digests[m.name] = memfds[m.name].sha256()
            entries.append(M.Entry(token(m), FileKind.MEMFD, m.name, size=m.size,
                                   seals=[s for s in seal_names(m.seals) if not s.startswith("0x")],
                                   sha256=digests.get(m.name)))
        for i in plan.iommufds:
            if not i.preserve:
                continue
            ioas_list = []
            for a in i.ioas:
                maps = []
                for mp in mapped.get((i.name, a.name), []):
                    spec = memfd_spec(mp["memfd"])
                    maps.append(M.Mapping(iova=mp["iova"], length=mp["length"], memfd_token=spec.token,  # type: ignore[arg-type]  # None if not preserved
                                          memfd=spec.name, offset=mp["offset"], prot=mp["prot"]))
                ioas_list.append(M.Ioas(id=ioases[(i.name, a.name)].id, name=a.name, mappings=maps))
            hw = [M.Hwpt(id=hwpts[h.name].id, name=h.name, lu_token=token(h), ioas=h.ioas, device=h.device)
                  for h in i.hwpts if h.mark]
            entries.append(M.Entry(token(i), FileKind.IOMMUFD, i.name, ioas=ioas_list, hwpts=hw))
        for d in plan.devices:
            if not d.preserve:
                continue
            dev = devices[d.name]
            iommufd = device_iommufd(plan, d)
            bdf = dev.bdf or d.bdf
            if bdf is None and d.cdev:
                # stage 2 must bind the device to vfio-pci before retrieving the cdev: record its BDF
                from .pci import find_by_cdev

                try:
                    found = find_by_cdev(d.cdev, be)
                except OSError:
                    found = None
                bdf = found.bdf if found is not None else None
            entries.append(M.Entry(token(d), FileKind.VFIO_CDEV, d.name, bdf=bdf,
                                   cdev=getattr(dev, "path", None) or d.cdev,
                                   iommufd_token=iommufd.token if iommufd is not None and iommufd.preserve else None,
                                   hwpt=d.hwpt))
        try:
            release = be.kernel_release()
        except OSError:
            release = ""
        return M.Manifest(session=plan.session, entries=entries, kernel_release=release,
                          lu_abi=lu.name if lu is not None else None, lu_nr=lu.nr if lu is not None else None)

    # consecutive memfd preserves go to the agent as one bulk request
    pending_memfds: list[tuple[int, Any, dict[str, Any], dict[str, Any]]] = []

    def flush_memfds() -> None:
        if pending_memfds:
            batch = list(pending_memfds)
            pending_memfds.clear()
            client.preserve_many(plan.session, [(token, fd, meta) for token, fd, meta, _ in batch])
            result.preserved.extend(row for *_, row in batch)

    try:
        for op in ops:
            if progress is not None:
                progress(op)
            a = op.args
            act = op.action
            if act != "preserve_memfd":
                flush_memfds()
            if act == "create_memfd":
                spec = memfd_spec(a["memfd"])
                memfds[spec.name] = MemFD.create(spec.name, spec.size, sealing=True, hugetlb=spec.hugetlb,
                                                 backend=be)
            elif act == "fill":
                spec = memfd_spec(a["memfd"])
                for offset, chunk in content_chunks(spec.contents, spec.size):
                    memfds[spec.name].write(chunk, offset)
            elif act == "seal":
                memfds[a["memfd"]].add_seals(a["seals"])
            elif act == "open_iommufd":
                iommufds[a["iommufd"]] = IOMMUFD.open(backend=be)
            elif act == "alloc_ioas":
                ioases[(a["iommufd"], a["ioas"])] = iommufds[a["iommufd"]].alloc_ioas()
            elif act == "map_file":
                ioas = ioases[(a["iommufd"], a["ioas"])]
                spec_map = next(mp for x in plan.iommufds if x.name == a["iommufd"] for y in x.ioas
                                if y.name == a["ioas"] for mp in y.mappings
                                if mp.memfd == a["memfd"] and mp.offset == a["offset"])
                iova = ioas.map_file(memfds[a["memfd"]], start=a["offset"], length=a["length"], iova=a["iova"],
                                     readable=spec_map.readable, writeable=spec_map.writeable)
                prot = (["read"] if spec_map.readable else []) + (["write"] if spec_map.writeable else [])
                mapped.setdefault((a["iommufd"], a["ioas"]), []).append(
                    {"memfd": a["memfd"], "offset": a["offset"], "length": a["length"], "iova": iova,
                     "prot": prot})
            elif act == "open_device":
                dev_spec = device_spec(a["device"])
                devices[dev_spec.name] = VfioDevice.open(dev_spec.ident, backend=be)  # bdf or cdev: validated
            elif act == "bind":
                devices[a["device"]].bind(iommufds[a["iommufd"]])
            elif act == "alloc_hwpt":
                hwpts[a["hwpt"]] = iommufds[a["iommufd"]].alloc_hwpt(devices[a["device"]],
                                                                    ioases[(a["iommufd"], a["ioas"])])
            elif act == "attach":
                devices[a["device"]].attach(hwpts[a["hwpt"]])
            elif act == "mark":
                if lu is None:
                    lu = select_lu_abi(plan.lu_abi, iommufd=iommufds[a["iommufd"]], backend=be)
                    result.lu_abi = lu.name
                hwpts[a["hwpt"]].mark_preserved(a["lu_token"], abi=lu)
            elif act == "create_session":
                client.create_session(plan.session)
                session_created = True
            elif act == "preserve_manifest":
                result.manifest = build_manifest()
                manifest_fd = M.write_to_memfd(result.manifest, be)
                client.preserve(plan.session, M.MANIFEST_TOKEN, manifest_fd,
                                {"kind": "manifest", "name": M.MANIFEST_NAME})
                result.preserved.append({"token": M.MANIFEST_TOKEN, "kind": "manifest",
                                         "name": M.MANIFEST_NAME, "detail": f"{len(result.manifest.entries)} entries"})
            elif act == "preserve_memfd":
                spec = memfd_spec(a["memfd"])
                meta = {"kind": "memfd", "name": spec.name, "size": spec.size,
                        "seals": seal_names(spec.seals)}
                if spec.name in digests:
                    meta["sha256"] = digests[spec.name]
                pending_memfds.append((a["token"], memfds[spec.name], meta,
                                       {"token": a["token"], "kind": "memfd", "name": spec.name,
                                        "detail": f"{spec.size:#x} bytes, seals "
                                                  f"{'|'.join(s.upper() for s in seal_names(spec.seals)) or '-'}"}))
            elif act == "preserve_iommufd":
                iommufd_spec = next(x for x in plan.iommufds if x.name == a["iommufd"])
                marks = [f"{h.name}={h.lu_token:#x}" for h in iommufd_spec.hwpts if h.mark]
                client.preserve(plan.session, a["token"], iommufds[iommufd_spec.name],
                                {"kind": "iommufd", "name": iommufd_spec.name, "hwpts": marks,
                                 "lu_abi": result.lu_abi})
                result.preserved.append({"token": a["token"], "kind": "iommufd", "name": iommufd_spec.name,
                                         "detail": f"{len(iommufd_spec.ioas)} IOAS, marked HWPTs "
                                                   f"{', '.join(marks) or '-'} ({result.lu_abi or 'no mark'})"})
            elif act == "preserve_cdev":
                dev_spec = device_spec(a["device"])
                dev = devices[dev_spec.name]
                client.preserve(plan.session, a["token"], dev,
                                {"kind": "vfio-cdev", "name": dev_spec.name, "bdf": dev.bdf or dev_spec.bdf,
                                 "cdev": getattr(dev, "path", None) or dev_spec.cdev, "hwpt": dev_spec.hwpt})
                result.preserved.append({"token": a["token"], "kind": "vfio-cdev", "name": dev_spec.name,
                                         "detail": f"{dev.bdf or dev_spec.ident}, attached to {dev_spec.hwpt}"})
            else:  # pragma: no cover - order() produces only known actions
                raise UsageError(f"unknown operation {act!r}")
        flush_memfds()
    except BaseException:
        if session_created:
            try:
                client.release(plan.session, force=True, direction="outgoing")
                if notify is not None:
                    notify(f"released the half-built session {plan.session!r} in the agent: "
                           f"the {len(result.preserved)} file(s) preserved so far are unpreserved")
            except Exception as exc:  # noqa: BLE001 - the original error matters more
                if notify is not None:
                    notify(f"could not release the half-built session {plan.session!r}: {exc}")
        _close_local(memfds, iommufds, devices, manifest_fd)
        raise
    _close_local(memfds, iommufds, devices, manifest_fd)
    return result


def _close_local(memfds: dict[str, Any], iommufds: dict[str, Any], devices: dict[str, Any],
                 manifest_fd: Any) -> None:
    """Close this process's own fds. Marked HWPTs are never destroyed
    (closing the iommufd fd leaves the objects to the kernel and the agent's
    reference)."""
    for obj in [manifest_fd, *devices.values(), *iommufds.values(), *memfds.values()]:
        if obj is None:
            continue
        try:
            obj.close()
        except Exception:  # noqa: BLE001
            pass

__all__ = ["Plan", "MemfdSpec", "IommufdSpec", "IoasSpec", "MappingSpec", "HwptSpec", "DeviceSpec", "Contents",
           "Problem", "Operation", "plan_from_dict", "plan_from_options", "load_plan", "parse_memfd_option",
           "validate", "order", "check_order", "assign_tokens", "stage2_retrieves", "report", "errors_in",
           "content_chunks", "LU_SEALS", "LUO_SEALS", "execute", "Executed"]
