"""Landlock denials assembled from audit records recorded on this kernel (Linux 6.18, ABI 7):
a read of a path with a space (hex-encoded by audit), a file creation (logged on the directory),
a denied exec of /bin/sh (logged as the resolved /usr/bin/dash), plus an unrelated event and the
domains' deallocation records. The expected values below were read off the records by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from enforcer.landlock_denials import DenialAssembler, parse_record, to_violation

RECORDS = Path(__file__).resolve().parents[1] / "golden" / "landlock" / "audit-records.txt"


def records():
    for line in RECORDS.read_text().splitlines():
        t, _, text = line.partition(" ")
        yield int(t), text


def assemble():
    a = DenialAssembler()
    out = []
    for t, text in records():
        out += a.feed(t, text)
    return out + a.flush(), a


def test_three_denials_with_path_access_and_process():
    denials, a = assemble()
    assert a.undecodable == 0
    assert [(d.path, d.blockers, d.pid, d.comm, d.syscall, d.exit) for d in denials] == [
        ("/tmp/llprobe/with space/x", ("fs.read_file",), 23469, "cat", "openat", -13),
        ("/tmp/llprobe/outdir", ("fs.make_reg",), 23470, "touch", "openat", -13),
        ("/usr/bin/dash", ("fs.execute", "fs.read_file"), 23471, "python", "execve", -13),
    ]
    read, create, exe = denials
    assert read.behaviours() == ("file:read:/tmp/llprobe/with space/x",)
    assert create.behaviours() == ("file:create:/tmp/llprobe/outdir/*",)
    assert exe.behaviours() == ("exec:/usr/bin/dash",)
    assert read.exe == "/usr/bin/cat" and read.ppid == 23467 and read.ino == 2154653
    assert read.creator == {"pid": "23469", "uid": "0", "exe": "/usr/bin/python3.11", "comm": "python",
                            "mode": "enforcing"}
    assert read.time == pytest.approx(1796115969.720)


def test_events_complete_at_eoe_without_a_flush():
    a = DenialAssembler()
    got = []
    for t, text in records():
        got += a.feed(t, text)
    assert len(got) == 3 and not a.flush()


def test_access_records_without_a_syscall_context_still_count():
    a = DenialAssembler()
    a.feed(1423, 'audit(1.5:7): domain=abc blockers=fs.read_dir path="/srv" dev="vda" ino=1')
    (d,) = a.flush()
    assert d.pid is None and d.behaviours() == ("file:list:/srv",)


def test_garbage_is_counted_not_raised():
    a = DenialAssembler()
    assert a.feed(1423, "no stamp here") == [] and a.undecodable == 1
    a.feed(1423, "audit(1.5:8): domain=abc path=\"/x\"")
    assert a.flush() == [] and a.undecodable == 2
    assert parse_record("audit(12.250:3): k=v q=\"a b\"") == (12.25, 3, {"k": "v", "q": "a b"})


def test_exec_denials_become_exec_violations():
    denials, _ = assemble()
    (v,) = to_violation(denials[2], "host/Unit/agent/main")
    assert (v.substrate, v.behaviour, v.action) == ("exec", "exec:/usr/bin/dash", "denied")
    assert v.detail["pid"] == 23471 and v.detail["enforcer"] == "landlock"
    file_violations = to_violation(denials[0], "host/Unit/agent/main")
    assert file_violations and {v.substrate for v in file_violations} == {"file"}
    assert all(v.action == "denied" and v.behaviour.startswith("file:") for v in file_violations)
