"""Cases of the kernel's own iommufd selftest (tools/testing/selftests/iommu/
iommufd.c) that need the raw layer (pyiommufd.raw): a size field that lies,
a tail past the struct, an option value the kernel must refuse, and
byte-granular IOVAs. Written anew from what those cases check; the same code
runs on the fake kernel and on the real ones in the VM.
"""
import errno as E
import mmap

import pytest

from pyiommufd import errors, ioctl, raw
from pyiommufd._uapi import ffi
from pyiommufd.iommufd import (IOMMUFD, MAP_FIXED_IOVA, MAP_READABLE, MAP_WRITEABLE, OPTIONS, PAGE_SIZE,
                               aligned_buffer)
from pyiommufd.memfd import MemFD

RW_FIXED = MAP_READABLE | MAP_WRITEABLE | MAP_FIXED_IOVA
OP_SET, OP_GET = ioctl.const("IOMMU_OPTION_OP_SET"), ioctl.const("IOMMU_OPTION_OP_GET")

# Each iommufd ioctl's first version ends at this field: a smaller size is
# EINVAL, whatever later versions added (drivers/iommu/iommufd/main.c,
# the last argument of each IOCTL_OP).
FIRST_VERSION_ENDS_AT = {
    "IOMMU_DESTROY": "id",
    "IOMMU_IOAS_ALLOC": "out_ioas_id",
    "IOMMU_IOAS_ALLOW_IOVAS": "allowed_iovas",
    "IOMMU_IOAS_COPY": "src_iova",
    "IOMMU_IOAS_IOVA_RANGES": "out_iova_alignment",
    "IOMMU_IOAS_MAP": "iova",
    "IOMMU_IOAS_MAP_FILE": "iova",
    "IOMMU_IOAS_UNMAP": "length",
    "IOMMU_OPTION": "val64",
    "IOMMU_VFIO_IOAS": "__reserved",
    "IOMMU_HWPT_ALLOC": "__reserved",
    "IOMMU_GET_HW_INFO": "__reserved",
}


def _struct_of(name: str) -> str:
    idef = ioctl.REGISTRY[name]
    assert idef.struct is not None
    return idef.struct


@pytest.fixture
def iommufd_fd(kernel):
    fd = raw.open_device("/dev/iommu")
    yield fd
    kernel.backend.close(fd)


# -- the size field: below the first version, above the kernel's struct ---------------------------

@pytest.mark.parametrize("name", sorted(FIRST_VERSION_ENDS_AT))
def test_size_below_the_first_version_is_einval(iommufd_fd, name):
    ctype = _struct_of(name)
    first_version = raw.offsetofend(ctype, FIRST_VERSION_ENDS_AT[name])
    # the buffer holds the whole struct and a byte more; only the size lies
    arg = raw.Struct(ctype, ffi.sizeof(ctype) + 1, size=first_version - 1).tail(b"\xff")
    assert raw.ioctl(iommufd_fd, name, arg).errno == E.EINVAL


@pytest.mark.parametrize("name", sorted(FIRST_VERSION_ENDS_AT))
def test_a_non_zero_byte_past_the_struct_is_e2big(iommufd_fd, name):
    ctype = _struct_of(name)
    arg = raw.Struct(ctype, ffi.sizeof(ctype) + 1).tail(b"\xff")
    assert raw.ioctl(iommufd_fd, name, arg).errno == E.E2BIG


@pytest.mark.parametrize("name", sorted(FIRST_VERSION_ENDS_AT))
def test_a_zero_tail_past_the_struct_gets_the_same_answer_as_the_exact_size(iommufd_fd, name):
    ctype = _struct_of(name)
    exact = raw.ioctl(iommufd_fd, name, raw.Struct(ctype))
    grown = raw.ioctl(iommufd_fd, name, raw.Struct(ctype, ffi.sizeof(ctype) + 1))
    assert grown.errname == exact.errname


def test_ioas_alloc_with_size_4_is_einval_and_with_a_zero_tail_allocates(iommufd_fd):
    assert raw.ioctl(iommufd_fd, "IOMMU_IOAS_ALLOC", raw.Struct("struct iommu_ioas_alloc", size=4)).errname == "EINVAL"
    grown = raw.Struct("struct iommu_ioas_alloc", 64)
    assert raw.ioctl(iommufd_fd, "IOMMU_IOAS_ALLOC", grown).ok
    assert grown.get("out_ioas_id") == 1                  # the first object of this context
    assert bytes(grown)[ffi.sizeof("struct iommu_ioas_alloc"):] == bytes(52)   # the tail stays ours


