/* Envelope: the map keys and values of the file-access programs (bpf/files.c).
 *
 * Mirrored in sensor/mirrors.py (FileKey, FileCount, FileCgroup, FileWatch) and checked by
 * tests/unit/test_bpf_headers.py. The ring-buffer records of these programs are in events.h
 * (EV_FILE_FIRST, EV_FILE_DENIAL), like every record.
 */
#ifndef ENVELOPE_FILES_H
#define ENVELOPE_FILES_H

#include <linux/types.h>
#include "events.h" /* FILE_PATH_LEN, FILE_ACC_*: shared with the records */

/* ---- loss counters: index into the per-CPU `file_loss` array --------------------------------- */
#define FILE_LOSS_RINGBUF_FIRST 0   /* EV_FILE_FIRST reservations that failed (the count is kept) */
#define FILE_LOSS_RINGBUF_DENIAL 1  /* EV_FILE_DENIAL reservations that failed (the report is lost) */
#define FILE_LOSS_MAP_FULL 2        /* new keys not counted: `file_counts` was full */
#define FILE_LOSS_PATH_UNREADABLE 3 /* accesses whose path could not be read from the caller */
#define FILE_LOSS_PATH_TRUNCATED 4  /* accesses whose path was longer than FILE_PATH_LEN - 1 */
#define FILE_LOSS_CGROUP_OVERFLOW 5 /* new keys not counted: the cgroup had FILES_PER_CGROUP */
#define FILE_LOSS_SLOTS 8

/* `file_counts` key: one access pattern to one path by one cgroup. The path is identified by a
 * keyed 64-bit hash (seed FILES_HASH_SEED, random per load, so a workload cannot aim a path at
 * another's hash), which keeps the key short: the kernel hashes 32 bytes per counted access, not
 * a whole path; the path itself is stored once, in the value. An absolute path is one key for
 * the whole cgroup; a relative one is kept per process and base directory (pid, dirfd), so
 * userspace can resolve it against that process's working directory or directory fd. */
#define FILE_KEY_SIZE 32
struct file_key {
	__u64 cgroup_id; /*  0 */
	__u32 access;    /*  8 FILE_ACC_* */
	__u32 pid;       /* 12 0 for an absolute path */
	__s32 dirfd;     /* 16 FILE_DIRFD_ABSOLUTE, FILE_AT_FDCWD or a directory fd */
	__u32 pad;       /* 20 */
	__u64 path_hash; /* 24 keyed hash of the path as given */
};

/* `file_counts` value: cumulative, never drained (userspace takes deltas), and the path. */
#define FILE_COUNT_SIZE 288
struct file_count {
	__u64 count;              /*  0 */
	__u64 first_ns;           /*  8 bpf_ktime_get_ns() of the first access */
	__u64 last_ns;            /* 16 and of the latest */
	__u16 path_len;           /* 24 bytes in path, without the NUL */
	__u16 flags;              /* 26 FILE_F_* */
	__u32 pad;                /* 28 */
	char path[FILE_PATH_LEN]; /* 32 as the process gave it */
};

/* `file_cgroups` value: how many keys a cgroup holds, and what did not fit. */
#define FILE_CGROUP_SIZE 16
struct file_cgroup {
	__u32 keys;     /*  0 keys in file_counts */
	__u32 pad;      /*  4 */
	__u64 overflow; /*  8 accesses with a new key refused at FILES_PER_CGROUP */
};

/* `watched` value (denial role): a cgroup whose refused accesses are reported. */
#define FILE_WATCH_SIZE 8
struct file_watch {
	__u32 mode; /* 0 FILE_WATCH_* */
	__u32 pad;  /* 4 */
};
#define FILE_WATCH_ENFORCE 2 /* report calls that fail with -EACCES */

_Static_assert(sizeof(struct file_key) == FILE_KEY_SIZE, "file_key size");
_Static_assert(sizeof(struct file_count) == FILE_COUNT_SIZE, "file_count size");
_Static_assert(sizeof(struct file_cgroup) == FILE_CGROUP_SIZE, "file_cgroup size");
_Static_assert(sizeof(struct file_watch) == FILE_WATCH_SIZE, "file_watch size");

#endif /* ENVELOPE_FILES_H */
