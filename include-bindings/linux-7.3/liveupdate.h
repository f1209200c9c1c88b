/* Live Update Orchestrator, /dev/liveupdate and session fds (Linux 7.3 UAPI).
 * Written for pyiommufd from the 7.3 ABI; checked by tests/conformance. */

#define LIVEUPDATE_IOCTL_TYPE 0xBA
#define LIVEUPDATE_SESSION_NAME_LENGTH 64

enum {
	LIVEUPDATE_CMD_BASE = 0x00,
	LIVEUPDATE_CMD_CREATE_SESSION = 0x00,
	LIVEUPDATE_CMD_RETRIEVE_SESSION = 0x01,
};

enum {
	LIVEUPDATE_CMD_SESSION_BASE = 0x40,
	LIVEUPDATE_CMD_SESSION_PRESERVE_FD = 0x40,
	LIVEUPDATE_CMD_SESSION_RETRIEVE_FD = 0x41,
	LIVEUPDATE_CMD_SESSION_FINISH = 0x42,
	LIVEUPDATE_CMD_SESSION_GET_NAME = 0x43,
};

/* on /dev/liveupdate */
struct liveupdate_ioctl_create_session {
	uint32_t size;
	int32_t fd;                /* out */
	uint8_t name[64];          /* NUL-terminated, 1..63 bytes */
};
#define LIVEUPDATE_IOCTL_CREATE_SESSION 0xba00

struct liveupdate_ioctl_retrieve_session {
	uint32_t size;
	int32_t fd;                /* out */
	uint8_t name[64];
};
#define LIVEUPDATE_IOCTL_RETRIEVE_SESSION 0xba01

/* on a session fd */
struct liveupdate_session_preserve_fd {
	uint32_t size;
	int32_t fd;
	uint64_t token;
};
#define LIVEUPDATE_SESSION_PRESERVE_FD 0xba40

struct liveupdate_session_retrieve_fd {
	uint32_t size;
	int32_t fd;                /* out */
	uint64_t token;
};
#define LIVEUPDATE_SESSION_RETRIEVE_FD 0xba41

struct liveupdate_session_finish {
	uint32_t size;
	uint32_t reserved;         /* must be 0 */
};
#define LIVEUPDATE_SESSION_FINISH 0xba42

struct liveupdate_session_get_name {
	uint32_t size;
	uint32_t reserved;
	uint8_t name[64];          /* out */
};
#define LIVEUPDATE_SESSION_GET_NAME 0xba43
