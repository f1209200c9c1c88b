"""Run in the guest by test_fail_nth_oops.py: the fail-nth driver over one flow
that preserves an iommufd (argv[1]: ``selftest``, the selftest's stage 1, or
``preserve``, a plain preserve into a session). Prints ``no iommufd handler``
and exits 0 on a kernel without the series' handler; else the summary, exit 0
only without failures."""
from __future__ import annotations

import errno
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "vm"))

import fail_nth as F  # noqa: E402

from pyiommufd import errors, selftest  # noqa: E402
from pyiommufd.iommufd import IOMMUFD  # noqa: E402
from pyiommufd.luo import LiveUpdate  # noqa: E402
from pyiommufd.pci import PciDevice, list_devices  # noqa: E402

VIRTIO_VENDOR, NETWORK_CLASS = 0x1AF4, 0x02


class SelftestStepFailed(errors.PyiommufdError):
    """A selftest step failed with the kernel's errno: the selftest's typed outcome."""


def selftest_stage1(cdev: str) -> selftest.Report:
    report = selftest.run(cdev)
    if report.result == "fail":
        step = next(s for s in report.steps if s.status == "FAIL")
        if step.errno is None:
            raise RuntimeError(f"selftest step {step.index} {step.name!r} failed without an errno: "
                               f"{step.detail}")
        raise SelftestStepFailed(f"step {step.index} {step.name!r}: {step.errname}")
    return report


def close_handles(_state: object, report: object) -> None:
    handles = getattr(report, "handles", None)
    if handles is not None:
        handles.close()


def main(flow_name: str) -> int:
    lu = LiveUpdate.open()
    iommufd = IOMMUFD.open()
    try:
        with lu.create_session("oops-probe") as session:
            session.preserve(iommufd, 1)
    except errors.KernelError as exc:
        if exc.errno == errno.ENOENT:
            print("no iommufd handler")
            return 0
        raise
    if flow_name == "selftest":
        bdf = next(d.bdf for d in list_devices()
                   if d.vendor == VIRTIO_VENDOR and (d.class_code or 0) >> 16 == NETWORK_CLASS)
        cdev = PciDevice(bdf).bind_vfio().vfio_cdev
        lu.close()                  # the selftest opens /dev/liveupdate itself
        flow = F.Flow("selftest stage 1", lambda _: selftest_stage1(cdev), cleanup=close_handles)
    else:
        counter = iter(range(1 << 30))
        flow = F.Flow("preserve iommufd", lambda s: s.preserve(iommufd, 1),
                      lambda: lu.create_session(f"oops-{next(counter)}"), lambda s, result: s.close())
    old = F.configure_kernel()
    driver = F.Driver(F.KernelLog(), F.FailNth())
    try:
        result = driver.run(flow)
    finally:
        F.restore_kernel(old)
    print(F.summary(driver.results), flush=True)
    return 0 if result.completed and not result.failures else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
