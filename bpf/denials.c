// SPDX-License-Identifier: Apache-2.0
/*
 * Seccomp denial visibility for enforced cgroups.
 *
 * seccomp runs before the sys_enter tracepoint, so a syscall that a filter denies never reaches
 * raw sys_enter, but it does reach raw sys_exit with its number in orig_ax and -errno as the
 * return value. Ordinary failures with the same errno (an EPERM from a permission check) pass
 * through sys_enter first. So, for the cgroups listed in `cgroups` only:
 *
 *   raw sys_enter  marks the thread: entered[tid] = nr
 *   raw sys_exit   takes the mark; if the thread has no mark for this nr and the return value
 *                  is -deny_errno, the call was stopped before sys_enter: a denial.
 *
 * A thread whose previous syscall never returned (exit, a thread killed in a syscall) leaves a
 * stale mark; the next sys_enter overwrites it and sys_exit compares the number, so a stale mark
 * only hides a denial of the very same syscall number on a recycled thread id.
 *
 * In alert mode the filter's default action is SCMP_ACT_LOG: the call runs, so it does reach
 * sys_enter, and it is reported there when its number is not in the cgroup's allowed bitmap.
 *
 * Counted in the kernel. A program retrying a denied call makes millions of denials a second;
 * each one is counted in `counts` under {cgroup, process, syscall, context, kind}, and only the
 * first of each key is announced as an EV_SECCOMP_DENIAL record (ret is the return value for a
 * denial, 0 for an alert reported at entry), with the thread's name, the call's first three
 * arguments and, for connect/sendto/sendmsg/sendmmsg, the destination it named (read from the
 * caller's memory, which the denied call never touched). The destination (or socket()'s
 * arguments) is hashed into the key's context, so each distinct one is announced. Userspace
 * reads the counts as deltas. When `counts` is full a call is announced on its own (no
 * SECCOMP_DENIAL_F_COUNTED) and counted in `lost[DENIALS_LOST_COUNTS_FULL]`; records the ring
 * buffer cannot take are counted in `lost[DENIALS_LOST_RINGBUF]` (their calls stay counted).
 * The syscall arguments come from the struct pt_regs the raw tracepoints are handed (x86_64:
 * di, si, dx, r10, r8, r9), as orig_ax does.
 *
 * io_uring operations run in the kernel without their syscalls, so neither seccomp nor sys_enter
 * sees them. With -DDENIALS_IO_URING=1 the io_uring:io_uring_submit_req tracepoint announces the
 * first time an enforced cgroup submits each opcode (EV_IO_URING_OP); userspace reports those
 * whose syscall the policy does not allow.
 *
 * With DENIAL_F_SOCKETS (the filter allows socket only for unix, netlink, TCP and UDP: the
 * seccomp compiler's SOCKET_ALLOWED table, which socket_ok mirrors) alert mode reports a socket
 * call outside that table at entry; in enforce mode the filter denies it and it is reported as
 * any other denial. Every report carries the call's first three arguments.
 *
 * Leaving the cgroup: a thread of a watched cgroup that writes some task's pid into another
 * cgroup's cgroup.procs walks out of the cgroup's egress programs and out of this watch. The
 * cgroup:cgroup_attach_task tracepoint fires inside that write; the mark set at sys_enter says
 * which watched cgroup the writer entered the syscall from (after a self-move the current
 * cgroup is already the destination), and a move anywhere else is one EV_CGROUP_ESCAPE record.
 * Userspace decides what it means (a child cgroup, another cgroup of the same workload) and
 * moves the task back. Mode DENIALS_MODE_WATCH watches migrations only.
 *
 * -D flags: DENIALS_MAX_CGROUPS, DENIALS_MAX_THREADS, DENIALS_MAX_KEYS, DENIALS_RINGBUF_PAGES,
 * DENIALS_IO_URING, and the numbers of the syscalls whose arguments are read: DENIALS_NR_SOCKET,
 * DENIALS_NR_CONNECT, DENIALS_NR_SENDTO, DENIALS_NR_SENDMSG, DENIALS_NR_SENDMMSG.
 */
#include <uapi/linux/bpf.h>
#include <linux/ptrace.h>
#include "events.h"
#include "denials.h"

