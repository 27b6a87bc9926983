// SPDX-License-Identifier: Apache-2.0
/*
 * Capability checks per cgroup: the capability substrate's observation, compiled by BCC at load
 * time (sensor/capability_observer.py).
 *
 * Every check the capability module makes (cap_capable: capable(), ns_capable(), their noaudit
 * forms, file_ns_capable, ...) is counted in `cap_counts` by (cgroup id, capability, granted or
 * refused, before or after the cgroup's first exec), with its first and last time. Nothing goes
 * through a ring buffer: the counts are read as cumulative readings, and userspace takes deltas.
 *
 *   CAPS_KPROBE=0  the capability:cap_capable tracepoint (Linux 6.14+), read as a raw tracepoint:
 *                  TP_PROTO(cred, target_ns, capable_ns, int cap, int ret), args[3] and args[4];
 *   CAPS_KPROBE=1  where the tracepoint is missing: a kprobe on cap_capable(cred, target_ns,
 *                  int cap, unsigned int opts) takes cap (third argument) per thread, a
 *                  kretprobe its return value. cap_capable is a global function the LSM layer
 *                  calls through its hook list and never inlines; it does not nest or sleep, so
 *                  one pending capability per thread pairs entry and return.
 *
 * One check is left out on purpose: overcommit accounting (security_vm_enough_memory_mm, with
 * cap_vm_enough_memory inlined or not) asks cap_capable(CAP_SYS_ADMIN, noaudit) on every private
 * writable mmap, brk and fork only to size the root reserve under overcommit_memory=2; it
 * refuses nothing and is not a need. It calls cap_capable directly, where every capable() and
 * ns_capable() goes through security_capable. Userspace passes the address ranges of cap_capable
 * (CAPS_CAPABLE_LO/HI) and of those functions (/proc/kallsyms: CAPS_VM_ACCT_LO0/HI0, LO1/HI1);
 * a CAP_SYS_ADMIN check whose caller (cap_capable's return address) lies in one is counted in
 * cap_stats[CAPS_STAT_OVERCOMMIT] instead. Only CAP_SYS_ADMIN checks look at their caller:
 *
 *   slow path  bpf_get_stack (CAPS_STACK_DEPTH frames, about 0.75 us measured here): the frame
 *              after cap_capable's is the caller. The first walk also finds where, among the
 *              CAPS_SCAN_WORDS words above the raw tracepoint's argument array, the return
 *              address into cap_capable and the caller's return address sit (`stack_layout`);
 *   fast path  one bpf_probe_read_kernel of those words: when the word at the learnt position
 *              is a return address into cap_capable, the function holding the argument array was
 *              called from cap_capable directly (the layout learnt), and the caller's return
 *              address is at its learnt position. Otherwise (another program on the tracepoint
 *              adds the tracepoint iterator's frame, a check on an interrupt stack) the slow path
 *              decides and learns again.
 *
 * The kprobe fallback always takes the slow path. Without the ranges (kallsyms hidden) nothing
 * is left out, and userspace says so.
 *
 * The cgroup's first exec is seen at sched_process_exec (a raw tracepoint) and remembered in
 * `exec_cgroups`, so what a runtime or launcher did in the cgroup before exec'ing the workload
 * (runc init's mounts, setuid, capset) is counted apart (CAPS_F_AFTER_EXEC clear).
 *
 * -D flags: CAPS_KPROBE, CAPS_MAX_KEYS, CAPS_MAX_CGROUPS, CAPS_LAST_CAP, CAPS_CAPABLE_LO,
 * CAPS_CAPABLE_HI, CAPS_VM_ACCT_LO0, CAPS_VM_ACCT_HI0, CAPS_VM_ACCT_LO1, CAPS_VM_ACCT_HI1.
 *
 * Reads only tracepoint arguments, kprobe argument registers, helper results and return
 * addresses on the kernel stack found by the kernel's own unwinder; never kernel struct offsets.
 */
