"""Ring-buffer records: Python mirrors of ``bpf/events.h`` and a pure decoder.

Each C struct has one mirror class below with the C pasted into its docstring and every
padding byte spelled out as a field, in the style of pyroute2's netlink message classes. The
mirrors decode with the ``struct`` module; nothing here imports bcc, so decoding runs and is
tested without root. ``tests/unit/test_events_header.py`` parses ``bpf/events.h`` and checks
type numbers, versions and sizes against these classes.

:func:`decode` takes the bytes of one record and returns an event dataclass or a
:class:`DecodeError`; it never raises. :class:`Decoder` wraps it and counts the errors by kind,
so the poll loop can report them as loss.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import ClassVar, Union  # noqa: F401 - ClassVar: dataclasses reads string annotations

from . import dnsmessage, syscalls
from .mirrors import LOSS_RESERVE_TYPES, ExecCountKey, Mirror, NetCountKey  # noqa: F401 - LOSS_* beside the indexes
from .workload import dns_key, exec_key, net_key, syscall_key

# Event types (EV_* in bpf/events.h). Numbers are never reused.
EV_EXEC = 1
EV_FORK = 2
EV_EXIT = 3
EV_NET = 4
EV_SYSCALL_FIRST = 5
EV_EGRESS_VIOLATION = 6
EV_SECCOMP_DENIAL = 7
EV_EXEC_FIRST = 8
EV_NET_FIRST = 9
EV_DNS_MESSAGE = 16
EV_DNS_VIOLATION = 17
EV_HTTP_CAPTURE = 24
EV_HTTP_CONN = 25
EV_HTTP_VIOLATION = 26
EV_FILE_FIRST = 32
EV_FILE_DENIAL = 33
EV_IO_URING_OP = 40
EV_CGROUP_ESCAPE = 41
EV_TYPE_MAX = 42

TYPE_NAMES = {
    EV_EXEC: "exec",
    EV_FORK: "fork",
    EV_EXIT: "exit",
    EV_NET: "net",
    EV_SYSCALL_FIRST: "syscall_first",
    EV_EGRESS_VIOLATION: "egress_violation",
    EV_SECCOMP_DENIAL: "seccomp_denial",
    EV_EXEC_FIRST: "exec_first",
    EV_NET_FIRST: "net_first",
    EV_DNS_MESSAGE: "dns_message",
    EV_DNS_VIOLATION: "dns_violation",
    EV_FILE_FIRST: "file_first",
    EV_FILE_DENIAL: "file_denial",
    EV_IO_URING_OP: "io_uring_op",
    EV_CGROUP_ESCAPE: "cgroup_escape",
    EV_HTTP_CAPTURE: "http_capture",
    EV_HTTP_CONN: "http_conn",
    EV_HTTP_VIOLATION: "http_violation",
}

# Loss counter indexes (LOSS_* in bpf/events.h); 1..LOSS_RESERVE_TYPES-1 are reserve failures of
# the sensor's own event types.
LOSS_SYSCALL_UNATTRIBUTED = 16
LOSS_CGROUP_REMOVED_DROPPED = 17
LOSS_NET_UNATTRIBUTED = 18
LOSS_EXEC_UNATTRIBUTED = 19
LOSS_NET_TABLE_FULL = 20
LOSS_EXEC_TABLE_FULL = 21
LOSS_SLOTS = 32

ENV_AF_INET = 2
ENV_AF_INET6 = 10
ENV_COMM_LEN = 16

EXEC_FILENAME_LEN = 256
EXEC_ARGV_LEN = 256
EXEC_ARGV_MAX_ARGS = 16
EXEC_F_ARGV_TRUNCATED = 0x1
EXEC_F_NO_ARGV = 0x2
EXEC_F_PPID_UNKNOWN = 0x4
EXIT_F_CODE_KNOWN = 0x1
IO_URING_OP_NAME_LEN = 24
CGROUP_ESCAPE_PATH_LEN = 256
NET_OP_CONNECT = 0
NET_OP_SENDMSG = 1
NET_F_RET_KNOWN = 0x1
EGRESS_OP_CONNECT = 0
EGRESS_OP_SENDMSG = 1
EGRESS_ACTION_ALERTED = 0
EGRESS_ACTION_DENIED = 1
SECCOMP_DENIAL_F_COUNTED = 0x1
SECCOMP_DENIAL_F_DESTINATION = 0x2
DNS_MESSAGE_CAPTURE = 1024
DNS_DIR_QUERY = 0
DNS_DIR_ANSWER = 1
DNS_VIOLATION_NAME_LEN = 256
HTTP_CAPTURE_MAX = 4096
HTTP_CAPTURE_HEAD_SIZE = 64
HTTP_F_TLS = 0x1
HTTP_F_RESPONSE = 0x2
HTTP_F_HEAD = 0x4
HTTP_F_BODY = 0x8
HTTP_F_TRUNCATED = 0x10
HTTP_F_H2 = 0x20
HTTP_F_UNPARSED = 0x40
HTTP_F_TLS_RECORD = 0x80
HTTP_SRC_WRITE = 1
HTTP_SRC_WRITEV = 2
HTTP_SRC_SENDTO = 3
HTTP_SRC_SENDMSG = 4
HTTP_SRC_SSL_WRITE = 5
HTTP_SRC_SSL_READ = 6
HTTP_SRC_SKB = 7
HTTP_ACTION_ALERTED = 0
HTTP_ACTION_KILLED = 1
HTTP_REASON_NO_RULE = 0
HTTP_REASON_UNPARSED = 1
HTTP_REASON_NO_HOST = 2
HTTP_REASON_TWO_HOSTS = 3
HTTP_REASON_TOO_LONG = 4
HTTP_VIOLATION_TEXT = 256
HTTP_REASONS = {
    HTTP_REASON_NO_RULE: "no allowed entry matches",
    HTTP_REASON_UNPARSED: "not an origin-form HTTP/1.x request the probe can judge",
    HTTP_REASON_NO_HOST: "no Host header in the part of the head the probe searches",
    HTTP_REASON_TWO_HOSTS: "more than one Host header",
    HTTP_REASON_TOO_LONG: "method, host, path or a segment longer than the probe compares",
}
FILE_PATH_LEN = 256
FILE_COMM_LEN = 16
FILE_ACC_READ = 0x1
FILE_ACC_LIST = 0x2
FILE_ACC_WRITE = 0x4
FILE_ACC_TRUNCATE = 0x8
FILE_ACC_CREATE = 0x10
FILE_ACC_REMOVE = 0x20
FILE_ACC_MKDIR = 0x40
FILE_ACC_RMDIR = 0x80
FILE_ACC_SYMLINK = 0x100
FILE_ACC_MKFIFO = 0x200
FILE_ACC_MKSOCK = 0x400
FILE_ACC_MKNOD = 0x800
FILE_ACC_EXEC = 0x1000
FILE_DIRFD_ABSOLUTE = 0
FILE_AT_FDCWD = -100
FILE_F_TRUNCATED = 0x1


_PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}


# ---- struct mirrors ---------------------------------------------------------------------------


class EventHeader(Mirror):
    """Common header of every record.

    struct event_hdr {
        __u16 type;    /* EV_* */
        __u16 version; /* *_EVENT_VERSION */
        __u32 size;    /* sizeof the whole record */
        __u64 ktime;
    };
    """

    c_name = "event_hdr"
    fields = (("type", "H"), ("version", "H"), ("size", "I"), ("ktime", "Q"))


_HDR = tuple(EventHeader.fields)


class ExecRecord(Mirror):
    """EV_EXEC, from sched:sched_process_exec.

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
    """

    c_name = "exec_event"
    type = EV_EXEC
    version = 1
    fields = _HDR + (
        ("cgroup_id", "Q"), ("pid", "I"), ("ppid", "I"), ("old_pid", "I"),
        ("filename_len", "H"), ("argv_len", "H"), ("argc", "I"), ("flags", "I"),
        ("filename", f"{EXEC_FILENAME_LEN}s"), ("argv", f"{EXEC_ARGV_LEN}s"),
    )


class ForkRecord(Mirror):
    """EV_FORK, from sched:sched_process_fork; new processes only, not new threads.

    struct fork_event {
        struct event_hdr hdr; /*  0 */
        __u64 cgroup_id;      /* 16 the parent's, which the child inherits */
        __u32 pid;            /* 24 child */
        __u32 ppid;           /* 28 parent thread group */
        __u32 parent_tid;     /* 32 the thread that forked */
        __u32 pad;            /* 36 */
    };
    """

    c_name = "fork_event"
    type = EV_FORK
    version = 1
    fields = _HDR + (("cgroup_id", "Q"), ("pid", "I"), ("ppid", "I"), ("parent_tid", "I"),
                     ("pad", "I"))


class ExitRecord(Mirror):
    """EV_EXIT, from sched:sched_process_exit when the whole thread group is gone.

    struct exit_event {
        struct event_hdr hdr; /*  0 */
        __u64 cgroup_id;      /* 16 */
        __u32 pid;            /* 24 */
        __u32 tid;            /* 28 last thread to exit */
        __s32 exit_status;    /* 32 argument of exit_group()/exit(); exit code is & 0xff */
        __u32 flags;          /* 36 EXIT_F_* */
    };
    """

    c_name = "exit_event"
    type = EV_EXIT
    version = 1
    fields = _HDR + (("cgroup_id", "Q"), ("pid", "I"), ("tid", "I"), ("exit_status", "i"),
                     ("flags", "I"))


class NetRecord(Mirror):
    """EV_NET, from the cgroup connect4/6 and sendmsg4/6 hooks.

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
    """

    c_name = "net_event"
    type = EV_NET
    version = 1
    fields = _HDR + (
        ("cgroup_id", "Q"), ("pid", "I"), ("tid", "I"), ("family", "H"), ("protocol", "H"),
        ("op", "B"), ("flags", "B"), ("port", "H"), ("addr", "16s"), ("ret", "q"),
    )


class SyscallFirstRecord(Mirror):
    """EV_SYSCALL_FIRST: the first time a cgroup's slot makes syscall ``nr``.

    struct syscall_first_event {
        struct event_hdr hdr; /*  0 */
        __u64 cgroup_id;      /* 16 */
        __u32 nr;             /* 24 */
        __u32 pid;            /* 28 */
    };
    """

    c_name = "syscall_first_event"
    type = EV_SYSCALL_FIRST
    version = 1
    fields = _HDR + (("cgroup_id", "Q"), ("nr", "I"), ("pid", "I"))


class EgressViolationRecord(Mirror):
    """EV_EGRESS_VIOLATION, emitted by the egress enforcement programs.

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
    """

    c_name = "egress_violation_event"
    type = EV_EGRESS_VIOLATION
    version = 2
    fields = _HDR + (
        ("cgroup_id", "Q"), ("pid", "I"), ("family", "H"), ("protocol", "H"), ("addr", "16s"),
        ("port", "H"), ("op", "B"), ("action", "B"), ("tid", "I"), ("comm", f"{ENV_COMM_LEN}s"),
    )


class SeccompDenialRecord(Mirror):
    """EV_SECCOMP_DENIAL, from the seccomp denial programs: the first call of a key (later calls
    are counted in the kernel's ``counts`` map).

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
    """

    c_name = "seccomp_denial_event"
    type = EV_SECCOMP_DENIAL
    version = 3
    fields = _HDR + (("cgroup_id", "Q"), ("pid", "I"), ("nr", "I"), ("ret", "q"),
                     ("args0", "Q"), ("args1", "Q"), ("args2", "Q"), ("tid", "I"), ("flags", "I"),
                     ("comm", f"{ENV_COMM_LEN}s"), ("family", "H"), ("port", "H"), ("context", "I"),
                     ("addr", "16s"))


class IoUringOpRecord(Mirror):
    """EV_IO_URING_OP, from io_uring:io_uring_submit_req in an enforced cgroup.

    struct io_uring_op_event {
        struct event_hdr hdr;           /*  0 */
        __u64 cgroup_id;                /* 16 */
        __u32 pid;                      /* 24 */
        __u8 opcode;                    /* 28 IORING_OP_* */
        __u8 sq_thread;                 /* 29 submitted by the SQPOLL thread */
        __u16 pad;                      /* 30 */
        char op[IO_URING_OP_NAME_LEN];  /* 32 the kernel's name of the opcode, e.g. CONNECT */
    };
    """

    c_name = "io_uring_op_event"
    type = EV_IO_URING_OP
    version = 1
    fields = _HDR + (("cgroup_id", "Q"), ("pid", "I"), ("opcode", "B"), ("sq_thread", "B"),
                     ("pad", "H"), ("op", f"{IO_URING_OP_NAME_LEN}s"))


class CgroupEscapeRecord(Mirror):
    """EV_CGROUP_ESCAPE, from cgroup:cgroup_attach_task: a task moved out of an enforced cgroup
    by a thread of that cgroup.

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
    """

    c_name = "cgroup_escape_event"
    type = EV_CGROUP_ESCAPE
    version = 1
    fields = _HDR + (("src_cgroup_id", "Q"), ("dst_cgroup_id", "Q"), ("pid", "I"), ("by_pid", "I"),
                     ("dst_level", "i"), ("pad", "I"), ("dst_path", f"{CGROUP_ESCAPE_PATH_LEN}s"))


class ExecFirstRecord(Mirror):
    """EV_EXEC_FIRST, from sched:sched_process_exec: the first exec of ``filename`` in the cgroup
    (or, after a ring buffer overflow refused that record, the next one). Same fields as
    exec_event.

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
    """

    c_name = "exec_first_event"
    type = EV_EXEC_FIRST
    version = 1
    fields = ExecRecord.fields


class NetFirstRecord(Mirror):
    """EV_NET_FIRST, from the cgroup connect4/6 and sendmsg4/6 hooks: the first connect or send
    to a destination in the cgroup (or, after a ring buffer overflow, the next one).

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
    """

    c_name = "net_first_event"
    type = EV_NET_FIRST
    version = 1
    fields = _HDR + (
        ("cgroup_id", "Q"), ("pid", "I"), ("tid", "I"), ("family", "H"), ("protocol", "H"),
        ("op", "B"), ("flags", "B"), ("port", "H"), ("addr", "16s"),
    )


class DnsMessageRecord(Mirror):
    """EV_DNS_MESSAGE, from the DNS observation programs (bpf/dns.c).

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
    """

    c_name = "dns_message_event"
    type = EV_DNS_MESSAGE
    version = 1
    fields = _HDR + (
        ("cgroup_id", "Q"), ("family", "H"), ("protocol", "B"), ("direction", "B"),
        ("peer_port", "H"), ("msg_len", "H"), ("peer", "16s"), ("captured", "H"), ("pad", "H"),
        ("pad2", "I"), ("msg", f"{DNS_MESSAGE_CAPTURE}s"),
    )


class DnsViolationRecord(Mirror):
    """EV_DNS_VIOLATION, from the egress enforcement programs: an answer for a name no entry
    allows (its addresses are not learned).

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
    """

    c_name = "dns_violation_event"
    type = EV_DNS_VIOLATION
    version = 1
    fields = _HDR + (("cgroup_id", "Q"), ("qtype", "H"), ("action", "B"), ("pad", "B"),
                     ("name_len", "H"), ("pad2", "H"), ("name", f"{DNS_VIOLATION_NAME_LEN}s"))


class HttpCaptureRecord(Mirror):
    """EV_HTTP_CAPTURE: bytes of one call on a connection of a watched cgroup, bounded. Variable
    length: ``hdr.size`` is ``HTTP_CAPTURE_HEAD_SIZE + len`` and only that much is sent.

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
    """

    c_name = "http_capture_event"
    type = EV_HTTP_CAPTURE
    version = 1
    head = HTTP_CAPTURE_HEAD_SIZE  # the fixed part; data follows, hdr.size - head bytes of it
    fields = _HDR + (
        ("cgroup_id", "Q"), ("conn", "Q"), ("cookie", "Q"), ("pid", "I"), ("tid", "I"),
        ("total", "I"), ("len", "H"), ("flags", "H"), ("source", "B"), ("pad", "7s"),
        ("data", f"{HTTP_CAPTURE_MAX}s"),
    )


class HttpConnRecord(Mirror):
    """EV_HTTP_CONN: what a connection is: its socket and where it goes.

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
    """

    c_name = "http_conn_event"
    type = EV_HTTP_CONN
    version = 1
    fields = _HDR + (
        ("cgroup_id", "Q"), ("conn", "Q"), ("cookie", "Q"), ("pid", "I"), ("fd", "I"),
        ("family", "H"), ("port", "H"), ("flags", "H"), ("pad", "H"), ("addr", "16s"),
    )


class HttpViolationRecord(Mirror):
    """EV_HTTP_VIOLATION: a request outside the envelope, judged in the probe before it was sent.

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
    """

    c_name = "http_violation_event"
    type = EV_HTTP_VIOLATION
    version = 1
    fields = _HDR + (
        ("cgroup_id", "Q"), ("conn", "Q"), ("pid", "I"), ("tid", "I"), ("action", "B"),
        ("reason", "B"), ("flags", "H"), ("len", "H"), ("pad", "H"), ("comm", "16s"),
        ("text", f"{HTTP_VIOLATION_TEXT}s"),
    )


class FileFirstRecord(Mirror):
    """EV_FILE_FIRST: the first time a cgroup makes one access pattern to one path.

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
    """

    c_name = "file_first_event"
    type = EV_FILE_FIRST
    version = 1
    fields = _HDR + (
        ("cgroup_id", "Q"), ("pid", "I"), ("access", "I"), ("key_pid", "I"), ("dirfd", "i"),
        ("nr", "I"), ("path_len", "H"), ("flags", "H"), ("path_hash", "Q"), ("path", f"{FILE_PATH_LEN}s"),
    )


class FileDenialRecord(Mirror):
    """EV_FILE_DENIAL: a file call of a watched cgroup that failed with -EACCES.

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
    """

    c_name = "file_denial_event"
    type = EV_FILE_DENIAL
    version = 1
    fields = _HDR + (
        ("cgroup_id", "Q"), ("pid", "I"), ("tid", "I"), ("access", "I"), ("dirfd", "i"),
        ("nr", "I"), ("ret", "i"), ("path_len", "H"), ("flags", "H"), ("pad", "I"),
        ("comm", f"{FILE_COMM_LEN}s"), ("path", f"{FILE_PATH_LEN}s"),
    )


RECORDS: dict[int, type[Mirror]] = {
    r.type: r for r in (ExecRecord, ForkRecord, ExitRecord, NetRecord, SyscallFirstRecord,
                        EgressViolationRecord, SeccompDenialRecord, ExecFirstRecord,
                        NetFirstRecord, DnsMessageRecord, DnsViolationRecord, IoUringOpRecord,
                        CgroupEscapeRecord, HttpCaptureRecord,
                        HttpConnRecord, HttpViolationRecord, FileFirstRecord, FileDenialRecord)
}


# ---- events -----------------------------------------------------------------------------------


def _cstr(raw: bytes, n: int | None = None) -> str:
    if n is not None:
        raw = raw[:n]
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


@lru_cache(maxsize=4096)  # a workload talks to few destinations, over and over
def _addr(family: int, raw: bytes) -> str | None:
    if family == ENV_AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == ENV_AF_INET6:
        return ipaddress.IPv6Address(raw[:16]).compressed
    return None


def _family(af: int) -> int:
    return 4 if af == ENV_AF_INET else 6


class _Event:
    __slots__ = ()
    type_name: ClassVar[str] = ""
    # How the aggregator counts the behaviour of a record (see sensor.aggregate):
    #   "event"   every record is one occurrence;
    #   "first"   the first sighting of a behaviour the kernel counts: one occurrence, unless
    #             a counter reading has already included it;
    #   "kernel"  the kernel counts the behaviour; the record itself adds nothing.
    counting: ClassVar[str] = "event"

    def to_dict(self) -> dict:
        d = {"type": self.type_name}
        d.update(asdict(self))
        return d

    def behaviour_key(self) -> str | None:
        return None


@dataclass(slots=True)
class ExecEvent(_Event):
    ktime: int
    pid: int
    ppid: int  # 0 when fork tracking did not see the parent
    cgroup_id: int
    filename: str
    argv: list[str] = field(default_factory=list)
    argv_truncated: bool = False
    old_pid: int = 0
    type_name: ClassVar[str] = "exec"
    counting: ClassVar[str] = "kernel"

    def behaviour_key(self) -> str | None:
        return exec_key(self.filename) if self.filename else None


@dataclass(slots=True)
class ExecFirstEvent(_Event):
    """The first exec of a path in a cgroup, with its parent and argv prefix; later execs of
    it are counted in the kernel and read with the counters."""

    ktime: int
    pid: int
    ppid: int  # 0 when fork tracking did not see the parent
    cgroup_id: int
    filename: str
    argv: list[str] = field(default_factory=list)
    argv_truncated: bool = False
    old_pid: int = 0
    type_name: ClassVar[str] = "exec_first"
    counting: ClassVar[str] = "first"

    def behaviour_key(self) -> str | None:
        return exec_key(self.filename) if self.filename else None


@dataclass(slots=True)
class ForkEvent(_Event):
    ktime: int
    pid: int
    ppid: int
    cgroup_id: int
    type_name: ClassVar[str] = "fork"


@dataclass(slots=True)
class ExitEvent(_Event):
    ktime: int
    pid: int
    cgroup_id: int
    exit_code: int | None  # exit()/exit_group() status & 0xff; None when ended by a signal
    type_name: ClassVar[str] = "exit"


@dataclass(slots=True)
class NetEvent(_Event):
    ktime: int
    pid: int
    cgroup_id: int
    op: str  # connect | send
    proto: str  # tcp | udp (or icmp, icmpv6, or the protocol number)
    family: int  # 4 | 6
    addr: str
    port: int
    ret: int | None = None  # the syscall's return value, when the sensor was built to hold it
    tid: int = 0
    type_name: ClassVar[str] = "net"
    counting: ClassVar[str] = "kernel"

    def behaviour_key(self) -> str | None:
        if self.proto not in ("tcp", "udp"):
            return None
        return net_key(self.op, self.proto, self.addr, self.port)


@dataclass(slots=True)
class NetFirstEvent(_Event):
    """The first connect or send to a destination in a cgroup; later ones are counted in the
    kernel and read with the counters."""

    ktime: int
    pid: int
    cgroup_id: int
    op: str  # connect | send
    proto: str
    family: int  # 4 | 6
    addr: str
    port: int
    tid: int = 0
    type_name: ClassVar[str] = "net_first"
    counting: ClassVar[str] = "first"

    def behaviour_key(self) -> str | None:
        if self.proto not in ("tcp", "udp"):
            return None
        return net_key(self.op, self.proto, self.addr, self.port)


@dataclass(slots=True)
class SyscallFirstEvent(_Event):
    ktime: int
    cgroup_id: int
    nr: int
    name: str
    pid: int = 0
    type_name: ClassVar[str] = "syscall_first"

    def behaviour_key(self) -> str | None:
        return syscall_key(self.name)


@dataclass(slots=True)
class EgressViolationEvent(_Event):
    ktime: int
    cgroup_id: int
    pid: int
    op: str  # connect | send
    proto: str
    family: int  # 4 | 6
    addr: str
    port: int
    action: str  # alerted | denied
    tid: int = 0
    comm: str = ""
    type_name: ClassVar[str] = "egress_violation"

    def behaviour_key(self) -> str | None:
        if self.proto not in ("tcp", "udp"):
            return None
        return net_key(self.op, self.proto, self.addr, self.port)


@dataclass(slots=True)
class SeccompDenialEvent(_Event):
    ktime: int
    cgroup_id: int
    pid: int
    nr: int
    name: str
    ret: int
    args: list[int] = field(default_factory=lambda: [0, 0, 0])  # the call's first three arguments
    tid: int = 0
    comm: str = ""
    counted: bool = False  # the kernel counts this key from this call on
    context: int = 0
    destination: str | None = None  # "10.0.0.1:4444" / "[::1]:53": what a network call named
    family: int | None = None  # 4 | 6 with a destination
    type_name: ClassVar[str] = "seccomp_denial"

    def behaviour_key(self) -> str | None:
        return syscall_key(self.name)


@dataclass(slots=True)
class DnsMessageEvent(_Event):
    """A DNS message to (``query``) or from (``answer``) a resolver, as the socket's cgroup sent
    or received it; ``message`` is the parsed :class:`sensor.dnsmessage.Message`, or None when
    the bytes did not parse (``error`` says why)."""

    ktime: int
    cgroup_id: int
    direction: str  # query | answer
    proto: str  # udp | tcp
    family: int  # 4 | 6
    peer: str  # the resolver's address
    peer_port: int
    message: object = None  # sensor.dnsmessage.Message
    error: str = ""
    captured_all: bool = True
    type_name: ClassVar[str] = "dns_message"

    def behaviour_key(self) -> str | None:
        """``dns:NAME`` for a query: each question a workload asks is one occurrence."""
        if self.direction != "query" or self.message is None or not self.message.qname:
            return None
        return dns_key(self.message.qname)

    def to_dict(self) -> dict:
        d = {"type": self.type_name, "ktime": self.ktime, "cgroup_id": self.cgroup_id,
             "direction": self.direction, "proto": self.proto, "family": self.family,
             "peer": self.peer, "peer_port": self.peer_port, "error": self.error,
             "captured_all": self.captured_all}
        m = self.message
        if m is not None:
            d["message"] = {"id": m.id, "response": m.response, "rcode": m.rcode, "qname": m.qname,
                            "qtype": m.qtype, "truncated": m.truncated,
                            "answers": [[r.name, r.type, r.ttl, r.data] for r in m.answers]}
        return d


@dataclass(slots=True)
class DnsViolationEvent(_Event):
    ktime: int
    cgroup_id: int
    qtype: int
    name: str
    action: str  # alerted
    type_name: ClassVar[str] = "dns_violation"

    def behaviour_key(self) -> str | None:
        return dns_key(self.name) if self.name else None


@dataclass(slots=True)
class FileFirstEvent(_Event):
    """A new (cgroup, access bits, path) key: its count is read from the kernel map, so the event
    itself is no behaviour occurrence (see :mod:`sensor.file_observer`)."""

    ktime: int
    cgroup_id: int
    pid: int
    access: int  # FILE_ACC_* bits
    path: str  # as the process gave it
    key_pid: int = 0  # 0: absolute path
    dirfd: int = FILE_DIRFD_ABSOLUTE
    nr: int = 0
    syscall: str = ""
    truncated: bool = False
    path_hash: int = 0  # the kernel key's path hash
    type_name: ClassVar[str] = "file_first"


@dataclass(slots=True)
class FileDenialEvent(_Event):
    """A file call of a watched cgroup refused with -EACCES (see :mod:`enforcer.file_denials`)."""

    ktime: int
    cgroup_id: int
    pid: int
    tid: int
    access: int  # FILE_ACC_* bits the call asked for
    path: str  # as the process gave it
    dirfd: int = FILE_DIRFD_ABSOLUTE
    nr: int = 0
    syscall: str = ""
    ret: int = 0
    truncated: bool = False
    comm: str = ""
    type_name: ClassVar[str] = "file_denial"


@dataclass(slots=True)
class IoUringOpEvent(_Event):
    """An enforced cgroup submitted io_uring operation ``op`` for the first time."""

    ktime: int
    cgroup_id: int
    pid: int
    opcode: int
    op: str  # the kernel's name, e.g. CONNECT
    sq_thread: bool
    syscall: str | None  # the syscall the operation does the work of, when it has one
    type_name: ClassVar[str] = "io_uring_op"


@dataclass(slots=True)
class CgroupEscapeEvent(_Event):
    """A thread of enforced cgroup ``src_cgroup_id`` moved task ``pid`` to another cgroup."""

    ktime: int
    src_cgroup_id: int
    dst_cgroup_id: int
    pid: int
    by_pid: int
    dst_level: int
    dst_path: str  # relative to the cgroup v2 root, e.g. /escape
    type_name: ClassVar[str] = "cgroup_escape"


@dataclass(slots=True)
class HttpCaptureEvent(_Event):
    """Bytes of one call on a connection (see :class:`HttpCaptureRecord`). ``data`` may hold
    credentials: it goes to the request reassembly (:mod:`sensor.httpexchange`) and no further."""

    ktime: int
    cgroup_id: int
    pid: int
    tid: int
    conn: int
    cookie: int
    total: int
    flags: int
    source: int
    data: bytes = field(repr=False, default=b"")
    type_name: ClassVar[str] = "http_capture"

    @property
    def tls(self) -> bool:
        return bool(self.flags & HTTP_F_TLS)

    def to_dict(self) -> dict:
        d = {"type": self.type_name}
        d.update({k: getattr(self, k) for k in ("ktime", "cgroup_id", "pid", "tid", "conn", "cookie",
                                                 "total", "flags", "source")})
        d["len"] = len(self.data)  # the bytes themselves are never serialised
        return d


@dataclass(slots=True)
class HttpConnEvent(_Event):
    ktime: int
    cgroup_id: int
    pid: int
    conn: int
    cookie: int
    fd: int
    family: int  # 4 | 6
    addr: str
    port: int
    tls: bool
    type_name: ClassVar[str] = "http_conn"


@dataclass(slots=True)
class HttpViolationEvent(_Event):
    ktime: int
    cgroup_id: int
    pid: int
    tid: int
    conn: int
    action: str  # alerted | killed
    reason: str
    tls: bool
    comm: str
    method: str
    path: str
    host: str
    type_name: ClassVar[str] = "http_violation"


Event = Union[ExecEvent, ForkEvent, ExitEvent, NetEvent, SyscallFirstEvent,
              EgressViolationEvent, SeccompDenialEvent, ExecFirstEvent, NetFirstEvent,
              DnsMessageEvent, DnsViolationEvent, IoUringOpEvent, CgroupEscapeEvent,
              HttpCaptureEvent, HttpConnEvent, HttpViolationEvent, FileFirstEvent, FileDenialEvent]


@dataclass(frozen=True, slots=True)
class DecodeError:
    """A record that did not decode. ``kind`` is the loss counter it counts against."""

    kind: str  # decode_error | unknown_version | unknown_type
    reason: str
    type: int | None = None
    version: int | None = None


# ---- decoding ---------------------------------------------------------------------------------


def _proto(n: int) -> str:
    return _PROTO_NAMES.get(n, str(n))


def _exec(r: dict, cls=ExecEvent) -> Event:
    argv_raw = r["argv"][: min(r["argv_len"], EXEC_ARGV_LEN)]
    parts = argv_raw.split(b"\0")
    argv = [p.decode("utf-8", "backslashreplace") for p in parts[: r["argc"]]]
    return cls(
        ktime=r["ktime"], pid=r["pid"], ppid=r["ppid"], cgroup_id=r["cgroup_id"],
        filename=_cstr(r["filename"], r["filename_len"]), argv=argv,
        argv_truncated=bool(r["flags"] & EXEC_F_ARGV_TRUNCATED), old_pid=r["old_pid"],
    )


def _exec_first(r: dict) -> Event:
    return _exec(r, ExecFirstEvent)


def _fork(r: dict) -> Event:
    return ForkEvent(ktime=r["ktime"], pid=r["pid"], ppid=r["ppid"], cgroup_id=r["cgroup_id"])


def _exit(r: dict) -> Event:
    code = r["exit_status"] & 0xFF if r["flags"] & EXIT_F_CODE_KNOWN else None
    return ExitEvent(ktime=r["ktime"], pid=r["pid"], cgroup_id=r["cgroup_id"], exit_code=code)


def _net(r: dict) -> Event | DecodeError:
    addr = _addr(r["family"], r["addr"])
    if addr is None:
        return DecodeError("decode_error", f"net event with address family {r['family']}", EV_NET)
    return NetEvent(
        ktime=r["ktime"], pid=r["pid"], cgroup_id=r["cgroup_id"],
        op="connect" if r["op"] == NET_OP_CONNECT else "send", proto=_proto(r["protocol"]),
        family=_family(r["family"]), addr=addr, port=r["port"],
        ret=r["ret"] if r["flags"] & NET_F_RET_KNOWN else None, tid=r["tid"],
    )


def _net_first(r: dict) -> Event | DecodeError:
    addr = _addr(r["family"], r["addr"])
    if addr is None:
        return DecodeError("decode_error", f"net_first event with address family {r['family']}",
                           EV_NET_FIRST)
    return NetFirstEvent(
        ktime=r["ktime"], pid=r["pid"], cgroup_id=r["cgroup_id"],
        op="connect" if r["op"] == NET_OP_CONNECT else "send", proto=_proto(r["protocol"]),
        family=_family(r["family"]), addr=addr, port=r["port"], tid=r["tid"],
    )


def _syscall_first(r: dict) -> Event:
    return SyscallFirstEvent(ktime=r["ktime"], cgroup_id=r["cgroup_id"], nr=r["nr"],
                             name=syscalls.name(r["nr"]), pid=r["pid"])


def _egress(r: dict) -> Event | DecodeError:
    addr = _addr(r["family"], r["addr"])
    if addr is None:
        return DecodeError("decode_error", f"egress event with address family {r['family']}",
                           EV_EGRESS_VIOLATION)
    return EgressViolationEvent(
        ktime=r["ktime"], cgroup_id=r["cgroup_id"], pid=r["pid"],
        op="connect" if r["op"] == EGRESS_OP_CONNECT else "send", proto=_proto(r["protocol"]),
        family=_family(r["family"]), addr=addr, port=r["port"],
        action="denied" if r["action"] == EGRESS_ACTION_DENIED else "alerted",
        tid=r["tid"], comm=_cstr(r["comm"]),
    )


def _seccomp(r: dict) -> Event:
    flags = r["flags"]
    destination = family = None
    if flags & SECCOMP_DENIAL_F_DESTINATION:
        addr = _addr(r["family"], r["addr"])
        if addr is not None:
            family = _family(r["family"])
            destination = f"[{addr}]:{r['port']}" if family == 6 else f"{addr}:{r['port']}"
    return SeccompDenialEvent(ktime=r["ktime"], cgroup_id=r["cgroup_id"], pid=r["pid"],
                              nr=r["nr"], name=syscalls.name(r["nr"]), ret=r["ret"],
                              args=[r["args0"], r["args1"], r["args2"]], tid=r["tid"],
                              comm=_cstr(r["comm"]), counted=bool(flags & SECCOMP_DENIAL_F_COUNTED),
                              context=r["context"], destination=destination, family=family)


def _io_uring_op(r: dict) -> Event:
    op = _cstr(r["op"])
    return IoUringOpEvent(ktime=r["ktime"], cgroup_id=r["cgroup_id"], pid=r["pid"],
                          opcode=r["opcode"], op=op, sq_thread=bool(r["sq_thread"]),
                          syscall=syscalls.io_uring_equivalent(op))


def _cgroup_escape(r: dict) -> Event:
    return CgroupEscapeEvent(ktime=r["ktime"], src_cgroup_id=r["src_cgroup_id"],
                             dst_cgroup_id=r["dst_cgroup_id"], pid=r["pid"], by_pid=r["by_pid"],
                             dst_level=r["dst_level"], dst_path=_cstr(r["dst_path"]))


def _dns_message(r: dict) -> Event | DecodeError:
    peer = _addr(r["family"], r["peer"])
    if peer is None:
        return DecodeError("decode_error", f"dns message with address family {r['family']}",
                           EV_DNS_MESSAGE)
    n = min(r["captured"], DNS_MESSAGE_CAPTURE)
    message, error = None, ""
    try:
        message = dnsmessage.parse(bytes(r["msg"][:n]))
    except dnsmessage.DnsParseError as e:
        error = str(e)
    return DnsMessageEvent(
        ktime=r["ktime"], cgroup_id=r["cgroup_id"],
        direction="answer" if r["direction"] == DNS_DIR_ANSWER else "query",
        proto=_proto(r["protocol"]), family=_family(r["family"]), peer=peer,
        peer_port=r["peer_port"], message=message, error=error,
        captured_all=r["captured"] >= r["msg_len"])


def _dns_violation(r: dict) -> Event:
    n = min(r["name_len"], DNS_VIOLATION_NAME_LEN)
    return DnsViolationEvent(ktime=r["ktime"], cgroup_id=r["cgroup_id"], qtype=r["qtype"],
                             name=_cstr(r["name"], n),
                             action="denied" if r["action"] == EGRESS_ACTION_DENIED else "alerted")


def _http_capture(r: dict) -> Event | DecodeError:
    if r["len"] > HTTP_CAPTURE_MAX:
        return DecodeError("decode_error", f"http capture of {r['len']} bytes", EV_HTTP_CAPTURE)
    return HttpCaptureEvent(
        ktime=r["ktime"], cgroup_id=r["cgroup_id"], pid=r["pid"], tid=r["tid"], conn=r["conn"],
        cookie=r["cookie"], total=r["total"], flags=r["flags"], source=r["source"],
        data=bytes(r["data"][: r["len"]]),
    )


def _http_conn(r: dict) -> Event | DecodeError:
    addr = _addr(r["family"], r["addr"])
    if addr is None:
        return DecodeError("decode_error", f"http conn with address family {r['family']}", EV_HTTP_CONN)
    return HttpConnEvent(ktime=r["ktime"], cgroup_id=r["cgroup_id"], pid=r["pid"], conn=r["conn"],
                         cookie=r["cookie"], fd=r["fd"], family=_family(r["family"]), addr=addr,
                         port=r["port"], tls=bool(r["flags"] & HTTP_F_TLS))


def _http_violation(r: dict) -> Event:
    text = r["text"][: min(r["len"], HTTP_VIOLATION_TEXT)].decode("latin-1")
    line, _, host = text.partition("\n")
    method, _, path = line.partition(" ")
    return HttpViolationEvent(
        ktime=r["ktime"], cgroup_id=r["cgroup_id"], pid=r["pid"], tid=r["tid"], conn=r["conn"],
        action="killed" if r["action"] == HTTP_ACTION_KILLED else "alerted",
        reason=HTTP_REASONS.get(r["reason"], f"reason {r['reason']}"), tls=bool(r["flags"] & HTTP_F_TLS),
        comm=_cstr(r["comm"]), method=method, path=path, host=host,
    )


def _file_path(r: dict) -> str:
    return _cstr(r["path"], min(r["path_len"], FILE_PATH_LEN))


def _file_first(r: dict) -> Event:
    return FileFirstEvent(ktime=r["ktime"], cgroup_id=r["cgroup_id"], pid=r["pid"], access=r["access"],
                          path=_file_path(r), key_pid=r["key_pid"], dirfd=r["dirfd"], nr=r["nr"],
                          syscall=syscalls.name(r["nr"]), truncated=bool(r["flags"] & FILE_F_TRUNCATED),
                          path_hash=r["path_hash"])


def _file_denial(r: dict) -> Event:
    return FileDenialEvent(ktime=r["ktime"], cgroup_id=r["cgroup_id"], pid=r["pid"], tid=r["tid"],
                           access=r["access"], path=_file_path(r), dirfd=r["dirfd"], nr=r["nr"],
                           syscall=syscalls.name(r["nr"]), ret=r["ret"],
                           truncated=bool(r["flags"] & FILE_F_TRUNCATED), comm=_cstr(r["comm"]))


_BUILD = {
    EV_EXEC: _exec, EV_FORK: _fork, EV_EXIT: _exit, EV_NET: _net,
    EV_SYSCALL_FIRST: _syscall_first, EV_EGRESS_VIOLATION: _egress, EV_SECCOMP_DENIAL: _seccomp,
    EV_EXEC_FIRST: _exec_first, EV_NET_FIRST: _net_first,
    EV_DNS_MESSAGE: _dns_message, EV_DNS_VIOLATION: _dns_violation,
    EV_IO_URING_OP: _io_uring_op, EV_CGROUP_ESCAPE: _cgroup_escape,
    EV_HTTP_CAPTURE: _http_capture, EV_HTTP_CONN: _http_conn, EV_HTTP_VIOLATION: _http_violation,
    EV_FILE_FIRST: _file_first, EV_FILE_DENIAL: _file_denial,
}
_HDR_STRUCT = struct.Struct("<HHIQ")


def decode(data: bytes | bytearray | memoryview) -> Event | DecodeError:
    """Decode one ring-buffer record. Pure: bytes in, an event or a :class:`DecodeError` out."""
    try:
        n = len(data)
        if n < _HDR_STRUCT.size:
            return DecodeError("decode_error", f"record of {n} bytes is shorter than a header")
        etype, version, size, _ = _HDR_STRUCT.unpack_from(data, 0)
        rec = RECORDS.get(etype)
        if rec is None:
            return DecodeError("unknown_type", f"unknown event type {etype}", etype, version)
        if version != rec.version:
            return DecodeError("unknown_version",
                               f"{TYPE_NAMES[etype]} version {version}, expected {rec.version}",
                               etype, version)
        head = getattr(rec, "head", None)
        if head is not None:  # variable length: a fixed head, then hdr.size - head bytes
            if not head <= size <= rec.size() or n < size:
                return DecodeError("decode_error",
                                   f"{TYPE_NAMES[etype]} record: header size {size}, {n} bytes "
                                   f"received, expected {head}..{rec.size()}", etype, version)
            data = bytes(data[:size]) + bytes(rec.size() - size)
        elif size != rec.size() or n < rec.size():
            return DecodeError("decode_error",
                               f"{TYPE_NAMES[etype]} record: header size {size}, {n} bytes "
                               f"received, expected {rec.size()}", etype, version)
        return _BUILD[etype](rec.unpack(data))
    except Exception as e:  # noqa: BLE001 - a decoder never raises into the poll loop
        return DecodeError("decode_error", f"{type(e).__name__}: {e}")


# ---- the kernel's behaviour counter tables ---------------------------------------------------


_NET_KEY = NetCountKey._struct
_EXEC_KEY = ExecCountKey._struct


def net_count_behaviour(raw: bytes) -> tuple[int, str | None]:
    """``(cgroup id, behaviour key)`` of a ``net_counts`` key; the key is None for a protocol
    other than TCP and UDP (an ICMP socket's connect, say) or an unknown family. Pure."""
    cg, addr_raw, port, family, protocol, op, _ = _NET_KEY.unpack_from(raw)
    addr = _addr(family, addr_raw)
    proto = _proto(protocol)
    if addr is None or proto not in ("tcp", "udp"):
        return cg, None
    return cg, net_key("connect" if op == NET_OP_CONNECT else "send", proto, addr, port)


def exec_count_behaviour(raw: bytes) -> tuple[int, str | None]:
    """``(cgroup id, behaviour key)`` of an ``exec_counts`` key. Pure."""
    cg, path = _EXEC_KEY.unpack_from(raw)
    name = _cstr(path)
    return cg, exec_key(name) if name else None


class Decoder:
    """:func:`decode` plus counters of what did not decode, by kind."""

    KINDS = ("decode_error", "unknown_version", "unknown_type")

    def __init__(self) -> None:
        self.errors: dict[str, int] = {k: 0 for k in self.KINDS}
        self.last_error: DecodeError | None = None

    def decode(self, data) -> Event | None:
        ev = decode(data)
        if isinstance(ev, DecodeError):
            self.errors[ev.kind] = self.errors.get(ev.kind, 0) + 1
            self.last_error = ev
            return None
        return ev
