/* iommufd, /dev/iommu (Linux 7.3 UAPI, linux/iommufd.h).
 * Written for pyiommufd from the 7.3 ABI; checked by tests/conformance.
 * Every request is _IO(IOMMUFD_TYPE, nr): no size, no direction, so each
 * struct starts with a u32 size the kernel uses to version it.
 * uint64_t stands for the kernel's __aligned_u64 / __aligned_le64: the same
 * 8-byte alignment on the LP64 targets we build for. */

#define IOMMUFD_TYPE 0x3b            /* ';' */

enum {
	IOMMUFD_CMD_BASE = 0x80,
	IOMMUFD_CMD_DESTROY = 0x80,
	IOMMUFD_CMD_IOAS_ALLOC = 0x81,
	IOMMUFD_CMD_IOAS_ALLOW_IOVAS = 0x82,
	IOMMUFD_CMD_IOAS_COPY = 0x83,
	IOMMUFD_CMD_IOAS_IOVA_RANGES = 0x84,
	IOMMUFD_CMD_IOAS_MAP = 0x85,
	IOMMUFD_CMD_IOAS_UNMAP = 0x86,
	IOMMUFD_CMD_OPTION = 0x87,
	IOMMUFD_CMD_VFIO_IOAS = 0x88,
	IOMMUFD_CMD_HWPT_ALLOC = 0x89,
	IOMMUFD_CMD_GET_HW_INFO = 0x8a,
	IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING = 0x8b,
	IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP = 0x8c,
	IOMMUFD_CMD_HWPT_INVALIDATE = 0x8d,
	IOMMUFD_CMD_FAULT_QUEUE_ALLOC = 0x8e,
	IOMMUFD_CMD_IOAS_MAP_FILE = 0x8f,
	IOMMUFD_CMD_VIOMMU_ALLOC = 0x90,
	IOMMUFD_CMD_VDEVICE_ALLOC = 0x91,
	IOMMUFD_CMD_IOAS_CHANGE_PROCESS = 0x92,
	IOMMUFD_CMD_VEVENTQ_ALLOC = 0x93,
	IOMMUFD_CMD_HW_QUEUE_ALLOC = 0x94,
	/* 0x95 is also what the LU series took (lu-v1.h, lu-v2.h) */
	IOMMUFD_CMD_IOAS_NOIOMMU_GET_PA = 0x95,
};

/* ---- objects and IOAS ---- */

struct iommu_destroy {
	uint32_t size;
	uint32_t id;
};
#define IOMMU_DESTROY 0x3b80

struct iommu_ioas_alloc {
	uint32_t size;
	uint32_t flags;
	uint32_t out_ioas_id;
};
#define IOMMU_IOAS_ALLOC 0x3b81

struct iommu_iova_range {
	uint64_t start;
	uint64_t last;             /* inclusive */
};

struct iommu_ioas_iova_ranges {
	uint32_t size;
	uint32_t ioas_id;
	uint32_t num_iovas;        /* in: room in allowed_iovas; out: needed */
	uint32_t __reserved;
	uint64_t allowed_iovas;    /* user pointer to struct iommu_iova_range[] */
	uint64_t out_iova_alignment;
};
#define IOMMU_IOAS_IOVA_RANGES 0x3b84

struct iommu_ioas_allow_iovas {
	uint32_t size;
	uint32_t ioas_id;
	uint32_t num_iovas;
	uint32_t __reserved;
	uint64_t allowed_iovas;    /* user pointer to struct iommu_iova_range[] */
};
#define IOMMU_IOAS_ALLOW_IOVAS 0x3b82

enum iommufd_ioas_map_flags {
	IOMMU_IOAS_MAP_FIXED_IOVA = 0x1,
	IOMMU_IOAS_MAP_WRITEABLE = 0x2,
	IOMMU_IOAS_MAP_READABLE = 0x4,
};

struct iommu_ioas_map {
	uint32_t size;
	uint32_t flags;
	uint32_t ioas_id;
	uint32_t __reserved;
	uint64_t user_va;
	uint64_t length;
	uint64_t iova;             /* in with FIXED_IOVA, else out */
};
#define IOMMU_IOAS_MAP 0x3b85

