"""Cross-check: each test here runs against the fake kernel (tier unit, on the
host) and against the real Linux 7.3 kernel (tier vm, in the QEMU guest). Any
disagreement is a bug in the fake (pyiommufd.testing)."""
from dataclasses import dataclass

import pytest

from pyiommufd import backend as backend_mod


@dataclass
class Kernel:
    name: str
    backend: backend_mod.Backend


@pytest.fixture(params=[pytest.param("fake", marks=pytest.mark.unit),
                        pytest.param("real", marks=pytest.mark.vm)])
def kernel(request):
    if request.param == "fake":
        from pyiommufd.testing import FakeKernel

        fake = FakeKernel()
        with backend_mod.use(fake):
            yield Kernel("fake", fake)
        fake.shutdown()
    else:
        real = backend_mod.LinuxBackend()
        with backend_mod.use(real):
            yield Kernel("real", real)


# -- the cross-check summary: every rule with its fake and real outcome ---------------------
_OUTCOMES: dict[str, dict[str, str]] = {}


def _rule_and_side(nodeid: str) -> tuple[str, str] | None:
    if "/crosscheck/" not in nodeid or "[" not in nodeid:
        return None
    base, params = nodeid[:-1].split("[", 1)
    side, _, rest = params.partition("-")
    if side not in ("fake", "real"):
        return None
    return (f"{base}[{rest}]" if rest else base), side


def pytest_runtest_logreport(report):
    key = _rule_and_side(report.nodeid)
    if key is None or (report.when != "call" and report.outcome == "passed"):
        return
    rule, side = key
    if report.when == "call" or report.outcome != "passed":
        _OUTCOMES.setdefault(rule, {})[side] = report.outcome


def pytest_terminal_summary(terminalreporter):
    if not _OUTCOMES:
        return
    both = [r for r, o in _OUTCOMES.items() if o.get("fake") == "passed" and o.get("real") == "passed"]
    apart = {r: o for r, o in _OUTCOMES.items()
             if len(o) == 2 and o["fake"] != o["real"]}
    one_sided = {side: sum(1 for o in _OUTCOMES.values() if list(o) == [side]) for side in ("fake", "real")}
    tr = terminalreporter
    tr.section("cross-check: fake kernel vs real Linux 7.3")
    tr.write_line(f"{len(_OUTCOMES)} rules; {len(both)} passed on both the fake and the real kernel")
    for path in sorted({r.split("::")[0] for r in _OUTCOMES}):
        rules = [r for r in _OUTCOMES if r.startswith(path + "::")]
        agreed = [r for r in rules if r in both]
        tr.write_line(f"  {path}: {len(rules)} rules, {len(agreed)} on both")
    for side, count in one_sided.items():
        if count:
            other = "real kernel (vm tier)" if side == "fake" else "fake kernel (unit tier)"
            tr.write_line(f"  the {other} side did not run for {count} rules: not cross-checked")
    for rule, outcome in sorted(apart.items()):
        tr.write_line(f"  {rule}: fake {outcome.get('fake', 'not run')}, "
                      f"real {outcome.get('real', 'not run')}")
