"""pyiommufd.raw on the fake kernel: the bytes go as built, the errno comes
back as a value, and docs/raw.md's example runs as written."""
import errno as E
import re
from pathlib import Path

import pytest

from pyiommufd import errors, ioctl, raw
from pyiommufd._uapi import ffi
from pyiommufd.backend import Backend

DOC = Path(__file__).resolve().parents[2] / "docs" / "raw.md"


class Recorder(Backend):
    """Keeps the bytes of each ioctl and answers with a set errno."""

    def __init__(self, errno: int = 0, value: int = 0):
        self.sent: list[tuple[int, int, bytes]] = []
        self.by_value: list[tuple[int, int, int]] = []
        self.errno, self.value = errno, value

    def ioctl(self, fd, request, arg):
        self.sent.append((fd, request, bytes(arg)))
        if self.errno:
            raise OSError(self.errno, "recorded")
        return self.value

    def ioctl_int(self, fd, request, value=0):
        self.by_value.append((fd, request, value))
        return self.value


def test_the_doc_example_runs(fake_kernel):
    [example] = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    scope: dict = {}
    exec(compile(example, str(DOC), "exec"), scope)
    assert scope["ioas_id"] == 1                         # the 4-byte and E2BIG calls allocated nothing


def test_the_struct_goes_as_built_with_any_size_and_length():
    rec = Recorder()
    arg = raw.Struct("struct iommu_ioas_alloc", 6, size=0xFFFF_FFFF)
    assert raw.ioctl(3, 0x1234, arg, backend=rec) == raw.Result(0, 0)
    assert rec.sent == [(3, 0x1234, b"\xff\xff\xff\xff\x00\x00")]


def test_the_size_field_says_the_byte_count_unless_set():
    assert raw.Struct("struct iommu_ioas_map").get("size") == ffi.sizeof("struct iommu_ioas_map")
    assert raw.Struct("struct iommu_ioas_map", 100).get("size") == 100
    info = raw.Struct("struct vfio_region_info", size=7)     # VFIO: argsz is the size field
    assert (info.size_field, info.get("argsz"), info.get("size")) == ("argsz", 32, 7)


def test_fields_named_length_are_fields_not_the_byte_count():
    arg = raw.Struct("struct iommu_ioas_map", length=4096, iova=0x1000)
    assert arg.nbytes == ffi.sizeof("struct iommu_ioas_map")
    assert (arg.get("length"), arg.get("iova")) == (4096, 0x1000)


def test_a_tail_goes_where_asked_and_the_kernel_sees_it():
    rec = Recorder()
    base = ffi.sizeof("struct iommu_ioas_alloc")
    raw.ioctl(3, "IOMMU_IOAS_ALLOC", raw.Struct("struct iommu_ioas_alloc", base + 4).tail(b"\x01", at=base + 2),
              backend=rec)
    [(_, request, sent)] = rec.sent
    assert request == ioctl.const("IOMMU_IOAS_ALLOC")
    assert sent[base:] == b"\x00\x00\x01\x00"


def test_failures_come_back_as_values_or_typed_errors():
    rec = Recorder(errno=E.E2BIG)
    assert raw.ioctl(3, 0x3B81, bytearray(12), backend=rec) == raw.Result(-1, E.E2BIG)
    assert raw.ioctl(3, 0x3B81, bytearray(12), backend=rec).errname == "E2BIG"
    with pytest.raises(errors.TooBig) as info:
        raw.ioctl(3, "IOMMU_IOAS_ALLOC", bytearray(12), backend=rec, check=True)
    assert isinstance(info.value, errors.IommufdError) and info.value.op == "IOMMU_IOAS_ALLOC"
    with pytest.raises(errors.VfioError):
        raw.ioctl(3, 0x3B64, bytearray(12), backend=rec, check=True, interface="vfio")


def test_a_value_style_ioctl_passes_the_integer():
    rec = Recorder(value=5)
    assert raw.ioctl(7, 0x3B65, 42, backend=rec) == raw.Result(5, 0)
    assert raw.ioctl(7, 0x3B66, None, backend=rec).value == 5
    assert rec.by_value == [(7, 0x3B65, 42), (7, 0x3B66, 0)]


@pytest.mark.parametrize("make", [
    lambda: raw.Struct("struct no_such_thing"),
    lambda: raw.Struct("struct iommu_ioas_alloc", -1),
    lambda: raw.Struct("struct iommu_ioas_alloc", colour=1),
    lambda: raw.Struct("struct iommu_ioas_alloc", out_ioas_id=1 << 32),
    lambda: raw.Struct("struct iommu_ioas_alloc").tail(b"x" * 8, at=10),
    lambda: raw.offsetofend("struct iommu_ioas_alloc", "nope"),
    lambda: raw.ioctl(3, 0x3B81, b"read-only", backend=Recorder()),
    lambda: raw.ioctl(3, 1.5, bytearray(4), backend=Recorder()),
    lambda: raw.ioctl(3, "NO_SUCH_IOCTL", bytearray(4), backend=Recorder()),
], ids=["unknown-struct", "negative-nbytes", "unknown-field", "value-too-big", "tail-outside",
        "unknown-end-field", "read-only-buffer", "float-request", "unknown-name"])
def test_only_what_cannot_become_bytes_is_refused(make):
    with pytest.raises(errors.UsageError):
        make()


def test_offsetofend_is_the_first_version_size():
    assert raw.offsetofend("struct iommu_ioas_alloc", "out_ioas_id") == 12
    assert raw.offsetofend("struct iommu_hwpt_alloc", "__reserved") < ffi.sizeof("struct iommu_hwpt_alloc")
