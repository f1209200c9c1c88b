"""The seed selftest (the series' ``iommufd_liveupdate``) on stock Linux 7.3
with the guest's real VFIO cdev: it runs until the first step that needs the
series, says exactly what the kernel lacks, and leaves nothing preserved.

The test needs ``/dev/liveupdate`` for itself: it is a plain vm test, which
the guest runs before every kexec test of stage 1 (the plugin orders them
so), i.e. before anything opens the run's shared ``lu_stage.liveupdate``.
"""
from __future__ import annotations

import errno as E
import gzip
import json
import os
import subprocess
import sys

import pytest

LACKING = ("kernel lacks an iommufd live-update handler "
           "(ENOENT from LIVEUPDATE_SESSION_PRESERVE_FD)")

#: stage 1 on stock 7.3: (step name, status, errno)
EXPECTED = [
    ("open /dev/liveupdate", "PASS", None),
    ("retrieve session 'iommufd-test'", "PASS", None),
    ("create session 'iommufd-test'", "PASS", None),
    ("open /dev/iommu", "PASS", None),
    ("memfd_create with MFD_ALLOW_SEALING", "PASS", None),
    ("ftruncate memfd to 1 MiB", "PASS", None),
    ("seal memfd SEAL|GROW|SHRINK before mapping", "PASS", None),
    ("open VFIO cdev {cdev}", "PASS", None),
    ("VFIO_DEVICE_BIND_IOMMUFD", "PASS", None),
    ("IOMMU_IOAS_ALLOC", "PASS", None),
    ("IOMMU_HWPT_ALLOC", "PASS", None),
    ("VFIO_DEVICE_ATTACH_IOMMUFD_PT", "PASS", None),
    ("IOMMU_IOAS_MAP_FILE of the sealed memfd", "PASS", None),
    ("mark HWPT for preservation", "SKIP", None),
    # ENOENT without the handlers says nothing about the order: SKIP, not XFAIL
    ("preserve cdev before its iommufd", "SKIP", E.ENOENT),
    ("preserve iommufd before its memfd", "SKIP", E.ENOENT),
    ("preserve memfd", "PASS", None),
    ("preserve iommufd", "SKIP", E.ENOENT),
    # not run, so that the plan of 24 holds
    ("preserve cdev", "SKIP", None),
    ("close the session (unpreserves everything)", "SKIP", None),
    ("create session again", "SKIP", None),
    ("preserve memfd again", "SKIP", None),
    ("preserve iommufd again", "SKIP", None),
    ("preserve cdev again", "SKIP", None),
]
COUNTS = {"PASS": 14, "XFAIL": 0, "FAIL": 0, "SKIP": 10}


def _expected(cdev: str) -> list[tuple[str, str, int | None]]:
    return [(name.format(cdev=cdev), status, err) for name, status, err in EXPECTED]


def _config_has(option: str) -> bool:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return any(line.strip() == f"CONFIG_{option}=y" for line in f)
    except OSError:
        return False


def _cli() -> list[str]:
    """The installed console script next to the interpreter, else the CLI's main()."""
    script = os.path.join(os.path.dirname(sys.executable), "pyiommufd")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'pyiommufd'; "
            "from pyiommufd.cli import main; main()"]


def _my_fds() -> dict[int, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def _nothing_preserved(cdev: str) -> None:
    """/dev/liveupdate is free, the session name can be created again (closing
    the session removed it and unpreserved the memfd), and the device binds to
    a new iommufd (the selftest's iommufd is gone)."""
    from pyiommufd import luo
    from pyiommufd.backend import get_backend
    from pyiommufd.iommufd import IOMMUFD
    from pyiommufd.vfio import VfioDevice

    assert luo.holders_of(get_backend()) == [], "nobody holds /dev/liveupdate"
    with luo.LiveUpdate.open() as lu:
        assert lu.try_retrieve_session("iommufd-test") is None      # still stage 1
        lu.create_session("iommufd-test").close()
    with IOMMUFD.open() as iommufd, VfioDevice.open(cdev) as device:
        assert device.bind(iommufd) > 0


def test_seed_selftest_stops_where_stock_73_lacks_the_series(vfio_device, kernel_release):
    from pyiommufd import selftest

    if not kernel_release.startswith("7.3") or _config_has("IOMMU_LIVEUPDATE"):
        pytest.skip(f"expectations are for stock 7.3 (without the series), this is {kernel_release}")
    before = _my_fds()
    streamed = []
    report = selftest.run(vfio_device.cdev, on_step=streamed.append)
    for step in report.steps:
        print(selftest.format_step_ktap(step))
    print(selftest.summary_line(report))
    print(selftest.totals_line(report))

    assert streamed == report.steps, "every step is reported as it completes"
    got = [(s.name, s.status, s.errno) for s in report.steps]
    assert got == _expected(vfio_device.cdev)
    assert report.stage == 1
    assert report.result == "unsupported" and not report.passed
    assert report.lacking == LACKING
    assert report.steps[17].detail == LACKING
    mark = report.steps[13]
    assert mark.detail.startswith("kernel lacks IOMMU_HWPT_LU_SET_PRESERVE/MARK_PRESERVE at nr 0x95"), mark
    for step in report.steps[14:16]:
        assert step.detail.startswith("order not tested: got ENOENT"), step
    assert report.as_dict()["counts"] == COUNTS
    assert report.lu_abi is None and report.handles is None

    # nothing left open by the run, nothing left preserved
    assert _my_fds() == before
    _nothing_preserved(vfio_device.cdev)
    print(f"selftest.run({vfio_device.cdev}): 14 PASS, 10 SKIP (mark: no LU ioctl at 0x95; order "
          "checks: no handler; preserve iommufd: ENOENT; 6 not run), result unsupported; "
          "no fd leaked, nothing preserved")

    # the same through the command, by BDF
    proc = subprocess.run(_cli() + ["selftest", vfio_device.bdf, "--json"],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    print(f"$ pyiommufd selftest {vfio_device.bdf} --json -> exit {proc.returncode}")
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    out = json.loads(proc.stdout)
    assert out["result"] == "unsupported" and out["lacking"] == LACKING and out["stage"] == 1
    assert out["device"] == vfio_device.cdev and out["session"] == "iommufd-test"
    assert out["after"] is None
    assert [(s["name"], s["status"], s["errno"]) for s in out["steps"]] == got
    assert out["counts"] == COUNTS
    assert proc.stderr.strip() == f"pyiommufd: error: {LACKING}"
    _nothing_preserved(vfio_device.cdev)
    print("pyiommufd selftest --json: exit 4, same steps, one error line; nothing preserved after it")
