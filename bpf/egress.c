// SPDX-License-Identifier: Apache-2.0
/*
 * Egress enforcement: cgroup sock_addr programs for connect4, connect6, sendmsg4 and sendmsg6,
 * and a cgroup skb ingress program that learns the addresses of allowed names from the DNS
 * answers the cgroup receives.
 *
 * One instance of this file is loaded per workload and attached (BPF_F_ALLOW_MULTI) to every
 * cgroup of that workload; its programs and maps are pinned under
 * /sys/fs/bpf/envelope/<workload>/ so enforcement outlives the loader.
 *
 * Addresses. `rules4_<gen>` and `rules6_<gen>` are LPM tries keyed by the destination address
 * alone (the least a prefix lookup can be keyed by). The value holds the TCP and the UDP ports
 * of that prefix: "any port", up to EGRESS_MAX_RANGES inclusive ranges and up to
 * EGRESS_INLINE_PORTS exact ports inline, so one lookup answers address and port together;
 * exact ports beyond the inline ones (flag EGRESS_PORTS_MORE) live in the `ports` hash keyed by
 * {rule id, port}. Userspace folds every covering (shorter) prefix's ports into each entry, so
 * the longest-prefix match alone decides. An IPv4-mapped IPv6 destination (::ffff:a.b.c.d) is
 * judged as IPv4.
 *
 * Names. `names_<gen>` is an LPM trie of allowed names written backwards (see egress.h).
 * dns_ingress runs for every packet arriving at a socket of the cgroup, before the socket can
 * read it (the cgroup ingress hook runs from sk_filter, ahead of the receive queue). A DNS
 * response (UDP or TCP, source port EGRESS_DNS_PORT) from a resolver the address rules allow
 * (proto, resolver address, port 53) is parsed: when its question names an allowed name, every
 * A and AAAA record of its answer section (CNAME chains included: the resolver returns the
 * chain's records in that section) is written to `learned`, keyed by this cgroup, the address
 * and each protocol and exact port the name allows (port 0 carries its ranges), to expire at
 * TTL + EGRESS_DNS_GRACE_NS. So the address is allowed before the workload can read the answer,
 * and the first connect after a lookup never races the learning. A connect that no address
 * rule allows is allowed when `learned` holds an unexpired entry for it. Established
 * connections are never cut when an entry expires: only new connects and sends are judged.
 * An answer for a name no entry allows is passed on untouched (its addresses are not learned)
 * and reported as an EV_DNS_VIOLATION in alert and enforce mode.
 *
 * Atomic updates. Two generations of rules and names can live in the maps at once. The
 * `config` array's slot 0 holds one 32-bit state word, generation | mode << 8 | names << 16,
 * read once per call: userspace fills the inactive generation, flips the word with a single
 * map update, then clears the old generation. A call sees either the whole old rule set or the
 * whole new one, never an empty or partial set, and the mode changes in the same word.
 * Learned entries name the entry that admitted them; userspace prunes those a new policy no
 * longer allows right after the flip.
 *
 * Modes: 0 observe (allow, no report), 1 alert (allow and report), 2 enforce (deny with EPERM
 * and report). Every violation, denied or alerted, is one EV_EGRESS_VIOLATION in `events`,
 * naming the process (pid, tid, comm) and the destination; a failed ring-buffer reservation is
 * counted in `lost`. Names are learned in every mode, so a mode change never opens a window of
 * wrongly denied connects.
 *
 * Nothing is special-cased: loopback, DNS (udp/53) and link-local traffic pass only when the
 * policy allows them. A protocol other than TCP or UDP (e.g. ICMP ping sockets) never matches.
 *
 * Configured with -D only:
 *   EGRESS_MAX_RULES        entries per address trie and generation
 *   EGRESS_MAX_PORTS        exact ports beyond the inline ones (both generations)
 *   EGRESS_MAX_RANGES       port ranges per protocol of an entry (default in egress.h)
 *   EGRESS_MAX_NAMES        entries per name trie and generation
 *   EGRESS_MAX_LEARNED      learned (cgroup, address, protocol, port) entries (LRU)
 *   EGRESS_DNS_GRACE_NS     time a learned address outlives its TTL (learned times are on the
 *                           coarse monotonic clock, bpf_ktime_get_coarse_ns)
 *   EGRESS_DNS_MAX_ANSWERS  answer records parsed per DNS response
 *   EGRESS_DNS_PORT         the resolvers' port
 *   EGRESS_MAX_CGROUPS      cgroups recorded per workload
 *   EGRESS_RINGBUF_PAGES    ring buffer size in pages (power of two)
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include "events.h"
#include "egress.h"

#ifndef EGRESS_MAX_RULES
#define EGRESS_MAX_RULES 16384
#endif
#ifndef EGRESS_MAX_PORTS
#define EGRESS_MAX_PORTS 262144
#endif
#ifndef EGRESS_MAX_NAMES
#define EGRESS_MAX_NAMES 4096
#endif
#ifndef EGRESS_MAX_LEARNED
#define EGRESS_MAX_LEARNED 65536
#endif
#ifndef EGRESS_DNS_GRACE_NS
#define EGRESS_DNS_GRACE_NS 10000000000ULL
#endif
#ifndef EGRESS_DNS_MAX_ANSWERS
#define EGRESS_DNS_MAX_ANSWERS 32
#endif
#ifndef EGRESS_DNS_PORT
#define EGRESS_DNS_PORT 53
#endif
#ifndef EGRESS_MAX_CGROUPS
#define EGRESS_MAX_CGROUPS 1024
#endif
#ifndef EGRESS_RINGBUF_PAGES
#define EGRESS_RINGBUF_PAGES 16
#endif

#define STATE_NAMES (1U << 16)
#define DNS_SCRATCH 1024 /* bytes of a DNS message parsed; answer records beyond are not learned */
#define DNS_MASK (DNS_SCRATCH - 1)
#define NAME_MASK (EGRESS_NAME_LEN - 1)
#define DNS_TYPE_A 1
#define DNS_TYPE_AAAA 28

