"""Tier markers come from the directory: tests/unit -> unit, tests/conformance ->
conformance, tests/vm -> vm. Cross-check tests mark each parameter themselves."""
from pathlib import Path

import pytest

_TIERS = {"unit": "unit", "conformance": "conformance", "vm": "vm"}


def pytest_collection_modifyitems(config, items):
    root = Path(__file__).parent
    for item in items:
        try:
            tier = Path(item.fspath).relative_to(root).parts[0]
        except ValueError:
            continue
        marker = _TIERS.get(tier)
        if marker and not item.get_closest_marker(marker):
            item.add_marker(getattr(pytest.mark, marker))
        if item.get_closest_marker("pyiommufd_vm") and not item.get_closest_marker("vm"):
            item.add_marker(pytest.mark.vm)          # the tier, for -m vm
        elif marker == "vm":
            item.add_marker(pytest.mark.pyiommufd_vm)  # what the VM plugin acts on
