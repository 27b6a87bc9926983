"""Python mirrors of the structs in ``bpf/*.h`` that are map keys and values, and the
:class:`Mirror` base every mirror (ring-buffer records included, see :mod:`sensor.events`) uses.

Each class pastes its C struct into the docstring and spells out every padding byte as a field,
in the style of pyroute2's netlink message classes, so a layout change shows up as a size or
field mismatch in ``tests/unit/test_bpf_headers.py``, which parses the headers without a
compiler. Encoding and decoding use the ``struct`` module; nothing here imports bcc.
"""

from __future__ import annotations

import struct
from typing import ClassVar

SYSCALL_NR_SLOTS = 512  # bpf/events.h
SYSCALL_BANKS = 2  # counters before (0) and from (1) a cgroup's first exec
EXEC_FILENAME_LEN = 256  # bpf/events.h (also the exec_count_key path)
LOSS_RESERVE_TYPES = 16  # bpf/events.h: loss indexes below it are reserve failures by event type
COUNT_F_ANNOUNCED = 0x1
SKETCH_REGISTERS = 128
SKETCH_INDEX_BITS = 7
EGRESS_MAX_RANGES = 4  # bpf/egress.h default
EGRESS_INLINE_PORTS = 8
EGRESS_PORTS_ANY = 0x1
EGRESS_PORTS_MORE = 0x2
EGRESS_NAME_LEN = 256
EGRESS_NAME_EXACT = 0
EGRESS_NAME_SUFFIX = 1
EGRESS_DNS_STATS = 8
EGRESS_FAMILY_V4 = 4
EGRESS_FAMILY_V6 = 6
EGRESS_MODE_OBSERVE = 0
EGRESS_MODE_ALERT = 1
EGRESS_MODE_ENFORCE = 2
EGRESS_WORKLOAD_LEN = 192
EGRESS_CGROUP_PATH_LEN = 248
DENIALS_NR_SLOTS = 512
DENIALS_MODE_ALERT = 1
DENIALS_MODE_ENFORCE = 2
DENIALS_MODE_WATCH = 0
DENIAL_F_SOCKETS = 0x1
DENIAL_KIND_DENIED = 1
DENIAL_KIND_ALERTED = 2
DENIALS_LOST_RINGBUF = 0
DENIALS_LOST_COUNTS_FULL = 1
DENIALS_LOST_SLOTS = 2
CAPS_F_REFUSED = 1  # bpf/capabilities.h
CAPS_F_AFTER_EXEC = 2
CAPS_STAT_MAP_FULL = 0
CAPS_STAT_UNKNOWN_CAP = 1
CAPS_STAT_OVERCOMMIT = 2
CAPS_STAT_STACK_WALKS = 3
CAPS_STAT_SLOTS = 4
HTTP_METHOD_MAX = 16  # bpf/http.h: what the probe compares of a request
HTTP_HOST_MAX = 128
HTTP_SEGMENT_MAX = 64
HTTP_SEGMENTS_MAX = 16
HTTP_PATH_SCAN = 512
HTTP_HOST_SCAN = 1024
HTTP_EDGE_TEXT = 160
HTTP_RESPONSE_MAX = 256
HTTP_MODE_OBSERVE = 0
HTTP_MODE_ALERT = 1
HTTP_MODE_ENFORCE = 2
HTTP_EDGE_ID = 0xFFFFFFFF
HTTP_EDGE_ANY = 0xFFFFFFFE
HTTP_EDGE_END = 0xFFFFFFFD
HTTP_LOSS_RING_CAPTURE = 0
HTTP_LOSS_RING_CONN = 1
HTTP_LOSS_RING_VIOLATION = 2
HTTP_LOSS_READ = 3
HTTP_LOSS_IOV = 4
HTTP_LOSS_SLOTS = 8
HTTP_C_DIGIT = 0x1
HTTP_C_HEX = 0x2
HTTP_C_ALPHA = 0x4
HTTP_C_DASH = 0x8
HTTP_C_UNDER = 0x10
HTTP_C_OTHER = 0x20
HTTP_C_SLASH = 0x40
HTTP_C_END = 0x80
FILE_PATH_LEN = 256  # bpf/events.h
FILE_LOSS_RINGBUF_FIRST = 0  # bpf/files.h
FILE_LOSS_RINGBUF_DENIAL = 1
FILE_LOSS_MAP_FULL = 2
FILE_LOSS_PATH_UNREADABLE = 3
FILE_LOSS_PATH_TRUNCATED = 4
FILE_LOSS_CGROUP_OVERFLOW = 5
FILE_LOSS_SLOTS = 8
FILE_WATCH_ENFORCE = 2


