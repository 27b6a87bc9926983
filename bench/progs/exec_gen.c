/* exec_gen CGROUP_PROCS SECONDS TARGET: exec load generator.
 *
 * Joins the cgroup, then for SECONDS forks and execs TARGET (a static no-op) and
 * reaps it, as fast as it can. A child that exits 0 proves its exec happened; one
 * whose exec failed exits 127 and is counted apart. Prints
 * "execs=<n> failed=<n> seconds=<float>" on stdout.
 */
#include <stdlib.h>
#include <sys/wait.h>

#include "cgroup_join.h"

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s CGROUP_PROCS SECONDS TARGET\n", argv[0]);
		return 2;
	}
	double seconds = atof(argv[2]);
	char *target = argv[3];
	char *child_argv[] = {target, NULL};
	char *child_envp[] = {NULL};
	long execs = 0, failed = 0;

	if (cgroup_join(argv[1]) != 0)
		return 1;
	double start = mono_seconds(), end = start + seconds;
	while (mono_seconds() < end) {
		pid_t pid = fork();
		if (pid < 0) {
			failed++;
			continue;
		}
		if (pid == 0) {
			execve(target, child_argv, child_envp);
			_exit(127);
		}
		int status;
		if (waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0)
			execs++;
		else
			failed++;
	}
	printf("execs=%ld failed=%ld seconds=%.3f\n", execs, failed, mono_seconds() - start);
	return 0;
}