#ifndef DENIALS_MAX_CGROUPS
#define DENIALS_MAX_CGROUPS 1024
#endif
#ifndef DENIALS_MAX_THREADS
#define DENIALS_MAX_THREADS 32768
#endif
#if !defined(DENIALS_NR_SOCKET) || !defined(DENIALS_NR_CONNECT) || !defined(DENIALS_NR_SENDTO) || \
    !defined(DENIALS_NR_SENDMSG) || !defined(DENIALS_NR_SENDMMSG)
#error "DENIALS_NR_SOCKET, DENIALS_NR_CONNECT, DENIALS_NR_SENDTO, DENIALS_NR_SENDMSG and DENIALS_NR_SENDMMSG are required"
#endif
#ifndef DENIALS_MAX_KEYS
#define DENIALS_MAX_KEYS 16384
#endif
#ifndef DENIALS_IO_URING
#define DENIALS_IO_URING 0
#endif
#ifndef DENIALS_RINGBUF_PAGES
#define DENIALS_RINGBUF_PAGES 64
#endif

/* struct denial_cgroup, denial_thread, denial_key, denial_count and the modes are in denials.h. */
BPF_HASH(cgroups, __u64, struct denial_cgroup, DENIALS_MAX_CGROUPS);
BPF_TABLE("lru_hash", __u32, struct denial_thread, entered, DENIALS_MAX_THREADS);
BPF_HASH(counts, struct denial_key, struct denial_count, DENIALS_MAX_KEYS);
BPF_PERCPU_ARRAY(lost, __u64, DENIALS_LOST_SLOTS);
BPF_RINGBUF_OUTPUT(events, DENIALS_RINGBUF_PAGES);

static __always_inline void count_lost(__u32 slot)
{
    __u64 *n = lost.lookup(&slot);
    if (n)
        *n += 1;
}

static __always_inline __u64 reg(struct pt_regs *regs, int i)
{
    __u64 v = 0;
    switch (i) {
    case 0: bpf_probe_read_kernel(&v, sizeof(v), &regs->di); break;
    case 1: bpf_probe_read_kernel(&v, sizeof(v), &regs->si); break;
    case 2: bpf_probe_read_kernel(&v, sizeof(v), &regs->dx); break;
    case 4: bpf_probe_read_kernel(&v, sizeof(v), &regs->r8); break;
    case 5: bpf_probe_read_kernel(&v, sizeof(v), &regs->r9); break;
    }
    return v;
}

/* The destination a sockaddr in the caller's memory names: family, port, address. */
static __always_inline void read_sockaddr(struct seccomp_denial_event *ev, __u64 uaddr, __u64 len)
{
    __u16 family = 0;
    if (!uaddr || len < 8 || bpf_probe_read_user(&family, sizeof(family), (void *)uaddr))
        return;
    __u16 port_be = 0;
    bpf_probe_read_user(&port_be, sizeof(port_be), (void *)(uaddr + 2));
    if (family == ENV_AF_INET && len >= 8) {
        bpf_probe_read_user(ev->addr, 4, (void *)(uaddr + 4));
    } else if (family == ENV_AF_INET6 && len >= 24) {
        bpf_probe_read_user(ev->addr, 16, (void *)(uaddr + 8));
    } else {
        return;
    }
    ev->family = family;
    ev->port = bpf_ntohs(port_be);
    ev->flags |= SECCOMP_DENIAL_F_DESTINATION;
}

