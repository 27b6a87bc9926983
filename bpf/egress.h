/* Envelope: the map keys and values of the egress enforcement programs (bpf/egress.c).
 *
 * Mirrored in sensor/mirrors.py (EgressKey4, EgressKey6, EgressPorts, EgressRule,
 * EgressPortKey, EgressNameKey, EgressNameRule, EgressLearnedKey, EgressLearned, EgressMeta,
 * EgressCgroup) and checked field by field by tests/unit/test_bpf_headers.py without a
 * compiler. Every hole is a named padding field. Addresses are in network byte order, ports
 * in host byte order.
 */
#ifndef ENVELOPE_EGRESS_H
#define ENVELOPE_EGRESS_H

#include <linux/types.h>

#ifndef EGRESS_MAX_RANGES
#define EGRESS_MAX_RANGES 4 /* port ranges per protocol of a trie entry; -D to change */
#endif
#define EGRESS_INLINE_PORTS 8 /* exact ports held in a trie entry; more go to `ports` */

#define EGRESS_MODE_OBSERVE 0
#define EGRESS_MODE_ALERT 1
#define EGRESS_MODE_ENFORCE 2

#define EGRESS_FAMILY_V4 4 /* family in learned keys (events carry ENV_AF_*) */
#define EGRESS_FAMILY_V6 6

/* flags of struct egress_ports */
#define EGRESS_PORTS_ANY 0x1  /* every port */
#define EGRESS_PORTS_MORE 0x2 /* exact ports beyond the inline ones, in `ports` */

/* `rules4_<gen>`, `rules6_<gen>`: LPM tries keyed by the destination address alone. */
#define EGRESS_KEY4_SIZE 8
struct egress_key4 {
	__u32 prefixlen; /* 0 */
	__u8 addr[4];    /* 4 */
};

#define EGRESS_KEY6_SIZE 20
struct egress_key6 {
	__u32 prefixlen; /* 0 */
	__u8 addr[16];   /* 4 */
};

#define EGRESS_PORT_RANGE_SIZE 4
struct egress_port_range {
	__u16 lo; /* 0 inclusive */
	__u16 hi; /* 2 inclusive */
};

/* The ports one protocol may reach at a destination: answered by the trie lookup itself. */
#define EGRESS_PORTS_SIZE (24 + EGRESS_PORT_RANGE_SIZE * EGRESS_MAX_RANGES)
struct egress_ports {
	__u32 rule_id;                          /*  0 generation << 24 | index; keys `ports` */
	__u8 flags;                             /*  4 EGRESS_PORTS_* */
	__u8 nports;                            /*  5 inline exact ports used */
	__u8 nranges;                           /*  6 ranges used */
	__u8 pad;                               /*  7 */
	__u16 ports[EGRESS_INLINE_PORTS];       /*  8 */
	struct egress_port_range ranges[EGRESS_MAX_RANGES]; /* 24 */
};

/* The value of the address tries: the TCP and the UDP ports of one prefix. */
#define EGRESS_RULE_SIZE (2 * EGRESS_PORTS_SIZE)
struct egress_rule {
	struct egress_ports tcp; /* 0 */
	struct egress_ports udp; /* EGRESS_PORTS_SIZE */
};

/* `ports`, a hash of the exact ports beyond the inline ones (value: one byte, always 1). */
#define EGRESS_PORT_KEY_SIZE 8
struct egress_port_key {
	__u32 rule_id; /* 0 */
	__u16 port;    /* 4 */
	__u16 pad;     /* 6 */
};

/* ---- names ----------------------------------------------------------------------------------
 * `names_<gen>`: an LPM trie keyed by the name written backwards, lower case, dotted
 * ("api.example.com" -> "moc.elpmaxe.ipa"). An exact name is stored with its terminating NUL,
 * so it matches only itself; a suffix pattern "*.svc.example.com" is stored as
 * "moc.elpmaxe.cvs." (no NUL) and matches the names below it, at most `max_labels` labels
 * deeper (the question's labels less `base_labels`). The longest stored match decides. */
#define EGRESS_NAME_LEN 256
#define EGRESS_NAME_KEY_SIZE 260
struct egress_name_key {
	__u32 prefixlen;             /*   0 bits */
	char name[EGRESS_NAME_LEN];  /*   4 reversed, NUL-terminated for exact names */
};

