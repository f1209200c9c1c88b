/* PLACEHOLDER: being completed. */
struct vfio_info_cap_header { uint16_t id; uint16_t version; uint32_t next; };
