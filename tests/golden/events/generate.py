"""Writes the golden ring-buffer records: ``<name>.hex`` (annotated bytes) and ``<name>.json``
(the event the decoder must produce). The bytes are laid out here field by field from the C
offsets in bpf/events.h, independently of sensor/events.py. Run from the repository root:
``python tests/golden/events/generate.py``; review the diff before committing."""

import json
import socket
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
KTIME = 1_234_567_890_123


def hdr(t, size, version=1):
    return [("hdr.type", struct.pack("<H", t)), ("hdr.version", struct.pack("<H", version)),
            ("hdr.size", struct.pack("<I", size)), ("hdr.ktime", struct.pack("<Q", KTIME))]


def cstr(s: bytes, n: int) -> bytes:
    return s + b"\0" * (n - len(s))


def write(name, fields, expected):
    data = b"".join(v for _, v in fields)
    lines = [f"# {name}: {len(data)} bytes; '#' starts a comment, offsets in decimal"]
    off = 0
    for label, v in fields:
        for i in range(0, len(v), 16):
            chunk = v[i:i + 16]
            if i and not chunk.strip(b"\0") and not v[i:].strip(b"\0"):
                lines.append(f"{' '.join(['00'] * 16)}  # {off + i}: {label} (zero to the end: "
                             f"{len(v) - i} bytes)".replace(" ".join(["00"] * 16),
                                                            f"00*{len(v) - i}"))
                break
            tag = label if i == 0 else f"{label} +{i}"
            lines.append(f"{chunk.hex(' '):<47}  # {off + i}: {tag}")
        off += len(v)
    (HERE / f"{name}.hex").write_text("\n".join(lines) + "\n")
    (HERE / f"{name}.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")


argv = b"/usr/bin/git\0clone\0https://example.com/r.git\0"
write("exec", hdr(1, 560) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("pid", struct.pack("<I", 1001)),
    ("ppid", struct.pack("<I", 1000)), ("old_pid", struct.pack("<I", 1003)),
    ("filename_len", struct.pack("<H", 12)), ("argv_len", struct.pack("<H", len(argv))),
    ("argc", struct.pack("<I", 3)), ("flags", struct.pack("<I", 0x1)),
    ("filename", cstr(b"/usr/bin/git", 256)), ("argv", cstr(argv, 256)),
], {"type": "exec", "ktime": KTIME, "pid": 1001, "ppid": 1000, "cgroup_id": 4242,
    "filename": "/usr/bin/git", "argv": ["/usr/bin/git", "clone", "https://example.com/r.git"],
    "argv_truncated": True, "old_pid": 1003, "behaviour_key": "exec:/usr/bin/git"})

write("fork", hdr(2, 40) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("pid", struct.pack("<I", 1002)),
    ("ppid", struct.pack("<I", 1001)), ("parent_tid", struct.pack("<I", 1001)),
    ("pad", struct.pack("<I", 0)),
], {"type": "fork", "ktime": KTIME, "pid": 1002, "ppid": 1001, "cgroup_id": 4242,
    "behaviour_key": None})

write("exit", hdr(3, 40) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("pid", struct.pack("<I", 1002)),
    ("tid", struct.pack("<I", 1002)), ("exit_status", struct.pack("<i", 0x103)),
    ("flags", struct.pack("<I", 1)),
], {"type": "exit", "ktime": KTIME, "pid": 1002, "cgroup_id": 4242, "exit_code": 3,
    "behaviour_key": None})

write("exit_signal", hdr(3, 40) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("pid", struct.pack("<I", 1004)),
    ("tid", struct.pack("<I", 1005)), ("exit_status", struct.pack("<i", 0)),
    ("flags", struct.pack("<I", 0)),
], {"type": "exit", "ktime": KTIME, "pid": 1004, "cgroup_id": 4242, "exit_code": None,
    "behaviour_key": None})

