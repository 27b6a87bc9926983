/* Connects to 127.0.0.1:PORT through io_uring instead of connect(2), COUNT times, after one
 * IORING_OP_NOP. Raw syscalls only (no liburing). Prints one line per completion:
 * "<opcode> <res>". Exit status 0 when the ring worked, 2 when io_uring_setup failed. */
#include <arpa/inet.h>
#include <linux/io_uring.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static int ring_fd;
static unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
static struct io_uring_sqe *sqes;
static struct io_uring_cqe *cqes;

static void submit(struct io_uring_sqe *tmpl)
{
	unsigned tail = *sq_tail, idx = tail & *sq_mask;
	sqes[idx] = *tmpl;
	sq_array[idx] = idx;
	__atomic_store_n(sq_tail, tail + 1, __ATOMIC_RELEASE);
	if (syscall(__NR_io_uring_enter, ring_fd, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0) {
		perror("io_uring_enter");
		exit(1);
	}
	unsigned head = __atomic_load_n(cq_head, __ATOMIC_ACQUIRE);
	while (head != __atomic_load_n(cq_tail, __ATOMIC_ACQUIRE)) {
		struct io_uring_cqe *c = &cqes[head & *cq_mask];
		printf("%llu %d\n", (unsigned long long)c->user_data, c->res);
		head++;
	}
	__atomic_store_n(cq_head, head, __ATOMIC_RELEASE);
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s PORT COUNT\n", argv[0]);
		return 64;
	}
	int port = atoi(argv[1]), count = atoi(argv[2]);
	struct io_uring_params p;
	memset(&p, 0, sizeof(p));
	ring_fd = syscall(__NR_io_uring_setup, 8, &p);
	if (ring_fd < 0) {
		perror("io_uring_setup");
		return 2;
	}
	char *sq = mmap(NULL, p.sq_off.array + p.sq_entries * sizeof(unsigned), PROT_READ | PROT_WRITE,
			MAP_SHARED | MAP_POPULATE, ring_fd, IORING_OFF_SQ_RING);
	char *cq = mmap(NULL, p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe),
			PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring_fd, IORING_OFF_CQ_RING);
	sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
		    MAP_SHARED | MAP_POPULATE, ring_fd, IORING_OFF_SQES);
	if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	sq_tail = (unsigned *)(sq + p.sq_off.tail);
	sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
	sq_array = (unsigned *)(sq + p.sq_off.array);
	cq_head = (unsigned *)(cq + p.cq_off.head);
	cq_tail = (unsigned *)(cq + p.cq_off.tail);
	cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
	cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);

	struct io_uring_sqe s;
	memset(&s, 0, sizeof(s));
	s.opcode = IORING_OP_NOP;
	s.user_data = IORING_OP_NOP;
	submit(&s);

	struct sockaddr_in a;
	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_port = htons(port);
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	for (int i = 0; i < count; i++) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		memset(&s, 0, sizeof(s));
		s.opcode = IORING_OP_CONNECT;
		s.fd = fd;
		s.addr = (unsigned long)&a;
		s.off = sizeof(a);
		s.user_data = IORING_OP_CONNECT;
		submit(&s);
		close(fd);
	}
	return 0;
}
