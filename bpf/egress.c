// SPDX-License-Identifier: Apache-2.0
/*
 * Egress enforcement: cgroup sock_addr programs for connect4, connect6, sendmsg4 and sendmsg6.
 *
 * One instance of this file is loaded per workload and attached (BPF_F_ALLOW_MULTI) to every
 * cgroup of that workload; its programs and maps are pinned under
 * /sys/fs/bpf/envelope/<workload>/ so enforcement outlives the loader.
 *
 * Rules. `rules` is an LPM trie keyed by
 *     {prefixlen, generation, protocol, family, pad, addr[16]}
 * where the first 32 bits after prefixlen (generation, protocol, family, pad) are always part
 * of the prefix and the address bits follow (IPv4 in addr[0..3]). A lookup costs O(prefix
 * length), independent of the number of rules. The value names a rule id plus up to
 * EGRESS_MAX_RANGES inclusive port ranges (or "any port"); exact ports live in the `ports` hash
 * keyed by {rule id, port}, so a rule may carry any number of them at O(1) cost.
 * Userspace folds every covering (shorter) prefix's ports into each entry, so the longest-prefix
 * match alone decides.
 *
 * Atomic updates. Two generations of rules can live in the trie at once. The `config` array's
 * slot 0 holds one 32-bit state word, generation | mode << 8, read once per call: userspace
 * fills the inactive generation, flips the word with a single map update, then deletes the old
 * generation. A call sees either the whole old rule set or the whole new one, never an empty
 * or partial set, and the mode changes in the same word.
 *
 * Modes: 0 observe (allow, no report), 1 alert (allow and report), 2 enforce (deny with EPERM
 * and report). Every violation, denied or alerted, is one EV_EGRESS_VIOLATION in `events`,
 * naming the process (pid, tid, comm) and the destination; a failed ring-buffer reservation is
 * counted in `lost`.
 *
 * Nothing is special-cased: loopback, DNS (udp/53) and link-local traffic pass only when the
 * policy allows them. A protocol other than TCP or UDP (e.g. ICMP ping sockets) never matches.
 *
 * Configured with -D only:
 *   EGRESS_MAX_RULES     trie capacity (both generations together)
 *   EGRESS_MAX_PORTS     exact-port hash capacity (both generations together)
 *   EGRESS_MAX_RANGES    port ranges per trie entry (default in egress.h)
 *   EGRESS_MAX_CGROUPS   cgroups recorded per workload
 *   EGRESS_RINGBUF_PAGES ring buffer size in pages (power of two)
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include "events.h"
#include "egress.h"

#ifndef EGRESS_MAX_RULES
#define EGRESS_MAX_RULES 32768
#endif
#ifndef EGRESS_MAX_PORTS
#define EGRESS_MAX_PORTS 262144
#endif
#ifndef EGRESS_MAX_CGROUPS
#define EGRESS_MAX_CGROUPS 1024
#endif
#ifndef EGRESS_RINGBUF_PAGES
#define EGRESS_RINGBUF_PAGES 16
#endif

/* Keys and values: struct egress_key, egress_rule, egress_port_key, egress_meta and
 * egress_cgroup in egress.h. */
BPF_LPM_TRIE(rules, struct egress_key, struct egress_rule, EGRESS_MAX_RULES);
/* Not preallocated: capacity costs memory only when used. */
BPF_F_TABLE("hash", struct egress_port_key, __u8, ports, EGRESS_MAX_PORTS, BPF_F_NO_PREALLOC);
BPF_ARRAY(config, __u32, 4);
BPF_ARRAY(meta, struct egress_meta, 1);
BPF_HASH(cgroups, __u64, struct egress_cgroup, EGRESS_MAX_CGROUPS);
BPF_PERCPU_ARRAY(lost, __u64, 1);
BPF_RINGBUF_OUTPUT(events, EGRESS_RINGBUF_PAGES);

static __always_inline int port_allowed(struct egress_rule *rule, __u16 port)
{
    if (rule->any_port)
        return 1;
#pragma unroll
    for (int i = 0; i < EGRESS_MAX_RANGES; i++) {
        if (i >= rule->nranges)
            break;
        if (port >= rule->ranges[i].lo && port <= rule->ranges[i].hi)
            return 1;
    }
    struct egress_port_key pk = {};
    pk.rule_id = rule->rule_id;
    pk.port = port;
    return ports.lookup(&pk) != NULL;
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

    struct egress_key key = {};
    key.gen = word & 0xff;
    key.proto = ctx->protocol;
    __u16 port = bpf_ntohs((__u16)ctx->user_port);
    __u32 a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    if (v6) {
        a0 = ctx->user_ip6[0];
        a1 = ctx->user_ip6[1];
        a2 = ctx->user_ip6[2];
        a3 = ctx->user_ip6[3];
    } else {
        a0 = ctx->user_ip4;
    }
    /* An IPv4-mapped IPv6 address (::ffff:a.b.c.d) reaches an IPv4 peer: judge it as IPv4. */
    int as_v4 = !v6 || (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0x0000ffff));
    if (as_v4) {
        __u32 ip4 = v6 ? a3 : a0;
        key.family = EGRESS_FAMILY_V4;
        key.prefixlen = EGRESS_FIXED_BITS + 32;
        __builtin_memcpy(key.addr, &ip4, 4);
    } else {
        key.family = EGRESS_FAMILY_V6;
        key.prefixlen = EGRESS_FIXED_BITS + 128;
        __builtin_memcpy(&key.addr[0], &a0, 4);
        __builtin_memcpy(&key.addr[4], &a1, 4);
        __builtin_memcpy(&key.addr[8], &a2, 4);
        __builtin_memcpy(&key.addr[12], &a3, 4);
    }

    struct egress_rule *rule = rules.lookup(&key);
    if (rule && port_allowed(rule, port))
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
    ev->family = key.family == EGRESS_FAMILY_V4 ? ENV_AF_INET : ENV_AF_INET6;
    ev->protocol = key.proto;
    __builtin_memcpy(ev->addr, key.addr, 16);
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
