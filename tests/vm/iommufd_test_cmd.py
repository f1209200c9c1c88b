"""Test-only binding of ``IOMMU_TEST_CMD``, the iommufd mock-domain ioctl of
``CONFIG_IOMMUFD_TEST`` (the VM kernel has it; stock distribution kernels do
not).

The ABI is kernel-internal (``drivers/iommu/iommufd/iommufd_test.h`` of Linux
7.3, not a UAPI header), so it is declared here, in a private cffi ``FFI``,
and never in ``include-bindings/``. Only the members of the command union that
the tests use are declared; the union keeps the kernel's size (48 bytes: the
``dirty`` member is the largest), so the struct is 72 bytes and ``last`` ends
at byte 68, which is the minimum ``size`` the kernel accepts.

Calls go through :mod:`pyiommufd.ioctl` (an :class:`~pyiommufd.ioctl.IoctlDef`
with request ``_IO(';', 0x80 + 32)``) and the backend seam, so failures are the
library's typed errors (``IommufdInvalidArgument``...).
"""
from __future__ import annotations

from dataclasses import dataclass

from cffi import FFI

from pyiommufd import backend as backend_mod
from pyiommufd import ioctl

ffi = FFI()
ffi.cdef("""
struct iommu_test_cmd {
    uint32_t size;
    uint32_t op;
    uint32_t id;
    uint32_t __reserved;
    union {
        struct {
            uint64_t start;
            uint64_t length;
        } add_reserved;
        struct {
            uint32_t out_stdev_id;
            uint32_t out_hwpt_id;
            uint32_t out_idev_id;
        } mock_domain;
        struct {
            uint32_t out_stdev_id;
            uint32_t out_hwpt_id;
            uint32_t out_idev_id;
            uint32_t dev_flags;
        } mock_domain_flags;
        struct {
            uint32_t pt_id;
        } mock_domain_replace;
        struct {
            uint64_t iova;
            uint64_t length;
            uint64_t uptr;
        } check_map;
        struct {
            uint32_t flags;
            uint64_t iova;
            uint64_t length;
            uint64_t page_size;
            uint64_t uptr;
            uint64_t out_nr_dirty;
        } dirty;
    };
    uint32_t last;
};
""")

# enum of iommufd_test.h (7.3), in declaration order from 1
OP_ADD_RESERVED = 1
OP_MOCK_DOMAIN = 2
OP_MD_CHECK_MAP = 3
OP_MOCK_DOMAIN_REPLACE = 10
OP_MOCK_DOMAIN_FLAGS = 12
OP_DIRTY = 13

MOCK_APERTURE_START = 1 << 24
MOCK_APERTURE_LAST = (1 << 31) - 1
MOCK_PAGE_SIZE = 2048
MOCK_FLAGS_DEVICE_NO_DIRTY = 1 << 0

HW_INFO_TYPE_SELFTEST = 0xFEEDBEEF
HW_INFO_SELFTEST_REGVAL = 0xDEADBEEF

SIZE = ffi.sizeof("struct iommu_test_cmd")
MIN_SIZE = ffi.offsetof("struct iommu_test_cmd", "last") + 4

IOMMU_TEST_CMD = ioctl.IoctlDef("IOMMU_TEST_CMD", ioctl.IO(0x3B, 0x80 + 32), None, "iommufd")


def call(iommufd, op: int, obj_id: int = 0, *, size: int = SIZE, **members):
    """Issue one ``IOMMU_TEST_CMD``; ``members`` are ``union_member=dict``,
    e.g. ``check_map={"iova": ..., "length": ..., "uptr": ...}``. Returns the
    struct as the kernel left it."""
    cmd = ffi.new("struct iommu_test_cmd *")
    cmd.size = size
    cmd.op = op
    cmd.id = obj_id
    for member, fields in members.items():
        target = getattr(cmd, member)
        for name, value in fields.items():
            setattr(target, name, value)
    be = backend_mod.get_backend(getattr(iommufd, "backend", None))
    fd = iommufd.fileno() if hasattr(iommufd, "fileno") else int(iommufd)
    ioctl.invoke(be, fd, IOMMU_TEST_CMD, cmd)
    return cmd


