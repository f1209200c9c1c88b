/*
 * The C twin of each case of benchmarks/bench.py: the same ioctls on the same
 * kernel, with one preallocated struct per ioctl, built against the Linux 7.3
 * UAPI headers (linux-libc-dev 7.3.4). Compiled at run time by bench.py:
 *
 *   gcc -O2 -I <uapi include> -o bench_c bench.c -lcrypto
 *
 * Each timed case prints one JSON line: {"case": ..., "ns": [sample, ...]}.
 * Any failure prints "bench_c: <what>: <strerror>" and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <linux/iommufd.h>
#include <linux/liveupdate.h>
#include <linux/vfio.h>
#include <openssl/sha.h>

#define IOVA 0x100000ULL
#define BUSY_IOVA (1ULL << 32)

static void die(const char *what)
{
	fprintf(stderr, "bench_c: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static void emit(const char *name, const uint64_t *ns, int n)
{
	printf("{\"case\": \"%s\", \"ns\": [", name);
	for (int i = 0; i < n; i++)
		printf("%s%llu", i ? ", " : "", (unsigned long long)ns[i]);
	printf("]}\n");
	fflush(stdout);
}

static void raise_nofile(void)
{
	struct rlimit rl;

	if (!getrlimit(RLIMIT_NOFILE, &rl) && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

static int open_or_die(const char *path)
{
	int fd = open(path, O_RDWR | O_CLOEXEC);

	if (fd < 0)
		die(path);
	return fd;
}

static uint32_t ioas_alloc(int ictx)
{
	struct iommu_ioas_alloc a = { .size = sizeof(a) };

	if (ioctl(ictx, IOMMU_IOAS_ALLOC, &a))
		die("IOMMU_IOAS_ALLOC");
	return a.out_ioas_id;
}

static int memfd_of(const char *name, size_t size)
{
	int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);

	if (fd < 0)
		die("memfd_create");
	if (size && ftruncate(fd, size))
		die("ftruncate");
	return fd;
}

/* map+unmap of one 4 KiB page, with `busy` other pages mapped first */
static void case_map_unmap(const char *name, int busy, int reps)
{
	int ictx = open_or_die("/dev/iommu");
	uint32_t ioas = ioas_alloc(ictx);
	void *buf = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct iommu_ioas_map map = { .size = sizeof(map), .ioas_id = ioas,
		.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
		.length = 4096 };
	struct iommu_ioas_unmap unmap = { .size = sizeof(unmap), .ioas_id = ioas, .length = 4096 };
	uint64_t *ns = calloc(reps, sizeof(*ns));

	if (buf == MAP_FAILED)
		die("mmap");
	for (int i = 0; i < busy; i++) {
		void *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		map.user_va = (uintptr_t)page;
		map.iova = BUSY_IOVA + (uint64_t)i * 4096;
		if (page == MAP_FAILED || ioctl(ictx, IOMMU_IOAS_MAP, &map))
			die("IOMMU_IOAS_MAP (busy)");
	}
	for (int r = 0; r < reps; r++) {
		uint64_t t0 = now_ns();

		map.user_va = (uintptr_t)buf;
		map.iova = IOVA;
		if (ioctl(ictx, IOMMU_IOAS_MAP, &map))
			die("IOMMU_IOAS_MAP");
		unmap.iova = IOVA;
		unmap.length = 4096;
		if (ioctl(ictx, IOMMU_IOAS_UNMAP, &unmap))
			die("IOMMU_IOAS_UNMAP");
		ns[r] = now_ns() - t0;
	}
	emit(name, ns, reps);
	close(ictx);
}

