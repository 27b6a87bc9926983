/* Envelope request capture: HTTP/1.x requests and responses of watched cgroups, from socket
 * syscalls (plaintext) and from uprobes on libssl (TLS plaintext), judged against a rule graph
 * before they are sent. Loaded by sensor/httpcapture.py through the loader child of
 * sensor/kernel.py; every program is load-only, the long-lived process attaches them.
 *
 * Programs:
 *   http_syscall         tail-called from the sensor's raw sys_enter (bpf/sensor.c, hook 0) for
 *                        write, writev, sendto, sendmsg, connect and close of hooked cgroups
 *   http_connect4/6      cgroup sock_addr, per watched cgroup: a TCP socket's (process, fd) is
 *                        tied to its cookie and destination
 *   http_ingress         cgroup_skb ingress, per watched cgroup: the first bytes of a response
 *                        on a plaintext connection that awaits one
 *   http_egress          cgroup_skb egress, per watched cgroup: drops the packets of a socket
 *                        whose request was refused
 *   http_ssl_*           uprobes and uretprobes on SSL_write(_ex), SSL_read(_ex) and
 *                        SSL_do_handshake of every libssl a watched process maps (or on the
 *                        function the _ex forms call, with their arguments: sensor/tlsstack.py)
 *   http_scan_*, http_judge_*  the two steps that judge a request head, tail-called (one copy
 *                        per program type: raw tracepoint and kprobe programs cannot share a
 *                        program array), each verified on its own
 *
 * The socket of an SSL object comes from the socket syscall nested in an SSL_* call of the same
 * thread, never from OpenSSL's struct layout, so any OpenSSL version works.
 *
 * Configured only with -D:
 *   HTTP_RINGBUF_PAGES    capture ring size in pages (power of two)      default 256
 *   HTTP_VIOLATION_PAGES  violation ring size in pages (power of two)    default 16
 *   HTTP_MAX_CGROUPS, HTTP_MAX_SOCKETS, HTTP_MAX_CONNS, HTTP_MAX_EDGES, HTTP_MAX_THREADS
 *   NR_*                  syscall numbers of this architecture (x86_64 defaults)
 *
 * Reads only helper results, the syscall argument registers of the x86_64 entry frame and the
 * uprobe's pt_regs, packet bytes through bpf_skb_load_bytes and user memory through
 * bpf_probe_read_user; never kernel struct offsets.
 */
#include <uapi/linux/ptrace.h>
#include "events.h"
#include "http.h"
#include "syscalls.h"

#ifndef HTTP_RINGBUF_PAGES
#define HTTP_RINGBUF_PAGES 256
#endif
#ifndef HTTP_VIOLATION_PAGES
#define HTTP_VIOLATION_PAGES 16
#endif
#ifndef HTTP_MAX_CGROUPS
#define HTTP_MAX_CGROUPS 1024
#endif
#ifndef HTTP_MAX_SOCKETS
#define HTTP_MAX_SOCKETS 65536
#endif
#ifndef HTTP_MAX_CONNS
#define HTTP_MAX_CONNS 65536
#endif
#ifndef HTTP_MAX_EDGES
#define HTTP_MAX_EDGES 65536
#endif
#ifndef HTTP_MAX_THREADS
#define HTTP_MAX_THREADS 16384
#endif

#define HTTP_IOV_MAX 4        /* iovecs of a writev/sendmsg captured */
#define HTTP_TLS_HELLO_MAX 512 /* bytes of a TLS ClientHello sent up, for its server name */
#define HTTP_CRLF_SKIP 8      /* empty lines a request may start with (RFC 9112 2.2) */
#define HTTP_ANSWER_SCAN 32   /* bytes of one read followed for an answer's status and 1xx head */
#define TAIL_SCAN 0
#define TAIL_JUDGE 1
#define TAIL_PATH 2
#define TAIL_VIOLATE 3
#define ENV_SIGKILL 9
#define ENV_IPPROTO_TCP 6
#define ENV_ETH_P_IP 0x0800
#define ENV_ETH_P_IPV6 0x86DD
#define CAP_MASK (HTTP_CAPTURE_MAX - 1)

/* "\nhost:", "\ncontent" "-length:", "chunked" in the rolling windows of the head scan; letters
 * are matched case-insensitively by OR-ing 0x20 into their bytes. */
#define PAT_HOST 0x0a686f73743aULL
#define CASE_HOST 0x002020202000ULL
#define MASK_48 0xffffffffffffULL
#define PAT_CL_HI 0x0a636f6e74656e74ULL
#define CASE_CL_HI 0x0020202020202020ULL
#define PAT_CL_LO 0x2d6c656e6774683aULL
#define CASE_CL_LO 0x0020202020202000ULL
#define PAT_CHUNKED 0x6368756e6b6564ULL
#define CASE_CHUNKED 0x20202020202020ULL
#define MASK_56 0xffffffffffffffULL
#define PAT_EOH 0x0d0a0d0aULL
/* dashes of a UUID: 8-4-4-4-12 */
#define UUID_DASHES ((1ULL << 8) | (1ULL << 13) | (1ULL << 18) | (1ULL << 23))

/* What the capture step hands to the scan and judge steps, per CPU. */
struct http_work {
	__u64 cgroup_id;
	__u64 cookie;
	struct http_conn_key ck;
	__u32 n;          /* bytes in ev.data */
	__u32 total;      /* bytes the call carried */
	__u32 mode;
	__u32 root;
	__u32 tls;
	__u32 start;      /* offset of the request line (after empty lines) */
	__u32 method_len;
	/* set by the scan step, offsets from start */
	__u32 host_pos;
	__u32 host_count;
	__u32 head_end;   /* after the empty line that ends the head; 0: not found */
	__u32 cl_pos;
	__u32 cl_count;
	__u32 chunked;
	__u32 reason;     /* for the violate step */
	/* the path step's state between its calls */
	__u32 nseg;
	__u32 seg_begin;
	__u32 len, digit, hex, alpha, dash, under, other;
	__u32 hlen;       /* host bytes in the root key */
	__u32 state;      /* where the walk of the rule graph is */
	__u32 pos;        /* where the path step goes on */
	__u32 path_begin;
	__u32 at;         /* where the path step's scan stopped */
	__u32 stop;       /* the class of the character it stopped at */
	__u64 clen;       /* the Content-Length value */
	__u32 cdigits;
	__u64 dashes;
};

struct http_scratch {
	__u64 records; /* capture records written since the last wakeup (capture_wake) */
	struct http_capture_event ev;
	char tail[2 * HTTP_CAPTURE_MAX]; /* slack after data: a masked offset plus a bounded size stays inside */
	struct http_edge_key key;
	struct http_work w;
	struct http_violation_event v;
};

/* ---- maps ------------------------------------------------------------------------------------ */

BPF_HASH(cgroups, __u64, struct http_cgroup, HTTP_MAX_CGROUPS);
BPF_TABLE("lru_hash", struct http_sock_key, struct http_sock, sockets, HTTP_MAX_SOCKETS);
BPF_TABLE("lru_hash", struct http_conn_key, struct http_conn, conns, HTTP_MAX_CONNS);
BPF_TABLE("lru_hash", __u32, struct http_ssl_call, ssl_calls, HTTP_MAX_THREADS);
BPF_TABLE("lru_hash", __u32, __u32, connect_fds, HTTP_MAX_THREADS);
BPF_TABLE("lru_hash", __u64, __u8, blocked, HTTP_MAX_SOCKETS);
BPF_HASH(edges, struct http_edge_key, __u32, HTTP_MAX_EDGES);
BPF_ARRAY(ctab, struct http_ctab, 1);
/* 0: programs in process context (syscalls, uprobes), 1: the skb programs, which a softirq may
 * run in the middle of one of them on the same CPU. */
