"""`pyiommufd doctor` and `pyiommufd caps` against the fake kernel."""
from __future__ import annotations

import errno as E
import gzip
import json
import os

import pytest

from pyiommufd.backend import use
from pyiommufd.cli import doctor as doctor_mod
from cli_support import Result, run_cli
from pyiommufd_testing import FakeKernel


def checks_of(r: Result) -> dict[str, dict]:
    doc = json.loads(r.out)
    return {c["check"]: c for c in doc["checks"]}


# -- doctor ---------------------------------------------------------------------------------

def test_doctor_series_kernel_all_ok(series_kernel, capsys):
    r = run_cli(capsys, "doctor", "--json")
    assert r.code == 0, r.err
    assert r.err == ""
    doc = json.loads(r.out)
    assert doc["ok"] is True
    c = {x["check"]: x for x in doc["checks"]}
    for name in ("root", "/dev/iommu", "/dev/liveupdate", "CONFIG_IOMMUFD", "CONFIG_VFIO_DEVICE_CDEV",
                 "CONFIG_LIVEUPDATE", "CONFIG_LIVEUPDATE_MEMFD", "CONFIG_KEXEC_HANDOVER",
                 "CONFIG_KEXEC_FILE", "CONFIG_IOMMU_LIVEUPDATE", "CONFIG_INTEL_IOMMU", "CONFIG_IRQ_REMAP",
                 "KHO enabled", "cmdline liveupdate=on", "cmdline intel_iommu=on", "VT-d units", "LU ABI"):
        assert c[name]["status"] == "ok", c[name]
    assert c["kernel release"]["value"] == "7.3.4"
    assert c["kernel config"]["value"] == "/boot/config-7.3.4"
    assert c["LU ABI"]["value"] == "lu-v2 at nr 0x95"
    assert c["VT-d units"]["value"] == "dmar0"
    assert c["RLIMIT_MEMLOCK"]["status"] in ("ok", "info", "warn")
    assert {x["status"] for x in doc["checks"]} <= {"ok", "warn", "fail", "info"}
    assert all(set(x) == {"check", "status", "value", "hint", "required"} for x in doc["checks"])


def test_doctor_table(series_kernel, capsys):
    r = run_cli(capsys, "doctor")
    assert r.code == 0
    lines = r.out.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "VALUE", "HINT"]
    assert any(ln.startswith("/dev/liveupdate") and " ok " in ln for ln in lines)


def test_doctor_stock_kernel_warns_about_the_series(fake_kernel, capsys):
    r = run_cli(capsys, "doctor", "--json")
    assert r.code == 0       # ready for LUO; the series' pieces are optional
    c = checks_of(r)
    assert c["LU ABI"]["status"] == "warn" and c["LU ABI"]["value"].startswith("foreign")
    assert "kernel lacks" in c["LU ABI"]["hint"]
    assert c["CONFIG_IOMMU_LIVEUPDATE"]["status"] == "warn"


def test_doctor_shows_vfio_cdevs(series_kernel, capsys):
    assert run_cli(capsys, "bind", "0000:00:03.0").code == 0
    c = checks_of(run_cli(capsys, "doctor", "--json"))
    assert c["VFIO cdevs"] == {"check": "VFIO cdevs", "status": "ok", "value": "/dev/vfio/devices/vfio0",
                               "hint": "", "required": False}


def test_doctor_without_liveupdate_fails(capsys):
    with FakeKernel(lu_abi="lu-v2", liveupdate=False) as k, use(k):
        r = run_cli(capsys, "doctor", "--json")
    assert r.code == 1
    c = checks_of(r)
    assert c["/dev/liveupdate"]["status"] == "fail"
    assert c["cmdline liveupdate=on"]["status"] == "fail"
    [err] = r.err.splitlines()
    assert err.startswith("pyiommufd: error: 2 required check(s) failed: /dev/liveupdate, cmdline liveupdate=on")


def test_doctor_not_root_fails(capsys):
    with FakeKernel(lu_abi="lu-v2", euid=1000) as k, use(k):
        r = run_cli(capsys, "doctor", "--json")
    assert r.code == 1
    c = checks_of(r)
    assert c["root"]["status"] == "fail" and c["root"]["value"] == "euid 1000"
    [err] = r.err.splitlines()
    assert err == "pyiommufd: error: 1 required check(s) failed: root"


