/* Envelope observation programs, compiled by BCC at load time (sensor/probes.py).
 *
 * Configured only with -D:
 *   RINGBUF_PAGES   ring buffer size in pages (power of two)             default 256
 *   MAX_CGROUPS     cgroup slots in the syscall counter tables            default 1024
 *   NET_RESULT      1: hold net events until sys_exit_{connect,send*} to  default 0
 *                   report the syscall's return value; 0: emit at once.
 *                   Measured here: those syscalls:sys_exit_* tracepoints add ~45 ns to
 *                   every syscall (the perf syscall-exit probe runs for all of them).
 *   EVENT_CGROUP    emit ring-buffer events only for this cgroup id       default 0 (all)
 *   HOOK_SLOTS      program slots extensions may hook syscalls with        default 4
 *   NR_*            syscall numbers of this architecture (x86_64 defaults)
 *
 * Reads only tracepoint fields, helper results and the syscall argument registers of the
 * x86_64 entry frame; never kernel struct offsets, because the kernel headers BCC compiles
 * against need not be the running kernel's.
 */
#include "events.h"
#include "syscalls.h"

#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 256
#endif
#ifndef MAX_CGROUPS
#define MAX_CGROUPS 1024
#endif
#ifndef NET_RESULT
#define NET_RESULT 0
#endif
#ifndef EVENT_CGROUP
#define EVENT_CGROUP 0
#endif
#ifndef HOOK_SLOTS
#define HOOK_SLOTS 4
#endif
#ifndef NR_CLONE
#define NR_CLONE 56
#endif
#ifndef NR_FORK
#define NR_FORK 57
#endif
#ifndef NR_VFORK
#define NR_VFORK 58
#endif
#ifndef NR_EXECVE
#define NR_EXECVE 59
#endif
#ifndef NR_EXIT
#define NR_EXIT 60
#endif
#ifndef NR_EXIT_GROUP
#define NR_EXIT_GROUP 231
#endif
#ifndef NR_EXECVEAT
#define NR_EXECVEAT 322
#endif
#ifndef NR_CLONE3
#define NR_CLONE3 435
#endif

#define OVERFLOW_SLOT MAX_CGROUPS
#define ENV_CLONE_THREAD 0x00010000ULL
#define TASKS_TRACKED 32768


/* ---- maps ------------------------------------------------------------------------------------ */

/* Per-CPU cache of task -> (cgroup id, slot), keyed by the task's syscall register frame
 * (ctx->args[0] of sys_enter: the top of the task's kernel stack, so unique per live task and
 * free to read, unlike every helper that names the task). Entries are valid only for the
 * cache generation they were filled in; a fork (a new task may reuse a freed stack) and a
 * cgroup migration bump the generation. */
#define SLOT_CACHE_WAYS 16
struct slot_cache {
	__u64 key;
	__u64 gen;
	__u64 cgroup_id;
	__u32 slot;
	__u32 bank; /* the slot's counter bank when the entry was filled (see events.h) */
};

/* Syscall counters: per CPU, per cgroup slot, indexed by syscall number. Cumulative only. */
BPF_PERCPU_ARRAY(syscall_counts, struct syscall_slot_counts, MAX_CGROUPS + 1);
/* Slot owner and first-seen bitmap, shared by all CPUs. */
BPF_ARRAY(slot_state, struct syscall_slot_state, MAX_CGROUPS + 1);
/* cgroup id -> slot, consulted only when the per-CPU cache misses. */
BPF_HASH(cgroup_slots, __u64, __u32, MAX_CGROUPS);
/* Free slots; filled by userspace at start and when a cgroup is forgotten. A stack, so a freed
 * slot (its lines still in cache) is the next one handed out. */
BPF_STACK(free_slots, __u32, MAX_CGROUPS);
/* Ids of removed cgroups that hold a slot; userspace reads their last counts, then frees it. */
BPF_QUEUE(removed_cgroups, __u64, MAX_CGROUPS);
BPF_PERCPU_ARRAY(slot_cache, struct slot_cache, SLOT_CACHE_WAYS);
BPF_ARRAY(cache_gen, __u64, 1);

