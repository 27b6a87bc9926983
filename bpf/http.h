/* Envelope: the map keys and values of the request capture (bpf/http.c).
 *
 * Mirrored in sensor/mirrors.py and checked by tests/unit/test_bpf_headers.py. The ring-buffer
 * records of the capture are in events.h with every other record.
 */
#ifndef ENVELOPE_HTTP_H
#define ENVELOPE_HTTP_H

#include <linux/types.h>

/* What the probe compares of a request when it judges it against the rules. */
#define HTTP_METHOD_MAX 16   /* bytes of a method */
#define HTTP_HOST_MAX 128    /* bytes of a Host header value */
#define HTTP_SEGMENT_MAX 64  /* bytes of a literal path segment */
#define HTTP_SEGMENTS_MAX 16 /* path segments */
#define HTTP_PATH_SCAN 512   /* bytes of the request target scanned for the path */
#define HTTP_HOST_SCAN 1024  /* bytes of the request head searched for the Host header */
#define HTTP_EDGE_TEXT 160   /* "METHOD host" or one segment */
#define HTTP_RESPONSE_MAX 256 /* bytes of a response head captured (its status line first) */

#define HTTP_MODE_OBSERVE 0
#define HTTP_MODE_ALERT 1
#define HTTP_MODE_ENFORCE 2

/* Class edges of the rule graph (http_edge_key.len): one path segment of a kind, the end. */
#define HTTP_EDGE_ID 0xffffffff  /* an identifier-like segment: number, UUID, hash, opaque token */
#define HTTP_EDGE_ANY 0xfffffffe /* any one segment */
#define HTTP_EDGE_END 0xfffffffd /* the path may end here */

/* Per-CPU loss counters (`loss`): what the capture could not see or send. */
#define HTTP_LOSS_RING_CAPTURE 0  /* capture records dropped: ring buffer full */
#define HTTP_LOSS_RING_CONN 1     /* connection records dropped: ring buffer full */
#define HTTP_LOSS_RING_VIOLATION 2 /* violation records dropped: ring buffer full */
#define HTTP_LOSS_READ 3          /* user memory the probe could not read */
#define HTTP_LOSS_IOV 4           /* writev/sendmsg calls with more parts than are captured */
#define HTTP_LOSS_SLOTS 8

/* `cgroups`: cgroup id -> how its requests are captured and judged. */
#define HTTP_CGROUP_SIZE 16
struct http_cgroup {
	__u32 mode; /*  0 HTTP_MODE_* */
	__u32 root; /*  4 root state of the rule graph; 0: no rules (every request is outside) */
	__u32 gen;  /*  8 rule generation, for userspace */
	__u32 pad;  /* 12 */
};

/* `sockets`: (process, fd) of a TCP socket a watched process connected. */
#define HTTP_SOCK_KEY_SIZE 8
struct http_sock_key {
	__u32 tgid; /* 0 */
	__u32 fd;   /* 4 */
};

#define HTTP_SOCK_TLS 0x1    /* a hooked TLS library writes this socket */
#define HTTP_SOCK_ANNOUNCED 0x2 /* its EV_HTTP_CONN record was sent */
#define HTTP_SOCK_SIZE 32
struct http_sock {
	__u64 cookie;  /*  0 socket cookie */
	__u16 family;  /*  8 ENV_AF_* */
	__u16 port;    /* 10 host order */
	__u32 flags;   /* 12 HTTP_SOCK_* */
	__u8 addr[16]; /* 16 network order */
};

/* `conns`: parse state of a connection, keyed by its id (see http_capture_event.conn). */
#define HTTP_CONN_IDLE 0     /* no request yet, or the last one was answered */
#define HTTP_CONN_REQUEST 1  /* a request head was sent; no final response yet */
#define HTTP_CONN_H2 2       /* HTTP/2: not decoded */
#define HTTP_CONN_OTHER 3    /* not HTTP: not captured further */
#define HTTP_CONN_KEY_SIZE 16
struct http_conn_key {
	__u64 id;   /* 0 SSL object or socket cookie */
	__u32 tgid; /* 8 the process (an SSL object's address is its own) */
	__u32 tls;  /* 12 1 for SSL objects */
};

