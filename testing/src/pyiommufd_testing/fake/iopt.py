"""The io_pagetable of an IOAS: areas, reserved and allowed IOVA, domains.

Follows K:drivers/iommu/iommufd/io_pagetable.c and pages.c of 7.3:

* ``iova_alignment`` starts at 1 (no restriction) and becomes the smallest
  page size of the attached domains (4 KiB for VT-d) when an HWPT is
  allocated on the IOAS (K:io_pagetable.c:1222-1298); areas that do not fit
  a larger alignment make that fail with EADDRINUSE.
* kernel-chosen IOVA (no ``FIXED_IOVA``): first fit in the allowed ranges
  (or [PAGE_SIZE, ULONG_MAX - PAGE_SIZE]) outside reserved ranges and
  areas, aligned to min(roundup_pow_of_two(length), lowest set bit of the
  source address) capped at 2 MiB, keeping the sub-page offset; an
  alignment below the IOAS's is EINVAL; no room is ENOSPC
  (K:io_pagetable.c:120-181).
* ``FIXED_IOVA``: a misaligned IOVA EINVAL, overflow EOVERFLOW, a reserved
  range EINVAL, an existing area EEXIST; allowed ranges are not consulted
  (K:io_pagetable.c:183-204).
* Huge pages off (IOMMU_OPTION_HUGE_PAGES 0) raises the alignment to
  PAGE_SIZE: EINVAL once a domain has areas, EADDRINUSE while an area's IOVA,
  length or page offset is not page aligned (K:io_pagetable.c:1519-1543).
* ``length`` 0 or not a multiple of the alignment EINVAL
  (K:io_pagetable.c:273-276); writing through read-only pages EPERM.
* Pages are pinned only when a domain exists (at map time, or when an HWPT
  is added later): a user VA that is not mapped in this process EFAULT, a
  file that is not a memfd or a range past its end EINVAL.
* The pins of MAP_FILE pages (``memfd_pin_folios``, K:pages.c:839) are
  extra folio references, counted on the memfd's inode while an area is
  pinned (from the pin until its unmap, or until the IOAS's last domain
  goes away): they make ``F_SEAL_WRITE`` EBUSY (see :mod:`.memfd`).
* Unmap (K:io_pagetable.c:744-839, K:ioas.c:340-376): areas are removed in
  IOVA order; an area that sticks out of the range is ENOENT (the ones
  removed before it stay removed); a range that hits nothing is ENOENT;
  ``iova=0, length=U64_MAX`` unmaps everything and succeeds on an empty IOAS.
* Series (the series' patch 11/14, iommufd preservation, S1:3345-3386): while ``lu_immutable`` is set, map,
  map-file, copy into this IOAS and unmap (including unmap-all) are EBUSY.
"""
from __future__ import annotations

import errno as E
from dataclasses import dataclass, field
from typing import Any, Protocol

from .files import OpenFile
from .memfd import MemfdFile
from .uaccess import HPAGE_SIZE, PAGE_SIZE, ULONG_MAX, UserMemory, fail


class DomainGeometry(Protocol):
    """What the io_pagetable needs of an ``iommu_domain``."""

    @property
    def pgsize_bitmap(self) -> int: ...
    @property
    def aperture_start(self) -> int: ...
    @property
    def aperture_end(self) -> int: ...


def roundup_pow_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def lowest_bit(n: int) -> int:
    return n & -n


class Pages:
    """``struct iopt_pages``: the source of a mapping."""

    def __init__(self, kind: str, length: int, start_byte: int, writable: bool, *,
                 uptr: int = 0, file: OpenFile | None = None, start: int = 0, seals: int = 0) -> None:
        if length > ULONG_MAX - PAGE_SIZE or length == 0:
            fail(E.EINVAL)
        self.kind = kind                    # "user" or "file"
        self.npages = -(-(length + start_byte) // PAGE_SIZE)
        self.writable = writable
        self.uptr = uptr                    # page aligned (user)
        self.file = file.get() if file is not None else None
        self.start = start                  # file offset of page 0 (file)
        self.seals = seals                  # series: seals sampled at MAP_FILE
        self.refs = 1

    def get(self) -> "Pages":
        self.refs += 1
        return self

    def put(self) -> None:
        self.refs -= 1
        if self.refs == 0 and self.file is not None:
            file, self.file = self.file, None
            file.put()

    def pin(self, start_byte: int, length: int, mem: UserMemory) -> None:
        """Pin the bytes [start_byte, start_byte + length) for a domain."""
        if self.kind == "user":
            addr = self.uptr + start_byte
            if not mem.maps.accessible(addr, length, write=self.writable):
                fail(E.EFAULT)
            return
        if not isinstance(self.file, MemfdFile):
            fail(E.EINVAL)
        first_page = (self.start + start_byte) // PAGE_SIZE
        last_byte = self.start + start_byte + length - 1
        size = self.file.size()
        if last_byte // PAGE_SIZE * PAGE_SIZE >= size or first_page * PAGE_SIZE >= size:
            fail(E.EINVAL)
        self.file.shmem.pins += 1

    def unpin(self) -> None:
        """Drop the pins one :meth:`pin` took (``unpin_folios``)."""
        if self.kind == "file" and isinstance(self.file, MemfdFile):   # only those pin
            self.file.shmem.pins -= 1


@dataclass
class Area:
    start: int
    last: int
    pages: Pages
    start_byte: int
    prot_write: bool
    pinned: bool = False

    def pin(self, mem: UserMemory) -> None:
        self.pages.pin(self.start_byte, self.length, mem)
        self.pinned = True

    def unpin(self) -> None:
        if self.pinned:
            self.pinned = False
            self.pages.unpin()

    @property
    def length(self) -> int:
        return self.last - self.start + 1


@dataclass
class Reserved:
    start: int
    last: int
    owner: Any


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, l in sorted(spans):
        if out and s <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], l))
        else:
            out.append((s, l))
    return out