/* Keys and values: see egress.h. */
BPF_LPM_TRIE(rules4_0, struct egress_key4, struct egress_rule, EGRESS_MAX_RULES);
BPF_LPM_TRIE(rules4_1, struct egress_key4, struct egress_rule, EGRESS_MAX_RULES);
BPF_LPM_TRIE(rules6_0, struct egress_key6, struct egress_rule, EGRESS_MAX_RULES);
BPF_LPM_TRIE(rules6_1, struct egress_key6, struct egress_rule, EGRESS_MAX_RULES);
/* Not preallocated: capacity costs memory only when used. */
BPF_F_TABLE("hash", struct egress_port_key, __u8, ports, EGRESS_MAX_PORTS, BPF_F_NO_PREALLOC);
BPF_LPM_TRIE(names_0, struct egress_name_key, struct egress_name_rule, EGRESS_MAX_NAMES);
BPF_LPM_TRIE(names_1, struct egress_name_key, struct egress_name_rule, EGRESS_MAX_NAMES);
BPF_TABLE("lru_hash", struct egress_learned_key, struct egress_learned, learned, EGRESS_MAX_LEARNED);
BPF_ARRAY(config, __u32, 4);
BPF_ARRAY(meta, struct egress_meta, 1);
BPF_HASH(cgroups, __u64, struct egress_cgroup, EGRESS_MAX_CGROUPS);
BPF_PERCPU_ARRAY(lost, __u64, 1);
BPF_PERCPU_ARRAY(dns_stats, __u64, EGRESS_DNS_STATS);
BPF_RINGBUF_OUTPUT(events, EGRESS_RINGBUF_PAGES);

struct dns_address {
	__u8 addr[16];
	__u32 ttl;
	__u32 family;
};

/* Loop state lives in map memory, not in registers: each iteration re-reads it as an unknown
 * bounded value, so the verifier's states at the loop head compare equal and prune, instead of
 * one exact state per byte position. */
struct dns_cursor {
	__u32 pos;
	__u32 len;
	__u32 out;
	__u32 rem;
	__u32 done;
	__u32 nfound;
	__u32 labels;
	__u32 ancount;
};

