/* denied_storm SECONDS [PROCS] [ignore-term]: a program that retries a denied call.
 *
 * PROCS processes (default 1) each call getsid(0) through raw syscall(2) as fast as they can
 * for SECONDS, retrying whatever it returns: what a program whose call a seccomp filter denies
 * does when it treats EPERM as transient. With "ignore-term" every process ignores SIGTERM,
 * so only a kill stops it. Prints "ready pid=<pid>" when the first process starts, and at the
 * end, per process, "calls=<n> eperm=<m>" (one line, the parent's sum of the children's
 * counts is not needed: each process prints its own).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void storm(double seconds)
{
	struct timespec t0, t;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	long calls = 0, eperm = 0;
	for (;;) {
		for (int i = 0; i < 4096; i++) {
			long r = syscall(SYS_getsid, 0);
			calls++;
			if (r < 0 && errno == EPERM)
				eperm++;
		}
		clock_gettime(CLOCK_MONOTONIC, &t);
		if ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 >= seconds)
			break;
	}
	printf("calls=%ld eperm=%ld\n", calls, eperm);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s SECONDS [PROCS] [ignore-term]\n", argv[0]);
		return 2;
	}
	double seconds = atof(argv[1]);
	int procs = argc > 2 ? atoi(argv[2]) : 1;
	if (argc > 3 && strcmp(argv[3], "ignore-term") == 0)
		signal(SIGTERM, SIG_IGN);
	printf("ready pid=%d\n", getpid());
	fflush(stdout);
	for (int i = 1; i < procs; i++) {
		pid_t pid = fork();
		if (pid == 0) {
			storm(seconds);
			return 0;
		}
	}
	storm(seconds);
	while (wait(NULL) > 0)
		;
	return 0;
}
