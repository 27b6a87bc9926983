/* Envelope: every struct shared between BPF programs and userspace.
 *
 * Each ring-buffer record starts with struct event_hdr. `type` numbers are never reused: a
 * retired type keeps its number and a changed layout bumps its `version`. Fields are fixed
 * width and every hole is a named padding field, so the Python mirrors in sensor/events.py can
 * decode with the struct module and tests/unit/test_events_header.py can check the #defines
 * below against them without a compiler.
 *
 * Conventions:
 *   ktime     bpf_ktime_get_ns(), CLOCK_MONOTONIC nanoseconds
 *   pid       a thread-group id (what userspace calls a pid), global pid namespace
 *   tid       a task id, global pid namespace
 *   family    ENV_AF_INET (2) or ENV_AF_INET6 (10)
 *   protocol  IPPROTO_* of the socket (6 tcp, 17 udp)
 *   addr      network byte order; IPv4 uses addr[0..3], the rest is zero
 *   port      host byte order
 */
#ifndef ENVELOPE_EVENTS_H
#define ENVELOPE_EVENTS_H

#include <linux/types.h>

/* ---- event types (never reuse a number) ---------------------------------------------------- */
#define EV_EXEC 1
#define EV_FORK 2
#define EV_EXIT 3
#define EV_NET 4
#define EV_SYSCALL_FIRST 5
#define EV_EGRESS_VIOLATION 6
#define EV_SECCOMP_DENIAL 7
#define EV_EXEC_FIRST 8 /* the first exec of a path in a cgroup (counted in exec_counts) */
#define EV_NET_FIRST 9  /* the first connect/send to a destination in a cgroup (net_counts) */
#define EV_DNS_MESSAGE 16
#define EV_DNS_VIOLATION 17
#define EV_HTTP_CAPTURE 24
#define EV_HTTP_CONN 25
#define EV_HTTP_VIOLATION 26
/* 27-31: reserved for the request capture */
#define EV_FILE_FIRST 32
#define EV_FILE_DENIAL 33
/* 34-39: reserved for file access; 8-23: reserved for other program families */
#define EV_IO_URING_OP 40
#define EV_CGROUP_ESCAPE 41
#define EV_TYPE_MAX 42 /* one past the highest type number */

/* ---- layout versions, one per type ----------------------------------------------------------- */
#define EXEC_EVENT_VERSION 1
#define FORK_EVENT_VERSION 1
#define EXIT_EVENT_VERSION 1
#define NET_EVENT_VERSION 1
#define SYSCALL_FIRST_EVENT_VERSION 1
#define EGRESS_VIOLATION_EVENT_VERSION 2 /* 2: tid and comm */
#define SECCOMP_DENIAL_EVENT_VERSION 3   /* 2: the call's arguments; 3: tid, comm, counted, destination */
#define EXEC_FIRST_EVENT_VERSION 1
#define NET_FIRST_EVENT_VERSION 1
#define IO_URING_OP_EVENT_VERSION 1
#define CGROUP_ESCAPE_EVENT_VERSION 1
#define DNS_MESSAGE_EVENT_VERSION 1
#define DNS_VIOLATION_EVENT_VERSION 1
#define HTTP_CAPTURE_EVENT_VERSION 1
#define HTTP_CONN_EVENT_VERSION 1
#define HTTP_VIOLATION_EVENT_VERSION 1
#define FILE_FIRST_EVENT_VERSION 1
#define FILE_DENIAL_EVENT_VERSION 1

#define ENV_AF_INET 2
#define ENV_AF_INET6 10
#define ENV_COMM_LEN 16 /* TASK_COMM_LEN */

/* ---- loss counters: index into the per-CPU `loss_counts` array ------------------------------ */
/* Indexes 1..LOSS_RESERVE_TYPES-1 count ring-buffer reserve failures of the sensor's own event
 * type of that number (1-15, sensor.c). Other program families count their losses in maps of their
 * own (files.h: FILE_LOSS_*). */
