"""Carrying a valid plan out (touches the kernel): :func:`execute` builds
the objects through the object model, writes the manifest and preserves
through the holder agent."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ..errors import UsageError
from ..fdobject import FileKind
from ..memfd import seal_names
from .order import Operation, check_order, order
from .rules import errors_in, validate
from .spec import (Contents, DeviceSpec, HwptSpec, IommufdSpec, MappingSpec, MemfdSpec, Plan, device_iommufd,
                   preserved_ioas)

if TYPE_CHECKING:
    from .. import manifest as M
    from ..abi import LuAbi
    from ..agent.client import AgentClient
    from ..backend import Backend
    from ..iommufd import HWPT, IOAS, IOMMUFD
    from ..memfd import MemFD
    from ..vfio import VfioDevice


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
    from ..backend import get_backend
    from ..errors import PlanError

    problems = errors_in(validate(plan))
    if not problems:
        if ops is None:
            ops = order(plan)
        problems = errors_in(check_order(plan, ops))
    if problems:
        raise PlanError([p.describe() for p in problems])
    assert ops is not None  # ordered above, the plan being valid

    run = _Run(plan, client, get_backend(backend))
    try:
        for op in ops:
            if progress is not None:
                progress(op)
            run.step(op)
        run.flush_memfds()
    except BaseException:
        run.release_session(notify)
        run.close_local()
        raise
    run.close_local()
    return run.result


def _token(spec: MemfdSpec | IommufdSpec | DeviceSpec | HwptSpec) -> int:
    value = spec.lu_token if isinstance(spec, HwptSpec) else spec.token
    assert value is not None, spec.name  # assign_tokens() gave every preserved object one
    return value


def _seals_text(seals: int) -> str:
    return "|".join(s.upper() for s in seal_names(seals)) or "-"


class _Run:
    """One execution: the objects built so far, one method per action of
    :data:`~pyiommufd.planner.order.ACTIONS` (``args`` are the operation's)."""

    def __init__(self, plan: Plan, client: AgentClient, backend: Backend) -> None:
        self.plan = plan
        self.client = client
        self.be = backend
        self.memfd_specs = {m.name: m for m in plan.memfds}
        self.device_specs = {d.name: d for d in plan.devices}
        self.iommufd_specs = {i.name: i for i in plan.iommufds}
        self.mapping_specs: dict[tuple[str, str, str, int], MappingSpec] = {}
        for i in plan.iommufds:
            for a in i.ioas:
                for mp in a.mappings:  # the first of equal keys, as order() lists them
                    self.mapping_specs.setdefault((i.name, a.name, mp.memfd, mp.offset), mp)
        self.memfds: dict[str, MemFD] = {}
        self.iommufds: dict[str, IOMMUFD] = {}
        self.ioases: dict[tuple[str, str], IOAS] = {}
        self.hwpts: dict[str, HWPT] = {}
        self.devices: dict[str, VfioDevice] = {}
        self.mapped: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.digests: dict[str, str] = {}
        self.lu: LuAbi | None = None
        self.session_created = False
        self.manifest_fd: MemFD | None = None
        # consecutive memfd preserves go to the agent as one bulk request
        self.pending_memfds: list[tuple[int, MemFD, dict[str, Any], dict[str, Any]]] = []
        self.result = Executed(plan, objects={"memfds": self.memfds, "iommufds": self.iommufds,
                                              "devices": self.devices, "hwpts": self.hwpts})
        self.actions: dict[str, Callable[[dict[str, Any]], None]] = {
            "create_memfd": self.create_memfd, "fill": self.fill, "seal": self.seal,
            "open_iommufd": self.open_iommufd, "alloc_ioas": self.alloc_ioas, "map_file": self.map_file,
            "open_device": self.open_device, "bind": self.bind, "alloc_hwpt": self.alloc_hwpt,
            "attach": self.attach, "mark": self.mark, "create_session": self.create_session,
            "preserve_manifest": self.preserve_manifest, "preserve_memfd": self.preserve_memfd,
            "preserve_iommufd": self.preserve_iommufd, "preserve_cdev": self.preserve_cdev}

    def step(self, op: Operation) -> None:
        if op.action != "preserve_memfd":
            self.flush_memfds()
        action = self.actions.get(op.action)
        if action is None:  # pragma: no cover - order() produces only known actions
            raise UsageError(f"unknown operation {op.action!r}")
        action(op.args)

    # -- building the objects ----------------------------------------------------------------
    def create_memfd(self, a: dict[str, Any]) -> None:
        from ..memfd import MemFD

        spec = self.memfd_specs[a["memfd"]]
        self.memfds[spec.name] = MemFD.create(spec.name, spec.size, sealing=True, hugetlb=spec.hugetlb,
                                              backend=self.be)

    def fill(self, a: dict[str, Any]) -> None:
        spec = self.memfd_specs[a["memfd"]]
        for offset, chunk in content_chunks(spec.contents, spec.size):
            self.memfds[spec.name].write(chunk, offset)

    def seal(self, a: dict[str, Any]) -> None:
        self.memfds[a["memfd"]].add_seals(a["seals"])

    def open_iommufd(self, a: dict[str, Any]) -> None:
        from ..iommufd import IOMMUFD

        self.iommufds[a["iommufd"]] = IOMMUFD.open(backend=self.be)

    def alloc_ioas(self, a: dict[str, Any]) -> None:
        self.ioases[(a["iommufd"], a["ioas"])] = self.iommufds[a["iommufd"]].alloc_ioas()

    def map_file(self, a: dict[str, Any]) -> None:
        spec = self.mapping_specs[(a["iommufd"], a["ioas"], a["memfd"], a["offset"])]
        iova = self.ioases[(a["iommufd"], a["ioas"])].map_file(
            self.memfds[a["memfd"]], start=a["offset"], length=a["length"], iova=a["iova"],
            readable=spec.readable, writeable=spec.writeable)
        prot = (["read"] if spec.readable else []) + (["write"] if spec.writeable else [])
        self.mapped.setdefault((a["iommufd"], a["ioas"]), []).append(
            {"memfd": a["memfd"], "offset": a["offset"], "length": a["length"], "iova": iova, "prot": prot})

    def open_device(self, a: dict[str, Any]) -> None:
        from ..vfio import VfioDevice

        spec = self.device_specs[a["device"]]
        self.devices[spec.name] = VfioDevice.open(spec.ident, backend=self.be)  # bdf or cdev: validated

    def bind(self, a: dict[str, Any]) -> None:
        self.devices[a["device"]].bind(self.iommufds[a["iommufd"]])

    def alloc_hwpt(self, a: dict[str, Any]) -> None:
        self.hwpts[a["hwpt"]] = self.iommufds[a["iommufd"]].alloc_hwpt(self.devices[a["device"]],
                                                                      self.ioases[(a["iommufd"], a["ioas"])])

    def attach(self, a: dict[str, Any]) -> None:
        self.devices[a["device"]].attach(self.hwpts[a["hwpt"]])

    def mark(self, a: dict[str, Any]) -> None:
        if self.lu is None:
            from ..abi import select_lu_abi

            self.lu = select_lu_abi(self.plan.lu_abi, iommufd=self.iommufds[a["iommufd"]], backend=self.be)
            self.result.lu_abi = self.lu.name
        self.hwpts[a["hwpt"]].mark_preserved(a["lu_token"], abi=self.lu)

    # -- preserving through the agent --------------------------------------------------------
    def create_session(self, a: dict[str, Any]) -> None:
        self.client.create_session(self.plan.session)
        self.session_created = True

    def preserve_manifest(self, a: dict[str, Any]) -> None:
        from .. import manifest as M

        manifest = self.result.manifest = self.build_manifest()
        self.manifest_fd = M.write_to_memfd(manifest, self.be)
        self.client.preserve(self.plan.session, M.MANIFEST_TOKEN, self.manifest_fd,
                             {"kind": "manifest", "name": M.MANIFEST_NAME})
        self.result.preserved.append({"token": M.MANIFEST_TOKEN, "kind": "manifest", "name": M.MANIFEST_NAME,
                                      "detail": f"{len(manifest.entries)} entries"})

    def preserve_memfd(self, a: dict[str, Any]) -> None:
        spec = self.memfd_specs[a["memfd"]]
        meta: dict[str, Any] = {"kind": "memfd", "name": spec.name, "size": spec.size,
                                "seals": seal_names(spec.seals)}
        if spec.name in self.digests:
            meta["sha256"] = self.digests[spec.name]
        row = {"token": a["token"], "kind": "memfd", "name": spec.name,
               "detail": f"{spec.size:#x} bytes, seals {_seals_text(spec.seals)}"}
        self.pending_memfds.append((a["token"], self.memfds[spec.name], meta, row))

    def flush_memfds(self) -> None:
        if self.pending_memfds:
            batch = list(self.pending_memfds)
            self.pending_memfds.clear()
            self.client.preserve_many(self.plan.session, [(token, fd, meta) for token, fd, meta, _ in batch])
            self.result.preserved.extend(row for *_, row in batch)

    def preserve_iommufd(self, a: dict[str, Any]) -> None:
        spec = self.iommufd_specs[a["iommufd"]]
        marks = [f"{h.name}={h.lu_token:#x}" for h in spec.hwpts if h.mark]
        lu_abi = self.result.lu_abi
        self.client.preserve(self.plan.session, a["token"], self.iommufds[spec.name],
                             {"kind": "iommufd", "name": spec.name, "hwpts": marks, "lu_abi": lu_abi})
        self.result.preserved.append({"token": a["token"], "kind": "iommufd", "name": spec.name,
                                      "detail": f"{len(spec.ioas)} IOAS, marked HWPTs {', '.join(marks) or '-'} "
                                                f"({lu_abi or 'no mark'})"})

    def preserve_cdev(self, a: dict[str, Any]) -> None:
        spec = self.device_specs[a["device"]]
        dev = self.devices[spec.name]
        self.client.preserve(self.plan.session, a["token"], dev,
                             {"kind": "vfio-cdev", "name": spec.name, "bdf": dev.bdf or spec.bdf,
                              "cdev": getattr(dev, "path", None) or spec.cdev, "hwpt": spec.hwpt})
        self.result.preserved.append({"token": a["token"], "kind": "vfio-cdev", "name": spec.name,
                                      "detail": f"{dev.bdf or spec.ident}, attached to {spec.hwpt}"})

    # -- the manifest ------------------------------------------------------------------------
    def build_manifest(self) -> M.Manifest:
        from .. import manifest as M

        plan = self.plan
        entries = []
        for m in plan.memfds:
            if not m.preserve:
                continue
            if m.sha256 and m.name not in self.digests:
                self.digests[m.name] = self.memfds[m.name].sha256()
            entries.append(M.Entry(_token(m), FileKind.MEMFD, m.name, size=m.size,
                                   seals=[s for s in seal_names(m.seals) if not s.startswith("0x")],
                                   sha256=self.digests.get(m.name)))
        for i in plan.iommufds:
            if i.preserve:
                entries.append(self.iommufd_entry(i))
        for d in plan.devices:
            if d.preserve:
                entries.append(self.cdev_entry(d))
        try:
            release = self.be.kernel_release()
        except OSError:
            release = ""
        lu = self.lu
        return M.Manifest(session=plan.session, entries=entries, kernel_release=release,
                          lu_abi=lu.name if lu is not None else None, lu_nr=lu.nr if lu is not None else None)

    def iommufd_entry(self, spec: IommufdSpec) -> M.Entry:
        from .. import manifest as M

        ioas_list = []
        # what the kernel keeps: the IOASes of marked HWPTs, whose memfds validate() made preserved
        for a in preserved_ioas(spec):
            maps = []
            for mp in self.mapped.get((spec.name, a.name), []):
                memfd = self.memfd_specs[mp["memfd"]]
                maps.append(M.Mapping(iova=mp["iova"], length=mp["length"], memfd_token=_token(memfd),
                                      memfd=memfd.name, offset=mp["offset"], prot=mp["prot"]))
            ioas_list.append(M.Ioas(id=self.ioases[(spec.name, a.name)].id, name=a.name, mappings=maps))
        hwpts = [M.Hwpt(id=self.hwpts[h.name].id, name=h.name, lu_token=_token(h), ioas=h.ioas, device=h.device)
                 for h in spec.hwpts if h.mark]
        return M.Entry(_token(spec), FileKind.IOMMUFD, spec.name, ioas=ioas_list, hwpts=hwpts)

    def cdev_entry(self, spec: DeviceSpec) -> M.Entry:
        from .. import manifest as M

        dev = self.devices[spec.name]
        iommufd = device_iommufd(self.plan, spec)
        bdf = dev.bdf or spec.bdf
        if bdf is None and spec.cdev:
            # stage 2 must bind the device to vfio-pci before retrieving the cdev: record its BDF
            from ..pci import find_by_cdev

            try:
                found = find_by_cdev(spec.cdev, self.be)
            except OSError:
                found = None
            bdf = found.bdf if found is not None else None
        return M.Entry(_token(spec), FileKind.VFIO_CDEV, spec.name, bdf=bdf, cdev=getattr(dev, "path", None) or spec.cdev,
                       iommufd_token=iommufd.token if iommufd is not None and iommufd.preserve else None,
                       hwpt=spec.hwpt)

    # -- the end -----------------------------------------------------------------------------
    def release_session(self, notify: Callable[[str], None] | None) -> None:
        """After a failed step: release the half-built session in the agent,
        which unpreserves what was preserved."""
        if not self.session_created:
            return
        session = self.plan.session
        try:
            self.client.release(session, force=True, direction="outgoing")
            if notify is not None:
                notify(f"released the half-built session {session!r} in the agent: "
                       f"the {len(self.result.preserved)} file(s) preserved so far are unpreserved")
        except Exception as exc:  # noqa: BLE001 - the original error matters more
            if notify is not None:
                notify(f"could not release the half-built session {session!r}: {exc}")

    def close_local(self) -> None:
        """Close this process's own fds. Marked HWPTs are never destroyed
        (closing the iommufd fd leaves the objects to the kernel and the
        agent's reference)."""
        owned: list[MemFD | VfioDevice | IOMMUFD | None] = [
            self.manifest_fd, *self.devices.values(), *self.iommufds.values(), *self.memfds.values()]
        for obj in owned:
            if obj is None:
                continue
            try:
                obj.close()
            except Exception:  # noqa: BLE001 - a close that fails leaves nothing to undo
                pass
