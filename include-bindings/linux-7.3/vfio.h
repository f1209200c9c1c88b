/* VFIO: legacy container/group, device and type1/sPAPR IOMMU ioctls, and the
 * iommufd cdev ioctls (Linux 7.3 UAPI, linux/vfio.h).
 * Written for pyiommufd from the 7.3 ABI; checked by tests/conformance.
 * Requests are _IO(VFIO_TYPE, VFIO_BASE + n) = 0x3b64 + n; the container, the
 * device and the sPAPR IOMMU reuse the same n, so several names share a value.
 * Structs with argsz grow: the kernel reads argsz bytes and may ask for more
 * (capability chains start at cap_offset, each with vfio_info_cap_header). */

#define VFIO_API_VERSION 0

/* extensions (VFIO_CHECK_EXTENSION) and IOMMU models (VFIO_SET_IOMMU) */
#define VFIO_TYPE1_IOMMU 1
#define VFIO_SPAPR_TCE_IOMMU 2
#define VFIO_TYPE1v2_IOMMU 3
#define VFIO_DMA_CC_IOMMU 4
#define VFIO_EEH 5
#define __VFIO_RESERVED_TYPE1_NESTING_IOMMU 6    /* removed; number kept reserved */
#define VFIO_SPAPR_TCE_v2_IOMMU 7
#define VFIO_NOIOMMU_IOMMU 8
#define VFIO_UNMAP_ALL 9
#define VFIO_UPDATE_VADDR 10

#define VFIO_TYPE 0x3b                           /* ';', shared with iommufd */
#define VFIO_BASE 100

struct vfio_info_cap_header {
	uint16_t id;
	uint16_t version;
	uint32_t next;             /* offset from the start of the info struct; 0 ends */
};

/* ---- container ---- */

#define VFIO_GET_API_VERSION 0x3b64
#define VFIO_CHECK_EXTENSION 0x3b65
#define VFIO_SET_IOMMU 0x3b66

/* ---- group ---- */

struct vfio_group_status {
	uint32_t argsz;
	uint32_t flags;
};
#define VFIO_GROUP_FLAGS_VIABLE 0x1
#define VFIO_GROUP_FLAGS_CONTAINER_SET 0x2
#define VFIO_GROUP_GET_STATUS 0x3b67

#define VFIO_GROUP_SET_CONTAINER 0x3b68
#define VFIO_GROUP_UNSET_CONTAINER 0x3b69
#define VFIO_GROUP_GET_DEVICE_FD 0x3b6a

/* ---- device info ---- */

struct vfio_device_info {
	uint32_t argsz;
	uint32_t flags;
	uint32_t num_regions;
	uint32_t num_irqs;
	uint32_t cap_offset;
	uint32_t pad;
};
#define VFIO_DEVICE_FLAGS_RESET 0x1
#define VFIO_DEVICE_FLAGS_PCI 0x2
#define VFIO_DEVICE_FLAGS_PLATFORM 0x4
#define VFIO_DEVICE_FLAGS_AMBA 0x8
#define VFIO_DEVICE_FLAGS_CCW 0x10
#define VFIO_DEVICE_FLAGS_AP 0x20
#define VFIO_DEVICE_FLAGS_FSL_MC 0x40
#define VFIO_DEVICE_FLAGS_CAPS 0x80
#define VFIO_DEVICE_FLAGS_CDX 0x100
#define VFIO_DEVICE_GET_INFO 0x3b6b

/* device info capability ids */
#define VFIO_DEVICE_INFO_CAP_ZPCI_BASE 1
#define VFIO_DEVICE_INFO_CAP_ZPCI_GROUP 2
#define VFIO_DEVICE_INFO_CAP_ZPCI_UTIL 3
#define VFIO_DEVICE_INFO_CAP_ZPCI_PFIP 4
#define VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP 5

struct vfio_device_info_cap_pci_atomic_comp {
	struct vfio_info_cap_header header;
	uint32_t flags;
	uint32_t reserved;
};
#define VFIO_PCI_ATOMIC_COMP32 0x1
#define VFIO_PCI_ATOMIC_COMP64 0x2
#define VFIO_PCI_ATOMIC_COMP128 0x4

/* ---- regions ---- */

