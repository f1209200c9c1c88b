"""The out-of-tree series "iommu: Add live update state preservation"
(Khawaja, v1, Feb 2026), active only with ``FakeKernel(lu_abi=...)``.

Rules, with their sources in the seed spec:

* **Mark ioctl** at nr ``lu_nr`` (default 0x95, the series' patch 10/14, IOMMU_HWPT_LU_SET_PRESERVE-2.3):
  ``lu-v1`` is ``IOMMU_HWPT_LU_SET_PRESERVE`` with the 12-byte
  ``{size, hwpt_id, u32 hwpt_token}`` (min size 12); ``lu-v2`` is
  ``IOMMU_HWPT_LU_MARK_PRESERVE`` with the 16-byte ``{size, hwpt_id, u64
  hwpt_token}`` (min size 16, UNCERTAIN in the spec). Generic iommufd size
  rules apply (EINVAL below min, E2BIG for a non-zero tail). ``hwpt_id``
  must name a paging HWPT of this iommufd, else ENOENT (S1:3189-3191); a
  token used by *another* marked HWPT of the same iommufd is EADDRINUSE
  (S1:3193-3208); re-marking the same HWPT overwrites its token
  (S1:3200-3201); there is no unmark: the mark lives until the HWPT is
  destroyed (the series' patch 10/14, IOMMU_HWPT_LU_SET_PRESERVE). The fake lets a marked HWPT be destroyed
  in both revisions (R5's extra reference is UNCERTAIN and not modelled).
* **MAP_FILE samples the memfd's seals** at map time (S1:3826-3834); a
  non-memfd records 0.
* **iommufd LUO handler** ``iommufd-v1`` (the series' patch 11/14, iommufd preservation, S1:3498-3668): for
  each marked HWPT, in id order, its IOAS becomes immutable and every area
  must be file backed (EINVAL, S1:3509-3511), with seals at map time
  including SEAL|GROW|SHRINK (EINVAL, S1:3513-3520), from a file preserved
  in the *same* session through the *same* struct file (ENOENT,
  S1:3522-3525). On failure every IOAS of the iommufd is made mutable again
  (S1:3664-3665). While preserved, map/map-file/copy-into/unmap of those
  IOAS are EBUSY (S1:3345-3386); unpreserve (closing the session) makes
  them mutable (S1:3703). An iommufd with no marked HWPT is preservable.
  After kexec: retrieve is EOPNOTSUPP (sticky, S1:3707-3710) and
  ``can_finish`` is false, so FINISH is EBUSY (S1:3712-3715).
* **vfio-pci LUO handler** ``vfio-pci-v1`` (dependency series + patches
  12-13, the series' patches 12-13/14, VFIO cdev preservation): only VFIO cdev files; Intel IGD display devices
  EINVAL (S1:4101-4102); a device not attached to an iommufd is preserved
  without IOMMU state (S1:4106); attached: the HWPT must be marked (EINVAL,
  S1:3955-3960), the bound iommufd preserved in the same session (ENOENT,
  S1:3962-3964), and its domain preserved, i.e. marked *before* the iommufd
  was preserved (EINVAL, S1:1027-1028). ``lu-v2`` also refuses a device
  with PASID attachments (EOPNOTSUPP, R7); ``lu-v1`` silently drops them.
  Freeze fails with EINVAL while the device has interrupts enabled
  (the series' patches 12-13/14, VFIO cdev preservation), which fails ``reboot(KEXEC)``.
  After kexec: the group of a device preserved with IOMMU state is owned by
  the iommufd's token (S1:2662-2674), so binding any iommufd is EPERM and
  binding a non-vfio driver is EBUSY (the series' cover letter: what Phase 1 restores after the kexec); retrieve needs
  vfio-pci bound (ENODEV otherwise, sticky) and returns a fresh, unbound
  cdev file; ``can_finish`` is true only for a device preserved without
  IOMMU state (inferred, UNCERTAIN: Phase 1 never consumes the IOMMU state).

Not modelled: hazard H1's oops (unpreserve after a late mark is safe here),
the IOMMU FLB's own errors (ENOMEM/KHO), nested HWPTs (the fake VT-d has
no nesting), ``CONFIG_IOMMU_LIVEUPDATE=n`` (ENOTTY).
"""
from __future__ import annotations

