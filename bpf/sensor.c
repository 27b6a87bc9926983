/* Envelope observation programs, compiled by BCC at load time (sensor/probes.py).
 *
 * Count in the kernel, announce what is new: syscalls, network destinations and exec paths are
 * counted per cgroup in maps that userspace reads as cumulative values; the ring buffer carries
 * only the first sighting of each (EV_SYSCALL_FIRST, EV_NET_FIRST with the destination,
 * EV_EXEC_FIRST with the path, parent and argv prefix). Steady-state traffic costs userspace
 * nothing, and a full ring buffer delays an announcement (it is retried at the next
 * occurrence) but never changes a count.
 *
 * Configured only with -D:
 *   RINGBUF_PAGES   ring buffer size in pages (power of two)             default 256
 *   MAX_CGROUPS     cgroup slots in the syscall counter tables            default 1024
 *   NET_CGROUP_CAP  destinations counted per cgroup; beyond, the cgroup's default 4096
 *                   connects/sends to new ones are counted as dropped
 *   EXEC_CGROUP_CAP exec paths counted per cgroup (likewise)              default 2048
 *   NET_ENTRIES     entries of net_counts, all cgroups together          default 65536
 *   EXEC_ENTRIES    entries of exec_counts, all cgroups together         default 16384
 *   TRACE_EVENTS    1: also one ring record per exec, fork, exit and     default 0
 *                   connect/send (EV_EXEC, EV_FORK, EV_EXIT, EV_NET), as a tracer would;
 *                   the counts do not depend on it
 *   NET_RESULT      1: one EV_NET per connect/send, held until            default 0
 *                   sys_exit_{connect,send*} to report the syscall's return value.
 *                   Measured here: those syscalls:sys_exit_* tracepoints add ~45 ns to
 *                   every syscall (the perf syscall-exit probe runs for all of them).
 *   EVENT_CGROUP    emit ring-buffer events only for this cgroup id       default 0 (all)
 *   TRACKED_ONLY    1: observe only the cgroups in tracked_cgroups and    default 0 (all)
 *                   their descendants (envelope record and exec); the others get no counter
 *                   slot, no count and no ring record, so they cannot fill the ring buffer
 *                   of the workload observed. Checked before any counting or reservation.
 *   TRACK_DEPTH     cgroup levels looked at for a tracked ancestor        default 16
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
#ifndef TRACE_EVENTS
#define TRACE_EVENTS 0
#endif
#ifndef NET_CGROUP_CAP
#define NET_CGROUP_CAP 4096
#endif
#ifndef EXEC_CGROUP_CAP
#define EXEC_CGROUP_CAP 2048
#endif
#ifndef NET_ENTRIES
#define NET_ENTRIES 65536
#endif
#ifndef EXEC_ENTRIES
#define EXEC_ENTRIES 16384
#endif
#ifndef EVENT_CGROUP
#define EVENT_CGROUP 0
#endif
#ifndef TRACKED_ONLY
#define TRACKED_ONLY 0
#endif
#ifndef TRACK_DEPTH
#define TRACK_DEPTH 16
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
/* Ring-buffer reserve failures per cgroup slot (see events.h): the part of loss_counts that
 * belongs to one cgroup. Zeroed by userspace before a slot is reused. */
BPF_PERCPU_ARRAY(slot_loss, struct slot_loss, MAX_CGROUPS + 1);
/* TRACKED_ONLY: the cgroups observed (userspace writes the ones it binds; a descendant is added
 * at its first sight). Declared in every build so userspace has one set of maps. */
BPF_HASH(tracked_cgroups, __u64, __u32, MAX_CGROUPS);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

/* Behaviour counters (see events.h): entries are allocated as behaviours appear, so memory
 * follows use, up to NET_ENTRIES / EXEC_ENTRIES. */
BPF_F_TABLE("hash", struct net_count_key, struct behaviour_count, net_counts, NET_ENTRIES,
	    BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct exec_count_key, struct behaviour_count, exec_counts, EXEC_ENTRIES,
	    BPF_F_NO_PREALLOC);
