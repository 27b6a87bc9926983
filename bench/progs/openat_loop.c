/* openat_loop PATH DENIED N: the per-open cost probe for the Landlock benchmark.
 *
 * Opens and closes PATH (read-only) N times after N/10 warm-up opens, timed in thread CPU
 * time, then tries once to open DENIED and reports its errno (0 when it opened): under a
 * ruleset that does not allow DENIED that is EACCES, which proves the ruleset is in force in the
 * measured process. Prints
 * "opens=<n> failed=<n> denied_errno=<e> ns_per_open=<float>" on stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s PATH DENIED N\n", argv[0]);
		return 2;
	}
	long n = atol(argv[3]), failed = 0;
	for (long i = 0; i < n / 10; i++) {
		int fd = openat(AT_FDCWD, argv[1], O_RDONLY | O_CLOEXEC);
		if (fd >= 0)
			close(fd);
	}
	double t0 = now_ns();
	for (long i = 0; i < n; i++) {
		int fd = openat(AT_FDCWD, argv[1], O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			failed++;
		else
			close(fd);
	}
	double t1 = now_ns();
	int fd = openat(AT_FDCWD, argv[2], O_RDONLY | O_CLOEXEC);
	int denied = fd < 0 ? errno : 0;
	if (fd >= 0)
		close(fd);
	printf("opens=%ld failed=%ld denied_errno=%d ns_per_open=%.1f\n", n - failed, failed, denied, (t1 - t0) / n);
	return 0;
}
