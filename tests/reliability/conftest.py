"""Reliability tests that need a VM for themselves (the kernel may oops, or the
test kexecs more than the plugin's one time), driven from the host like
``tests/seedflow/``, one VM run per kernel. Tier ``vm``."""
from __future__ import annotations


from pyiommufd_testing.host_vm import mark_as_vm_tier


def pytest_collection_modifyitems(config, items):
    mark_as_vm_tier(config, items, "reliability")
