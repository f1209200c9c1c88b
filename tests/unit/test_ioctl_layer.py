"""The generic ioctl layer: request encoding, size fields, capability chains."""
import struct

import pytest

from pyiommufd import errors, ioctl
from pyiommufd._uapi import ffi


def test_io_encodes_no_size_or_direction():
    assert ioctl.IO(0x3B, 0x80) == 0x3B80
    assert ioctl.IO(0xBA, 0x40) == 0xBA40
    assert ioctl.ioc_nr(0x3B95) == 0x95 and ioctl.ioc_type(0x3B95) == 0x3B


def test_new_fills_size_field_and_fields():
    idef = ioctl.IoctlDef("T", 0, "struct liveupdate_session_preserve_fd", "luo", "size")
    arg = ioctl.new(idef, fd=5, token=0x1234)
    assert arg.size == 16 and arg.fd == 5 and arg.token == 0x1234


def test_new_with_extra_bytes_reports_the_grown_size():
    idef = ioctl.IoctlDef("T", 0, "struct liveupdate_session_finish", "luo", "size")
    arg = ioctl.new(idef, extra=24)
    assert arg.size == 8 + 24
    assert len(ioctl.buffer_of(arg)) == 32


def _cap(cap_id, version, nxt, payload=b""):
    return struct.pack("<HHI", cap_id, version, nxt) + payload


def test_walk_caps_follows_offsets_in_order():
    # a 16-byte "info" prefix, then caps at 16 and 32
    reply = bytes(16) + _cap(3, 1, 32, b"\xaa" * 8) + _cap(7, 2, 0, b"\xbb" * 4)
    caps = list(ioctl.walk_caps(reply, 16))
    assert [(c.id, c.version, c.offset) for c in caps] == [(3, 1, 16), (7, 2, 32)]
    assert caps[0].data.endswith(b"\xaa" * 8) and len(caps[0].data) == 16
    assert caps[1].data.endswith(b"\xbb" * 4)


def test_walk_caps_refuses_loops():
    reply = bytes(16) + _cap(1, 1, 16)
    with pytest.raises(errors.UsageError, match="loops"):
        list(ioctl.walk_caps(reply, 16))


def test_walk_caps_refuses_out_of_range_offsets():
    reply = bytes(16) + _cap(1, 1, 400)
    with pytest.raises(errors.UsageError, match="outside"):
        list(ioctl.walk_caps(reply, 16))


def test_capability_view_is_bounds_checked():
    cap = ioctl.Capability(1, 1, 0, _cap(1, 1, 0))
    view, _holder = cap.view("struct vfio_info_cap_header")
    assert view.id == 1
    with pytest.raises(errors.UsageError):
        cap.view("struct liveupdate_ioctl_create_session")


def test_const_reads_our_declarations():
    assert ioctl.const("LIVEUPDATE_SESSION_PRESERVE_FD") == 0xBA40
    assert ffi.sizeof("struct liveupdate_ioctl_create_session") == 72