def test_check_raises_the_typed_error_the_object_model_would(iommufd_fd):
    with pytest.raises(errors.TooBig) as info:
        raw.ioctl(iommufd_fd, ioctl.REGISTRY["IOMMU_IOAS_ALLOC"],
                  raw.Struct("struct iommu_ioas_alloc", 16).tail(b"\x01"), check=True)
    assert isinstance(info.value, errors.IommufdError) and info.value.op == "IOMMU_IOAS_ALLOC"


# -- IOMMU_OPTION: only 0 and 1 ------------------------------------------------------------------

def _ioas_id(fd: int) -> int:
    arg = raw.Struct("struct iommu_ioas_alloc")
    assert raw.ioctl(fd, "IOMMU_IOAS_ALLOC", arg).ok
    return int(arg.get("out_ioas_id"))


@pytest.mark.parametrize("option", ["huge_pages", "rlimit_mode"])
def test_option_value_2_is_einval(iommufd_fd, option):
    object_id = _ioas_id(iommufd_fd) if option == "huge_pages" else 0
    arg = raw.Struct("struct iommu_option", option_id=OPTIONS[option], op=OP_SET, object_id=object_id,
                     val64=2)
    assert raw.ioctl(iommufd_fd, "IOMMU_OPTION", arg).errname == "EINVAL"


def test_the_object_model_passes_the_option_value_to_the_kernel(kernel):
    with IOMMUFD.open() as ictx:
        ioas = ictx.alloc_ioas()
        with pytest.raises(errors.InvalidArgument):
            ictx.option("huge_pages", 2, object_id=ioas)
        assert ioas.huge_pages() is True                   # nothing changed


# -- byte-granular IOVAs: the IOAS's iova_alignment decides ------------------------------------------

def _map(fd: int, ioas_id: int, buffer: mmap.mmap, offset: int, length: int, iova: int) -> raw.Result:
    user_va = int(ffi.cast("uintptr_t", ffi.from_buffer(buffer))) + offset
    arg = raw.Struct("struct iommu_ioas_map", flags=RW_FIXED, ioas_id=ioas_id, user_va=user_va,
                     length=length, iova=iova)
    return raw.ioctl(fd, "IOMMU_IOAS_MAP", arg)


def _unmap(fd: int, ioas_id: int, iova: int, length: int) -> raw.Result:
    arg = raw.Struct("struct iommu_ioas_unmap", ioas_id=ioas_id, iova=iova, length=length)
    return raw.ioctl(fd, "IOMMU_IOAS_UNMAP", arg)


def _alignment(fd: int, ioas_id: int) -> int:
    arg = raw.Struct("struct iommu_ioas_iova_ranges", ioas_id=ioas_id)
    raw.ioctl(fd, "IOMMU_IOAS_IOVA_RANGES", arg)           # EMSGSIZE: no array given, still answers
    return int(arg.get("out_iova_alignment"))


def test_byte_granular_map_without_a_domain_is_accepted(iommufd_fd):
    ioas_id = _ioas_id(iommufd_fd)
    memory = aligned_buffer(2 * PAGE_SIZE)
    assert _alignment(iommufd_fd, ioas_id) == 1
    assert _map(iommufd_fd, ioas_id, memory, 3, 100, 0x100007).ok
    assert _map(iommufd_fd, ioas_id, memory, 0, PAGE_SIZE + 1, 0x200000).ok
    assert _unmap(iommufd_fd, ioas_id, 0x100007, 100).ok
    assert _unmap(iommufd_fd, ioas_id, 0x200000, PAGE_SIZE + 1).ok


def test_the_object_model_maps_byte_granular_without_a_domain(kernel):
    with IOMMUFD.open() as ictx:
        ioas = ictx.alloc_ioas()
        assert ioas.map(aligned_buffer(PAGE_SIZE), 0x100007, length=100) == 0x100007
        assert ioas.unmap(0x100007, 100) == 100


def test_byte_granular_map_file_and_copy_follow_the_same_rule(device, kernel):
    with IOMMUFD.open() as ictx, MemFD.create("bytes", 4 * PAGE_SIZE) as memfd:
        src, dst = ictx.alloc_ioas(), ictx.alloc_ioas()
        assert src.map_file(memfd, start=100, length=PAGE_SIZE, iova=0x100007) == 0x100007
        assert dst.copy(src, 0x100008, 50, 0x300005) == 0x300005
        device.bind(ictx)
        with pytest.raises(errors.AddressInUse):           # dst holds a byte-granular area
            device.attach(dst)
        dst.unmap_all()
        device.attach(dst)
        with pytest.raises(errors.InvalidArgument):
            dst.copy(src, 0x100007, PAGE_SIZE, 0x400000)    # its bytes start 100 into a page
        with pytest.raises(errors.InvalidArgument):
            dst.map_file(memfd, start=100, length=PAGE_SIZE, iova=0x500000)
        assert dst.map_file(memfd, start=PAGE_SIZE, length=PAGE_SIZE, iova=0x500000) == 0x500000