struct dns_scratch {
	struct dns_cursor cur;
	struct dns_address found[EGRESS_DNS_MAX_ANSWERS];
	__u8 msg[DNS_SCRATCH];
	char dotted[EGRESS_NAME_LEN];
	struct egress_name_key key;
	struct egress_learned_key lkey;
	struct egress_learned lval;
	struct egress_name_rule rule; /* the entry that allowed the question, for the last stage */
	__u64 cgroup_id;
	__u32 gen;
	__u32 mode;
	__u32 flags2;
	__u32 qtype;
};
BPF_PERCPU_ARRAY(scratch, struct dns_scratch, 1);
/* The answer program's later stages, run by tail call so that the verifier checks each on its
 * own (one program holding all three exceeds its budget). Filled by userspace at load. */
#define DNS_STAGE_NAME 0
#define DNS_STAGE_LEARN 1
BPF_PROG_ARRAY(dns_stages, 2);

/* ---- the address and port check ---------------------------------------------------------- */

static __always_inline int in_ranges(struct egress_port_range *ranges, __u8 n, __u16 port)
{
#pragma unroll
	for (int i = 0; i < EGRESS_MAX_RANGES; i++) {
		if (i >= n)
			break;
		if (port >= ranges[i].lo && port <= ranges[i].hi)
			return 1;
	}
	return 0;
}

static __always_inline int ports_allow(struct egress_ports *p, __u16 port)
{
	if (p->flags & EGRESS_PORTS_ANY)
		return 1;
#pragma unroll
	for (int i = 0; i < EGRESS_INLINE_PORTS; i++) {
		if (i >= p->nports)
			break;
		if (p->ports[i] == port)
			return 1;
	}
	if (in_ranges(p->ranges, p->nranges, port))
		return 1;
	if (p->flags & EGRESS_PORTS_MORE) {
		struct egress_port_key pk = {};
		pk.rule_id = p->rule_id;
		pk.port = port;
		return ports.lookup(&pk) != NULL;
	}
	return 0;
}

static __always_inline int rule_allows(struct egress_rule *r, __u8 proto, __u16 port)
{
	if (!r)
		return 0;
	if (proto == IPPROTO_TCP)
		return ports_allow(&r->tcp, port);
	if (proto == IPPROTO_UDP)
		return ports_allow(&r->udp, port);
	return 0;
}

static __always_inline struct egress_rule *lookup4(__u32 gen, __u32 ip4)
{
	struct egress_key4 k;
	k.prefixlen = 32;
	__builtin_memcpy(k.addr, &ip4, 4);
	if (gen)
		return rules4_1.lookup(&k);
	return rules4_0.lookup(&k);
}

static __always_inline struct egress_rule *lookup6(__u32 gen, __u32 a0, __u32 a1, __u32 a2, __u32 a3)
{
	struct egress_key6 k;
	k.prefixlen = 128;
	__builtin_memcpy(&k.addr[0], &a0, 4);
	__builtin_memcpy(&k.addr[4], &a1, 4);
	__builtin_memcpy(&k.addr[8], &a2, 4);
	__builtin_memcpy(&k.addr[12], &a3, 4);
	if (gen)
		return rules6_1.lookup(&k);
	return rules6_0.lookup(&k);
}

static __always_inline int learned_allows(__u8 family, __u8 proto, __u16 port, __u32 a0, __u32 a1,
					  __u32 a2, __u32 a3)
{
	struct egress_learned_key k = {};
	k.cgroup_id = bpf_get_current_cgroup_id();
	k.family = family;
	k.proto = proto;
	k.port = port;
	__builtin_memcpy(&k.addr[0], &a0, 4);
	__builtin_memcpy(&k.addr[4], &a1, 4);
	__builtin_memcpy(&k.addr[8], &a2, 4);
	__builtin_memcpy(&k.addr[12], &a3, 4);
	/* The coarse clock (a jiffy's resolution) is read without touching the clock source:
	 * cheaper on every connect a name allows, and exact enough against TTLs in seconds. */
	__u64 now = bpf_ktime_get_coarse_ns();
	struct egress_learned *l = learned.lookup(&k);
	if (l && now < l->expires_ns)
		return 1;
	k.port = 0;
	l = learned.lookup(&k);
	if (!l || now >= l->expires_ns)
		return 0;
	return (l->flags & EGRESS_PORTS_ANY) || in_ranges(l->ranges, l->nranges, port);
}