write("net_connect4", hdr(4, 64) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("pid", struct.pack("<I", 1001)),
    ("tid", struct.pack("<I", 1006)), ("family", struct.pack("<H", 2)),
    ("protocol", struct.pack("<H", 6)), ("op", b"\x00"), ("flags", b"\x01"),
    ("port", struct.pack("<H", 443)), ("addr", socket.inet_pton(socket.AF_INET, "10.0.3.7") + b"\0" * 12),
    ("ret", struct.pack("<q", -111)),
], {"type": "net", "ktime": KTIME, "pid": 1001, "cgroup_id": 4242, "op": "connect",
    "proto": "tcp", "family": 4, "addr": "10.0.3.7", "port": 443, "ret": -111, "tid": 1006,
    "behaviour_key": "connect:tcp:10.0.3.7:443"})

write("net_send6", hdr(4, 64) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("pid", struct.pack("<I", 1001)),
    ("tid", struct.pack("<I", 1001)), ("family", struct.pack("<H", 10)),
    ("protocol", struct.pack("<H", 17)), ("op", b"\x01"), ("flags", b"\x00"),
    ("port", struct.pack("<H", 53)), ("addr", socket.inet_pton(socket.AF_INET6, "fd00::a")),
    ("ret", struct.pack("<q", 0)),
], {"type": "net", "ktime": KTIME, "pid": 1001, "cgroup_id": 4242, "op": "send",
    "proto": "udp", "family": 6, "addr": "fd00::a", "port": 53, "ret": None, "tid": 1001,
    "behaviour_key": "send:udp:[fd00::a]:53"})

write("syscall_first", hdr(5, 32) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("nr", struct.pack("<I", 309)),
    ("pid", struct.pack("<I", 1001)),
], {"type": "syscall_first", "ktime": KTIME, "cgroup_id": 4242, "nr": 309, "name": "getcpu",
    "pid": 1001, "behaviour_key": "syscall:getcpu"})

write("egress_violation", hdr(6, 72, version=2) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("pid", struct.pack("<I", 1001)),
    ("family", struct.pack("<H", 2)), ("protocol", struct.pack("<H", 6)),
    ("addr", socket.inet_pton(socket.AF_INET, "203.0.113.9") + b"\0" * 12),
    ("port", struct.pack("<H", 8443)), ("op", b"\x00"), ("action", b"\x01"),
    ("tid", struct.pack("<I", 1007)), ("comm", cstr(b"redis-server", 16)),
], {"type": "egress_violation", "ktime": KTIME, "cgroup_id": 4242, "pid": 1001,
    "op": "connect", "proto": "tcp", "family": 4, "addr": "203.0.113.9", "port": 8443,
    "action": "denied", "tid": 1007, "comm": "redis-server",
    "behaviour_key": "connect:tcp:203.0.113.9:8443"})

write("seccomp_denial", hdr(7, 112, version=3) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("pid", struct.pack("<I", 1001)),
    ("nr", struct.pack("<I", 135)), ("ret", struct.pack("<q", -1)),
    ("args", struct.pack("<QQQ", 0xffffffff, 0, 0)),
    ("tid", struct.pack("<I", 1001)), ("flags", struct.pack("<I", 0x1)),
    ("comm", cstr(b"python3", 16)), ("family", struct.pack("<H", 0)), ("port", struct.pack("<H", 0)),
    ("context", struct.pack("<I", 0)), ("addr", b"\0" * 16),
], {"type": "seccomp_denial", "ktime": KTIME, "cgroup_id": 4242, "pid": 1001, "nr": 135,
    "name": "personality", "ret": -1, "args": [0xffffffff, 0, 0], "tid": 1001, "comm": "python3",
    "counted": True, "context": 0, "destination": None, "family": None,
    "behaviour_key": "syscall:personality"})