#define LOSS_RESERVE_TYPES 16
#define LOSS_SYSCALL_UNATTRIBUTED 16 /* syscalls counted while no cgroup slot was free */
#define LOSS_CGROUP_REMOVED_DROPPED 17 /* removed cgroups whose slot could not be queued for reuse */
#define LOSS_NET_UNATTRIBUTED 18 /* connects/sends of a cgroup without a slot: not counted */
#define LOSS_EXEC_UNATTRIBUTED 19 /* execs of a cgroup without a slot: not counted */
#define LOSS_NET_TABLE_FULL 20 /* new destinations refused because net_counts was full */
#define LOSS_EXEC_TABLE_FULL 21 /* new exec paths refused because exec_counts was full */
#define LOSS_SLOTS 32

/* ---- syscall counter tables (read and reset by userspace, not ring-buffer records) --------- */
/* Syscall numbers at or above SYSCALL_NR_SLOTS are counted in the last bucket. */
#define SYSCALL_NR_SLOTS 512
/* Two banks of counters per cgroup: bank 0 before the cgroup's first exec (a container
 * runtime's own setup, which is not the workload's behaviour), bank 1 from that exec on. */
#define SYSCALL_BANKS 2
#define SYSCALL_SLOT_COUNTS_SIZE 8192
struct syscall_slot_counts { /* one per cgroup slot, per CPU; bank b, nr n at count[b * 512 + n] */
	__u64 count[SYSCALL_BANKS * SYSCALL_NR_SLOTS];
};

#define SYSCALL_SLOT_STATE_SIZE 80
struct syscall_slot_state { /* one per cgroup slot, shared by all CPUs */
	__u64 cgroup_id;                   /* owner of the slot; 0 while free */
	__u64 seen[SYSCALL_NR_SLOTS / 64]; /* first-seen bitmap by syscall number */
	__u32 bank;                        /* 1 once a task of the cgroup has exec'd */
	__u32 pad;
};

#define EVENT_HDR_SIZE 16
struct event_hdr {
	__u16 type;    /* EV_* */
	__u16 version; /* *_EVENT_VERSION */
	__u32 size;    /* sizeof the whole record */
	__u64 ktime;
};

/* EV_EXEC, from sched:sched_process_exec: one per exec, only when built with -DTRACE_EVENTS=1
 * (execs are counted in exec_counts either way). */
#define EXEC_FILENAME_LEN 256
#define EXEC_ARGV_LEN 256
#define EXEC_ARGV_MAX_ARGS 16
#define EXEC_F_ARGV_TRUNCATED 0x1 /* more argv than captured (bytes or count) */
#define EXEC_F_NO_ARGV 0x2        /* argv could not be captured at sys_enter */
#define EXEC_F_PPID_UNKNOWN 0x4   /* the process was not seen forking and was not seeded */
#define EXEC_EVENT_SIZE 560
struct exec_event {
	struct event_hdr hdr;          /*   0 */
	__u64 cgroup_id;               /*  16 */
	__u32 pid;                     /*  24 */
	__u32 ppid;                    /*  28 from fork tracking; 0 when unknown */
	__u32 old_pid;                 /*  32 tid that called execve */
	__u16 filename_len;            /*  36 bytes in filename, without the NUL */
	__u16 argv_len;                /*  38 bytes used in argv, NUL separators included */
	__u32 argc;                    /*  40 strings captured in argv */
	__u32 flags;                   /*  44 EXEC_F_* */
	char filename[EXEC_FILENAME_LEN]; /*  48 */
	char argv[EXEC_ARGV_LEN];      /* 304 NUL-separated */
};

/* EV_FORK, from sched:sched_process_fork; new processes only, not new threads. Only with
 * -DTRACE_EVENTS=1; fork tracking (the parents map) runs either way. */
#define FORK_EVENT_SIZE 40
struct fork_event {
	struct event_hdr hdr; /*  0 */
	__u64 cgroup_id;      /* 16 the parent's, which the child inherits */
	__u32 pid;            /* 24 child */
	__u32 ppid;           /* 28 parent thread group */
	__u32 parent_tid;     /* 32 the thread that forked */
	__u32 pad;            /* 36 */
};

/* EV_EXIT, from sched:sched_process_exit when the whole thread group is gone. Only with
 * -DTRACE_EVENTS=1. */
#define EXIT_F_CODE_KNOWN 0x1 /* exit_status holds the exit()/exit_group() argument */
#define EXIT_EVENT_SIZE 40
struct exit_event {
	struct event_hdr hdr; /*  0 */
	__u64 cgroup_id;      /* 16 */
	__u32 pid;            /* 24 */
	__u32 tid;            /* 28 last thread to exit */
	__s32 exit_status;    /* 32 argument of exit_group()/exit(); exit code is & 0xff */
	__u32 flags;          /* 36 EXIT_F_* */
};