BPF_PERCPU_ARRAY(scratch, struct http_scratch, 2);
BPF_PERCPU_ARRAY(loss, __u64, HTTP_LOSS_SLOTS);
BPF_PROG_ARRAY(tails_raw, 4);
BPF_PROG_ARRAY(tails_kprobe, 4);
BPF_RINGBUF_OUTPUT(captures, HTTP_RINGBUF_PAGES);
BPF_RINGBUF_OUTPUT(violations, HTTP_VIOLATION_PAGES);

/* ---- helpers --------------------------------------------------------------------------------- */

static __always_inline void count_loss(__u32 index)
{
	__u64 *n = loss.lookup(&index);
	if (n)
		(*n)++;
}

static __always_inline __u64 syscall_arg(void *regs, int off)
{
	__u64 v = 0;
	bpf_probe_read_kernel(&v, sizeof(v), (char *)regs + off);
	return v;
}

/* `*v &= mask` where the verifier sees it: the compiler may otherwise hand a helper a register
 * whose bounds it proved on a narrowed copy. */
static __always_inline void bounded(__u64 *v, __u64 mask)
{
	__u64 x = *v;
	asm volatile("%[x] &= %[m]" : [x] "+r"(x) : [m] "i"(mask));
	*v = x;
}

/* Loop-carried values live in map memory, read and written through volatile accesses: the
 * compiler would otherwise keep them in registers (or forward a store to a later load), and a
 * register that depends on where a loop stopped gives the verifier one state per place. */
#define VLOAD(x) (*(volatile __typeof__(x) *)&(x))
#define VSTORE(x, val) (*(volatile __typeof__(x) *)&(x) = (val))

/* Bytes from `from` to `n`, 0 when none. */
static __always_inline __u32 limit(__u32 n, __u32 from)
{
	return n > from ? n - from : 0;
}

static __always_inline struct http_scratch *get_scratch(__u32 index)
{
	return scratch.lookup(&index);
}

static __always_inline __u8 byte_at(struct http_scratch *s, __u32 off)
{
	return s->ev.data[off & CAP_MASK];
}

static __always_inline int is_tchar(__u8 c)
{
	if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
		return 1;
	switch (c) {
	case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+':
	case '-': case '.': case '^': case '_': case '`': case '|': case '~':
		return 1;
	}
	return 0;
}

/* Capture records wake the consumer only every HTTP_WAKE_EVERY-th record of a CPU: a wakeup
 * costs the writing process ~20 µs on this VM (irq_work's self-interrupt, then waking the
 * consumer on the other CPU), more than the rest of an exchange's capture (BENCHMARKS.md,
 * section 8). The consumer drains every ring at each poll and polls at least every 100 ms
 * (sensor.pump), sooner when another ring (the sensor's, the violations') wakes it; between two
 * wakeups the CPUs write at most an eighth of the ring each. Violations wake it at once, and
 * so do connection records (one per connection): the consumer then looks at the process's TLS
 * stack while it still runs. */
#define HTTP_RECORD_MAX (HTTP_CAPTURE_HEAD_SIZE + HTTP_CAPTURE_MAX)
#define HTTP_WAKE_EVERY (HTTP_RINGBUF_PAGES * 4096 / 8 / HTTP_RECORD_MAX > 1 ? \
			 HTTP_RINGBUF_PAGES * 4096 / 8 / HTTP_RECORD_MAX : 1)
static __always_inline __u64 capture_wake(struct http_scratch *s)
{
	if (++s->records < HTTP_WAKE_EVERY)
		return BPF_RB_NO_WAKEUP;
	s->records = 0;
	return BPF_RB_FORCE_WAKEUP;
}

static __always_inline void emit_capture(struct http_scratch *s, __u64 cg, __u64 conn, __u64 cookie,
					 __u32 len, __u32 total, __u16 flags, __u8 source)
{
	if (len > HTTP_CAPTURE_MAX)
		len = HTTP_CAPTURE_MAX;
	struct http_capture_event *e = &s->ev;
	e->hdr.type = EV_HTTP_CAPTURE;
	e->hdr.version = HTTP_CAPTURE_EVENT_VERSION;
	e->hdr.size = HTTP_CAPTURE_HEAD_SIZE + len;
	e->hdr.ktime = bpf_ktime_get_ns();
	e->cgroup_id = cg;
	e->conn = conn;
	e->cookie = cookie;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	e->pid = pid_tgid >> 32;
	e->tid = pid_tgid;
	e->total = total;
	e->len = len;
	e->flags = flags | (total > len ? HTTP_F_TRUNCATED : 0);
	e->source = source;
	__builtin_memset(e->pad, 0, sizeof(e->pad));
	if (captures.ringbuf_output(e, HTTP_CAPTURE_HEAD_SIZE + len, capture_wake(s)) != 0)
		count_loss(HTTP_LOSS_RING_CAPTURE);
}

static __always_inline void emit_conn(__u64 cg, __u64 conn, struct http_sock *sock, __u32 fd, __u16 flags)
{
	struct http_conn_event *e = captures.ringbuf_reserve(sizeof(struct http_conn_event));
	if (!e) {
		count_loss(HTTP_LOSS_RING_CONN);
		return;
	}
	e->hdr.type = EV_HTTP_CONN;
	e->hdr.version = HTTP_CONN_EVENT_VERSION;
	e->hdr.size = sizeof(*e);
	e->hdr.ktime = bpf_ktime_get_ns();
	e->cgroup_id = cg;
	e->conn = conn;
	e->cookie = sock->cookie;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->fd = fd;
	e->family = sock->family;
	e->port = sock->port;
	e->flags = flags;
	e->pad = 0;
	__builtin_memcpy(e->addr, sock->addr, 16);
	captures.ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
}