# connect(2) denied by the filter: the destination read from the caller's sockaddr
write("seccomp_denial_connect6", hdr(7, 112, version=3) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("pid", struct.pack("<I", 1001)),
    ("nr", struct.pack("<I", 42)), ("ret", struct.pack("<q", -1)),
    ("args", struct.pack("<QQQ", 3, 0x7ffd1000, 28)),
    ("tid", struct.pack("<I", 1002)), ("flags", struct.pack("<I", 0x1 | 0x2)),
    ("comm", cstr(b"sqlite3", 16)), ("family", struct.pack("<H", 10)), ("port", struct.pack("<H", 4444)),
    ("context", struct.pack("<I", 0xdeadbeef)), ("addr", socket.inet_pton(socket.AF_INET6, "2001:db8::66")),
], {"type": "seccomp_denial", "ktime": KTIME, "cgroup_id": 4242, "pid": 1001, "nr": 42,
    "name": "connect", "ret": -1, "args": [3, 0x7ffd1000, 28], "tid": 1002, "comm": "sqlite3",
    "counted": True, "context": 0xdeadbeef, "destination": "[2001:db8::66]:4444", "family": 6,
    "behaviour_key": "syscall:connect"})

# socket(2) denied: no destination yet; its arguments say which socket (AF_PACKET, SOCK_RAW)
write("seccomp_denial_socket", hdr(7, 112, version=3) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("pid", struct.pack("<I", 1001)),
    ("nr", struct.pack("<I", 41)), ("ret", struct.pack("<q", -1)),
    ("args", struct.pack("<QQQ", 17, 3, 0x0300)),
    ("tid", struct.pack("<I", 1001)), ("flags", struct.pack("<I", 0)),
    ("comm", cstr(b"git", 16)), ("family", struct.pack("<H", 0)), ("port", struct.pack("<H", 0)),
    ("context", struct.pack("<I", 77)), ("addr", b"\0" * 16),
], {"type": "seccomp_denial", "ktime": KTIME, "cgroup_id": 4242, "pid": 1001, "nr": 41,
    "name": "socket", "ret": -1, "args": [17, 3, 768], "tid": 1001, "comm": "git", "counted": False,
    "context": 77, "destination": None, "family": None, "behaviour_key": "syscall:socket"})


# A resolver's answer, laid out by hand: id 0x1a2b, flags 0x8180 (response, RD, RA, NOERROR),
# one question, two answers: api.example.com CNAME edge.cdn.example.net (compressed owner),
# edge.cdn.example.net A 198.51.100.7, TTL 30.
question = b"\x03api\x07example\x03com\x00" + struct.pack("!HH", 1, 1)
cname_target = b"\x04edge\x03cdn\x07example\x03net\x00"
dns = (struct.pack("!HHHHHH", 0x1A2B, 0x8180, 1, 2, 0, 0) + question
       + b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 300, len(cname_target)) + cname_target
       + b"\xc0\x2d" + struct.pack("!HHIH", 1, 1, 30, 4) + bytes([198, 51, 100, 7]))
write("dns_message", hdr(16, 1080) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("family", struct.pack("<H", 2)),
    ("protocol", b"\x11"), ("direction", b"\x01"), ("peer_port", struct.pack("<H", 53)),
    ("msg_len", struct.pack("<H", len(dns))),
    ("peer", socket.inet_pton(socket.AF_INET, "10.96.0.10") + b"\0" * 12),
    ("captured", struct.pack("<H", len(dns))), ("pad", struct.pack("<H", 0)),
    ("pad2", struct.pack("<I", 0)), ("msg", cstr(dns, 1024)),
], {"type": "dns_message", "ktime": KTIME, "cgroup_id": 4242, "direction": "answer",
    "proto": "udp", "family": 4, "peer": "10.96.0.10", "peer_port": 53, "error": "",
    "captured_all": True,
    "message": {"id": 0x1A2B, "response": True, "rcode": 0, "qname": "api.example.com",
                "qtype": 1, "truncated": False,
                "answers": [["api.example.com", 5, 300, "edge.cdn.example.net"],
                            ["edge.cdn.example.net", 1, 30, "198.51.100.7"]]},
    "behaviour_key": None})

