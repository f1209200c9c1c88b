"""The seed selftest (``iommufd_liveupdate``, seed-spec 3.3) on stock Linux 7.3
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


LACKING_IOMMUFD = ("kernel lacks an iommufd live-update handler "
                   "(ENOENT from LIVEUPDATE_SESSION_PRESERVE_FD)")
LACKING_VFIO = ("kernel lacks a vfio-pci live-update handler "
                "(ENOENT from LIVEUPDATE_SESSION_PRESERVE_FD)")

#: stage 1 up to the mark, on every kernel: (step name, status, errno)
COMMON = [
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
]
#: the plan's steps a run that stops at "preserve iommufd" or "preserve cdev" never reaches
AFTER_CDEV = ["close the session (unpreserves everything)", "create session again",
              "preserve memfd again", "preserve iommufd again", "preserve cdev again"]
#: the last steps when everything is there
VFIO_HANDLER = [
    ("preserve cdev", "PASS", None),
    ("close the session (unpreserves everything)", "PASS", None),
    ("create session 'iommufd-test' again", "PASS", None),
    ("preserve memfd again", "PASS", None),
    ("preserve iommufd again", "PASS", None),
    ("preserve cdev again", "PASS", None),
]


def expected_stage1(caps, cdev: str) -> tuple[list[tuple[str, str, int | None]], str, str | None]:
    """The steps, result and lacking text that follow from what the kernel has.
    An ordering check is an XFAIL only where the kernel has the handler for that
    file kind; LUO's ENOENT without one proves nothing and is a SKIP."""
    steps = list(COMMON)
    order = [("preserve cdev before its iommufd", "XFAIL" if caps.vfio_handler else "SKIP", E.ENOENT),
             ("preserve iommufd before its memfd", "XFAIL" if caps.series else "SKIP", E.ENOENT)]
    if not caps.series:
        return ([*steps, ("mark HWPT for preservation", "SKIP", None), *order,
                 ("preserve memfd", "PASS", None), ("preserve iommufd", "SKIP", E.ENOENT),
                 ("preserve cdev", "SKIP", None), *[(n, "SKIP", None) for n in AFTER_CDEV]],
                "unsupported", LACKING_IOMMUFD)
    mark = f"{caps.lu_abi.ioctl_name} token 0x789012 ({caps.lu_abi.name})"
    steps += [(mark, "PASS", None), *order, ("preserve memfd", "PASS", None),
              ("preserve iommufd", "PASS", None)]
    if caps.vfio_handler:
        return [*steps, *VFIO_HANDLER], "pass", None
    return ([*steps, ("preserve cdev", "SKIP", E.ENOENT), *[(n, "SKIP", None) for n in AFTER_CDEV]],
            "unsupported", LACKING_VFIO)


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


def test_seed_selftest_stage1_follows_the_kernels_capabilities(vfio_device, kernel_caps):
    """Stage 1 runs up to the first thing this kernel lacks and says what that
    is; with every handler it passes. Either way, after closing, nothing is left
    open or preserved."""
    from pyiommufd import selftest

    steps, result, lacking = expected_stage1(kernel_caps, vfio_device.cdev)
    print(kernel_caps.describe())
    before = _my_fds()
    streamed = []
    report = selftest.run(vfio_device.cdev, on_step=streamed.append)
    for step in report.steps:
        print(selftest.format_step_ktap(step))
    print(selftest.summary_line(report))
    print(selftest.totals_line(report))

    assert streamed == report.steps, "every step is reported as it completes"
    got = [(s.name, s.status, s.errno) for s in report.steps]
    assert got == [(name.format(cdev=vfio_device.cdev), st, err) for name, st, err in steps]
    assert report.stage == 1 and report.result == result and report.lacking == lacking
    if lacking:
        assert report.steps[report.stopped_at - 1].detail == lacking and report.handles is None
        assert all(s.detail.startswith("not run: ") for s in report.steps[report.stopped_at:])
    if not kernel_caps.series:
        mark = report.steps[13]
        assert mark.detail.startswith("kernel lacks IOMMU_HWPT_LU_SET_PRESERVE/MARK_PRESERVE at nr "
                                      f"{kernel_caps.lu_nr:#x}"), mark
        assert report.lu_abi is None
    else:
        assert report.lu_abi == kernel_caps.lu_abi.name
    for step in report.steps[14:16]:
        prefix = "ENOENT: " if step.status == "XFAIL" else "order not tested: got ENOENT"
        assert step.detail.startswith(prefix), step
    report.close()      # a passing stage 1 holds its files: closing unpreserves them

    # nothing left open by the run, nothing left preserved
    assert _my_fds() == before
    _nothing_preserved(vfio_device.cdev)
    counts = report.as_dict()["counts"]
    print(f"selftest.run({vfio_device.cdev}): {counts}, result {result}; no fd leaked, "
          "nothing preserved")

    # the same through the command, by BDF
    proc = subprocess.run(_cli() + ["selftest", vfio_device.bdf, "--json", "--no-hold"],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    print(f"$ pyiommufd selftest {vfio_device.bdf} --json --no-hold -> exit {proc.returncode}")
    assert proc.returncode == (4 if lacking else 0), (proc.stdout, proc.stderr)
    out = json.loads(proc.stdout)
    assert out["result"] == result and out["lacking"] == lacking and out["stage"] == 1
    assert out["device"] == vfio_device.cdev and out["session"] == "iommufd-test"
    assert [(s["name"], s["status"], s["errno"]) for s in out["steps"]] == got
    assert out["counts"] == counts
    if lacking:
        assert out["after"] is None
        assert proc.stderr.strip() == f"pyiommufd: error: {lacking}"
    else:
        assert out["after"] == "closed"
    _nothing_preserved(vfio_device.cdev)
    print("pyiommufd selftest --json: same steps and exit code; nothing preserved after it")
