"""The rules a plan must follow (docs/plan-format.md lists them with their
sources). Each rule is a function from the plan to the :class:`Problem` s it
finds; :data:`RULES` lists them and :func:`validate` runs them all, so a new
rule is one function added to that list. Never touches the kernel."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Literal, NamedTuple

from ..abi import REVISIONS as ABI_REVISIONS
from ..abi import parse_lu_abi
from ..errors import UsageError
from ..luo import check_session_name
from ..manifest import MANIFEST_TOKEN
from ..memfd import seal_names
from .spec import (LU_SEALS, LUO_SEALS, PAGE_SIZE, U32_MAX, U64_MAX, WRITE_SEALS, DeviceSpec, HwptSpec,
                   IommufdSpec, MappingSpec, MemfdSpec, Plan, abi_name, memfds_needed_by)

Severity = Literal["error", "warning"]


@dataclass
class Problem:
    severity: Severity
    code: str
    message: str
    where: str = ""
    ref: str = ""   # a key of pyiommufd.citations.SOURCES

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def describe(self) -> str:
        """``where: message (source)``, without the severity."""
        from ..citations import cite

        where = f"{self.where}: " if self.where else ""
        ref = f" ({cite(self.ref)})" if self.ref and cite(self.ref) else ""
        return f"{where}{self.message}{ref}"

    def __str__(self) -> str:
        return f"{self.severity}: {self.describe()}"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def errors_in(problems: Iterable[Problem]) -> list[Problem]:
    return [p for p in problems if p.is_error]


Rule = Callable[[Plan], Iterator[Problem]]


def error(code: str, message: str, where: str = "", ref: str = "") -> Problem:
    return Problem("error", code, message, where, ref)


def warning(code: str, message: str, where: str = "", ref: str = "") -> Problem:
    return Problem("warning", code, message, where, ref)


# -- what several rules look at -----------------------------------------------------------
class _File(NamedTuple):
    kind: str                   # memfd, iommufd or device, as messages say it
    where: str
    spec: MemfdSpec | IommufdSpec | DeviceSpec


def _files(plan: Plan) -> list[_File]:
    """Every memfd, iommufd and device, with the label problems give it."""
    return ([_File("memfd", f"memfd {m.name!r}", m) for m in plan.memfds]
            + [_File("iommufd", f"iommufd {i.name!r}", i) for i in plan.iommufds]
            + [_File("device", f"device {d.name!r}", d) for d in plan.devices])


class _Mapped(NamedTuple):
    """A MAP_FILE mapping of a memfd of the plan, with its length worked out."""

    where: str
    ioas: tuple[str, str]       # (iommufd, IOAS) names
    number: int                 # its place in the IOAS's list
    mapping: MappingSpec
    memfd: MemfdSpec
    length: int


def _mapped(plan: Plan) -> Iterator[_Mapped]:
    """The file mappings of known memfds; the others are the problem of
    :func:`mappings_are_map_file` and :func:`mapping_memfd_known`."""
    memfds = {m.name: m for m in plan.memfds}
    for i in plan.iommufds:
        for a in i.ioas:
            for k, mp in enumerate(a.mappings):
                target = memfds.get(mp.memfd)
                if mp.kind != "file" or target is None:
                    continue
                length = mp.length if mp.length is not None else target.size - mp.offset
                yield _Mapped(_mapping_where(i, a.name, k), (i.name, a.name), k, mp, target, length)


def _mapping_where(iommufd: IommufdSpec, ioas: str, index: int) -> str:
    return f"iommufd {iommufd.name!r} IOAS {ioas!r} mapping {index}"


def _hwpts(plan: Plan) -> Iterator[tuple[str, IommufdSpec, HwptSpec]]:
    for i in plan.iommufds:
        for h in i.hwpts:
            yield f"iommufd {i.name!r} HWPT {h.name!r}", i, h


def _memfds_mapped_by_marked(plan: Plan) -> dict[str, list[str]]:
    """memfd name -> the iommufds whose marked HWPTs map it."""
    out: dict[str, list[str]] = {}
    for i in plan.iommufds:
        for name in memfds_needed_by(plan, i):
            out.setdefault(name, []).append(i.name)
    return out


def _device_ident(device: DeviceSpec) -> str | None:
    """The device's BDF (normalized when it parses) or cdev path; None
    unless it names exactly one (:func:`device_ident` says why)."""
    if (device.bdf is None) == (device.cdev is None):
        return None
    if device.bdf is not None:
        from ..pci import normalize_bdf

        try:
            return normalize_bdf(device.bdf)
        except UsageError:
            return device.bdf
    assert device.cdev is not None  # exactly one of the two is set
    return os.path.normpath(device.cdev)


class _Attached(NamedTuple):
    where: str
    device: DeviceSpec
    iommufd: IommufdSpec
    hwpt: HwptSpec


def _attached(plan: Plan) -> Iterator[_Attached]:
    """Preserved devices whose HWPT is one of the plan's."""
    for d in plan.devices:
        if d.preserve and d.hwpt is not None:
            iommufd, hwpt = plan.hwpt(d.hwpt)
            if iommufd is not None and hwpt is not None:
                yield _Attached(f"device {d.name!r}", d, iommufd, hwpt)