/* A request refused or reported: the violation record, then in enforce mode the kill. */
static __always_inline void violate(struct http_scratch *s, __u32 reason)
{
	struct http_work *w = &s->w;
	struct http_violation_event *v = &s->v;
	v->hdr.type = EV_HTTP_VIOLATION;
	v->hdr.version = HTTP_VIOLATION_EVENT_VERSION;
	v->hdr.size = sizeof(*v);
	v->hdr.ktime = bpf_ktime_get_ns();
	v->cgroup_id = w->cgroup_id;
	v->conn = w->ck.id;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	v->pid = pid_tgid >> 32;
	v->tid = pid_tgid;
	v->action = w->mode == HTTP_MODE_ENFORCE ? HTTP_ACTION_KILLED : HTTP_ACTION_ALERTED;
	v->reason = reason;
	v->flags = w->tls ? HTTP_F_TLS : 0;
	v->pad = 0;
	bpf_get_current_comm(v->comm, sizeof(v->comm));
	/* The request line up to the end of the path (never the query), then the Host value. The
	 * loops keep their lengths in map memory: a length in a register would give the verifier one
	 * state per place the first loop can stop. */
	__u32 start = w->start, i;
	/* Loops stop on a limit computed before them and dead after them: a compare of a register
	 * that stays live would be refined differently at each place the loop can stop, and give
	 * the verifier one state per place. */
	__u32 lim = limit(w->n, start);
	VSTORE(v->len, 0);
#pragma clang loop unroll(disable)
	for (i = 0; i < HTTP_VIOLATION_TEXT - HTTP_HOST_MAX - 2; i++) {
		if (i >= lim)
			break;
		__u8 c = byte_at(s, start + i);
		if (c == '?' || c == '#' || c == '\r' || c == '\n' || c == 0)
			break;
		if (c == ' ' && i > w->method_len)
			break;
		v->text[i & (HTTP_VIOLATION_TEXT - 1)] = c;
		VSTORE(v->len, i + 1);
	}
	if (w->host_count) {
		__u32 at = VLOAD(v->len);
		v->text[at & (HTTP_VIOLATION_TEXT - 1)] = '\n';
		VSTORE(v->len, at + 1);
		__u32 hp = start + w->host_pos;
		__u32 hlim = limit(w->n, hp);
#pragma clang loop unroll(disable)
		for (i = 0; i < HTTP_HOST_MAX; i++) {
			if (i >= hlim)
				break;
			__u8 c = byte_at(s, hp + i);
			if (c == '\r' || c == '\n')
				break;
			at = VLOAD(v->len);
			v->text[at & (HTTP_VIOLATION_TEXT - 1)] = c;
			VSTORE(v->len, at + 1);
		}
	}
	if (VLOAD(v->len) > HTTP_VIOLATION_TEXT)
		v->len = HTTP_VIOLATION_TEXT;
	if (violations.ringbuf_output(v, sizeof(*v), 0) != 0)
		count_loss(HTTP_LOSS_RING_VIOLATION);
	if (w->mode == HTTP_MODE_ENFORCE) {
		/* The request must not leave: the process dies before it returns to user space (an
		 * SSL_* uprobe: before the library encrypts anything); the socket's packets are dropped
		 * by http_egress, since a syscall that has entered still writes what it was given. */
		bpf_send_signal(ENV_SIGKILL);
		if (w->cookie) {
			__u8 one = 1;
			blocked.update(&w->cookie, &one);
		}
	}
}

/* ---- the capture step ------------------------------------------------------------------------- */

enum { SEND_SKIP = 0, SEND_JUDGE = 1, SEND_VIOLATE = 2 };

/* Refuse from the violate step (one copy of violate() per program type, not one per caller). */
static __always_inline int refuse_later(struct http_scratch *s, struct http_cgroup *cgc, __u32 reason)
{
	if (cgc->mode == HTTP_MODE_OBSERVE)
		return SEND_SKIP;
	s->w.reason = reason;
	return SEND_VIOLATE;
}

/* Where a request line may begin: after at most HTTP_CRLF_SKIP empty-line bytes (n when the
 * call carries nothing else). */
static __always_inline __u32 skip_crlf(struct http_scratch *s, __u32 n)
{
	__u32 start = 0;
#pragma unroll
	for (int i = 0; i < HTTP_CRLF_SKIP; i++) {
		__u8 c = byte_at(s, start);
		if (start < n && (c == '\r' || c == '\n'))
			start++;
	}
	return start;
}

/* Does a request target begin at `p`: origin-form "/", "*", or absolute-form "http:" / "https:"?
 * 1 yes, 0 no (another protocol's command: "get key" of memcached, "EHLO host" of SMTP), -1 the
 * call ends first. An authority-form target (CONNECT host:port) counts as a target too. */
static __always_inline int target_start(struct http_scratch *s, __u32 p, __u32 n)
{
	if (p >= n)
		return -1;
	__u8 c = byte_at(s, p);
	if (c == '/' || c == '*')
		return 1;
	if ((c | 0x20) != 'h')
		return p >= 8 && byte_at(s, p - 8) == 'C' && byte_at(s, p - 7) == 'O' && byte_at(s, p - 6) == 'N' &&
		       byte_at(s, p - 2) == 'T' ? 1 : 0;
	if (p + 5 > n)
		return -1;
	return (byte_at(s, p + 1) | 0x20) == 't' && (byte_at(s, p + 2) | 0x20) == 't' &&
	       (byte_at(s, p + 3) | 0x20) == 'p' && (byte_at(s, p + 4) == ':' || (byte_at(s, p + 4) | 0x20) == 's');
}

/* 1: "TOKEN SP target" (a request line begins), 0: not a request, -1: the call ends first (a
 * request line cut short: legitimate clients send a head in one call). Sets method_len. */
static __always_inline int request_start(struct http_scratch *s, __u32 start, __u32 n, __u32 *mlen)
{
	int res = -2;
	__u32 ml = HTTP_METHOD_MAX + 1;
#pragma unroll
	for (int i = 0; i <= HTTP_METHOD_MAX; i++) {
		if (res == -2) {
			__u8 c = byte_at(s, start + i);
			if (start + i >= n) {
				res = i ? -1 : 0;
			} else if (c == ' ') {
				ml = i;
				res = i ? 1 : 0;
			} else if (!is_tchar(c)) {
				res = 0;
			}
		}
	}
	*mlen = ml;
	if (res == -2)
		return 1; /* a token longer than any method compared: judged, refused as too long */
	if (res != 1)
		return res;
	return target_start(s, start + ml + 1, n);
}

static __always_inline int is_h2_preface(struct http_scratch *s, __u32 n)
{
	/* "PRI * HTTP/2.0\r\n" */
	if (n < 16)
		return 0;
	return byte_at(s, 0) == 'P' && byte_at(s, 1) == 'R' && byte_at(s, 2) == 'I' && byte_at(s, 3) == ' ' &&
	       byte_at(s, 4) == '*' && byte_at(s, 5) == ' ' && byte_at(s, 9) == '/' && byte_at(s, 10) == '2';
}

/* Bytes of a call are in s->ev.data[0..n). Decide what they are for the connection, capture what
 * is to be captured, and say whether a request head is to be judged. */
static __always_inline int on_send(struct http_scratch *s, struct http_cgroup *cgc, __u64 cg,
				   struct http_conn_key *ck, __u64 cookie, __u32 n, __u32 total, __u8 source)
{
	__u16 tflag = ck->tls ? HTTP_F_TLS : 0;
	struct http_conn fresh = {};
	fresh.cookie = cookie;
	struct http_conn *c = conns.lookup(ck);
	if (!c) {
		conns.update(ck, &fresh);
		c = conns.lookup(ck);
		if (!c)
			return SEND_SKIP;
	}
	if (c->state == HTTP_CONN_H2 || c->state == HTTP_CONN_OTHER)
		return SEND_SKIP;
	struct http_work *w = &s->w;
	w->cgroup_id = cg;
	w->cookie = cookie ? cookie : c->cookie;
	w->ck = *ck;
	w->n = n;
	w->total = total;
	w->mode = cgc->mode;
	w->root = cgc->root;
	w->tls = ck->tls;
	w->start = 0;
	w->method_len = 0;
	w->host_pos = 0;
	w->host_count = 0;
	w->head_end = 0;
	w->cl_pos = 0;
	w->cl_count = 0;
	w->chunked = 0;

