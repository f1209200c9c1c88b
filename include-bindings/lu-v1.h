/* LU ABI revision "lu-v1": IOMMU_HWPT_LU_SET_PRESERVE as posted in
 * "[PATCH 10/14] iommufd-lu: Implement ioctl to let userspace mark an HWPT to
 * be preserved" (seed-spec 2.1, S1:3236-3265). Not in any upstream kernel.
 * nr 0x95 collides with upstream 7.3 IOMMU_IOAS_NOIOMMU_GET_PA (seed-spec 2.2):
 * pyiommufd lets the caller override the nr (pyiommufd.abi). */

#define IOMMUFD_CMD_HWPT_LU_SET_PRESERVE 0x95

struct iommu_hwpt_lu_set_preserve {
	uint32_t size;
	uint32_t hwpt_id;
	uint32_t hwpt_token;
};
#define IOMMU_HWPT_LU_SET_PRESERVE 0x3b95