# -- session and ABI -----------------------------------------------------------------------
def session_name(plan: Plan) -> Iterator[Problem]:
    try:
        check_session_name(plan.session)
    except UsageError as exc:
        yield error("session-name", str(exc), "session", "4.1")


def lu_abi_known(plan: Plan) -> Iterator[Problem]:
    if plan.lu_abi is None:
        return
    try:
        parse_lu_abi(plan.lu_abi)
    except UsageError as exc:
        yield error("lu-abi", str(exc), "lu_abi", "2.1, 2.3")


def one_session(plan: Plan) -> Iterator[Problem]:
    for _, where, obj in _files(plan):
        if obj.session is not None and obj.session != plan.session:
            yield error("one-session", f"asks for session {obj.session!r}, the plan's is {plan.session!r}: "
                        "memfds, iommufds and cdevs must all be in one session (dependencies are looked up "
                        "only in the same session)", where, "4.2")


# -- names and tokens -----------------------------------------------------------------------
def names_unique(plan: Plan) -> Iterator[Problem]:
    seen: dict[str, str] = {}
    for kind, _, obj in _files(plan):
        if obj.name in seen:
            yield error("name-duplicate", f"name {obj.name!r} is used by a {seen[obj.name]} and a {kind}",
                        obj.name)
        seen[obj.name] = kind
    hwpt_names: set[str] = set()
    for i in plan.iommufds:
        ioas_names: set[str] = set()
        for a in i.ioas:
            if a.name in ioas_names:
                yield error("name-duplicate", f"IOAS name {a.name!r} is used twice", f"iommufd {i.name!r}")
            ioas_names.add(a.name)
        for h in i.hwpts:  # HWPT names are plan-wide: devices name them
            if h.name in hwpt_names:
                yield error("name-duplicate", f"HWPT name {h.name!r} is used twice", f"iommufd {i.name!r}")
            hwpt_names.add(h.name)


def _preserved_tokens(plan: Plan) -> Iterator[tuple[str, int]]:
    for _, where, obj in _files(plan):
        if obj.preserve and obj.token is not None:
            yield where, obj.token


def manifest_token_reserved(plan: Plan) -> Iterator[Problem]:
    if plan.manifest:
        for label, token in _preserved_tokens(plan):
            if token == MANIFEST_TOKEN:
                yield error("token-reserved", "token 0 is reserved for the pyiommufd manifest", label)


def tokens_unique(plan: Plan) -> Iterator[Problem]:
    owners: dict[int, str] = {}
    for label, token in _preserved_tokens(plan):
        if token in owners:
            yield error("token-duplicate", f"LUO token {token:#x} is used by {owners[token]} too: tokens are "
                        "unique in a session (PRESERVE_FD says EEXIST)", label, "4.1")
        else:
            owners[token] = label