/* EV_NET, from the cgroup connect4/6 and sendmsg4/6 hooks: one per connect or send, only when
 * built with -DTRACE_EVENTS=1 or -DNET_RESULT=1 (destinations are counted in net_counts). */
#define NET_OP_CONNECT 0
#define NET_OP_SENDMSG 1
#define NET_F_RET_KNOWN 0x1 /* ret holds the syscall's return value */
#define NET_EVENT_SIZE 64
struct net_event {
	struct event_hdr hdr; /*  0 */
	__u64 cgroup_id;      /* 16 */
	__u32 pid;            /* 24 */
	__u32 tid;            /* 28 */
	__u16 family;         /* 32 ENV_AF_* */
	__u16 protocol;       /* 34 */
	__u8 op;              /* 36 NET_OP_* */
	__u8 flags;           /* 37 NET_F_* */
	__u16 port;           /* 38 host order */
	__u8 addr[16];        /* 40 network order */
	__s64 ret;            /* 56 */
};

/* EV_SYSCALL_FIRST: the first time a cgroup's slot makes syscall `nr`. */
#define SYSCALL_FIRST_EVENT_SIZE 32
struct syscall_first_event {
	struct event_hdr hdr; /*  0 */
	__u64 cgroup_id;      /* 16 */
	__u32 nr;             /* 24 */
	__u32 pid;            /* 28 */
};

/* EV_EGRESS_VIOLATION, emitted by the egress enforcement programs. */
#define EGRESS_OP_CONNECT 0
#define EGRESS_OP_SENDMSG 1
#define EGRESS_ACTION_ALERTED 0
#define EGRESS_ACTION_DENIED 1
#define EGRESS_VIOLATION_EVENT_SIZE 72
struct egress_violation_event {
	struct event_hdr hdr; /*  0 */
	__u64 cgroup_id;      /* 16 */
	__u32 pid;            /* 24 */
	__u16 family;         /* 28 ENV_AF_* */
	__u16 protocol;       /* 30 */
	__u8 addr[16];        /* 32 network order */
	__u16 port;           /* 48 host order */
	__u8 op;              /* 50 EGRESS_OP_* */
	__u8 action;          /* 51 EGRESS_ACTION_* */
	__u32 tid;            /* 52 */
	char comm[ENV_COMM_LEN]; /* 56 the thread's name */
};

/* EV_SECCOMP_DENIAL, from the seccomp denial programs (bpf/denials.c): the first call of a
 * (cgroup, process, syscall, context) that a filter denied (raw sys_exit) or, in alert mode,
 * that lies outside the allowed set (raw sys_enter). Later calls are counted in the kernel. */
#define SECCOMP_DENIAL_F_COUNTED 0x1     /* the counts map holds this key's count, this call included */
#define SECCOMP_DENIAL_F_DESTINATION 0x2 /* family, port and addr: the destination the call named */
#define SECCOMP_DENIAL_EVENT_SIZE 112
struct seccomp_denial_event {
	struct event_hdr hdr; /*  0 */
	__u64 cgroup_id;      /* 16 */
	__u32 pid;            /* 24 */
	__u32 nr;             /* 28 */
	__s64 ret;            /* 32 -errno for a denial, 0 for an alert */
	__u64 args[3];        /* 40 the call's first three arguments */
	__u32 tid;            /* 64 */
	__u32 flags;          /* 68 SECCOMP_DENIAL_F_* */
	char comm[ENV_COMM_LEN]; /* 72 the thread's name */
	__u16 family;         /* 88 AF_* of the destination */
	__u16 port;           /* 90 host order */
	__u32 context;        /* 92 the counts key's context */
	__u8 addr[16];        /* 96 network order */
};

/* EV_IO_URING_OP, from io_uring:io_uring_submit_req in an enforced cgroup: the first time the
 * cgroup submits each opcode. io_uring operations run without their syscalls, so seccomp never
 * sees them; the enforcing side reports those whose syscall the policy does not allow. */