struct iommu_ioas_noiommu_get_pa {
	uint32_t size;
	uint32_t flags;
	uint32_t ioas_id;
	uint32_t __reserved;
	uint64_t iova;
	uint64_t length;           /* in/out */
	uint64_t out_phys;
};
#define IOMMU_IOAS_NOIOMMU_GET_PA 0x3b95

struct iommu_ioas_map_file {
	uint32_t size;
	uint32_t flags;
	uint32_t ioas_id;
	int32_t fd;
	uint64_t start;
	uint64_t length;
	uint64_t iova;             /* in with FIXED_IOVA, else out */
};
#define IOMMU_IOAS_MAP_FILE 0x3b8f

struct iommu_ioas_copy {
	uint32_t size;
	uint32_t flags;
	uint32_t dst_ioas_id;
	uint32_t src_ioas_id;
	uint64_t length;
	uint64_t dst_iova;
	uint64_t src_iova;
};
#define IOMMU_IOAS_COPY 0x3b83

struct iommu_ioas_unmap {
	uint32_t size;
	uint32_t ioas_id;
	uint64_t iova;
	uint64_t length;           /* in/out */
};
#define IOMMU_IOAS_UNMAP 0x3b86

/* ---- options and the VFIO compatibility IOAS ---- */

enum iommufd_option {
	IOMMU_OPTION_RLIMIT_MODE = 0,
	IOMMU_OPTION_HUGE_PAGES = 1,
};

enum iommufd_option_ops {
	IOMMU_OPTION_OP_SET = 0,
	IOMMU_OPTION_OP_GET = 1,
};

struct iommu_option {
	uint32_t size;
	uint32_t option_id;
	uint16_t op;
	uint16_t __reserved;
	uint32_t object_id;
	uint64_t val64;
};
#define IOMMU_OPTION 0x3b87

enum iommufd_vfio_ioas_op {
	IOMMU_VFIO_IOAS_GET = 0,
	IOMMU_VFIO_IOAS_SET = 1,
	IOMMU_VFIO_IOAS_CLEAR = 2,
};

struct iommu_vfio_ioas {
	uint32_t size;
	uint32_t ioas_id;
	uint16_t op;
	uint16_t __reserved;
};
#define IOMMU_VFIO_IOAS 0x3b88

/* ---- HWPT allocation and its driver-specific data ---- */

enum iommufd_hwpt_alloc_flags {
	IOMMU_HWPT_ALLOC_NEST_PARENT = 0x1,
	IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 0x2,
	IOMMU_HWPT_FAULT_ID_VALID = 0x4,
	IOMMU_HWPT_ALLOC_PASID = 0x8,
};

enum iommu_hwpt_vtd_s1_flags {
	IOMMU_VTD_S1_SRE = 0x1,
	IOMMU_VTD_S1_EAFE = 0x2,
	IOMMU_VTD_S1_WPE = 0x4,
};

struct iommu_hwpt_vtd_s1 {
	uint64_t flags;
	uint64_t pgtbl_addr;
	uint32_t addr_width;
	uint32_t __reserved;
};

struct iommu_hwpt_arm_smmuv3 {
	uint64_t ste[2];           /* little-endian */
};

struct iommu_hwpt_amd_guest {
	uint64_t dte[4];
};

enum iommu_hwpt_data_type {
	IOMMU_HWPT_DATA_NONE = 0,
	IOMMU_HWPT_DATA_VTD_S1 = 1,
	IOMMU_HWPT_DATA_ARM_SMMUV3 = 2,
	IOMMU_HWPT_DATA_AMD_GUEST = 3,
};

struct iommu_hwpt_alloc {
	uint32_t size;
	uint32_t flags;
	uint32_t dev_id;
	uint32_t pt_id;
	uint32_t out_hwpt_id;
	uint32_t __reserved;
	uint32_t data_type;
	uint32_t data_len;
	uint64_t data_uptr;
	uint32_t fault_id;         /* used with IOMMU_HWPT_FAULT_ID_VALID */
	uint32_t __reserved2;
};
#define IOMMU_HWPT_ALLOC 0x3b89

/* ---- GET_HW_INFO and the per-driver info records ---- */

enum iommu_hw_info_vtd_flags {
	IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17 = 0x1,
};

struct iommu_hw_info_vtd {
	uint32_t flags;
	uint32_t __reserved;
	uint64_t cap_reg;
	uint64_t ecap_reg;
};