/* Syscall hooks of extensions (sensor.probes.Extension): a program of another family in
 * `hooks` is tail-called at the end of sys_enter for the syscalls of its hook, in the cgroups
 * hooked for it, so an extension that follows a few syscalls of a few cgroups costs nothing to
 * the others: getppid pays no instruction, an unhooked write one array lookup.
 *   hook 0 (HOOK_SOCKET): write, writev, sendto, sendmsg, connect, close (the request capture)
 * `hooked_cgroups`: cgroup id -> hook bits, written by userspace; `hook_slots` caches them per
 * counter slot, filled when a slot is handed out and by userspace for slots that exist. */
#define HOOK_SOCKET 0
BPF_PROG_ARRAY(hooks, HOOK_SLOTS);
BPF_HASH(hooked_cgroups, __u64, __u32, MAX_CGROUPS);
BPF_ARRAY(hook_slots, __u32, MAX_CGROUPS + 1);

BPF_PERCPU_ARRAY(loss_counts, __u64, LOSS_SLOTS);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

/* Fork tracking: pid -> parent pid. Seeded from /proc by userspace at start. */
BPF_TABLE("lru_hash", __u32, __u32, parents, TASKS_TRACKED);
/* Per-thread values stashed at sys_enter for the tracepoint that follows:
 * tid -> its syscall register frame, at execve/execveat (read at sched_process_exec);
 * tid -> clone flags, at clone/clone3/fork/vfork (read at sched_process_fork). */
BPF_TABLE("lru_hash", __u32, __u64, exec_regs, 4096);
BPF_TABLE("lru_hash", __u32, __u64, clone_flags, 4096);
/* Exit status argument: key tgid for exit_group(), EXIT_KEY_THREAD | tid for a thread's exit()
 * (what glibc's pthread_exit calls), which is the process's status only if that thread is the
 * last one to go. */
#define EXIT_KEY_THREAD (1ULL << 32)
BPF_TABLE("lru_hash", __u64, __s32, exit_statuses, 4096);
#if NET_RESULT
BPF_TABLE("lru_hash", __u32, struct net_event, net_pending, 4096);
#endif

/* ---- helpers --------------------------------------------------------------------------------- */

static __always_inline void count_loss(__u32 index)
{
	__u64 *n = loss_counts.lookup(&index);
	if (n)
		(*n)++;
}

static __always_inline int event_wanted(__u64 cgroup_id)
{
#if EVENT_CGROUP
	return cgroup_id == EVENT_CGROUP;
#else
	return 1;
#endif
}

static __always_inline void fill_hdr(struct event_hdr *h, __u16 type, __u16 version, __u32 size)
{
	h->type = type;
	h->version = version;
	h->size = size;
	h->ktime = bpf_ktime_get_ns();
}

static __always_inline void copy_hooks(__u64 cg, __u32 slot)
{
	__u32 *want = hooked_cgroups.lookup(&cg);
	__u32 bits = want ? *want : 0;
	hook_slots.update(&slot, &bits);
}

/* Slow path: find or allocate the slot of `cg` and remember it in this CPU's cache. */
static __always_inline __u32 resolve_slot(__u64 cg, struct slot_cache *cache, __u64 key, __u64 gen)
{
	__u32 slot;
	__u32 *found = cgroup_slots.lookup(&cg);
	if (found) {
		slot = *found;
	} else if (free_slots.pop(&slot) == 0) {
		struct syscall_slot_state *st = slot_state.lookup(&slot);
		if (!st) {
			count_loss(LOSS_SYSCALL_UNATTRIBUTED);
			return OVERFLOW_SLOT;
		}
		/* Userspace zeroed the slot's counters and bitmap before freeing it. */
		st->cgroup_id = cg;
		copy_hooks(cg, slot);
		if (cgroup_slots.insert(&cg, &slot) != 0) {
			/* Another CPU allocated for the same cgroup first: give ours back. */
			st->cgroup_id = 0;
			free_slots.push(&slot, 0);
			found = cgroup_slots.lookup(&cg);
			if (!found) {
				count_loss(LOSS_SYSCALL_UNATTRIBUTED);
				return OVERFLOW_SLOT;
			}
			slot = *found;
		} else {
			/* Again now that the slot is visible: userspace hooks a cgroup by writing
			 * hooked_cgroups, then the slot it finds in cgroup_slots; one of the two copies
			 * sees its write. */
			copy_hooks(cg, slot);
		}
	} else {
		/* No free slot: count in the overflow slot, which is never cached as valid. */
		count_loss(LOSS_SYSCALL_UNATTRIBUTED);
		return OVERFLOW_SLOT;
	}
	cache->key = key;
	cache->gen = gen;
	cache->cgroup_id = cg;
	cache->slot = slot;
	return slot;
}

