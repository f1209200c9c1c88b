"""Where a rule comes from, in words a user can look up: the series' patch,
the kernel file or our docs. The planner's and the error hints' references
are the keys of :data:`SOURCES`."""
from __future__ import annotations

SOURCES = {
    "2.1": "the series' patch 10/14, IOMMU_HWPT_LU_SET_PRESERVE",
    "2.2": "Linux 7.3 include/uapi/linux/iommufd.h: nr 0x95 is IOMMU_IOAS_NOIOMMU_GET_PA",
    "2.3": "the series' review: IOMMU_HWPT_LU_MARK_PRESERVE with a u64 token",
    "2.5": "the series' patches 11-13/14",
    "3": "the series' patch 14/14, tools/testing/selftests/iommu/iommufd_liveupdate.c",
    "4.1": "Linux 7.3 kernel/liveupdate/luo_session.c and luo_file.c",
    "4.2": "the series' patch 14/14: memfd, then iommufd, then cdev, in one session",
    "4.3": "Linux 7.3 mm/memfd_luo.c",
    "4.4": "the series' patch 11/14, iommufd preservation",
    "4.5": "the series' patches 12-13/14, VFIO cdev preservation",
    "4.6": "the series' cover letter: restore at boot",
    "4.7": "the series' cover letter: what Phase 1 restores after the kexec",
    "4.8": "the series' patches 10-13/14",
}


def cite(ref: str) -> str:
    """``"4.4, 4.5"`` -> the sources, each once; unknown keys are dropped."""
    out: list[str] = []
    for key in (k.strip() for k in ref.split(",")):
        text = SOURCES.get(key) or SOURCES.get(key.split(".")[0])
        if text and text not in out:
            out.append(text)
    return "; ".join(out)