/* with `cdev`, the IOAS has the device's domain attached: the map pins and maps every page */
static void case_map_file(const char *name, size_t size, int reps, const char *cdev)
{
	int ictx = open_or_die("/dev/iommu");
	uint32_t ioas = ioas_alloc(ictx);

	if (cdev) {
		int dev = open_or_die(cdev);
		struct vfio_device_bind_iommufd bind = { .argsz = sizeof(bind), .iommufd = ictx };
		struct vfio_device_attach_iommufd_pt attach = { .argsz = sizeof(attach), .pt_id = ioas };

		if (ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind))
			die("VFIO_DEVICE_BIND_IOMMUFD");
		if (ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach))
			die("VFIO_DEVICE_ATTACH_IOMMUFD_PT");
	}
	int mfd = memfd_of("bench-ram", size);
	struct iommu_ioas_map_file map = { .size = sizeof(map), .ioas_id = ioas, .fd = mfd,
		.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
		.length = size };
	struct iommu_ioas_unmap unmap = { .size = sizeof(unmap), .ioas_id = ioas };
	uint64_t *ns = calloc(reps, sizeof(*ns));

	for (int r = 0; r < reps; r++) {
		uint64_t t0 = now_ns();

		map.iova = BUSY_IOVA;
		if (ioctl(ictx, IOMMU_IOAS_MAP_FILE, &map))
			die("IOMMU_IOAS_MAP_FILE");
		unmap.iova = BUSY_IOVA;
		unmap.length = size;
		if (ioctl(ictx, IOMMU_IOAS_UNMAP, &unmap))
			die("IOMMU_IOAS_UNMAP");
		ns[r] = now_ns() - t0;
	}
	emit(name, ns, reps);
	close(ictx);
}

static void case_alloc_destroy(const char *name, int reps)
{
	int ictx = open_or_die("/dev/iommu");
	struct iommu_ioas_alloc alloc = { .size = sizeof(alloc) };
	struct iommu_destroy destroy = { .size = sizeof(destroy) };
	uint64_t *ns = calloc(reps, sizeof(*ns));

	for (int r = 0; r < reps; r++) {
		uint64_t t0 = now_ns();

		if (ioctl(ictx, IOMMU_IOAS_ALLOC, &alloc))
			die("IOMMU_IOAS_ALLOC");
		destroy.id = alloc.out_ioas_id;
		if (ioctl(ictx, IOMMU_DESTROY, &destroy))
			die("IOMMU_DESTROY");
		ns[r] = now_ns() - t0;
	}
	emit(name, ns, reps);
	close(ictx);
}

/* create a session and preserve n memfds into it (closing it unpreserves, untimed) */
static void case_preserve(const char *name, int n, int reps)
{
	int lu = open_or_die("/dev/liveupdate");
	int *fds = calloc(n, sizeof(*fds));
	uint64_t *ns = calloc(reps, sizeof(*ns));
	struct liveupdate_ioctl_create_session create = { .size = sizeof(create) };
	struct liveupdate_session_preserve_fd pres = { .size = sizeof(pres) };

	raise_nofile();
	for (int i = 0; i < n; i++)
		fds[i] = memfd_of("bench-pres", 4096);
	for (int r = 0; r < reps; r++) {
		uint64_t t0 = now_ns();

		snprintf((char *)create.name, sizeof(create.name), "c-pres-%d-%d", n, r);
		if (ioctl(lu, LIVEUPDATE_IOCTL_CREATE_SESSION, &create))
			die("LIVEUPDATE_IOCTL_CREATE_SESSION");
		for (int i = 0; i < n; i++) {
			pres.fd = fds[i];
			pres.token = i + 1;
			if (ioctl(create.fd, LIVEUPDATE_SESSION_PRESERVE_FD, &pres))
				die("LIVEUPDATE_SESSION_PRESERVE_FD");
		}
		ns[r] = now_ns() - t0;
		close(create.fd);
	}
	emit(name, ns, reps);
	close(lu);
}

/* after kexec, in a fresh process: retrieve session, tokens 1..n, finish */
static void case_retrieve(const char *case_name, const char *session, int n)
{
	struct liveupdate_ioctl_retrieve_session rs = { .size = sizeof(rs) };
	struct liveupdate_session_retrieve_fd rf = { .size = sizeof(rf) };
	struct liveupdate_session_finish fin = { .size = sizeof(fin) };
	uint64_t t0 = now_ns(), ns;
	int lu = open_or_die("/dev/liveupdate");

	snprintf((char *)rs.name, sizeof(rs.name), "%s", session);
	if (ioctl(lu, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, &rs))
		die("LIVEUPDATE_IOCTL_RETRIEVE_SESSION");
	for (int i = 0; i < n; i++) {
		rf.token = i + 1;
		if (ioctl(rs.fd, LIVEUPDATE_SESSION_RETRIEVE_FD, &rf))
			die("LIVEUPDATE_SESSION_RETRIEVE_FD");
	}
	if (ioctl(rs.fd, LIVEUPDATE_SESSION_FINISH, &fin))
		die("LIVEUPDATE_SESSION_FINISH");
	ns = now_ns() - t0;
	emit(case_name, &ns, 1);
}