def _holes(used: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    holes = []
    cur = lo
    for s, l in _merge(used):
        if l < lo or s > hi:
            continue
        if s > cur:
            holes.append((cur, s - 1))
        cur = max(cur, l + 1)
        if cur > hi:
            break
    if cur <= hi:
        holes.append((cur, hi))
    return holes


@dataclass
class Iopt:
    areas: list[Area] = field(default_factory=list)
    reserved: list[Reserved] = field(default_factory=list)
    allowed: list[tuple[int, int]] = field(default_factory=list)
    domains: list[DomainGeometry] = field(default_factory=list)
    iova_alignment: int = 1
    disable_large_pages: bool = False
    lu_immutable: bool = False

    # -- queries ---------------------------------------------------------------------
    def areas_in(self, start: int, last: int) -> list[Area]:
        return [a for a in sorted(self.areas, key=lambda a: a.start)
                if a.start <= last and a.last >= start]

    def reserved_in(self, start: int, last: int) -> list[Reserved]:
        return [r for r in self.reserved if r.start <= last and r.last >= start]

    def allowed_in(self, start: int, last: int) -> bool:
        return any(s <= last and l >= start for s, l in self.allowed)

    def iova_ranges(self) -> list[tuple[int, int]]:
        return _holes([(r.start, r.last) for r in self.reserved], 0, ULONG_MAX)

    # -- IOVA allocation ---------------------------------------------------------------
    def alloc_iova(self, addr: int, length: int) -> int:
        page_offset = addr % PAGE_SIZE
        if length == 0 or length >= ULONG_MAX // 2:
            fail(E.EOVERFLOW)
        if not addr:
            align = roundup_pow_of_two(length)
        else:
            align = min(roundup_pow_of_two(length), lowest_bit(addr))
        align = min(align, HPAGE_SIZE)
        if align < self.iova_alignment:
            fail(E.EINVAL)
        lo, hi = PAGE_SIZE, ULONG_MAX - PAGE_SIZE
        if self.allowed:
            spans = [(max(s, lo), min(l, hi)) for s, l in _merge(self.allowed) if l >= lo and s <= hi]
        else:
            spans = [(lo, hi)]
        used = [(r.start, r.last) for r in self.reserved] + [(a.start, a.last) for a in self.areas]
        for span in spans:
            if not self._fits(span[0], span[1], length, align, page_offset):
                continue
            for hole in _holes(used, span[0], span[1]):
                start = self._fits(hole[0], hole[1], length, align, page_offset)
                if start is not None:
                    return start
        fail(E.ENOSPC)

    @staticmethod
    def _fits(start: int, last: int, length: int, align: int, page_offset: int) -> int | None:
        aligned = (start + align - 1) & ~(align - 1)
        if aligned > ULONG_MAX:
            return None
        aligned |= page_offset
        if aligned >= last or last - aligned < length - 1:
            return None
        return aligned

    def check_iova(self, iova: int, length: int) -> None:
        if iova & (self.iova_alignment - 1):
            fail(E.EINVAL)
        last = iova + length - 1
        if last > ULONG_MAX:
            fail(E.EOVERFLOW)
        if self.reserved_in(iova, last):
            fail(E.EINVAL)
        if self.areas_in(iova, last):
            fail(E.EEXIST)

    # -- map / unmap ----------------------------------------------------------------------
    def map_pages(self, elems: list[tuple[Pages, int, int]], length: int, iova: int | None,
                  write: bool, mem: UserMemory) -> int:
        """``iopt_map_pages``: elems are (pages, start_byte, length); ``iova``
        None means kernel-chosen. Consumes one reference of each pages."""
        new: list[Area] = []
        try:
            if self.lu_immutable:
                fail(E.EBUSY)
            if (length & (self.iova_alignment - 1)) or not length:
                fail(E.EINVAL)
            if iova is None:
                pages, start_byte, _ = elems[0]
                hint = (pages.uptr if pages.kind == "user" else pages.start) + start_byte
                iova = self.alloc_iova(hint, length)
            else:
                self.check_iova(iova, length)
            cur = iova
            for pages, start_byte, elen in elems:
                if write and not pages.writable:
                    fail(E.EPERM)
                if (start_byte % PAGE_SIZE) & (self.iova_alignment - 1):
                    fail(E.EINVAL)
                if cur + elen - 1 > ULONG_MAX:
                    fail(E.EOVERFLOW)
                new.append(Area(cur, cur + elen - 1, pages, start_byte, write))
                cur += elen
            if self.domains:
                for area in new:
                    area.pin(mem)
        except BaseException:
            for area in new:
                area.unpin()
            for pages, _, _ in elems:
                pages.put()
            raise
        self.areas.extend(new)
        return iova

    def unmap_range(self, start: int, last: int) -> int:
        if self.lu_immutable:
            fail(E.EBUSY)
        unmapped = 0
        for area in self.areas_in(start, last):
            if area.start < start or area.last > last:
                self._unmapped_partial = unmapped
                fail(E.ENOENT)
            self.areas.remove(area)
            area.unpin()
            area.pages.put()
            unmapped += area.length
        return unmapped

    def unmap_all(self) -> int:
        return self.unmap_range(0, ULONG_MAX)

    def get_pages(self, iova: int, length: int) -> list[tuple[Pages, int, int]]:
        """``iopt_get_pages`` for IOAS_COPY: contiguous areas covering the
        whole range, else ENOENT."""
        if not length:
            fail(E.EINVAL)
        last = iova + length - 1
        if last > ULONG_MAX:
            fail(E.EOVERFLOW)
        out = []
        cur = iova
        for area in self.areas_in(iova, last):
            if area.start > cur:
                break
            end = min(last, area.last)
            out.append((area.pages, area.start_byte + (cur - area.start), end - cur + 1))
            cur = end + 1
            if cur > last:
                break
        if cur <= last:
            fail(E.ENOENT)
        for pages, _, _ in out:
            pages.get()
        return out

    # -- reserved / allowed -----------------------------------------------------------------
    def reserve(self, start: int, last: int, owner: Any) -> None:
        if self.areas_in(start, last) or self.allowed_in(start, last):
            fail(E.EADDRINUSE)
        self.reserved.append(Reserved(start, last, owner))

    def remove_reserved(self, owner: Any) -> None:
        self.reserved = [r for r in self.reserved if r.owner is not owner]

    def set_allowed(self, ranges: list[tuple[int, int]]) -> None:
        for s, l in ranges:
            if self.reserved_in(s, l):
                fail(E.EADDRINUSE)
        self.allowed = list(ranges)

    # -- domains ----------------------------------------------------------------------------
    def add_domain(self, domain: DomainGeometry, mem: UserMemory) -> None:
        """``iopt_table_add_domain``."""
        new_align = max(lowest_bit(domain.pgsize_bitmap), self.iova_alignment)
        if new_align > PAGE_SIZE:
            fail(E.EINVAL)
        if new_align != self.iova_alignment:
            self._check_alignment(new_align)
        try:
            if domain.aperture_start != 0:
                self.reserve(0, domain.aperture_start - 1, domain)
            if domain.aperture_end != ULONG_MAX:
                self.reserve(domain.aperture_end + 1, ULONG_MAX, domain)
            if not self.domains:
                for a in self.areas:
                    a.pin(mem)
        except BaseException:
            if not self.domains:
                for a in self.areas:
                    a.unpin()
            self.remove_reserved(domain)
            raise
        self.iova_alignment = new_align
        self.domains.append(domain)

    def remove_domain(self, domain: DomainGeometry) -> None:
        if domain in self.domains:
            self.domains.remove(domain)
            if not self.domains:        # the last domain held the pins
                for a in self.areas:
                    a.unpin()
        self.remove_reserved(domain)
        self._recalc_alignment()

    def _check_alignment(self, new_align: int) -> None:
        """``iopt_check_iova_alignment``: every area fits a larger alignment,
        else EADDRINUSE (K:io_pagetable.c:1194-1219)."""
        mask = new_align - 1
        for a in self.areas:
            if (a.start & mask) or (a.length & mask) or ((a.start_byte % PAGE_SIZE) & mask):
                fail(E.EADDRINUSE)

    def _recalc_alignment(self) -> None:
        """``iopt_calculate_iova_alignment`` (K:io_pagetable.c:1300-1333): only
        an increase is checked against the areas; on failure nothing changes."""
        align = PAGE_SIZE if self.disable_large_pages else 1
        for d in self.domains:
            align = max(align, lowest_bit(d.pgsize_bitmap))
        if align > self.iova_alignment:
            self._check_alignment(align)
        self.iova_alignment = align

    def set_large_pages(self, enable: bool) -> None:
        """``iopt_enable_large_pages`` / ``iopt_disable_large_pages``
        (K:io_pagetable.c:1506-1543)."""
        if enable:
            self.disable_large_pages = False
            self._recalc_alignment()    # it can only drop: never fails
            return
        if self.disable_large_pages:
            return
        if self.domains and self.areas:
            fail(E.EINVAL)
        # a byte-granular area (possible without a domain) refuses PAGE_SIZE
        self.disable_large_pages = True
        try:
            self._recalc_alignment()
        except OSError:
            self.disable_large_pages = False
            raise
