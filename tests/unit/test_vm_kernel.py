"""Host-side tests of pyiommufd.vm.kernel: cache key, config checks, cache hits."""
from __future__ import annotations

import hashlib
import struct

import pytest

from pyiommufd.vm import debian, kernel


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYIOMMUFD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_key_is_version_and_fragment_hash():
    text = kernel.fragment_text()
    key = kernel.cache_key()
    assert key == f"{debian.LINUX_PACKAGE_VERSION}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    digest = hashlib.sha256(b"CONFIG_A=y\n").hexdigest()[:12]
    assert kernel.cache_key("CONFIG_A=y\n", "1.0") == f"1.0-{digest}"
    assert kernel.cache_key("CONFIG_A=y\n") != kernel.cache_key("CONFIG_A=n\n")


def test_kernel_dir_is_under_the_cache(cache):
    assert kernel.kernel_dir() == cache / "kernels" / kernel.cache_key()


def test_parse_config_reads_set_and_unset_lines():
    cfg = kernel.parse_config("# comment\nCONFIG_A=y\nCONFIG_B=\"x y\"\n# CONFIG_C is not set\n"
                              "CONFIG_D=m\n")
    assert cfg == {"CONFIG_A": "y", "CONFIG_B": '"x y"', "CONFIG_C": "n", "CONFIG_D": "m"}


def test_missing_options_lists_what_did_not_survive():
    frag = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_MODULES is not set\nCONFIG_C=y\n"
    config = "CONFIG_A=y\nCONFIG_B=m\nCONFIG_MODULES=y\n"
    assert kernel.missing_options(frag, config) == [
        "CONFIG_B=y (got m)", "CONFIG_MODULES=n (got y)", "CONFIG_C=y (got not set)"]
    assert kernel.missing_options(frag, "CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=y\n") == []


def test_fragment_asks_for_the_live_update_options():
    want = kernel.parse_config(kernel.fragment_text())
    for opt in ("CONFIG_IOMMUFD", "CONFIG_VFIO_DEVICE_CDEV", "CONFIG_INTEL_IOMMU",
                "CONFIG_IRQ_REMAP", "CONFIG_KEXEC_HANDOVER", "CONFIG_LIVEUPDATE",
                "CONFIG_LIVEUPDATE_MEMFD", "CONFIG_9P_FS", "CONFIG_IKCONFIG_PROC"):
        assert want[opt] == "y", opt
    assert want["CONFIG_MODULES"] == "n"


def _fake_bzimage(path, release="7.3.4-test"):
    data = bytearray(0x4000)
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x20E, 0x1000)            # string at 0x1000 + 0x200
    version = f"{release} (root@vm) #1 SMP".encode() + b"\0"
    data[0x1200:0x1200 + len(version)] = version
    path.write_bytes(bytes(data))
    return path


def test_bzimage_release_reads_the_setup_header(tmp_path):
    img = _fake_bzimage(tmp_path / "bzImage")
    assert kernel.bzimage_release(img) == "7.3.4-test"
    (tmp_path / "junk").write_bytes(b"\0" * 1024)
    assert kernel.bzimage_release(tmp_path / "junk") is None
    assert kernel.bzimage_release(tmp_path / "missing") is None


def test_cache_hit_needs_image_config_and_release(cache):
    assert kernel.cached_kernel() is None
    d = kernel.kernel_dir()
    d.mkdir(parents=True)
    _fake_bzimage(d / "bzImage")
    (d / "config").write_text("CONFIG_A=y\n")
    assert kernel.cached_kernel() is None          # no release file yet: a build in progress
    (d / "release").write_text("7.3.4-test\n")
    hit = kernel.cached_kernel()
    assert hit is not None and hit.origin == "cache" and hit.release == "7.3.4-test"
    assert hit.bzimage == d / "bzImage" and hit.key == kernel.cache_key()
    # build_kernel() returns the hit without running anything
    assert kernel.build_kernel(progress=pytest.fail) == hit


def test_user_kernel_skips_the_build(tmp_path):
    img = _fake_bzimage(tmp_path / "bzImage", "7.3.4-lu-series")
    (tmp_path / ".config").write_text("CONFIG_A=y\n")
    k = kernel.resolve_kernel(img, progress=pytest.fail)
    assert k.origin == "user" and k.release == "7.3.4-lu-series" and k.config == tmp_path / ".config"
    with pytest.raises(kernel.KernelBuildError, match="no such file"):
        kernel.user_kernel(tmp_path / "nope")
