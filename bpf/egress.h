/* Envelope: the map keys and values of the egress enforcement programs (bpf/egress.c).
 *
 * Mirrored in sensor/mirrors.py (EgressKey, EgressRule, EgressPortKey, EgressMeta,
 * EgressCgroup) and checked field by field by tests/unit/test_bpf_headers.py without a
 * compiler. Every hole is a named padding field. Addresses are in network byte order (IPv4
 * in addr[0..3]), ports in host byte order.
 */
#ifndef ENVELOPE_EGRESS_H
#define ENVELOPE_EGRESS_H

#include <linux/types.h>

#ifndef EGRESS_MAX_RANGES
#define EGRESS_MAX_RANGES 8 /* port ranges per trie entry; -D to change */
#endif

#define EGRESS_MODE_OBSERVE 0
#define EGRESS_MODE_ALERT 1
#define EGRESS_MODE_ENFORCE 2

/* prefix bits before the address in struct egress_key: generation, protocol, family, pad */
#define EGRESS_FIXED_BITS 32
#define EGRESS_FAMILY_V4 4 /* family in the trie key (events carry ENV_AF_*) */
#define EGRESS_FAMILY_V6 6

/* `rules`, an LPM trie: the first EGRESS_FIXED_BITS after prefixlen are always in the prefix. */
#define EGRESS_KEY_SIZE 24
struct egress_key {
	__u32 prefixlen; /*  0 */
	__u8 gen;        /*  4 rule generation (0 or 1) */
	__u8 proto;      /*  5 IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;     /*  6 EGRESS_FAMILY_* */
	__u8 pad;        /*  7 */
	__u8 addr[16];   /*  8 */
};

#define EGRESS_PORT_RANGE_SIZE 4
struct egress_port_range {
	__u16 lo; /* 0 inclusive */
	__u16 hi; /* 2 inclusive */
};

/* The value of `rules`; its size follows EGRESS_MAX_RANGES. */
#define EGRESS_RULE_SIZE (8 + EGRESS_PORT_RANGE_SIZE * EGRESS_MAX_RANGES)
struct egress_rule {
	__u32 rule_id;  /*  0 generation << 24 | index; keys exact ports in `ports` */
	__u8 any_port;  /*  4 */
	__u8 nranges;   /*  5 ranges used */
	__u16 pad;      /*  6 */
	struct egress_port_range ranges[EGRESS_MAX_RANGES]; /* 8 */
};

/* `ports`, a hash of the exact ports of each rule (value: one byte, always 1). */
#define EGRESS_PORT_KEY_SIZE 8
struct egress_port_key {
	__u32 rule_id; /* 0 */
	__u16 port;    /* 4 */
	__u16 pad;     /* 6 */
};

/* `meta`, one entry, read by userspace only: which workload and policy this pinned set enforces. */
#define EGRESS_WORKLOAD_LEN 192
#define EGRESS_META_SIZE 240
struct egress_meta {
	__u8 policy_hash[32];               /*   0 sha256 of the policy's canonical JSON */
	char workload[EGRESS_WORKLOAD_LEN]; /*  32 NUL-padded workload key (truncated) */
	__u64 applied_ns;                   /* 224 wall clock of the last rule swap */
	__u32 rules;                        /* 232 trie entries of the active generation */
	__u32 generation_count;             /* 236 */
};

/* `cgroups`: cgroup id -> where this set is attached. */
#define EGRESS_CGROUP_PATH_LEN 248
#define EGRESS_CGROUP_SIZE 256
struct egress_cgroup {
	char path[EGRESS_CGROUP_PATH_LEN]; /*   0 NUL-padded, the tail kept when too long */
	__u64 attached_ns;                 /* 248 wall clock */
};

_Static_assert(sizeof(struct egress_key) == EGRESS_KEY_SIZE, "egress_key size");
_Static_assert(sizeof(struct egress_port_range) == EGRESS_PORT_RANGE_SIZE, "port range size");
_Static_assert(sizeof(struct egress_rule) == EGRESS_RULE_SIZE, "egress_rule size");
_Static_assert(sizeof(struct egress_port_key) == EGRESS_PORT_KEY_SIZE, "egress_port_key size");
_Static_assert(sizeof(struct egress_meta) == EGRESS_META_SIZE, "egress_meta size");
_Static_assert(sizeof(struct egress_cgroup) == EGRESS_CGROUP_SIZE, "egress_cgroup size");

#endif /* ENVELOPE_EGRESS_H */
