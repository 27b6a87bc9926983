/* envelope-launch: apply an Envelope Landlock ruleset file, then exec a command.
 *
 *   envelope-launch --ruleset FILE [--] CMD [ARGS...]
 *
 * Built static (gcc -static) so it runs in any container image, Python or not. It reads a
 * version-1 ruleset file (the format is documented in enforcer/landlock_formats.py), creates a
 * Landlock ruleset handling the listed rights, adds one path-beneath rule per object (opened
 * O_PATH), sets no_new_privs, calls landlock_restrict_self and execs CMD (looked up in PATH
 * like execvp). Nothing of the command runs unless the ruleset is in force.
 *
 * Objects: "file" (refused when it is a directory: a rule on it would cover its tree), "tree"
 * (the object and everything beneath; dir-only rights are dropped on a non-directory), and
 * "children" (each non-directory entry directly inside the directory, symlinks followed, except
 * names matching an "exclude" glob). A missing object is skipped and reported: it can only make
 * the ruleset stricter.
 *
 * When the kernel cannot restrict a handled right: "on_unsupported refuse" exits 126 before
 * running anything; "best-effort" leaves the right out and prints one "gap:" line per right.
 * Restrict flags the kernel lacks are dropped with a warning (they change logging only).
 *
 * Exit status: the command's own once exec'd; 126 for a bad ruleset or a Landlock failure
 * (and for a command that cannot be executed), 127 for a command that is not found, 2 for usage.
 * Messages go to stderr, prefixed "envelope-launch:".
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef __NR_landlock_create_ruleset
#define __NR_landlock_create_ruleset 444
#define __NR_landlock_add_rule 445
#define __NR_landlock_restrict_self 446
#endif
#define CREATE_RULESET_VERSION (1U << 0)
#define RULE_PATH_BENEATH 1
#define MAGIC "envelope-landlock 1"
#define MAX_FILE (16 << 20)

/* The UAPI structs, spelled here so the build does not depend on the installed headers'
 * version (Debian 12's linux-libc-dev stops at ABI 2). */
struct ruleset_attr {
	uint64_t handled_access_fs;
	uint64_t handled_access_net;
	uint64_t scoped;
};
struct path_beneath_attr {
	uint64_t allowed_access;
	int32_t parent_fd;
} __attribute__((packed));

struct name_bit {
	const char *name;
	uint64_t bit;
	int abi;
	int dir_only;
};

static const struct name_bit FS_RIGHTS[] = {
	{"execute", 1ULL << 0, 1, 0},     {"write_file", 1ULL << 1, 1, 0},  {"read_file", 1ULL << 2, 1, 0},
	{"read_dir", 1ULL << 3, 1, 1},    {"remove_dir", 1ULL << 4, 1, 1},  {"remove_file", 1ULL << 5, 1, 1},
	{"make_char", 1ULL << 6, 1, 1},   {"make_dir", 1ULL << 7, 1, 1},    {"make_reg", 1ULL << 8, 1, 1},
	{"make_sock", 1ULL << 9, 1, 1},   {"make_fifo", 1ULL << 10, 1, 1},  {"make_block", 1ULL << 11, 1, 1},
	{"make_sym", 1ULL << 12, 1, 1},   {"refer", 1ULL << 13, 2, 1},      {"truncate", 1ULL << 14, 3, 0},
	{"ioctl_dev", 1ULL << 15, 5, 0},  {NULL, 0, 0, 0},
};
static const struct name_bit FLAGS[] = {
	{"log_same_exec_off", 1U << 0, 7, 0},
	{"log_new_exec_on", 1U << 1, 7, 0},
	{"log_subdomains_off", 1U << 2, 7, 0},
	{NULL, 0, 0, 0},
};

enum object { OBJ_FILE, OBJ_TREE, OBJ_CHILDREN };
struct rule {
	enum object object;
	uint64_t rights;
	char *path;
	char **exclude;
	size_t n_exclude;
	int line;
};

