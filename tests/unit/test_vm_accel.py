"""KVM only when a guest really boots with it (pyiommufd.vm.accel), with a fake
QEMU standing in for the real one."""
from __future__ import annotations

import json
import os
import stat

import pytest

from pyiommufd.vm import accel


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYIOMMUFD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(accel.ENV_ACCEL, raising=False)
    monkeypatch.setattr(accel, "kvm_openable", lambda path="/dev/kvm": None)
    return tmp_path / "cache"


def fake_qemu(tmp_path, body: str):
    """A QEMU that finds its -serial file:PATH argument and runs ``body``."""
    path = tmp_path / f"qemu-{abs(hash(body))}"
    path.write_text("#!/bin/sh\nfor a in \"$@\"; do case \"$a\" in file:*) S=${a#file:};; esac; done\n"
                    + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_guest_that_prints_its_banner_means_kvm_and_is_remembered(tmp_path, cache):
    booting = fake_qemu(tmp_path, 'echo "Linux version 7.3.4 (kvm)" > "$S"; sleep 30')
    accel_name, why = accel.choose(booting, "/k/bzImage")
    assert (accel_name, why) == ("kvm", "a guest booted under KVM")
    saved = json.loads((cache / "accel.json").read_text())
    assert saved["accel"] == "kvm" and saved["host"].startswith(os.uname().release)
    broken = fake_qemu(tmp_path, "exit 1")                 # another binary: probed again
    assert accel.choose(broken, "/k/bzImage")[0] == "tcg"


def test_a_crashing_or_silent_guest_means_tcg(tmp_path, cache):
    crashing = fake_qemu(tmp_path, 'echo "failed to set MSR 0x10a" >&2; exit 134')
    assert accel.probe_kvm(crashing, "/k", seconds=5).startswith("QEMU exited with 134: failed to set MSR")
    silent = fake_qemu(tmp_path, "sleep 30")
    assert accel.probe_kvm(silent, "/k", seconds=0.5) == \
        "no kernel banner on the serial console within 0s under KVM"
    name, why = accel.choose(crashing, "/k")
    assert name == "tcg" and why.startswith("KVM did not boot a guest: QEMU exited with 134: failed to set MSR")
    # the verdict is kept: a second choice does not boot anything
    name2, why2 = accel.choose(crashing, "/k")
    assert name2 == "tcg" and "(probed " in why2


def test_no_usable_dev_kvm_or_an_override_decides_without_a_probe(tmp_path, cache, monkeypatch):
    never = fake_qemu(tmp_path, "exit 99")
    monkeypatch.setattr(accel, "kvm_openable", lambda path="/dev/kvm": "/dev/kvm: No such file")
    assert accel.choose(never, "/k") == ("tcg", "/dev/kvm: No such file")
    monkeypatch.setenv(accel.ENV_ACCEL, "kvm")
    assert accel.choose(never, "/k") == ("kvm", "$PYIOMMUFD_VM_ACCEL=kvm")
    monkeypatch.setenv(accel.ENV_ACCEL, "fast")
    with pytest.raises(ValueError, match="must be kvm or tcg"):
        accel.choose(never, "/k")
    assert not (cache / "accel.json").exists()