static __always_inline int egress_check(struct bpf_sock_addr *ctx, int v6, __u8 op)
{
	__u32 zero = 0;
	__u32 *state = config.lookup(&zero);
	if (!state)
		return 1;
	__u32 word = *state;
	__u8 mode = (word >> 8) & 0xff;
	if (mode == EGRESS_MODE_OBSERVE)
		return 1;
	__u32 gen = word & 1;
	__u8 proto = ctx->protocol;
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	__u32 a0 = 0, a1 = 0, a2 = 0, a3 = 0;
	__u8 family = EGRESS_FAMILY_V4;
	if (v6) {
		a0 = ctx->user_ip6[0];
		a1 = ctx->user_ip6[1];
		a2 = ctx->user_ip6[2];
		a3 = ctx->user_ip6[3];
		if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0x0000ffff)) {
			a0 = a3; /* IPv4-mapped: an IPv4 peer */
			a1 = a2 = a3 = 0;
		} else {
			family = EGRESS_FAMILY_V6;
		}
	} else {
		a0 = ctx->user_ip4;
	}
	struct egress_rule *rule;
	if (family == EGRESS_FAMILY_V4)
		rule = lookup4(gen, a0);
	else
		rule = lookup6(gen, a0, a1, a2, a3);
	if (rule_allows(rule, proto, port))
		return 1;
	if ((word & STATE_NAMES) && learned_allows(family, proto, port, a0, a1, a2, a3))
		return 1;

	int deny = mode == EGRESS_MODE_ENFORCE;
	struct egress_violation_event *ev = events.ringbuf_reserve(sizeof(*ev));
	if (!ev) {
		__u64 *n = lost.lookup(&zero);
		if (n)
			*n += 1;
		return deny ? 0 : 1;
	}
	ev->hdr.type = EV_EGRESS_VIOLATION;
	ev->hdr.version = EGRESS_VIOLATION_EVENT_VERSION;
	ev->hdr.size = sizeof(*ev);
	ev->hdr.ktime = bpf_ktime_get_ns();
	ev->cgroup_id = bpf_get_current_cgroup_id();
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	ev->pid = pid_tgid >> 32;
	ev->tid = (__u32)pid_tgid;
	ev->family = family == EGRESS_FAMILY_V4 ? ENV_AF_INET : ENV_AF_INET6;
	ev->protocol = proto;
	__builtin_memcpy(&ev->addr[0], &a0, 4);
	__builtin_memcpy(&ev->addr[4], &a1, 4);
	__builtin_memcpy(&ev->addr[8], &a2, 4);
	__builtin_memcpy(&ev->addr[12], &a3, 4);
	ev->port = port;
	ev->op = op;
	ev->action = deny ? EGRESS_ACTION_DENIED : EGRESS_ACTION_ALERTED;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	events.ringbuf_submit(ev, 0);
	return deny ? 0 : 1;
}

int connect4(struct bpf_sock_addr *ctx)
{
	return egress_check(ctx, 0, EGRESS_OP_CONNECT);
}

int connect6(struct bpf_sock_addr *ctx)
{
	return egress_check(ctx, 1, EGRESS_OP_CONNECT);
}

int sendmsg4(struct bpf_sock_addr *ctx)
{
	return egress_check(ctx, 0, EGRESS_OP_SENDMSG);
}

int sendmsg6(struct bpf_sock_addr *ctx)
{
	return egress_check(ctx, 1, EGRESS_OP_SENDMSG);
}

/* ---- DNS answers: learning the addresses of allowed names ---------------------------------- */

static __always_inline void dns_count(__u32 index)
{
	__u64 *n = dns_stats.lookup(&index);
	if (n)
		*n += 1;
}

static __always_inline __u16 be16(struct dns_scratch *s, __u32 pos)
{
	return ((__u16)s->msg[pos & DNS_MASK] << 8) | s->msg[(pos + 1) & DNS_MASK];
}

/* Write one learned entry unless a longer-lived one is there already. */
static __always_inline void learn_one(struct dns_scratch *s, __u16 port)
{
	s->lkey.port = port;
	struct egress_learned *cur = learned.lookup(&s->lkey);
	if (cur && cur->expires_ns >= s->lval.expires_ns)
		return;
	if (learned.update(&s->lkey, &s->lval) != 0)
		dns_count(EGRESS_DNS_LEARN_FAILED);
}