enum iommu_hw_info_arm_smmuv3_flags {
	IOMMU_HW_INFO_ARM_SMMUV3_ERRATA_REPEAT_TLBI_CFGI = 0x1,
};

struct iommu_hw_info_arm_smmuv3 {
	uint32_t flags;
	uint32_t __reserved;
	uint32_t idr[6];
	uint32_t iidr;
	uint32_t aidr;
};

struct iommu_hw_info_tegra241_cmdqv {
	uint32_t flags;
	uint8_t version;
	uint8_t log2vcmdqs;
	uint8_t log2vsids;
	uint8_t __reserved;
};

struct iommu_hw_info_amd {
	uint64_t efr;
	uint64_t efr2;
};

enum iommu_hw_info_type {
	IOMMU_HW_INFO_TYPE_NONE = 0,
	IOMMU_HW_INFO_TYPE_DEFAULT = 0,
	IOMMU_HW_INFO_TYPE_INTEL_VTD = 1,
	IOMMU_HW_INFO_TYPE_ARM_SMMUV3 = 2,
	IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV = 3,
	IOMMU_HW_INFO_TYPE_AMD = 4,
};

enum iommufd_hw_capabilities {
	IOMMU_HW_CAP_DIRTY_TRACKING = 0x1,
	IOMMU_HW_CAP_PCI_PASID_EXEC = 0x2,
	IOMMU_HW_CAP_PCI_PASID_PRIV = 0x4,
	IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED = 0x8,
};

enum iommufd_hw_info_flags {
	IOMMU_HW_INFO_FLAG_INPUT_TYPE = 0x1,
};

struct iommu_hw_info {
	uint32_t size;
	uint32_t flags;
	uint32_t dev_id;
	uint32_t data_len;
	uint64_t data_uptr;
	union {
		uint32_t in_data_type;     /* with IOMMU_HW_INFO_FLAG_INPUT_TYPE */
		uint32_t out_data_type;
	};
	uint8_t out_max_pasid_log2;
	uint8_t __reserved[3];
	uint64_t out_capabilities;
};
#define IOMMU_GET_HW_INFO 0x3b8a

/* ---- dirty tracking ---- */

enum iommufd_hwpt_set_dirty_tracking_flags {
	IOMMU_HWPT_DIRTY_TRACKING_ENABLE = 1,
};

struct iommu_hwpt_set_dirty_tracking {
	uint32_t size;
	uint32_t flags;
	uint32_t hwpt_id;
	uint32_t __reserved;
};
#define IOMMU_HWPT_SET_DIRTY_TRACKING 0x3b8b

enum iommufd_hwpt_get_dirty_bitmap_flags {
	IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR = 1,
};

struct iommu_hwpt_get_dirty_bitmap {
	uint32_t size;
	uint32_t hwpt_id;
	uint32_t flags;
	uint32_t __reserved;
	uint64_t iova;
	uint64_t length;
	uint64_t page_size;
	uint64_t data;             /* user pointer to the bitmap */
};
#define IOMMU_HWPT_GET_DIRTY_BITMAP 0x3b8c

/* ---- cache invalidation ---- */

enum iommu_hwpt_invalidate_data_type {
	IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 = 0,
	IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3 = 1,
};

enum iommu_hwpt_vtd_s1_invalidate_flags {
	IOMMU_VTD_INV_FLAGS_LEAF = 0x1,
};

struct iommu_hwpt_vtd_s1_invalidate {
	uint64_t addr;
	uint64_t npages;
	uint32_t flags;
	uint32_t __reserved;
};

struct iommu_viommu_arm_smmuv3_invalidate {
	uint64_t cmd[2];           /* little-endian */
};

struct iommu_hwpt_invalidate {
	uint32_t size;
	uint32_t hwpt_id;          /* a nested HWPT or a vIOMMU id */
	uint64_t data_uptr;
	uint32_t data_type;
	uint32_t entry_len;
	uint32_t entry_num;        /* in/out: entries handled */
	uint32_t __reserved;
};
#define IOMMU_HWPT_INVALIDATE 0x3b8d

/* ---- I/O page faults, read from / written to the fault fd ---- */

