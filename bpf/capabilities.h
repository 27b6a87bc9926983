/* Envelope: the map layouts of the capability-check counters (bpf/capabilities.c).
 *
 * Mirrored in sensor/mirrors.py (CapKey, CapCount) and checked by tests/unit/test_bpf_headers.py.
 */
#ifndef ENVELOPE_CAPABILITIES_H
#define ENVELOPE_CAPABILITIES_H

#include <linux/types.h>

/* cap_key.flags */
#define CAPS_F_REFUSED 1    /* the check was refused (cap_capable returned non-zero) */
#define CAPS_F_AFTER_EXEC 2 /* made after the cgroup's first exec */

/* `cap_stats` slots (per CPU): checks that are not in `cap_counts`. */
#define CAPS_STAT_MAP_FULL 0    /* cap_counts was full: a check not counted (loss) */
#define CAPS_STAT_UNKNOWN_CAP 1 /* a capability number above CAPS_LAST_CAP (loss) */
#define CAPS_STAT_OVERCOMMIT 2  /* CAP_SYS_ADMIN asked by overcommit accounting: not behaviour */
#define CAPS_STAT_STACK_WALKS 3 /* CAP_SYS_ADMIN checks whose caller took a stack walk to find */
#define CAPS_STAT_SLOTS 4

/* `cap_counts` key: one cgroup, one capability, granted or refused, before or after exec. */
#define CAP_KEY_SIZE 16
struct cap_key {
	__u64 cgroup_id; /*  0 */
	__u32 cap;       /*  8 capability number (0..CAPS_LAST_CAP) */
	__u32 flags;     /* 12 CAPS_F_* */
};

/* `cap_counts` value: cumulative, never drained. */
#define CAP_COUNT_SIZE 24
struct cap_count {
	__u64 count;    /*  0 */
	__u64 first_ns; /*  8 bpf_ktime_get_ns() of the first check */
	__u64 last_ns;  /* 16 of the latest */
};

_Static_assert(sizeof(struct cap_key) == CAP_KEY_SIZE, "cap_key size");
_Static_assert(sizeof(struct cap_count) == CAP_COUNT_SIZE, "cap_count size");

#endif /* ENVELOPE_CAPABILITIES_H */
