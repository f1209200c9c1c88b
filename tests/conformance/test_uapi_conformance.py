"""Our include-bindings/ against the real Linux 7.3 UAPI headers (see uapi_probe)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import uapi_probe
from pyiommufd import _uapi_build
from pyiommufd.ioctl import IO


def _report(title: str, items: list[str]) -> str:
    return f"{title} ({len(items)}):\n  " + "\n  ".join(items)


def test_layouts_and_constants_match_7_3(shipped_problems):
    assert not shipped_problems, _report(
        "include-bindings/ differs from the 7.3 UAPI / LU revisions", shipped_problems)


def test_every_7_3_item_is_declared(shipped, real_uapi):
    ffi, cdef = shipped
    missing = uapi_probe.missing_declarations(ffi, cdef, real_uapi)
    assert not missing, _report(
        "items of linux/{iommufd,vfio,liveupdate}.h 7.3 not declared in include-bindings/ "
        "(declare them, or add them to uapi_probe.NOT_ABI with the reason)", missing)


def test_probe_covered_everything(shipped, real_uapi):
    """Guard against a vacuous pass: the probe saw every struct and the 22 iommufd commands."""
    ffi, cdef = shipped
    consts, _ = uapi_probe.declared_names(cdef)
    main_structs = [t for t, h in real_uapi.struct_file.items() if real_uapi.in_main(h)]
    assert len(main_structs) >= 90
    assert set(main_structs) <= set(ffi.list_types()[1])
    cmds = [n for n in consts if n.startswith("IOMMUFD_CMD_") and n != "IOMMUFD_CMD_BASE"
            and "_LU_" not in n]
    assert len(cmds) == 22, cmds


def test_generated_module_is_current(tmp_path):
    """src/pyiommufd/_uapi.py must be what _uapi_build makes from include-bindings/ now."""
    import pyiommufd._uapi as shipped_module

    fresh = tmp_path / "_uapi.py"
    _uapi_build.make_ffi().emit_python_code(str(fresh))
    assert Path(shipped_module.__file__).read_text() == fresh.read_text(), (
        "pyiommufd/_uapi.py is stale: run `python src/pyiommufd/_uapi_build.py`")


# ---- requests against their command numbers

# (request prefix, command prefix, type constant) per interface
_REQUEST_FAMILIES = (
    ("IOMMU_", "IOMMUFD_CMD_", "IOMMUFD_TYPE"),
    ("LIVEUPDATE_IOCTL_", "LIVEUPDATE_CMD_", "LIVEUPDATE_IOCTL_TYPE"),
    ("LIVEUPDATE_", "LIVEUPDATE_CMD_", "LIVEUPDATE_IOCTL_TYPE"),
)


def test_requests_are_io_of_their_cmd(shipped):
    ffi, cdef = shipped
    consts, _ = uapi_probe.declared_names(cdef)
    names = set(consts)
    value = ffi.integer_const
    paired, wrong, orphans = [], [], []
    for name in consts:
        if value(name) >> 8 not in (0x3b, 0xba) or "_CMD_" in name or name.endswith("_TYPE"):
            continue
        for req_prefix, cmd_prefix, type_name in _REQUEST_FAMILIES:
            cmd = cmd_prefix + name[len(req_prefix):]
            if name.startswith(req_prefix) and cmd in names:
                paired.append(name)
                expected = IO(value(type_name), value(cmd))
                if value(name) != expected:
                    wrong.append(f"{name} = {value(name):#x}, _IO({type_name}, {cmd}) = {expected:#x}")
                break
        else:
            if name.startswith("VFIO_"):
                nr = value(name) & 0xff
                if value(name) >> 8 != value("VFIO_TYPE") or nr < value("VFIO_BASE"):
                    wrong.append(f"{name} = {value(name):#x} is not _IO(VFIO_TYPE, VFIO_BASE + n)")
            else:
                orphans.append(name)
    assert not wrong, _report("requests that are not _IO(type, cmd)", wrong)
    assert not orphans, _report("requests with no *_CMD_* partner", orphans)
    # 22 iommufd + 6 LUO + 2 LU revisions
    assert len(paired) == 30, paired


def test_lu_revisions_as_documented(shipped):
    """The sizes include-bindings/README.md states for the two LU revisions and 0x95."""
    ffi, _ = shipped
    assert ffi.sizeof("struct iommu_hwpt_lu_set_preserve") == 12
    assert ffi.sizeof("struct iommu_hwpt_lu_mark_preserve") == 16
    assert ffi.offsetof("struct iommu_hwpt_lu_mark_preserve", "hwpt_token") == 8
    assert ffi.sizeof("struct iommu_ioas_noiommu_get_pa") == 40
    assert ffi.integer_const("IOMMU_HWPT_LU_SET_PRESERVE") == 0x3b95
    assert ffi.integer_const("IOMMU_HWPT_LU_MARK_PRESERVE") == 0x3b95
    assert ffi.integer_const("IOMMU_IOAS_NOIOMMU_GET_PA") == 0x3b95


# ---- the comparison must catch real mistakes

def _mutated_bindings(tmp_path: Path, edits) -> Path:
    root = tmp_path / "include-bindings"
    shutil.copytree(_uapi_build.BINDINGS, root)
    for rel, pattern, repl in edits:
        path = root / rel
        text, n = re.subn(pattern, repl, path.read_text(), flags=re.S)
        assert n == 1, f"mutation {pattern!r} matched {n} times in {rel}: update this test"
        path.write_text(text)
    return root


def _problems_for(tmp_path, real_uapi, edits):
    root = _mutated_bindings(tmp_path, edits)
    ffi = uapi_probe.load_ffi(root, tmp_path)
    cdef = _uapi_build.cdef_text(root)
    return ffi, cdef, uapi_probe.compare(ffi, cdef, real_uapi, tmp_path / "probe")


MUTATIONS = {
    # vfio-python's bug (anchors 2.10): padding keeps `size` at 16 and sizeof at 32,
    # so only the field list can tell.
    "vfio_region_info drops cap_offset": (
        [("linux-7.3/vfio.h", r"(struct vfio_region_info \{[^}]*?)\n\s*uint32_t cap_offset;[^\n]*", r"\1")],
        "struct vfio_region_info: fields missing cap_offset"),
    "iommu_ioas_map_file u32 -> u64": (
        [("linux-7.3/iommufd.h", r"(struct iommu_ioas_map_file \{[^}]*?)uint32_t ioas_id;", r"\1uint64_t ioas_id;")],
        "struct iommu_ioas_map_file"),
    "iommu_ioas_map_file fd loses its sign": (
        [("linux-7.3/iommufd.h", r"(struct iommu_ioas_map_file \{[^}]*?)int32_t fd;", r"\1uint32_t fd;")],
        "struct iommu_ioas_map_file.fd: unsigned in ours, signed in C"),
    "request number": (
        [("linux-7.3/iommufd.h", r"#define IOMMU_IOAS_MAP_FILE 0x3b8f", "#define IOMMU_IOAS_MAP_FILE 0x3b8e")],
        "IOMMU_IOAS_MAP_FILE: 0x3b8e in ours, 0x3b8f in C"),
    "vfio request number": (
        [("linux-7.3/vfio.h", r"#define VFIO_DEVICE_BIND_IOMMUFD 0x3b76", "#define VFIO_DEVICE_BIND_IOMMUFD 0x3b77")],
        "VFIO_DEVICE_BIND_IOMMUFD: 0x3b77 in ours, 0x3b76 in C"),
    # openvmm's hazard (anchors 0): a hand-declared data type number
    "enum value": (
        [("linux-7.3/iommufd.h", r"IOMMU_HWPT_DATA_AMD_GUEST = 3,", "IOMMU_HWPT_DATA_AMD_GUEST = 4,")],
        "IOMMU_HWPT_DATA_AMD_GUEST: 0x4 in ours, 0x3 in C"),
    "lu-v2 hwpt_token back to u32": (
        [("lu-v2.h", r"uint64_t hwpt_token;", "uint32_t hwpt_token;")],
        "struct iommu_hwpt_lu_mark_preserve"),
    "lu-v1 hwpt_token widened": (
        [("lu-v1.h", r"uint32_t hwpt_token;", "uint64_t hwpt_token;")],
        "struct iommu_hwpt_lu_set_preserve"),
    "flexible array element type": (
        [("linux-7.3/vfio.h", r"(struct vfio_irq_set \{[^}]*?)uint8_t data\[\];", r"\1uint32_t data[];")],
        "struct vfio_irq_set.data: element size 4 in ours, 1 in C"),
    "field C does not have": (
        [("linux-7.3/vfio.h", r"(struct vfio_device_attach_iommufd_pt \{[^}]*?uint32_t pasid;[^\n]*\n)",
          r"\1\tuint32_t __reserved;\n")],
        "struct vfio_device_attach_iommufd_pt: fields not in C: __reserved"),
    "anonymous union member offset": (
        [("linux-7.3/iommufd.h", r"(struct iommu_hw_info \{[^}]*?)union \{\s*uint32_t in_data_type;[^\n]*\n\s*uint32_t out_data_type;\s*\};",
          r"\1uint32_t in_data_type;\n\tuint32_t out_data_type;")],
        "struct iommu_hw_info.out_data_type: offset 28 in ours, 24 in C"),
    "high bit flag": (
        [("linux-7.3/vfio.h", r"#define VFIO_REGION_TYPE_PCI_VENDOR_TYPE 0x80000000", "#define VFIO_REGION_TYPE_PCI_VENDOR_TYPE 0x40000000")],
        "VFIO_REGION_TYPE_PCI_VENDOR_TYPE"),
    "constant C does not have": (
        [("linux-7.3/vfio.h", r"#define VFIO_DEVICE_FLAGS_CDX 0x100\n", "#define VFIO_DEVICE_FLAGS_CDX 0x100\n#define VFIO_DEVICE_FLAGS_BOGUS 0x200\n")],
        "VFIO_DEVICE_FLAGS_BOGUS: not defined"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_mutation_is_caught(mutation, real_uapi, tmp_path):
    edits, expected = MUTATIONS[mutation]
    _, _, problems = _problems_for(tmp_path, real_uapi, edits)
    assert any(expected in p for p in problems), _report(
        f"mutation {mutation!r} not reported as {expected!r}; got", problems)


def test_dropped_cap_offset_is_invisible_to_layout(real_uapi, tmp_path):
    """Why the field-name check exists: without cap_offset every size and offset still match."""
    edits, _ = MUTATIONS["vfio_region_info drops cap_offset"]
    ffi, _, problems = _problems_for(tmp_path, real_uapi, edits)
    assert ffi.sizeof("struct vfio_region_info") == 32
    assert ffi.offsetof("struct vfio_region_info", "size") == 16
    mentions = [p for p in problems if "vfio_region_info" in p]
    assert len(mentions) == 1, mentions
    assert mentions[0].startswith("struct vfio_region_info: fields missing cap_offset"), mentions


def test_mutation_drop_declarations_caught_by_completeness(real_uapi, tmp_path):
    edits = [
        ("linux-7.3/vfio.h", r"#define VFIO_DEVICE_FLAGS_CDX 0x100\n", ""),
        ("linux-7.3/iommufd.h", r"struct iommu_hw_info_amd \{[^}]*\};\n", ""),
        ("linux-7.3/iommufd.h", r"\tIOMMU_HW_INFO_TYPE_AMD = 4,\n", ""),
    ]
    ffi, cdef, problems = _problems_for(tmp_path, real_uapi, edits)
    assert not problems, _report("dropping declarations should not break layouts", problems)
    missing = uapi_probe.missing_declarations(ffi, cdef, real_uapi)
    for name in ("VFIO_DEVICE_FLAGS_CDX", "struct iommu_hw_info_amd", "IOMMU_HW_INFO_TYPE_AMD"):
        assert any(m.startswith(name + " ") for m in missing), _report(f"{name} not reported", missing)