write("dns_violation", hdr(17, 288) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("qtype", struct.pack("<H", 28)),
    ("action", b"\x00"), ("pad", b"\x00"), ("name_len", struct.pack("<H", 15)),
    ("pad2", struct.pack("<H", 0)), ("name", cstr(b"evil.example.io", 256)),
], {"type": "dns_violation", "ktime": KTIME, "cgroup_id": 4242, "qtype": 28,
    "name": "evil.example.io", "action": "alerted", "behaviour_key": "dns:evil.example.io"})

write("io_uring_op", hdr(40, 56) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("pid", struct.pack("<I", 1001)),
    ("opcode", b"\x10"), ("sq_thread", b"\x00"), ("pad", struct.pack("<H", 0)),
    ("op", cstr(b"CONNECT", 24)),
], {"type": "io_uring_op", "ktime": KTIME, "cgroup_id": 4242, "pid": 1001, "opcode": 16,
    "op": "CONNECT", "sq_thread": False, "syscall": "connect", "behaviour_key": None})

write("cgroup_escape", hdr(41, 304) + [
    ("src_cgroup_id", struct.pack("<Q", 4242)), ("dst_cgroup_id", struct.pack("<Q", 1)),
    ("pid", struct.pack("<I", 1002)), ("by_pid", struct.pack("<I", 1001)),
    ("dst_level", struct.pack("<i", 0)), ("pad", struct.pack("<I", 0)),
    ("dst_path", cstr(b"/", 256)),
], {"type": "cgroup_escape", "ktime": KTIME, "src_cgroup_id": 4242, "dst_cgroup_id": 1,
    "pid": 1002, "by_pid": 1001, "dst_level": 0, "dst_path": "/", "behaviour_key": None})

argv_first = b"/usr/bin/curl\0-s\0"
write("exec_first", hdr(8, 560) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("pid", struct.pack("<I", 1010)),
    ("ppid", struct.pack("<I", 0)), ("old_pid", struct.pack("<I", 1010)),
    ("filename_len", struct.pack("<H", 13)), ("argv_len", struct.pack("<H", len(argv_first))),
    ("argc", struct.pack("<I", 2)), ("flags", struct.pack("<I", 0x4)),
    ("filename", cstr(b"/usr/bin/curl", 256)), ("argv", cstr(argv_first, 256)),
], {"type": "exec_first", "ktime": KTIME, "pid": 1010, "ppid": 0, "cgroup_id": 4242,
    "filename": "/usr/bin/curl", "argv": ["/usr/bin/curl", "-s"], "argv_truncated": False,
    "old_pid": 1010, "behaviour_key": "exec:/usr/bin/curl"})

write("net_first_send4", hdr(9, 56) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("pid", struct.pack("<I", 1001)),
    ("tid", struct.pack("<I", 1007)), ("family", struct.pack("<H", 2)),
    ("protocol", struct.pack("<H", 17)), ("op", b"\x01"), ("flags", b"\x00"),
    ("port", struct.pack("<H", 53)), ("addr", socket.inet_pton(socket.AF_INET, "10.96.0.10") + b"\0" * 12),
], {"type": "net_first", "ktime": KTIME, "pid": 1001, "cgroup_id": 4242, "op": "send",
    "proto": "udp", "family": 4, "addr": "10.96.0.10", "port": 53, "tid": 1007,
    "behaviour_key": "send:udp:10.96.0.10:53"})

head = b"GET /v1/docs/8812?x=1 HTTP/1.1\r\nHost: api.example.com\r\n\r\n"
write("http_capture", hdr(24, 64 + len(head)) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("conn", struct.pack("<Q", 0x7f00aa001000)),
    ("cookie", struct.pack("<Q", 77)), ("pid", struct.pack("<I", 1001)), ("tid", struct.pack("<I", 1002)),
    ("total", struct.pack("<I", len(head))), ("len", struct.pack("<H", len(head))),
    ("flags", struct.pack("<H", 0x1 | 0x4)), ("source", struct.pack("<B", 5)), ("pad", b"\0" * 7),
    ("data", head),  # variable length: hdr.size - 64 bytes of data
], {"type": "http_capture", "ktime": KTIME, "cgroup_id": 4242, "pid": 1001, "tid": 1002,
    "conn": 0x7f00aa001000, "cookie": 77, "total": len(head), "flags": 5, "source": 5, "len": len(head),
    "behaviour_key": None})

