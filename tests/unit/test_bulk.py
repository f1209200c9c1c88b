"""The bulk calls of the critical path: Session.preserve_many,
Session.retrieve_all and IOAS.map_file_many, including failure part-way."""
from __future__ import annotations

import os

import pytest

from pyiommufd import errors
from pyiommufd.fdobject import FileKind
from pyiommufd.iommufd import IOMMUFD, PAGE_SIZE
from pyiommufd.luo import LiveUpdate, PreservedFile
from pyiommufd.memfd import MemFD

MiB = 1 << 20


def _memfds(n, size=PAGE_SIZE):
    out = []
    for i in range(n):
        m = MemFD.create(f"m{i}", size)
        m.write(bytes([i + 1]) * 16)
        out.append(m)
    return out


def test_preserve_many_records_what_preserve_records(fake_kernel):
    lu = LiveUpdate.open()
    session = lu.create_session("bulk")
    files = _memfds(3)
    records = session.preserve_many([(m, 10 + i) for i, m in enumerate(files)])
    assert records == [PreservedFile(10 + i, m.fileno(), "memfd") for i, m in enumerate(files)]
    assert session.preserved == {r.token: r for r in records}
    assert session.preserve_many([]) == []


def test_preserve_many_refuses_bad_items_before_any_ioctl(fake_kernel):
    lu = LiveUpdate.open()
    session = lu.create_session("bad")
    a, b = _memfds(2)
    with pytest.raises(errors.UsageError, match="item 2: a LUO token"):
        session.preserve_many([(a, 1), (b, -1)])
    with pytest.raises(errors.UsageError, match="item 1 is not an"):
        session.preserve_many([a])
    assert session.preserved == {}
    # nothing reached the kernel: the same token is still free
    session.preserve_many([(a, 1)])


def test_preserve_many_failing_part_way_says_what_was_done(fake_kernel):
    lu = LiveUpdate.open()
    session = lu.create_session("part")
    a, b, c = _memfds(3)
    stray = fake_kernel.eventfd()  # no LUO handler: ENOENT
    with pytest.raises(errors.LiveUpdateError) as info:
        session.preserve_many([(a, 1), (b, 2), (stray, 3), (c, 4)])
    exc = info.value
    assert isinstance(exc, errors.NotFound) and exc.op == "LIVEUPDATE_SESSION_PRESERVE_FD"
    assert exc.index == 2 and [r.token for r in exc.done] == [1, 2]
    assert "token 0x3; item 3 of 4 failed; the 2 before it are preserved (0x1, 0x2)" in str(exc)
    assert "order is memfd -> iommufd -> vfio cdev" in str(exc)   # the single call's hint
    assert sorted(session.preserved) == [1, 2]
    # nothing lost: the two preserved files come back after the kexec
    fake_kernel.kexec()
    lu.detach()
    session.detach()
    with LiveUpdate.open() as lu2:
        incoming = lu2.retrieve_session("part")
        fds = incoming.retrieve_all([1, 2])
        assert os.pread(fds[1].fd, 1, 0) == b"\x01" and os.pread(fds[2].fd, 1, 0) == b"\x02"
        assert fds[1].kind is FileKind.MEMFD and fds[1].token == 1
        with pytest.raises(errors.NotFound):
            incoming.retrieve(4)


def test_preserve_many_failing_first_says_nothing_was_done(fake_kernel):
    lu = LiveUpdate.open()
    session = lu.create_session("first")
    (a,) = _memfds(1)
    with pytest.raises(errors.NotFound) as info:
        session.preserve_many([(fake_kernel.eventfd(), 5), (a, 6)])
    assert info.value.index == 0 and info.value.done == []
    assert "item 1 of 2 failed; nothing was preserved" in str(info.value)


