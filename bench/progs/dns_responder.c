/* dns_responder ADDRESS PORT TTL: a minimal authoritative DNS responder over UDP for the DNS
 * benchmark. A query for "n<N>.<anything>" (type A) is answered with one A record
 * 10.80.<N / 256>.<N % 256> and the given TTL; any other query gets NXDOMAIN. It prints
 * "ready" once bound and answers until killed, counting what it answered on SIGTERM:
 * "answered=<n>". */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s ADDRESS PORT TTL\n", argv[0]);
		return 2;
	}
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
	unsigned int ttl = (unsigned int)atoi(argv[3]);
	inet_pton(AF_INET, argv[1], &a.sin_addr);
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
		perror("bind");
		return 1;
	}
	struct sigaction sa = {.sa_handler = on_term};
	sigaction(SIGTERM, &sa, NULL);
	printf("ready\n");
	fflush(stdout);
	long answered = 0;
	unsigned char buf[1500];
	while (!stop) {
		struct sockaddr_in peer;
		socklen_t plen = sizeof(peer);
		ssize_t n = recvfrom(fd, buf, 512, 0, (struct sockaddr *)&peer, &plen);
		if (n < 17)
			continue;
		size_t q = 12; /* end of the question name */
		while (q < (size_t)n && buf[q] != 0 && buf[q] < 64)
			q += 1 + buf[q];
		if (q + 5 > (size_t)n)
			continue;
		size_t qend = q + 5; /* root label, qtype, qclass */
		long id = -1;
		if (buf[12] >= 2 && buf[13] == 'n') {
			char num[16] = {0};
			int len = buf[12] - 1 < 15 ? buf[12] - 1 : 15;
			memcpy(num, buf + 14, (size_t)len);
			id = strtol(num, NULL, 10);
		}
		buf[2] = 0x84 | (buf[2] & 0x01); /* response, authoritative, RD copied */
		buf[3] = 0x80;                   /* RA */
		buf[8] = buf[9] = buf[10] = buf[11] = 0;
		size_t out = qend;
		if (id >= 0 && buf[qend - 4] == 0 && buf[qend - 3] == 1) {
			buf[6] = 0, buf[7] = 1;
			unsigned char rr[16] = {0xc0, 0x0c, 0, 1, 0, 1, (unsigned char)(ttl >> 24),
						(unsigned char)(ttl >> 16), (unsigned char)(ttl >> 8),
						(unsigned char)ttl, 0, 4, 10, 80,
						(unsigned char)((id >> 8) & 0xff), (unsigned char)(id & 0xff)};
			memcpy(buf + out, rr, sizeof(rr));
			out += sizeof(rr);
		} else {
			buf[3] |= 3; /* NXDOMAIN */
			buf[6] = buf[7] = 0;
		}
		if (sendto(fd, buf, out, 0, (struct sockaddr *)&peer, plen) == (ssize_t)out)
			answered++;
	}
	printf("answered=%ld\n", answered);
	return 0;
}