/* The call's arguments and what a network call named, into `ev`, and their hash into context. */
static __always_inline void context_of(struct seccomp_denial_event *ev, __u32 nr, struct pt_regs *regs)
{
    ev->args[0] = reg(regs, 0);
    ev->args[1] = reg(regs, 1);
    ev->args[2] = reg(regs, 2);
    if (nr == DENIALS_NR_CONNECT) {
        read_sockaddr(ev, ev->args[1], ev->args[2]);
    } else if (nr == DENIALS_NR_SENDTO) {
        read_sockaddr(ev, reg(regs, 4), reg(regs, 5));
    } else if (nr == DENIALS_NR_SENDMSG || nr == DENIALS_NR_SENDMMSG) {
        /* struct msghdr (first of the mmsghdr vector): void *msg_name; int msg_namelen; ... */
        __u64 msg = ev->args[1], name = 0;
        __u32 namelen = 0;
        if (msg && !bpf_probe_read_user(&name, sizeof(name), (void *)msg) &&
            !bpf_probe_read_user(&namelen, sizeof(namelen), (void *)(msg + 8)))
            read_sockaddr(ev, name, namelen);
    }
    int sock = nr == DENIALS_NR_SOCKET;
    if (sock || (ev->flags & SECCOMP_DENIAL_F_DESTINATION)) {
        __u32 h = 2166136261u; /* FNV-1a over the destination, or socket()'s arguments */
        __u32 words[6] = {ev->family | ((__u32)ev->port << 16), 0, 0, 0, 0, 0};
        if (sock) {
            words[1] = (__u32)ev->args[0];
            words[2] = (__u32)ev->args[1];
            words[3] = (__u32)ev->args[2];
        } else {
            __builtin_memcpy(&words[2], ev->addr, 16);
        }
#pragma unroll
        for (int i = 0; i < 6; i++) {
            h ^= words[i];
            h *= 16777619u;
        }
        ev->context = h ? h : 1;
    }
}

static __always_inline void report(__u64 cgroup_id, __u32 nr, __s64 ret, struct pt_regs *regs, __u32 kind)
{
    __u64 now = bpf_ktime_get_ns();
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    struct seccomp_denial_event local = {};
    context_of(&local, nr, regs);

    struct denial_key key = {};
    key.cgroup_id = cgroup_id;
    key.pid = pid_tgid >> 32;
    key.nr = nr;
    key.context = local.context;
    key.kind = kind;
    struct denial_count *c = counts.lookup(&key);
    if (c) {
        __sync_fetch_and_add(&c->count, 1);
        c->last_ktime = now;
        return;
    }
    struct denial_count first = {1, now};
    int err = counts.update(&key, &first); /* a racing first call of the same key lands in one entry */
    if (err)
        count_lost(DENIALS_LOST_COUNTS_FULL);
    struct seccomp_denial_event *ev = events.ringbuf_reserve(sizeof(*ev));
    if (!ev) {
        count_lost(DENIALS_LOST_RINGBUF);
        return;
    }
    __builtin_memcpy(ev, &local, sizeof(local));
    ev->hdr.type = EV_SECCOMP_DENIAL;
    ev->hdr.version = SECCOMP_DENIAL_EVENT_VERSION;
    ev->hdr.size = sizeof(*ev);
    ev->hdr.ktime = now;
    ev->cgroup_id = cgroup_id;
    ev->pid = pid_tgid >> 32;
    ev->tid = (__u32)pid_tgid;
    ev->nr = nr;
    ev->ret = ret;
    if (!err)
        ev->flags |= SECCOMP_DENIAL_F_COUNTED;
    bpf_get_current_comm(ev->comm, sizeof(ev->comm));
    events.ringbuf_submit(ev, 0);
}

/* The seccomp compiler's SOCKET_ALLOWED: unix, netlink, and TCP or UDP over IPv4 and IPv6. */
static __always_inline int socket_ok(__u64 domain, __u64 type, __u64 protocol)
{
    if (domain == 1 || domain == 16) /* AF_UNIX, AF_NETLINK */
        return 1;
    if (domain != 2 && domain != 10) /* AF_INET, AF_INET6 */
        return 0;
    if ((type & 0xF) == 1) /* SOCK_STREAM: default or IPPROTO_TCP */
        return protocol == 0 || protocol == 6;
    if ((type & 0xF) == 2) /* SOCK_DGRAM: default or IPPROTO_UDP */
        return protocol == 0 || protocol == 17;
    return 0;
}

RAW_TRACEPOINT_PROBE(sys_enter)
{
    __u64 cg = bpf_get_current_cgroup_id();
    struct denial_cgroup *c = cgroups.lookup(&cg);
    if (!c)
        return 0;
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    __u32 nr = (__u32)ctx->args[1];
    struct denial_thread mark = {.nr = nr, .cgroup_id = cg};
    entered.update(&tid, &mark);
    if (c->mode == DENIALS_MODE_ALERT) {
        struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
        int outside = 1;
        if (nr < DENIALS_NR_SLOTS) {
            __u32 w = (nr / 64) & (DENIALS_NR_SLOTS / 64 - 1); /* bounded for the verifier */
            outside = !((c->allowed[w] >> (nr % 64)) & 1);
        }
        if (!outside && nr == DENIALS_NR_SOCKET && (c->flags & DENIAL_F_SOCKETS)) {
            __u64 a[3] = {};
            bpf_probe_read_kernel(&a[0], sizeof(__u64), &regs->di);
            bpf_probe_read_kernel(&a[1], sizeof(__u64), &regs->si);
            bpf_probe_read_kernel(&a[2], sizeof(__u64), &regs->dx);
            outside = !socket_ok(a[0], a[1], a[2]);
        }
        if (outside)
            report(cg, nr, 0, regs, DENIAL_KIND_ALERTED);
    }
    return 0;
}