#define IO_URING_OP_NAME_LEN 24
#define IO_URING_OP_EVENT_SIZE 56
struct io_uring_op_event {
	struct event_hdr hdr;           /*  0 */
	__u64 cgroup_id;                /* 16 */
	__u32 pid;                      /* 24 */
	__u8 opcode;                    /* 28 IORING_OP_* */
	__u8 sq_thread;                 /* 29 submitted by the SQPOLL thread */
	__u16 pad;                      /* 30 */
	char op[IO_URING_OP_NAME_LEN];  /* 32 the kernel's name of the opcode, e.g. CONNECT */
};

/* EV_CGROUP_ESCAPE, from cgroup:cgroup_attach_task: a thread inside a syscall it entered from an
 * enforced cgroup (a write to some cgroup.procs) moved a task to another cgroup. */
#define CGROUP_ESCAPE_PATH_LEN 256
#define CGROUP_ESCAPE_EVENT_SIZE 304
struct cgroup_escape_event {
	struct event_hdr hdr;                /*  0 */
	__u64 src_cgroup_id;                 /* 16 the enforced cgroup the mover was in */
	__u64 dst_cgroup_id;                 /* 24 */
	__u32 pid;                           /* 32 the task moved */
	__u32 by_pid;                        /* 36 the process that moved it */
	__s32 dst_level;                     /* 40 */
	__u32 pad;                           /* 44 */
	char dst_path[CGROUP_ESCAPE_PATH_LEN]; /* 48 the destination, relative to the hierarchy root */
};

/* ---- behaviour counter tables: network destinations and exec paths per cgroup ------------- */
/* Hash maps keyed by (cgroup, behaviour); the value counts every occurrence with the first and
 * latest ktime. An entry is made at a behaviour's first occurrence in its cgroup, which is the
 * only one announced through the ring buffer (EV_NET_FIRST, EV_EXEC_FIRST). Userspace reads
 * the cumulative values and takes deltas; it deletes a cgroup's entries once the cgroup is gone.
 * Entries per cgroup are capped (NET_CGROUP_CAP, EXEC_CGROUP_CAP in bpf/sensor.c); what a
 * cgroup does beyond its cap is counted in its behaviour_slot, never dropped silently. */
#define NET_COUNT_KEY_SIZE 32
struct net_count_key {
	__u64 cgroup_id; /*  0 */
	__u8 addr[16];   /*  8 network order; IPv4 in addr[0..3] */
	__u16 port;      /* 24 host order */
	__u8 family;     /* 26 ENV_AF_* */
	__u8 protocol;   /* 27 IPPROTO_* */
	__u8 op;         /* 28 NET_OP_* */
	__u8 pad[3];     /* 29 zero */
};

#define EXEC_COUNT_KEY_SIZE 264
struct exec_count_key {
	__u64 cgroup_id;              /*   0 */
	char path[EXEC_FILENAME_LEN]; /*   8 as passed to execve; NUL-padded (zero to the end) */
};

#define COUNT_F_ANNOUNCED 0x1 /* the first-sighting record was submitted (cleared to retry) */
#define BEHAVIOUR_COUNT_SIZE 32
struct behaviour_count {
	__u64 count;    /*  0 occurrences, cumulative */
	__u64 first_ns; /*  8 ktime of the first */
	__u64 last_ns;  /* 16 ktime of the latest */
	__u64 flags;    /* 24 COUNT_F_* */
};

/* What a cgroup slot holds in the behaviour tables, and what it did beyond its caps. One per
 * cgroup slot (the syscall tables' slot), zeroed by userspace before the slot is reused.
 * `*_sketch` are HyperLogLog registers over the keys refused, which estimate how many distinct
 * behaviours were dropped (standard error 1.04 / sqrt(SKETCH_REGISTERS), about 9 %). */
#define SKETCH_REGISTERS 128
#define SKETCH_INDEX_BITS 7
#define BEHAVIOUR_SLOT_SIZE 320
struct behaviour_slot {
	__u64 net_entries;                 /*   0 entries of this cgroup in net_counts */
	__u64 exec_entries;                /*   8 entries of this cgroup in exec_counts */
	__u64 net_dropped;                 /*  16 connects/sends to destinations not counted */
	__u64 exec_dropped;                /*  24 execs of paths not counted */
	__u64 net_dropped_first_ns;        /*  32 ktime of the first one dropped (0: none) */
	__u64 net_dropped_last_ns;         /*  40 */
	__u64 exec_dropped_first_ns;       /*  48 */
	__u64 exec_dropped_last_ns;        /*  56 */
	__u8 net_sketch[SKETCH_REGISTERS];  /*  64 */
	__u8 exec_sketch[SKETCH_REGISTERS]; /* 192 */
};

