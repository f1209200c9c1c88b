"""Host-side tests of pyiommufd.vm.initramfs: the cpio writer and /init."""
from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pyiommufd.vm import initramfs


def parse_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, rdev) of a newc archive."""
    out, off = {}, 0
    while True:
        assert data[off:off + 6] == b"070701", off
        fields = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        name_start = off + 110
        name = data[name_start:name_start + namesize - 1].decode()
        off = name_start + namesize
        off += (4 - off % 4) % 4
        body = data[off:off + size]
        off += size
        off += (4 - off % 4) % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body, rdev)


def test_cpio_writer_roundtrip():
    w = initramfs.CpioWriter()
    w.directory("dev")
    w.chardev("dev/console", 5, 1)
    w.file("init", b"#!/bin/sh\n", 0o755)
    w.symlink("bin/sh", "busybox")
    entries = parse_newc(w.getvalue())
    assert stat.S_ISDIR(entries["dev"][0])
    assert stat.S_ISCHR(entries["dev/console"][0]) and entries["dev/console"][2] == (5, 1)
    assert entries["init"][1] == b"#!/bin/sh\n" and entries["init"][0] & 0o777 == 0o755
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    with pytest.raises(ValueError):
        w.file("init", b"")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="no cpio tool")
def test_cpio_tool_reads_our_archive(tmp_path):
    w = initramfs.CpioWriter()
    w.directory("etc")
    w.file("etc/hello", b"hi\n")
    listing = subprocess.run(["cpio", "-t"], input=w.getvalue(), capture_output=True, check=True)
    assert listing.stdout.decode().split() == ["etc", "etc/hello"]


def test_init_script_mounts_and_runs_the_agent():
    text = initramfs.init_script()
    assert "@" not in text.replace("$@", "")            # every placeholder filled
    assert f"{initramfs.HOSTROOT_TAG} /mnt/root" in text and ",ro," in text
    assert f"{initramfs.RESULTS_TAG} /results" in text
    assert f"$R{initramfs.RESULTS_IN_CHROOT}" in text
    assert "-m pyiommufd.vm.guest" in text
    assert "PYIOMMUFD_IN_GUEST=1" in text
    assert text.index("-m pyiommufd.vm.guest") < text.rindex("poweroff -f")
    assert "/results/agent-exit" in text


def test_is_static_tells_static_from_dynamic():
    assert not initramfs._is_static(Path(sys.executable).resolve())   # has PT_INTERP
    assert not initramfs._is_static(Path(__file__))                   # not ELF
    # Debian's busybox-static (which bootstrap installs) ships a static /bin/busybox
    status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "busybox-static"],
                            capture_output=True, text=True).stdout
    if status == "install ok installed":
        assert initramfs._is_static(Path("/bin/busybox"))


def test_archive_is_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("PYIOMMUFD_CACHE", str(tmp_path / "cache"))
    fake_busybox = tmp_path / "busybox"
    fake_busybox.write_bytes(b"\x7fELF not really")
    a = initramfs.build_initramfs(busybox=fake_busybox)
    b = initramfs.build_initramfs(busybox=fake_busybox)
    assert a == b and a.parent == tmp_path / "cache" / "initramfs"
    entries = parse_newc(a.read_bytes())
    assert entries["bin/busybox"][1] == fake_busybox.read_bytes()
    assert entries["init"][1].decode() == initramfs.init_script()
    assert stat.S_ISCHR(entries["dev/console"][0])
    fake_busybox.write_bytes(b"\x7fELF other")
    assert initramfs.build_initramfs(busybox=fake_busybox) != a
