"""User documentation: a current page per command, and no citation of a
document users do not have."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = "seed-spec"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_command_docs", ROOT / "tools" / "gen_command_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_pages_are_current():
    assert _generator().stale() == [], "run tools/gen_command_docs.py"


def test_every_visible_command_has_a_page():
    gen = _generator()
    names = {"-".join(path) for path, _ in gen._commands(__import__("pyiommufd.cli").cli.cli)}
    assert {"bind", "unbind", "vm-run", "vm-selftest", "selftest", "restore"} <= names
    assert all((ROOT / "docs" / "commands" / f"{n}.md").is_file() for n in names)


@pytest.mark.parametrize("path", ["README.md", *sorted(str(p.relative_to(ROOT))
                                                        for p in (ROOT / "docs").rglob("*.md"))])
def test_docs_cite_no_private_document(path):
    assert FORBIDDEN not in (ROOT / path).read_text()


def test_hints_and_plan_problems_cite_no_private_document():
    from pyiommufd import errors, planner

    texts = [h for h in errors.HINTS.values() if isinstance(h, str)]
    texts += [h({}) or "" for h in errors.HINTS.values() if callable(h)]
    assert texts and not [t for t in texts if FORBIDDEN in t]
    problem = planner.Problem("error", "x", "message", "where", "4.4, 4.5")
    assert problem.describe() == ("where: message (the series' patch 11/14, iommufd preservation; "
                                  "the series' patches 12-13/14, VFIO cdev preservation)")


def test_user_guides_exist():
    guide = (ROOT / "docs" / "testing-your-kernel.md").read_text()
    assert "pyiommufd vm build-kernel --patch" in guide and "pyiommufd vm selftest" in guide
    plan_format = (ROOT / "docs" / "plan-format.md").read_text()
    for key in ("session", "lu_abi", "[[memfd]]", "[[iommufd]]", "[[device]]", "mappings", "lu_token"):
        assert key in plan_format, key