@dataclass(frozen=True)
class MockDevice:
    """What IOMMU_TEST_OP_MOCK_DOMAIN created: a selftest object (destroying
    it detaches and unbinds the mock device), the HWPT the device got attached
    to (an automatic domain when ``pt_id`` was an IOAS) and the device's
    iommufd dev_id (usable wherever a bound VFIO device's dev_id is)."""

    stdev_id: int
    hwpt_id: int
    idev_id: int


def mock_domain(iommufd, pt_id: int, dev_flags: int | None = None) -> MockDevice:
    """IOMMU_TEST_OP_MOCK_DOMAIN(_FLAGS): create a mock device, bind it to
    ``iommufd`` and attach it to ``pt_id`` (an IOAS or a paging HWPT)."""
    if dev_flags is None:
        cmd = call(iommufd, OP_MOCK_DOMAIN, pt_id)
        out = cmd.mock_domain
    else:
        cmd = call(iommufd, OP_MOCK_DOMAIN_FLAGS, pt_id, mock_domain_flags={"dev_flags": dev_flags})
        out = cmd.mock_domain_flags
    return MockDevice(int(out.out_stdev_id), int(out.out_hwpt_id), int(out.out_idev_id))


def mock_domain_replace(iommufd, stdev_id: int, pt_id: int) -> int:
    """IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE: move the mock device to ``pt_id``;
    returns the HWPT id it is attached to now."""
    cmd = call(iommufd, OP_MOCK_DOMAIN_REPLACE, stdev_id, mock_domain_replace={"pt_id": pt_id})
    return int(cmd.mock_domain_replace.pt_id)


def check_map(iommufd, hwpt_id: int, iova: int, length: int, uptr: int) -> None:
    """IOMMU_TEST_OP_MD_CHECK_MAP: succeeds iff every mock page of
    ``[iova, iova+length)`` in the mock domain translates to the physical page
    behind the user address ``uptr + offset`` (EINVAL otherwise)."""
    call(iommufd, OP_MD_CHECK_MAP, hwpt_id, check_map={"iova": iova, "length": length, "uptr": uptr})


def add_reserved(iommufd, ioas_id: int, start: int, length: int) -> None:
    """IOMMU_TEST_OP_ADD_RESERVED: reserve ``[start, start+length)`` in an IOAS."""
    call(iommufd, OP_ADD_RESERVED, ioas_id, add_reserved={"start": start, "length": length})


def set_dirty(iommufd, hwpt_id: int, iova: int, length: int, page_size: int, bits: bytes) -> int:
    """IOMMU_TEST_OP_DIRTY: the mock IOMMU marks ``iova + i*page_size`` dirty
    for every bit i set in ``bits`` (as a device write would). Returns the
    number of pages marked. EINVAL when dirty tracking is not enabled."""
    holder = ffi.new("uint8_t[]", max(len(bits), 8))
    ffi.buffer(holder, len(bits))[:] = bits
    cmd = call(iommufd, OP_DIRTY, hwpt_id,
               dirty={"iova": iova, "length": length, "page_size": page_size,
                      "uptr": int(ffi.cast("uintptr_t", holder))})
    return int(cmd.dirty.out_nr_dirty)


def address_of(buffer) -> int:
    """The user address of a Python buffer (mmap, bytearray...)."""
    pinned = ffi.from_buffer(buffer)
    return int(ffi.cast("uintptr_t", pinned))


__all__ = ["ffi", "call", "mock_domain", "mock_domain_replace", "check_map", "add_reserved",
           "set_dirty", "address_of", "MockDevice", "IOMMU_TEST_CMD", "SIZE", "MIN_SIZE"]