	if (c->state == HTTP_CONN_REQUEST) {
		if (c->body_left == HTTP_BODY_UNKNOWN || total <= c->body_left) {
			if (c->body_left != HTTP_BODY_UNKNOWN)
				c->body_left -= total;
			if (c->budget) {
				__u32 len = n < c->budget ? n : c->budget;
				c->budget -= len;
				emit_capture(s, cg, ck->id, w->cookie, len, total, tflag | HTTP_F_BODY, source);
			}
			return SEND_SKIP;
		}
		if (c->body_left != 0) {
			/* more than the declared body: a second request hidden behind the first */
			c->state = HTTP_CONN_IDLE;
			emit_capture(s, cg, ck->id, w->cookie, n, total, tflag | HTTP_F_HEAD, source);
			return refuse_later(s, cgc, HTTP_REASON_UNPARSED);
		}
		/* the declared body is complete: what follows is a new (pipelined) request */
	}
	__u32 start = skip_crlf(s, n);
	if (start >= n)
		return SEND_SKIP; /* empty lines only */
	w->start = start;
	__u32 mlen = 0;
	int rs = request_start(s, start, n, &mlen);
	w->method_len = mlen;
	int first = !(c->flags & HTTP_CONN_HTTP);
	if (rs == 1 && first && is_h2_preface(s, n)) {
		c->state = HTTP_CONN_H2;
		emit_capture(s, cg, ck->id, w->cookie, 0, total, tflag | HTTP_F_H2, source);
		return refuse_later(s, cgc, HTTP_REASON_UNPARSED);
	}
	if (rs == 1) {
		c->flags = (c->flags | HTTP_CONN_HTTP) & ~HTTP_CONN_INTERIM;
		c->resp_pos = 0;
		c->state = HTTP_CONN_REQUEST;
		c->budget = n > HTTP_CAPTURE_MAX ? 0 : HTTP_CAPTURE_MAX - n;
		c->body_left = HTTP_BODY_UNKNOWN; /* until the judge step has read the head */
		emit_capture(s, cg, ck->id, w->cookie, n, total, tflag | HTTP_F_HEAD, source);
		return SEND_JUDGE;
	}
	if (first && rs == 0) {
		/* Not HTTP. A TLS record here was written by a TLS stack no probe is on. */
		c->state = HTTP_CONN_OTHER;
		if (!ck->tls && byte_at(s, 0) == 0x16 && byte_at(s, 1) == 0x03)
			emit_capture(s, cg, ck->id, w->cookie, n < HTTP_TLS_HELLO_MAX ? n : HTTP_TLS_HELLO_MAX,
				     total, HTTP_F_TLS_RECORD, source);
		else
			emit_capture(s, cg, ck->id, w->cookie, 0, total, tflag | HTTP_F_UNPARSED, source);
		return SEND_SKIP;
	}
	/* A request line cut short, or bytes that are not a request on a connection that carried
	 * HTTP: nothing the probe can judge. */
	emit_capture(s, cg, ck->id, w->cookie, 0, total, tflag | HTTP_F_UNPARSED, source);
	return refuse_later(s, cgc, HTTP_REASON_UNPARSED);
}

/* Bytes of an answer on a connection that awaits one, read in whatever pieces the process
 * reads them (botocore reads an expected 100 Continue one byte at a time). The status code's
 * first digit decides: 1xx is interim (the request and its body go on; the interim head is
 * followed to its empty line), anything else ends the request, unless its declared body is still
 * being sent (a server may answer early): the body's length keeps its bytes apart from the next
 * request. State in map memory (VLOAD/VSTORE), so the loop's exits stay one verifier state. */
static __always_inline void on_response(struct http_scratch *s, struct http_conn *c, __u64 cg, __u64 conn,
					__u64 cookie, __u32 n, __u32 total, __u16 tflag, __u8 source)
{
	if (VLOAD(c->resp_pos) == 0 && n >= 12 && byte_at(s, 0) == 'H' && byte_at(s, 1) == 'T' &&
	    byte_at(s, 2) == 'T' && byte_at(s, 3) == 'P' && byte_at(s, 4) == '/')
		emit_capture(s, cg, conn, cookie, n, total, tflag | HTTP_F_RESPONSE, source);
	__u32 i;
#pragma clang loop unroll(disable)
	for (i = 0; i < HTTP_ANSWER_SCAN; i++) {
		if (i >= n)
			break;
		__u8 b = byte_at(s, i);
		if (VLOAD(c->flags) & HTTP_CONN_INTERIM) {
			__u32 tail = (VLOAD(c->resp_tail) << 8) | b;
			VSTORE(c->resp_tail, tail);
			if (tail == PAT_EOH) {
				VSTORE(c->flags, VLOAD(c->flags) & ~HTTP_CONN_INTERIM);
				VSTORE(c->resp_pos, 0);
			}
			continue;
		}
		__u32 pos = VLOAD(c->resp_pos);
		if (pos > 9)
			break;
		VSTORE(c->resp_pos, pos + 1);
		if (pos < 9)
			continue;
		if (b == '1') {
			VSTORE(c->flags, VLOAD(c->flags) | HTTP_CONN_INTERIM);
			VSTORE(c->resp_tail, 0);
			continue;
		}
		__u32 left = VLOAD(c->body_left);
		if (left == 0 || left == HTTP_BODY_UNKNOWN)
			VSTORE(c->state, HTTP_CONN_IDLE);
		break;
	}
}

/* ---- the scan step: Host, Content-Length, chunked, end of head --------------------------------- */

static __always_inline int scan(void *ctx)
{
	struct http_scratch *s = get_scratch(0);
	if (!s)
		return 0;
	struct http_work *w = &s->w;
	__u32 start = w->start;
	__u32 lim = w->n > start ? w->n - start : 0;
	__u64 win = 0, win2 = 0;
	__u32 i;
#pragma clang loop unroll(disable)
	for (i = 0; i < HTTP_HOST_SCAN; i++) {
		if (i >= lim)
			break;
		__u8 c = byte_at(s, start + i);
		win2 = (win2 << 8) | (win >> 56);
		win = (win << 8) | c;
		if (((win | CASE_HOST) & MASK_48) == PAT_HOST) {
			if (!w->host_count)
				w->host_pos = i + 1;
			w->host_count++;
		}
		if ((win | CASE_CL_LO) == PAT_CL_LO && (win2 | CASE_CL_HI) == PAT_CL_HI) {
			w->cl_pos = i + 1;
			w->cl_count++;
		}
		if (((win | CASE_CHUNKED) & MASK_56) == PAT_CHUNKED)
			w->chunked = 1;
		if ((win & 0xffffffff) == PAT_EOH) {
			w->head_end = i + 1;
			break;
		}
	}
	return 1;
}

/* ---- the judge step: the path against the rule graph ------------------------------------------- */

static __always_inline void reset_segment(struct http_work *w)
{
	VSTORE(w->len, 0);
	VSTORE(w->digit, 0);
	VSTORE(w->hex, 0);
	VSTORE(w->alpha, 0);
	VSTORE(w->dash, 0);
	VSTORE(w->under, 0);
	VSTORE(w->other, 0);
	VSTORE(w->dashes, 0);
}

/* As urlpattern.identifier_class: a number, a UUID, a hexadecimal hash of 7 to 128 characters
 * with a digit and a letter, or an opaque token of at least 20 letters, digits, - and _ mixing
 * letters and digits. */
