/* PLACEHOLDER: being completed (all 22 commands). */
struct iommu_destroy { uint32_t size; uint32_t id; };
#define IOMMU_DESTROY 0x3b80
struct iommu_ioas_alloc { uint32_t size; uint32_t flags; uint32_t out_ioas_id; };
#define IOMMU_IOAS_ALLOC 0x3b81
