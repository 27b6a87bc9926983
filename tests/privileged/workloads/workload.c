/* A workload whose behaviour is known exactly, for the sensor's privileged tests.
 *
 * Arguments are key=value, acted on in this order:
 *   getcpu=N        N raw getcpu syscalls (glibc's getcpu uses the vDSO; this does not)
 *   personality=N   N personality(0xffffffff) queries
 *   move=PATH       write 0 to PATH (a cgroup.procs file): move this process there
 *   getcpu2=N       N more getcpu syscalls, after the move
 *   exec=PATH       fork; the child execs PATH with argv {PATH, "envelope-arg"}; wait
 *   tcp=PORT        connect a TCP socket to 127.0.0.1:PORT
 *   tcp6=PORT       connect a TCP socket to [::1]:PORT
 *   udp=PORT        one UDP datagram to 127.0.0.1:PORT and one to [::1]:PORT
 *   forks=N         N times: fork, the child execs exec=PATH (default /usr/bin/true); wait
 *   tcpn=N          N more TCP connects to 127.0.0.1:PORT of tcp=PORT (needs tcp=), each
 *                   closed with SO_LINGER 0 (a reset: no TIME_WAIT piles up)
 *   udpn=N          N more UDP datagrams to 127.0.0.1:PORT of udp=PORT (needs udp=)
 *   spray=N         N UDP connects of one socket, each to a distinct loopback destination:
 *                   127.0.0.0 + 1 + i, port 9 (no datagram is sent); prints "sprayed N failed F"
 *   spread=N        N UDP datagrams, each to a distinct destination 127.0.0.1:(20000 + i)
 *   exit=CODE       exit status (default 0)
 * Prints "child PID" for every child it forks.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *arg(int argc, char **argv, const char *key)
{
	size_t n = strlen(key);
	for (int i = 1; i < argc; i++)
		if (strncmp(argv[i], key, n) == 0 && argv[i][n] == '=')
			return argv[i] + n + 1;
	return NULL;
}

static long num(int argc, char **argv, const char *key, long dflt)
{
	const char *v = arg(argc, argv, key);
	return v ? atol(v) : dflt;
}

static void spawn(const char *path)
{
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0) {
		perror("fork");
		exit(100);
	}
	if (pid == 0) {
		char *const av[] = {(char *)path, "envelope-arg", NULL};
		execv(path, av);
		perror("execv");
		_exit(101);
	}
	printf("child %d\n", pid);
	int status;
	waitpid(pid, &status, 0);
}

static void getcpus(long n)
{
	unsigned cpu, node;
	for (long i = 0; i < n; i++)
		syscall(SYS_getcpu, &cpu, &node, NULL);
}

int main(int argc, char **argv)
{
	const char *v;
	getcpus(num(argc, argv, "getcpu", 0));
	for (long i = num(argc, argv, "personality", 0); i > 0; i--)
		syscall(SYS_personality, 0xffffffffUL);
	if ((v = arg(argc, argv, "move"))) {
		int fd = open(v, O_WRONLY);
		if (fd < 0 || write(fd, "0", 1) != 1) {
			perror("move");
			return 102;
		}
		close(fd);
	}
	getcpus(num(argc, argv, "getcpu2", 0));
	const char *exec_path = arg(argc, argv, "exec");
	if (exec_path && !arg(argc, argv, "forks"))
		spawn(exec_path);
	if ((v = arg(argc, argv, "tcp"))) {
		struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(v))};
		inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
		int s = socket(AF_INET, SOCK_STREAM, 0);
		if (connect(s, (struct sockaddr *)&a, sizeof(a)) != 0)
			perror("connect tcp");
		close(s);
	}
	if ((v = arg(argc, argv, "tcp6"))) {
		struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(atoi(v))};
		inet_pton(AF_INET6, "::1", &a.sin6_addr);
		int s = socket(AF_INET6, SOCK_STREAM, 0);
		if (connect(s, (struct sockaddr *)&a, sizeof(a)) != 0)
			perror("connect tcp6");
		close(s);
	}
	if ((v = arg(argc, argv, "udp"))) {
		struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(v))};
		inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
		int s = socket(AF_INET, SOCK_DGRAM, 0);
		sendto(s, "x", 1, 0, (struct sockaddr *)&a, sizeof(a));
		close(s);
		struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons(atoi(v))};
		inet_pton(AF_INET6, "::1", &a6.sin6_addr);
		s = socket(AF_INET6, SOCK_DGRAM, 0);
		sendto(s, "x", 1, 0, (struct sockaddr *)&a6, sizeof(a6));
		close(s);
	}
	if ((v = arg(argc, argv, "tcp"))) {
		struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(v))};
		inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
		struct linger lg = {.l_onoff = 1, .l_linger = 0};
		for (long i = num(argc, argv, "tcpn", 0); i > 0; i--) {
			int s = socket(AF_INET, SOCK_STREAM, 0);
			setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
			if (connect(s, (struct sockaddr *)&a, sizeof(a)) != 0)
				perror("connect tcpn");
			close(s);
		}
	}
	if ((v = arg(argc, argv, "udp"))) {
		struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(v))};
		inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
		int s = socket(AF_INET, SOCK_DGRAM, 0);
		for (long i = num(argc, argv, "udpn", 0); i > 0; i--)
			if (sendto(s, "x", 1, 0, (struct sockaddr *)&a, sizeof(a)) != 1)
				perror("sendto udpn");
		close(s);
	}
	long spray = num(argc, argv, "spray", 0), failed = 0;
	if (spray > 0) {
		int s = socket(AF_INET, SOCK_DGRAM, 0);
		for (long i = 0; i < spray; i++) {
			struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(9),
						.sin_addr.s_addr = htonl(0x7f000001u + (unsigned)i)};
			if (connect(s, (struct sockaddr *)&a, sizeof(a)) != 0)
				failed++;
		}
		close(s);
		printf("sprayed %ld failed %ld\n", spray, failed);
	}
	long spread = num(argc, argv, "spread", 0);
	if (spread > 0) {
		int s = socket(AF_INET, SOCK_DGRAM, 0);
		for (long i = 0; i < spread; i++) {
			struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(20000 + i)};
			inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
			sendto(s, "x", 1, 0, (struct sockaddr *)&a, sizeof(a));
		}
		close(s);
	}
	for (long i = num(argc, argv, "forks", 0); i > 0; i--)
		spawn(exec_path ? exec_path : "/usr/bin/true");
	fflush(stdout);
	return (int)num(argc, argv, "exit", 0);
}