static __always_inline void learn_ports(struct dns_scratch *s, struct egress_ports *p, __u8 proto)
{
	s->lkey.proto = proto;
	if ((p->flags & EGRESS_PORTS_ANY) || p->nranges) {
		s->lval.flags = p->flags & EGRESS_PORTS_ANY;
		s->lval.nranges = p->nranges;
#pragma unroll
		for (int i = 0; i < EGRESS_MAX_RANGES; i++)
			s->lval.ranges[i] = p->ranges[i];
		learn_one(s, 0);
	}
	s->lval.flags = 0;
	s->lval.nranges = 0;
#pragma unroll
	for (int i = 0; i < EGRESS_INLINE_PORTS; i++) {
		if (i >= p->nports)
			break;
		learn_one(s, p->ports[i]);
	}
}

int dns_ingress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	__u32 *state = config.lookup(&zero);
	if (!state)
		return 1;
	__u32 word = *state;
	if (!(word & STATE_NAMES))
		return 1;
	__u32 gen = word & 1;
	__u8 mode = (word >> 8) & 0xff;

	__u8 proto = 0, family;
	__u32 l4 = 0;
	__u32 src[4] = {};
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		__u8 vihl = 0;
		__u16 frag = 0;
		if (bpf_skb_load_bytes(skb, 0, &vihl, 1) || bpf_skb_load_bytes(skb, 6, &frag, 2) ||
		    bpf_skb_load_bytes(skb, 9, &proto, 1) || bpf_skb_load_bytes(skb, 12, &src[0], 4))
			return 1;
		if (bpf_ntohs(frag) & 0x3fff) /* a fragment: the message is not all here */
			return 1;
		l4 = (vihl & 0xf) * 4;
		family = EGRESS_FAMILY_V4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, 6, &proto, 1) || bpf_skb_load_bytes(skb, 8, src, 16))
			return 1;
		l4 = 40; /* extension headers are not followed */
		family = EGRESS_FAMILY_V6;
	} else {
		return 1;
	}
	__u16 sport = 0;
	__u32 dns_off;
	if (proto == IPPROTO_UDP) {
		if (bpf_skb_load_bytes(skb, l4, &sport, 2))
			return 1;
		dns_off = l4 + 8;
	} else if (proto == IPPROTO_TCP) {
		__u8 doff = 0;
		if (bpf_skb_load_bytes(skb, l4, &sport, 2) || bpf_skb_load_bytes(skb, l4 + 12, &doff, 1))
			return 1;
		dns_off = l4 + (doff >> 4) * 4 + 2; /* a segment that starts a length-prefixed message */
	} else {
		return 1;
	}
	if (bpf_ntohs(sport) != EGRESS_DNS_PORT)
		return 1;
	if (skb->len < dns_off + 12)
		return 1; /* a bare ACK, or no room for a DNS header */

	/* Only answers from a resolver the address rules allow count. */
	struct egress_rule *resolver;
	if (family == EGRESS_FAMILY_V4)
		resolver = lookup4(gen, src[0]);
	else
		resolver = lookup6(gen, src[0], src[1], src[2], src[3]);
	if (!rule_allows(resolver, proto, EGRESS_DNS_PORT)) {
		dns_count(EGRESS_DNS_OTHER_RESOLVER);
		return 1;
	}

	struct dns_scratch *s = scratch.lookup(&zero);
	if (!s)
		return 1;
	__u64 len = skb->len - dns_off;
	if (len > DNS_SCRATCH - 1)
		len = DNS_SCRATCH - 1;
	/* A mask the compiler cannot drop: the verifier needs to see the bound at the call. */
	asm volatile("%[len] &= 1023" : [len] "+r"(len));
	if (len < 12 || bpf_skb_load_bytes(skb, dns_off, s->msg, len) != 0) {
		dns_count(EGRESS_DNS_MALFORMED);
		return 1;
	}
	__u8 flags1 = s->msg[2], flags2 = s->msg[3];
	if (!(flags1 & 0x80) || (flags1 & 0x78)) /* a query, or an opcode other than QUERY */
		return 1;
	if (be16(s, 4) != 1) {
		dns_count(EGRESS_DNS_MALFORMED);
		return 1;
	}
	__u16 ancount = be16(s, 6);
	dns_count(EGRESS_DNS_ANSWERS);

	/* The question name, dotted and lower case. */
	volatile struct dns_cursor *cur = &s->cur;
	cur->len = len;
	cur->pos = 12;
	cur->out = 0;
	cur->rem = 0;
	cur->done = 0;
	cur->labels = 1;
	cur->ancount = ancount;
	for (int i = 0; i < 256; i++) {
		__u32 p = cur->pos;
		if (p >= cur->len)
			break;
		__u8 c = s->msg[p & DNS_MASK];
		cur->pos = p + 1;
		__u32 o = cur->out;
		if (o >= EGRESS_NAME_LEN - 2)
			break;
		if (cur->rem == 0) {
			if (c == 0) {
				cur->done = 1;
				break;
			}
			if (c > 63)
				break;
			cur->rem = c;
			if (o) {
				s->dotted[o & NAME_MASK] = '.';
				cur->out = o + 1;
				cur->labels += 1;
			}
			continue;
		}
		cur->rem -= 1;
		if (c >= 'A' && c <= 'Z')
			c += 'a' - 'A';
		else if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_'))
			break; /* a byte no host name holds: never allowed */
		s->dotted[o & NAME_MASK] = c;
		cur->out = o + 1;
	}
	__u32 o = cur->out;
	__u32 pos = cur->pos;
	if (!cur->done || o == 0 || o >= EGRESS_NAME_LEN - 1 || pos + 4 > len) {
		dns_count(EGRESS_DNS_MALFORMED);
		return 1;
	}
	s->dotted[o & NAME_MASK] = 0;
	s->qtype = be16(s, pos);
	cur->pos = pos + 4; /* qtype, qclass */
	s->gen = gen;
	s->mode = mode;
	s->flags2 = flags2;
	s->cgroup_id = bpf_skb_cgroup_id(skb);
	dns_stages.call(skb, DNS_STAGE_NAME);
	return 1; /* the stage is missing: nothing learned */
}

