/* getppid_loop N [probe]: the per-syscall cost probe.
 *
 * Makes N getppid() system calls (raw syscall(2), so no libc caching can hide one)
 * after N/10 warm-up calls and prints
 * "ns_per_call=<float> wall_ns_per_call=<float> calls=<N> failed=<n>" on stdout, where
 * failed counts the calls that did not return this process's parent (a filter that denies
 * getppid makes every call fail, and the loop then measured nothing).
 *
 * ns_per_call is measured with CLOCK_THREAD_CPUTIME_ID: the CPU time this thread
 * spent, user and kernel, including whatever BPF program runs on its sys_enter, but
 * not the time it sat preempted while a neighbour used the CPU. On a shared, busy
 * machine that makes it far steadier than wall time, which is printed beside it.
 * getppid does almost no work in the kernel, so the time per call is dominated by
 * syscall entry/exit and whatever is attached to the sys_enter tracepoint.
 *
 * Every clock read is checked: the thread CPU clock is a real clock_gettime syscall (the
 * vDSO serves only the wall clocks), which a seccomp filter may deny. A failed read ends
 * the program with status 3 and the reason on stderr, never a made-up time.
 *
 * With "probe", one personality(0xffffffff) query follows the loop (it changes nothing) and
 * "probe_errno=<errno or 0>" is printed: a filter that denies personality must make it fail.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now_ns(clockid_t clock, const char *what)
{
	struct timespec ts;
	if (syscall(SYS_clock_gettime, clock, &ts) != 0) {
		fprintf(stderr, "getppid_loop: clock_gettime(%s) failed: %s\n", what, strerror(errno));
		exit(3);
	}
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc < 2 || argc > 3 || (argc == 3 && strcmp(argv[2], "probe") != 0)) {
		fprintf(stderr, "usage: %s N [probe]\n", argv[0]);
		return 2;
	}
	long n = atol(argv[1]);
	if (n <= 0) {
		fprintf(stderr, "getppid_loop: N must be positive, got %s\n", argv[1]);
		return 2;
	}
	long parent = getppid(), failed = 0;
	for (long i = 0; i < n / 10; i++)
		syscall(SYS_getppid);
	double w0 = now_ns(CLOCK_MONOTONIC, "CLOCK_MONOTONIC");
	double c0 = now_ns(CLOCK_THREAD_CPUTIME_ID, "CLOCK_THREAD_CPUTIME_ID");
	for (long i = 0; i < n; i++)
		if (syscall(SYS_getppid) != parent)
			failed++;
	double c1 = now_ns(CLOCK_THREAD_CPUTIME_ID, "CLOCK_THREAD_CPUTIME_ID");
	double w1 = now_ns(CLOCK_MONOTONIC, "CLOCK_MONOTONIC");
	printf("ns_per_call=%.3f wall_ns_per_call=%.3f calls=%ld failed=%ld", (c1 - c0) / (double)n,
	       (w1 - w0) / (double)n, n, failed);
	if (argc == 3) {
		long r = syscall(SYS_personality, 0xffffffffUL);
		printf(" probe_errno=%d", r == -1 ? errno : 0);
	}
	printf("\n");
	return 0;
}