#include <uapi/linux/bpf.h>
#include <linux/ptrace.h>
#include "capabilities.h"

#ifndef CAPS_KPROBE
#define CAPS_KPROBE 0
#endif
#ifndef CAPS_MAX_KEYS
#define CAPS_MAX_KEYS 16384
#endif
#ifndef CAPS_MAX_CGROUPS
#define CAPS_MAX_CGROUPS 16384
#endif
#ifndef CAPS_LAST_CAP
#define CAPS_LAST_CAP 40
#endif
#ifndef CAPS_CAPABLE_LO
#define CAPS_CAPABLE_LO 0
#endif
#ifndef CAPS_CAPABLE_HI
#define CAPS_CAPABLE_HI 0
#endif
#ifndef CAPS_VM_ACCT_LO0
#define CAPS_VM_ACCT_LO0 0
#endif
#ifndef CAPS_VM_ACCT_HI0
#define CAPS_VM_ACCT_HI0 0
#endif
#ifndef CAPS_VM_ACCT_LO1
#define CAPS_VM_ACCT_LO1 0
#endif
#ifndef CAPS_VM_ACCT_HI1
#define CAPS_VM_ACCT_HI1 0
#endif
#define CAPS_SYS_ADMIN 21
/* raw tracepoint: this program, bpf_trace_run5, cap_capable, its caller; kprobe: cap_capable, its
 * caller. Eight frames leave room for a wrapper or two on other builds. */
#define CAPS_STACK_DEPTH 8
#define CAPS_SCAN_WORDS 32 /* a power of two: indexes are masked for the verifier */

BPF_HASH(cap_counts, struct cap_key, struct cap_count, CAPS_MAX_KEYS);
BPF_TABLE("lru_hash", __u64, __u8, exec_cgroups, CAPS_MAX_CGROUPS);
BPF_PERCPU_ARRAY(cap_stats, __u64, CAPS_STAT_SLOTS);
/* [0]: 1 + the word above the argument array that holds the return address into cap_capable,
 * [1]: 1 + the word that holds cap_capable's return address into its caller; 0: not learnt. */
BPF_ARRAY(stack_layout, __u32, 2);
#if CAPS_KPROBE
BPF_TABLE("lru_hash", __u32, __u32, pending, 16384); /* tid -> capability asked at entry */
#endif

static __always_inline void bump_stat(__u32 slot)
{
	__u64 *n = cap_stats.lookup(&slot);
	if (n)
		(*n)++;
}

static __always_inline int in_vm_accounting(__u64 ip)
{
	if (ip >= (__u64)CAPS_VM_ACCT_LO0 && ip < (__u64)CAPS_VM_ACCT_HI0)
		return 1;
	return ip >= (__u64)CAPS_VM_ACCT_LO1 && ip < (__u64)CAPS_VM_ACCT_HI1;
}

static __always_inline int in_cap_capable(__u64 ip)
{
	return ip >= (__u64)CAPS_CAPABLE_LO && ip < (__u64)CAPS_CAPABLE_HI;
}

/* Whether cap_capable was called by overcommit accounting (see the top of this file). */
static __always_inline int from_vm_accounting(void *ctx)
{
	__u32 k_ret = 0, k_caller = 1;
	__u32 *ret_at = stack_layout.lookup(&k_ret), *caller_at = stack_layout.lookup(&k_caller);
#if !CAPS_KPROBE
	__u64 words[CAPS_SCAN_WORDS];
	int have_words = bpf_probe_read_kernel(words, sizeof(words), ctx) == 0;
	if (have_words && ret_at && caller_at && *ret_at && *caller_at) {
		__u32 r = (*ret_at - 1) & (CAPS_SCAN_WORDS - 1), c = (*caller_at - 1) & (CAPS_SCAN_WORDS - 1);
		if (in_cap_capable(words[r]))
			return in_vm_accounting(words[c]);
	}
#endif
	__u64 frames[CAPS_STACK_DEPTH] = {};
	bump_stat(CAPS_STAT_STACK_WALKS);
	if (bpf_get_stack(ctx, frames, sizeof(frames), 0) <= 0)
		return 0;
	__u64 ret = 0, caller = 0;
#pragma unroll
	for (int i = 0; i + 1 < CAPS_STACK_DEPTH; i++) {
		if (!ret && in_cap_capable(frames[i])) {
			ret = frames[i];
			caller = frames[i + 1];
		}
	}
	if (!ret)
		return 0; /* cap_capable not among the frames: not a check this program can place */
#if !CAPS_KPROBE
	if (have_words && ret_at && caller_at) {
		__u32 r = 0, c = 0;
#pragma unroll
		for (int i = 0; i < CAPS_SCAN_WORDS; i++) {
			if (!r && words[i] == ret)
				r = i + 1;
			else if (r && !c && words[i] == caller)
				c = i + 1;
		}
		if (r && c) {
			*ret_at = r;
			*caller_at = c;
		}
	}
#endif
	return in_vm_accounting(caller);
}

