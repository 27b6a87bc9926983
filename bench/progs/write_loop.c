/* write_loop N: the per-write() cost probe.
 *
 * Makes N write(2) calls of one byte to /dev/null (raw syscall(2)) after N/10 warm-up calls and
 * prints "ns_per_call=<float> wall_ns_per_call=<float> calls=<N> failed=<n>" (failed: writes
 * that did not write their byte), CPU time of this thread per
 * call (CLOCK_THREAD_CPUTIME_ID), as getppid_loop does. write is one of the syscalls the
 * request capture hooks in the cgroups it watches; run outside them, it measures what the hook
 * costs everyone else.
 */
#define _GNU_SOURCE
#include <fcntl.h>
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
		fprintf(stderr, "write_loop: N must be positive, got %s\n", argv[1]);
		return 2;
	}
	int fd = open("/dev/null", O_WRONLY);
	if (fd < 0) {
		perror("open /dev/null");
		return 1;
	}
	char b = 'x';
	for (long i = 0; i < n / 10; i++)
		syscall(SYS_write, fd, &b, 1);
	double w0 = now_ns(CLOCK_MONOTONIC), c0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
	long failed = 0;
	for (long i = 0; i < n; i++)
		if (syscall(SYS_write, fd, &b, 1) != 1)
			failed++;
	double c1 = now_ns(CLOCK_THREAD_CPUTIME_ID), w1 = now_ns(CLOCK_MONOTONIC);
	printf("ns_per_call=%.3f wall_ns_per_call=%.3f calls=%ld failed=%ld\n", (c1 - c0) / (double)n,
	       (w1 - w0) / (double)n, n, failed);
	return 0;
}