/* Stage 2: the question name backwards, looked up in the names trie. */
int dns_name(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct dns_scratch *s = scratch.lookup(&zero);
	if (!s)
		return 1;
	volatile struct dns_cursor *cur = &s->cur;

	/* Backwards, NUL-terminated: the names trie's key. The loop's bound is re-read from the
	 * cursor in map memory each time (volatile), so the verifier never narrows it byte by byte
	 * (which multiplies its states); the lookup's prefix ends at the NUL. */
	__u32 n = cur->out;
	if (n == 0 || n >= EGRESS_NAME_LEN - 1)
		return 1;
	for (int i = 0; i < EGRESS_NAME_LEN; i++) {
		if (i >= cur->out)
			break;
		s->key.name[i & NAME_MASK] = s->dotted[(n - 1 - i) & NAME_MASK];
	}
	__u32 o = cur->out;
	if (o >= EGRESS_NAME_LEN - 1)
		return 1;
	s->key.name[o & NAME_MASK] = 0;
	s->key.prefixlen = (o + 1) * 8;
	struct egress_name_rule *nr;
	if (s->gen)
		nr = names_1.lookup(&s->key);
	else
		nr = names_0.lookup(&s->key);
	if (nr && nr->kind == EGRESS_NAME_SUFFIX) {
		/* Labels in front of the pattern: the question's labels less the suffix's. */
		cur->labels -= nr->base_labels;
		if (cur->labels < 1 || cur->labels > nr->max_labels)
			nr = 0;
	}
	if (!nr) {
		dns_count(EGRESS_DNS_NOT_ALLOWED);
		if (s->mode == EGRESS_MODE_OBSERVE)
			return 1;
		struct dns_violation_event *ev = events.ringbuf_reserve(sizeof(*ev));
		if (!ev) {
			__u64 *n = lost.lookup(&zero);
			if (n)
				*n += 1;
			return 1;
		}
		ev->hdr.type = EV_DNS_VIOLATION;
		ev->hdr.version = DNS_VIOLATION_EVENT_VERSION;
		ev->hdr.size = sizeof(*ev);
		ev->hdr.ktime = bpf_ktime_get_ns();
		ev->cgroup_id = s->cgroup_id;
		ev->qtype = s->qtype;
		ev->action = EGRESS_ACTION_ALERTED;
		ev->pad = 0;
		ev->name_len = o;
		ev->pad2 = 0;
		__builtin_memcpy(ev->name, s->dotted, sizeof(ev->name));
		events.ringbuf_submit(ev, 0);
		return 1;
	}
	if (s->flags2 & 0x0f) /* NXDOMAIN, SERVFAIL...: nothing to learn */
		return 1;
	__builtin_memcpy(&s->rule, nr, sizeof(s->rule));
	dns_stages.call(skb, DNS_STAGE_LEARN);
	return 1;
}

