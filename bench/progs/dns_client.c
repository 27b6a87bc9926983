#define _GNU_SOURCE
/* dns_client MODE CGROUP_PROCS RESOLVER N [ARG]: the DNS benchmark's client. Joins the cgroup,
 * pinned to the last CPU, and asks RESOLVER:53 for "n<i>.bench.test" (type A) over UDP.
 *
 *   rtt    N        N lookups of n0.bench.test; wall ns per round trip
 *   fresh  N PORT   for i < N: look up n<i>, then at once connect() a UDP socket to the answered
 *                   address, PORT; counts connects that succeeded and that failed (and with EPERM)
 *   learn  N M      look up n0..n<N-1> (learning N names), then time M connect() calls to the
 *                   address of n7, port 443, in thread CPU time
 *
 * Prints one line "key=value ...". A lookup that gets no A record counts as failed. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/socket.h>

#include "cgroup_join.h"

static int q_fd;
static struct sockaddr_in resolver;

static double thread_seconds(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* One lookup; returns 0 and the address, or -1. */
static int lookup(long i, struct in_addr *addr)
{
	unsigned char q[64], r[512];
	static unsigned short id;
	char label[24];
	int ll = snprintf(label, sizeof(label), "n%ld", i);
	size_t n = 0;
	id++;
	q[n++] = id >> 8, q[n++] = id & 0xff, q[n++] = 0x01, q[n++] = 0x00;
	q[n++] = 0, q[n++] = 1, q[n++] = 0, q[n++] = 0, q[n++] = 0, q[n++] = 0, q[n++] = 0, q[n++] = 0;
	q[n++] = (unsigned char)ll;
	memcpy(q + n, label, (size_t)ll), n += (size_t)ll;
	memcpy(q + n, "\x05" "bench" "\x04" "test", 11), n += 11;
	q[n++] = 0, q[n++] = 0, q[n++] = 1, q[n++] = 0, q[n++] = 1;
	if (send(q_fd, q, n, 0) != (ssize_t)n)
		return -1;
	for (;;) {
		ssize_t got = recv(q_fd, r, sizeof(r), 0);
		if (got < 0)
			return -1;
		if (got < 12 || r[0] != (id >> 8) || r[1] != (id & 0xff))
			continue; /* a late answer to an earlier query */
		if ((r[3] & 0x0f) || r[7] == 0 || got < (ssize_t)n + 16)
			return -1;
		memcpy(addr, r + n + 12, 4);
		return 0;
	}
}

int main(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: %s rtt|fresh|learn CGROUP_PROCS RESOLVER N [ARG]\n", argv[0]);
		return 2;
	}
	const char *mode = argv[1];
	long count = atol(argv[4]);
	if (cgroup_join(argv[2]) != 0)
		return 1;
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(sysconf(_SC_NPROCESSORS_ONLN) - 1, &set);
	sched_setaffinity(0, sizeof(set), &set);
	resolver.sin_family = AF_INET;
	resolver.sin_port = htons(53);
	inet_pton(AF_INET, argv[3], &resolver.sin_addr);
	q_fd = socket(AF_INET, SOCK_DGRAM, 0);
	struct timeval tv = {.tv_sec = 2};
	setsockopt(q_fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	if (connect(q_fd, (struct sockaddr *)&resolver, sizeof(resolver)) != 0) {
		fprintf(stderr, "connect to the resolver: %s\n", strerror(errno));
		return 1;
	}
	struct in_addr addr;
	if (!strcmp(mode, "rtt")) {
		long failed = 0;
		for (long i = 0; i < count / 10; i++)
			lookup(0, &addr);
		double t0 = mono_seconds();
		for (long i = 0; i < count; i++)
			failed += lookup(0, &addr) != 0;
		double t1 = mono_seconds();
		printf("lookups=%ld failed=%ld ns_per_lookup=%.1f\n", count, failed, (t1 - t0) / count * 1e9);
		return 0;
	}
	if (!strcmp(mode, "fresh")) {
		int port = argc > 5 ? atoi(argv[5]) : 443;
		long ok = 0, failed = 0, eperm = 0, lookups_failed = 0;
		for (long i = 0; i < count; i++) {
			if (lookup(i, &addr) != 0) {
				lookups_failed++;
				continue;
			}
			struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port),
						  .sin_addr = addr};
			int s = socket(AF_INET, SOCK_DGRAM, 0);
			if (connect(s, (struct sockaddr *)&dst, sizeof(dst)) == 0) {
				ok++;
			} else {
				failed++;
				eperm += errno == EPERM;
			}
			close(s);
		}
		printf("lookups=%ld lookups_failed=%ld connects_ok=%ld connects_failed=%ld eperm=%ld\n", count,
		       lookups_failed, ok, failed, eperm);
		return 0;
	}
	if (!strcmp(mode, "learn")) {
		long m = argc > 5 ? atol(argv[5]) : 1000000;
		long lookups_failed = 0;
		struct in_addr target = {0};
		for (long i = 0; i < count; i++) {
			if (lookup(i, &addr) != 0)
				lookups_failed++;
			else if (i == 7)
				target = addr;
		}
		struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(443), .sin_addr = target};
		int s = socket(AF_INET, SOCK_DGRAM, 0);
		long failed = 0, last = 0;
		for (long i = 0; i < m / 10; i++)
			connect(s, (struct sockaddr *)&dst, sizeof(dst));
		double t0 = thread_seconds();
		for (long i = 0; i < m; i++)
			if (connect(s, (struct sockaddr *)&dst, sizeof(dst)) != 0)
				failed++, last = errno;
		double t1 = thread_seconds();
		printf("names=%ld lookups_failed=%ld connects=%ld failed=%ld last_errno=%ld seconds=%.6f\n", count,
		       lookups_failed, m, failed, last, t1 - t0);
		return 0;
	}
	fprintf(stderr, "unknown mode %s\n", mode);
	return 2;
}
