"""Cross-check: each test here runs against the fake kernel (tier unit, on the
host) and against the real Linux 7.3 kernel (tier vm, in the QEMU guest). Any
disagreement is a bug in the fake (pyiommufd_testing)."""
from dataclasses import dataclass

import pytest

from pyiommufd import backend as backend_mod


@dataclass
class Kernel:
    name: str
    backend: backend_mod.Backend


@pytest.fixture(params=[pytest.param("fake", marks=pytest.mark.unit),
                        pytest.param("real", marks=pytest.mark.pyiommufd_vm)])
def kernel(request):
    if request.param == "fake":
        from pyiommufd_testing import FakeKernel

        fake = FakeKernel()
        with backend_mod.use(fake):
            yield Kernel("fake", fake)
        fake.shutdown()
    else:
        real = backend_mod.LinuxBackend()
        with backend_mod.use(real):
            yield Kernel("real", real)


# -- the cross-check summary: every rule with its outcome on each kernel -----------------------
# side -> {rule -> outcome}; a side is a fake flavour ("fake", "fake-stock",
# "fake-series") or "real@<kernel>" for each kernel of the vm tier.
_OUTCOMES: dict[str, dict[str, str]] = {}
_FAKE_SIDES = ("fake-series", "fake-stock", "fake")


def _first_vm_kernel(config) -> str:
    host = config.pluginmanager.get_plugin("pyiommufd-vm-host")
    targets = getattr(host, "targets", None)
    return targets[0].name if targets else "vm"


def _rule_and_side(nodeid: str, first_kernel: str) -> tuple[str, str] | None:
    if "/crosscheck/" not in nodeid or "[" not in nodeid:
        return None
    from pyiommufd_testing.pytest_plugin import split_target

    nodeid, kernel = split_target(nodeid)
    kernel = kernel or first_kernel
    if "[" not in nodeid:
        return None
    base, params = nodeid[:-1].split("[", 1)
    for side in ("real",) + _FAKE_SIDES:
        if params == side or params.startswith(side + "-"):
            rest = params[len(side) + 1:]
            base = base.split("/crosscheck/", 1)[1]
            rule = f"{base}[{rest}]" if rest else base
            return rule, (f"real@{kernel}" if side == "real" else side)
    return None


def pytest_runtest_logreport(report):
    key = _rule_and_side(report.nodeid, _KERNEL[0])
    if key is None or (report.when != "call" and report.outcome == "passed"):
        return
    rule, side = key
    _OUTCOMES.setdefault(rule, {})[side] = report.outcome


_KERNEL = ["vm"]


def pytest_collection_finish(session):
    _KERNEL[0] = _first_vm_kernel(session.config)


def _short(outcome: str | None) -> str:
    return {"passed": "pass", "failed": "FAIL", "skipped": "skip", None: "-"}.get(outcome, outcome)


def pytest_terminal_summary(terminalreporter):
    if not _OUTCOMES:
        return
    sides = [s for s in _FAKE_SIDES[::-1] if any(s in o for o in _OUTCOMES.values())]
    sides += sorted({s for o in _OUTCOMES.values() for s in o if s.startswith("real@")})
    # a side whose VM never ran reports its tests skipped: shown, but no verdict
    ran = {r: {s: v for s, v in o.items() if v != "skipped"} for r, o in _OUTCOMES.items()}
    everywhere = [r for r, o in ran.items() if o and all(v == "passed" for v in o.values())]
    real_sides = [s for s in sides if s.startswith("real@")
                  and any(o.get(s) not in (None, "skipped") for o in _OUTCOMES.values())]
    tr = terminalreporter
    tr.section("cross-check: the fake kernel vs the real kernels")
    tr.write_line(f"{len(_OUTCOMES)} rules on {', '.join(sides)}; {len(everywhere)} passed on every "
                  "side they ran on")
    if not real_sides:
        tr.write_line("  no real kernel (vm tier) ran: nothing was cross-checked", red=True, bold=True)
    width = max(len(r) for r in _OUTCOMES)
    tr.write_line("  " + "rule".ljust(width) + "  " + "  ".join(s.ljust(11) for s in sides))
    for side in sides:
        if side.startswith("real@") and side not in real_sides:
            tr.write_line(f"  {side}: this kernel's VM did not run; its column is not a cross-check",
                          red=True, bold=True)
    for rule in sorted(_OUTCOMES):
        outcome = _OUTCOMES[rule]
        row = "  ".join(_short(outcome.get(s)).ljust(11) for s in sides)
        bad = any(v != "passed" for v in ran[rule].values())
        tr.write_line(f"  {rule.ljust(width)}  {row}", red=bad)
    apart = sorted(r for r in _OUTCOMES if r not in everywhere)
    if apart:
        tr.write_line(f"{len(apart)} rule(s) disagree: " + ", ".join(apart), red=True, bold=True)


# -- the device both worlds have: used by the iommufd rules and the raw-layer cases --------------
VIRTIO_NET = (0x1AF4, 0x1041)


@pytest.fixture
def virtio_net(kernel):
    """The first virtio-net (1af4:1041) function, bound to vfio-pci; back on
    its driver afterwards."""
    from pyiommufd import pci

    found = [d for d in pci.list_devices() if (d.vendor, d.device) == VIRTIO_NET]
    if not found:
        pytest.fail(f"no {VIRTIO_NET[0]:04x}:{VIRTIO_NET[1]:04x} PCI function in this kernel")
    binding = pci.PciDevice(found[0].bdf).bind_vfio()
    yield binding
    binding.restore()


@pytest.fixture
def device(virtio_net):
    """The virtio-net's VFIO cdev, open (closed before the driver is restored:
    the real kernel blocks an unbind while a cdev is open)."""
    from pyiommufd.vfio import VfioDevice

    dev = VfioDevice.open(virtio_net.vfio_cdev)
    yield dev
    dev.close()
