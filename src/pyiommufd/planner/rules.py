"""The rules a plan must follow (docs/plan-format.md lists them with their
sources): :func:`validate` returns a :class:`Problem` for every violation.
Never touches the kernel."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Iterable

from ..abi import REVISIONS as ABI_REVISIONS
from ..errors import UsageError
from ..luo import check_session_name
from ..manifest import MANIFEST_TOKEN
from ..memfd import seal_names
from .spec import (LU_SEALS, LUO_SEALS, PAGE_SIZE, U32_MAX, U64_MAX, WRITE_SEALS, Plan, abi_name,
                   memfds_needed_by)


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
        ident: str | None = None
        if d.bdf is not None and d.cdev is not None:
            # no precedence: a plan naming one device two ways may mean either
            err("device-ident", f"give bdf or cdev, not both (bdf {d.bdf}, cdev {d.cdev})", where)
        elif d.bdf is None and d.cdev is None:
            err("device-ident", "give bdf or cdev", where)
        elif d.bdf is not None:
            from ..pci import normalize_bdf

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
        if ident is not None:
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