#define EGRESS_NAME_EXACT 0
#define EGRESS_NAME_SUFFIX 1
#define EGRESS_NAME_RULE_SIZE (2 * EGRESS_PORTS_SIZE + 8)
struct egress_name_rule {
	struct egress_ports tcp; /* 0 */
	struct egress_ports udp; /* EGRESS_PORTS_SIZE */
	__u32 name_id;           /* generation << 24 | index of the name entry */
	__u8 kind;               /* EGRESS_NAME_* */
	__u8 max_labels;         /* a suffix pattern: labels allowed in front of it (>= 1) */
	__u16 base_labels;       /* labels of a suffix pattern's suffix (svc.example.com: 3) */
};

/* `learned`, an LRU hash: a destination this cgroup received in a DNS answer for an allowed
 * name, with one entry per allowed exact port; port 0 carries the name's ranges. */
#define EGRESS_LEARNED_KEY_SIZE 32
struct egress_learned_key {
	__u64 cgroup_id; /*  0 the socket's cgroup */
	__u8 family;     /*  8 EGRESS_FAMILY_* */
	__u8 proto;      /*  9 IPPROTO_TCP or IPPROTO_UDP */
	__u16 port;      /* 10 an exact port, or 0 for the ranges */
	__u32 pad;       /* 12 */
	__u8 addr[16];   /* 16 */
};

#define EGRESS_LEARNED_SIZE (32 + EGRESS_PORT_RANGE_SIZE * EGRESS_MAX_RANGES)
struct egress_learned {
	__u64 expires_ns;  /*  0 coarse ktime: answer received + TTL + grace */
	__u64 learned_ns;  /*  8 coarse ktime the answer was received */
	__u32 name_id;     /* 16 the name entry that allowed it */
	__u32 ttl;         /* 20 seconds, as answered */
	__u8 flags;        /* 24 EGRESS_PORTS_ANY for port 0 */
	__u8 nranges;      /* 25 */
	__u16 pad;         /* 26 */
	__u32 pad2;        /* 28 */
	struct egress_port_range ranges[EGRESS_MAX_RANGES]; /* 32 */
};

/* `dns_stats`, per CPU, by index: what the DNS answer parser did. */
#define EGRESS_DNS_ANSWERS 0        /* responses from an allowed resolver, parsed */
#define EGRESS_DNS_LEARNED 1        /* addresses learned (one per address, not per port) */
#define EGRESS_DNS_NOT_ALLOWED 2    /* responses for a name no entry allows */
#define EGRESS_DNS_TRUNCATED 3      /* address records past the parser's limits, not learned */
#define EGRESS_DNS_MALFORMED 4      /* responses that did not parse */
#define EGRESS_DNS_LEARN_FAILED 5   /* learned-map updates that failed */
#define EGRESS_DNS_OTHER_RESOLVER 6 /* responses from a resolver the policy does not allow */
#define EGRESS_DNS_STATS 8

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

_Static_assert(sizeof(struct egress_key4) == EGRESS_KEY4_SIZE, "egress_key4 size");
_Static_assert(sizeof(struct egress_key6) == EGRESS_KEY6_SIZE, "egress_key6 size");
_Static_assert(sizeof(struct egress_port_range) == EGRESS_PORT_RANGE_SIZE, "port range size");
_Static_assert(sizeof(struct egress_ports) == EGRESS_PORTS_SIZE, "egress_ports size");
_Static_assert(sizeof(struct egress_rule) == EGRESS_RULE_SIZE, "egress_rule size");
_Static_assert(sizeof(struct egress_port_key) == EGRESS_PORT_KEY_SIZE, "egress_port_key size");
_Static_assert(sizeof(struct egress_name_key) == EGRESS_NAME_KEY_SIZE, "egress_name_key size");
_Static_assert(sizeof(struct egress_name_rule) == EGRESS_NAME_RULE_SIZE, "egress_name_rule size");
_Static_assert(sizeof(struct egress_learned_key) == EGRESS_LEARNED_KEY_SIZE, "learned key size");
_Static_assert(sizeof(struct egress_learned) == EGRESS_LEARNED_SIZE, "egress_learned size");
_Static_assert(sizeof(struct egress_meta) == EGRESS_META_SIZE, "egress_meta size");
_Static_assert(sizeof(struct egress_cgroup) == EGRESS_CGROUP_SIZE, "egress_cgroup size");

#endif /* ENVELOPE_EGRESS_H */