static __always_inline __u8 identifier_like(struct http_work *w)
{
	__u32 len = VLOAD(w->len), digit = VLOAD(w->digit), hex = VLOAD(w->hex), alpha = VLOAD(w->alpha);
	__u32 dash = VLOAD(w->dash), other = VLOAD(w->other);
	__u64 dashes = VLOAD(w->dashes);
	__u8 id = 0;
	if (len >= 1 && digit == len)
		id = 1;
	if (len == 36 && dash == 4 && dashes == UUID_DASHES && digit + hex + 4 == 36)
		id = 1;
	if (len >= 7 && len <= 128 && digit + hex == len && digit && hex)
		id = 1;
	if (len >= 20 && !other && digit && (hex + alpha))
		id = 1;
	return id;
}

static __always_inline int edge(struct http_scratch *s, __u32 state, __u32 len, __u32 *next)
{
	s->key.state = state;
	s->key.len = len;
	__u32 *v = edges.lookup(&s->key);
	if (!v)
		return 0;
	*next = *v;
	return 1;
}

static __always_inline void clear_key(struct http_scratch *s, int words)
{
	__u64 *t = (__u64 *)s->key.text;
#pragma unroll
	for (int i = 0; i < HTTP_EDGE_TEXT / 8; i++)
		if (i < words)
			t[i] = 0;
}

/* One segment from `state`: its literal edge, else {id} for an identifier, else *. 0: none. */
static __always_inline int step(struct http_scratch *s, __u32 state, __u32 seg_start, __u32 len, __u8 id,
				__u32 *next)
{
	clear_key(s, HTTP_SEGMENT_MAX / 8);
	if (len <= HTTP_SEGMENT_MAX) {
		__u64 sz = len;
		bounded(&sz, 2 * HTTP_SEGMENT_MAX - 1);
		if (sz > HTTP_SEGMENT_MAX)
			sz = HTTP_SEGMENT_MAX;
		bpf_probe_read_kernel(s->key.text, sz, s->ev.data + (seg_start & CAP_MASK));
		if (edge(s, state, len, next))
			return 1;
		clear_key(s, HTTP_SEGMENT_MAX / 8);
	}
	if (id && edge(s, state, HTTP_EDGE_ID, next))
		return 1;
	return edge(s, state, HTTP_EDGE_ANY, next);
}

static __always_inline void finish_conn(struct http_scratch *s, __u32 body_left)
{
	struct http_work *w = &s->w;
	struct http_conn *c = conns.lookup(&w->ck);
	if (c)
		c->body_left = body_left;
}

static __always_inline int judge(void *ctx)
{
	struct http_scratch *s = get_scratch(0);
	if (!s)
		return 0;
	struct http_work *w = &s->w;
	__u32 zero = 0;
	struct http_ctab *t = ctab.lookup(&zero);
	if (!t)
		return 0;
	__u32 start = w->start, n = w->n, i;

	/* Where the body ends: Content-Length, or not tracked (chunked), or no body. */
	__u32 body_left = HTTP_BODY_UNKNOWN, reason = 0xff;
	if (w->head_end) {
		__u32 head = start + w->head_end;
		__u32 in_call = w->total > head ? w->total - head : 0;
		if (w->cl_count == 1) {
			__u32 p = start + w->cl_pos;
			__u32 lim = limit(n, p);
			VSTORE(w->clen, 0);
			VSTORE(w->cdigits, 0);
#pragma clang loop unroll(disable)
			for (i = 0; i < 24; i++) {
				if (i >= lim)
					break;
				__u8 c = byte_at(s, p + i);
				__u32 d = VLOAD(w->cdigits);
				if ((c == ' ' || c == '\t') && !d)
					continue;
				__u64 v = VLOAD(w->clen);
				if (c < '0' || c > '9' || v > 0xfffffffeULL)
					break;
				VSTORE(w->clen, v * 10 + (c - '0'));
				VSTORE(w->cdigits, d + 1);
			}
			__u64 v = VLOAD(w->clen);
			if (!VLOAD(w->cdigits) || v > 0xfffffffeULL)
				reason = HTTP_REASON_UNPARSED;
			else if (in_call > v)
				reason = HTTP_REASON_UNPARSED; /* another request behind the body */
			else
				body_left = v - in_call;
		} else if (w->cl_count > 1) {
			reason = HTTP_REASON_UNPARSED;
		} else if (!w->chunked) {
			if (in_call)
				reason = HTTP_REASON_UNPARSED; /* bytes after a head that declares no body */
			else
				body_left = 0;
		}
	}
	finish_conn(s, body_left);
	if (w->mode == HTTP_MODE_OBSERVE)
		return 0;
	if (reason != 0xff)
		goto refuse;
	if (w->host_count == 0) {
		reason = HTTP_REASON_NO_HOST;
		goto refuse;
	}
	if (w->host_count > 1) {
		reason = HTTP_REASON_TWO_HOSTS;
		goto refuse;
	}
	if (!w->head_end || w->method_len > HTTP_METHOD_MAX) {
		reason = HTTP_REASON_TOO_LONG;
		goto refuse;
	}

	/* the root edge: "METHOD host" (host lower-cased, the scheme's default port dropped) */
	clear_key(s, HTTP_EDGE_TEXT / 8);
	__u32 mlen = w->method_len;
	if (mlen > HTTP_METHOD_MAX)
		mlen = HTTP_METHOD_MAX;
	bpf_probe_read_kernel(s->key.text, mlen, s->ev.data + (start & CAP_MASK));
	s->key.text[mlen] = ' ';
	__u32 hp = start + w->host_pos;
	__u32 hlim = limit(n, hp);
	VSTORE(w->hlen, 0);
#pragma clang loop unroll(disable)
	for (i = 0; i < HTTP_HOST_MAX + 8; i++) {
		if (i >= hlim)
			break;
		__u8 c = byte_at(s, hp + i);
		__u32 at = VLOAD(w->hlen);
		if (c == ' ' || c == '\t') {
			if (at)
				break;
			continue;
		}
		if (c == '\r' || c == '\n')
			break;
		if (at >= HTTP_HOST_MAX) {
			VSTORE(w->hlen, HTTP_HOST_MAX + 1);
			break;
		}
		if (c >= 'A' && c <= 'Z')
			c |= 0x20;
		s->key.text[(mlen + 1 + at) & 0xff] = c; /* < HTTP_METHOD_MAX + 1 + HTTP_HOST_MAX */
		VSTORE(w->hlen, at + 1);
	}
	__u32 hlen = VLOAD(w->hlen);
	if (hlen > HTTP_HOST_MAX) {
		reason = HTTP_REASON_TOO_LONG;
		goto refuse;
	}
	/* drop ":443" (TLS) or ":80" (plaintext) */
	__u32 hend = mlen + 1 + hlen;
	if (w->tls && hlen > 4 && s->key.text[(hend - 4) & 0xff] == ':' && s->key.text[(hend - 3) & 0xff] == '4' &&
	    s->key.text[(hend - 2) & 0xff] == '4' && s->key.text[(hend - 1) & 0xff] == '3') {
		hlen -= 4;
		s->key.text[(hend - 4) & 0xff] = 0;
		s->key.text[(hend - 3) & 0xff] = 0;
		s->key.text[(hend - 2) & 0xff] = 0;
		s->key.text[(hend - 1) & 0xff] = 0;
	} else if (!w->tls && hlen > 3 && s->key.text[(hend - 3) & 0xff] == ':' &&
		   s->key.text[(hend - 2) & 0xff] == '8' && s->key.text[(hend - 1) & 0xff] == '0') {
		hlen -= 3;
		s->key.text[(hend - 3) & 0xff] = 0;
		s->key.text[(hend - 2) & 0xff] = 0;
		s->key.text[(hend - 1) & 0xff] = 0;
	}
	__u32 state = 0;
	if (!w->root || !edge(s, w->root, mlen + 1 + hlen, &state)) {
		reason = HTTP_REASON_NO_RULE;
		goto refuse;
	}
	clear_key(s, HTTP_EDGE_TEXT / 8); /* segment keys use the first HTTP_SEGMENT_MAX bytes only */

	/* the path: origin-form only */
	__u32 p = start + mlen + 1;
	if (byte_at(s, p) != '/') {
		reason = HTTP_REASON_UNPARSED; /* absolute-form, authority-form or * */
		goto refuse;
	}
	VSTORE(w->state, state);
	VSTORE(w->nseg, 0);
	VSTORE(w->path_begin, p);
	VSTORE(w->seg_begin, p + 1);
	VSTORE(w->pos, p + 1);
	reset_segment(w);
	return 1; /* the path step goes on */
refuse:
	violate(s, reason);
	return 0;
}