/* Whether this check is one to leave out: a capability the table does not know (counted as
 * loss), or overcommit accounting's CAP_SYS_ADMIN (see the top of this file). */
static __always_inline int left_out(void *ctx, __u32 cap)
{
	if (cap > CAPS_LAST_CAP) {
		bump_stat(CAPS_STAT_UNKNOWN_CAP);
		return 1;
	}
#if CAPS_VM_ACCT_HI0 && CAPS_CAPABLE_HI
	if (cap == CAPS_SYS_ADMIN && from_vm_accounting(ctx)) {
		bump_stat(CAPS_STAT_OVERCOMMIT);
		return 1;
	}
#endif
	return 0;
}

static __always_inline void count_check(__u32 cap, int ret)
{
	__u64 cg = bpf_get_current_cgroup_id();
	struct cap_key k = {};
	k.cgroup_id = cg;
	k.cap = cap;
	k.flags = (ret ? CAPS_F_REFUSED : 0) | (exec_cgroups.lookup(&cg) ? CAPS_F_AFTER_EXEC : 0);
	__u64 now = bpf_ktime_get_ns();
	struct cap_count *c = cap_counts.lookup(&k);
	if (!c) {
		struct cap_count fresh = {};
		fresh.count = 1;
		fresh.first_ns = now;
		fresh.last_ns = now;
		if (cap_counts.insert(&k, &fresh) == 0)
			return;
		c = cap_counts.lookup(&k); /* another CPU inserted it first */
		if (!c) {
			bump_stat(CAPS_STAT_MAP_FULL);
			return;
		}
	}
	__sync_fetch_and_add(&c->count, 1);
	c->last_ns = now;
}

#if !CAPS_KPROBE
RAW_TRACEPOINT_PROBE(cap_capable)
{
	__u32 cap = (__u32)ctx->args[3];
	if (left_out(ctx, cap))
		return 0;
	count_check(cap, (int)ctx->args[4]);
	return 0;
}
#else
int envelope_cap_capable_entry(struct pt_regs *ctx)
{
	__u32 cap = (__u32)PT_REGS_PARM3(ctx);
	if (left_out(ctx, cap))
		return 0;
	__u32 tid = bpf_get_current_pid_tgid();
	pending.update(&tid, &cap);
	return 0;
}

int envelope_cap_capable_return(struct pt_regs *ctx)
{
	__u32 tid = bpf_get_current_pid_tgid();
	__u32 *cap = pending.lookup(&tid);
	if (!cap)
		return 0;
	__u32 c = *cap;
	pending.delete(&tid);
	count_check(c, (int)PT_REGS_RC(ctx));
	return 0;
}
#endif

/* The cgroup's first exec: its checks count as the workload's from now on. */
RAW_TRACEPOINT_PROBE(sched_process_exec)
{
	__u64 cg = bpf_get_current_cgroup_id();
	__u8 one = 1;
	if (!exec_cgroups.lookup(&cg))
		exec_cgroups.update(&cg, &one);
	return 0;
}