static __always_inline void emit_first_seen(struct syscall_slot_state *st, __u64 cg, __u32 nr,
					    __u32 word, __u64 bit)
{
	/* Atomic fetch-or: exactly one CPU sees the bit clear and emits. */
	__u64 old = __sync_fetch_and_or(&st->seen[word], bit);
	if (old & bit)
		return;
	if (!event_wanted(cg))
		return;
	struct syscall_first_event *e = events.ringbuf_reserve(sizeof(struct syscall_first_event));
	if (!e) {
		/* Clear the bit again so the next call of this syscall retries the event. */
		__sync_fetch_and_and(&st->seen[word], ~bit);
		count_loss(EV_SYSCALL_FIRST);
		return;
	}
	fill_hdr(&e->hdr, EV_SYSCALL_FIRST, SYSCALL_FIRST_EVENT_VERSION, sizeof(*e));
	e->cgroup_id = cg;
	e->nr = nr;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	events.ringbuf_submit(e, 0);
}

static __always_inline __u64 syscall_arg(void *regs, int off)
{
	__u64 v = 0;
	bpf_probe_read_kernel(&v, sizeof(v), (char *)regs + off);
	return v;
}

static __always_inline void on_special_syscall(void *regs, __u32 nr)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = pid_tgid;
	if (nr == NR_EXECVE || nr == NR_EXECVEAT) {
		/* argv is read at sched_process_exec from the new image's stack, whose pages the
		 * kernel has just written; the caller's argv may sit in pages not yet faulted in
		 * (a forked child's .rodata), which a BPF probe read cannot fault. */
		__u64 r = (__u64)regs;
		exec_regs.update(&tid, &r);
	} else if (nr == NR_EXIT_GROUP || nr == NR_EXIT) {
		__u64 key = nr == NR_EXIT_GROUP ? (pid_tgid >> 32) : (EXIT_KEY_THREAD | tid);
		__s32 status = syscall_arg(regs, REGS_OFF_DI);
		exit_statuses.update(&key, &status);
	} else if (nr == NR_CLONE) {
		__u64 flags = syscall_arg(regs, REGS_OFF_DI);
		clone_flags.update(&tid, &flags);
	} else if (nr == NR_CLONE3) {
		__u64 flags = 0;
		bpf_probe_read_user(&flags, sizeof(flags), (void *)syscall_arg(regs, REGS_OFF_DI));
		clone_flags.update(&tid, &flags);
	} else {
		__u64 flags = 0; /* fork, vfork */
		clone_flags.update(&tid, &flags);
	}
}

/* ---- syscall counting: raw tracepoint sys_enter ---------------------------------------------- */