/* The path step: one segment per call (a segment longer than HTTP_PATH_CHUNK bytes takes
 * several), each walked from the state the previous one reached; the step tail-calls itself
 * for the next segment. A loop whose only data-dependent branches are its exits keeps the
 * verifier's work linear. Returns the next step to tail-call, or -1. */
#define HTTP_PATH_CHUNK 128
static __always_inline int judge_path(void)
{
	struct http_scratch *s = get_scratch(0);
	if (!s)
		return -1;
	struct http_work *w = &s->w;
	__u32 zero = 0;
	struct http_ctab *t = ctab.lookup(&zero);
	if (!t)
		return -1;
	__u32 pos = VLOAD(w->pos), n = VLOAD(w->n), i;
	__u32 lim = limit(n, pos);
	__u32 len = VLOAD(w->len), digit = VLOAD(w->digit), hex = VLOAD(w->hex), alpha = VLOAD(w->alpha);
	__u32 dash = VLOAD(w->dash), under = VLOAD(w->under), other = VLOAD(w->other);
	__u64 dashes = VLOAD(w->dashes);
	__u8 stop = 0;
#pragma clang loop unroll(disable)
	for (i = 0; i < HTTP_PATH_CHUNK; i++) {
		if (i >= lim) {
			stop = HTTP_C_END; /* the call's bytes end the path */
			break;
		}
		__u8 cls = t->c[byte_at(s, pos + i)];
		if (cls & (HTTP_C_SLASH | HTTP_C_END)) {
			stop = cls;
			break;
		}
		dashes |= (__u64)((cls >> 3) & 1) << (len & 63);
		digit += cls & 1;
		hex += (cls >> 1) & 1;
		alpha += (cls >> 2) & 1;
		dash += (cls >> 3) & 1;
		under += (cls >> 4) & 1;
		other += (cls >> 5) & 1;
		len++;
	}
	/* Everything the loop produced goes to memory and is read back: the values then no longer
	 * depend, for the verifier, on where the loop stopped, and the states after it merge. */
	VSTORE(w->at, pos + i);
	VSTORE(w->stop, stop);
	VSTORE(w->len, len);
	VSTORE(w->digit, digit);
	VSTORE(w->hex, hex);
	VSTORE(w->alpha, alpha);
	VSTORE(w->dash, dash);
	VSTORE(w->under, under);
	VSTORE(w->other, other);
	VSTORE(w->dashes, dashes);
	__u32 at = VLOAD(w->at);
	stop = VLOAD(w->stop);
	len = VLOAD(w->len);
	if (at - VLOAD(w->path_begin) > HTTP_PATH_SCAN) {
		VSTORE(w->reason, HTTP_REASON_TOO_LONG);
		return TAIL_VIOLATE;
	}
	if (!stop) {
		VSTORE(w->pos, at); /* the same segment goes on */
		return TAIL_PATH;
	}
	__u32 b = VLOAD(w->seg_begin);
	if (len == 2 && byte_at(s, b) == '.' && byte_at(s, b + 1) == '.') {
		VSTORE(w->reason, HTTP_REASON_UNPARSED); /* ".." is not resolved here */
		return TAIL_VIOLATE;
	}
	if (len && !(len == 1 && byte_at(s, b) == '.')) {
		__u32 k = VLOAD(w->nseg);
		if (k >= HTTP_SEGMENTS_MAX) {
			VSTORE(w->reason, HTTP_REASON_TOO_LONG);
			return TAIL_VIOLATE;
		}
		if (!step(s, VLOAD(w->state), b, len, identifier_like(w), &w->state)) {
			VSTORE(w->reason, HTTP_REASON_NO_RULE);
			return TAIL_VIOLATE;
		}
		VSTORE(w->nseg, k + 1);
	}
	if (stop & HTTP_C_END) {
		__u32 accept = 0;
		clear_key(s, HTTP_SEGMENT_MAX / 8);
		if (!edge(s, VLOAD(w->state), HTTP_EDGE_END, &accept)) {
			VSTORE(w->reason, HTTP_REASON_NO_RULE);
			return TAIL_VIOLATE;
		}
		return -1; /* inside the envelope */
	}
	reset_segment(w);
	VSTORE(w->seg_begin, at + 1);
	VSTORE(w->pos, at + 1);
	return TAIL_PATH;
}

/* One copy of each step per program type (a program array holds programs of one type). */
int http_scan_raw(struct bpf_raw_tracepoint_args *ctx)
{
	if (scan(ctx))
		tails_raw.call(ctx, TAIL_JUDGE);
	return 0;
}

int http_judge_raw(struct bpf_raw_tracepoint_args *ctx)
{
	if (judge(ctx))
		tails_raw.call(ctx, TAIL_PATH);
	return 0;
}

int http_path_raw(struct bpf_raw_tracepoint_args *ctx)
{
	int next = judge_path();
	if (next >= 0)
		tails_raw.call(ctx, next);
	return 0;
}

static __always_inline int violate_step(void)
{
	struct http_scratch *s = get_scratch(0);
	if (s)
		violate(s, s->w.reason);
	return 0;
}

int http_violate_raw(struct bpf_raw_tracepoint_args *ctx)
{
	return violate_step();
}

int http_scan_kprobe(struct pt_regs *ctx)
{
	if (scan(ctx))
		tails_kprobe.call(ctx, TAIL_JUDGE);
	return 0;
}

int http_judge_kprobe(struct pt_regs *ctx)
{
	if (judge(ctx))
		tails_kprobe.call(ctx, TAIL_PATH);
	return 0;
}

int http_path_kprobe(struct pt_regs *ctx)
{
	int next = judge_path();
	if (next >= 0)
		tails_kprobe.call(ctx, next);
	return 0;
}

int http_violate_kprobe(struct pt_regs *ctx)
{
	return violate_step();
}

/* ---- socket syscalls, tail-called from the sensor's raw sys_enter ------------------------------ */

struct env_iovec {
	__u64 base;
	__u64 len;
};

/* Copy what a writev/sendmsg carries (its first HTTP_IOV_MAX parts) into data; the byte count of
 * those parts goes to *total. */
