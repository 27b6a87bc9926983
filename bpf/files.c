/* Envelope file-access programs, compiled by BCC at load time: observation (sensor/file_access.py,
 * a sensor extension) and the visibility of refused accesses (enforcer/file_denials.py).
 *
 * One program per syscall, on its syscalls:sys_exit_* tracepoint, where the call's result is
 * known. The arguments come from the caller's register frame (bpf_task_pt_regs: the x86_64
 * struct pt_regs, the uapi user_regs_struct layout), which the syscall leaves as it found it,
 * and the path from the caller's memory, which the kernel has just read (its pages are
 * resident). No raw sys_exit program: measured here, a syscalls:sys_exit_* tracepoint adds
 * ~3.5 ns to every syscall (the perf syscall-exit hook checks a bitmap), a raw sys_exit program
 * ~18 ns, and a syscalls:sys_enter_* tracepoint ~22 ns; so nothing runs at entry.
 *
 * That ~3.5 ns is the least this job can cost on this kernel (bench_syscall measures it as the
 * floor plus an empty program on sys_exit_openat): none of its 1601 tracepoints (every
 * btf_trace_* in its BTF, the bare ones too) fires on opening a file or on a failed exec, and it
 * has no kprobes, fentry or loadable BPF-LSM. sched_process_exec reports successful execs (the
 * sensor's), not refusals. fanotify (FAN_OPEN on a filesystem mark) sees successful opens
 * without a syscall hook, but measured here it added ~1 us to each open+close, merges
 * repeated events (exact counts are lost) and carries no open flags.
 *
 * Roles, chosen with -D (one or both):
 *   FILES_OBSERVE  1: count each successful access per (cgroup, access bits, path) in
 *                  `file_counts` (cumulative; userspace takes deltas), announce a new key with
 *                  EV_FILE_FIRST, at most FILES_PER_CGROUP keys per cgroup (overflow counted).
 *   FILES_DENIALS  1: for the cgroups in `watched`, report each call that fails with -EACCES
 *                  (EV_FILE_DENIAL): what Landlock answers to a refused access.
 *
 * Other -D flags:
 *   FILES_MAX_KEYS        keys in file_counts (allocated on use)          default 131072
 *   FILES_PER_CGROUP      keys one cgroup may hold                        default 8192
 *   FILES_MAX_CGROUPS     cgroups in file_cgroups and watched             default 4096
 *   FILES_RINGBUF_PAGES   ring buffer size in pages (power of two)        default 64
 *   FILES_EVENT_CGROUP    count only this cgroup id                       default 0 (all)
 *   FILES_HASH_SEED       seed of the path hash in the keys (random per load, set by userspace)
 *
 * What a call counts as (FILE_ACC_* in events.h): open/openat/openat2/creat by their flags
 * (O_PATH opens are not accesses: Landlock checks nothing for them); truncate(2); unlink,
 * unlinkat (AT_REMOVEDIR: rmdir), rmdir, mkdir, mkdirat; rename, renameat, renameat2 (the old
 * name removed, the new one created; RENAME_EXCHANGE both ways); link, linkat (the new name
 * created); symlink, symlinkat; mknod, mknodat by file type. execve/execveat are only reported
 * when refused (a successful exec is the sensor's EV_EXEC).
 *
 * Reads only tracepoint fields, helper results, the register frame and user memory; never
 * kernel struct offsets.
 */
#include "events.h"
#include "files.h"

#ifndef FILES_OBSERVE
#define FILES_OBSERVE 0
#endif
#ifndef FILES_DENIALS
#define FILES_DENIALS 0
#endif
#ifndef FILES_MAX_KEYS
#define FILES_MAX_KEYS 131072
#endif
#ifndef FILES_PER_CGROUP
#define FILES_PER_CGROUP 8192
#endif
#ifndef FILES_MAX_CGROUPS
#define FILES_MAX_CGROUPS 4096
#endif
#ifndef FILES_RINGBUF_PAGES
#define FILES_RINGBUF_PAGES 64
#endif
#ifndef FILES_EVENT_CGROUP
#define FILES_EVENT_CGROUP 0
#endif
#ifndef FILES_HASH_SEED
#define FILES_HASH_SEED 0x6a09e667f3bcc908ULL
#endif

/* Syscall argument registers in struct pt_regs (x86_64), as in bpf/sensor.c: read in one copy
 * of the frame from r10 to di (offsets 56..119), indexed in u64 words from REGS_OFF_FIRST. */
