"""Host files apart from the syscall seam: the Backend holds syscalls only,
its ``files`` (pyiommufd.hostfs) read and write sysfs, procfs and /dev."""
from __future__ import annotations

import errno
import os

import pytest

from pyiommufd.backend import Backend, LinuxBackend
from pyiommufd.hostfs import HostFiles, LinuxHostFiles
from pyiommufd_testing import FakeKernel

FILE_OPERATIONS = ("exists", "is_dir", "read_text", "read_bytes", "write_text", "listdir", "readlink", "realpath")


@pytest.mark.parametrize("backend_type", [Backend, LinuxBackend, FakeKernel])
def test_the_backend_seam_holds_no_file_operations(backend_type):
    assert not [op for op in FILE_OPERATIONS if hasattr(backend_type, op)]


def test_each_backend_carries_its_host_files():
    assert isinstance(LinuxBackend().files, LinuxHostFiles)
    with FakeKernel() as k:
        assert isinstance(k.files, HostFiles) and not isinstance(k.files, LinuxHostFiles)
        assert k.files.read_text("/proc/cmdline").strip() == k.cmdline


def test_linux_host_files_are_this_machines(tmp_path):
    files = LinuxHostFiles()
    (tmp_path / "b").write_text("two")
    (tmp_path / "a").write_bytes(b"\x00one")
    os.symlink("a", tmp_path / "link")
    assert files.listdir(str(tmp_path)) == ["a", "b", "link"]
    assert files.read_bytes(str(tmp_path / "a")) == b"\x00one"
    assert files.read_text(str(tmp_path / "b")) == "two"
    assert files.readlink(str(tmp_path / "link")) == "a"
    assert files.realpath(str(tmp_path / "link")) == str((tmp_path / "a").resolve())
    files.write_text(str(tmp_path / "b"), "TWO")    # an existing attribute, one write(2)
    assert (tmp_path / "b").read_text() == "TWO"
    assert files.exists(str(tmp_path / "a")) and not files.exists(str(tmp_path / "none"))
    os.symlink(".", tmp_path / "here")
    assert files.is_dir(str(tmp_path)) and files.is_dir(str(tmp_path / "here"))
    assert not files.is_dir(str(tmp_path / "a")) and not files.is_dir(str(tmp_path / "none"))
    with pytest.raises(OSError) as exc:
        files.read_text(str(tmp_path / "none"))
    assert exc.value.errno == errno.ENOENT and exc.value.filename == str(tmp_path / "none")
    with pytest.raises(OSError) as exc:
        files.write_text(str(tmp_path / "none"), "x")   # sysfs attributes are never created
    assert exc.value.errno == errno.ENOENT
