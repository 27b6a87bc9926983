/* connect_gen CGROUP_PROCS SECONDS PORT: TCP connect load generator.
 *
 * Joins the cgroup, then for SECONDS opens a TCP socket, connects it to
 * 127.0.0.1:PORT and closes it, as fast as it can. SO_LINGER 0 makes close() send
 * a reset, so no TIME_WAIT piles up and the ephemeral ports never run out. Every
 * connect() call is counted, and those that failed apart. Prints
 * "connects=<n> ok=<n> failed=<n> seconds=<float>" on stdout.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>

#include "cgroup_join.h"

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s CGROUP_PROCS SECONDS PORT\n", argv[0]);
		return 2;
	}
	double seconds = atof(argv[2]);
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[3]))};
	struct linger lg = {.l_onoff = 1, .l_linger = 0};
	long connects = 0, ok = 0, failed = 0, last_errno = 0;

	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (cgroup_join(argv[1]) != 0)
		return 1;
	double start = mono_seconds(), end = start + seconds;
	while (mono_seconds() < end) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		if (fd < 0) {
			fprintf(stderr, "socket: %s\n", strerror(errno));
			return 1;
		}
		setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
		connects++;
		if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0) {
			ok++;
		} else {
			failed++;
			last_errno = errno;
		}
		close(fd);
	}
	printf("connects=%ld ok=%ld failed=%ld last_errno=%ld seconds=%.3f\n", connects, ok, failed,
	       last_errno, mono_seconds() - start);
	return 0;
}