struct vfio_region_info {
	uint32_t argsz;
	uint32_t flags;
	uint32_t index;
	uint32_t cap_offset;       /* padding would hide its absence: see tests/conformance */
	uint64_t size;
	uint64_t offset;           /* of the region in the device fd */
};
#define VFIO_REGION_INFO_FLAG_READ 0x1
#define VFIO_REGION_INFO_FLAG_WRITE 0x2
#define VFIO_REGION_INFO_FLAG_MMAP 0x4
#define VFIO_REGION_INFO_FLAG_CAPS 0x8
#define VFIO_DEVICE_GET_REGION_INFO 0x3b6c

/* region info capability ids */
#define VFIO_REGION_INFO_CAP_SPARSE_MMAP 1
#define VFIO_REGION_INFO_CAP_TYPE 2
#define VFIO_REGION_INFO_CAP_MSIX_MAPPABLE 3     /* header only */
#define VFIO_REGION_INFO_CAP_NVLINK2_SSATGT 4
#define VFIO_REGION_INFO_CAP_NVLINK2_LNKSPD 5

struct vfio_region_sparse_mmap_area {
	uint64_t offset;
	uint64_t size;
};

struct vfio_region_info_cap_sparse_mmap {
	struct vfio_info_cap_header header;
	uint32_t nr_areas;
	uint32_t reserved;
	struct vfio_region_sparse_mmap_area areas[];
};

struct vfio_region_info_cap_type {
	struct vfio_info_cap_header header;
	uint32_t type;
	uint32_t subtype;
};

/* region types and subtypes (vfio_region_info_cap_type) */
#define VFIO_REGION_TYPE_PCI_VENDOR_TYPE 0x80000000   /* an int (1 << 31) in C */
#define VFIO_REGION_TYPE_PCI_VENDOR_MASK 0xffff
#define VFIO_REGION_TYPE_GFX 1
#define VFIO_REGION_TYPE_CCW 2
#define VFIO_REGION_TYPE_MIGRATION_DEPRECATED 3

#define VFIO_REGION_SUBTYPE_INTEL_IGD_OPREGION 1
#define VFIO_REGION_SUBTYPE_INTEL_IGD_HOST_CFG 2
#define VFIO_REGION_SUBTYPE_INTEL_IGD_LPC_CFG 3
#define VFIO_REGION_SUBTYPE_NVIDIA_NVLINK2_RAM 1
#define VFIO_REGION_SUBTYPE_IBM_NVLINK2_ATSD 1
#define VFIO_REGION_SUBTYPE_GFX_EDID 1
#define VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD 1
#define VFIO_REGION_SUBTYPE_CCW_SCHIB 2
#define VFIO_REGION_SUBTYPE_CCW_CRW 3
#define VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED 1

struct vfio_region_gfx_edid {
	uint32_t edid_offset;
	uint32_t edid_max_size;
	uint32_t edid_size;
	uint32_t max_xres;
	uint32_t max_yres;
	uint32_t link_state;
};
#define VFIO_DEVICE_GFX_LINK_STATE_UP 1
#define VFIO_DEVICE_GFX_LINK_STATE_DOWN 2

/* migration v1 region layout: removed from the kernel, kept in the UAPI */
struct vfio_device_migration_info {
	uint32_t device_state;
	uint32_t reserved;
	uint64_t pending_bytes;
	uint64_t data_offset;
	uint64_t data_size;
};
#define VFIO_DEVICE_STATE_V1_STOP 0
#define VFIO_DEVICE_STATE_V1_RUNNING 0x1
#define VFIO_DEVICE_STATE_V1_SAVING 0x2
#define VFIO_DEVICE_STATE_V1_RESUMING 0x4
#define VFIO_DEVICE_STATE_MASK 0x7

struct vfio_region_info_cap_nvlink2_ssatgt {
	struct vfio_info_cap_header header;
	uint64_t tgt;
};

struct vfio_region_info_cap_nvlink2_lnkspd {
	struct vfio_info_cap_header header;
	uint32_t link_speed;
	uint32_t __pad;
};

/* ---- interrupts ---- */

struct vfio_irq_info {
	uint32_t argsz;
	uint32_t flags;
	uint32_t index;
	uint32_t count;
};
#define VFIO_IRQ_INFO_EVENTFD 0x1
#define VFIO_IRQ_INFO_MASKABLE 0x2
#define VFIO_IRQ_INFO_AUTOMASKED 0x4
#define VFIO_IRQ_INFO_NORESIZE 0x8
#define VFIO_DEVICE_GET_IRQ_INFO 0x3b6d