def test_retrieve_all_after_kexec_and_failure_part_way(fake_kernel):
    lu = LiveUpdate.open()
    session = lu.create_session("vm0")
    files = _memfds(4)
    session.preserve_many([(m, i + 1) for i, m in enumerate(files)])
    fake_kernel.kexec()
    lu.detach()
    session.detach()
    with LiveUpdate.open() as lu2:
        incoming = lu2.retrieve_session("vm0")
        with pytest.raises(errors.UsageError, match="outgoing"):
            lu2.create_session("out").retrieve_all([1])
        with pytest.raises(errors.UsageError, match="item 2: a LUO token"):
            incoming.retrieve_all([1, "2"])
        assert incoming.retrieved == {}
        with pytest.raises(errors.NotFound) as info:
            incoming.retrieve_all([1, 2, 99, 3])
        exc = info.value
        assert exc.op == "LIVEUPDATE_SESSION_RETRIEVE_FD" and exc.index == 2
        assert list(exc.done) == [1, 2] and incoming.retrieved == exc.done
        assert "token 0x63; item 3 of 4 failed; the 2 before it are retrieved (0x1, 0x2)" in str(exc)
        for token, got in exc.done.items():
            assert os.pread(got.fd, 1, 0) == bytes([token])
        rest = incoming.retrieve_all([3, 4])
        assert [os.pread(got.fd, 1, 0) for got in rest.values()] == [b"\x03", b"\x04"]
        assert sorted(incoming.retrieved) == [1, 2, 3, 4]


def test_map_file_many_maps_and_tracks_like_map_file(fake_kernel):
    with IOMMUFD.open() as ictx:
        ioas = ictx.alloc_ioas()
        a, b = _memfds(2, MiB)
        iovas = ioas.map_file_many([(a, 0, MiB, 1 << 32),
                                    {"file": b.fileno(), "length": MiB // 2, "writeable": False}])
        assert iovas[0] == 1 << 32
        by_iova = {m.iova: m for m in ioas.mappings}
        first, second = by_iova[iovas[0]], by_iova[iovas[1]]
        assert (first.kind, first.length, first.fd, first.file) == ("file", MiB, a.fileno(), a)
        assert (second.length, second.fd, second.file, second.writeable) == (MiB // 2, b.fileno(), None, False)
        assert ioas.unmap(1 << 32, MiB) == MiB


def test_map_file_many_refuses_bad_items_before_any_ioctl(fake_kernel):
    with IOMMUFD.open() as ictx:
        ioas = ictx.alloc_ioas()
        (a,) = _memfds(1, MiB)
        with pytest.raises(errors.UsageError, match="item 2: iova must not be negative"):
            ioas.map_file_many([(a, 0, MiB, 0), (a, 0, MiB, -7)])
        with pytest.raises(errors.UsageError, match="item 1: missing 'file'"):
            ioas.map_file_many([{"length": MiB}])
        with pytest.raises(errors.UsageError, match=r"item 1: unknown map_file arguments \['colour'\]"):
            ioas.map_file_many([{"file": a, "colour": 1}])
        with pytest.raises(errors.UsageError, match="item 1: not a map_file item"):
            ioas.map_file_many([(a, 0)])
        assert ioas.mappings == []


def test_map_file_many_failing_part_way_keeps_what_was_mapped(fake_kernel):
    with IOMMUFD.open() as ictx:
        ioas = ictx.alloc_ioas()
        a, b = _memfds(2, MiB)
        with pytest.raises(errors.IommufdError) as info:
            # the third overlaps the first: EEXIST from the kernel
            ioas.map_file_many([(a, 0, MiB, 0), (b, 0, MiB, 4 * MiB), (b, 0, MiB, MiB // 2), (a, 0, MiB, 8 * MiB)])
        exc = info.value
        assert isinstance(exc, errors.AlreadyExists) and exc.op == "IOMMU_IOAS_MAP_FILE"
        assert exc.index == 2 and exc.done == [0, 4 * MiB]
        assert "item 3 of 4 failed; the 2 before it are mapped (iova 0x0, iova 0x400000)" in str(exc)
        assert [m.iova for m in ioas.mappings] == [0, 4 * MiB]
        assert ioas.unmap(0, 8 * MiB) == 2 * MiB


def test_unmap_of_a_range_drops_only_the_mappings_inside_it(fake_kernel):
    with IOMMUFD.open() as ictx:
        ioas = ictx.alloc_ioas()
        (m,) = _memfds(1, MiB)
        for iova in (8 * MiB, 0, 4 * MiB, 2 * MiB):
            ioas.map_file(m, 0, MiB, iova)
        assert [x.iova for x in ioas.mappings] == [0, 2 * MiB, 4 * MiB, 8 * MiB]
        assert ioas.unmap(2 * MiB, 4 * MiB) == 2 * MiB        # the two starting inside, not 0 or 8M
        assert [x.iova for x in ioas.mappings] == [0, 8 * MiB]
        assert ioas.unmap(8 * MiB, MiB) == MiB                 # exactly one mapping
        ioas.map_file(m, 0, MiB, 3 * MiB)
        assert [x.iova for x in ioas.mappings] == [0, 3 * MiB]