/* Per cgroup slot: entries held and what was dropped beyond the caps. */
BPF_ARRAY(behaviour_slots, struct behaviour_slot, MAX_CGROUPS + 1);
/* An exec key is larger than the BPF stack allows next to the rest: built here. */
BPF_PERCPU_ARRAY(exec_scratch, struct exec_count_key, 1);

/* Fork tracking: pid -> parent pid. Seeded from /proc by userspace at start. */
BPF_TABLE("lru_hash", __u32, __u32, parents, TASKS_TRACKED);
/* Per-thread values stashed at sys_enter for the tracepoint that follows:
 * tid -> its syscall register frame, at execve/execveat (read at sched_process_exec);
 * tid -> clone flags, at clone/clone3/fork/vfork (read at sched_process_fork). */
BPF_TABLE("lru_hash", __u32, __u64, exec_regs, 4096);
BPF_TABLE("lru_hash", __u32, __u64, clone_flags, 4096);
#if TRACE_EVENTS
/* Exit status argument: key tgid for exit_group(), EXIT_KEY_THREAD | tid for a thread's exit()
 * (what glibc's pthread_exit calls), which is the process's status only if that thread is the
 * last one to go. */
#define EXIT_KEY_THREAD (1ULL << 32)
BPF_TABLE("lru_hash", __u64, __s32, exit_statuses, 4096);
#endif
#if NET_RESULT
BPF_TABLE("lru_hash", __u32, struct net_event, net_pending, 4096);
#endif

/* ---- helpers --------------------------------------------------------------------------------- */

static __always_inline void count_loss(__u32 index)
{
	if (index >= LOSS_SLOTS)
		return;
	__u64 *n = loss_counts.lookup(&index);
	if (n)
		(*n)++;
}

/* A ring-buffer reservation for cgroup `cg` failed: counted node-wide (loss_counts) and, when
 * the cgroup holds a counter slot, in that slot's slot_loss, so the loss is charged to the
 * workload that lost it and to no other. */
static __always_inline void count_reserve_failure(__u32 type, __u64 cg)
{
	count_loss(type);
	__u32 *slotp = cgroup_slots.lookup(&cg);
	if (!slotp)
		return;
	__u32 slot = *slotp;
	struct syscall_slot_state *st = slot_state.lookup(&slot);
	if (!st || st->cgroup_id != cg) /* a slot being freed: not this cgroup's any more */
		return;
	struct slot_loss *l = slot_loss.lookup(&slot);
	if (l)
		l->reserve_failed[type & (LOSS_RESERVE_TYPES - 1)]++;
}

/* TRACKED_ONLY: is the current task's cgroup `cg` one of the tracked ones or below one? A
 * descendant found through its ancestors is added, so the walk happens once per cgroup (per
 * cache generation for the syscall path). Without TRACKED_ONLY every cgroup is observed. */
static __always_inline int cgroup_tracked(__u64 cg)
{
#if TRACKED_ONLY
	if (tracked_cgroups.lookup(&cg))
		return 1;
#pragma unroll
	for (int level = 0; level < TRACK_DEPTH; level++) {
		__u64 a = bpf_get_current_ancestor_cgroup_id(level);
		if (!a || a == cg)
			return 0;
		if (tracked_cgroups.lookup(&a)) {
			__u32 one = 1;
			tracked_cgroups.update(&cg, &one);
			return 1;
		}
	}
	return 0;
#else
	return 1;
#endif
}

