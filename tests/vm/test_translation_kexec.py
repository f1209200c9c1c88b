"""Did the IOMMU state survive the kexec? The device's translation, read from
the VT-d debugfs (CONFIG_INTEL_IOMMU_DEBUGFS), against the physical pages of
the memfd it maps (/proc/self/pagemap).

On every kernel: before the kexec the IOVA range translates to exactly the
memfd's pages, and the preserved memfd comes back with the same physical
pages and bytes. Where the kernel has a vfio-pci live-update handler (the
whole chain is preserved), the device's restored domain must still translate
the IOVA range to those same pages in the new kernel.
"""
from __future__ import annotations

import mmap
import os
import re

import pytest

PAGE = 4096
MiB = 1 << 20
IOVA = 1 << 32
TOK_MEMFD, TOK_IOMMUFD, TOK_CDEV, TOK_HWPT = 0x71, 0x72, 0x73, 0x74
SESSION = "translation"
DEBUGFS = "/sys/kernel/debug/iommu/intel"
PTE_ADDR = ((1 << 52) - 1) & ~(PAGE - 1)
SUPERPAGE = 1 << 7


def memfd_pfns(fd: int, length: int) -> list[int]:
    """Physical frame of each page of a memfd (root reads real PFNs)."""
    with mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
        for off in range(0, length, PAGE):
            mm[off]                                   # fault the page in
        addr = _mmap_address(mm)
        with open("/proc/self/pagemap", "rb") as pm:
            pm.seek(addr // PAGE * 8)
            raw = pm.read(length // PAGE * 8)
    out = []
    for i in range(length // PAGE):
        entry = int.from_bytes(raw[i * 8:i * 8 + 8], "little")
        assert entry >> 63, f"page {i} of the memfd is not present"
        out.append(entry & ((1 << 55) - 1))
    return out


def _mmap_address(mm: mmap.mmap) -> int:
    from pyiommufd._uapi import ffi

    view = ffi.from_buffer(mm)
    try:
        return int(ffi.cast("uintptr_t", view))
    finally:
        ffi.release(view)


def device_translation(bdf: str) -> dict[int, int]:
    """``{iova_pfn: pfn}`` of the device's second-stage table as the VT-d
    debugfs dumps it (the leaf is the last entry of each line; a superpage
    leaf covers 512 or 512*512 pages)."""
    path = f"{DEBUGFS}/{bdf}/domain_translation_struct"
    text = open(path).read()
    out: dict[int, int] = {}
    for line in text.splitlines():
        m = re.match(r"^0x([0-9a-f]+) \|\s+(.*)$", line)
        if not m:
            continue
        entries = [int(v, 16) for v in m.group(2).split()]
        iova_pfn, leaf = int(m.group(1), 16), entries[-1]
        pages = 1
        if leaf & SUPERPAGE:
            pages = 512 if len(entries) == 4 else 512 * 512
        for k in range(pages):
            out[iova_pfn + k] = (leaf & PTE_ADDR) // PAGE + k
    return out


def _translated(bdf: str, length: int) -> list[int | None]:
    table = device_translation(bdf)
    return [table.get(IOVA // PAGE + i) for i in range(length // PAGE)]


@pytest.mark.pyiommufd_kexec
def test_translation_and_memfd_pages_survive_kexec(lu_stage, vfio_device, kernel_caps):
    from pyiommufd import errors
    from pyiommufd.iommufd import IOMMUFD
    from pyiommufd.memfd import MemFD
    from pyiommufd.vfio import VfioDevice

    assert os.path.isdir(DEBUGFS), "the guest kernel has CONFIG_INTEL_IOMMU_DEBUGFS"
    if lu_stage.stage == 1:
        pattern = bytes(range(256)) * (MiB // 256)
        memfd = MemFD.create("translated", MiB)
        memfd.write(pattern)
        memfd.seal_for_live_update()
        pfns = memfd_pfns(memfd.fileno(), MiB)
        iommufd = IOMMUFD.open()
        device = VfioDevice.open(vfio_device.cdev)
        dev_id = device.bind(iommufd)
        ioas = iommufd.alloc_ioas()
        hwpt = iommufd.alloc_hwpt(dev_id, ioas)
        device.attach(hwpt)
        ioas.map_file(memfd, 0, MiB, iova=IOVA)
        before = _translated(vfio_device.bdf, MiB)
        assert before == pfns, "the IOMMU maps the IOVA range to exactly the memfd's pages"
        print(f"before kexec: IOVA {IOVA:#x}+1MiB -> {len(pfns)} memfd pages, first pfn {pfns[0]:#x}")
        session = lu_stage.liveupdate.create_session(SESSION)
        session.preserve(memfd, TOK_MEMFD)
        whole_chain = False
        if kernel_caps.series:
            hwpt.mark_preserved(TOK_HWPT, abi=kernel_caps.lu_abi)
            session.preserve(iommufd, TOK_IOMMUFD)
            if kernel_caps.vfio_handler:
                session.preserve(device, TOK_CDEV)
                whole_chain = True
            else:
                with pytest.raises(errors.NotFound):     # no vfio-pci handler: LUO's ENOENT
                    session.preserve(device, TOK_CDEV)
        lu_stage.keep(memfd, iommufd, device, ioas, hwpt, session)
        lu_stage.save("pfns", pfns)
        lu_stage.save("whole_chain", whole_chain)
        lu_stage.save("iommufd_preserved", kernel_caps.series)
        return

    pfns = lu_stage.load("pfns")
    session = lu_stage.liveupdate.retrieve_session(SESSION)
    memfd = MemFD.from_fd(session.retrieve(TOK_MEMFD).fd)
    assert memfd.size == MiB
    assert memfd.read(MiB, offset=0) == bytes(range(256)) * (MiB // 256)
    assert memfd_pfns(memfd.fileno(), MiB) == pfns, "the preserved memfd kept its physical pages"
    if lu_stage.load("whole_chain"):
        after = _translated(vfio_device.bdf, MiB)
        assert after == pfns, ("after the kexec the device's restored domain translates the "
                               "preserved IOVA range to the retrieved memfd's pages")
        print(f"after kexec: IOVA {IOVA:#x}+1MiB still -> the same {len(pfns)} pages")
        cdev_fd = session.retrieve(TOK_CDEV).fd
        os.close(cdev_fd)
    if lu_stage.load("iommufd_preserved"):
        with pytest.raises(errors.KernelError):
            session.retrieve(TOK_IOMMUFD)               # the series cannot restore an iommufd
    else:
        session.finish()
    print(f"after kexec: the memfd has the same {len(pfns)} physical pages and bytes")