static __always_inline __u32 read_iov(struct http_scratch *s, __u64 iov, __u64 cnt, __u32 *total)
{
	__u64 off = 0, tot = 0;
	if (cnt > HTTP_IOV_MAX)
		count_loss(HTTP_LOSS_IOV);
#pragma unroll
	for (int i = 0; i < HTTP_IOV_MAX; i++) {
		if (i >= cnt)
			break;
		struct env_iovec v = {};
		if (bpf_probe_read_user(&v, sizeof(v), (void *)(iov + i * sizeof(v))) != 0) {
			count_loss(HTTP_LOSS_READ);
			break;
		}
		tot += v.len;
		if (off < HTTP_CAPTURE_MAX && v.len) {
			__u64 room = HTTP_CAPTURE_MAX - off;
			__u64 sz = v.len < room ? v.len : room;
			__u64 at = off;
			bounded(&at, CAP_MASK);
			bounded(&sz, 2 * HTTP_CAPTURE_MAX - 1);
			if (sz > HTTP_CAPTURE_MAX)
				sz = HTTP_CAPTURE_MAX;
			if (bpf_probe_read_user(s->ev.data + at, sz, (void *)v.base) != 0) {
				count_loss(HTTP_LOSS_READ);
				break;
			}
			off += sz;
		}
	}
	*total = tot > 0xffffffffULL ? 0xffffffff : tot;
	return off > HTTP_CAPTURE_MAX ? HTTP_CAPTURE_MAX : off;
}

int http_syscall(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 nr = ctx->args[1];
	void *regs = (void *)ctx->args[0];
	__u64 cg = bpf_get_current_cgroup_id();
	struct http_cgroup *cgc = cgroups.lookup(&cg);
	if (!cgc)
		return 0;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32, tid = pid_tgid;
	__u32 fd = syscall_arg(regs, REGS_OFF_DI);
	if (nr == NR_CONNECT) {
		connect_fds.update(&tid, &fd);
		return 0;
	}
	struct http_sock_key sk = {};
	sk.tgid = tgid;
	sk.fd = fd;
	if (nr == NR_CLOSE) {
		sockets.delete(&sk);
		return 0;
	}
	struct http_sock *sock = sockets.lookup(&sk);
	if (!sock)
		return 0;
	struct http_ssl_call *call = ssl_calls.lookup(&tid);
	if (call) {
		/* A syscall nested in an SSL_* call: this socket is that SSL object's. */
		if (!(sock->flags & HTTP_SOCK_TLS)) {
			sock->flags |= HTTP_SOCK_TLS | HTTP_SOCK_ANNOUNCED;
			emit_conn(cg, call->ssl, sock, fd, HTTP_F_TLS);
			struct http_conn_key ck = {};
			ck.id = call->ssl;
			ck.tgid = tgid;
			ck.tls = 1;
			struct http_conn *c = conns.lookup(&ck);
			if (c) {
				c->cookie = sock->cookie;
			} else {
				struct http_conn fresh = {};
				fresh.cookie = sock->cookie;
				conns.update(&ck, &fresh);
			}
		}
		return 0;
	}
	if (sock->flags & HTTP_SOCK_TLS)
		return 0; /* records of a hooked TLS library (alerts, close_notify) */
	struct http_scratch *s = get_scratch(0);
	if (!s)
		return 0;
	__u64 cookie = sock->cookie;
	if (!(sock->flags & HTTP_SOCK_ANNOUNCED)) {
		sock->flags |= HTTP_SOCK_ANNOUNCED;
		emit_conn(cg, cookie, sock, fd, 0);
	}
	__u32 n = 0, total = 0;
	__u8 source;
	if (nr == NR_WRITE || nr == NR_SENDTO) {
		__u64 buf = syscall_arg(regs, REGS_OFF_SI);
		__u64 len = syscall_arg(regs, REGS_OFF_DX);
		total = len > 0xffffffffULL ? 0xffffffff : len;
		n = len < HTTP_CAPTURE_MAX ? len : HTTP_CAPTURE_MAX;
		if (n && bpf_probe_read_user(s->ev.data, n, (void *)buf) != 0) {
			count_loss(HTTP_LOSS_READ);
			return 0;
		}
		source = nr == NR_WRITE ? HTTP_SRC_WRITE : HTTP_SRC_SENDTO;
	} else if (nr == NR_WRITEV) {
		n = read_iov(s, syscall_arg(regs, REGS_OFF_SI), syscall_arg(regs, REGS_OFF_DX), &total);
		source = HTTP_SRC_WRITEV;
	} else if (nr == NR_SENDMSG) {
		__u64 msg = syscall_arg(regs, REGS_OFF_SI);
		__u64 hdr[2] = {}; /* struct user_msghdr: msg_iov at 16, msg_iovlen at 24 */
		if (bpf_probe_read_user(hdr, sizeof(hdr), (void *)(msg + 16)) != 0) {
			count_loss(HTTP_LOSS_READ);
			return 0;
		}
		n = read_iov(s, hdr[0], hdr[1], &total);
		source = HTTP_SRC_SENDMSG;
	} else {
		return 0;
	}
	if (!n)
		return 0;
	struct http_conn_key ck = {};
	ck.id = cookie;
	int next = on_send(s, cgc, cg, &ck, cookie, n, total, source);
	if (next == SEND_JUDGE)
		tails_raw.call(ctx, TAIL_SCAN);
	else if (next == SEND_VIOLATE)
		tails_raw.call(ctx, TAIL_VIOLATE);
	return 0;
}

/* ---- connect: a TCP socket's (process, fd), cookie and destination ----------------------------- */

static __always_inline int on_connect(struct bpf_sock_addr *ctx, __u16 family)
{
	if (ctx->protocol != ENV_IPPROTO_TCP)
		return 1;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = pid_tgid;
	__u32 *fd = connect_fds.lookup(&tid);
	if (!fd)
		return 1;
	struct http_sock_key k = {};
	k.tgid = pid_tgid >> 32;
	k.fd = *fd;
	connect_fds.delete(&tid);
	struct http_sock v = {};
	v.cookie = bpf_get_socket_cookie(ctx);
	v.family = family;
	v.port = bpf_ntohs((__u16)ctx->user_port);
	if (family == ENV_AF_INET) {
		__u32 a = ctx->user_ip4;
		__builtin_memcpy(v.addr, &a, 4);
	} else {
		__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
		__builtin_memcpy(&v.addr[0], &a0, 4);
		__builtin_memcpy(&v.addr[4], &a1, 4);
		__builtin_memcpy(&v.addr[8], &a2, 4);
		__builtin_memcpy(&v.addr[12], &a3, 4);
	}
	sockets.update(&k, &v);
	return 1;
}

int http_connect4(struct bpf_sock_addr *ctx)
{
	return on_connect(ctx, ENV_AF_INET);
}

int http_connect6(struct bpf_sock_addr *ctx)
{
	return on_connect(ctx, ENV_AF_INET6);
}

/* ---- cgroup skb: plaintext responses in, refused sockets' packets out -------------------------- */