# -- memfds ---------------------------------------------------------------------------------
def memfd_size(plan: Plan) -> Iterator[Problem]:
    for m in plan.memfds:
        if m.size <= 0:
            yield error("memfd-size", "size must be > 0", f"memfd {m.name!r}")


def no_hugetlb(plan: Plan) -> Iterator[Problem]:
    mapped_by = _memfds_mapped_by_marked(plan)
    for m in plan.memfds:
        if m.hugetlb and (m.preserve or m.name in mapped_by):
            yield error("hugetlb", "hugetlb memfds cannot be preserved by 7.3 memfd LUO (PRESERVE_FD says "
                        "ENOENT), and an iommufd mapping one can never be preserved", f"memfd {m.name!r}", "4.3")


def seals_preservable(plan: Plan) -> Iterator[Problem]:
    for m in plan.memfds:
        if m.seals & ~LUO_SEALS:
            # 7.3's F_ALL_SEALS is MEMFD_LUO_ALL_SEALS: the seal step fails before any preserve
            yield error("seals-unsupported", f"seal bits {m.seals & ~LUO_SEALS:#x} are not seals: F_ADD_SEALS says "
                        "EINVAL (Linux 7.3 knows SEAL|SHRINK|GROW|WRITE|FUTURE_WRITE|EXEC, all of which memfd "
                        "LUO preserves)", f"memfd {m.name!r}", "4.3")


def sealed_before_map(plan: Plan) -> Iterator[Problem]:
    mapped_by = _memfds_mapped_by_marked(plan)
    for m in plan.memfds:
        missing = LU_SEALS & ~m.seals
        if m.name in mapped_by and missing:
            yield error("seals-missing", f"mapped by a marked HWPT of {', '.join(mapped_by[m.name])} but not "
                        f"sealed {'|'.join(s.upper() for s in seal_names(missing))}: the memfd must be sealed "
                        "SEAL|GROW|SHRINK before MAP_FILE (iommufd preserve says EINVAL)", f"memfd {m.name!r}",
                        "4.4")


def mapped_memfds_preserved(plan: Plan) -> Iterator[Problem]:
    mapped_by = _memfds_mapped_by_marked(plan)
    for m in plan.memfds:
        if m.name in mapped_by and not m.preserve:
            yield error("memfd-unpreserved", f"mapped by a marked HWPT of {', '.join(mapped_by[m.name])} but "
                        "not preserved: the iommufd preserve needs it in the same session first (ENOENT)",
                        f"memfd {m.name!r}", "4.2, 4.4")


def write_seals(plan: Plan) -> Iterator[Problem]:
    writeable = {m.memfd for i in plan.iommufds for a in i.ioas for m in a.mappings if m.writeable}
    for m in plan.memfds:
        if not m.seals & WRITE_SEALS:
            continue
        if m.name in writeable:
            yield warning("seals-write", "sealed against writes but mapped writeable: MAP_FILE with "
                          "IOMMU_IOAS_MAP_WRITEABLE of a write-sealed memfd is refused", f"memfd {m.name!r}",
                          "4.3")
        else:
            yield warning("seals-write", "sealed against writes: fine for LUO (memfd-v2 re-applies it), but "
                          "nothing can write this memory after preservation", f"memfd {m.name!r}", "4.3")


def memfd_contents(plan: Plan) -> Iterator[Problem]:
    for m in plan.memfds:
        if m.contents.kind == "pattern" and not m.contents.pattern:
            yield error("memfd-contents", "empty pattern", f"memfd {m.name!r}")
        path = m.contents.path
        if m.contents.kind == "file" and not (path and os.path.isfile(path) and os.access(path, os.R_OK)):
            yield error("memfd-contents", f"cannot read {path} to fill it", f"memfd {m.name!r}")


def manifest_kept(plan: Plan) -> Iterator[Problem]:
    if plan.manifest is False:
        yield warning("no-manifest", "no manifest: stage 2 will not know what the tokens are", "manifest")