write("http_conn", hdr(25, 72) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("conn", struct.pack("<Q", 0x7f00aa001000)),
    ("cookie", struct.pack("<Q", 77)), ("pid", struct.pack("<I", 1001)), ("fd", struct.pack("<I", 5)),
    ("family", struct.pack("<H", 2)), ("port", struct.pack("<H", 8443)), ("flags", struct.pack("<H", 1)),
    ("pad", struct.pack("<H", 0)), ("addr", socket.inet_pton(socket.AF_INET, "127.0.0.1") + b"\0" * 12),
], {"type": "http_conn", "ktime": KTIME, "cgroup_id": 4242, "pid": 1001, "conn": 0x7f00aa001000,
    "cookie": 77, "fd": 5, "family": 4, "addr": "127.0.0.1", "port": 8443, "tls": True,
    "behaviour_key": None})

text = b"DELETE /v1/repos/agent\napi.example.com"
write("http_violation", hdr(26, 320) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("conn", struct.pack("<Q", 77)),
    ("pid", struct.pack("<I", 1001)), ("tid", struct.pack("<I", 1002)), ("action", struct.pack("<B", 1)),
    ("reason", struct.pack("<B", 0)), ("flags", struct.pack("<H", 0)), ("len", struct.pack("<H", len(text))),
    ("pad", struct.pack("<H", 0)), ("comm", cstr(b"python3", 16)), ("text", cstr(text, 256)),
], {"type": "http_violation", "ktime": KTIME, "cgroup_id": 4242, "pid": 1001, "tid": 1002, "conn": 77,
    "action": "killed", "reason": "no allowed entry matches", "tls": False, "comm": "python3",
    "method": "DELETE", "path": "/v1/repos/agent", "host": "api.example.com", "behaviour_key": None})

rel = b"out/result.json"
write("file_first", hdr(32, 312) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("pid", struct.pack("<I", 1001)),
    ("access", struct.pack("<I", 0x4 | 0x10 | 0x8)),  # write | create | truncate
    ("key_pid", struct.pack("<I", 1001)), ("dirfd", struct.pack("<i", -100)),  # relative to the cwd
    ("nr", struct.pack("<I", 257)), ("path_len", struct.pack("<H", len(rel))),
    ("flags", struct.pack("<H", 0)), ("path_hash", struct.pack("<Q", 0x1122334455667788)),
    ("path", cstr(rel, 256)),
], {"type": "file_first", "ktime": KTIME, "cgroup_id": 4242, "pid": 1001, "access": 0x1c,
    "path": "out/result.json", "key_pid": 1001, "dirfd": -100, "nr": 257, "syscall": "openat",
    "truncated": False, "path_hash": 0x1122334455667788, "behaviour_key": None})

cred = b"/root/.aws/credentials"
write("file_denial", hdr(33, 328) + [
    ("cgroup_id", struct.pack("<Q", 4242)), ("pid", struct.pack("<I", 1001)),
    ("tid", struct.pack("<I", 1007)), ("access", struct.pack("<I", 0x1)),  # read
    ("dirfd", struct.pack("<i", 0)), ("nr", struct.pack("<I", 257)),
    ("ret", struct.pack("<i", -13)), ("path_len", struct.pack("<H", len(cred))),
    ("flags", struct.pack("<H", 0)), ("pad", struct.pack("<I", 0)), ("comm", cstr(b"python3", 16)),
    ("path", cstr(cred, 256)),
], {"type": "file_denial", "ktime": KTIME, "cgroup_id": 4242, "pid": 1001, "tid": 1007,
    "access": 1, "path": "/root/.aws/credentials", "dirfd": 0, "nr": 257, "syscall": "openat",
    "ret": -13, "truncated": False, "comm": "python3", "behaviour_key": None})
