/* workload CGROUP_PROCS SECONDS PERIOD_MS PORT TARGET: one small, steady workload.
 *
 * Joins the cgroup, then every PERIOD_MS for SECONDS: a few cheap syscalls
 * (getpid, uname), one file read (open/read/close of /proc/self/stat), one
 * fork+exec of TARGET, and one TCP connect to 127.0.0.1:PORT. Used to give a
 * daemon many live workloads at once. Stops at SIGTERM or after SECONDS and prints
 * "rounds=<n> execs=<n> connects=<n>": the execs that ran (children that exited 0) and
 * the connect() calls made, which a sensor must have counted exactly.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <signal.h>

#include "cgroup_join.h"

static volatile sig_atomic_t stopping;

static void on_term(int sig)
{
	(void)sig;
	stopping = 1;
}

int main(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "usage: %s CGROUP_PROCS SECONDS PERIOD_MS PORT TARGET\n", argv[0]);
		return 2;
	}
	double seconds = atof(argv[2]);
	long period_ms = atol(argv[3]);
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[4]))};
	struct linger lg = {.l_onoff = 1, .l_linger = 0};
	struct timespec pause = {.tv_sec = period_ms / 1000, .tv_nsec = (period_ms % 1000) * 1000000L};
	char *child_argv[] = {argv[5], NULL};
	char *child_envp[] = {NULL};
	char buf[512];
	struct utsname uts;
	long rounds = 0, execs = 0, connects = 0;

	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	signal(SIGTERM, on_term);
	if (cgroup_join(argv[1]) != 0)
		return 1;
	double end = mono_seconds() + seconds;
	while (!stopping && mono_seconds() < end) {
		getpid();
		uname(&uts);
		int fd = open("/proc/self/stat", O_RDONLY);
		if (fd >= 0) {
			if (read(fd, buf, sizeof(buf)) < 0)
				perror("read");
			close(fd);
		}
		pid_t pid = fork();
		if (pid == 0) {
			execve(argv[5], child_argv, child_envp);
			_exit(127);
		}
		if (pid > 0) {
			int status = -1;
			while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
				;
			if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
				execs++;
		}
		int s = socket(AF_INET, SOCK_STREAM, 0);
		if (s >= 0) {
			setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
			connect(s, (struct sockaddr *)&addr, sizeof(addr));
			connects++;
			close(s);
		}
		rounds++;
		nanosleep(&pause, NULL);
	}
	printf("rounds=%ld execs=%ld connects=%ld\n", rounds, execs, connects);
	return 0;
}