# -- IOAS mappings --------------------------------------------------------------------------
def mappings_are_map_file(plan: Plan) -> Iterator[Problem]:
    for i in plan.iommufds:
        for a in i.ioas:
            for k, mp in enumerate(a.mappings):
                if mp.kind != "file":
                    yield error("mapping-not-file", f"a {mp.kind} mapping: only IOMMU_IOAS_MAP_FILE of a sealed "
                                "memfd is preservable (user-VA and dma-buf mappings make the iommufd preserve "
                                "fail with EINVAL)", _mapping_where(i, a.name, k), "4.4")


def mapping_memfd_known(plan: Plan) -> Iterator[Problem]:
    names = {m.name for m in plan.memfds}
    for i in plan.iommufds:
        for a in i.ioas:
            for k, mp in enumerate(a.mappings):
                if mp.kind == "file" and mp.memfd not in names:
                    yield error("mapping-memfd-unknown", f"maps {mp.memfd!r}, which is not a memfd of this plan "
                                "(every mapping must be a memfd preserved in the same session)",
                                _mapping_where(i, a.name, k), "4.4")


def mapping_page_aligned(plan: Plan) -> Iterator[Problem]:
    for m in _mapped(plan):
        iova = () if m.mapping.iova is None else (("iova", m.mapping.iova),)
        for label, value in (("offset", m.mapping.offset), ("length", m.length), *iova):
            if value % PAGE_SIZE:
                yield error("mapping-align", f"{label} {value:#x} is not a multiple of the page size "
                            f"({PAGE_SIZE:#x})", m.where)


def _inside_memfd(m: _Mapped) -> bool:
    return m.length > 0 and m.mapping.offset + m.length <= m.memfd.size


def mapping_inside_memfd(plan: Plan) -> Iterator[Problem]:
    for m in _mapped(plan):
        if not _inside_memfd(m):
            yield error("mapping-range", f"[{m.mapping.offset:#x}, +{max(m.length, 0):#x}) is outside memfd "
                        f"{m.memfd.name!r} ({m.memfd.size:#x} bytes)", m.where)


def mapping_inside_iova_space(plan: Plan) -> Iterator[Problem]:
    for m in _mapped(plan):
        iova = m.mapping.iova
        if iova is not None and _inside_memfd(m) and iova + m.length - 1 > U64_MAX:
            yield error("mapping-iova-range", f"iova {iova:#x} + {m.length:#x} bytes ends past the 64-bit IOVA "
                        "space", m.where)


def mapping_prot(plan: Plan) -> Iterator[Problem]:
    for m in _mapped(plan):
        if not (m.mapping.readable or m.mapping.writeable):
            yield error("mapping-prot", "a mapping must be readable, writeable or both", m.where)


def mappings_do_not_overlap(plan: Plan) -> Iterator[Problem]:
    placed: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
    for m in _mapped(plan):
        iova = m.mapping.iova
        if iova is None or m.length <= 0:
            continue
        fixed = placed.setdefault(m.ioas, [])
        for start, end, other in fixed:
            if iova < end and start < iova + m.length:
                yield error("mapping-overlap", f"IOVA [{iova:#x}, +{m.length:#x}) overlaps {other}", m.where)
        fixed.append((iova, iova + m.length, f"mapping {m.number}"))


# -- HWPTs and iommufds ---------------------------------------------------------------------
def hwpt_not_nested(plan: Plan) -> Iterator[Problem]:
    for where, _, h in _hwpts(plan):
        if h.nested:
            yield error("hwpt-nested", "nested HWPTs / vIOMMU cannot be preserved (the series marks paging "
                        "HWPTs only)", where, "4.5")


def hwpt_ioas_known(plan: Plan) -> Iterator[Problem]:
    for where, i, h in _hwpts(plan):
        if h.ioas not in {a.name for a in i.ioas}:
            yield error("hwpt-ioas-unknown", f"IOAS {h.ioas!r} is not an IOAS of this iommufd", where)


def hwpt_device_named(plan: Plan) -> Iterator[Problem]:
    for where, _, h in _hwpts(plan):
        if h.device is None:
            yield error("hwpt-device", "IOMMU_HWPT_ALLOC needs a device bound to this iommufd: name one", where,
                        "3.3")


