/* getppid_loop N: the per-syscall cost probe.
 *
 * Makes N getppid() system calls (raw syscall(2), so no libc caching can hide one)
 * after N/10 warm-up calls and prints
 * "ns_per_call=<float> wall_ns_per_call=<float> calls=<N>" on stdout.
 *
 * ns_per_call is measured with CLOCK_THREAD_CPUTIME_ID: the CPU time this thread
 * spent, user and kernel, including whatever BPF program runs on its sys_enter, but
 * not the time it sat preempted while a neighbour used the CPU. On a shared, busy
 * machine that makes it far steadier than wall time, which is printed beside it.
 * getppid does almost no work in the kernel, so the time per call is dominated by
 * syscall entry/exit and whatever is attached to the sys_enter tracepoint.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now_ns(clockid_t clock)
{
	struct timespec ts;
	clock_gettime(clock, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s N\n", argv[0]);
		return 2;
	}
	long n = atol(argv[1]);
	if (n <= 0) {
		fprintf(stderr, "getppid_loop: N must be positive, got %s\n", argv[1]);
		return 2;
	}
	for (long i = 0; i < n / 10; i++)
		syscall(SYS_getppid);
	double w0 = now_ns(CLOCK_MONOTONIC), c0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
	for (long i = 0; i < n; i++)
		syscall(SYS_getppid);
	double c1 = now_ns(CLOCK_THREAD_CPUTIME_ID), w1 = now_ns(CLOCK_MONOTONIC);
	printf("ns_per_call=%.3f wall_ns_per_call=%.3f calls=%ld\n", (c1 - c0) / (double)n,
	       (w1 - w0) / (double)n, n);
	return 0;
}
