#!/usr/bin/env python3
"""Python-level overhead of the hot path, against a stub backend.

    PYTHONPATH=src python3 benchmarks/micro.py [-n N] [--calls]

The stub's ``ioctl`` does nothing and succeeds, so every microsecond measured
is pyiommufd's own: argument checks, struct packing, tracking, call layers.
The "floor" rows issue the same request through the stub with one
preallocated buffer, which is what a bare ``fcntl.ioctl`` loop costs in
Python. ``--calls`` also counts Python-level function calls per operation.
"""
from __future__ import annotations

import argparse
import mmap
import os
import sys
import time

from pyiommufd import ioctl
from pyiommufd.backend import Backend
from pyiommufd.iommufd import IOMMU_IOAS_ALLOC, IOMMU_IOAS_MAP, IOMMU_IOAS_UNMAP, IOMMUFD
from pyiommufd.luo import Session
from pyiommufd._uapi import ffi


class StubBackend(Backend):
    """Every ioctl succeeds at once and changes nothing (IOAS_ALLOC says id 7)."""

    name = "stub"

    def __init__(self):
        self._alloc = IOMMU_IOAS_ALLOC.request

    def ioctl(self, fd, request, arg):
        if request == self._alloc:
            arg[4:8] = b"\x07\x00\x00\x00"   # out_ioas_id, after the u32 size and flags
        return 0

    def ioctl_int(self, fd, request, value=0):
        return 0

    def close(self, fd):
        pass

    def readlink(self, path):
        return "/memfd:bench (deleted)"


def _timeit(fn, n: int) -> float:
    """Best of 5 runs of ``n`` calls, in microseconds per call."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def _count_calls(fn) -> int:
    count = 0

    def prof(frame, event, arg):
        nonlocal count
        if event in ("call", "c_call"):
            count += 1
    fn()  # warm
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count - 1   # setprofile(None) itself


def cases(be: StubBackend):
    ictx = IOMMUFD.from_fd(0, backend=be, owned=False)
    ioas = ictx.ioas(3)
    buf = mmap.mmap(-1, 4096)
    busy = ictx.ioas(4)
    for i in range(1000):
        busy.map(mmap.mmap(-1, 4096), iova=(1 << 32) + i * 4096)
    session = Session(0, "bench", incoming=False, backend=be, owned=False)
    memfd = os.memfd_create("bench")

    def map_unmap():
        ioas.map(buf, iova=0x100000)
        ioas.unmap(0x100000, 4096)

    def map_unmap_busy():
        busy.map(buf, iova=0x100000)
        busy.unmap(0x100000, 4096)

    addr = int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))

    def map_unmap_call_layer():
        ioctl.call(be, 0, IOMMU_IOAS_MAP, flags=7, ioas_id=3, user_va=addr, length=4096, iova=0x100000)
        ioctl.call(be, 0, IOMMU_IOAS_UNMAP, ioas_id=3, iova=0x100000, length=4096)

    m = ioctl.new(IOMMU_IOAS_MAP, flags=7, ioas_id=3, user_va=addr, length=4096, iova=0x100000)
    u = ioctl.new(IOMMU_IOAS_UNMAP, ioas_id=3, iova=0x100000, length=4096)
    mb, ub = ffi.buffer(m), ffi.buffer(u)
    rm, ru = IOMMU_IOAS_MAP.request, IOMMU_IOAS_UNMAP.request

    def map_unmap_floor():
        be.ioctl(0, rm, mb)
        be.ioctl(0, ru, ub)

    def alloc_destroy():
        ictx.alloc_ioas().destroy()

    def preserve_int():
        session.preserve(memfd, 1)

    many = [(memfd, i + 1) for i in range(64)]

    def preserve_64_one_by_one():
        for obj, token in many:
            session.preserve(obj, token)

    def preserve_64_bulk():
        session.preserve_many(many)

    yield "map+unmap 4K (public)", map_unmap
    yield "map+unmap 4K, 1000 mapped", map_unmap_busy
    yield "map+unmap 4K (ioctl.call)", map_unmap_call_layer
    yield "map+unmap 4K (floor)", map_unmap_floor
    yield "ioas alloc+destroy", alloc_destroy
    yield "session.preserve(int)", preserve_int
    yield "preserve 64, one by one", preserve_64_one_by_one
    yield "preserve 64, preserve_many", preserve_64_bulk


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--calls", action="store_true", help="count Python function calls per op")
    opts = ap.parse_args()
    be = StubBackend()
    rows = []
    for label, fn in cases(be):
        us = _timeit(fn, opts.n)
        calls = _count_calls(fn) if opts.calls else None
        rows.append((label, us, calls))
    floor = next(us for label, us, _ in rows if "floor" in label)
    for label, us, calls in rows:
        extra = f"  {calls:4d} calls" if calls is not None else ""
        print(f"{label:32s} {us:8.2f} us  {us / floor:6.1f}x floor{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
