/* A known workload for the capability probe: each argument is one operation whose capability
 * checks are known, so tests can expect exact counts.
 *
 *   bind=PORT         bind a TCP socket to 127.0.0.1:PORT (below 1024: one CAP_NET_BIND_SERVICE check)
 *   chown=PATH:UID    chown(PATH, UID, -1) of a file owned by someone else (one CAP_CHOWN check)
 *   raw               socket(AF_INET, SOCK_RAW, IPPROTO_ICMP) (one CAP_NET_RAW check)
 *   uts=NAME          unshare(CLONE_NEWUTS), then sethostname(NAME) in the new namespace (CAP_SYS_ADMIN)
 *   klog=N            N x syslog(SYSLOG_ACTION_SIZE_UNREAD) (one CAP_SYSLOG check each)
 *   mmap=N            N private writable anonymous mappings, touched and unmapped (overcommit
 *                     accounting's CAP_SYS_ADMIN question, which is not behaviour)
 *   drop              setgroups(0), setgid(65534), setuid(65534): a server dropping root
 *                     (CAP_SETGID twice, CAP_SETUID once); later operations are refused
 *
 * Prints one line per operation: "<op> ok" or "<op> errno <n>". Exits 0.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/klog.h>
#include <sys/mman.h>
#include <grp.h>
#include <sys/socket.h>
#include <unistd.h>

static void report(const char *op, int rc)
{
	if (rc < 0)
		printf("%s errno %d\n", op, errno);
	else
		printf("%s ok\n", op);
}

int main(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		char *a = argv[i];
		if (!strncmp(a, "bind=", 5)) {
			int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
			setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
			struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons(atoi(a + 5))};
			sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
			report("bind", bind(s, (struct sockaddr *)&sin, sizeof(sin)));
			close(s);
		} else if (!strncmp(a, "chown=", 6)) {
			char *path = a + 6, *colon = strrchr(path, ':');
			if (!colon)
				return 2;
			*colon = 0;
			report("chown", chown(path, (uid_t)atoi(colon + 1), (gid_t)-1));
		} else if (!strcmp(a, "raw")) {
			int s = socket(AF_INET, SOCK_RAW, IPPROTO_ICMP);
			report("raw", s);
			if (s >= 0)
				close(s);
		} else if (!strncmp(a, "uts=", 4)) {
			int rc = unshare(CLONE_NEWUTS);
			report("unshare", rc);
			if (rc == 0)
				report("sethostname", sethostname(a + 4, strlen(a + 4)));
		} else if (!strncmp(a, "klog=", 5)) {
			long n = atol(a + 5), failed = 0;
			for (long k = 0; k < n; k++)
				if (klogctl(9, NULL, 0) < 0)
					failed++;
			printf("klog %ld failed %ld\n", n, failed);
		} else if (!strncmp(a, "mmap=", 5)) {
			long n = atol(a + 5);
			for (long k = 0; k < n; k++) {
				char *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
				if (p == MAP_FAILED)
					return 3;
				p[0] = 1;
				munmap(p, 4096);
			}
			printf("mmap %ld\n", n);
		} else if (!strcmp(a, "drop")) {
			int rc = setgroups(0, NULL);
			if (rc == 0)
				rc = setgid(65534);
			if (rc == 0)
				rc = setuid(65534);
			report("drop", rc);
		} else {
			fprintf(stderr, "unknown operation %s\n", a);
			return 2;
		}
	}
	fflush(stdout);
	return 0;
}
