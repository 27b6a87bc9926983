/* injected.so: code injected into a real program (LD_PRELOAD), doing what an attacker would.
 *
 * Its constructor acts only in the process whose executable's name is $ENVELOPE_ABUSE_EXE and
 * whose command line contains $ENVELOPE_ABUSE_MATCH but not "envelope.cli" (so the envelope
 * command that launches the program, which inherits LD_PRELOAD, is left alone). What it does
 * is $ENVELOPE_ABUSE, a comma-separated list of:
 *   shell    fork, then execve /bin/sh in the child (the shell reports that it ran; a child
 *            whose execve failed reports why)
 *   connect  a TCP connect to 127.0.0.1:$ENVELOPE_ABUSE_PORT
 *   dangerous  process_vm_readv of one byte of its own memory (cross-process memory access,
 *              a syscall the programs here never make)
 * and it reports on stderr, one line: "envelope-abuse <what>: ok" or the errno's name.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static const char *errname(int e)
{
	switch (e) {
	case 0: return "ok";
	case EPERM: return "EPERM";
	case EACCES: return "EACCES";
	case ECONNREFUSED: return "ECONNREFUSED";
	case ENOSYS: return "ENOSYS";
	default: return strerror(e);
	}
}

static int targeted(void)
{
	const char *exe_want = getenv("ENVELOPE_ABUSE_EXE"), *match = getenv("ENVELOPE_ABUSE_MATCH");
	if (!exe_want || !match || !getenv("ENVELOPE_ABUSE"))
		return 0;
	char exe[4096];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
	if (n <= 0)
		return 0;
	exe[n] = 0;
	const char *base = strrchr(exe, '/');
	if (strcmp(base ? base + 1 : exe, exe_want) != 0)
		return 0;
	char cmd[8192];
	FILE *f = fopen("/proc/self/cmdline", "r");
	if (!f)
		return 0;
	size_t len = fread(cmd, 1, sizeof(cmd) - 1, f);
	fclose(f);
	for (size_t i = 0; i < len; i++)
		if (cmd[i] == 0)
			cmd[i] = ' ';
	cmd[len] = 0;
	return strstr(cmd, match) && !strstr(cmd, "envelope.cli");
}

static void attempt(const char *what)
{
	int err = 0;
	if (strcmp(what, "shell") == 0) {
		/* as system() would: a child that execs the shell; the child reports its execve */
		pid_t pid = fork();
		if (pid == 0) {
			char *argv[] = {"sh", "-c", "echo 'envelope-abuse shell: ok' >&2", NULL};
			execve("/bin/sh", argv, environ);
			dprintf(2, "envelope-abuse shell: %s\n", errname(errno));
			_exit(127);
		}
		if (pid > 0)
			return; /* the shell ran, or the child said why not */
		err = errno;
	} else if (strcmp(what, "connect") == 0) {
		int s = socket(AF_INET, SOCK_STREAM, 0);
		if (s < 0) {
			err = errno;
		} else {
			struct sockaddr_in a = {.sin_family = AF_INET,
			                        .sin_port = htons((unsigned short)atoi(getenv("ENVELOPE_ABUSE_PORT") ?: "9"))};
			a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
			if (connect(s, (struct sockaddr *)&a, sizeof(a)) != 0)
				err = errno;
			close(s);
		}
	} else if (strcmp(what, "dangerous") == 0) {
		char src = 'x', dst = 0;
		struct iovec local = {&dst, 1}, remote = {&src, 1};
		if (process_vm_readv(getpid(), &local, 1, &remote, 1, 0) < 0)
			err = errno;
	} else {
		return;
	}
	dprintf(2, "envelope-abuse %s: %s\n", what, errname(err));
}

__attribute__((constructor)) static void injected(void)
{
	if (!targeted())
		return;
	char list[256];
	snprintf(list, sizeof(list), "%s", getenv("ENVELOPE_ABUSE"));
	for (char *save = NULL, *w = strtok_r(list, ",", &save); w; w = strtok_r(NULL, ",", &save))
		attempt(w);
}