RAW_TRACEPOINT_PROBE(sys_enter)
{
	/* args[0]: struct pt_regs * of the calling task, args[1]: syscall number. The common path
	 * calls no helper: helper calls are what make a per-syscall probe expensive. */
	__u64 nr = ctx->args[1];
	__u64 key = ctx->args[0];
	__u32 zero = 0;
	/* Kernel stacks are 16 KiB aligned with guard gaps between them: mix in higher bits. */
	__u32 way = ((key >> 14) ^ (key >> 18)) & (SLOT_CACHE_WAYS - 1);
	struct slot_cache *cache = slot_cache.lookup(&way);
	__u64 *genp = cache_gen.lookup(&zero);
	if (!cache || !genp)
		return 0;
	__u64 gen = *genp;
	__u64 cg = cache->cgroup_id;
	__u32 slot = cache->slot;
	__u32 bank = cache->bank;
	struct syscall_slot_state *st = 0;
	if (cache->key == key && cache->gen == gen) {
		st = slot_state.lookup(&slot);
		/* The owner check catches a slot freed (and perhaps reused) since it was cached. */
		if (st && st->cgroup_id != cg)
			st = 0;
	}
	if (!st) {
		cg = bpf_get_current_cgroup_id();
		slot = resolve_slot(cg, cache, key, gen);
		st = slot_state.lookup(&slot);
		if (st) {
			bank = st->bank;
			/* A cgroup's first exec flips its bank and bumps the cache generation, so a
			 * cached bank is never older than the slot's. The overflow slot is never cached. */
			if (slot != OVERFLOW_SLOT)
				cache->bank = bank;
		}
	}
	struct syscall_slot_counts *counts = syscall_counts.lookup(&slot);
	if (!counts || !st)
		return 0;
	__u32 idx = nr < SYSCALL_NR_SLOTS ? nr : SYSCALL_NR_SLOTS - 1;
	idx &= SYSCALL_NR_SLOTS - 1;
	counts->count[((bank & 1) * SYSCALL_NR_SLOTS + idx) & (SYSCALL_BANKS * SYSCALL_NR_SLOTS - 1)]++;
	__u32 word = idx >> 6;
	__u64 bit = 1ULL << (idx & 63);
	if (slot != OVERFLOW_SLOT && !(st->seen[word & (SYSCALL_NR_SLOTS / 64 - 1)] & bit))
		emit_first_seen(st, cg, idx, word & (SYSCALL_NR_SLOTS / 64 - 1), bit);
	switch (idx) {
	case NR_CLONE:
	case NR_FORK:
	case NR_VFORK:
	case NR_EXECVE:
	case NR_EXIT:
	case NR_EXIT_GROUP:
	case NR_EXECVEAT:
	case NR_CLONE3:
		on_special_syscall((void *)ctx->args[0], idx);
		break;
	case NR_WRITE:
	case NR_WRITEV:
	case NR_SENDTO:
	case NR_SENDMSG:
	case NR_CONNECT:
	case NR_CLOSE:
		if (slot != OVERFLOW_SLOT) {
			__u32 *h = hook_slots.lookup(&slot);
			if (h && (*h & (1U << HOOK_SOCKET)))
				hooks.call(ctx, HOOK_SOCKET); /* does not return when a program is there */
		}
		break;
	}
	return 0;
}

/* ---- process lifecycle ------------------------------------------------------------------------ */

static __always_inline void bump_cache_gen(void)
{
	__u32 zero = 0;
	__u64 *g = cache_gen.lookup(&zero);
	if (g)
		__sync_fetch_and_add(g, 1);
}

/* A task that changes cgroup keeps its stack: drop every cached (task, cgroup) pair. */
TRACEPOINT_PROBE(cgroup, cgroup_attach_task)
{
	bump_cache_gen();
	return 0;
}

TRACEPOINT_PROBE(cgroup, cgroup_transfer_tasks)
{
	bump_cache_gen();
	return 0;
}

/* A removed cgroup has no tasks left to count: hand its slot to userspace for release. */
TRACEPOINT_PROBE(cgroup, cgroup_rmdir)
{
	if (args->root != 0) /* hierarchy 0 is cgroup v2; v1 ids are another namespace */
		return 0;
	__u64 id = args->id;
	if (!cgroup_slots.lookup(&id))
		return 0;
	if (removed_cgroups.push(&id, 0) != 0)
		count_loss(LOSS_CGROUP_REMOVED_DROPPED);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_fork)
{
	/* Runs before the child first runs; the child may sit on a reused stack. */
	bump_cache_gen();
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = pid_tgid, ptgid = pid_tgid >> 32;
	__u32 child = args->child_pid;
	__u64 *cf = clone_flags.lookup(&tid);
	if (cf) {
		__u64 f = *cf;
		clone_flags.delete(&tid);
		if (f & ENV_CLONE_THREAD)
			return 0;
	}
	parents.update(&child, &ptgid);
	__u64 cg = bpf_get_current_cgroup_id();
	if (!event_wanted(cg))
		return 0;
	struct fork_event *e = events.ringbuf_reserve(sizeof(struct fork_event));
	if (!e) {
		count_loss(EV_FORK);
		return 0;
	}
	fill_hdr(&e->hdr, EV_FORK, FORK_EVENT_VERSION, sizeof(*e));
	e->cgroup_id = cg;
	e->pid = child;
	e->ppid = ptgid;
	e->parent_tid = tid;
	e->pad = 0;
	events.ringbuf_submit(e, 0);
	return 0;
}

/* At sched_process_exec the new image is set up: the user stack pointer in the task's register
 * frame points at argc, then the argv pointers; the argv strings lie back to back. */
