/* getppid_loop N: the per-syscall cost probe.
 *
 * Makes N getppid() system calls (raw syscall(2), so no libc caching can hide one)
 * after N/10 warm-up calls, timed with CLOCK_MONOTONIC, and prints
 * "ns_per_call=<float> calls=<N>" on stdout. getppid does almost no work in the
 * kernel, so the time per call is dominated by syscall entry/exit and whatever
 * is attached to the sys_enter tracepoint.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
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
	double t0 = now_ns();
	for (long i = 0; i < n; i++)
		syscall(SYS_getppid);
	double t1 = now_ns();
	printf("ns_per_call=%.3f calls=%ld\n", (t1 - t0) / (double)n, n);
	return 0;
}