/* Ring-buffer reserve failures of one cgroup slot, indexed by event type like loss_counts
 * (1..LOSS_RESERVE_TYPES-1): the part of the node-wide loss that belongs to that cgroup. Per
 * CPU, one per cgroup slot, zeroed by userspace before the slot is reused. */
#define SLOT_LOSS_SIZE 128
struct slot_loss {
	__u64 reserve_failed[LOSS_RESERVE_TYPES]; /* 0 */
};

/* EV_EXEC_FIRST, from sched:sched_process_exec: the first exec of `filename` in the cgroup (or,
 * after a ring buffer overflow refused that record, the next one). Same fields as exec_event. */
#define EXEC_FIRST_EVENT_SIZE 560
struct exec_first_event {
	struct event_hdr hdr;          /*   0 */
	__u64 cgroup_id;               /*  16 */
	__u32 pid;                     /*  24 */
	__u32 ppid;                    /*  28 from fork tracking; 0 when unknown */
	__u32 old_pid;                 /*  32 tid that called execve */
	__u16 filename_len;            /*  36 bytes in filename, without the NUL */
	__u16 argv_len;                /*  38 bytes used in argv, NUL separators included */
	__u32 argc;                    /*  40 strings captured in argv */
	__u32 flags;                   /*  44 EXEC_F_* */
	char filename[EXEC_FILENAME_LEN]; /*  48 */
	char argv[EXEC_ARGV_LEN];      /* 304 NUL-separated */
};

/* EV_NET_FIRST, from the cgroup connect4/6 and sendmsg4/6 hooks: the first connect or send to
 * a destination in the cgroup (or, after a ring buffer overflow, the next one). */
#define NET_FIRST_EVENT_SIZE 56
struct net_first_event {
	struct event_hdr hdr; /*  0 */
	__u64 cgroup_id;      /* 16 */
	__u32 pid;            /* 24 */
	__u32 tid;            /* 28 */
	__u16 family;         /* 32 ENV_AF_* */
	__u16 protocol;       /* 34 */
	__u8 op;              /* 36 NET_OP_* */
	__u8 flags;           /* 37 0 */
	__u16 port;           /* 38 host order */
	__u8 addr[16];        /* 40 network order */
};

/* EV_DNS_MESSAGE, from the DNS observation programs (bpf/dns.c): one DNS message to or from
 * port 53 of a socket, its first DNS_MESSAGE_CAPTURE bytes, parsed in userspace. */
#define DNS_MESSAGE_CAPTURE 1024
#define DNS_DIR_QUERY 0  /* leaving the socket, to the resolver */
#define DNS_DIR_ANSWER 1 /* arriving at the socket, from the resolver */
#define DNS_MESSAGE_EVENT_SIZE 1080
struct dns_message_event {
	struct event_hdr hdr;          /*  0 */
	__u64 cgroup_id;               /* 16 the socket's cgroup */
	__u16 family;                  /* 24 ENV_AF_* */
	__u8 protocol;                 /* 26 IPPROTO_UDP or IPPROTO_TCP */
	__u8 direction;                /* 27 DNS_DIR_* */
	__u16 peer_port;               /* 28 the resolver's port, host order */
	__u16 msg_len;                 /* 30 bytes of DNS message in the packet */
	__u8 peer[16];                 /* 32 the resolver's address, network order */
	__u16 captured;                /* 48 bytes in msg */
	__u16 pad;                     /* 50 */
	__u32 pad2;                    /* 52 */
	__u8 msg[DNS_MESSAGE_CAPTURE]; /* 56 the DNS message (TCP: without its length prefix) */
};

/* EV_DNS_VIOLATION, from the egress enforcement programs: an answer, from an allowed resolver,
 * for a name no entry allows. Answers are never dropped: its addresses are simply not learned,
 * so connects to them stay denied. */