/*
 * The C restore: retrieve session, tokens 1..n, check each memfd's size, seals
 * and sha256 against `expected` (one "size seals sha256hex" line per token).
 * Timed from the host side as a whole process, like `pyiommufd restore`.
 */
static int case_restore(const char *session, int n, const char *expected)
{
	struct liveupdate_ioctl_retrieve_session rs = { .size = sizeof(rs) };
	struct liveupdate_session_retrieve_fd rf = { .size = sizeof(rf) };
	FILE *f = fopen(expected, "r");
	int lu = open_or_die("/dev/liveupdate"), bad = 0;
	static unsigned char chunk[1 << 20];

	if (!f)
		die(expected);
	snprintf((char *)rs.name, sizeof(rs.name), "%s", session);
	if (ioctl(lu, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, &rs))
		die("LIVEUPDATE_IOCTL_RETRIEVE_SESSION");
	for (int i = 0; i < n; i++) {
		unsigned long long size;
		int seals;
		char want[65], got[65];
		unsigned char md[SHA256_DIGEST_LENGTH];
		SHA256_CTX sha;
		struct stat st;
		off_t off = 0;

		if (fscanf(f, "%llu %d %64s", &size, &seals, want) != 3)
			die("expected file");
		rf.token = i + 1;
		if (ioctl(rs.fd, LIVEUPDATE_SESSION_RETRIEVE_FD, &rf))
			die("LIVEUPDATE_SESSION_RETRIEVE_FD");
		if (fstat(rf.fd, &st))
			die("fstat");
		if ((unsigned long long)st.st_size != size || fcntl(rf.fd, F_GET_SEALS) != seals)
			bad++;
		SHA256_Init(&sha);
		for (;;) {
			ssize_t got_n = pread(rf.fd, chunk, sizeof(chunk), off);

			if (got_n < 0)
				die("pread");
			if (!got_n)
				break;
			SHA256_Update(&sha, chunk, got_n);
			off += got_n;
		}
		SHA256_Final(md, &sha);
		for (int k = 0; k < SHA256_DIGEST_LENGTH; k++)
			sprintf(got + 2 * k, "%02x", md[k]);
		bad += strcmp(got, want) != 0;
	}
	printf("restored %d memfds of %s: %s\n", n, session, bad ? "MISMATCH" : "ok");
	return bad ? 1 : 0;
}

static void rss(void)
{
	char line[256];
	FILE *f = fopen("/proc/self/status", "r");

	while (f && fgets(line, sizeof(line), f))
		if (!strncmp(line, "VmRSS:", 6))
			printf("{\"rss_kb\": %ld}\n", strtol(line + 6, NULL, 10));
}

int main(int argc, char **argv)
{
	const char *c = argc > 1 ? argv[1] : "";
	int a = argc > 2 ? atoi(argv[2]) : 0, b = argc > 3 ? atoi(argv[3]) : 0;

	if (!strcmp(c, "map_unmap"))
		case_map_unmap(argc > 4 ? argv[4] : "map_unmap", a, b);
	else if (!strcmp(c, "map_file"))
		case_map_file("map_file", (size_t)a << 20, b, argc > 4 ? argv[4] : NULL);
	else if (!strcmp(c, "alloc_destroy"))
		case_alloc_destroy("alloc_destroy", a);
	else if (!strcmp(c, "preserve"))
		case_preserve(argc > 4 ? argv[4] : "preserve", a, b);
	else if (!strcmp(c, "retrieve") && argc > 3)
		case_retrieve("retrieve", argv[2], b);
	else if (!strcmp(c, "restore") && argc > 4)
		return case_restore(argv[2], b, argv[4]);
	else if (!strcmp(c, "rss"))
		rss();
	else if (!strcmp(c, "noop"))
		return 0;
	else {
		fprintf(stderr, "usage: bench_c map_unmap BUSY REPS [NAME] | "
			"map_file MIB REPS [CDEV] | alloc_destroy REPS | preserve N REPS [NAME] | retrieve SESSION N | "
			"restore SESSION N EXPECTED | rss | noop\n");
		return 2;
	}
	return 0;
}
