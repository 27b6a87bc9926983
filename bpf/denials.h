/* Envelope: the map values of the seccomp-denial visibility programs (bpf/denials.c).
 *
 * Mirrored in sensor/mirrors.py (DenialCgroup, DenialThread, DenialKey, DenialCount) and checked
 * by tests/unit/test_bpf_headers.py.
 */
#ifndef ENVELOPE_DENIALS_H
#define ENVELOPE_DENIALS_H

#include <linux/types.h>

#define DENIALS_NR_SLOTS 512 /* syscall numbers in the allowed bitmap */
#define DENIALS_MODE_WATCH 0   /* cgroup migrations only (the policy leaves syscalls out) */
#define DENIALS_MODE_ALERT 1
#define DENIALS_MODE_ENFORCE 2

#define DENIAL_KIND_DENIED 1  /* stopped by the filter, seen at sys_exit */
#define DENIAL_KIND_ALERTED 2 /* alert mode: outside the allowed set, seen at sys_enter */

/* `lost`, per CPU */
#define DENIALS_LOST_RINGBUF 0     /* records dropped: ring buffer full */
#define DENIALS_LOST_COUNTS_FULL 1 /* calls not counted in `counts` (full): one record each */
#define DENIALS_LOST_SLOTS 2

/* `cgroups`: cgroup id -> how its denials are reported. */
/* denial_cgroup.flags */
#define DENIAL_F_SOCKETS 0x1 /* socket is restricted to unix, netlink, TCP and UDP */

#define DENIAL_CGROUP_SIZE 112
struct denial_cgroup {
	__u32 mode;                           /*  0 DENIALS_MODE_* */
	__s32 deny_errno;                     /*  4 the filter's errno in enforce mode */
	__u64 allowed[DENIALS_NR_SLOTS / 64]; /*  8 alert mode: syscalls the policy allows */
	__u64 uring_seen[4];                  /* 72 io_uring opcodes already announced (set by BPF) */
	__u32 flags;                          /* 104 DENIAL_F_* */
	__u32 pad;                            /* 108 */
};

/* `entered`: thread id -> the syscall it is in and the cgroup it entered it from. */
#define DENIAL_THREAD_SIZE 16
struct denial_thread {
	__u32 nr;        /*  0 */
	__u32 pad;       /*  4 */
	__u64 cgroup_id; /*  8 */
};

/* `counts`: every denial (or alert) is counted here, in the kernel, whatever the rate; the
 * first call of each key is also announced with its context as one EV_SECCOMP_DENIAL. */
#define DENIAL_KEY_SIZE 24
struct denial_key {
	__u64 cgroup_id; /*  0 */
	__u32 pid;       /*  8 thread group */
	__u32 nr;        /* 12 syscall number */
	__u32 context;   /* 16 hash of the destination, or of socket()'s arguments, else 0 */
	__u32 kind;      /* 20 DENIAL_KIND_* */
};

#define DENIAL_COUNT_SIZE 16
struct denial_count {
	__u64 count;      /* 0 */
	__u64 last_ktime; /* 8 */
};

_Static_assert(sizeof(struct denial_cgroup) == DENIAL_CGROUP_SIZE, "denial_cgroup size");
_Static_assert(sizeof(struct denial_key) == DENIAL_KEY_SIZE, "denial_key size");
_Static_assert(sizeof(struct denial_count) == DENIAL_COUNT_SIZE, "denial_count size");
_Static_assert(sizeof(struct denial_thread) == DENIAL_THREAD_SIZE, "denial_thread size");

#endif /* ENVELOPE_DENIALS_H */