import errno as E
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from .files import OpenFile
from .iommufd import IOMMU_NO_PASID, HwptPaging, IommufdCtx, IommufdFile
from .luo import FileHandler, HandoverSession, LuoFile, Session
from .memfd import F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK, MemfdFile
from .uaccess import CData, IoctlArg, fail

if TYPE_CHECKING:   # pragma: no cover
    from .boot import Boot
    from .vfio import VfioCdevFile

REQUIRED_SEALS = F_SEAL_SEAL | F_SEAL_GROW | F_SEAL_SHRINK

ABIS = {
    "lu-v1": "struct iommu_hwpt_lu_set_preserve",
    "lu-v2": "struct iommu_hwpt_lu_mark_preserve",
}


@dataclass
class PreservedDevice:
    """An entry of the IOMMU FLB: a device preserved with IOMMU state."""
    bdf: str
    token: int


class Series:
    def __init__(self, boot: "Boot", abi: str, lu_nr: int, vfio_lu_handler: bool = True) -> None:
        if abi not in ABIS:
            raise ValueError(f"unknown LU ABI revision {abi!r} (lu-v1 or lu-v2)")
        self.boot = boot
        self.abi = abi
        self.lu_nr = lu_nr
        self.struct = ABIS[abi]
        self.vfio_lu_handler = vfio_lu_handler

    # -- the mark ioctl ----------------------------------------------------------------
    def mark_ioctl(self, ctx: IommufdCtx, arg: IoctlArg, cmd: CData) -> None:
        target = ctx.get_hwpt_paging(int(cmd.hwpt_id))
        token = int(cmd.hwpt_token)
        for obj in sorted(ctx.objects.values(), key=lambda o: o.id):
            if isinstance(obj, HwptPaging) and obj is not target and obj.lu_preserve \
                    and obj.lu_token == token:
                fail(E.EADDRINUSE)
        target.lu_preserve = True
        target.lu_token = token

    def sample_seals(self, file: OpenFile) -> int:
        return file.seals() if isinstance(file, MemfdFile) else 0

    def hwpt_destroyed(self, ctx: IommufdCtx, hwpt: HwptPaging) -> None:
        hwpt.lu_preserve = False

    def handlers(self) -> list[FileHandler]:
        handlers: list[FileHandler] = [IommufdLuoHandler(self)]
        if self.vfio_lu_handler:      # patch 13 and the VFIO cdev series it needs
            handlers.append(VfioLuoHandler(self))
        return handlers

    @staticmethod
    def flb_handover(sessions: list[HandoverSession]) -> list[PreservedDevice]:
        out = []
        for session in sessions:
            for compatible, _token, data in session.files:
                if compatible == VfioLuoHandler.compatible and data and data["token"]:
                    out.append(PreservedDevice(data["bdf"], data["token"]))
        return out


def _marked_hwpts(ctx: IommufdCtx) -> list[HwptPaging]:
    return [o for o in sorted(ctx.objects.values(), key=lambda o: o.id)
            if isinstance(o, HwptPaging) and o.lu_preserve]


def _set_all_mutable(ctx: IommufdCtx) -> None:
    from .iommufd import Ioas
    for obj in ctx.objects.values():
        if isinstance(obj, Ioas):
            obj.iopt.lu_immutable = False