#define REGS_OFF_FIRST 56
#define REGS_WORDS 8
#define W_R10 0 /* offset 56 */
#define W_R8 2  /* 72 */
#define W_DX 5  /* 96 */
#define W_SI 6  /* 104 */
#define W_DI 7  /* 112 */

/* uapi flag values (asm-generic/fcntl.h, linux/fcntl.h, linux/stat.h) */
#define ENV_O_ACCMODE 03
#define ENV_O_WRONLY 01
#define ENV_O_RDWR 02
#define ENV_O_CREAT 0100
#define ENV_O_TRUNC 01000
#define ENV_O_DIRECTORY 0200000
#define ENV_O_PATH 010000000
#define ENV_O_TMPFILE 020000000
#define ENV_AT_REMOVEDIR 0x200
#define ENV_RENAME_EXCHANGE 0x2
#define ENV_S_IFMT 0170000
#define ENV_S_IFSOCK 0140000
#define ENV_S_IFBLK 0060000
#define ENV_S_IFCHR 0020000
#define ENV_S_IFIFO 0010000
#define ENV_EACCES 13

BPF_PERCPU_ARRAY(file_loss, __u64, FILE_LOSS_SLOTS);
BPF_RINGBUF_OUTPUT(events, FILES_RINGBUF_PAGES);
/* Scratch for the path being read and, for a new key, the value it is inserted with (288 bytes:
 * too large for the stack with the rest). */
BPF_PERCPU_ARRAY(scratch, struct file_count, 1);

#if FILES_OBSERVE
BPF_F_TABLE("hash", struct file_key, struct file_count, file_counts, FILES_MAX_KEYS, BPF_F_NO_PREALLOC);
BPF_HASH(file_cgroups, __u64, struct file_cgroup, FILES_MAX_CGROUPS);
#endif
#if FILES_DENIALS
BPF_HASH(watched, __u64, struct file_watch, FILES_MAX_CGROUPS);
#endif

static __always_inline void count_loss(__u32 index)
{
	__u64 *n = file_loss.lookup(&index);
	if (n)
		__sync_fetch_and_add(n, 1);
}

struct regs {
	__u64 w[REGS_WORDS];
};

/* The caller's syscall arguments, from its register frame, in one read. */
static __always_inline void caller_regs(struct regs *r)
{
	struct task_struct *task = bpf_get_current_task_btf();
	char *frame = (char *)bpf_task_pt_regs(task);
	if (bpf_probe_read_kernel(r, sizeof(*r), frame + REGS_OFF_FIRST) != 0)
		__builtin_memset(r, 0, sizeof(*r));
}

static __always_inline __u32 open_access(__u64 flags)
{
	if (flags & ENV_O_PATH)
		return 0; /* a handle, not an access */
	if ((flags & ENV_O_TMPFILE) == ENV_O_TMPFILE)
		return 0; /* an unnamed file in a directory: not a path access (not counted) */
	__u32 acc = 0;
	__u64 mode = flags & ENV_O_ACCMODE;
	if (mode == ENV_O_WRONLY) {
		acc |= FILE_ACC_WRITE;
	} else if (mode == ENV_O_RDWR) {
		acc |= FILE_ACC_READ | FILE_ACC_WRITE;
	} else {
		acc |= (flags & ENV_O_DIRECTORY) ? FILE_ACC_LIST : FILE_ACC_READ;
	}
	if (flags & ENV_O_CREAT)
		acc |= FILE_ACC_CREATE;
	if (flags & ENV_O_TRUNC)
		acc |= FILE_ACC_TRUNCATE;
	return acc;
}

static __always_inline __u32 mknod_access(__u64 mode)
{
	switch (mode & ENV_S_IFMT) {
	case ENV_S_IFIFO:
		return FILE_ACC_MKFIFO;
	case ENV_S_IFSOCK:
		return FILE_ACC_MKSOCK;
	case ENV_S_IFCHR:
	case ENV_S_IFBLK:
		return FILE_ACC_MKNOD;
	default:
		return FILE_ACC_CREATE;
	}
}

/* A keyed hash of the path's n bytes, eight at a time (the bytes after the string are masked:
 * the scratch buffer is not cleared between calls). */