def test_huge_pages_off_makes_the_alignment_a_page_even_without_a_domain(iommufd_fd):
    ioas_id = _ioas_id(iommufd_fd)
    off = raw.Struct("struct iommu_option", option_id=OPTIONS["huge_pages"], op=OP_SET, object_id=ioas_id,
                     val64=0)
    assert raw.ioctl(iommufd_fd, "IOMMU_OPTION", off).ok
    assert _alignment(iommufd_fd, ioas_id) == PAGE_SIZE
    memory = aligned_buffer(PAGE_SIZE)
    assert _map(iommufd_fd, ioas_id, memory, 0, PAGE_SIZE, 0x100007).errname == "EINVAL"
    assert _map(iommufd_fd, ioas_id, memory, 0, PAGE_SIZE, 0x100000).ok


def _set_huge_pages(fd: int, ioas_id: int, value: int) -> raw.Result:
    arg = raw.Struct("struct iommu_option", option_id=OPTIONS["huge_pages"], op=OP_SET, object_id=ioas_id,
                     val64=value)
    return raw.ioctl(fd, "IOMMU_OPTION", arg)


def _huge_pages(fd: int, ioas_id: int) -> int:
    arg = raw.Struct("struct iommu_option", option_id=OPTIONS["huge_pages"], op=OP_GET, object_id=ioas_id)
    assert raw.ioctl(fd, "IOMMU_OPTION", arg).ok
    return int(arg.get("val64"))


@pytest.mark.parametrize("offset, length, iova", [
    (2048, PAGE_SIZE, 0x100800),        # IOVA, length and page offset at 2 KiB
    (0, PAGE_SIZE, 0x100800),           # the IOVA only
    (0, 2048, 0x100000),                # the length only
    (2048, PAGE_SIZE, 0x100000),        # the page offset only
], ids=["all", "iova", "length", "page-offset"])
def test_huge_pages_off_is_eaddrinuse_while_an_area_is_not_page_aligned(iommufd_fd, offset, length, iova):
    """iopt_disable_large_pages(): the alignment becomes a page only if every
    area fits it (iopt_check_iova_alignment), else EADDRINUSE and nothing changes."""
    ioas_id = _ioas_id(iommufd_fd)
    memory = aligned_buffer(2 * PAGE_SIZE)
    assert _map(iommufd_fd, ioas_id, memory, offset, length, iova).ok
    assert _set_huge_pages(iommufd_fd, ioas_id, 0).errname == "EADDRINUSE"
    assert (_huge_pages(iommufd_fd, ioas_id), _alignment(iommufd_fd, ioas_id)) == (1, 1)   # unchanged
    assert _unmap(iommufd_fd, ioas_id, iova, length).ok
    assert _set_huge_pages(iommufd_fd, ioas_id, 0).ok               # nothing in the way now
    assert (_huge_pages(iommufd_fd, ioas_id), _alignment(iommufd_fd, ioas_id)) == (0, PAGE_SIZE)


def test_byte_granular_map_with_a_domain_is_refused(device, kernel):
    with IOMMUFD.open() as ictx:
        fd = ictx.fileno()
        ioas = ictx.alloc_ioas()
        device.bind(ictx)
        device.attach(ioas)
        assert _alignment(fd, ioas.id) == PAGE_SIZE
        memory = aligned_buffer(2 * PAGE_SIZE)
        assert _map(fd, ioas.id, memory, 0, PAGE_SIZE, 0x100007).errname == "EINVAL"   # the IOVA
        assert _map(fd, ioas.id, memory, 0, 100, 0x100000).errname == "EINVAL"         # the length
        assert _map(fd, ioas.id, memory, 7, PAGE_SIZE, 0x100000).errname == "EINVAL"   # the page offset
        assert _map(fd, ioas.id, memory, 0, PAGE_SIZE, 0x100000).ok
        with pytest.raises(errors.InvalidArgument):     # the object model passes the answer on
            ioas.map(memory, 0x200007, length=PAGE_SIZE)


def test_a_byte_granular_mapping_keeps_a_domain_out(device, kernel):
    with IOMMUFD.open() as ictx:
        ioas = ictx.alloc_ioas()
        device.bind(ictx)
        ioas.map(aligned_buffer(PAGE_SIZE), 0x100007, length=100)
        with pytest.raises(errors.AddressInUse):
            device.attach(ioas)
        ioas.unmap_all()
        device.attach(ioas)
