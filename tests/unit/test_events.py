"""Decoding ring-buffer records: golden dumps, truncation, unknown versions, garbage."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensor import events, syscalls
from sensor.events import DecodeError, Decoder, decode

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "events"
NAMES = sorted(p.stem for p in GOLDEN.glob("*.hex"))


def read_hex(path: Path) -> bytes:
    """Hex bytes, ``#`` comments, and ``00*N`` for N zero bytes."""
    out = bytearray()
    for line in path.read_text().splitlines():
        for tok in line.split("#", 1)[0].split():
            if "*" in tok:
                byte, n = tok.split("*")
                out += bytes([int(byte, 16)]) * int(n)
            else:
                out.append(int(tok, 16))
    return bytes(out)


def test_every_event_type_has_a_golden_record():
    types = {decode(read_hex(GOLDEN / f"{n}.hex")).type_name for n in NAMES}
    assert types == set(events.TYPE_NAMES.values())


@pytest.mark.parametrize("name", NAMES)
def test_golden_decode(name):
    data = read_hex(GOLDEN / f"{name}.hex")
    expected = json.loads((GOLDEN / f"{name}.json").read_text())
    ev = decode(data)
    assert not isinstance(ev, DecodeError), ev
    got = ev.to_dict()
    got["behaviour_key"] = ev.behaviour_key()
    assert got == expected
    rec = events.RECORDS[events.EventHeader.unpack(data)["type"]]
    if getattr(rec, "head", None) is None:
        assert len(data) == rec.size()
    else:  # variable length: exactly what the header says, within the head and the whole
        assert len(data) == events.EventHeader.unpack(data)["size"]
        assert rec.head <= len(data) <= rec.size()


@pytest.mark.parametrize("name", NAMES)
def test_golden_roundtrip_through_mirror(name):
    data = read_hex(GOLDEN / f"{name}.hex")
    rec = events.RECORDS[struct.unpack_from("<H", data)[0]]
    whole = data + bytes(rec.size() - len(data))  # a variable-length record is zero to its end
    assert rec.pack(**rec.unpack(whole)) == whole


@pytest.mark.parametrize("name", NAMES)
def test_truncated_records_are_counted_not_raised(name):
    data = read_hex(GOLDEN / f"{name}.hex")
    d = Decoder()
    cuts = [0, 1, 15, 16, len(data) // 2, len(data) - 1]
    for n in cuts:
        assert d.decode(data[:n]) is None
    assert d.errors["decode_error"] == len(cuts)
    assert d.errors["unknown_version"] == 0
    assert isinstance(d.last_error, DecodeError)


def test_unknown_version_and_type_are_counted_apart():
    data = bytearray(read_hex(GOLDEN / "fork.hex"))
    d = Decoder()
    struct.pack_into("<H", data, 2, 2)  # version 2 of fork
    assert d.decode(bytes(data)) is None
    struct.pack_into("<HH", data, 0, 99, 1)  # type 99
    assert d.decode(bytes(data)) is None
    assert d.errors == {"decode_error": 0, "unknown_version": 1, "unknown_type": 1}
    assert d.last_error.type == 99


def test_header_size_must_match_the_mirror():
    data = bytearray(read_hex(GOLDEN / "syscall_first.hex"))
    struct.pack_into("<I", data, 4, 40)
    err = decode(bytes(data) + bytes(8))
    assert isinstance(err, DecodeError) and err.kind == "decode_error"
    assert "header size 40" in err.reason


def test_longer_buffer_with_correct_header_decodes():
    # bcc hands over exactly the reserved size, but trailing bytes must not confuse decoding.
    data = read_hex(GOLDEN / "fork.hex")
    assert decode(data + b"\xff" * 8).pid == 1002


def test_net_event_with_unknown_family_is_an_error():
    data = bytearray(read_hex(GOLDEN / "net_connect4.hex"))
    struct.pack_into("<H", data, 32, 1)  # AF_UNIX
    err = decode(bytes(data))
    assert isinstance(err, DecodeError) and "family 1" in err.reason


def test_non_tcp_udp_net_event_has_no_behaviour_key():
    data = bytearray(read_hex(GOLDEN / "net_connect4.hex"))
    struct.pack_into("<H", data, 34, 1)  # ICMP ping socket
    ev = decode(bytes(data))
    assert ev.proto == "icmp" and ev.behaviour_key() is None


def test_exec_argv_respects_argc_and_len():
    data = bytearray(read_hex(GOLDEN / "exec.hex"))
    struct.pack_into("<I", data, 40, 2)  # argc 2 of 3 strings
    assert decode(bytes(data)).argv == ["/usr/bin/git", "clone"]
    struct.pack_into("<HI", data, 38, 4, 3)  # argv_len 4: "/usr"
    assert decode(bytes(data)).argv == ["/usr"]


def test_non_utf8_filename_is_escaped_not_fatal():
    data = bytearray(read_hex(GOLDEN / "exec.hex"))
    data[48:52] = b"/\xff\xfeA"
    struct.pack_into("<H", data, 36, 4)
    ev = decode(bytes(data))
    assert ev.filename == "/\\xff\\xfeA"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700))
def test_arbitrary_bytes_never_raise(data):
    res = decode(data)
    assert isinstance(res, (DecodeError,) + tuple(
        c for c in vars(events).values() if isinstance(c, type) and issubclass(c, events._Event)))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(NAMES), st.data())
def test_mutated_golden_records_never_raise(name, data):
    raw = bytearray(read_hex(GOLDEN / f"{name}.hex"))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    decode(bytes(raw))


def test_syscall_table():
    assert syscalls.name(0) == "read"
    assert syscalls.name(309) == "getcpu"
    assert syscalls.name(135) == "personality"
    assert syscalls.name(435) == "clone3"
    assert syscalls.name(462) == "mseal"
    assert syscalls.name(511) == "unknown_511"
    assert syscalls.number("getppid") == 110
    assert syscalls.number("unknown_499") == 499
    assert syscalls.number("nope") is None
    assert len(set(syscalls.NAMES.values())) == len(syscalls.NAMES)
    assert max(syscalls.NAMES) < syscalls.OVERFLOW_NR


def test_syscall_table_agrees_with_bcc_where_bcc_knows():
    bcc_syscall = pytest.importorskip("bcc.syscall")
    for nr, name in bcc_syscall.syscalls.items():
        assert syscalls.NAMES[nr] == name.decode()


def test_syscall_module_does_not_import_bcc():
    import ast
    for mod in (events, syscalls):
        tree = ast.parse(Path(mod.__file__).read_text())
        imported = {n.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for n in node.names}
        imported |= {node.module or "" for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom)}
        assert not any(m.split(".")[0] == "bcc" for m in imported), mod.__name__


def test_kernel_cflags_name_the_special_syscalls():
    flags = dict(f[2:].split("=") for f in syscalls.kernel_cflags())
    assert flags == {"NR_CLONE": "56", "NR_FORK": "57", "NR_VFORK": "58", "NR_EXECVE": "59",
                     "NR_EXIT": "60", "NR_EXIT_GROUP": "231", "NR_EXECVEAT": "322",
                     "NR_CLONE3": "435", "NR_WRITE": "1", "NR_CLOSE": "3", "NR_WRITEV": "20",
                     "NR_CONNECT": "42", "NR_SENDTO": "44", "NR_SENDMSG": "46"}