struct vfio_irq_set {
	uint32_t argsz;
	uint32_t flags;            /* one DATA_* and one ACTION_* */
	uint32_t index;
	uint32_t start;
	uint32_t count;
	uint8_t data[];            /* count bools (u8) or eventfds (s32) */
};
#define VFIO_IRQ_SET_DATA_NONE 0x1
#define VFIO_IRQ_SET_DATA_BOOL 0x2
#define VFIO_IRQ_SET_DATA_EVENTFD 0x4
#define VFIO_IRQ_SET_ACTION_MASK 0x8
#define VFIO_IRQ_SET_ACTION_UNMASK 0x10
#define VFIO_IRQ_SET_ACTION_TRIGGER 0x20
#define VFIO_DEVICE_SET_IRQS 0x3b6e
#define VFIO_IRQ_SET_DATA_TYPE_MASK 0x7
#define VFIO_IRQ_SET_ACTION_TYPE_MASK 0x38

#define VFIO_DEVICE_RESET 0x3b6f

/* ---- region and irq indexes per bus ---- */

enum {
	VFIO_PCI_BAR0_REGION_INDEX = 0,
	VFIO_PCI_BAR1_REGION_INDEX = 1,
	VFIO_PCI_BAR2_REGION_INDEX = 2,
	VFIO_PCI_BAR3_REGION_INDEX = 3,
	VFIO_PCI_BAR4_REGION_INDEX = 4,
	VFIO_PCI_BAR5_REGION_INDEX = 5,
	VFIO_PCI_ROM_REGION_INDEX = 6,
	VFIO_PCI_CONFIG_REGION_INDEX = 7,
	VFIO_PCI_VGA_REGION_INDEX = 8,
	VFIO_PCI_NUM_REGIONS = 9,  /* device-specific regions follow */
};

enum {
	VFIO_PCI_INTX_IRQ_INDEX = 0,
	VFIO_PCI_MSI_IRQ_INDEX = 1,
	VFIO_PCI_MSIX_IRQ_INDEX = 2,
	VFIO_PCI_ERR_IRQ_INDEX = 3,
	VFIO_PCI_REQ_IRQ_INDEX = 4,
	VFIO_PCI_NUM_IRQS = 5,
};

enum {
	VFIO_CCW_CONFIG_REGION_INDEX = 0,
	VFIO_CCW_NUM_REGIONS = 1,
};

enum {
	VFIO_CCW_IO_IRQ_INDEX = 0,
	VFIO_CCW_CRW_IRQ_INDEX = 1,
	VFIO_CCW_REQ_IRQ_INDEX = 2,
	VFIO_CCW_NUM_IRQS = 3,
};

enum {
	VFIO_AP_REQ_IRQ_INDEX = 0,
	VFIO_AP_CFG_CHG_IRQ_INDEX = 1,
	VFIO_AP_NUM_IRQS = 2,
};

/* ---- PCI hot reset ---- */

struct vfio_pci_dependent_device {
	union {
		uint32_t group_id;         /* without VFIO_PCI_HOT_RESET_FLAG_DEV_ID */
		uint32_t devid;
	};
	uint16_t segment;
	uint8_t bus;
	uint8_t devfn;
};
#define VFIO_PCI_DEVID_OWNED 0
#define VFIO_PCI_DEVID_NOT_OWNED -1

struct vfio_pci_hot_reset_info {
	uint32_t argsz;
	uint32_t flags;
	uint32_t count;
	struct vfio_pci_dependent_device devices[];
};
#define VFIO_PCI_HOT_RESET_FLAG_DEV_ID 0x1
#define VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED 0x2
#define VFIO_DEVICE_GET_PCI_HOT_RESET_INFO 0x3b70

struct vfio_pci_hot_reset {
	uint32_t argsz;
	uint32_t flags;
	uint32_t count;
	int32_t group_fds[];       /* empty for a device opened as a cdev */
};
#define VFIO_DEVICE_PCI_HOT_RESET 0x3b71

/* ---- mediated graphics ---- */