def hwpt_device_known(plan: Plan) -> Iterator[Problem]:
    devices = {d.name for d in plan.devices}
    for where, _, h in _hwpts(plan):
        if h.device is not None and h.device not in devices:
            yield error("hwpt-device-unknown", f"device {h.device!r} is not a device of this plan", where)


def hwpt_token_width(plan: Plan) -> Iterator[Problem]:
    abi = abi_name(plan)
    bits = ABI_REVISIONS[abi].token_bits if abi else None
    for where, _, h in _hwpts(plan):
        if not h.mark or h.lu_token is None:
            continue
        if bits is not None and h.lu_token >= 1 << bits:
            yield error("hwpt-token-width", f"LU token {h.lu_token:#x} does not fit {abi}'s u{bits} hwpt_token",
                        where, "2.1, 2.3")
        elif bits is None and h.lu_token > U32_MAX:
            yield warning("hwpt-token-width", f"LU token {h.lu_token:#x} needs lu-v2 (u64); lu-v1 has a u32 "
                          "hwpt_token", where, "2.1, 2.3")


def hwpt_tokens_unique(plan: Plan) -> Iterator[Problem]:
    for i in plan.iommufds:
        owners: dict[int, str] = {}
        for h in i.hwpts:
            if not h.mark or h.lu_token is None:
                continue
            if h.lu_token in owners:
                yield error("hwpt-token-duplicate", f"LU token {h.lu_token:#x} is used by HWPT "
                            f"{owners[h.lu_token]!r} too: tokens are unique per iommufd (EADDRINUSE)",
                            f"iommufd {i.name!r} HWPT {h.name!r}", "2.1")
            else:
                owners[h.lu_token] = h.name


def marked_iommufd_preserved(plan: Plan) -> Iterator[Problem]:
    for i in plan.iommufds:
        marked = [h.name for h in i.hwpts if h.mark]
        if marked and not i.preserve:
            yield error("iommufd-unpreserved", f"has marked HWPTs ({', '.join(marked)}) but is not preserved: "
                        "the marks only take effect when the iommufd is preserved", f"iommufd {i.name!r}", "4.4")


def preserved_iommufd_marked(plan: Plan) -> Iterator[Problem]:
    for i in plan.iommufds:
        if i.preserve and not any(h.mark for h in i.hwpts):
            yield warning("iommufd-unmarked", "preserved without a marked HWPT: no IOMMU state will be kept",
                          f"iommufd {i.name!r}", "4.4")


def hwpt_device_same_iommufd(plan: Plan) -> Iterator[Problem]:
    """A HWPT is allocated for a device, so that device must be bound to the HWPT's iommufd."""
    devices = {d.name: d for d in plan.devices}
    for where, i, h in _hwpts(plan):
        dev = devices.get(h.device or "")
        if dev is None or dev.hwpt is None:
            continue
        bound_to, _ = plan.hwpt(dev.hwpt)
        if bound_to is not None and bound_to is not i:
            yield error("hwpt-device-iommufd", f"allocated for device {dev.name!r}, which is bound to iommufd "
                        f"{bound_to.name!r}", where)


# -- devices --------------------------------------------------------------------------------
def device_ident(plan: Plan) -> Iterator[Problem]:
    for d in plan.devices:
        where = f"device {d.name!r}"
        if d.bdf is not None and d.cdev is not None:
            # no precedence: a plan naming one device two ways may mean either
            yield error("device-ident", f"give bdf or cdev, not both (bdf {d.bdf}, cdev {d.cdev})", where)
        elif d.bdf is None and d.cdev is None:
            yield error("device-ident", "give bdf or cdev", where)
        elif d.bdf is not None:
            from ..pci import normalize_bdf

            try:
                normalize_bdf(d.bdf)
            except UsageError as exc:
                yield error("device-ident", str(exc), where)


def device_cdev_path(plan: Plan) -> Iterator[Problem]:
    for d in plan.devices:
        ident = _device_ident(d)
        if d.cdev is not None and ident is not None and not ident.startswith("/dev/vfio/devices/"):
            yield warning("device-cdev", f"{d.cdev} is not under /dev/vfio/devices/: only VFIO device cdevs can "
                          "be preserved (group fds get ENOENT)", f"device {d.name!r}", "4.5")