static __always_inline __u32 read_argv(struct exec_event *e, __u64 regs)
{
	__u64 sp = 0, argc = 0, first = 0, last = 0;
	e->argc = 0;
	e->argv_len = 0;
	if (bpf_probe_read_kernel(&sp, sizeof(sp), (void *)(regs + REGS_OFF_SP)) != 0 ||
	    bpf_probe_read_user(&argc, sizeof(argc), (void *)sp) != 0)
		return EXEC_F_NO_ARGV;
	if (argc == 0)
		return 0;
	if (argc > 0xffff)
		return EXEC_F_NO_ARGV;
	if (bpf_probe_read_user(&first, sizeof(first), (void *)(sp + 8)) != 0 ||
	    bpf_probe_read_user(&last, sizeof(last), (void *)(sp + 8 * argc)) != 0)
		return EXEC_F_NO_ARGV;
	/* Length of the last string, read into the event as scratch; overwritten below. */
	long n = bpf_probe_read_user_str(e->argv, sizeof(e->argv), (void *)last);
	if (n <= 0 || last < first)
		return EXEC_F_NO_ARGV;
	__u64 total = last - first + n;
	__u32 flags = 0;
	__u32 len = total;
	if (total > EXEC_ARGV_LEN) {
		len = EXEC_ARGV_LEN;
		flags |= EXEC_F_ARGV_TRUNCATED;
	}
	if (len == 0 || len > EXEC_ARGV_LEN)
		return EXEC_F_NO_ARGV;
	if (bpf_probe_read_user(e->argv, len, (void *)first) != 0)
		return EXEC_F_NO_ARGV;
	e->argc = argc;
	e->argv_len = len;
	return flags;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
	__u32 pid = args->pid;
	__u32 old_pid = args->old_pid;
	__u64 cg = bpf_get_current_cgroup_id();
	/* The cgroup's first exec: its syscalls count in bank 1 from now on. Its execve entered
	 * sys_enter before this, so the slot exists. */
	__u32 *slotp = cgroup_slots.lookup(&cg);
	if (slotp) {
		struct syscall_slot_state *st = slot_state.lookup(slotp);
		if (st && st->cgroup_id == cg && !st->bank) {
			st->bank = 1;
			bump_cache_gen();
		}
	}
	if (!event_wanted(cg)) {
		exec_regs.delete(&old_pid);
		return 0;
	}
	struct exec_event *e = events.ringbuf_reserve(sizeof(struct exec_event));
	if (!e) {
		exec_regs.delete(&old_pid);
		count_loss(EV_EXEC);
		return 0;
	}
	fill_hdr(&e->hdr, EV_EXEC, EXEC_EVENT_VERSION, sizeof(*e));
	e->cgroup_id = cg;
	e->pid = pid;
	e->old_pid = old_pid;
	__u32 flags = 0;
	__u32 *pp = parents.lookup(&pid);
	if (pp) {
		e->ppid = *pp;
	} else {
		e->ppid = 0;
		flags |= EXEC_F_PPID_UNKNOWN;
	}
	unsigned short loc = args->data_loc_filename & 0xFFFF;
	int n = bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), (char *)args + loc);
	e->filename_len = n > 0 ? n - 1 : 0;
	__u64 *regs = exec_regs.lookup(&old_pid);
	if (regs) {
		flags |= read_argv(e, *regs);
		exec_regs.delete(&old_pid);
	} else {
		e->argc = 0;
		e->argv_len = 0;
		flags |= EXEC_F_NO_ARGV;
	}
	e->flags = flags;
	events.ringbuf_submit(e, 0);
	return 0;
}

#if NET_RESULT
static __always_inline void emit_net(struct net_event *src, __u8 with_ret, __s64 ret);
#endif

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = pid_tgid, tgid = pid_tgid >> 32;
	exec_regs.delete(&tid);
	clone_flags.delete(&tid);
#if NET_RESULT
	struct net_event *pending = net_pending.lookup(&tid);
	if (pending) {
		emit_net(pending, 0, 0);
		net_pending.delete(&tid);
	}
