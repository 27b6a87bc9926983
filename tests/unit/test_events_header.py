"""bpf/events.h and the Python mirrors in sensor/events.py must describe the same bytes.

Parses the header without a compiler: its #defines (type numbers, versions, sizes, flags) and
the field lists of its structs, and compares them with the mirror classes.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from sensor import events
from sensor.events import parse_header_defines

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "events.h"
TEXT = HEADER.read_text()
DEFINES = parse_header_defines(TEXT)
C_TYPES = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8, "__s8": 1, "__s16": 2, "__s32": 4,
           "__s64": 8, "char": 1}
MIRRORS = [events.ExecRecord, events.ForkRecord, events.ExitRecord, events.NetRecord,
           events.SyscallFirstRecord, events.EgressViolationRecord, events.SeccompDenialRecord]


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def _eval_dim(expr: str) -> int:
    expr = re.sub(r"[A-Z_][A-Z0-9_]*", lambda m: str(DEFINES[m.group(0)]), expr)
    assert re.fullmatch(r"[\d\s/*+-]+", expr), expr
    return int(eval(expr))  # noqa: S307 - digits and arithmetic only, checked above


def c_struct_fields(name: str) -> list[tuple[str, int]]:
    """``(field, size in bytes)`` of ``struct name``, nested structs flattened as ``outer.x``."""
    body = re.search(rf"struct\s+{name}\s*\{{(.*?)\}};", _strip_comments(TEXT), re.S)
    assert body, f"struct {name} not in {HEADER}"
    out = []
    for decl in body.group(1).split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        m = re.fullmatch(r"(struct\s+\w+|\w+)\s+(\w+)(?:\[(.+)\])?", decl)
        assert m, f"unparsed declaration {decl!r} in struct {name}"
        ctype, fname, dim = m.groups()
        if ctype.startswith("struct "):
            out += [(f"{fname}.{n}", s) for n, s in c_struct_fields(ctype.split()[1])]
            continue
        out.append((fname, C_TYPES[ctype] * (_eval_dim(dim) if dim else 1)))
    return out


def mirror_fields(cls) -> list[tuple[str, int]]:
    """The mirror's fields; a record's leading header fields are named ``hdr.*`` as in C."""
    is_record = cls is not events.EventHeader and cls.fields[:4] == events.EventHeader.fields
    return [(f"hdr.{n}" if is_record and i < 4 else n, struct.calcsize("<" + f))
            for i, (n, f) in enumerate(cls.fields)]


def test_type_numbers_match():
    for num, name in events.TYPE_NAMES.items():
        assert DEFINES[f"EV_{name.upper()}"] == num
    assert DEFINES["EV_TYPE_MAX"] == events.EV_TYPE_MAX
    assert max(events.TYPE_NAMES) < events.EV_TYPE_MAX


def test_type_numbers_are_unique():
    nums = [v for k, v in DEFINES.items() if k.startswith("EV_") and k != "EV_TYPE_MAX"]
    assert len(nums) == len(set(nums))


@pytest.mark.parametrize("cls", MIRRORS, ids=lambda c: c.c_name)
def test_record_size_version_and_fields_match(cls):
    stem = cls.c_name.upper()
    assert DEFINES[f"{stem}_SIZE"] == cls.size()
    assert DEFINES[f"{stem}_VERSION"] == cls.version
    assert DEFINES[f"EV_{events.TYPE_NAMES[cls.type].upper()}"] == cls.type
    assert c_struct_fields(cls.c_name) == mirror_fields(cls)


@pytest.mark.parametrize("cls", [events.EventHeader, events.SyscallSlotState,
                                 events.SyscallSlotCounts], ids=lambda c: c.c_name)
def test_shared_tables_match(cls):
    size_define = {"event_hdr": "EVENT_HDR_SIZE"}.get(cls.c_name, f"{cls.c_name.upper()}_SIZE")
    assert DEFINES[size_define] == cls.size()
    c = c_struct_fields(cls.c_name)
    assert sum(s for _, s in c) == cls.size()
    if cls is events.EventHeader:
        assert c == mirror_fields(cls)


def test_docstrings_carry_the_c_struct():
    for cls in MIRRORS + [events.EventHeader]:
        assert f"struct {cls.c_name} {{" in cls.__doc__


@pytest.mark.parametrize("name", [
    "EXEC_FILENAME_LEN", "EXEC_ARGV_LEN", "EXEC_ARGV_MAX_ARGS", "EXEC_F_ARGV_TRUNCATED",
    "EXEC_F_NO_ARGV", "EXEC_F_PPID_UNKNOWN", "EXIT_F_CODE_KNOWN", "NET_OP_CONNECT",
    "NET_OP_SENDMSG", "NET_F_RET_KNOWN", "EGRESS_OP_CONNECT", "EGRESS_OP_SENDMSG",
    "EGRESS_ACTION_ALERTED", "EGRESS_ACTION_DENIED", "ENV_AF_INET", "ENV_AF_INET6",
    "LOSS_SYSCALL_UNATTRIBUTED", "LOSS_CGROUP_REMOVED_DROPPED", "LOSS_SLOTS", "SYSCALL_NR_SLOTS",
    "SYSCALL_BANKS",
])
def test_constants_match(name):
    assert DEFINES[name] == getattr(events, name)


def test_loss_names_cover_every_emitted_type():
    from sensor.probes import LOSS_NAMES
    for t in (events.EV_EXEC, events.EV_FORK, events.EV_EXIT, events.EV_NET,
              events.EV_SYSCALL_FIRST, events.LOSS_SYSCALL_UNATTRIBUTED,
              events.LOSS_CGROUP_REMOVED_DROPPED):
        assert t in LOSS_NAMES
    assert max(LOSS_NAMES) < events.LOSS_SLOTS


def test_syscall_slots_match_the_table():
    from sensor import syscalls
    assert DEFINES["SYSCALL_NR_SLOTS"] == syscalls.NR_SLOTS
