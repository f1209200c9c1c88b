"""Reliability tests that need a VM for themselves (the kernel may oops, or the
test kexecs more than the plugin's one time), driven from the host like
``tests/seedflow/``, one VM run per kernel. Tier ``vm``."""
from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/reliability/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.vm)
            if config.getoption("no_vm", False):
                item.add_marker(pytest.mark.skip(reason="--no-vm"))