enum iommu_hwpt_pgfault_flags {
	IOMMU_PGFAULT_FLAGS_PASID_VALID = 0x1,
	IOMMU_PGFAULT_FLAGS_LAST_PAGE = 0x2,
};

enum iommu_hwpt_pgfault_perm {
	IOMMU_PGFAULT_PERM_READ = 0x1,
	IOMMU_PGFAULT_PERM_WRITE = 0x2,
	IOMMU_PGFAULT_PERM_EXEC = 0x4,
	IOMMU_PGFAULT_PERM_PRIV = 0x8,
};

struct iommu_hwpt_pgfault {
	uint32_t flags;
	uint32_t dev_id;
	uint32_t pasid;
	uint32_t grpid;
	uint32_t perm;
	uint32_t __reserved;
	uint64_t addr;
	uint32_t length;
	uint32_t cookie;
};

enum iommufd_page_response_code {
	IOMMUFD_PAGE_RESP_SUCCESS = 0,
	IOMMUFD_PAGE_RESP_INVALID = 1,
};

struct iommu_hwpt_page_response {
	uint32_t cookie;
	uint32_t code;
};

struct iommu_fault_alloc {
	uint32_t size;
	uint32_t flags;
	uint32_t out_fault_id;
	uint32_t out_fault_fd;
};
#define IOMMU_FAULT_QUEUE_ALLOC 0x3b8e

/* ---- vIOMMU and vDEVICE ---- */

enum iommu_viommu_type {
	IOMMU_VIOMMU_TYPE_DEFAULT = 0,
	IOMMU_VIOMMU_TYPE_ARM_SMMUV3 = 1,
	IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV = 2,
};

struct iommu_viommu_tegra241_cmdqv {
	uint64_t out_vintf_mmap_offset;
	uint64_t out_vintf_mmap_length;
};

struct iommu_viommu_alloc {
	uint32_t size;
	uint32_t flags;
	uint32_t type;
	uint32_t dev_id;
	uint32_t hwpt_id;
	uint32_t out_viommu_id;
	uint32_t data_len;
	uint32_t __reserved;
	uint64_t data_uptr;
};
#define IOMMU_VIOMMU_ALLOC 0x3b90

struct iommu_vdevice_alloc {
	uint32_t size;
	uint32_t viommu_id;
	uint32_t dev_id;
	uint32_t out_vdevice_id;
	uint64_t virt_id;
};
#define IOMMU_VDEVICE_ALLOC 0x3b91

struct iommu_ioas_change_process {
	uint32_t size;
	uint32_t __reserved;
};
#define IOMMU_IOAS_CHANGE_PROCESS 0x3b92

/* ---- vEVENT queues: each read record is a header then a per-type event ---- */

enum iommu_veventq_flag {
	IOMMU_VEVENTQ_FLAG_LOST_EVENTS = 0x1,
};

struct iommufd_vevent_header {
	uint32_t flags;
	uint32_t sequence;
};

enum iommu_veventq_type {
	IOMMU_VEVENTQ_TYPE_DEFAULT = 0,
	IOMMU_VEVENTQ_TYPE_ARM_SMMUV3 = 1,
	IOMMU_VEVENTQ_TYPE_TEGRA241_CMDQV = 2,
};

struct iommu_vevent_arm_smmuv3 {
	uint64_t evt[4];           /* little-endian */
};

struct iommu_vevent_tegra241_cmdqv {
	uint64_t lvcmdq_err_map[2]; /* little-endian */
};

struct iommu_veventq_alloc {
	uint32_t size;
	uint32_t flags;
	uint32_t viommu_id;
	uint32_t type;
	uint32_t veventq_depth;
	uint32_t out_veventq_id;
	uint32_t out_veventq_fd;
	uint32_t __reserved;
};
#define IOMMU_VEVENTQ_ALLOC 0x3b93

/* ---- hardware queues ---- */

enum iommu_hw_queue_type {
	IOMMU_HW_QUEUE_TYPE_DEFAULT = 0,
	IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV = 1,
};

struct iommu_hw_queue_alloc {
	uint32_t size;
	uint32_t flags;
	uint32_t viommu_id;
	uint32_t type;
	uint32_t index;
	uint32_t out_hw_queue_id;
	uint64_t nesting_parent_iova;
	uint64_t length;
};
#define IOMMU_HW_QUEUE_ALLOC 0x3b94