class IommufdLuoHandler(FileHandler):
    compatible = "iommufd-v1"

    def __init__(self, series: Series) -> None:
        self.series = series

    def can_preserve(self, file: OpenFile) -> bool:
        return isinstance(file, IommufdFile)

    def preserve(self, lf: LuoFile, session: Session) -> None:
        ctx = cast(IommufdFile, lf.file).ctx
        try:
            hwpts = _marked_hwpts(ctx)
            for hwpt in hwpts:
                hwpt.ioas.iopt.lu_immutable = True
                for area in sorted(hwpt.ioas.iopt.areas, key=lambda a: a.start):
                    pages = area.pages
                    if pages.kind != "file":
                        fail(E.EINVAL)
                    if pages.seals & REQUIRED_SEALS != REQUIRED_SEALS:
                        fail(E.EINVAL)
                    if pages.file is None or session.find_outgoing(pages.file) is None:
                        fail(E.ENOENT)
        except BaseException:
            _set_all_mutable(ctx)
            raise
        for hwpt in hwpts:
            hwpt.domain.preserved_state = ("iommufd", lf.token, hwpt.lu_token)
        lf.private = hwpts

    def unpreserve(self, lf: LuoFile, session: Session) -> None:
        ctx = cast(IommufdFile, lf.file).ctx
        for hwpt in _marked_hwpts(ctx):
            hwpt.domain.preserved_state = None
        _set_all_mutable(ctx)

    def handover(self, lf: LuoFile) -> dict[str, list[int]]:
        return {"hwpt_tokens": [h.lu_token for h in (lf.private or [])]}

    def retrieve(self, lf: LuoFile, boot: Boot) -> tuple[OpenFile, int]:
        fail(E.EOPNOTSUPP)

    def can_finish(self, lf: LuoFile) -> bool:
        return False


class VfioLuoHandler(FileHandler):
    compatible = "vfio-pci-v1"

    def __init__(self, series: Series) -> None:
        self.series = series

    def can_preserve(self, file: OpenFile) -> bool:
        from .vfio import VfioCdevFile
        return isinstance(file, VfioCdevFile) and file.group_file is None     # no group fds

    def preserve(self, lf: LuoFile, session: Session) -> None:
        vdev = _cdev(lf).vdev
        hw = vdev.hw
        if hw.vendor == 0x8086 and (hw.class_code >> 16) == 0x03:
            fail(E.EINVAL)
        if self.series.abi == "lu-v2" and vdev.pasids:
            fail(E.EOPNOTSUPP)
        token = 0
        if vdev.iommufd_attached and vdev.idev is not None:
            idev = vdev.idev
            hwpt = idev.attach.get(IOMMU_NO_PASID)
            if hwpt is None:
                fail(E.ENOENT)
            if not isinstance(hwpt, HwptPaging) or not hwpt.lu_preserve:
                fail(E.EINVAL)
            entry = session.find_outgoing(idev.ctx.file)
            if entry is None:
                fail(E.ENOENT)
            if hwpt.domain.preserved_state is None:
                fail(E.EINVAL)
            token = entry.token
        lf.private = {"bdf": hw.bdf, "token": token}

    def freeze(self, lf: LuoFile) -> None:
        if _cdev(lf).vdev.irqs_enabled():
            fail(E.EINVAL)

    def handover(self, lf: LuoFile) -> dict[str, Any]:
        return dict(lf.private)

    def retrieve(self, lf: LuoFile, boot: Boot) -> tuple[OpenFile, int]:
        data = lf.data or {}
        vdev = boot.vfio.by_bdf(data.get("bdf", ""))
        if vdev is None:
            fail(E.ENODEV)
        file = boot.vfio.open_cdev(vdev, "anon_inode:[vfio-device-liveupdate]")
        fd = boot.table.install(file, boot.table.placeholder("[vfio-device-liveupdate]"))
        return file, fd

    def can_finish(self, lf: LuoFile) -> bool:
        return lf.retrieve_status > 0 and not (lf.data or {}).get("token")


def _cdev(lf: LuoFile) -> VfioCdevFile:
    """The outgoing file of a vfio-pci entry (the handler preserves nothing else)."""
    return cast("VfioCdevFile", lf.file)