static __always_inline __u64 path_hash(const char *p, long n)
{
	__u64 h = FILES_HASH_SEED ^ (__u64)n;
	for (int i = 0; i < FILE_PATH_LEN / 8; i++) {
		long left = n - i * 8;
		if (left <= 0)
			break;
		__u64 w = 0;
		__builtin_memcpy(&w, p + i * 8, 8);
		if (left < 8)
			w &= (1ULL << (left * 8)) - 1;
		h ^= w;
		h *= 0x9e3779b97f4a7c15ULL;
		h ^= h >> 29;
	}
	return h;
}

/* Read the path into the scratch value and build the key: 0 when there is no path to count
 * (unreadable, empty: AT_EMPTY_PATH names the fd itself). */
static __always_inline struct file_count *read_path(__u64 uptr)
{
	__u32 zero = 0;
	struct file_count *v = scratch.lookup(&zero);
	if (!v)
		return 0;
	long n = bpf_probe_read_user_str(v->path, sizeof(v->path), (void *)uptr);
	if (n <= 1) {
		if (n <= 0)
			count_loss(FILE_LOSS_PATH_UNREADABLE);
		return 0;
	}
	v->path_len = n - 1;
	v->flags = n >= FILE_PATH_LEN ? FILE_F_TRUNCATED : 0;
	return v;
}

static __always_inline void fill_key(struct file_key *k, const struct file_count *v, __u64 cg, __u32 access,
				     int dirfd)
{
	k->cgroup_id = cg;
	k->access = access;
	k->pad = 0;
	if (v->path[0] == '/') {
		k->pid = 0;
		k->dirfd = FILE_DIRFD_ABSOLUTE;
	} else {
		k->pid = bpf_get_current_pid_tgid() >> 32;
		k->dirfd = dirfd;
	}
	k->path_hash = path_hash(v->path, v->path_len);
}

#if FILES_OBSERVE
static __always_inline void announce(const struct file_key *k, const struct file_count *v, __u32 nr)
{
	struct file_first_event *e = events.ringbuf_reserve(sizeof(struct file_first_event));
	if (!e) {
		count_loss(FILE_LOSS_RINGBUF_FIRST); /* the key is counted; userspace finds it in the map */
		return;
	}
	e->hdr.type = EV_FILE_FIRST;
	e->hdr.version = FILE_FIRST_EVENT_VERSION;
	e->hdr.size = sizeof(*e);
	e->hdr.ktime = bpf_ktime_get_ns();
	e->cgroup_id = k->cgroup_id;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->access = k->access;
	e->key_pid = k->pid;
	e->dirfd = k->dirfd;
	e->nr = nr;
	e->path_len = v->path_len;
	e->flags = v->flags;
	e->path_hash = k->path_hash;
	bpf_probe_read_kernel(e->path, sizeof(e->path), v->path);
	events.ringbuf_submit(e, 0);
}

static __always_inline void observe(__u64 cg, __u32 nr, __u32 access, int dirfd, __u64 uptr)
{
#if FILES_EVENT_CGROUP
	if (cg != FILES_EVENT_CGROUP)
		return;
#endif
	struct file_count *v = read_path(uptr);
	if (!v)
		return;
	if (v->flags & FILE_F_TRUNCATED) {
		count_loss(FILE_LOSS_PATH_TRUNCATED);
		return;
	}
	struct file_key k;
	fill_key(&k, v, cg, access, dirfd);
	__u64 now = bpf_ktime_get_ns();
	struct file_count *c = file_counts.lookup(&k);
	if (c) { /* the steady state: one lookup of a 32-byte key, no event */
		__sync_fetch_and_add(&c->count, 1);
		c->last_ns = now;
		return;
	}
	struct file_cgroup *fc = file_cgroups.lookup(&cg);
	if (!fc) {
		struct file_cgroup empty = {};
		file_cgroups.insert(&cg, &empty);
		fc = file_cgroups.lookup(&cg);
		if (!fc) {
			count_loss(FILE_LOSS_MAP_FULL);
			return;
		}
	}
	if (fc->keys >= FILES_PER_CGROUP) {
		__sync_fetch_and_add(&fc->overflow, 1);
		count_loss(FILE_LOSS_CGROUP_OVERFLOW);
		return;
	}
	v->count = 1;
	v->first_ns = now;
	v->last_ns = now;
	v->pad = 0;
	if (file_counts.insert(&k, v) != 0) {
		/* Another CPU added the same key first, or the map is full. */
		c = file_counts.lookup(&k);
		if (c)
			__sync_fetch_and_add(&c->count, 1);
		else
			count_loss(FILE_LOSS_MAP_FULL);
		return;
	}
	__sync_fetch_and_add(&fc->keys, 1);
	announce(&k, v, nr);
}
#endif