static const char *ruleset_path = "";

static void vmsg(const char *fmt, va_list ap)
{
	fputs("envelope-launch: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
}

static void msg(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vmsg(fmt, ap);
	va_end(ap);
}

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vmsg(fmt, ap);
	va_end(ap);
	exit(126);
}

static void *xrealloc(void *p, size_t n)
{
	p = realloc(p, n);
	if (!p)
		die("out of memory");
	return p;
}

/* "a,b,c" or "-" -> bit mask; dies naming the line on an unknown name. */
static uint64_t parse_names(char *text, const struct name_bit *table, int line)
{
	uint64_t mask = 0;
	if (strcmp(text, "-") == 0)
		return 0;
	for (char *save = NULL, *tok = strtok_r(text, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		const struct name_bit *nb = table;
		while (nb->name && strcmp(nb->name, tok) != 0)
			nb++;
		if (!nb->name)
			die("%s:%d: unknown right or flag '%s'; fix: regenerate the ruleset with this launcher's "
			    "Envelope version", ruleset_path, line, tok);
		mask |= nb->bit;
	}
	return mask;
}

static uint64_t dir_only_mask(void)
{
	uint64_t m = 0;
	for (const struct name_bit *nb = FS_RIGHTS; nb->name; nb++)
		if (nb->dir_only)
			m |= nb->bit;
	return m;
}

static char *read_file(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die("cannot open ruleset %s: %s; fix: mount the ruleset file read-only into the container",
		    path, strerror(errno));
	size_t cap = 65536, len = 0;
	char *buf = xrealloc(NULL, cap + 1);
	for (;;) {
		if (len == cap) {
			if (cap >= MAX_FILE)
				die("ruleset %s is larger than %d bytes", path, MAX_FILE);
			cap *= 2;
			buf = xrealloc(buf, cap + 1);
		}
		ssize_t n = read(fd, buf + len, cap - len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("cannot read ruleset %s: %s", path, strerror(errno));
		}
		if (n == 0)
			break;
		len += (size_t)n;
	}
	close(fd);
	buf[len] = '\0';
	if (memchr(buf, '\0', len))
		die("ruleset %s contains a NUL byte", path);
	return buf;
}

struct ruleset_file {
	uint64_t handled;
	uint64_t flags;
	int best_effort;
	struct rule *rules;
	size_t n_rules;
};

static void parse(char *text, struct ruleset_file *rf)
{
	int line = 0, ended = 0, have_handled = 0;
	memset(rf, 0, sizeof(*rf));
	for (char *l = text, *next; l; l = next) {
		next = strchr(l, '\n');
		if (next)
			*next++ = '\0';
		line++;
		if (line == 1) {
			if (strcmp(l, MAGIC) != 0)
				die("%s:1: not an '%s' file; fix: write it with `envelope compile --format launcher`",
				    ruleset_path, MAGIC);
			continue;
		}
		if (ended) {
			if (*l)
				die("%s:%d: text after 'end'", ruleset_path, line);
			continue;
		}
		if (*l == '\0' || *l == '#')
			continue;
		char *sp = strchr(l, ' ');
		char *rest = sp ? sp + 1 : l + strlen(l);
		if (sp)
			*sp = '\0';
		if (strcmp(l, "end") == 0) {
			ended = 1;
		} else if (strcmp(l, "workload") == 0) {
			/* informational */
		} else if (strcmp(l, "handled_fs") == 0) {
			rf->handled = parse_names(rest, FS_RIGHTS, line);
			have_handled = 1;
		} else if (strcmp(l, "restrict_flags") == 0) {
			rf->flags = parse_names(rest, FLAGS, line);
		} else if (strcmp(l, "on_unsupported") == 0) {
			if (strcmp(rest, "refuse") == 0)
				rf->best_effort = 0;
			else if (strcmp(rest, "best-effort") == 0)
				rf->best_effort = 1;
			else
				die("%s:%d: on_unsupported '%s' is not refuse or best-effort", ruleset_path, line, rest);
		} else if (strcmp(l, "file") == 0 || strcmp(l, "tree") == 0 || strcmp(l, "children") == 0) {
			char *sp2 = strchr(rest, ' ');
			if (!sp2 || sp2[1] != '/')
				die("%s:%d: %s rule without an absolute path", ruleset_path, line, l);
			*sp2 = '\0';
			if (!have_handled)
				die("%s:%d: rule before handled_fs", ruleset_path, line);
			struct rule r = {0};
			r.object = l[0] == 'f' ? OBJ_FILE : l[0] == 't' ? OBJ_TREE : OBJ_CHILDREN;
			r.rights = parse_names(rest, FS_RIGHTS, line);
			r.path = sp2 + 1;
			r.line = line;
			if (r.rights & ~rf->handled)
				die("%s:%d: rule grants rights that are not in handled_fs", ruleset_path, line);
			rf->rules = xrealloc(rf->rules, (rf->n_rules + 1) * sizeof(struct rule));
			rf->rules[rf->n_rules++] = r;
		} else if (strcmp(l, "exclude") == 0) {
			if (!rf->n_rules || rf->rules[rf->n_rules - 1].object != OBJ_CHILDREN)
				die("%s:%d: exclude must follow a children rule", ruleset_path, line);
			struct rule *r = &rf->rules[rf->n_rules - 1];
			r->exclude = xrealloc(r->exclude, (r->n_exclude + 1) * sizeof(char *));
			r->exclude[r->n_exclude++] = rest;
		} else {
			die("%s:%d: unknown record '%s'", ruleset_path, line, l);
		}
	}
	if (!ended)
		die("%s: no 'end' line: the ruleset file is truncated", ruleset_path);
	if (!rf->handled)
		die("%s: handled_fs is empty: nothing to restrict", ruleset_path);
}

static long ll_create(uint64_t fs)
{
	struct ruleset_attr attr = {.handled_access_fs = fs};
	return syscall(__NR_landlock_create_ruleset, &attr, sizeof(attr), 0);
}

/* Rights of `wanted` this kernel can restrict, asked one by one. */
static uint64_t supported(uint64_t wanted)
{
	uint64_t ok = 0;
	for (const struct name_bit *nb = FS_RIGHTS; nb->name; nb++) {
		if (!(wanted & nb->bit))
			continue;
		long fd = ll_create(nb->bit);
		if (fd >= 0) {
			ok |= nb->bit;
			close((int)fd);
		} else if (errno != EINVAL) {
			die("landlock_create_ruleset(%s): %s", nb->name, strerror(errno));
		}
	}
	return ok;
}

static int add_path(int ruleset, int pfd, uint64_t rights, const char *path, enum object obj)
{
	struct stat st;
	if (fstat(pfd, &st) != 0) {
		msg("skip %s: fstat: %s", path, strerror(errno));
		return 0;
	}
	if (S_ISDIR(st.st_mode) && obj != OBJ_TREE) {
		msg("skip %s: is a directory (a rule on it would cover its whole tree)", path);
		return 0;
	}
	if (!S_ISDIR(st.st_mode) && (rights & dir_only_mask())) {
		rights &= ~dir_only_mask();
		if (!rights)
			return 0;
	}
	struct path_beneath_attr pb = {.allowed_access = rights, .parent_fd = pfd};
	if (syscall(__NR_landlock_add_rule, ruleset, RULE_PATH_BENEATH, &pb, 0) != 0)
		die("landlock_add_rule(%s): %s; fix: the ruleset file and this kernel disagree on rights",
		    path, strerror(errno));
	return 1;
}

static int add_rule(int ruleset, const struct rule *r)
{
	if (r->object != OBJ_CHILDREN) {
		int pfd = open(r->path, O_PATH | O_CLOEXEC);
		if (pfd < 0) {
			msg("skip %s: %s", r->path, strerror(errno));
			return 0;
		}
		int n = add_path(ruleset, pfd, r->rights, r->path, r->object);
		close(pfd);
		return n;
	}
	int dfd = open(r->path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0) {
		msg("skip %s: %s", r->path, strerror(errno));
		return 0;
	}
	DIR *d = fdopendir(dfd);
	if (!d)
		die("fdopendir(%s): %s", r->path, strerror(errno));
	int n = 0;
	struct dirent *de;
	while ((de = readdir(d)) != NULL) {
		if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
			continue;
		int excluded = 0;
		for (size_t i = 0; i < r->n_exclude && !excluded; i++)
			excluded = fnmatch(r->exclude[i], de->d_name, 0) == 0;
		if (excluded)
			continue;
		struct stat st;
		if (fstatat(dfd, de->d_name, &st, 0) != 0 || S_ISDIR(st.st_mode))
			continue;
		int pfd = openat(dfd, de->d_name, O_PATH | O_CLOEXEC);
		if (pfd < 0)
			continue;
		n += add_path(ruleset, pfd, r->rights, de->d_name, OBJ_FILE);
		close(pfd);
	}
	closedir(d);
	return n;
}

int main(int argc, char **argv)
{
	int i = 1;
	const char *file = NULL;
	while (i < argc) {
		if (strcmp(argv[i], "--ruleset") == 0 && i + 1 < argc) {
			file = argv[i + 1];
			i += 2;
		} else if (strcmp(argv[i], "--") == 0) {
			i++;
			break;
		} else {
			break;
		}
	}
	if (!file || i >= argc) {
		fprintf(stderr, "usage: envelope-launch --ruleset FILE [--] CMD [ARGS...]\n");
		return 2;
	}
	ruleset_path = file;
	struct ruleset_file rf;
	parse(read_file(file), &rf);

	long abi = syscall(__NR_landlock_create_ruleset, NULL, 0, CREATE_RULESET_VERSION);
	if (abi < 0)
		die("Landlock unavailable (%s); fix: a kernel with CONFIG_SECURITY_LANDLOCK=y and landlock "
		    "in lsm=", strerror(errno));
	uint64_t ok = supported(rf.handled), missing = rf.handled & ~ok;
	if (missing) {
		for (const struct name_bit *nb = FS_RIGHTS; nb->name; nb++)
			if (missing & nb->bit)
				msg("%s: %s needs Landlock ABI %d; this kernel has ABI %ld",
				    rf.best_effort ? "gap" : "error", nb->name, nb->abi, abi);
		if (!rf.best_effort)
			die("refusing to run with rights the kernel cannot restrict; fix: a newer kernel, or "
			    "on_unsupported best-effort to run with the gaps listed");
		rf.handled &= ok;
		if (!rf.handled)
			die("no handled right is supported by this kernel");
	}
	uint64_t flags = 0;
	for (const struct name_bit *nb = FLAGS; nb->name; nb++) {
		if (!(rf.flags & nb->bit))
			continue;
		if (abi >= nb->abi)
			flags |= nb->bit;
		else
			msg("warning: restrict flag %s needs Landlock ABI %d; denials after exec are not logged",
			    nb->name, nb->abi);
	}

	long ruleset = ll_create(rf.handled);
	if (ruleset < 0)
		die("landlock_create_ruleset: %s", strerror(errno));
	for (size_t r = 0; r < rf.n_rules; r++) {
		rf.rules[r].rights &= rf.handled;
		if (rf.rules[r].rights)
			add_rule((int)ruleset, &rf.rules[r]);
	}
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
		die("prctl(PR_SET_NO_NEW_PRIVS): %s", strerror(errno));
	if (syscall(__NR_landlock_restrict_self, (int)ruleset, (unsigned)flags) != 0)
		die("landlock_restrict_self: %s", strerror(errno));
	close((int)ruleset);

	execvp(argv[i], argv + i);
	int e = errno;
	msg("exec %s: %s", argv[i], strerror(e));
	return e == ENOENT ? 127 : 126;
}
