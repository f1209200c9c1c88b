/* LU ABI revision "lu-v2": IOMMU_HWPT_LU_MARK_PRESERVE, the post-review shape:
 * renamed from SET_PRESERVE and the token widened to u64 (seed-spec 2.3, R1,
 * R2; S1:20605-20606, S1:21527-21533), as in the author's later tree. Still
 * nr 0x95 there; see lu-v1.h on the collision. */

#define IOMMUFD_CMD_HWPT_LU_MARK_PRESERVE 0x95

struct iommu_hwpt_lu_mark_preserve {
	uint32_t size;
	uint32_t hwpt_id;
	uint64_t hwpt_token;
};
#define IOMMU_HWPT_LU_MARK_PRESERVE 0x3b95
