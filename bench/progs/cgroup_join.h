/* Shared by the load generators: move the calling process into a cgroup v2 by
 * writing its pid to <cgroup>/cgroup.procs. A generator joins its cgroup itself,
 * after its own exec, so the events counted in that cgroup are exactly the ones
 * the generator reports. */
#ifndef BENCH_CGROUP_JOIN_H
#define BENCH_CGROUP_JOIN_H

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int cgroup_join(const char *procs_path)
{
	char buf[32];
	int fd = open(procs_path, O_WRONLY);
	if (fd < 0) {
		fprintf(stderr, "open %s: %s\n", procs_path, strerror(errno));
		return -1;
	}
	int len = snprintf(buf, sizeof(buf), "%d\n", (int)getpid());
	if (write(fd, buf, (size_t)len) != len) {
		fprintf(stderr, "write %s: %s\n", procs_path, strerror(errno));
		close(fd);
		return -1;
	}
	close(fd);
	return 0;
}

static double mono_seconds(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

#endif
