"""`pyiommufd devices`, `bind` and `unbind` against the fake kernel's sysfs."""
from __future__ import annotations

import json

import pytest

from pyiommufd.backend import use
from cli_support import run_cli
from pyiommufd_testing import FakeKernel, FakePciDevice

BDF = "0000:00:03.0"
CDEV = "/dev/vfio/devices/vfio0"


@pytest.fixture
def state_dir(monkeypatch, tmp_path):
    d = tmp_path / "state"
    monkeypatch.setenv("PYIOMMUFD_STATE_DIR", str(d))
    return d


def state(state_dir) -> dict:
    return json.loads((state_dir / "bind-state.json").read_text())["devices"]


def driver_of(kernel, bdf=BDF):
    link = f"/sys/bus/pci/devices/{bdf}/driver"
    return kernel.files.readlink(link).rsplit("/", 1)[-1] if kernel.files.exists(link) else None


TWO = [FakePciDevice(), FakePciDevice(bdf="0000:00:04.0", device=0x1042, iommu_group=4, driver="virtio-pci")]


def test_devices_table(capsys):
    with FakeKernel(devices=TWO) as k, use(k):
        r = run_cli(capsys, "devices")
    assert r.code == 0 and r.err == ""
    lines = r.out.splitlines()
    assert lines[0].split() == ["BDF", "VENDOR:DEVICE", "DRIVER", "IOMMU_GROUP", "VFIO_CDEV"]
    assert lines[1].split() == ["0000:00:03.0", "1af4:1041", "virtio-pci", "3", "-"]
    assert lines[2].split() == ["0000:00:04.0", "1af4:1042", "virtio-pci", "4", "-"]


def test_devices_json_after_bind(series_kernel, capsys, state_dir):
    assert run_cli(capsys, "bind", BDF).code == 0
    r = run_cli(capsys, "devices", "--json")
    assert r.code == 0
    [dev] = json.loads(r.out)
    assert dev == {"bdf": BDF, "vendor": "1af4", "device": "1041", "class": "020000", "driver": "vfio-pci",
                   "driver_override": "vfio-pci", "iommu_group": 3, "vfio_cdev": CDEV}


def test_bind_prints_cdev_and_remembers_driver(series_kernel, capsys, state_dir):
    r = run_cli(capsys, "bind", "00:03.0")          # short form is normalized
    assert r.code == 0, r.err
    assert r.out == CDEV + "\n"                     # stdout is just the cdev (scriptable)
    assert "virtio-pci -> vfio-pci" in r.err
    assert driver_of(series_kernel) == "vfio-pci"
    rec = state(state_dir)[BDF]
    assert rec["driver"] == "virtio-pci" and rec["driver_override"] is None

    r = run_cli(capsys, "bind", BDF)                # again: no change, record kept
    assert r.code == 0 and r.out == CDEV + "\n" and "already on vfio-pci" in r.err
    assert state(state_dir)[BDF]["driver"] == "virtio-pci"

    r = run_cli(capsys, "unbind", BDF)
    assert r.code == 0, r.err
    assert r.out.strip() == f"{BDF}: vfio-pci -> virtio-pci"
    assert driver_of(series_kernel) == "virtio-pci"
    assert series_kernel.files.read_text(f"/sys/bus/pci/devices/{BDF}/driver_override").strip() in ("", "(null)")
    assert state(state_dir) == {}


def test_unbind_without_record(capsys, state_dir):
    with FakeKernel(devices=[FakePciDevice(driver="vfio-pci")]) as k, use(k):
        r = run_cli(capsys, "unbind", BDF)
        assert r.code == 0, r.err
        assert driver_of(k) != "vfio-pci"
    with FakeKernel() as k, use(k):
        r = run_cli(capsys, "unbind", BDF)
        assert r.code == 0 and "nothing to do" in r.out
        assert driver_of(k) == "virtio-pci"