struct vfio_device_gfx_plane_info {
	uint32_t argsz;
	uint32_t flags;
	uint32_t drm_plane_type;
	uint32_t drm_format;
	uint64_t drm_format_mod;
	uint32_t width;
	uint32_t height;
	uint32_t stride;
	uint32_t size;
	uint32_t x_pos;
	uint32_t y_pos;
	uint32_t x_hot;
	uint32_t y_hot;
	union {
		uint32_t region_index;     /* VFIO_GFX_PLANE_TYPE_REGION */
		uint32_t dmabuf_id;        /* VFIO_GFX_PLANE_TYPE_DMABUF */
	};
	uint32_t reserved;
};
#define VFIO_GFX_PLANE_TYPE_PROBE 0x1
#define VFIO_GFX_PLANE_TYPE_DMABUF 0x2
#define VFIO_GFX_PLANE_TYPE_REGION 0x4
#define VFIO_DEVICE_QUERY_GFX_PLANE 0x3b72
#define VFIO_DEVICE_GET_GFX_DMABUF 0x3b73

/* ---- ioeventfd ---- */

struct vfio_device_ioeventfd {
	uint32_t argsz;
	uint32_t flags;
	uint64_t offset;
	uint64_t data;
	int32_t fd;                /* -1 removes */
	uint32_t reserved;
};
#define VFIO_DEVICE_IOEVENTFD_8 0x1
#define VFIO_DEVICE_IOEVENTFD_16 0x2
#define VFIO_DEVICE_IOEVENTFD_32 0x4
#define VFIO_DEVICE_IOEVENTFD_64 0x8
#define VFIO_DEVICE_IOEVENTFD_SIZE_MASK 0xf
#define VFIO_DEVICE_IOEVENTFD 0x3b74

/* ---- device features: feature number in the low 16 flag bits ---- */

struct vfio_device_feature {
	uint32_t argsz;
	uint32_t flags;
	uint8_t data[];            /* the feature's own struct */
};
#define VFIO_DEVICE_FEATURE_MASK 0xffff
#define VFIO_DEVICE_FEATURE_GET 0x10000
#define VFIO_DEVICE_FEATURE_SET 0x20000
#define VFIO_DEVICE_FEATURE_PROBE 0x40000
#define VFIO_DEVICE_FEATURE 0x3b75

/* ---- iommufd cdev (/dev/vfio/devices/vfioX) ---- */

struct vfio_device_bind_iommufd {
	uint32_t argsz;
	uint32_t flags;
	int32_t iommufd;
	uint32_t out_devid;
	uint64_t token_uuid_ptr;   /* with VFIO_DEVICE_BIND_FLAG_TOKEN */
};
#define VFIO_DEVICE_BIND_FLAG_TOKEN 0x1
#define VFIO_DEVICE_BIND_IOMMUFD 0x3b76

struct vfio_device_attach_iommufd_pt {
	uint32_t argsz;
	uint32_t flags;
	uint32_t pt_id;            /* in/out */
	uint32_t pasid;            /* with VFIO_DEVICE_ATTACH_PASID */
};
#define VFIO_DEVICE_ATTACH_PASID 0x1
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT 0x3b77

struct vfio_device_detach_iommufd_pt {
	uint32_t argsz;
	uint32_t flags;
	uint32_t pasid;            /* with VFIO_DEVICE_DETACH_PASID */
};
#define VFIO_DEVICE_DETACH_PASID 0x1
#define VFIO_DEVICE_DETACH_IOMMUFD_PT 0x3b78

/* ---- feature numbers and their payloads ---- */

#define VFIO_DEVICE_FEATURE_PCI_VF_TOKEN 0       /* payload: a 16-byte UUID */

struct vfio_device_feature_migration {
	uint64_t flags;
};
#define VFIO_MIGRATION_STOP_COPY 0x1
#define VFIO_MIGRATION_P2P 0x2
#define VFIO_MIGRATION_PRE_COPY 0x4
#define VFIO_DEVICE_FEATURE_MIGRATION 1

struct vfio_device_feature_mig_state {
	uint32_t device_state;     /* enum vfio_device_mig_state */
	int32_t data_fd;
};
#define VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE 2

