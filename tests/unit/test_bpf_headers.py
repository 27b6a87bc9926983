"""The headers under bpf/ and their Python mirrors (sensor/events.py, sensor/mirrors.py) must
describe the same bytes.

Parses every header without a compiler: its #defines (type numbers, versions, sizes, flags,
including defines that are arithmetic over other defines), the field lists of its structs and
its _Static_asserts, and compares them with the mirror classes. Every struct in a header is
mirrored, or used only inside structs that are.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from sensor import events, mirrors

BPF = Path(__file__).resolve().parents[2] / "bpf"
HEADERS = {p.name: p.read_text() for p in sorted(BPF.glob("*.h"))}
C_TYPES = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8, "__s8": 1, "__s16": 2, "__s32": 4,
           "__s64": 8, "char": 1}
BYTE_TYPES = ("char", "__u8")
RECORDS = [events.ExecRecord, events.ForkRecord, events.ExitRecord, events.NetRecord,
           events.SyscallFirstRecord, events.EgressViolationRecord, events.SeccompDenialRecord,
           events.DnsMessageRecord, events.DnsViolationRecord, events.IoUringOpRecord,
           events.CgroupEscapeRecord, events.HttpCaptureRecord, events.HttpConnRecord,
           events.HttpViolationRecord, events.FileFirstRecord, events.FileDenialRecord]
MIRRORS = {"events.h": [events.EventHeader, *RECORDS, *mirrors.MAP_MIRRORS["events.h"]],
           **{h: list(ms) for h, ms in mirrors.MAP_MIRRORS.items() if h != "events.h"}}


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def header_defines(text: str) -> dict[str, int]:
    """``#define NAME <integer or arithmetic over earlier defines>``; the first value wins
    (``#ifndef X / #define X default`` gives the default)."""
    out: dict[str, int] = {}
    for m in re.finditer(r"^\s*#define\s+(\w+)\s+(.+?)\s*$", _strip_comments(text), re.M):
        name, expr = m.groups()
        if name in out:
            continue
        expr = re.sub(r"[A-Z_][A-Z0-9_]*", lambda t: str(out.get(t.group(0), t.group(0))), expr)
        if re.fullmatch(r"[\d\s()/*+<|-]+|0x[0-9a-fA-F]+", expr):
            out[name] = int(eval(expr, {}, {}))  # noqa: S307 - digits and arithmetic only
    return out


DEFINES = {h: header_defines(t) for h, t in HEADERS.items()}
ALL_DEFINES = {k: v for d in DEFINES.values() for k, v in d.items()}


def _structs(text: str) -> dict[str, str]:
    return dict(re.findall(r"struct\s+(\w+)\s*\{(.*?)\};", _strip_comments(text), re.S))


STRUCTS = {name: (h, body) for h, t in HEADERS.items() for name, body in _structs(t).items()}


def _dim(expr: str) -> int:
    expr = re.sub(r"[A-Z_][A-Z0-9_]*", lambda m: str(ALL_DEFINES[m.group(0)]), expr)
    assert re.fullmatch(r"[\d\s/*+-]+", expr), expr
    return int(eval(expr))  # noqa: S307 - digits and arithmetic only, checked above


def c_struct_fields(name: str) -> list[tuple[str, int]]:
    """``(field, size)`` of ``struct name``: nested structs flattened as ``outer.x``, arrays of
    structs or of non-byte scalars as ``name0``, ``name1``..., byte arrays as one field."""
    out = []
    for decl in STRUCTS[name][1].split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        m = re.fullmatch(r"(struct\s+\w+|\w+)\s+(\w+)(?:\[(.+)\])?", decl)
        assert m, f"unparsed declaration {decl!r} in struct {name}"
        ctype, fname, dim = m.groups()
        n = _dim(dim) if dim else None
        if ctype.startswith("struct "):
            inner = c_struct_fields(ctype.split()[1])
            for i in range(n or 1):
                base = f"{fname}{i}" if n else fname
                out += [(f"{base}.{x}", s) for x, s in inner]
        elif n is None or ctype in BYTE_TYPES:
            out.append((fname, C_TYPES[ctype] * (n or 1)))
        else:
            out += [(f"{fname}{i}", C_TYPES[ctype]) for i in range(n)]
    return out


def mirror_fields(cls) -> list[tuple[str, int]]:
    """The mirror's fields; a record's leading header fields are named ``hdr.*`` as in C."""
    is_record = cls is not events.EventHeader and cls.fields[:4] == events.EventHeader.fields
    return [(f"hdr.{n}" if is_record and i < 4 else n, struct.calcsize("<" + f))
            for i, (n, f) in enumerate(cls.fields)]


ALL = [(h, cls) for h, ms in MIRRORS.items() for cls in ms]


@pytest.mark.parametrize("header,cls", ALL, ids=lambda x: x if isinstance(x, str) else x.c_name)
def test_mirror_matches_the_header(header, cls):
    assert cls.c_name in _structs(HEADERS[header]), f"struct {cls.c_name} is not in {header}"
    assert c_struct_fields(cls.c_name) == mirror_fields(cls)
    size = DEFINES[header][f"{cls.c_name.upper()}_SIZE"]
    assert size == cls.size()
    assert re.search(rf"_Static_assert\(sizeof\(struct {cls.c_name}\)\s*==\s*{cls.c_name.upper()}_SIZE",
                     HEADERS[header]), f"{header} does not assert the size of struct {cls.c_name}"


@pytest.mark.parametrize("header,cls", ALL, ids=lambda x: x if isinstance(x, str) else x.c_name)
def test_docstring_carries_the_c_struct(header, cls):
    assert f"struct {cls.c_name} {{" in cls.__doc__


def test_every_struct_is_mirrored():
    mirrored = {cls.c_name for _, cls in ALL}
    nested = {m for _, body in STRUCTS.values() for m in re.findall(r"struct\s+(\w+)\s+\w+", body)}
    missing = sorted(set(STRUCTS) - mirrored - nested)
    assert not missing, f"structs without a Python mirror: {missing}"


def test_record_versions_and_types_match():
    d = DEFINES["events.h"]
    for cls in RECORDS:
        assert d[f"{cls.c_name.upper()}_VERSION"] == cls.version
        assert d[f"EV_{events.TYPE_NAMES[cls.type].upper()}"] == cls.type


def test_type_numbers_match_and_are_unique():
    d = DEFINES["events.h"]
    for num, name in events.TYPE_NAMES.items():
        assert d[f"EV_{name.upper()}"] == num
    assert d["EV_TYPE_MAX"] == events.EV_TYPE_MAX
    assert max(events.TYPE_NAMES) < events.EV_TYPE_MAX
    nums = [v for k, v in d.items() if k.startswith("EV_") and k != "EV_TYPE_MAX"]
    assert len(nums) == len(set(nums))


@pytest.mark.parametrize("module,header,name", [
    *[(events, "events.h", n) for n in (
        "EXEC_FILENAME_LEN", "EXEC_ARGV_LEN", "EXEC_ARGV_MAX_ARGS", "EXEC_F_ARGV_TRUNCATED",
        "EXEC_F_NO_ARGV", "EXEC_F_PPID_UNKNOWN", "EXIT_F_CODE_KNOWN", "NET_OP_CONNECT",
        "NET_OP_SENDMSG", "NET_F_RET_KNOWN", "EGRESS_OP_CONNECT", "EGRESS_OP_SENDMSG",
        "EGRESS_ACTION_ALERTED", "EGRESS_ACTION_DENIED", "ENV_AF_INET", "ENV_AF_INET6",
        "IO_URING_OP_NAME_LEN", "CGROUP_ESCAPE_PATH_LEN",
        "LOSS_SYSCALL_UNATTRIBUTED", "LOSS_CGROUP_REMOVED_DROPPED", "LOSS_SLOTS", "FILE_PATH_LEN",
        "FILE_ACC_READ", "FILE_ACC_LIST", "FILE_ACC_WRITE", "FILE_ACC_TRUNCATE", "FILE_ACC_CREATE",
        "FILE_ACC_REMOVE", "FILE_ACC_MKDIR", "FILE_ACC_RMDIR", "FILE_ACC_SYMLINK", "FILE_ACC_MKFIFO",
        "FILE_ACC_MKSOCK", "FILE_ACC_MKNOD", "FILE_ACC_EXEC", "FILE_DIRFD_ABSOLUTE", "FILE_AT_FDCWD",
        "FILE_F_TRUNCATED", "FILE_COMM_LEN")],
    (mirrors, "events.h", "SYSCALL_NR_SLOTS"), (mirrors, "events.h", "SYSCALL_BANKS"),
    *[(mirrors, "egress.h", n) for n in (
        "EGRESS_MAX_RANGES", "EGRESS_INLINE_PORTS", "EGRESS_PORTS_ANY", "EGRESS_PORTS_MORE",
        "EGRESS_NAME_LEN", "EGRESS_NAME_EXACT", "EGRESS_NAME_SUFFIX", "EGRESS_DNS_STATS",
        "EGRESS_FAMILY_V4", "EGRESS_FAMILY_V6",
        "EGRESS_MODE_OBSERVE", "EGRESS_MODE_ALERT", "EGRESS_MODE_ENFORCE", "EGRESS_WORKLOAD_LEN",
        "EGRESS_CGROUP_PATH_LEN")],
    *[(events, "events.h", n) for n in ("DNS_MESSAGE_CAPTURE", "DNS_DIR_QUERY", "DNS_DIR_ANSWER",
                                        "DNS_VIOLATION_NAME_LEN")],
    *[(mirrors, "denials.h", n) for n in ("DENIALS_NR_SLOTS", "DENIALS_MODE_ALERT",
                                          "DENIALS_MODE_ENFORCE", "DENIALS_MODE_WATCH",
                                          "DENIAL_F_SOCKETS")],
    *[(mirrors, "capabilities.h", n) for n in ("CAPS_F_REFUSED", "CAPS_F_AFTER_EXEC", "CAPS_STAT_MAP_FULL",
                                               "CAPS_STAT_UNKNOWN_CAP", "CAPS_STAT_OVERCOMMIT", "CAPS_STAT_STACK_WALKS",
                                               "CAPS_STAT_SLOTS")],
    *[(events, "events.h", n) for n in (
        "HTTP_CAPTURE_MAX", "HTTP_CAPTURE_HEAD_SIZE", "HTTP_F_TLS", "HTTP_F_RESPONSE", "HTTP_F_HEAD",
        "HTTP_F_BODY", "HTTP_F_TRUNCATED", "HTTP_F_H2", "HTTP_F_UNPARSED", "HTTP_F_TLS_RECORD",
        "HTTP_SRC_WRITE", "HTTP_SRC_WRITEV", "HTTP_SRC_SENDTO", "HTTP_SRC_SENDMSG", "HTTP_SRC_SSL_WRITE",
        "HTTP_SRC_SSL_READ", "HTTP_SRC_SKB", "HTTP_ACTION_ALERTED", "HTTP_ACTION_KILLED",
        "HTTP_REASON_NO_RULE", "HTTP_REASON_UNPARSED", "HTTP_REASON_NO_HOST", "HTTP_REASON_TWO_HOSTS",
        "HTTP_REASON_TOO_LONG", "HTTP_VIOLATION_TEXT")],
    *[(mirrors, "http.h", n) for n in (
        "HTTP_METHOD_MAX", "HTTP_HOST_MAX", "HTTP_SEGMENT_MAX", "HTTP_SEGMENTS_MAX", "HTTP_PATH_SCAN",
        "HTTP_HOST_SCAN", "HTTP_EDGE_TEXT", "HTTP_RESPONSE_MAX", "HTTP_MODE_OBSERVE", "HTTP_MODE_ALERT",
        "HTTP_MODE_ENFORCE", "HTTP_EDGE_ID", "HTTP_EDGE_ANY", "HTTP_EDGE_END", "HTTP_LOSS_RING_CAPTURE",
        "HTTP_LOSS_RING_CONN", "HTTP_LOSS_RING_VIOLATION", "HTTP_LOSS_READ", "HTTP_LOSS_IOV",
        "HTTP_LOSS_SLOTS", "HTTP_C_DIGIT", "HTTP_C_HEX", "HTTP_C_ALPHA", "HTTP_C_DASH", "HTTP_C_UNDER",
        "HTTP_C_OTHER", "HTTP_C_SLASH", "HTTP_C_END")],
    *[(mirrors, "files.h", n) for n in (
        "FILE_LOSS_RINGBUF_FIRST", "FILE_LOSS_RINGBUF_DENIAL", "FILE_LOSS_MAP_FULL",
        "FILE_LOSS_PATH_UNREADABLE", "FILE_LOSS_PATH_TRUNCATED", "FILE_LOSS_CGROUP_OVERFLOW",
        "FILE_LOSS_SLOTS", "FILE_WATCH_ENFORCE")],
    (mirrors, "events.h", "FILE_PATH_LEN"),
])
def test_constants_match(module, header, name):
    assert DEFINES[header][name] == getattr(module, name)


def test_egress_rule_struct_follows_max_ranges():
    assert mirrors.egress_rule_struct(mirrors.EGRESS_MAX_RANGES).size == mirrors.EgressRule.size()
    assert mirrors.egress_rule_struct(3).size == 2 * (24 + 4 * 3)
    assert (mirrors.egress_name_rule_struct(mirrors.EGRESS_MAX_RANGES).size
            == mirrors.EgressNameRule.size())


def test_dns_stat_names_follow_the_header():
    from enforcer.egress import DNS_STATS
    d = DEFINES["egress.h"]
    for i, name in enumerate(DNS_STATS):
        assert d[f"EGRESS_DNS_{name.upper()}"] == i
    assert len(DNS_STATS) <= d["EGRESS_DNS_STATS"]


def test_loss_names_cover_every_emitted_type():
    from sensor.probes import LOSS_NAMES
    for t in (events.EV_EXEC, events.EV_FORK, events.EV_EXIT, events.EV_NET,
              events.EV_SYSCALL_FIRST, events.LOSS_SYSCALL_UNATTRIBUTED,
              events.LOSS_CGROUP_REMOVED_DROPPED):
        assert t in LOSS_NAMES
    assert max(LOSS_NAMES) < events.LOSS_SLOTS


def test_syscall_slots_match_the_table():
    from sensor import syscalls
    assert DEFINES["events.h"]["SYSCALL_NR_SLOTS"] == syscalls.NR_SLOTS


def test_program_sources_include_their_headers():
    src = {p.name: p.read_text() for p in BPF.glob("*.c")}
    assert '#include "egress.h"' in src["egress.c"]
    assert '#include "denials.h"' in src["denials.c"]
    assert '#include "capabilities.h"' in src["capabilities.c"]
    assert '#include "http.h"' in src["http.c"]
    assert '#include "files.h"' in src["files.c"]
    for name, text in src.items():
        for header in ("egress.h", "denials.h", "capabilities.h", "http.h", "files.h", "events.h"):
            body = _strip_comments(text)
            for struct_name, (h, _) in STRUCTS.items():
                if h == header:
                    assert not re.search(rf"struct\s+{struct_name}\s*\{{", body), \
                        f"{name} redefines struct {struct_name} of {header}"
