"""Carrying a valid plan out (touches the kernel): :func:`execute` builds
the objects through the object model, writes the manifest and preserves
through the holder agent."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ..errors import UsageError
from ..memfd import seal_names
from .order import Operation, check_order, order
from .rules import errors_in, validate
from .spec import (Contents, DeviceSpec, HwptSpec, IommufdSpec, MemfdSpec, Plan, device_iommufd,
                   preserved_ioas)

if TYPE_CHECKING:
    from ..agent.client import AgentClient
    from ..backend import Backend


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
    from .. import manifest as M
    from ..abi import LuAbi, select_lu_abi
    from ..backend import get_backend
    from ..errors import PlanError
    from ..iommufd import IOMMUFD
    from ..memfd import MemFD
    from ..vfio import VfioDevice

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
            entries.append(M.Entry(token(m), "memfd", m.name, size=m.size,
                                   seals=[s for s in seal_names(m.seals) if not s.startswith("0x")],
                                   sha256=digests.get(m.name)))
        for i in plan.iommufds:
            if not i.preserve:
                continue
            ioas_list = []
            # what the kernel keeps: the IOASes of marked HWPTs, whose memfds validate() made preserved
            for a in preserved_ioas(i):
                maps = []
                for mp in mapped.get((i.name, a.name), []):
                    spec = memfd_spec(mp["memfd"])
                    maps.append(M.Mapping(iova=mp["iova"], length=mp["length"], memfd_token=token(spec),
                                          memfd=spec.name, offset=mp["offset"], prot=mp["prot"]))
                ioas_list.append(M.Ioas(id=ioases[(i.name, a.name)].id, name=a.name, mappings=maps))
            hw = [M.Hwpt(id=hwpts[h.name].id, name=h.name, lu_token=token(h), ioas=h.ioas, device=h.device)
                  for h in i.hwpts if h.mark]
            entries.append(M.Entry(token(i), "iommufd", i.name, ioas=ioas_list, hwpts=hw))
        for d in plan.devices:
            if not d.preserve:
                continue
            dev = devices[d.name]
            iommufd = device_iommufd(plan, d)
            bdf = dev.bdf or d.bdf
            if bdf is None and d.cdev:
                # stage 2 must bind the device to vfio-pci before retrieving the cdev: record its BDF
                from ..pci import find_by_cdev

                try:
                    found = find_by_cdev(d.cdev, be)
                except OSError:
                    found = None
                bdf = found.bdf if found is not None else None
            entries.append(M.Entry(token(d), "vfio-cdev", d.name, bdf=bdf,
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
