"""The order that carries a plan out: :func:`order` numbers the
:class:`Operation` s (memfds sealed before MAP_FILE, HWPTs marked before any
preserve, then manifest -> memfd -> iommufd -> cdev in one session);
:func:`check_order` re-checks any sequence against the ordering rules;
:func:`report` is the whole dry run. Never touches the kernel."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..manifest import MANIFEST_TOKEN
from ..memfd import seal_names
from .rules import Problem, errors_in, validate
from .spec import (DeviceSpec, IommufdSpec, MemfdSpec, Plan, abi_name, device_iommufd, marked_hwpts,
                   memfds_needed_by)


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
            expect = ("ok after binding the device to vfio-pci; BIND_IOMMUFD then says EPERM" if d.hwpt is not None
                      else "ok after binding the device to vfio-pci (preserved without IOMMU state)")
            out.append({"token": d.token, "kind": "vfio-cdev", "name": d.name, "expect": expect})
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

