"""The plan: its schema (the ``*Spec`` dataclasses and :class:`Plan`), the
parsers that build one from TOML, JSON or CLI options, and the queries the
rules, the order and the execution share. Nothing here touches the kernel."""
from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from ..abi import SPELLINGS as ABI_SPELLINGS
from ..abi import LuAbi, parse_lu_abi
from ..errors import UsageError
from ..memfd import LIVE_UPDATE_SEALS, LUO_PRESERVABLE_SEALS, seal_names
from ..memfd import WRITE_SEALS as MEMFD_WRITE_SEALS
from ..memfd import parse_seals as memfd_parse_seals

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
        raise UsageError(f"plan.lu_abi: a string ({', '.join(ABI_SPELLINGS)}), not {lu_abi!r}")
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
    seen: set[str] = set()
    i = 0
    while i < len(rest):
        part = rest[i]
        key, sep, value = part.partition("=")
        if not sep:
            raise UsageError(f"--memfd {text!r}: {part!r} is not KEY=VALUE")
        if key in seen:     # token=1:token=2 would otherwise keep the last one silently
            raise UsageError(f"--memfd {text!r}: {key!r} given twice")
        seen.add(key)
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
                      lu_abi: str | None = None, base_iova: str | None = None,
                      plan_file: str = "--plan FILE") -> Plan:
    """The plan the ``preserve``/``plan`` options describe: the memfds; if
    there are devices (or ``iommufd``/``iommufd_token``), one iommufd with one
    IOAS mapping every memfd whole, one HWPT per device (marked with the
    matching ``--hwpt-token``, else assigned), each device attached to its own.
    ``plan_file`` is how the command takes a plan file instead (for messages)."""
    if not session:
        raise UsageError(f"--session NAME is required (or {plan_file})")
    memfds, devices = list(memfds), list(devices)
    hwpt_tokens, device_tokens = list(hwpt_tokens), list(device_tokens)
    if not memfds and not devices:
        raise UsageError(f"nothing to preserve: give --memfd NAME:SIZE and/or --device BDF|CDEV (or {plan_file})")
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



# -- queries the rules, the order and the execution share ---------------------------------
def abi_name(plan: Plan) -> str | None:
    """The LU ABI the plan asks for, normalized; None for probe, unspecified or unknown."""
    if plan.lu_abi is None:
        return None
    try:
        choice = parse_lu_abi(plan.lu_abi)
    except UsageError:
        return None
    return choice.name if isinstance(choice, LuAbi) else None


def marked_hwpts(plan: Plan) -> list[tuple[IommufdSpec, HwptSpec]]:
    return [(i, h) for i in plan.iommufds for h in i.hwpts if h.mark]


def preserved_ioas(iommufd: IommufdSpec) -> list[IoasSpec]:
    """The IOASes of ``iommufd`` that a marked HWPT uses: the only ones the
    iommufd preserve checks and keeps (unmarked HWPTs and their IOAS are
    ignored, the series' patch 11/14, iommufd preservation)."""
    names = {h.ioas for h in iommufd.hwpts if h.mark}
    return [ioas for ioas in iommufd.ioas if ioas.name in names]


def memfds_needed_by(plan: Plan, iommufd: IommufdSpec) -> list[str]:
    """Memfds mapped in the IOASes of ``iommufd``'s marked HWPTs: the iommufd
    preserve needs each preserved in the same session first (the series' patch 11/14, iommufd preservation)."""
    names: list[str] = []
    for ioas in preserved_ioas(iommufd):
        for m in ioas.mappings:
            if m.kind == "file" and m.memfd not in names:
                names.append(m.memfd)
    return names


def device_iommufd(plan: Plan, device: DeviceSpec) -> IommufdSpec | None:
    if device.hwpt is None:
        return None
    iommufd, _ = plan.hwpt(device.hwpt)
    return iommufd