def test_unbind_after_live_update_is_busy(series_kernel, capsys, state_dir, kt):
    """A preserved device refuses every driver but vfio-pci after the kexec (seed-spec 4.7)."""
    assert run_cli(capsys, "bind", BDF).code == 0
    luo_fd = kt.luo()
    session = kt.create_session(luo_fd, "s")
    iommufd, memfd, cdev, *_ = kt.device_setup()
    for fd, token in ((memfd, 1), (iommufd, 2), (cdev, 3)):
        kt.preserve(session, fd, token)
    series_kernel.kexec()
    assert driver_of(series_kernel) is None
    r = run_cli(capsys, "unbind", BDF)
    assert r.code == 5, (r.out, r.err)
    [err] = r.err.splitlines()
    assert err.startswith("pyiommufd: error:") and "EBUSY" in err and "vfio-pci" in err
    # vfio-pci may take it
    r = run_cli(capsys, "bind", BDF)
    assert r.code == 0 and r.out == CDEV + "\n"


@pytest.mark.parametrize("cmd", ["bind", "unbind"])
@pytest.mark.parametrize("bdf", ["03.0", "0000:00:03", "0000:00:03.8", "0000:00:20.0", "../../../etc",
                                 "0000:00:03.0\n", "0000:00:03.0/../..", "", "zz:zz.z"])
def test_bad_bdf_exit_2_without_sysfs_writes(capsys, state_dir, monkeypatch, cmd, bdf):
    with FakeKernel() as k, use(k):
        writes = []
        monkeypatch.setattr(k.files, "write_text", lambda path, text: writes.append(path))
        r = run_cli(capsys, cmd, bdf)
    assert r.code == 2, (r.out, r.err)
    [err] = r.err.splitlines()
    assert err.startswith("pyiommufd: error:") and repr(bdf) in err
    assert "not a PCI address" in err or "above 0x1f" in err
    assert writes == []


@pytest.mark.parametrize("cmd", ["bind", "unbind"])
def test_missing_device_exit_2(series_kernel, capsys, state_dir, cmd):
    r = run_cli(capsys, cmd, "0000:00:1f.7")
    assert r.code == 2
    [err] = r.err.splitlines()
    assert err == ("pyiommufd: error: no PCI device 0000:00:1f.7 (no /sys/bus/pci/devices/0000:00:1f.7); "
                   "`pyiommufd devices` lists them")


@pytest.mark.parametrize("cmd", ["bind", "unbind"])
def test_not_root_exit_6(capsys, state_dir, cmd):
    with FakeKernel(euid=1000) as k, use(k):
        r = run_cli(capsys, cmd, BDF)
        assert driver_of(k) == "virtio-pci"
    assert r.code == 6
    [err] = r.err.splitlines()
    assert err == f"pyiommufd: error: {cmd} needs root (effective uid is 1000); run it with sudo"


def test_devices_needs_no_root(capsys):
    with FakeKernel(euid=1000) as k, use(k):
        r = run_cli(capsys, "devices", "--json")
    assert r.code == 0 and json.loads(r.out)[0]["bdf"] == BDF


def test_malformed_state_file_exit_2(series_kernel, capsys, state_dir):
    state_dir.mkdir()
    (state_dir / "bind-state.json").write_text("{not json")
    r = run_cli(capsys, "bind", BDF)
    assert r.code == 2
    [err] = r.err.splitlines()
    assert "bind-state.json" in err
    assert driver_of(series_kernel) == "virtio-pci"   # refused before touching sysfs


def test_state_dir_default(monkeypatch):
    from pyiommufd.cli import devices

    monkeypatch.delenv("PYIOMMUFD_STATE_DIR", raising=False)
    assert devices.state_path() == "/run/pyiommufd/bind-state.json"
    monkeypatch.setenv("PYIOMMUFD_STATE_DIR", "/tmp/x")
    assert devices.state_path() == "/tmp/x/bind-state.json"