/* Stage 3: the answer section's addresses, learned for the entry's protocols and ports. */
int dns_learn(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct dns_scratch *s = scratch.lookup(&zero);
	if (!s)
		return 1;
	volatile struct dns_cursor *cur = &s->cur;
	struct egress_name_rule *nr = &s->rule;

	/* Pass 1: the address records of the answer section (no helper calls, so the verifier
	 * walks it cheaply). */
	cur->nfound = 0;
	cur->done = 0; /* 1: stop parsing */
	for (int a = 0; a < EGRESS_DNS_MAX_ANSWERS; a++) {
		if (cur->done || a >= cur->ancount)
			break;
		/* The owner name: a compression pointer, or labels ending in one or in the root. */
		cur->rem = 0; /* 1: name skipped */
		for (int i = 0; i < 32; i++) {
			if (cur->rem)
				break;
			__u32 p = cur->pos;
			__u8 l = s->msg[p & DNS_MASK];
			if (p >= cur->len) {
				cur->rem = 1;
			} else if ((l & 0xc0) == 0xc0) {
				cur->pos = p + 2;
				cur->rem = 1;
			} else {
				cur->pos = p + 1 + l;
				cur->rem = l == 0;
			}
		}
		__u32 p = cur->pos;
		if (p + 10 > cur->len) {
			dns_count(EGRESS_DNS_TRUNCATED);
			cur->done = 1;
			continue;
		}
		__u16 type = be16(s, p);
		__u32 ttl = ((__u32)be16(s, p + 4) << 16) | be16(s, p + 6);
		__u16 rdlen = be16(s, p + 8);
		p += 10;
		if (p + rdlen > cur->len) {
			dns_count(EGRESS_DNS_TRUNCATED);
			cur->done = 1;
			continue;
		}
		if ((type == DNS_TYPE_A && rdlen == 4) || (type == DNS_TYPE_AAAA && rdlen == 16)) {
			struct dns_address *d = &s->found[cur->nfound & (EGRESS_DNS_MAX_ANSWERS - 1)];
			d->ttl = ttl > 0x7fffffff ? 0 : ttl; /* RFC 2181: a TTL with the top bit set is 0 */
			d->family = rdlen == 4 ? EGRESS_FAMILY_V4 : EGRESS_FAMILY_V6;
#pragma unroll
			for (int b = 0; b < 16; b++)
				d->addr[b] = b < rdlen ? s->msg[(p + b) & DNS_MASK] : 0;
			cur->nfound += 1;
		}
		cur->pos = p + rdlen;
	}

	/* Pass 2: learn them, for every protocol and port the name allows (times on the coarse
	 * clock the connect check reads). */
	__u64 now = bpf_ktime_get_coarse_ns();
	__builtin_memset(&s->lkey, 0, sizeof(s->lkey));
	s->lkey.cgroup_id = s->cgroup_id;
	s->lval.learned_ns = now;
	s->lval.name_id = nr->name_id;
	s->lval.pad = 0;
	s->lval.pad2 = 0;
	for (int a = 0; a < EGRESS_DNS_MAX_ANSWERS; a++) {
		if (a >= cur->nfound)
			break;
		struct dns_address *d = &s->found[a & (EGRESS_DNS_MAX_ANSWERS - 1)];
		s->lval.ttl = d->ttl;
		s->lval.expires_ns = now + (__u64)d->ttl * 1000000000ULL + EGRESS_DNS_GRACE_NS;
		s->lkey.family = d->family;
		__builtin_memcpy(s->lkey.addr, d->addr, 16);
		learn_ports(s, &nr->tcp, IPPROTO_TCP);
		learn_ports(s, &nr->udp, IPPROTO_UDP);
		dns_count(EGRESS_DNS_LEARNED);
	}
	if (cur->ancount > EGRESS_DNS_MAX_ANSWERS)
		dns_count(EGRESS_DNS_TRUNCATED);
	return 1;
}