#endif
	__u64 thread_key = EXIT_KEY_THREAD | tid, group_key = tgid;
	__s32 *thread_status = exit_statuses.lookup(&thread_key);
	__s32 status = thread_status ? *thread_status : 0;
	if (thread_status)
		exit_statuses.delete(&thread_key);
	if (!args->group_dead)
		return 0;
	parents.delete(&tgid);
	__u32 flags = thread_status ? EXIT_F_CODE_KNOWN : 0;
	__s32 *group_status = exit_statuses.lookup(&group_key);
	if (group_status) {
		status = *group_status;
		flags = EXIT_F_CODE_KNOWN;
		exit_statuses.delete(&group_key);
	}
	__u64 cg = bpf_get_current_cgroup_id();
	if (!event_wanted(cg))
		return 0;
	struct exit_event *e = events.ringbuf_reserve(sizeof(struct exit_event));
	if (!e) {
		count_loss(EV_EXIT);
		return 0;
	}
	fill_hdr(&e->hdr, EV_EXIT, EXIT_EVENT_VERSION, sizeof(*e));
	e->cgroup_id = cg;
	e->pid = tgid;
	e->tid = tid;
	e->exit_status = status;
	e->flags = flags;
	events.ringbuf_submit(e, 0);
	return 0;
}

/* ---- network destinations: cgroup sock_addr hooks (observe only, always allow) --------------- */

#if NET_RESULT
static __always_inline void emit_net(struct net_event *src, __u8 with_ret, __s64 ret)
{
	struct net_event *e = events.ringbuf_reserve(sizeof(struct net_event));
	if (!e) {
		count_loss(EV_NET);
		return;
	}
	bpf_probe_read_kernel(e, sizeof(*e), src);
	if (with_ret) {
		e->flags |= NET_F_RET_KNOWN;
		e->ret = ret;
	}
	events.ringbuf_submit(e, 0);
}
#endif

static __always_inline int observe_sock(struct bpf_sock_addr *ctx, __u8 op, __u16 family)
{
	__u64 cg = bpf_get_current_cgroup_id();
	if (!event_wanted(cg))
		return 1;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = pid_tgid;
	struct net_event ev = {};
	fill_hdr(&ev.hdr, EV_NET, NET_EVENT_VERSION, sizeof(ev));
	ev.cgroup_id = cg;
	ev.pid = pid_tgid >> 32;
	ev.tid = tid;
	ev.family = family;
	ev.protocol = ctx->protocol;
	ev.op = op;
	ev.port = bpf_ntohs((__u16)ctx->user_port);
	if (family == ENV_AF_INET) {
		__u32 a = ctx->user_ip4;
		__builtin_memcpy(ev.addr, &a, 4);
	} else {
		__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2],
		      a3 = ctx->user_ip6[3];
		__builtin_memcpy(&ev.addr[0], &a0, 4);
		__builtin_memcpy(&ev.addr[4], &a1, 4);
		__builtin_memcpy(&ev.addr[8], &a2, 4);
		__builtin_memcpy(&ev.addr[12], &a3, 4);
	}
#if NET_RESULT
	/* Held until the syscall returns; one still held (a syscall that never reached its exit
	 * tracepoint, e.g. sendmmsg's earlier messages) goes out now without a result. */
	struct net_event *held = net_pending.lookup(&tid);
	if (held)
		emit_net(held, 0, 0);
	net_pending.update(&tid, &ev);
#else
	struct net_event *e = events.ringbuf_reserve(sizeof(struct net_event));
	if (!e) {
		count_loss(EV_NET);
		return 1;
	}
	__builtin_memcpy(e, &ev, sizeof(ev));
	events.ringbuf_submit(e, 0);
#endif
	return 1;
}

int envelope_connect4(struct bpf_sock_addr *ctx)
{
	return observe_sock(ctx, NET_OP_CONNECT, ENV_AF_INET);
}

int envelope_connect6(struct bpf_sock_addr *ctx)
{
	return observe_sock(ctx, NET_OP_CONNECT, ENV_AF_INET6);
}

int envelope_sendmsg4(struct bpf_sock_addr *ctx)
{
	return observe_sock(ctx, NET_OP_SENDMSG, ENV_AF_INET);
}

int envelope_sendmsg6(struct bpf_sock_addr *ctx)
{
	return observe_sock(ctx, NET_OP_SENDMSG, ENV_AF_INET6);
}

#if NET_RESULT
static __always_inline int net_syscall_exit(long ret)
{
	__u32 tid = bpf_get_current_pid_tgid();
	struct net_event *held = net_pending.lookup(&tid);
	if (!held)
		return 0;
	emit_net(held, 1, ret);
	net_pending.delete(&tid);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
	return net_syscall_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_sendto)
{
	return net_syscall_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg)
{
	return net_syscall_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_sendmmsg)
{
	return net_syscall_exit(args->ret);
}
#endif
