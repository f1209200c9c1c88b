/* memfd, file seals and kexec constants the live-update flow needs
 * (Linux UAPI: linux/memfd.h, linux/fcntl.h, linux/kexec.h, linux/reboot.h). */

#define MFD_CLOEXEC 0x0001
#define MFD_ALLOW_SEALING 0x0002
#define MFD_HUGETLB 0x0004
#define MFD_NOEXEC_SEAL 0x0008
#define MFD_EXEC 0x0010

#define F_ADD_SEALS 1033
#define F_GET_SEALS 1034

#define F_SEAL_SEAL 0x0001
#define F_SEAL_SHRINK 0x0002
#define F_SEAL_GROW 0x0004
#define F_SEAL_WRITE 0x0008
#define F_SEAL_FUTURE_WRITE 0x0010
#define F_SEAL_EXEC 0x0020

#define KEXEC_FILE_UNLOAD 0x00000001
#define KEXEC_FILE_ON_CRASH 0x00000002
#define KEXEC_FILE_NO_INITRAMFS 0x00000004

#define LINUX_REBOOT_CMD_KEXEC 0x45584543