RAW_TRACEPOINT_PROBE(sys_exit)
{
    __u64 cg = bpf_get_current_cgroup_id();
    struct denial_cgroup *c = cgroups.lookup(&cg);
    if (!c)
        return 0;
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    __s64 ret = (__s64)ctx->args[1];
    __u64 nr = 0;
    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    struct denial_thread *mark = entered.lookup(&tid);
    int entered_this = mark && mark->nr == (__u32)nr;
    if (mark)
        entered.delete(&tid);
    if (!entered_this && c->mode == DENIALS_MODE_ENFORCE && ret == -(__s64)c->deny_errno)
        report(cg, (__u32)nr, ret, regs, DENIAL_KIND_DENIED);
    return 0;
}

#if DENIALS_IO_URING
TRACEPOINT_PROBE(io_uring, io_uring_submit_req)
{
    __u64 cg = bpf_get_current_cgroup_id();
    struct denial_cgroup *c = cgroups.lookup(&cg);
    if (!c)
        return 0;
    __u8 op = args->opcode;
    __u32 w = (op >> 6) & 3;
    __u64 bit = 1ULL << (op & 63);
    __u64 old = __sync_fetch_and_or(&c->uring_seen[w], bit);
    if (old & bit)
        return 0;
    struct io_uring_op_event *ev = events.ringbuf_reserve(sizeof(*ev));
    if (!ev) {
        __sync_fetch_and_and(&c->uring_seen[w], ~bit); /* announce it next time */
        count_lost(DENIALS_LOST_RINGBUF);
        return 0;
    }
    ev->hdr.type = EV_IO_URING_OP;
    ev->hdr.version = IO_URING_OP_EVENT_VERSION;
    ev->hdr.size = sizeof(*ev);
    ev->hdr.ktime = bpf_ktime_get_ns();
    ev->cgroup_id = cg;
    ev->pid = bpf_get_current_pid_tgid() >> 32;
    ev->opcode = op;
    ev->sq_thread = args->sq_thread;
    ev->pad = 0;
    unsigned short loc = args->data_loc_op_str & 0xFFFF;
    bpf_probe_read_kernel_str(ev->op, sizeof(ev->op), (char *)args + loc);
    events.ringbuf_submit(ev, 0);
    return 0;
}
#endif

TRACEPOINT_PROBE(cgroup, cgroup_attach_task)
{
    if (args->dst_root != 0) /* cgroup v1 hierarchies carry no enforcement */
        return 0;
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    struct denial_thread *mark = entered.lookup(&tid);
    if (!mark)
        return 0;
    __u64 src = mark->cgroup_id;
    __u64 dst = args->dst_id;
    if (dst == src || !cgroups.lookup(&src))
        return 0;
    struct cgroup_escape_event *ev = events.ringbuf_reserve(sizeof(*ev));
    if (!ev) {
        count_lost(DENIALS_LOST_RINGBUF);
        return 0;
    }
    ev->hdr.type = EV_CGROUP_ESCAPE;
    ev->hdr.version = CGROUP_ESCAPE_EVENT_VERSION;
    ev->hdr.size = sizeof(*ev);
    ev->hdr.ktime = bpf_ktime_get_ns();
    ev->src_cgroup_id = src;
    ev->dst_cgroup_id = dst;
    ev->pid = args->pid;
    ev->by_pid = bpf_get_current_pid_tgid() >> 32;
    ev->dst_level = args->dst_level;
    ev->pad = 0;
    unsigned short loc = args->data_loc_dst_path & 0xFFFF;
    bpf_probe_read_kernel_str(ev->dst_path, sizeof(ev->dst_path), (char *)args + loc);
    events.ringbuf_submit(ev, 0);
    return 0;
}