class Mirror:
    """A C struct as a list of ``(name, struct format)`` fields, little-endian, no implicit
    padding: holes are fields named ``pad*`` so a layout change shows up as a size mismatch."""

    fields: ClassVar[tuple[tuple[str, str], ...]] = ()
    c_name: ClassVar[str] = ""
    _struct: ClassVar[struct.Struct]
    _names: ClassVar[tuple[str, ...]]

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls._struct = struct.Struct("<" + "".join(f for _, f in cls.fields))
        cls._names = tuple(n for n, _ in cls.fields)

    @classmethod
    def size(cls) -> int:
        return cls._struct.size

    @classmethod
    def unpack(cls, buf, offset: int = 0) -> dict:
        return dict(zip(cls._names, cls._struct.unpack_from(buf, offset)))

    @classmethod
    def pack(cls, **values) -> bytes:
        """Encode (tests and golden files); missing fields are zero."""
        out = []
        for n, f in cls.fields:
            v = values.get(n)
            if v is None:
                v = b"" if f.endswith("s") else 0
            out.append(v)
        return cls._struct.pack(*out)


    @classmethod
    def unpack_tuple(cls, buf, offset: int = 0) -> tuple:
        return cls._struct.unpack_from(buf, offset)

    @classmethod
    def pack_tuple(cls, *values) -> bytes:
        return cls._struct.pack(*values)


# ---- bpf/events.h: the sensor's syscall counter tables -----------------------------------------


