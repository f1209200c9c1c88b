"""The VMM live update's pure parts: the machine spec and QEMU's command line,
the VM record, the blackout arithmetic, and which QEMU runs."""
from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from pyiommufd import exitcodes
from pyiommufd.errors import UsageError
from pyiommufd.qemu import binary
from pyiommufd.qemu.errors import QemuError
from pyiommufd.qemu.liveupdate import Blackout, Owner, Phase
from pyiommufd.qemu.machine import OWNED_OPTIONS, RAM_ID, Machine, parse_memory

MIB = 1 << 20


@pytest.mark.parametrize("text, size", [("256M", 256 * MIB), ("1G", 1 << 30), ("512", 512 * MIB),
                                        ("2048k", 2 * MIB), ("4MiB", 4 * MIB), ("1g", 1 << 30)])
def test_memory_sizes(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["0", "3M", "1k", "lots", "-2M", "1.5G", "", "99999999999999999999G"])
def test_bad_memory_sizes_are_refused_with_the_value(text):
    with pytest.raises(UsageError, match="--memory"):
        parse_memory(text)


def test_the_command_line_maps_the_memfd_shared_and_owns_ram_qmp_and_incoming():
    m = Machine("vm0", 256 * MIB, ("-machine", "q35", "-smp", "2"))
    args = m.command(ram_fd=7, qmp_socket="/run/x/qmp.sock")
    backend = args[args.index("-object") + 1]
    assert backend == f"memory-backend-file,id={RAM_ID},size={256 * MIB},mem-path=/proc/self/fd/7,share=on"
    assert args[args.index("-m") + 1] == "256M"
    assert f"memory-backend={RAM_ID}" in args
    assert "unix:/run/x/qmp.sock,server=on,wait=off" in args
    assert "-incoming" not in args and args[-4:] == ["-machine", "q35", "-smp", "2"]
    incoming = m.command(ram_fd=9, qmp_socket="/s", incoming=True)
    assert incoming[incoming.index("-incoming") + 1] == "defer"
    assert "mem-path=/proc/self/fd/9" in incoming[incoming.index("-object") + 1]


def test_devices_get_pyiommufds_iommufd_and_cdev_fds():
    m = Machine("vm0", 64 * MIB, devices=("00:03.0",))
    assert m.devices == ("0000:00:03.0",)
    args = m.command(ram_fd=5, qmp_socket="/s", iommufd_fd=11, device_fds=[12])
    assert "iommufd,id=pyiommufd-iommufd,fd=11" in args
    assert "vfio-pci,id=pyiommufd-dev0,iommufd=pyiommufd-iommufd,fd=12" in args
    with pytest.raises(UsageError, match="iommufd fd"):
        m.command(ram_fd=5, qmp_socket="/s")


@pytest.mark.parametrize("option", sorted(OWNED_OPTIONS))
def test_options_pyiommufd_owns_are_refused_with_why(option):
    for spelling in (f"-{option}", f"--{option}"):
        with pytest.raises(UsageError, match=re.escape(f"QEMU option {spelling}: {OWNED_OPTIONS[option]}")):
            Machine("vm0", 64 * MIB, (spelling, "x"))


def test_a_memory_backend_of_the_users_own_or_our_id_is_refused():
    with pytest.raises(UsageError, match="memory-backend="):
        Machine("vm0", 64 * MIB, ("-M", "pc,memory-backend=mine"))
    with pytest.raises(UsageError, match=RAM_ID):
        Machine("vm0", 64 * MIB, ("-object", f"memory-backend-ram,id={RAM_ID},size=1M"))
    Machine("vm0", 64 * MIB, ("-object", f"memory-backend-ram,id={RAM_ID}-2,size=1M"))   # another id is fine


def test_the_vm_record_round_trips_and_refuses_damage():
    m = Machine("vm0", 64 * MIB, ("-smp", "2"), ("0000:00:03.0",))
    assert Machine.from_dict(m.as_dict()) == m
    for damage, words in [({"version": 2}, "version 2"), ({"memory": "64M"}, "memory"),
                          ({"args": "-smp 2"}, "args"), ({"name": 7}, "name"), ({"args": ["-m", "1"]}, "-m")]:
        with pytest.raises(UsageError, match=words):
            Machine.from_dict({**m.as_dict(), **damage})