enum vfio_device_mig_state {
	VFIO_DEVICE_STATE_ERROR = 0,
	VFIO_DEVICE_STATE_STOP = 1,
	VFIO_DEVICE_STATE_RUNNING = 2,
	VFIO_DEVICE_STATE_STOP_COPY = 3,
	VFIO_DEVICE_STATE_RESUMING = 4,
	VFIO_DEVICE_STATE_RUNNING_P2P = 5,
	VFIO_DEVICE_STATE_PRE_COPY = 6,
	VFIO_DEVICE_STATE_PRE_COPY_P2P = 7,
	VFIO_DEVICE_STATE_NR = 8,
};

/* on the migration data_fd */
struct vfio_precopy_info {
	uint32_t argsz;
	uint32_t flags;
	uint64_t initial_bytes;
	uint64_t dirty_bytes;
};
#define VFIO_PRECOPY_INFO_REINIT 0x1
#define VFIO_MIG_GET_PRECOPY_INFO 0x3b79

#define VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY 3

struct vfio_device_low_power_entry_with_wakeup {
	int32_t wakeup_eventfd;
	uint32_t reserved;
};
#define VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP 4
#define VFIO_DEVICE_FEATURE_LOW_POWER_EXIT 5

struct vfio_device_feature_dma_logging_control {
	uint64_t page_size;
	uint32_t num_ranges;
	uint32_t __reserved;
	uint64_t ranges;           /* user pointer to dma_logging_range[] */
};

struct vfio_device_feature_dma_logging_range {
	uint64_t iova;
	uint64_t length;
};
#define VFIO_DEVICE_FEATURE_DMA_LOGGING_START 6
#define VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP 7

struct vfio_device_feature_dma_logging_report {
	uint64_t iova;
	uint64_t length;
	uint64_t page_size;
	uint64_t bitmap;           /* user pointer */
};
#define VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT 8

struct vfio_device_feature_mig_data_size {
	uint64_t stop_copy_length;
};
#define VFIO_DEVICE_FEATURE_MIG_DATA_SIZE 9

struct vfio_device_feature_bus_master {
	uint32_t op;
};
#define VFIO_DEVICE_FEATURE_CLEAR_MASTER 0
#define VFIO_DEVICE_FEATURE_SET_MASTER 1
#define VFIO_DEVICE_FEATURE_BUS_MASTER 10

#define VFIO_DEVICE_FEATURE_DMA_BUF 11

struct vfio_region_dma_range {
	uint64_t offset;
	uint64_t length;
};

struct vfio_device_feature_dma_buf {
	uint32_t region_index;
	uint32_t open_flags;
	uint32_t flags;
	uint32_t nr_ranges;
	struct vfio_region_dma_range dma_ranges[];
};

#define VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2 12

struct vfio_device_feature_zpci_err {
	uint64_t data;
};
#define VFIO_DEVICE_FEATURE_ZPCI_ERROR 13

/* ---- type1 IOMMU (on the container fd) ---- */

struct vfio_iommu_type1_info {
	uint32_t argsz;
	uint32_t flags;
	uint64_t iova_pgsizes;
	uint32_t cap_offset;
	uint32_t pad;
};
#define VFIO_IOMMU_INFO_PGSIZES 0x1
#define VFIO_IOMMU_INFO_CAPS 0x2

/* type1 info capability ids */
#define VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE 1
#define VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION 2
#define VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL 3

struct vfio_iova_range {
	uint64_t start;
	uint64_t end;
};

struct vfio_iommu_type1_info_cap_iova_range {
	struct vfio_info_cap_header header;
	uint32_t nr_iovas;
	uint32_t reserved;
	struct vfio_iova_range iova_ranges[];
};

struct vfio_iommu_type1_info_cap_migration {
	struct vfio_info_cap_header header;
	uint32_t flags;
	uint64_t pgsize_bitmap;
	uint64_t max_dirty_bitmap_size;
};

struct vfio_iommu_type1_info_dma_avail {
	struct vfio_info_cap_header header;
	uint32_t avail;
};

#define VFIO_IOMMU_GET_INFO 0x3b70

struct vfio_iommu_type1_dma_map {
	uint32_t argsz;
	uint32_t flags;
	uint64_t vaddr;
	uint64_t iova;
	uint64_t size;
};
#define VFIO_DMA_MAP_FLAG_READ 0x1
#define VFIO_DMA_MAP_FLAG_WRITE 0x2
#define VFIO_DMA_MAP_FLAG_VADDR 0x4
#define VFIO_IOMMU_MAP_DMA 0x3b71