static __always_inline int event_wanted(__u64 cgroup_id)
{
#if EVENT_CGROUP
	return cgroup_id == EVENT_CGROUP && cgroup_tracked(cgroup_id);
#else
	return cgroup_tracked(cgroup_id);
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

/* A cache entry of a cgroup that is not tracked (TRACKED_ONLY): never a slot index. */
#define UNTRACKED_SLOT 0xffffffffU

/* Slow path: find or allocate the slot of `cg` and remember it in this CPU's cache. */
static __always_inline __u32 resolve_slot(__u64 cg, struct slot_cache *cache, __u64 key, __u64 gen)
{
	__u32 slot;
	__u32 *found = cgroup_slots.lookup(&cg);
	if (found) {
		slot = *found;
	} else if (!cgroup_tracked(cg)) {
		slot = UNTRACKED_SLOT; /* cached: this task's syscalls stop at the cache check */
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
		count_reserve_failure(EV_SYSCALL_FIRST, cg);
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
#if TRACE_EVENTS
	} else if (nr == NR_EXIT_GROUP || nr == NR_EXIT) {
		__u64 key = nr == NR_EXIT_GROUP ? (pid_tgid >> 32) : (EXIT_KEY_THREAD | tid);
		__s32 status = syscall_arg(regs, REGS_OFF_DI);
		exit_statuses.update(&key, &status);
#endif
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

/* ---- behaviour counting: network destinations and exec paths ------------------------------- */

#define COUNTED 0
#define ANNOUNCE 1

static __always_inline __u64 mix64(__u64 h)
{
	/* MurmurHash3's 64-bit finaliser */
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdULL;
	h ^= h >> 33;
	h *= 0xc4ceb9fe1a85ec53ULL;
	h ^= h >> 33;
	return h;
}

/* One HyperLogLog observation of key hash `h`: the register chosen by the low bits keeps the
 * largest rank (1 + the number of trailing zeros of the other bits) it has seen. */
static __always_inline void sketch_add(__u8 *registers, __u64 h)
{
	__u32 idx = h & (SKETCH_REGISTERS - 1);
	__u64 w = (h >> SKETCH_INDEX_BITS) | (1ULL << (64 - SKETCH_INDEX_BITS));
	__u8 rank = 1;
	if (!(w & 0xffffffffULL)) {
		rank += 32;
		w >>= 32;
	}
	if (!(w & 0xffff)) {
		rank += 16;
		w >>= 16;
	}
	if (!(w & 0xff)) {
		rank += 8;
		w >>= 8;
	}
	if (!(w & 0xf)) {
		rank += 4;
		w >>= 4;
	}
	if (!(w & 0x3)) {
		rank += 2;
		w >>= 2;
	}
	if (!(w & 0x1))
		rank += 1;
	if (registers[idx] < rank)
		registers[idx] = rank; /* a racing update can only make the estimate lower */
}

/* An occurrence that was not counted because its cgroup (or the whole table) was full. */
static __always_inline void note_dropped(__u64 *dropped, __u64 *first_ns, __u64 *last_ns,
					 __u8 *sketch, __u64 h, __u64 now)
{
	__sync_fetch_and_add(dropped, 1);
	if (!*first_ns)
		*first_ns = now;
	*last_ns = now;
	sketch_add(sketch, h);
}

/* Take one of a cgroup's entries, under its cap; 0 (nothing taken) at the cap. */
static __always_inline int take_entry(__u64 *entries, __u64 cap)
{
	__u64 held = __sync_fetch_and_add(entries, 1);
	if (held < cap)
		return 1;
	__sync_fetch_and_add(entries, -1);
	return 0;
}

/* ANNOUNCE if this occurrence must announce the entry: nobody has yet, or the last attempt
 * found the ring buffer full. Exactly one CPU wins the claim. */
static __always_inline int claim_announcement(struct behaviour_count *c)
{
	if (c->flags & COUNT_F_ANNOUNCED)
		return COUNTED;
	__u64 old = __sync_fetch_and_or(&c->flags, COUNT_F_ANNOUNCED);
	return (old & COUNT_F_ANNOUNCED) ? COUNTED : ANNOUNCE;
}

static __always_inline void bump(struct behaviour_count *c, __u64 now)
{
	__sync_fetch_and_add(&c->count, 1);
	c->last_ns = now;
}

static __always_inline __u64 net_key_hash(struct net_count_key *k)
{
	__u64 *w = (__u64 *)k;
	__u64 h = 0;
#pragma unroll
	for (int i = 0; i < NET_COUNT_KEY_SIZE / 8; i++)
		h = mix64(h ^ w[i]);
	return h;
}

static __always_inline __u64 exec_key_hash(struct exec_count_key *k)
{
	__u64 *w = (__u64 *)k;
	__u64 h = 0;
#pragma unroll
	for (int i = 0; i < EXEC_COUNT_KEY_SIZE / 8; i++)
		h = mix64(h ^ w[i]);
	return h;
}

static __always_inline struct behaviour_slot *behaviour_slot_of(__u64 cg)
{
	__u32 *slotp = cgroup_slots.lookup(&cg);
	if (!slotp)
		return 0;
	__u32 slot = *slotp;
	return behaviour_slots.lookup(&slot);
}

/* Count one connect/send to `k`. The common case is one hash lookup and an atomic add. */
static __always_inline int count_net(struct net_count_key *k, __u64 now)
{
	struct behaviour_count *c = net_counts.lookup(k);
	if (c) {
		bump(c, now);
		return claim_announcement(c);
	}
	struct behaviour_slot *bs = behaviour_slot_of(k->cgroup_id);
	if (!bs) {
		count_loss(LOSS_NET_UNATTRIBUTED);
		return COUNTED;
	}
	if (!take_entry(&bs->net_entries, NET_CGROUP_CAP)) {
		note_dropped(&bs->net_dropped, &bs->net_dropped_first_ns, &bs->net_dropped_last_ns,
			     bs->net_sketch, net_key_hash(k), now);
		return COUNTED;
	}
	struct behaviour_count v = {.count = 1, .first_ns = now, .last_ns = now,
				    .flags = COUNT_F_ANNOUNCED};
	if (net_counts.insert(k, &v) == 0)
		return ANNOUNCE;
	__sync_fetch_and_add(&bs->net_entries, -1);
	c = net_counts.lookup(k);
	if (c) { /* another CPU made the entry first */
		bump(c, now);
		return claim_announcement(c);
	}
	count_loss(LOSS_NET_TABLE_FULL);
	note_dropped(&bs->net_dropped, &bs->net_dropped_first_ns, &bs->net_dropped_last_ns,
		     bs->net_sketch, net_key_hash(k), now);
	return COUNTED;
}

/* Count one exec of `k` (built in the per-CPU scratch key). */
static __always_inline int count_exec(struct exec_count_key *k, __u64 now)
{
	struct behaviour_count *c = exec_counts.lookup(k);
	if (c) {
		bump(c, now);
		return claim_announcement(c);
	}
	struct behaviour_slot *bs = behaviour_slot_of(k->cgroup_id);
	if (!bs) {
		count_loss(LOSS_EXEC_UNATTRIBUTED);
		return COUNTED;
	}
	if (!take_entry(&bs->exec_entries, EXEC_CGROUP_CAP)) {
		note_dropped(&bs->exec_dropped, &bs->exec_dropped_first_ns,
			     &bs->exec_dropped_last_ns, bs->exec_sketch, exec_key_hash(k), now);
		return COUNTED;
	}
	struct behaviour_count v = {.count = 1, .first_ns = now, .last_ns = now,
				    .flags = COUNT_F_ANNOUNCED};
	if (exec_counts.insert(k, &v) == 0)
		return ANNOUNCE;
	__sync_fetch_and_add(&bs->exec_entries, -1);
	c = exec_counts.lookup(k);
	if (c) {
		bump(c, now);
		return claim_announcement(c);
	}
	count_loss(LOSS_EXEC_TABLE_FULL);
	note_dropped(&bs->exec_dropped, &bs->exec_dropped_first_ns, &bs->exec_dropped_last_ns,
		     bs->exec_sketch, exec_key_hash(k), now);
	return COUNTED;
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
#if TRACKED_ONLY
		if (slot == UNTRACKED_SLOT)
			return 0;
#endif
		st = slot_state.lookup(&slot);
		/* The owner check catches a slot freed (and perhaps reused) since it was cached. */
		if (st && st->cgroup_id != cg)
			st = 0;
	}
	if (!st) {
		cg = bpf_get_current_cgroup_id();
		slot = resolve_slot(cg, cache, key, gen);
#if TRACKED_ONLY
		if (slot == UNTRACKED_SLOT)
			return 0;
#endif
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
#if TRACE_EVENTS
	case NR_EXIT:
	case NR_EXIT_GROUP:
#endif
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
	/* Fork tracking: the parent an exec announcement names. */
	parents.update(&child, &ptgid);
#if TRACE_EVENTS
	__u64 cg = bpf_get_current_cgroup_id();
	if (!event_wanted(cg))
		return 0;
	struct fork_event *e = events.ringbuf_reserve(sizeof(struct fork_event));
	if (!e) {
		count_reserve_failure(EV_FORK, cg);
		return 0;
	}
	fill_hdr(&e->hdr, EV_FORK, FORK_EVENT_VERSION, sizeof(*e));
	e->cgroup_id = cg;
	e->pid = child;
	e->ppid = ptgid;
	e->parent_tid = tid;
	e->pad = 0;
	events.ringbuf_submit(e, 0);
#endif
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

/* struct exec_first_event is struct exec_event under another type number: one filler for both. */
_Static_assert(sizeof(struct exec_first_event) == sizeof(struct exec_event), "exec layouts");
_Static_assert(__builtin_offsetof(struct exec_first_event, argv) ==
	       __builtin_offsetof(struct exec_event, argv), "exec layouts");
_Static_assert(__builtin_offsetof(struct exec_first_event, flags) ==
	       __builtin_offsetof(struct exec_event, flags), "exec layouts");

/* One exec record (EV_EXEC_FIRST or EV_EXEC); 0 when the ring buffer was full (counted). */
static __always_inline int emit_exec(__u16 type, __u64 cg, __u32 pid, __u32 old_pid,
				     const char *filename, __u64 *regs)
{
	struct exec_event *e = events.ringbuf_reserve(sizeof(struct exec_event));
	if (!e) {
		count_reserve_failure(type, cg);
		return 0;
	}
	fill_hdr(&e->hdr, type, type == EV_EXEC_FIRST ? EXEC_FIRST_EVENT_VERSION : EXEC_EVENT_VERSION,
		 sizeof(*e));
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
	int n = bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), filename);
	e->filename_len = n > 0 ? n - 1 : 0;
	if (regs) {
		flags |= read_argv(e, *regs);
	} else {
		e->argc = 0;
		e->argv_len = 0;
		flags |= EXEC_F_NO_ARGV;
	}
	e->flags = flags;
	events.ringbuf_submit(e, 0);
	return 1;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
	__u32 pid = args->pid;
	__u32 old_pid = args->old_pid;
	__u64 cg = bpf_get_current_cgroup_id();
	if (!cgroup_tracked(cg)) {
		exec_regs.delete(&old_pid);
		return 0;
	}
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
	__u32 zero = 0;
	struct exec_count_key *k = exec_scratch.lookup(&zero);
	if (!k)
		return 0;
	__builtin_memset(k, 0, sizeof(*k)); /* the key is compared whole: zero after the NUL */
	k->cgroup_id = cg;
	unsigned short loc = args->data_loc_filename & 0xFFFF;
	const char *filename = (const char *)args + loc;
	bpf_probe_read_kernel_str(k->path, sizeof(k->path), filename);
	__u64 *regs = exec_regs.lookup(&old_pid);
	if (count_exec(k, bpf_ktime_get_ns()) == ANNOUNCE && event_wanted(cg) &&
	    !emit_exec(EV_EXEC_FIRST, cg, pid, old_pid, filename, regs)) {
		/* Ring buffer full: let the next exec of this path announce it. */
		struct behaviour_count *c = exec_counts.lookup(k);
		if (c)
			__sync_fetch_and_and(&c->flags, ~COUNT_F_ANNOUNCED);
	}
#if TRACE_EVENTS
	if (event_wanted(cg))
		emit_exec(EV_EXEC, cg, pid, old_pid, filename, regs);
#endif
	exec_regs.delete(&old_pid);
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
#if TRACE_EVENTS
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
		count_reserve_failure(EV_EXIT, cg);
		return 0;
	}
	fill_hdr(&e->hdr, EV_EXIT, EXIT_EVENT_VERSION, sizeof(*e));
	e->cgroup_id = cg;
	e->pid = tgid;
	e->tid = tid;
	e->exit_status = status;
	e->flags = flags;
	events.ringbuf_submit(e, 0);
#else
	if (args->group_dead)
		parents.delete(&tgid);
#endif
	return 0;
}

/* ---- network destinations: cgroup sock_addr hooks (observe only, always allow) --------------- */

#if NET_RESULT
static __always_inline void emit_net(struct net_event *src, __u8 with_ret, __s64 ret)
{
	struct net_event *e = events.ringbuf_reserve(sizeof(struct net_event));
	if (!e) {
		count_reserve_failure(EV_NET, src->cgroup_id);
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

/* The first sighting of destination `k`; 0 when the ring buffer was full (counted). */
static __always_inline int announce_net(struct net_count_key *k, __u64 pid_tgid)
{
	struct net_first_event *e = events.ringbuf_reserve(sizeof(struct net_first_event));
	if (!e) {
		count_reserve_failure(EV_NET_FIRST, k->cgroup_id);
		return 0;
	}
	fill_hdr(&e->hdr, EV_NET_FIRST, NET_FIRST_EVENT_VERSION, sizeof(*e));
	e->cgroup_id = k->cgroup_id;
	e->pid = pid_tgid >> 32;
	e->tid = pid_tgid;
	e->family = k->family;
	e->protocol = k->protocol;
	e->op = k->op;
	e->flags = 0;
	e->port = k->port;
	__builtin_memcpy(e->addr, k->addr, sizeof(e->addr));
	events.ringbuf_submit(e, 0);
	return 1;
}

static __always_inline int observe_sock(struct bpf_sock_addr *ctx, __u8 op, __u16 family)
{
	__u64 cg = bpf_get_current_cgroup_id();
	if (!cgroup_tracked(cg))
		return 1;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct net_count_key k = {};
	k.cgroup_id = cg;
	k.family = family;
	k.protocol = ctx->protocol;
	k.op = op;
	k.port = bpf_ntohs((__u16)ctx->user_port);
	if (family == ENV_AF_INET) {
		__u32 a = ctx->user_ip4;
		__builtin_memcpy(k.addr, &a, 4);
	} else {
		__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2],
		      a3 = ctx->user_ip6[3];
		__builtin_memcpy(&k.addr[0], &a0, 4);
		__builtin_memcpy(&k.addr[4], &a1, 4);
		__builtin_memcpy(&k.addr[8], &a2, 4);
		__builtin_memcpy(&k.addr[12], &a3, 4);
	}
	if (count_net(&k, bpf_ktime_get_ns()) == ANNOUNCE && event_wanted(cg) &&
	    !announce_net(&k, pid_tgid)) {
		/* Ring buffer full: let the next connect/send to it announce it. */
		struct behaviour_count *c = net_counts.lookup(&k);
		if (c)
			__sync_fetch_and_and(&c->flags, ~COUNT_F_ANNOUNCED);
	}
#if TRACE_EVENTS || NET_RESULT
	if (!event_wanted(cg))
		return 1;
	__u32 tid = pid_tgid;
	struct net_event ev = {};
	fill_hdr(&ev.hdr, EV_NET, NET_EVENT_VERSION, sizeof(ev));
	ev.cgroup_id = cg;
	ev.pid = pid_tgid >> 32;
	ev.tid = tid;
	ev.family = family;
	ev.protocol = k.protocol;
	ev.op = op;
	ev.port = k.port;
	__builtin_memcpy(ev.addr, k.addr, sizeof(ev.addr));
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
		count_reserve_failure(EV_NET, cg);
		return 1;
	}
	__builtin_memcpy(e, &ev, sizeof(ev));
	events.ringbuf_submit(e, 0);
#endif
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