#define DNS_VIOLATION_NAME_LEN 256
#define DNS_VIOLATION_EVENT_SIZE 288
struct dns_violation_event {
	struct event_hdr hdr;              /*  0 */
	__u64 cgroup_id;                   /* 16 the socket's cgroup */
	__u16 qtype;                       /* 24 */
	__u8 action;                       /* 26 EGRESS_ACTION_* (always alerted) */
	__u8 pad;                          /* 27 */
	__u16 name_len;                    /* 28 */
	__u16 pad2;                        /* 30 */
	char name[DNS_VIOLATION_NAME_LEN]; /* 32 dotted, lower case */
};

/* ---- the request capture (bpf/http.c) ------------------------------------------------------- */

/* EV_HTTP_CAPTURE: bytes of one call on a connection of a watched cgroup, bounded. Variable
 * length: hdr.size is HTTP_CAPTURE_HEAD_SIZE + len, and only that much is sent. */
#define HTTP_CAPTURE_MAX 4096            /* bytes captured from one call at most */
#define HTTP_CAPTURE_HEAD_SIZE 64
#define HTTP_F_TLS 0x1         /* plaintext from an SSL_* uprobe (else a socket syscall) */
#define HTTP_F_RESPONSE 0x2    /* bytes the process received: a response head */
#define HTTP_F_HEAD 0x4        /* a request head: request line and headers first */
#define HTTP_F_BODY 0x8        /* a later part of the request whose head came before */
#define HTTP_F_TRUNCATED 0x10  /* the call carried more than was captured */
#define HTTP_F_H2 0x20         /* the HTTP/2 connection preface: the connection is not decoded */
#define HTTP_F_UNPARSED 0x40   /* first bytes of a connection that is neither HTTP/1.x nor h2 */
#define HTTP_F_TLS_RECORD 0x80 /* a TLS record that no hooked TLS library wrote (data: the
				* first bytes of the ClientHello, for its server name) */
#define HTTP_SRC_WRITE 1
#define HTTP_SRC_WRITEV 2
#define HTTP_SRC_SENDTO 3
#define HTTP_SRC_SENDMSG 4
#define HTTP_SRC_SSL_WRITE 5
#define HTTP_SRC_SSL_READ 6
#define HTTP_SRC_SKB 7         /* a TCP segment the cgroup received (plaintext responses) */
#define HTTP_CAPTURE_EVENT_SIZE 4160
struct http_capture_event {
	struct event_hdr hdr;        /*  0 hdr.size = HTTP_CAPTURE_HEAD_SIZE + len */
	__u64 cgroup_id;             /* 16 */
	__u64 conn;                  /* 24 the connection: the SSL object (TLS) or the socket cookie */
	__u64 cookie;                /* 32 socket cookie, 0 when not known yet */
	__u32 pid;                   /* 40 */
	__u32 tid;                   /* 44 */
	__u32 total;                 /* 48 bytes the call carried */
	__u16 len;                   /* 52 bytes in data */
	__u16 flags;                 /* 54 HTTP_F_* */
	__u8 source;                 /* 56 HTTP_SRC_* */
	__u8 pad[7];                 /* 57 */
	char data[HTTP_CAPTURE_MAX]; /* 64 */
};

/* EV_HTTP_CONN: what a connection is: its socket and where it goes. Sent once per connection
 * (plaintext: at its first capture; TLS: when a nested write shows the SSL object's socket). */
#define HTTP_CONN_EVENT_SIZE 72
struct http_conn_event {
	struct event_hdr hdr; /*  0 */
	__u64 cgroup_id;      /* 16 */
	__u64 conn;           /* 24 as in http_capture_event */
	__u64 cookie;         /* 32 */
	__u32 pid;            /* 40 */
	__u32 fd;             /* 44 */
	__u16 family;         /* 48 ENV_AF_* */
	__u16 port;           /* 50 host order */
	__u16 flags;          /* 52 HTTP_F_TLS */
	__u16 pad;            /* 54 */
	__u8 addr[16];        /* 56 network order; IPv4 uses addr[0..3] */
};