def test_the_blackout_share_leaves_out_save_load_and_the_kexec():
    b = Blackout((Phase("save", 1.0, Owner.QEMU), Phase("preserve state", 0.5, Owner.PYIOMMUFD),
                  Phase("kexec and boot", 6.0, Owner.KERNEL), Phase("qemu start", 1.5, Owner.QEMU),
                  Phase("load", 1.0, Owner.QEMU)))
    assert b.total == 10.0
    assert b.pyiommufd_share == 2.0 and b.pyiommufd_own == 0.5
    doc = b.as_dict()
    assert doc["pyiommufd_share_fraction"] == 0.2
    assert Blackout(tuple(Phase.from_dict(p) for p in doc["phases"])) == b
    assert "20.0% (goal <= 10%)" in b.table()
    with pytest.raises(UsageError, match="owner"):
        Phase.from_dict({"name": "x", "seconds": 1, "owner": "someone"})


def _script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYIOMMUFD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_an_old_qemu_is_named_with_what_it_lacks(tmp_path, monkeypatch):
    old = _script(tmp_path, "qemu-7.2", 'echo "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)"')
    monkeypatch.setenv(binary.ENV_QEMU, old)
    q = binary.resolve()
    assert q.origin == "$PYIOMMUFD_QEMU" and q.version() == (7, 2, 19)
    with pytest.raises(QemuError, match=r"QEMU 7\.2\.19 is older than 9\.0 \(no cpr-reboot, no iommufd\)") as exc:
        q.require({binary.Feature.CPR_REBOOT}, "pyiommufd qemu launch")
    assert exitcodes.exit_code_for(exc.value) == exitcodes.VMM_FAILED


def test_a_new_qemu_without_iommufd_is_named_too(tmp_path):
    body = """case "$*" in
  -version) echo "QEMU emulator version 11.1.3";;
  "-object help") printf 'List of user creatable objects:\\n  memory-backend-file\\n  memory-backend-ram\\n';;
  "-device vfio-pci,help") echo "vfio-pci options:"; echo "  host=<str>";;
esac"""
    q = binary.resolve(_script(tmp_path, "qemu-11", body))
    assert q.origin == "--qemu"
    assert q.missing({binary.Feature.SHARED_RAM, binary.Feature.CPR_REBOOT}) == []
    assert q.missing({binary.Feature.IOMMUFD, binary.Feature.VFIO_IOMMUFD}) == [
        "no iommufd object (-object iommufd)", "vfio-pci has no iommufd property"]


def test_no_cached_qemu_and_no_fetch_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PYIOMMUFD_CACHE", str(tmp_path))
    monkeypatch.delenv(binary.ENV_QEMU, raising=False)
    with pytest.raises(QemuError, match="pyiommufd qemu fetch"):
        binary.resolve(fetch_missing=False)


def test_the_cached_qemu_runs_through_its_own_loader_and_firmware(tmp_path, monkeypatch):
    monkeypatch.setenv("PYIOMMUFD_CACHE", str(tmp_path))
    q = binary._cached(tmp_path / "root")
    argv = q.command(["-version"])
    assert argv[0].endswith("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2") and argv[1] == "--library-path"
    assert argv[3].endswith("usr/bin/qemu-system-x86_64")
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-L"] == [
        str(tmp_path / "root" / d) for d in ("usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu")]
    assert dict(q.env)["QEMU_MODULE_DIR"].endswith("usr/lib/x86_64-linux-gnu/qemu")


def test_what_qemu_answered_is_remembered_per_binary(tmp_path, cache):
    calls = tmp_path / "calls"
    body = f"""echo "$*" >> {calls}
case "$*" in
  -version) echo "QEMU emulator version 11.1.3";;
  "-object help") echo "  memory-backend-file";;
esac"""
    path = _script(tmp_path, "qemu", body)
    assert binary.resolve(path).missing({binary.Feature.SHARED_RAM}) == []
    assert calls.read_text().splitlines() == ["-version", "-object help"]
    # a resume after the kexec asks again: nothing runs, the answers come from the cache
    assert binary.resolve(path).missing({binary.Feature.SHARED_RAM}) == []
    assert calls.read_text().splitlines() == ["-version", "-object help"]
    assert (cache / "qemu" / "answers.json").is_file()
    # another binary at the same path (a new mtime or size) is asked afresh
    Path(path).write_text(Path(path).read_text() + "\n# rebuilt\n")
    binary.resolve(path).version()
    assert calls.read_text().splitlines() == ["-version", "-object help", "-version"]
