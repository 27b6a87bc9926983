/* udp_flood SECONDS: a flood of ring-buffer events for the sensor.
 *
 * For SECONDS, sends one-byte UDP datagrams from one socket to a new destination each time:
 * 127.0.0.1 to 127.0.255.255, ports 1024 to 65535, cycling. Nothing listens, so nothing is
 * received; every sendto is a send the sensor reports. Prints "sends=<n> seconds=<float>".
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s SECONDS\n", argv[0]);
		return 2;
	}
	double start = now(), end = start + atof(argv[1]);
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0) {
		perror("socket");
		return 1;
	}
	struct sockaddr_in addr = {.sin_family = AF_INET};
	unsigned long sends = 0;
	unsigned int host = 1, port = 1024;
	while ((sends & 1023) || now() < end) {
		addr.sin_addr.s_addr = htonl(0x7f000000u | host);
		addr.sin_port = htons((unsigned short)port);
		sendto(fd, "x", 1, 0, (struct sockaddr *)&addr, sizeof(addr));
		sends++;
		if (++port > 65535) {
			port = 1024;
			host = (host % 0xffff) + 1;
		}
	}
	printf("sends=%lu seconds=%.3f\n", sends, now() - start);
	return 0;
}
