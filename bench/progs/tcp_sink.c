/* tcp_sink WORKERS: a TCP listener on 127.0.0.1 that accepts and closes.
 *
 * Binds an ephemeral port, prints "port=<n>" on stdout, then forks WORKERS-1
 * more processes so WORKERS processes accept() on the same socket and close each
 * connection at once. Runs until killed (the whole process group).
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	int workers = argc > 1 ? atoi(argv[1]) : 1;
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
	socklen_t len = sizeof(addr);
	int one = 1;

	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	int lfd = socket(AF_INET, SOCK_STREAM, 0);
	if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
	    bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) != 0 || listen(lfd, 4096) != 0 ||
	    getsockname(lfd, (struct sockaddr *)&addr, &len) != 0) {
		fprintf(stderr, "tcp_sink: listen on 127.0.0.1: %s\n", strerror(errno));
		return 1;
	}
	printf("port=%d\n", ntohs(addr.sin_port));
	fflush(stdout);
	for (int i = 1; i < workers; i++)
		if (fork() == 0)
			break;
	for (;;) {
		int fd = accept(lfd, NULL, NULL);
		if (fd >= 0)
			close(fd);
	}
}