def test_doctor_reports_holder_of_liveupdate(series_kernel, capsys):
    fd = series_kernel.open("/dev/liveupdate")
    try:
        r = run_cli(capsys, "doctor", "--json")
    finally:
        series_kernel.close(fd)
    assert r.code == 0
    c = checks_of(r)
    assert c["/dev/liveupdate"]["status"] == "warn"
    assert f"held by pid {os.getpid()}" in c["/dev/liveupdate"]["value"]


def test_doctor_kho_off_on_cmdline(capsys):
    cmdline = "root=/dev/vda console=ttyS0 intel_iommu=on liveupdate=on kho=off"
    with FakeKernel(lu_abi="lu-v2", cmdline=cmdline) as k, use(k):
        r = run_cli(capsys, "doctor", "--json")
    c = checks_of(r)
    # no debugfs in the fake: doctor reads KHO from the command line
    assert not k.files.exists("/sys/kernel/debug/kho")
    assert c["KHO enabled"] == {"check": "KHO enabled", "status": "fail", "value": "off (kho=off)",
                                "hint": "boot with kho=on", "required": True}
    assert r.code == 1


class _ConfigOnly:
    """A minimal backend for read_kernel_config: only the files given exist."""

    def __init__(self, files: dict[str, bytes]):
        self.contents = files
        self.files = self

    def read_bytes(self, path):
        try:
            return self.contents[path]
        except KeyError:
            raise OSError(E.ENOENT, os.strerror(E.ENOENT), path) from None

    def read_text(self, path):
        return self.read_bytes(path).decode()


CONFIG = b"""#
# Linux/x86 7.3.4 Kernel Configuration
CONFIG_IOMMUFD=m
CONFIG_LIVEUPDATE=y
# CONFIG_IOMMU_LIVEUPDATE is not set
CONFIG_CMDLINE="quiet splash"
"""


def test_read_kernel_config_prefers_proc_config_gz():
    be = _ConfigOnly({"/proc/config.gz": gzip.compress(CONFIG), "/boot/config-7.3.4": b"CONFIG_IOMMUFD=n\n"})
    config, source = doctor_mod.read_kernel_config(be, "7.3.4")
    assert source == "/proc/config.gz"
    assert config == {"IOMMUFD": "m", "LIVEUPDATE": "y", "IOMMU_LIVEUPDATE": "n", "CMDLINE": "quiet splash"}


def test_read_kernel_config_falls_back_to_boot():
    be = _ConfigOnly({"/proc/config.gz": b"not gzip", "/boot/config-7.3.4": CONFIG.decode().encode()})
    config, source = doctor_mod.read_kernel_config(be, "7.3.4")
    assert source == "/boot/config-7.3.4" and config["IOMMUFD"] == "m"


def test_read_kernel_config_missing():
    config, source = doctor_mod.read_kernel_config(_ConfigOnly({}), "7.3.4")
    assert config is None and "/boot/config-7.3.4" in source


# -- caps -------------------------------------------------------------------------------------