#define HTTP_BODY_UNKNOWN 0xffffffff /* chunked: where the body ends is not tracked */
#define HTTP_CONN_HTTP 0x1   /* the connection has carried a request */
#define HTTP_CONN_INTERIM 0x2 /* in the head of a 1xx answer: a final one follows */
#define HTTP_CONN_SIZE 32
struct http_conn {
	__u32 state;     /*  0 HTTP_CONN_* */
	__u32 budget;    /*  4 body bytes still to capture for the current request */
	__u32 body_left; /*  8 body bytes the current request still declares (Content-Length) */
	__u32 flags;     /* 12 HTTP_CONN_* flags */
	__u64 cookie;    /* 16 the socket, when known */
	__u32 resp_pos;  /* 24 bytes of the current answer seen, up to its status code */
	__u32 resp_tail; /* 28 its last four bytes, while in the head of a 1xx answer */
};

/* `ssl_calls`: thread -> the SSL_* call it is in, so a nested socket syscall names the SSL
 * object's socket and a return probe finds the buffer. */
#define HTTP_SSL_WRITE 1
#define HTTP_SSL_READ 2
#define HTTP_SSL_HANDSHAKE 3
#define HTTP_SSL_CALL_SIZE 32
struct http_ssl_call {
	__u64 ssl;   /*  0 the SSL object */
	__u64 buf;   /*  8 SSL_read*: the buffer */
	__u64 out;   /* 16 SSL_read_ex: where it stores the byte count; 0 for SSL_read */
	__u32 kind;  /* 24 HTTP_SSL_* */
	__u32 depth; /* 28 nested SSL_* calls of the same thread (SSL_write -> SSL_do_handshake) */
};

/* `ctab`: one byte per character, what the path scan needs to know of it. */
#define HTTP_C_DIGIT 0x1   /* 0-9 */
#define HTTP_C_HEX 0x2     /* a-f A-F */
#define HTTP_C_ALPHA 0x4   /* g-z G-Z */
#define HTTP_C_DASH 0x8    /* - */
#define HTTP_C_UNDER 0x10  /* _ */
#define HTTP_C_OTHER 0x20  /* any other character of a segment */
#define HTTP_C_SLASH 0x40  /* / */
#define HTTP_C_END 0x80    /* SP ? # CR LF NUL: the path ends */
#define HTTP_CTAB_SIZE 256
struct http_ctab {
	__u8 c[256]; /* 0 */
};

/* `edges`: the rule graph. From `state`, a method and host (from the root), a literal segment
 * (len bytes of text, zero-padded) or a class edge (len = HTTP_EDGE_*) leads to a state (u32). */
#define HTTP_EDGE_KEY_SIZE 168
struct http_edge_key {
	__u32 state;               /*   0 */
	__u32 len;                 /*   4 bytes in text, or HTTP_EDGE_* */
	char text[HTTP_EDGE_TEXT]; /*   8 */
};

_Static_assert(sizeof(struct http_cgroup) == HTTP_CGROUP_SIZE, "http_cgroup size");
_Static_assert(sizeof(struct http_sock_key) == HTTP_SOCK_KEY_SIZE, "http_sock_key size");
_Static_assert(sizeof(struct http_sock) == HTTP_SOCK_SIZE, "http_sock size");
_Static_assert(sizeof(struct http_conn_key) == HTTP_CONN_KEY_SIZE, "http_conn_key size");
_Static_assert(sizeof(struct http_conn) == HTTP_CONN_SIZE, "http_conn size");
_Static_assert(sizeof(struct http_ssl_call) == HTTP_SSL_CALL_SIZE, "http_ssl_call size");
_Static_assert(sizeof(struct http_ctab) == HTTP_CTAB_SIZE, "http_ctab size");
_Static_assert(sizeof(struct http_edge_key) == HTTP_EDGE_KEY_SIZE, "http_edge_key size");

#endif /* ENVELOPE_HTTP_H */