struct vfio_bitmap {
	uint64_t pgsize;
	uint64_t size;
	uint64_t *data;
};

struct vfio_iommu_type1_dma_unmap {
	uint32_t argsz;
	uint32_t flags;
	uint64_t iova;
	uint64_t size;
	uint8_t data[];            /* struct vfio_bitmap with GET_DIRTY_BITMAP */
};
#define VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP 0x1
#define VFIO_DMA_UNMAP_FLAG_ALL 0x2
#define VFIO_DMA_UNMAP_FLAG_VADDR 0x4
#define VFIO_IOMMU_UNMAP_DMA 0x3b72

#define VFIO_IOMMU_ENABLE 0x3b73
#define VFIO_IOMMU_DISABLE 0x3b74

struct vfio_iommu_type1_dirty_bitmap {
	uint32_t argsz;
	uint32_t flags;
	uint8_t data[];            /* struct vfio_iommu_type1_dirty_bitmap_get with GET_BITMAP */
};
#define VFIO_IOMMU_DIRTY_PAGES_FLAG_START 0x1
#define VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP 0x2
#define VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP 0x4

struct vfio_iommu_type1_dirty_bitmap_get {
	uint64_t iova;
	uint64_t size;
	struct vfio_bitmap bitmap;
};
#define VFIO_IOMMU_DIRTY_PAGES 0x3b75

/* ---- sPAPR TCE IOMMU and EEH (powerpc) ---- */

struct vfio_iommu_spapr_tce_ddw_info {
	uint64_t pgsizes;
	uint32_t max_dynamic_windows_supported;
	uint32_t levels;
};

struct vfio_iommu_spapr_tce_info {
	uint32_t argsz;
	uint32_t flags;
	uint32_t dma32_window_start;
	uint32_t dma32_window_size;
	struct vfio_iommu_spapr_tce_ddw_info ddw;
};
#define VFIO_IOMMU_SPAPR_INFO_DDW 0x1
#define VFIO_IOMMU_SPAPR_TCE_GET_INFO 0x3b70

struct vfio_eeh_pe_err {
	uint32_t type;
	uint32_t func;
	uint64_t addr;
	uint64_t mask;
};

struct vfio_eeh_pe_op {
	uint32_t argsz;
	uint32_t flags;
	uint32_t op;
	union {
		struct vfio_eeh_pe_err err;
	};
};

#define VFIO_EEH_PE_DISABLE 0
#define VFIO_EEH_PE_ENABLE 1
#define VFIO_EEH_PE_UNFREEZE_IO 2
#define VFIO_EEH_PE_UNFREEZE_DMA 3
#define VFIO_EEH_PE_GET_STATE 4
#define VFIO_EEH_PE_STATE_NORMAL 0
#define VFIO_EEH_PE_STATE_RESET 1
#define VFIO_EEH_PE_STATE_STOPPED 2
#define VFIO_EEH_PE_STATE_STOPPED_DMA 4
#define VFIO_EEH_PE_STATE_UNAVAIL 5
#define VFIO_EEH_PE_RESET_DEACTIVATE 5
#define VFIO_EEH_PE_RESET_HOT 6
#define VFIO_EEH_PE_RESET_FUNDAMENTAL 7
#define VFIO_EEH_PE_CONFIGURE 8
#define VFIO_EEH_PE_INJECT_ERR 9
#define VFIO_EEH_PE_OP 0x3b79

struct vfio_iommu_spapr_register_memory {
	uint32_t argsz;
	uint32_t flags;
	uint64_t vaddr;
	uint64_t size;
};
#define VFIO_IOMMU_SPAPR_REGISTER_MEMORY 0x3b75
#define VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY 0x3b76

struct vfio_iommu_spapr_tce_create {
	uint32_t argsz;
	uint32_t flags;
	uint32_t page_shift;
	uint32_t __resv1;
	uint64_t window_size;
	uint32_t levels;
	uint32_t __resv2;
	uint64_t start_addr;       /* out */
};
#define VFIO_IOMMU_SPAPR_TCE_CREATE 0x3b77

struct vfio_iommu_spapr_tce_remove {
	uint32_t argsz;
	uint32_t flags;
	uint64_t start_addr;
};
#define VFIO_IOMMU_SPAPR_TCE_REMOVE 0x3b78
