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


# -- kernels from a base plus patches --------------------------------------------------------

TREE = {
    "Makefile": "all:\n",
    "drivers/iommu/Kconfig": "config IOMMU_SUPPORT\n\tbool\n",
    "drivers/iommu/a.c": "".join(f"line {n}\n" for n in range(1, 21)),
}


def _tree(root):
    for rel, text in TREE.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _patch(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(body)
    return path


GOOD = """a header paragraph, as a posted patch has
diff --git a/drivers/iommu/a.c b/drivers/iommu/a.c
--- a/drivers/iommu/a.c
+++ b/drivers/iommu/a.c
@@ -9,7 +9,7 @@
 line 9
 line 10
 line 11
-line 12
+line twelve
 line 13
 line 14
 line 15
diff --git a/drivers/iommu/Kconfig b/drivers/iommu/Kconfig
--- a/drivers/iommu/Kconfig
+++ b/drivers/iommu/Kconfig
@@ -1,2 +1,5 @@
 config IOMMU_SUPPORT
 \tbool
+
+config IOMMU_LIVEUPDATE
+\tbool "live update"
"""

# the same change, but its context only matches with fuzz (line 11 changed)
FUZZY = GOOD.replace(" line 11\n-line 12", " line eleven\n-line 12").split("diff --git a/drivers/iommu/Kconfig")[0]


def test_patches_apply_to_a_copy_and_never_touch_the_pristine_tree(tmp_path):
    pristine = _tree(tmp_path / "pristine")
    patch = _patch(tmp_path, "good.patch", GOOD)
    out = kernel.prepare_tree(pristine, tmp_path / "key" / "src", [patch], tmp_path / "log")
    assert "line twelve\n" in (out / "drivers/iommu/a.c").read_text()
    assert kernel.tree_has_option(out, "IOMMU_LIVEUPDATE")
    assert (pristine / "drivers/iommu/a.c").read_text() == TREE["drivers/iommu/a.c"]
    assert (pristine / "drivers/iommu/Kconfig").read_text() == TREE["drivers/iommu/Kconfig"]
    assert not kernel.tree_has_option(pristine, "IOMMU_LIVEUPDATE")
    # unpatched files stay hard links to the pristine tree (cheap copies)
    assert (out / "Makefile").stat().st_ino == (pristine / "Makefile").stat().st_ino
    assert (out / "drivers/iommu/a.c").stat().st_ino != (pristine / "drivers/iommu/a.c").stat().st_ino


def test_a_patch_that_needs_fuzz_is_refused_naming_the_hunk(tmp_path):
    pristine = _tree(tmp_path / "pristine")
    bad = _patch(tmp_path, "fuzzy.patch", FUZZY)
    with pytest.raises(kernel.PatchError) as info:
        kernel.prepare_tree(pristine, tmp_path / "key" / "src", [bad], tmp_path / "log")
    assert info.value.patch == bad
    assert info.value.rejects == [("drivers/iommu/a.c", "hunk #1 at line 9")]
    assert "fuzzy.patch does not apply to the pristine 7.3 tree without fuzz: " \
           "drivers/iommu/a.c: hunk #1 at line 9" in str(info.value)
    assert not (tmp_path / "key" / "src").exists()                   # nothing half-patched
    assert (pristine / "drivers/iommu/a.c").read_text() == TREE["drivers/iommu/a.c"]


def test_patches_apply_in_order(tmp_path):
    pristine = _tree(tmp_path / "pristine")
    first = _patch(tmp_path, "1.patch", GOOD)
    second = _patch(tmp_path, "2.patch", GOOD.split("diff --git a/drivers/iommu/Kconfig")[0]
                    .replace("-line 12\n+line twelve", "-line twelve\n+line XII"))
    out = kernel.prepare_tree(pristine, tmp_path / "src", [first, second], tmp_path / "log")
    assert "line XII\n" in (out / "drivers/iommu/a.c").read_text()
    with pytest.raises(kernel.PatchError):       # the other order does not apply
        kernel.prepare_tree(pristine, tmp_path / "src2", [second, first], tmp_path / "log")


def test_rejected_hunks_reads_patch_output():
    out = ("checking file drivers/a.c\nHunk #2 FAILED at 120.\nHunk #3 succeeded at 200 with fuzz 2.\n"
           "checking file include/b.h\ncan't find file to patch at input line 40\n")
    assert kernel.rejected_hunks(out) == [("drivers/a.c", "hunk #2 at line 120"),
                                          ("drivers/a.c", "hunk #3 at line 200"),
                                          ("include/b.h", "the file is not in the tree")]


def test_cache_key_carries_the_patches_and_the_option_they_add(tmp_path):
    good = _patch(tmp_path, "good.patch", GOOD)
    other = _patch(tmp_path, "other.patch", GOOD.replace("twelve", "XII"))
    stock = kernel.cache_key()
    with_good = kernel.cache_key(recipe=kernel.KernelRecipe.of([good]))
    assert with_good.startswith(debian.LINUX_PACKAGE_VERSION + "-") and "-p" in with_good
    # the config part differs too: the patch adds IOMMU_LIVEUPDATE, which the build turns on
    assert with_good.split("-p")[0] != stock
    assert kernel.cache_key(recipe=kernel.KernelRecipe.of([other])) != with_good
    assert kernel.cache_key(recipe=kernel.KernelRecipe.of([good, other])) != \
        kernel.cache_key(recipe=kernel.KernelRecipe.of([other, good]))
    assert kernel.KernelRecipe.of([good]).label("7.3.4-1~bpo13+1") == "7.3.4 + good.patch"


def test_config_text_adds_the_series_option_only_when_the_tree_has_it(tmp_path):
    pristine = _tree(tmp_path / "pristine")
    assert "CONFIG_IOMMU_LIVEUPDATE=y" not in kernel.config_text(kernel.STOCK, pristine)
    out = kernel.prepare_tree(pristine, tmp_path / "src", [_patch(tmp_path, "g.patch", GOOD)],
                              tmp_path / "log")
    frag = _patch(tmp_path, "extra.config", "CONFIG_EXTRA=y\n")
    text = kernel.config_text(kernel.KernelRecipe.of([], [frag]), out)
    assert "CONFIG_IOMMU_LIVEUPDATE=y\n" in text and text.rstrip().endswith("CONFIG_EXTRA=y")
    assert kernel.parse_config(text)["CONFIG_IOMMUFD"] == "y"


def test_recipe_of_missing_files_is_a_clear_error(tmp_path):
    with pytest.raises(kernel.KernelBuildError, match="--patch /nonexistent.patch: no such file"):
        kernel.KernelRecipe.of(["/nonexistent.patch"])
    with pytest.raises(kernel.KernelBuildError, match="--config nope.config: no such file"):
        kernel.KernelRecipe.of([], ["nope.config"])


def test_waiting_for_the_build_lock_says_who_holds_it_and_gives_up(tmp_path):
    import multiprocessing

    lock = tmp_path / "k.lock"
    held, release = multiprocessing.Event(), multiprocessing.Event()

    def holder():
        with kernel._locked(lock, "building kernel X", progress=lambda _m: None):
            held.set()
            release.wait(30)

    proc = multiprocessing.Process(target=holder)
    proc.start()
    try:
        assert held.wait(30)
        said = []
        with pytest.raises(kernel.KernelBuildError) as info:
            with kernel._locked(lock, "me", progress=said.append, timeout=0.3, poll=0.1,
                                report_every=0.2):
                pass
        assert f"held by pid {proc.pid} (building kernel X, for " in str(info.value)
        assert "gave up after 0s waiting for" in str(info.value)
        assert said and said[0].startswith(f"[kernel] waiting for k.lock: held by pid {proc.pid} "
                                           "(building kernel X, for ")
    finally:
        release.set()
        proc.join(30)
    with kernel._locked(lock, "me", progress=pytest.fail, timeout=1):
        pass                                             # free again once the holder is done


def test_a_tree_patched_the_same_way_is_reused(tmp_path):
    pristine = _tree(tmp_path / "pristine")
    patch = _patch(tmp_path, "good.patch", GOOD)
    out = kernel.prepare_tree(pristine, tmp_path / "src", [patch], tmp_path / "log")
    marker = out / "build-output-kept"
    marker.write_text("x")
    assert kernel.prepare_tree(pristine, tmp_path / "src", [patch], tmp_path / "log") == out
    assert marker.exists()
    patch.write_text(GOOD.replace("twelve", "XII"))        # other patches: a fresh tree
    kernel.prepare_tree(pristine, tmp_path / "src", [patch], tmp_path / "log")
    assert not marker.exists() and "line XII\n" in (out / "drivers/iommu/a.c").read_text()


def test_the_lu_nr_comes_from_the_trees_uapi_header(tmp_path):
    tree = _tree(tmp_path / "t")
    assert kernel.tree_lu_nr(tree) is None
    uapi = tree / "include/uapi/linux/iommufd.h"
    uapi.parent.mkdir(parents=True)
    uapi.write_text("enum {\n\tIOMMUFD_CMD_IOAS_NOIOMMU_GET_PA = 0x95,\n"
                    "\tIOMMUFD_CMD_HWPT_LU_SET_PRESERVE = 0x96,\n};\n")
    assert kernel.tree_lu_nr(tree) == 0x96
    uapi.write_text("enum {\n\tIOMMUFD_CMD_HWPT_LU_MARK_PRESERVE = 0x95,\n};\n")
    assert kernel.tree_lu_nr(tree) == 0x95