#if FILES_DENIALS
static __always_inline void report_denial(__u64 cg, __u32 nr, long ret, __u32 access, int dirfd, __u64 uptr)
{
	struct file_count *v = read_path(uptr);
	if (!v)
		return;
	struct file_denial_event *e = events.ringbuf_reserve(sizeof(struct file_denial_event));
	if (!e) {
		count_loss(FILE_LOSS_RINGBUF_DENIAL);
		return;
	}
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	e->hdr.type = EV_FILE_DENIAL;
	e->hdr.version = FILE_DENIAL_EVENT_VERSION;
	e->hdr.size = sizeof(*e);
	e->hdr.ktime = bpf_ktime_get_ns();
	e->cgroup_id = cg;
	e->pid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->access = access;
	e->dirfd = v->path[0] == '/' ? FILE_DIRFD_ABSOLUTE : dirfd;
	e->nr = nr;
	e->ret = ret;
	e->path_len = v->path_len;
	e->flags = v->flags;
	e->pad = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	bpf_probe_read_kernel(e->path, sizeof(e->path), v->path);
	events.ringbuf_submit(e, 0);
}
#endif

/* One path of one call: counted when the call succeeded, reported when a watched cgroup's call
 * was refused. */
static __always_inline void on_path(__u64 cg, __u32 nr, long ret, __u32 access, int dirfd, __u64 uptr,
				    int watched_cg)
{
	if (!access)
		return;
#if FILES_OBSERVE
	if (ret >= 0 && !(access & FILE_ACC_EXEC))
		observe(cg, nr, access, dirfd, uptr);
#endif
#if FILES_DENIALS
	if (ret == -ENV_EACCES && watched_cg)
		report_denial(cg, nr, ret, access, dirfd, uptr);
#endif
}

/* Which calls matter: successes (observation) and -EACCES in a watched cgroup (denials). */
static __always_inline int wanted(long ret, __u64 cg, int *watched_cg)
{
	*watched_cg = 0;
#if FILES_DENIALS
	if (ret == -ENV_EACCES) {
		struct file_watch *w = watched.lookup(&cg);
		if (w && w->mode == FILE_WATCH_ENFORCE)
			*watched_cg = 1;
	}
#endif
	return (FILES_OBSERVE && ret >= 0) || *watched_cg;
}