def test_caps_series_kernel(series_kernel, capsys):
    r = run_cli(capsys, "caps", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["kernel"] == "7.3.4"
    assert doc["lu_abi"]["status"] == "lu-v2" and doc["lu_abi"]["supported"] is True
    ioctls = {e["name"]: e for e in doc["iommufd"]["ioctls"]}
    assert len(ioctls) >= 20
    assert ioctls["IOMMU_IOAS_MAP_FILE"]["status"] == "known"
    assert ioctls["IOMMU_IOAS_MAP_FILE"]["errno"] == "EINVAL"
    assert ioctls["IOMMU_IOAS_NOIOMMU_GET_PA"]["status"] == "shadowed"
    assert all(e["status"] == "known" for n, e in ioctls.items() if n != "IOMMU_IOAS_NOIOMMU_GET_PA")
    luo = {e["name"]: e for e in doc["luo"]["ioctls"]}
    assert luo["LIVEUPDATE_IOCTL_CREATE_SESSION"]["status"] == "known"
    assert luo["LIVEUPDATE_IOCTL_RETRIEVE_SESSION"]["status"] == "known"
    assert luo["LIVEUPDATE_SESSION_FINISH"]["status"].startswith("not probed")


def test_caps_stock_kernel(fake_kernel, capsys):
    r = run_cli(capsys, "caps", "--json")
    assert r.code == 0
    doc = json.loads(r.out)
    assert doc["lu_abi"]["status"] == "foreign" and doc["lu_abi"]["supported"] is False
    ioctls = {e["name"]: e for e in doc["iommufd"]["ioctls"]}
    assert ioctls["IOMMU_IOAS_NOIOMMU_GET_PA"]["status"] == "known"
    assert "shared" in ioctls["IOMMU_IOAS_NOIOMMU_GET_PA"]["note"]


def test_caps_is_side_effect_free(series_kernel, capsys):
    before = dict(series_kernel.known_fds())
    assert run_cli(capsys, "caps").code == 0
    assert series_kernel.known_fds() == before       # every fd it opened is closed again
    fd = series_kernel.open("/dev/liveupdate")       # and nothing holds /dev/liveupdate
    series_kernel.close(fd)


def test_caps_table(series_kernel, capsys):
    r = run_cli(capsys, "caps")
    assert r.code == 0
    assert r.out.splitlines()[0] == "kernel 7.3.4"
    assert r.out.splitlines()[1].split() == ["IOCTL", "NR", "STATUS", "NOTE"]
    assert any(ln.startswith("IOMMU_HWPT_LU_* (LU ABI)") and "lu-v2" in ln for ln in r.out.splitlines())


def test_caps_liveupdate_held(series_kernel, capsys):
    fd = series_kernel.open("/dev/liveupdate")
    try:
        r = run_cli(capsys, "caps", "--json")
    finally:
        series_kernel.close(fd)
    assert r.code == 0
    doc = json.loads(r.out)
    assert doc["luo"]["open"] == "EBUSY"
    assert os.getpid() in doc["luo"]["held_by"]
    assert all(e["status"] == "not probed" for e in doc["luo"]["ioctls"])
    assert doc["lu_abi"]["status"] == "lu-v2"        # iommufd is still probed


def test_caps_not_root_exit_6(capsys):
    with FakeKernel(lu_abi="lu-v2", euid=1000) as k, use(k):
        r = run_cli(capsys, "caps")
    assert r.code == 6
    [err] = r.err.splitlines()
    assert err.startswith("pyiommufd: error: cannot open /dev/iommu: permission denied")


@pytest.mark.parametrize("lu_abi", [None, "lu-v1", "lu-v2"])
def test_caps_agrees_with_doctor(capsys, lu_abi):
    with FakeKernel(lu_abi=lu_abi) as k, use(k):
        caps = json.loads(run_cli(capsys, "caps", "--json").out)
        c = checks_of(run_cli(capsys, "doctor", "--json"))
    assert c["LU ABI"]["value"].startswith(caps["lu_abi"]["status"])


# -- the configured LU nr ($PYIOMMUFD_LU_NR) ----------------------------------------------------

def test_doctor_and_caps_probe_the_configured_nr(capsys, monkeypatch):
    """A kernel that moved the LU ioctl to 0x96 (the series rebased on 7.3): with
    PYIOMMUFD_LU_NR=0x96 both commands find lu-v1 there; without it they probe
    0x95, which is 7.3's NOIOMMU_GET_PA, and say so."""
    with FakeKernel(lu_abi="lu-v1", lu_nr=0x96) as k, use(k):
        monkeypatch.delenv("PYIOMMUFD_LU_NR", raising=False)
        caps = json.loads(run_cli(capsys, "caps", "--json").out)
        assert caps["lu_abi"]["nr"] == "0x95" and caps["lu_abi"]["status"] == "foreign"
        lu = checks_of(run_cli(capsys, "doctor", "--json"))["LU ABI"]
        assert lu["value"] == "foreign at nr 0x95"
        assert "PYIOMMUFD_LU_NR" in lu["hint"] and "NOIOMMU_GET_PA" in lu["hint"]

        monkeypatch.setenv("PYIOMMUFD_LU_NR", "0x96")
        caps = json.loads(run_cli(capsys, "caps", "--json").out)
        assert caps["lu_abi"]["nr"] == "0x96" and caps["lu_abi"]["status"] == "lu-v1"
        ioctls = {e["name"]: e for e in caps["iommufd"]["ioctls"]}
        assert ioctls["IOMMU_IOAS_NOIOMMU_GET_PA"]["status"] == "known"   # 0x95 is 7.3's again
        lu = checks_of(run_cli(capsys, "doctor", "--json"))["LU ABI"]
        assert lu["status"] == "ok" and lu["value"] == "lu-v1 at nr 0x96"


def test_a_bad_configured_nr_is_one_error_line(capsys, monkeypatch, series_kernel):
    monkeypatch.setenv("PYIOMMUFD_LU_NR", "banana")
    for cmd in ("caps", "doctor"):
        r = run_cli(capsys, cmd)
        assert r.code == 2, (cmd, r.err)
        assert r.err.strip() == "pyiommufd: error: $PYIOMMUFD_LU_NR: not an ioctl nr: 'banana' (use e.g. 0x96)"