int http_ingress(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct http_conn_key ck = {};
	ck.id = cookie;
	struct http_conn *c = conns.lookup(&ck);
	if (!c || c->state != HTTP_CONN_REQUEST)
		return 1;
	__u32 off = 0;
	__u8 b = 0, proto = 0;
	if (skb->protocol == bpf_htons(ENV_ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, 0, &b, 1) || bpf_skb_load_bytes(skb, 9, &proto, 1))
			return 1;
		off = (b & 0xf) * 4;
	} else if (skb->protocol == bpf_htons(ENV_ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, 6, &proto, 1))
			return 1;
		off = 40;
	} else {
		return 1;
	}
	if (proto != ENV_IPPROTO_TCP || bpf_skb_load_bytes(skb, off + 12, &b, 1))
		return 1;
	off += (b >> 4) * 4;
	if (skb->len <= off)
		return 1; /* no payload */
	__u32 plen = skb->len - off;
	struct http_scratch *s = get_scratch(1);
	if (!s)
		return 1;
	__u64 n = plen > HTTP_RESPONSE_MAX ? HTTP_RESPONSE_MAX : plen;
	bounded(&n, 2 * HTTP_RESPONSE_MAX - 1);
	if (!n)
		return 1;
	if (bpf_skb_load_bytes(skb, off, s->ev.data, n))
		return 1;
	on_response(s, c, bpf_skb_cgroup_id(skb), cookie, cookie, n, plen, 0, HTTP_SRC_SKB);
	return 1;
}

int http_egress(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	return blocked.lookup(&cookie) ? 0 : 1;
}

/* ---- libssl uprobes --------------------------------------------------------------------------- */

static __always_inline struct http_cgroup *watched(__u64 *cg)
{
	*cg = bpf_get_current_cgroup_id();
	return cgroups.lookup(cg);
}

/* SSL_write(ssl, buf, int num) and SSL_write_ex(ssl, buf, size_t num, &written). */
static __always_inline int write_entry(struct pt_regs *ctx, __u64 num)
{
	__u64 cg;
	struct http_cgroup *cgc = watched(&cg);
	if (!cgc)
		return 0;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = pid_tgid;
	struct http_ssl_call call = {};
	call.ssl = PT_REGS_PARM1(ctx);
	call.kind = HTTP_SSL_WRITE;
	ssl_calls.update(&tid, &call);
	__u64 buf = PT_REGS_PARM2(ctx);
	if (num == 0)
		return 0;
	struct http_scratch *s = get_scratch(0);
	if (!s)
		return 0;
	__u32 n = num < HTTP_CAPTURE_MAX ? num : HTTP_CAPTURE_MAX;
	if (bpf_probe_read_user(s->ev.data, n, (void *)buf) != 0) {
		count_loss(HTTP_LOSS_READ);
		return 0;
	}
	struct http_conn_key ck = {};
	ck.id = call.ssl;
	ck.tgid = pid_tgid >> 32;
	ck.tls = 1;
	__u32 total = num > 0xffffffffULL ? 0xffffffff : num;
	int next = on_send(s, cgc, cg, &ck, 0, n, total, HTTP_SRC_SSL_WRITE);
	if (next == SEND_JUDGE)
		tails_kprobe.call(ctx, TAIL_SCAN);
	else if (next == SEND_VIOLATE)
		tails_kprobe.call(ctx, TAIL_VIOLATE);
	return 0;
}

int http_ssl_write(struct pt_regs *ctx)
{
	int num = PT_REGS_PARM3(ctx);
	return write_entry(ctx, num > 0 ? num : 0);
}

int http_ssl_write_ex(struct pt_regs *ctx)
{
	return write_entry(ctx, PT_REGS_PARM3(ctx));
}

/* A read is followed to its return only when it may carry the head of an answer: on a
 * connection that awaits one, or whose socket is not known yet (a write nested in this call, of
 * a handshake, names it). The bytes of a download's body pass unread: one lookup per call. */
static __always_inline int read_entry(struct pt_regs *ctx, __u64 out)
{
	__u64 cg;
	if (!watched(&cg))
		return 0;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = pid_tgid;
	struct http_conn_key ck = {};
	ck.id = PT_REGS_PARM1(ctx);
	ck.tgid = pid_tgid >> 32;
	ck.tls = 1;
	struct http_conn *c = conns.lookup(&ck);
	if (c && c->cookie && c->state != HTTP_CONN_REQUEST)
		return 0;
	struct http_ssl_call call = {};
	call.ssl = ck.id;
	call.buf = PT_REGS_PARM2(ctx);
	call.out = out;
	call.kind = HTTP_SSL_READ;
	ssl_calls.update(&tid, &call);
	return 0;
}

/* SSL_read(ssl, buf, num) returns the byte count; SSL_read_ex(ssl, buf, num, &readbytes) 1. */
int http_ssl_read(struct pt_regs *ctx)
{
	return read_entry(ctx, 0);
}

int http_ssl_read_ex(struct pt_regs *ctx)
{
	return read_entry(ctx, PT_REGS_PARM4(ctx));
}

int http_ssl_handshake(struct pt_regs *ctx)
{
	__u64 cg;
	if (!watched(&cg))
		return 0;
	__u32 tid = bpf_get_current_pid_tgid();
	struct http_ssl_call *cur = ssl_calls.lookup(&tid);
	if (cur) {
		cur->depth++;
		return 0;
	}
	struct http_ssl_call call = {};
	call.ssl = PT_REGS_PARM1(ctx);
	call.kind = HTTP_SSL_HANDSHAKE;
	ssl_calls.update(&tid, &call);
	return 0;
}

/* Return of SSL_write(_ex) and SSL_do_handshake. */
int http_ssl_done(struct pt_regs *ctx)
{
	__u32 tid = bpf_get_current_pid_tgid();
	struct http_ssl_call *cur = ssl_calls.lookup(&tid);
	if (!cur)
		return 0;
	if (cur->depth) {
		cur->depth--;
		return 0;
	}
	ssl_calls.delete(&tid);
	return 0;
}

/* Return of SSL_read(_ex): the first bytes of a response, when the connection awaits one. */
int http_ssl_read_done(struct pt_regs *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = pid_tgid;
	struct http_ssl_call *cur = ssl_calls.lookup(&tid);
	if (!cur)
		return 0;
	if (cur->kind != HTTP_SSL_READ)
		return 0; /* an outer call's (this read was not followed): its own return ends it */
	if (cur->depth) {
		cur->depth--;
		return 0;
	}
	__u64 ssl = cur->ssl, buf = cur->buf, out = cur->out;
	ssl_calls.delete(&tid);
	int rc = PT_REGS_RC(ctx);
	__u64 got = 0;
	if (out) {
		/* SSL_read_ex returns 1, the function it calls (where sensor/tlsstack.py may put these
		 * probes) > 0, when *out holds the byte count */
		if (rc <= 0 || bpf_probe_read_user(&got, sizeof(got), (void *)out) != 0)
			return 0;
	} else if (rc > 0) {
		got = rc;
	}
	if (!got)
		return 0;
	__u64 cg;
	if (!watched(&cg))
		return 0;
	struct http_conn_key ck = {};
	ck.id = ssl;
	ck.tgid = pid_tgid >> 32;
	ck.tls = 1;
	struct http_conn *c = conns.lookup(&ck);
	if (!c || c->state != HTTP_CONN_REQUEST)
		return 0;
	struct http_scratch *s = get_scratch(0);
	if (!s)
		return 0;
	__u32 n = got < HTTP_RESPONSE_MAX ? got : HTTP_RESPONSE_MAX;
	if (n < 1 || n > HTTP_RESPONSE_MAX)
		return 0;
	if (bpf_probe_read_user(s->ev.data, n, (void *)buf) != 0) {
		count_loss(HTTP_LOSS_READ);
		return 0;
	}
	on_response(s, c, cg, ssl, c->cookie, n, got, HTTP_F_TLS, HTTP_SRC_SSL_READ);
	return 0;
}