#define FILE_EXIT(sc, ...)                                                                     \
	TRACEPOINT_PROBE(syscalls, sys_exit_##sc)                                                \
	{                                                                                        \
		long ret = args->ret;                                                            \
		if (ret < 0 && (!FILES_DENIALS || ret != -ENV_EACCES))                           \
			return 0;                                                                \
		__u64 cg = bpf_get_current_cgroup_id();                                          \
		int watched_cg = 0;                                                              \
		if (!wanted(ret, cg, &watched_cg))                                               \
			return 0;                                                                \
		__u32 nr = args->__syscall_nr;                                                   \
		struct regs r;                                                                   \
		caller_regs(&r);                                                                 \
		__VA_ARGS__;                                                                     \
		return 0;                                                                        \
	}

/* open(path, flags, mode) */
FILE_EXIT(open, on_path(cg, nr, ret, open_access(r.w[W_SI]), FILE_AT_FDCWD,
			r.w[W_DI], watched_cg))
/* openat(dirfd, path, flags, mode) */
FILE_EXIT(openat, on_path(cg, nr, ret, open_access(r.w[W_DX]), (int)r.w[W_DI],
			  r.w[W_SI], watched_cg))
/* openat2(dirfd, path, struct open_how *how, size): how->flags is the first u64 */
FILE_EXIT(openat2, {
	__u64 how_flags = 0;
	bpf_probe_read_user(&how_flags, sizeof(how_flags), (void *)r.w[W_DX]);
	on_path(cg, nr, ret, open_access(how_flags), (int)r.w[W_DI], r.w[W_SI],
		watched_cg);
})
/* creat(path, mode) = open(path, O_CREAT | O_WRONLY | O_TRUNC, mode) */
FILE_EXIT(creat, on_path(cg, nr, ret, FILE_ACC_WRITE | FILE_ACC_CREATE | FILE_ACC_TRUNCATE, FILE_AT_FDCWD,
			 r.w[W_DI], watched_cg))
/* truncate(path, length) */
FILE_EXIT(truncate, on_path(cg, nr, ret, FILE_ACC_TRUNCATE, FILE_AT_FDCWD, r.w[W_DI], watched_cg))
/* execve(path, argv, envp): refused execs only */
FILE_EXIT(execve, on_path(cg, nr, ret, FILE_ACC_EXEC, FILE_AT_FDCWD, r.w[W_DI], watched_cg))
/* execveat(dirfd, path, argv, envp, flags) */
FILE_EXIT(execveat, on_path(cg, nr, ret, FILE_ACC_EXEC, (int)r.w[W_DI], r.w[W_SI],
			    watched_cg))
/* unlink(path) */
FILE_EXIT(unlink, on_path(cg, nr, ret, FILE_ACC_REMOVE, FILE_AT_FDCWD, r.w[W_DI], watched_cg))
/* unlinkat(dirfd, path, flags) */
FILE_EXIT(unlinkat, on_path(cg, nr, ret, (r.w[W_DX] & ENV_AT_REMOVEDIR) ? FILE_ACC_RMDIR : FILE_ACC_REMOVE,
			    (int)r.w[W_DI], r.w[W_SI], watched_cg))
/* rmdir(path) */
FILE_EXIT(rmdir, on_path(cg, nr, ret, FILE_ACC_RMDIR, FILE_AT_FDCWD, r.w[W_DI], watched_cg))
/* mkdir(path, mode) */
FILE_EXIT(mkdir, on_path(cg, nr, ret, FILE_ACC_MKDIR, FILE_AT_FDCWD, r.w[W_DI], watched_cg))
/* mkdirat(dirfd, path, mode) */
FILE_EXIT(mkdirat, on_path(cg, nr, ret, FILE_ACC_MKDIR, (int)r.w[W_DI], r.w[W_SI],
			   watched_cg))
/* mknod(path, mode, dev) */
FILE_EXIT(mknod, on_path(cg, nr, ret, mknod_access(r.w[W_SI]), FILE_AT_FDCWD, r.w[W_DI],
			 watched_cg))
/* mknodat(dirfd, path, mode, dev) */
FILE_EXIT(mknodat, on_path(cg, nr, ret, mknod_access(r.w[W_DX]), (int)r.w[W_DI],
			   r.w[W_SI], watched_cg))
/* rename(old, new) */
FILE_EXIT(rename, {
	on_path(cg, nr, ret, FILE_ACC_REMOVE, FILE_AT_FDCWD, r.w[W_DI], watched_cg);
	on_path(cg, nr, ret, FILE_ACC_CREATE, FILE_AT_FDCWD, r.w[W_SI], watched_cg);
})
/* renameat(olddirfd, old, newdirfd, new) */
FILE_EXIT(renameat, {
	on_path(cg, nr, ret, FILE_ACC_REMOVE, (int)r.w[W_DI], r.w[W_SI], watched_cg);
	on_path(cg, nr, ret, FILE_ACC_CREATE, (int)r.w[W_DX], r.w[W_R10], watched_cg);
})
/* renameat2(olddirfd, old, newdirfd, new, flags) */
FILE_EXIT(renameat2, {
	__u32 both = (r.w[W_R8] & ENV_RENAME_EXCHANGE) ? FILE_ACC_REMOVE | FILE_ACC_CREATE : 0;
	on_path(cg, nr, ret, FILE_ACC_REMOVE | both, (int)r.w[W_DI], r.w[W_SI], watched_cg);
	on_path(cg, nr, ret, FILE_ACC_CREATE | both, (int)r.w[W_DX], r.w[W_R10], watched_cg);
})
/* link(old, new) */
FILE_EXIT(link, on_path(cg, nr, ret, FILE_ACC_CREATE, FILE_AT_FDCWD, r.w[W_SI], watched_cg))
/* linkat(olddirfd, old, newdirfd, new, flags) */
FILE_EXIT(linkat, on_path(cg, nr, ret, FILE_ACC_CREATE, (int)r.w[W_DX], r.w[W_R10],
			  watched_cg))
/* symlink(target, new) */
FILE_EXIT(symlink, on_path(cg, nr, ret, FILE_ACC_SYMLINK, FILE_AT_FDCWD, r.w[W_SI], watched_cg))
/* symlinkat(target, newdirfd, new) */
FILE_EXIT(symlinkat, on_path(cg, nr, ret, FILE_ACC_SYMLINK, (int)r.w[W_SI], r.w[W_DX],
			     watched_cg))