class SyscallSlotState(Mirror):
    """Owner and first-seen bitmap of one cgroup slot (not a ring-buffer record).

    struct syscall_slot_state {
        __u64 cgroup_id;                   /* owner of the slot; 0 while free */
        __u64 seen[SYSCALL_NR_SLOTS / 64]; /* first-seen bitmap by syscall number */
        __u32 bank;                        /* 1 once a task of the cgroup has exec'd */
        __u32 pad;
    };
    """

    c_name = "syscall_slot_state"
    fields = ((("cgroup_id", "Q"),) + tuple((f"seen{i}", "Q") for i in range(SYSCALL_NR_SLOTS // 64))
              + (("bank", "I"), ("pad", "I")))


class SyscallSlotCounts(Mirror):
    """Per-CPU syscall counters of one cgroup slot (not a ring-buffer record).

    struct syscall_slot_counts {
        __u64 count[SYSCALL_BANKS * SYSCALL_NR_SLOTS]; /* bank b, nr n at count[b * 512 + n] */
    };
    """

    c_name = "syscall_slot_counts"
    fields = tuple((f"count{i}", "Q") for i in range(SYSCALL_BANKS * SYSCALL_NR_SLOTS))


# ---- bpf/events.h: the sensor's behaviour counter tables ---------------------------------------


class NetCountKey(Mirror):
    """Key of ``net_counts``: one network destination of one cgroup.

    struct net_count_key {
        __u64 cgroup_id; /*  0 */
        __u8 addr[16];   /*  8 network order; IPv4 in addr[0..3] */
        __u16 port;      /* 24 host order */
        __u8 family;     /* 26 ENV_AF_* */
        __u8 protocol;   /* 27 IPPROTO_* */
        __u8 op;         /* 28 NET_OP_* */
        __u8 pad[3];     /* 29 zero */
    };
    """

    c_name = "net_count_key"
    fields = (("cgroup_id", "Q"), ("addr", "16s"), ("port", "H"), ("family", "B"),
              ("protocol", "B"), ("op", "B"), ("pad", "3s"))


class ExecCountKey(Mirror):
    """Key of ``exec_counts``: one exec path of one cgroup.

    struct exec_count_key {
        __u64 cgroup_id;              /*   0 */
        char path[EXEC_FILENAME_LEN]; /*   8 as passed to execve; NUL-padded (zero to the end) */
    };
    """

    c_name = "exec_count_key"
    fields = (("cgroup_id", "Q"), ("path", f"{EXEC_FILENAME_LEN}s"))


class BehaviourCount(Mirror):
    """Value of ``net_counts`` and ``exec_counts``.

    struct behaviour_count {
        __u64 count;    /*  0 occurrences, cumulative */
        __u64 first_ns; /*  8 ktime of the first */
        __u64 last_ns;  /* 16 ktime of the latest */
        __u64 flags;    /* 24 COUNT_F_* */
    };
    """

    c_name = "behaviour_count"
    fields = (("count", "Q"), ("first_ns", "Q"), ("last_ns", "Q"), ("flags", "Q"))


class BehaviourSlot(Mirror):
    """One cgroup slot's entries in the behaviour tables and what it did beyond its caps.

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
    """

    c_name = "behaviour_slot"
    fields = (("net_entries", "Q"), ("exec_entries", "Q"), ("net_dropped", "Q"),
              ("exec_dropped", "Q"), ("net_dropped_first_ns", "Q"), ("net_dropped_last_ns", "Q"),
              ("exec_dropped_first_ns", "Q"), ("exec_dropped_last_ns", "Q"),
              ("net_sketch", f"{SKETCH_REGISTERS}s"), ("exec_sketch", f"{SKETCH_REGISTERS}s"))


class SlotLoss(Mirror):
    """Per-CPU ring-buffer reserve failures of one cgroup slot, by event type (the index of
    ``loss_counts``): the part of the node-wide loss that belongs to that cgroup.

    struct slot_loss {
        __u64 reserve_failed[LOSS_RESERVE_TYPES]; /* 0 */
    };
    """

    c_name = "slot_loss"
    fields = tuple((f"reserve_failed{i}", "Q") for i in range(LOSS_RESERVE_TYPES))


# ---- bpf/egress.h ------------------------------------------------------------------------------


class EgressKey4(Mirror):
    """Key of the ``rules4_<gen>`` LPM tries.

    struct egress_key4 {
        __u32 prefixlen; /* 0 */
        __u8 addr[4];    /* 4 */
    };
    """

    c_name = "egress_key4"
    fields = (("prefixlen", "I"), ("addr", "4s"))


class EgressKey6(Mirror):
    """Key of the ``rules6_<gen>`` LPM tries.

    struct egress_key6 {
        __u32 prefixlen; /* 0 */
        __u8 addr[16];   /* 4 */
    };
    """

    c_name = "egress_key6"
    fields = (("prefixlen", "I"), ("addr", "16s"))


def _ports_fields(prefix: str, max_ranges: int) -> tuple:
    return ((f"{prefix}rule_id", "I"), (f"{prefix}flags", "B"), (f"{prefix}nports", "B"),
            (f"{prefix}nranges", "B"), (f"{prefix}pad", "B")) \
        + tuple((f"{prefix}ports{i}", "H") for i in range(EGRESS_INLINE_PORTS)) \
        + tuple(x for i in range(max_ranges)
                    for x in ((f"{prefix}ranges{i}.lo", "H"), (f"{prefix}ranges{i}.hi", "H")))


class EgressPorts(Mirror):
    """The ports one protocol may reach at a trie entry, at the default ``EGRESS_MAX_RANGES``
    (4); other sizes come from :func:`egress_ports_format`.

    struct egress_port_range {
        __u16 lo; /* 0 inclusive */
        __u16 hi; /* 2 inclusive */
    };
    struct egress_ports {
        __u32 rule_id;                          /*  0 generation << 24 | index; keys `ports` */
        __u8 flags;                             /*  4 EGRESS_PORTS_* */
        __u8 nports;                            /*  5 inline exact ports used */
        __u8 nranges;                           /*  6 ranges used */
        __u8 pad;                               /*  7 */
        __u16 ports[EGRESS_INLINE_PORTS];       /*  8 */
        struct egress_port_range ranges[EGRESS_MAX_RANGES]; /* 24 */
    };
    """

    c_name = "egress_ports"
    fields = _ports_fields("", EGRESS_MAX_RANGES)


def egress_ports_format(max_ranges: int) -> str:
    """struct egress_ports compiled with ``-DEGRESS_MAX_RANGES=max_ranges``, as a struct format
    without byte order."""
    return "IBBBB" + "H" * EGRESS_INLINE_PORTS + "HH" * max_ranges


class EgressRule(Mirror):
    """Value of the address tries: TCP and UDP ports of one prefix.

    struct egress_rule {
        struct egress_ports tcp; /* 0 */
        struct egress_ports udp; /* EGRESS_PORTS_SIZE */
    };
    """

    c_name = "egress_rule"
    fields = _ports_fields("tcp.", EGRESS_MAX_RANGES) + _ports_fields("udp.", EGRESS_MAX_RANGES)


def egress_rule_struct(max_ranges: int) -> struct.Struct:
    """struct egress_rule compiled with ``-DEGRESS_MAX_RANGES=max_ranges``."""
    return struct.Struct("<" + egress_ports_format(max_ranges) * 2)


class EgressPortKey(Mirror):
    """Key of the ``ports`` hash (value: one byte, 1).

    struct egress_port_key {
        __u32 rule_id; /* 0 */
        __u16 port;    /* 4 */
        __u16 pad;     /* 6 */
    };
    """

    c_name = "egress_port_key"
    fields = (("rule_id", "I"), ("port", "H"), ("pad", "H"))


class EgressNameKey(Mirror):
    """Key of the ``names_<gen>`` LPM tries: a name written backwards.

    struct egress_name_key {
        __u32 prefixlen;             /*   0 bits */
        char name[EGRESS_NAME_LEN];  /*   4 reversed, NUL-terminated for exact names */
    };
    """

    c_name = "egress_name_key"
    fields = (("prefixlen", "I"), ("name", f"{EGRESS_NAME_LEN}s"))


class EgressNameRule(Mirror):
    """Value of the name tries.

    struct egress_name_rule {
        struct egress_ports tcp; /* 0 */
        struct egress_ports udp; /* EGRESS_PORTS_SIZE */
        __u32 name_id;           /* generation << 24 | index of the name entry */
        __u8 kind;               /* EGRESS_NAME_* */
        __u8 max_labels;         /* a suffix pattern: labels allowed in front of it (>= 1) */
        __u16 base_labels;       /* labels of a suffix pattern's suffix (svc.example.com: 3) */
    };
    """

    c_name = "egress_name_rule"
    fields = (_ports_fields("tcp.", EGRESS_MAX_RANGES) + _ports_fields("udp.", EGRESS_MAX_RANGES)
              + (("name_id", "I"), ("kind", "B"), ("max_labels", "B"), ("base_labels", "H")))


def egress_name_rule_struct(max_ranges: int) -> struct.Struct:
    """struct egress_name_rule compiled with ``-DEGRESS_MAX_RANGES=max_ranges``."""
    return struct.Struct("<" + egress_ports_format(max_ranges) * 2 + "IBBH")


class EgressLearnedKey(Mirror):
    """Key of the ``learned`` LRU hash.

    struct egress_learned_key {
        __u64 cgroup_id; /*  0 the socket's cgroup */
        __u8 family;     /*  8 EGRESS_FAMILY_* */
        __u8 proto;      /*  9 IPPROTO_TCP or IPPROTO_UDP */
        __u16 port;      /* 10 an exact port, or 0 for the ranges */
        __u32 pad;       /* 12 */
        __u8 addr[16];   /* 16 */
    };
    """

    c_name = "egress_learned_key"
    fields = (("cgroup_id", "Q"), ("family", "B"), ("proto", "B"), ("port", "H"), ("pad", "I"),
              ("addr", "16s"))


class EgressLearned(Mirror):
    """Value of ``learned``, at the default ``EGRESS_MAX_RANGES``.

    struct egress_learned {
        __u64 expires_ns;  /*  0 coarse ktime: answer received + TTL + grace */
        __u64 learned_ns;  /*  8 coarse ktime the answer was received */
        __u32 name_id;     /* 16 the name entry that allowed it */
        __u32 ttl;         /* 20 seconds, as answered */
        __u8 flags;        /* 24 EGRESS_PORTS_ANY for port 0 */
        __u8 nranges;      /* 25 */
        __u16 pad;         /* 26 */
        __u32 pad2;        /* 28 */
        struct egress_port_range ranges[EGRESS_MAX_RANGES]; /* 32 */
    };
    """

    c_name = "egress_learned"
    fields = ((("expires_ns", "Q"), ("learned_ns", "Q"), ("name_id", "I"), ("ttl", "I"),
               ("flags", "B"), ("nranges", "B"), ("pad", "H"), ("pad2", "I"))
              + tuple(x for i in range(EGRESS_MAX_RANGES)
                      for x in ((f"ranges{i}.lo", "H"), (f"ranges{i}.hi", "H"))))


class EgressMeta(Mirror):
    """The one entry of ``meta``: which workload and policy a pinned set enforces.

    struct egress_meta {
        __u8 policy_hash[32];               /*   0 sha256 of the policy's canonical JSON */
        char workload[EGRESS_WORKLOAD_LEN]; /*  32 NUL-padded workload key (truncated) */
        __u64 applied_ns;                   /* 224 wall clock of the last rule swap */
        __u32 rules;                        /* 232 trie entries of the active generation */
        __u32 generation_count;             /* 236 */
    };
    """

    c_name = "egress_meta"
    fields = (("policy_hash", "32s"), ("workload", f"{EGRESS_WORKLOAD_LEN}s"),
              ("applied_ns", "Q"), ("rules", "I"), ("generation_count", "I"))


class EgressCgroup(Mirror):
    """Value of ``cgroups`` (keyed by the u64 cgroup id): where a set is attached.

    struct egress_cgroup {
        char path[EGRESS_CGROUP_PATH_LEN]; /*   0 NUL-padded, the tail kept when too long */
        __u64 attached_ns;                 /* 248 wall clock */
    };
    """

    c_name = "egress_cgroup"
    fields = (("path", f"{EGRESS_CGROUP_PATH_LEN}s"), ("attached_ns", "Q"))


# ---- bpf/denials.h -----------------------------------------------------------------------------


class DenialCgroup(Mirror):
    """Value of the denial probe's ``cgroups`` hash (keyed by the u64 cgroup id).

    struct denial_cgroup {
        __u32 mode;                           /*  0 DENIALS_MODE_* */
        __s32 deny_errno;                     /*  4 the filter's errno in enforce mode */
        __u64 allowed[DENIALS_NR_SLOTS / 64]; /*  8 alert mode: syscalls the policy allows */
        __u64 uring_seen[4];                  /* 72 io_uring opcodes already announced (set by BPF) */
        __u32 flags;                          /* 104 DENIAL_F_* */
        __u32 pad;                            /* 108 */
    };
    """

    c_name = "denial_cgroup"
    fields = ((("mode", "I"), ("deny_errno", "i"))
              + tuple((f"allowed{i}", "Q") for i in range(DENIALS_NR_SLOTS // 64))
              + tuple((f"uring_seen{i}", "Q") for i in range(4)) + (("flags", "I"), ("pad", "I")))


class DenialThread(Mirror):
    """Value of the denial probe's ``entered`` LRU hash (keyed by the u32 thread id).

    struct denial_thread {
        __u32 nr;        /*  0 */
        __u32 pad;       /*  4 */
        __u64 cgroup_id; /*  8 */
    };
    """

    c_name = "denial_thread"
    fields = (("nr", "I"), ("pad", "I"), ("cgroup_id", "Q"))


class DenialKey(Mirror):
    """Key of the denial probe's ``counts`` hash.

    struct denial_key {
        __u64 cgroup_id; /*  0 */
        __u32 pid;       /*  8 thread group */
        __u32 nr;        /* 12 syscall number */
        __u32 context;   /* 16 hash of the destination a network call named, else 0 */
        __u32 kind;      /* 20 DENIAL_KIND_* */
    };
    """

    c_name = "denial_key"
    fields = (("cgroup_id", "Q"), ("pid", "I"), ("nr", "I"), ("context", "I"), ("kind", "I"))


class DenialCount(Mirror):
    """Value of ``counts``.

    struct denial_count {
        __u64 count;      /* 0 */
        __u64 last_ktime; /* 8 */
    };
    """

    c_name = "denial_count"
    fields = (("count", "Q"), ("last_ktime", "Q"))



# ---- bpf/capabilities.h ------------------------------------------------------------------------


class CapKey(Mirror):
    """Key of ``cap_counts``: one cgroup, one capability, granted or refused, before or after the
    cgroup's first exec.

    struct cap_key {
        __u64 cgroup_id; /*  0 */
        __u32 cap;       /*  8 capability number (0..CAPS_LAST_CAP) */
        __u32 flags;     /* 12 CAPS_F_* */
    };
    """

    c_name = "cap_key"
    fields = (("cgroup_id", "Q"), ("cap", "I"), ("flags", "I"))


class CapCount(Mirror):
    """Value of ``cap_counts``: cumulative, never drained.

    struct cap_count {
        __u64 count;    /*  0 */
        __u64 first_ns; /*  8 bpf_ktime_get_ns() of the first check */
        __u64 last_ns;  /* 16 of the latest */
    };
    """

    c_name = "cap_count"
    fields = (("count", "Q"), ("first_ns", "Q"), ("last_ns", "Q"))
# ---- bpf/http.h -------------------------------------------------------------------------------


class HttpCgroup(Mirror):
    """Value of the request capture's ``cgroups`` hash (keyed by the u64 cgroup id).

    struct http_cgroup {
        __u32 mode; /*  0 HTTP_MODE_* */
        __u32 root; /*  4 root state of the rule graph; 0: no rules (every request is outside) */
        __u32 gen;  /*  8 rule generation, for userspace */
        __u32 pad;  /* 12 */
    };
    """

    c_name = "http_cgroup"
    fields = (("mode", "I"), ("root", "I"), ("gen", "I"), ("pad", "I"))


class HttpSockKey(Mirror):
    """Key of ``sockets``: (process, fd) of a TCP socket a watched process connected.

    struct http_sock_key {
        __u32 tgid; /* 0 */
        __u32 fd;   /* 4 */
    };
    """

    c_name = "http_sock_key"
    fields = (("tgid", "I"), ("fd", "I"))


class HttpSock(Mirror):
    """Value of ``sockets``.

    struct http_sock {
        __u64 cookie;  /*  0 socket cookie */
        __u16 family;  /*  8 ENV_AF_* */
        __u16 port;    /* 10 host order */
        __u32 flags;   /* 12 HTTP_SOCK_* */
        __u8 addr[16]; /* 16 network order */
    };
    """

    c_name = "http_sock"
    fields = (("cookie", "Q"), ("family", "H"), ("port", "H"), ("flags", "I"), ("addr", "16s"))


class HttpConnKey(Mirror):
    """Key of ``conns``.

    struct http_conn_key {
        __u64 id;   /* 0 SSL object or socket cookie */
        __u32 tgid; /* 8 the process (an SSL object's address is its own) */
        __u32 tls;  /* 12 1 for SSL objects */
    };
    """

    c_name = "http_conn_key"
    fields = (("id", "Q"), ("tgid", "I"), ("tls", "I"))


class HttpConn(Mirror):
    """Value of ``conns``: the parse state of a connection.

    struct http_conn {
        __u32 state;     /*  0 HTTP_CONN_* */
        __u32 budget;    /*  4 body bytes still to capture for the current request */
        __u32 body_left; /*  8 body bytes the current request still declares (Content-Length) */
        __u32 flags;     /* 12 HTTP_CONN_* flags */
        __u64 cookie;    /* 16 the socket, when known */
        __u32 resp_pos;  /* 24 bytes of the current answer seen, up to its status code */
        __u32 resp_tail; /* 28 its last four bytes, while in the head of a 1xx answer */
    };
    """

    c_name = "http_conn"
    fields = (("state", "I"), ("budget", "I"), ("body_left", "I"), ("flags", "I"), ("cookie", "Q"),
              ("resp_pos", "I"), ("resp_tail", "I"))


class HttpSslCall(Mirror):
    """Value of ``ssl_calls`` (keyed by thread id): the SSL_* call a thread is in.

    struct http_ssl_call {
        __u64 ssl;   /*  0 the SSL object */
        __u64 buf;   /*  8 SSL_read*: the buffer */
        __u64 out;   /* 16 SSL_read_ex: where it stores the byte count; 0 for SSL_read */
        __u32 kind;  /* 24 HTTP_SSL_* */
        __u32 depth; /* 28 nested SSL_* calls of the same thread (SSL_write -> SSL_do_handshake) */
    };
    """

    c_name = "http_ssl_call"
    fields = (("ssl", "Q"), ("buf", "Q"), ("out", "Q"), ("kind", "I"), ("depth", "I"))


class HttpCtab(Mirror):
    """The one entry of ``ctab``: what the path scan needs to know of each character.

    struct http_ctab {
        __u8 c[256]; /* 0 */
    };
    """

    c_name = "http_ctab"
    fields = (("c", "256s"),)


class HttpEdgeKey(Mirror):
    """Key of ``edges`` (value: the next state, u32): the rule graph.

    struct http_edge_key {
        __u32 state;               /*   0 */
        __u32 len;                 /*   4 bytes in text, or HTTP_EDGE_* */
        char text[HTTP_EDGE_TEXT]; /*   8 */
    };
    """

    c_name = "http_edge_key"
    fields = (("state", "I"), ("len", "I"), ("text", f"{HTTP_EDGE_TEXT}s"))


# ---- bpf/files.h -------------------------------------------------------------------------------


class FileKey(Mirror):
    """Key of ``file_counts``: one access pattern to one path by one cgroup.

    struct file_key {
        __u64 cgroup_id; /*  0 */
        __u32 access;    /*  8 FILE_ACC_* */
        __u32 pid;       /* 12 0 for an absolute path */
        __s32 dirfd;     /* 16 FILE_DIRFD_ABSOLUTE, FILE_AT_FDCWD or a directory fd */
        __u32 pad;       /* 20 */
        __u64 path_hash; /* 24 keyed hash of the path as given */
    };
    """

    c_name = "file_key"
    fields = (("cgroup_id", "Q"), ("access", "I"), ("pid", "I"), ("dirfd", "i"), ("pad", "I"),
              ("path_hash", "Q"))


class FileCount(Mirror):
    """Value of ``file_counts``: cumulative, never drained, and the path.

    struct file_count {
        __u64 count;              /*  0 */
        __u64 first_ns;           /*  8 bpf_ktime_get_ns() of the first access */
        __u64 last_ns;            /* 16 and of the latest */
        __u16 path_len;           /* 24 bytes in path, without the NUL */
        __u16 flags;              /* 26 FILE_F_* */
        __u32 pad;                /* 28 */
        char path[FILE_PATH_LEN]; /* 32 as the process gave it */
    };
    """

    c_name = "file_count"
    fields = (("count", "Q"), ("first_ns", "Q"), ("last_ns", "Q"), ("path_len", "H"), ("flags", "H"),
              ("pad", "I"), ("path", f"{FILE_PATH_LEN}s"))


class FileCgroup(Mirror):
    """Value of ``file_cgroups`` (keyed by the u64 cgroup id).

    struct file_cgroup {
        __u32 keys;     /*  0 keys in file_counts */
        __u32 pad;      /*  4 */
        __u64 overflow; /*  8 accesses with a new key refused at FILES_PER_CGROUP */
    };
    """

    c_name = "file_cgroup"
    fields = (("keys", "I"), ("pad", "I"), ("overflow", "Q"))


class FileWatch(Mirror):
    """Value of ``watched`` (denial role, keyed by the u64 cgroup id).

    struct file_watch {
        __u32 mode; /* 0 FILE_WATCH_* */
        __u32 pad;  /* 4 */
    };
    """

    c_name = "file_watch"
    fields = (("mode", "I"), ("pad", "I"))


#: Every map-layout mirror, by header.
MAP_MIRRORS = {
    "events.h": (SyscallSlotState, SyscallSlotCounts, NetCountKey, ExecCountKey, BehaviourCount,
                 BehaviourSlot, SlotLoss),
    "egress.h": (EgressKey4, EgressKey6, EgressPorts, EgressRule, EgressPortKey, EgressNameKey,
                 EgressNameRule, EgressLearnedKey, EgressLearned, EgressMeta, EgressCgroup),
    "denials.h": (DenialCgroup, DenialThread, DenialKey, DenialCount),
    "capabilities.h": (CapKey, CapCount),
    "http.h": (HttpCgroup, HttpSockKey, HttpSock, HttpConnKey, HttpConn, HttpSslCall, HttpCtab, HttpEdgeKey),
    "files.h": (FileKey, FileCount, FileCgroup, FileWatch),
}
U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")