def devices_distinct(plan: Plan) -> Iterator[Problem]:
    seen: dict[str, str] = {}
    for d in plan.devices:
        ident = _device_ident(d)
        if ident is None:
            continue
        if ident in seen:
            yield error("device-duplicate", f"{ident} is also device {seen[ident]!r}", f"device {d.name!r}")
        seen[ident] = d.name


def no_pasid(plan: Plan) -> Iterator[Problem]:
    for d in plan.devices:
        if d.pasid:
            yield error("device-pasid", "PASID attachments are not preserved by the series (only the RID; "
                        "agreed to become EOPNOTSUPP)", f"device {d.name!r}", "4.5")


def preserved_device_attached(plan: Plan) -> Iterator[Problem]:
    # the kernel accepts this (no IOMMU state is kept), so it is not an error
    for d in plan.devices:
        if d.preserve and d.hwpt is None:
            yield warning("device-unattached", "preserved without a HWPT: the series keeps the cdev without IOMMU "
                          "state, so its DMA mappings do not survive the kexec (attach it to a marked HWPT of a "
                          "preserved iommufd to keep them)", f"device {d.name!r}", "4.5")


def device_hwpt_known(plan: Plan) -> Iterator[Problem]:
    for d in plan.devices:
        if d.preserve and d.hwpt is not None and plan.hwpt(d.hwpt)[1] is None:
            yield error("device-hwpt-unknown", f"HWPT {d.hwpt!r} is not a HWPT of this plan", f"device {d.name!r}")


def device_hwpt_marked(plan: Plan) -> Iterator[Problem]:
    for a in _attached(plan):
        if not a.hwpt.mark:
            yield error("device-hwpt-unmarked", f"attached to HWPT {a.hwpt.name!r}, which is not marked: cdev "
                        "preserve says EINVAL", a.where, "4.5")


def device_hwpt_not_nested(plan: Plan) -> Iterator[Problem]:
    for a in _attached(plan):
        if a.hwpt.nested:
            yield error("device-hwpt-nested", f"attached to nested HWPT {a.hwpt.name!r}", a.where, "4.5")


def device_iommufd_preserved(plan: Plan) -> Iterator[Problem]:
    for a in _attached(plan):
        if not a.iommufd.preserve:
            yield error("device-iommufd-unpreserved", f"its iommufd {a.iommufd.name!r} is not preserved: cdev "
                        "preserve says ENOENT", a.where, "4.2, 4.5")


def preserves_something(plan: Plan) -> Iterator[Problem]:
    if not any(f.spec.preserve for f in _files(plan)):
        yield error("empty", "the plan preserves nothing", "plan")


#: what :func:`validate` runs, in this order; a new rule is a function added here
RULES: tuple[Rule, ...] = (
    session_name, lu_abi_known, one_session,
    names_unique, manifest_token_reserved, tokens_unique,
    memfd_size, no_hugetlb, seals_preservable, sealed_before_map, mapped_memfds_preserved, write_seals,
    memfd_contents, manifest_kept,
    mappings_are_map_file, mapping_memfd_known, mapping_page_aligned, mapping_inside_memfd,
    mapping_inside_iova_space, mapping_prot, mappings_do_not_overlap,
    hwpt_not_nested, hwpt_ioas_known, hwpt_device_named, hwpt_device_known, hwpt_token_width, hwpt_tokens_unique,
    marked_iommufd_preserved, preserved_iommufd_marked, hwpt_device_same_iommufd,
    device_ident, device_cdev_path, devices_distinct, no_pasid, preserved_device_attached, device_hwpt_known,
    device_hwpt_marked, device_hwpt_not_nested, device_iommufd_preserved,
    preserves_something,
)


def validate(plan: Plan) -> list[Problem]:
    """Every rule violation of ``plan``, errors and warnings. Never touches the kernel."""
    return [problem for rule in RULES for problem in rule(plan)]