/* EV_HTTP_VIOLATION: a request outside the envelope, judged in the probe before it was sent. */
#define HTTP_ACTION_ALERTED 0
#define HTTP_ACTION_KILLED 1   /* SIGKILL from the probe; plaintext packets of the socket dropped */
#define HTTP_REASON_NO_RULE 0  /* method, host and path match no allowed entry */
#define HTTP_REASON_UNPARSED 1 /* the request line does not parse as origin-form HTTP/1.x */
#define HTTP_REASON_NO_HOST 2  /* no Host header in the first HTTP_HOST_SCAN bytes */
#define HTTP_REASON_TWO_HOSTS 3 /* more than one Host header */
#define HTTP_REASON_TOO_LONG 4 /* method, host, path or a segment beyond what the probe compares */
#define HTTP_VIOLATION_TEXT 256
#define HTTP_VIOLATION_EVENT_SIZE 320
struct http_violation_event {
	struct event_hdr hdr;           /*  0 */
	__u64 cgroup_id;                /* 16 */
	__u64 conn;                     /* 24 */
	__u32 pid;                      /* 32 */
	__u32 tid;                      /* 36 */
	__u8 action;                    /* 40 HTTP_ACTION_* */
	__u8 reason;                    /* 41 HTTP_REASON_* */
	__u16 flags;                    /* 42 HTTP_F_TLS */
	__u16 len;                      /* 44 bytes in text */
	__u16 pad;                      /* 46 */
	char comm[16];                  /* 48 */
	char text[HTTP_VIOLATION_TEXT]; /* 64 "METHOD PATH\nHOST": the query is never copied */
};

/* ---- file access (bpf/files.c) ------------------------------------------------------------- */
/* Bytes of a path kept, NUL included; a longer path is not counted (FILE_LOSS_PATH_TRUNCATED). */
#define FILE_PATH_LEN 256

/* access bits: what one call did to one path (a behaviour per bit, enforcer/file_patterns) */
#define FILE_ACC_READ 0x1      /* opened for reading */
#define FILE_ACC_LIST 0x2      /* opened with O_DIRECTORY */
#define FILE_ACC_WRITE 0x4     /* opened for writing */
#define FILE_ACC_TRUNCATE 0x8  /* O_TRUNC, creat(2), truncate(2) */
#define FILE_ACC_CREATE 0x10   /* O_CREAT, creat(2), the new name of link(2) or rename(2), mknod S_IFREG */
#define FILE_ACC_REMOVE 0x20   /* unlink(2), the old name of rename(2) */
#define FILE_ACC_MKDIR 0x40    /* mkdir(2) */
#define FILE_ACC_RMDIR 0x80    /* rmdir(2), unlinkat(AT_REMOVEDIR) */
#define FILE_ACC_SYMLINK 0x100 /* the new name of symlink(2) */
#define FILE_ACC_MKFIFO 0x200  /* mknod S_IFIFO */
#define FILE_ACC_MKSOCK 0x400  /* mknod S_IFSOCK */
#define FILE_ACC_MKNOD 0x800   /* mknod S_IFCHR, S_IFBLK */
#define FILE_ACC_EXEC 0x1000   /* execve(2), execveat(2): denials only (execs are the sensor's) */

/* path forms */
#define FILE_DIRFD_ABSOLUTE 0 /* dirfd field of an absolute path */
#define FILE_AT_FDCWD -100    /* relative to the process's working directory */

/* flags of a file record */
#define FILE_F_TRUNCATED 0x1 /* the path filled FILE_PATH_LEN: it may be cut short */

/* EV_FILE_FIRST: the first time a cgroup makes one access pattern to one path (a new key of
 * files.h's `file_counts`); the count itself stays in the map. */
#define FILE_FIRST_EVENT_SIZE 312
struct file_first_event {
	struct event_hdr hdr;     /*   0 */
	__u64 cgroup_id;          /*  16 */
	__u32 pid;                /*  24 thread group that made the call */
	__u32 access;             /*  28 FILE_ACC_* */
	__u32 key_pid;            /*  32 the key's pid: 0 for an absolute path */
	__s32 dirfd;              /*  36 FILE_DIRFD_ABSOLUTE, FILE_AT_FDCWD or a directory fd */
	__u32 nr;                 /*  40 syscall number */
	__u16 path_len;           /*  44 bytes in path, without the NUL */
	__u16 flags;              /*  46 FILE_F_* */
	__u64 path_hash;          /*  48 the key's path hash (files.h) */
	char path[FILE_PATH_LEN]; /*  56 as the process gave it */
};

