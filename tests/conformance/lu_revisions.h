/* The LU ABI revisions as the series defines them, in kernel-header C.
 * No upstream header has them, so this file is the reference the C probe
 * compiles against for lu-v1.h and lu-v2.h. Include after <linux/iommufd.h>.
 * Both take nr 0x95, which 7.3 gives to IOMMU_IOAS_NOIOMMU_GET_PA (seed-spec 2.2). */

/* lu-v1: "[PATCH 10/14] iommufd-lu: ..." (seed-spec 2.1, S1:3236-3265) */
enum {
	IOMMUFD_CMD_HWPT_LU_SET_PRESERVE = 0x95,
};

struct iommu_hwpt_lu_set_preserve {
	__u32 size;
	__u32 hwpt_id;
	__u32 hwpt_token;
};
#define IOMMU_HWPT_LU_SET_PRESERVE _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_LU_SET_PRESERVE)

/* lu-v2: renamed, token widened to 64 bits (seed-spec 2.3, T: samikhawaja/linux @06fcb4a7) */
enum {
	IOMMUFD_CMD_HWPT_LU_MARK_PRESERVE = 0x95,
};

struct iommu_hwpt_lu_mark_preserve {
	__u32 size;
	__u32 hwpt_id;
	__aligned_u64 hwpt_token;
};
#define IOMMU_HWPT_LU_MARK_PRESERVE _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_LU_MARK_PRESERVE)
