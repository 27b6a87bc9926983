"""Audit log: chain, durability under concurrent writers, and verify catching edits, deletions,
truncation and reordering (also through ``envelope audit verify``)."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from enforcer import audit
from envelope.cli import main


def fill(state, n=5):
    for i in range(n):
        audit.append(state, "mode.set", workload="default/Deployment/a/main", reason=f"r{i}",
                     details={"to": "alert", "i": i}, actor="tester", now=1800000000.0 + i)


def lines(state) -> list[str]:
    return audit.log_path(state).read_text().splitlines(keepends=True)


def write(state, ls):
    audit.log_path(state).write_text("".join(ls))


def test_chain_fields(tmp_path):
    fill(tmp_path, 3)
    es = audit.read(tmp_path)
    assert [e["seq"] for e in es] == [1, 2, 3]
    assert es[0]["prev"] == audit.GENESIS
    assert es[1]["prev"] == es[0]["hash"] and es[2]["prev"] == es[1]["hash"]
    assert set(es[0]) == set(audit.FIELDS)
    assert es[0]["time"] == "2027-01-15T08:00:00.000000Z"
    assert es[0]["hash"] == audit.entry_hash(es[0])
    assert audit.verify(tmp_path).ok
    head = json.loads(audit.head_path(tmp_path).read_text())
    assert head == {"seq": 3, "hash": es[2]["hash"]}


def test_edit_detected(tmp_path):
    fill(tmp_path)
    ls = lines(tmp_path)
    e = json.loads(ls[2])
    e["reason"] = "nothing to see"
    ls[2] = json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n"
    write(tmp_path, ls)
    r = audit.verify(tmp_path)
    assert not r.ok
    assert [p.line for p in r.problems] == [3]
    assert "edited" in r.problems[0].message


def test_rehashed_edit_detected_by_next_entry(tmp_path):
    fill(tmp_path)
    ls = lines(tmp_path)
    e = json.loads(ls[1])
    e["details"]["to"] = "observe"
    e["hash"] = audit.entry_hash(e)  # the editor recomputes this entry's hash...
    ls[1] = json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n"
    write(tmp_path, ls)
    r = audit.verify(tmp_path)
    assert not r.ok and r.problems[0].line == 3  # ...but the next entry's prev no longer matches


def test_deletion_detected(tmp_path):
    fill(tmp_path)
    ls = lines(tmp_path)
    del ls[1]
    write(tmp_path, ls)
    r = audit.verify(tmp_path)
    assert not r.ok and r.problems[0].line == 2
    assert "seq 3, expected 2" in r.problems[0].message


def test_reordering_detected(tmp_path):
    fill(tmp_path)
    ls = lines(tmp_path)
    ls[1], ls[2] = ls[2], ls[1]
    write(tmp_path, ls)
    r = audit.verify(tmp_path)
    assert not r.ok and r.problems[0].line == 2


def test_truncation_at_end_detected_by_head(tmp_path):
    fill(tmp_path)
    write(tmp_path, lines(tmp_path)[:3])
    r = audit.verify(tmp_path)
    assert not r.ok
    assert "head records seq 5" in r.problems[0].message


def test_torn_last_line_detected_and_blocks_appends(tmp_path):
    fill(tmp_path)
    raw = audit.log_path(tmp_path).read_bytes()
    audit.log_path(tmp_path).write_bytes(raw[:-20])
    r = audit.verify(tmp_path)
    assert not r.ok and r.problems[-1].line == 5 and "partial" in r.problems[-1].message
    with pytest.raises(audit.AuditError, match="partial line"):
        audit.append(tmp_path, "mode.set", reason="x")


def test_emptied_log_detected(tmp_path):
    fill(tmp_path, 2)
    audit.log_path(tmp_path).write_bytes(b"")
    assert not audit.verify(tmp_path).ok


def _writer(state: str, who: int, n: int) -> None:
    for i in range(n):
        audit.append(state, "apply", workload=f"w{who}", reason=f"{who}-{i}", actor=f"p{who}")


def test_concurrent_writers_keep_the_chain(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), k, 25)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    r = audit.verify(tmp_path)
    assert r.ok, [str(p) for p in r.problems]
    assert r.entries == 100
    es = audit.read(tmp_path)
    assert sorted(e["reason"] for e in es) == sorted(f"{k}-{i}" for k in range(4) for i in range(25))


def test_cli_verify_and_show(tmp_path, capsys):
    fill(tmp_path, 3)
    assert main(["--state-dir", str(tmp_path), "audit", "verify"]) == 0
    assert "3 entries, chain intact" in capsys.readouterr().out
    assert main(["--state-dir", str(tmp_path), "audit", "show", "-o", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [e["seq"] for e in shown] == [1, 2, 3]
    ls = lines(tmp_path)
    ls[0], ls[1] = ls[1], ls[0]
    write(tmp_path, ls)
    assert main(["--state-dir", str(tmp_path), "audit", "verify"]) == 1
    err = capsys.readouterr().err
    assert "line 1:" in err