/* EV_FILE_DENIAL: a file call of a watched cgroup that failed with -EACCES (Landlock's answer to
 * a refused open, exec, creation or removal), from the syscall's exit. */
#define FILE_COMM_LEN 16
#define FILE_DENIAL_EVENT_SIZE 328
struct file_denial_event {
	struct event_hdr hdr;     /*   0 */
	__u64 cgroup_id;          /*  16 */
	__u32 pid;                /*  24 */
	__u32 tid;                /*  28 */
	__u32 access;             /*  32 FILE_ACC_* the call asked for */
	__s32 dirfd;              /*  36 as in file_first_event */
	__u32 nr;                 /*  40 syscall number */
	__s32 ret;                /*  44 the syscall's return value (-errno) */
	__u16 path_len;           /*  48 bytes in path, without the NUL */
	__u16 flags;              /*  50 FILE_F_* */
	__u32 pad;                /*  52 */
	char comm[FILE_COMM_LEN]; /*  56 the calling thread's name */
	char path[FILE_PATH_LEN]; /*  72 as the process gave it */
};

_Static_assert(sizeof(struct event_hdr) == EVENT_HDR_SIZE, "event_hdr size");
_Static_assert(sizeof(struct exec_event) == EXEC_EVENT_SIZE, "exec_event size");
_Static_assert(sizeof(struct fork_event) == FORK_EVENT_SIZE, "fork_event size");
_Static_assert(sizeof(struct exit_event) == EXIT_EVENT_SIZE, "exit_event size");
_Static_assert(sizeof(struct net_event) == NET_EVENT_SIZE, "net_event size");
_Static_assert(sizeof(struct syscall_first_event) == SYSCALL_FIRST_EVENT_SIZE, "syscall_first size");
_Static_assert(sizeof(struct egress_violation_event) == EGRESS_VIOLATION_EVENT_SIZE, "egress size");
_Static_assert(sizeof(struct seccomp_denial_event) == SECCOMP_DENIAL_EVENT_SIZE, "seccomp size");
_Static_assert(sizeof(struct dns_message_event) == DNS_MESSAGE_EVENT_SIZE, "dns message size");
_Static_assert(sizeof(struct dns_violation_event) == DNS_VIOLATION_EVENT_SIZE, "dns violation size");
_Static_assert(sizeof(struct io_uring_op_event) == IO_URING_OP_EVENT_SIZE, "io_uring op size");
_Static_assert(sizeof(struct cgroup_escape_event) == CGROUP_ESCAPE_EVENT_SIZE, "escape size");
_Static_assert(sizeof(struct http_capture_event) == HTTP_CAPTURE_EVENT_SIZE, "http capture size");
_Static_assert(sizeof(struct http_conn_event) == HTTP_CONN_EVENT_SIZE, "http conn size");
_Static_assert(sizeof(struct http_violation_event) == HTTP_VIOLATION_EVENT_SIZE, "http violation size");
_Static_assert(sizeof(struct file_first_event) == FILE_FIRST_EVENT_SIZE, "file_first size");
_Static_assert(sizeof(struct file_denial_event) == FILE_DENIAL_EVENT_SIZE, "file_denial size");
_Static_assert(sizeof(struct syscall_slot_counts) == SYSCALL_SLOT_COUNTS_SIZE, "slot counts size");
_Static_assert(sizeof(struct syscall_slot_state) == SYSCALL_SLOT_STATE_SIZE, "slot state size");
_Static_assert(sizeof(struct exec_first_event) == EXEC_FIRST_EVENT_SIZE, "exec_first size");
_Static_assert(sizeof(struct net_first_event) == NET_FIRST_EVENT_SIZE, "net_first size");
_Static_assert(sizeof(struct net_count_key) == NET_COUNT_KEY_SIZE, "net count key size");
_Static_assert(sizeof(struct exec_count_key) == EXEC_COUNT_KEY_SIZE, "exec count key size");
_Static_assert(sizeof(struct behaviour_count) == BEHAVIOUR_COUNT_SIZE, "behaviour count size");
_Static_assert(sizeof(struct behaviour_slot) == BEHAVIOUR_SLOT_SIZE, "behaviour slot size");
_Static_assert(sizeof(struct slot_loss) == SLOT_LOSS_SIZE, "slot loss size");

#endif /* ENVELOPE_EVENTS_H */
