/* capable_loop MODE N: the per-capability-check cost probe.
 *
 * MODE nice: N pairs setpriority(PRIO_PROCESS, 0, 18), setpriority(PRIO_PROCESS, 0, 19), the
 *            loop at nice 19 throughout. Lowering the nice value below the RLIMIT_NICE bound
 *            (0: no lowering allowed) makes the kernel ask capable(CAP_SYS_NICE) (can_nice);
 *            raising it back asks nothing: one check per pair, and two cheap syscalls.
 * MODE uts:  unshare(CLONE_NEWUTS) once, then N sethostname() calls in the new namespace: one
 *            ns_capable(CAP_SYS_ADMIN) each (the capability probe finds the caller of
 *            CAP_SYS_ADMIN checks only, to leave overcommit accounting's out).
 * MODE mmap: N private writable anonymous one-page mappings, touched and unmapped: overcommit
 *            accounting's cap_capable(CAP_SYS_ADMIN) on each, the check the probe leaves out.
 *
 * Runs N/10 warm-up calls first and prints
 * "ns_per_call=<float> wall_ns_per_call=<float> calls=<N> failed=<F>" on stdout, ns_per_call in
 * the thread's own CPU time (CLOCK_THREAD_CPUTIME_ID), as getppid_loop does. Needs root.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static double now_ns(clockid_t clock)
{
	struct timespec ts;
	clock_gettime(clock, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static long failed;

enum { NICE, UTS, MMAP };

static void one(int mode)
{
	int rc;
	if (mode == MMAP) {
		char *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED) {
			failed++;
			return;
		}
		p[0] = 1;
		rc = munmap(p, 4096);
	} else if (mode == UTS) {
		rc = sethostname("envelope-bench", 14);
	} else {
		rc = setpriority(PRIO_PROCESS, 0, 18) | setpriority(PRIO_PROCESS, 0, 19);
	}
	if (rc < 0)
		failed++;
}

int main(int argc, char **argv)
{
	if (argc != 3 || (strcmp(argv[1], "nice") && strcmp(argv[1], "uts") && strcmp(argv[1], "mmap"))) {
		fprintf(stderr, "usage: %s nice|uts|mmap N\n", argv[0]);
		return 2;
	}
	int mode = !strcmp(argv[1], "uts") ? UTS : !strcmp(argv[1], "mmap") ? MMAP : NICE;
	long n = atol(argv[2]);
	if (n <= 0) {
		fprintf(stderr, "capable_loop: N must be positive, got %s\n", argv[2]);
		return 2;
	}
	if (mode == UTS && unshare(CLONE_NEWUTS) != 0) {
		perror("unshare(CLONE_NEWUTS)");
		return 1;
	}
	if (mode == NICE && setpriority(PRIO_PROCESS, 0, 19) != 0) {
		perror("setpriority 19");
		return 1;
	}
	for (long i = 0; i < n / 10; i++)
		one(mode);
	failed = 0;
	double w0 = now_ns(CLOCK_MONOTONIC), c0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
	for (long i = 0; i < n; i++)
		one(mode);
	double c1 = now_ns(CLOCK_THREAD_CPUTIME_ID), w1 = now_ns(CLOCK_MONOTONIC);
	printf("ns_per_call=%.3f wall_ns_per_call=%.3f calls=%ld failed=%ld\n", (c1 - c0) / (double)n,
	       (w1 - w0) / (double)n, n, failed);
	return 0;
}
