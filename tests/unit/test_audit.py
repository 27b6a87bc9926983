"""Audit log: chain, MACs, head, durability under concurrent writers, and ``verify`` catching
every tampering case below (also through ``envelope audit verify``).

The tampering cases, each a test of :data:`CASES` (what an attacker without the audit key can
do: anyone who can write the state directory but is not root), then the root attacker's, who
holds the key and is caught only by the checkpoints published off the node:

edits of each field of an entry (seq, time, actor, action, workload, reason, details, prev,
hash, mac); an edit re-hashed; an edit re-hashed with every later hash re-chained; a middle
entry deleted; the first entry deleted; two entries swapped; the last entry moved first; an
entry replayed; the last entry cut off; the log emptied; a torn last line; a line of garbage;
a field added; an entry forged and appended; the head deleted; the head deleted and the end cut
off; the head's seq edited; log and head deleted; log, head and key deleted; the key replaced;
and, with the key (root): history rewritten and one entry appended with the head untouched;
history rewritten with a fresh head (local verify cannot tell; the anchor can); the end cut off
with the head rolled back (the anchor); everything deleted (the anchor).
"""

from __future__ import annotations

import json
import multiprocessing
import os

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


def dumps(e: dict) -> str:
    return json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n"


def entries(state) -> list[dict]:
    return [json.loads(x) for x in lines(state)]


def test_chain_fields_mac_and_head(tmp_path):
    fill(tmp_path, 3)
    es = audit.read(tmp_path)
    assert [e["seq"] for e in es] == [1, 2, 3]
    assert es[0]["prev"] == audit.GENESIS
    assert es[1]["prev"] == es[0]["hash"] and es[2]["prev"] == es[1]["hash"]
    assert set(es[0]) == set(audit.FIELDS)
    assert es[0]["time"] == "2027-01-15T08:00:00.000000Z"
    assert es[0]["hash"] == audit.entry_hash(es[0])
    key = audit.read_key(tmp_path)
    assert len(key) == 32 and es[0]["mac"] == audit.entry_mac(key, es[0]["hash"])
    assert audit.verify(tmp_path).ok
    head = json.loads(audit.head_path(tmp_path).read_text())
    assert head == {"seq": 3, "hash": es[2]["hash"], "mac": audit.head_mac(key, 3, es[2]["hash"])}


def test_the_key_is_root_only(tmp_path):
    old = os.umask(0)
    try:
        fill(tmp_path, 1)
    finally:
        os.umask(old)
    assert os.stat(audit.key_path(tmp_path)).st_mode & 0o777 == 0o600
    assert os.stat(audit.key_path(tmp_path).parent).st_mode & 0o777 == 0o700
    assert os.stat(audit.log_path(tmp_path)).st_mode & 0o777 == 0o600
    os.chmod(audit.key_path(tmp_path), 0o644)
    r = audit.verify(tmp_path)
    assert not r.ok and "readable by others" in str(r.problems[0])
    with pytest.raises(audit.AuditError, match="readable by others"):
        audit.append(tmp_path, "mode.set", reason="x")


# ---- tampering without the key ----------------------------------------------------------------


def _edit(field, value):
    def do(state):
        ls = lines(state)
        e = json.loads(ls[2])
        e[field] = value
        ls[2] = dumps(e)
        write(state, ls)
    return do


def _rehash(state):
    ls = lines(state)
    e = json.loads(ls[1])
    e["details"]["to"] = "observe"
    e["hash"] = audit.entry_hash(e)
    ls[1] = dumps(e)
    write(state, ls)


def _rechain(state):
    """Edit entry 2 and recompute every hash and prev after it (no key: MACs stay old)."""
    es = entries(state)
    es[1]["reason"] = "nothing to see"
    prev = es[0]["hash"]
    for e in es[1:]:
        e["prev"] = prev
        e["hash"] = prev = audit.entry_hash(e)
    write(state, [dumps(e) for e in es])
    head = json.loads(audit.head_path(state).read_text())
    head["hash"] = es[-1]["hash"]
    audit.head_path(state).write_text(json.dumps(head))


def _lines_op(fn):
    def do(state):
        write(state, fn(lines(state)))
    return do


def _forge_append(state):
    es = entries(state)
    e = {"seq": 6, "time": es[-1]["time"], "actor": "root", "action": "mode.set", "workload": "x",
         "reason": "forged", "details": {}, "prev": es[-1]["hash"]}
    e["hash"] = audit.entry_hash(e)
    e["mac"] = "0" * 64
    write(state, lines(state) + [dumps(e)])


def _unlink(*names):
    def do(state):
        for n in names:
            {"log": audit.log_path, "head": audit.head_path, "key": audit.key_path}[n](state).unlink()
    return do


def _head_seq(state):
    head = json.loads(audit.head_path(state).read_text())
    head["seq"] = 3
    audit.head_path(state).write_text(json.dumps(head))


def _other_key(state):
    os.chmod(audit.key_path(state), 0o600)
    audit.key_path(state).write_bytes(b"k" * 32)


CASES = {
    "edit seq": (_edit("seq", 7), "seq 7, expected 3"),
    "edit time": (_edit("time", "2020-01-01T00:00:00.000000Z"), "hash mismatch"),
    "edit actor": (_edit("actor", "alice"), "hash mismatch"),
    "edit action": (_edit("action", "exception.add"), "hash mismatch"),
    "edit workload": (_edit("workload", "default/Deployment/b/main"), "hash mismatch"),
    "edit reason": (_edit("reason", "nothing to see"), "hash mismatch"),
    "edit details": (_edit("details", {"to": "observe"}), "hash mismatch"),
    "edit prev": (_edit("prev", "f" * 64), "prev does not match"),
    "edit hash": (_edit("hash", "e" * 64), "hash mismatch"),
    "edit mac": (_edit("mac", "d" * 64), "MAC does not authenticate"),
    "edit rehashed": (_rehash, "MAC does not authenticate"),
    "edit rehashed, chain recomputed": (_rechain, "MAC does not authenticate"),
    "delete a middle entry": (_lines_op(lambda ls: ls[:1] + ls[2:]), "seq 3, expected 2"),
    "delete the first entry": (_lines_op(lambda ls: ls[1:]), "seq 2, expected 1"),
    "swap two entries": (_lines_op(lambda ls: [ls[0], ls[2], ls[1], *ls[3:]]), "seq 3, expected 2"),
    "move the last entry first": (_lines_op(lambda ls: [ls[-1], *ls[:-1]]), "seq 5, expected 1"),
    "replay an entry": (_lines_op(lambda ls: ls[:3] + [ls[2]] + ls[3:]), "seq 3, expected 4"),
    "cut off the last entry": (_lines_op(lambda ls: ls[:-1]), "head records seq 5"),
    "empty the log": (_lines_op(lambda ls: []), "log is empty but its key exists"),
    "torn last line": (lambda s: audit.log_path(s).write_bytes(audit.log_path(s).read_bytes()[:-20]),
                       "partial last line"),
    "insert garbage": (_lines_op(lambda ls: ls[:2] + ["not json\n"] + ls[2:]), "not a JSON audit entry"),
    "add a field": (_edit("note", "x"), "unexpected ['note']"),
    "forge and append an entry": (_forge_append, "MAC does not authenticate"),
    "delete the head": (_unlink("head"), "head deleted?"),
    "delete the head, cut off the end": (lambda s: (_unlink("head")(s), _lines_op(lambda ls: ls[:-2])(s)),
                                         "head deleted?"),
    "edit the head's seq": (_head_seq, "head written without the audit key"),
    "delete log and head": (_unlink("log", "head"), "log is missing but its key exists"),
    "replace the key": (_other_key, "MAC does not authenticate"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tampering_without_the_key_is_detected(tmp_path, case):
    fill(tmp_path)
    assert audit.verify(tmp_path).ok
    tamper, expected = CASES[case]
    tamper(tmp_path)
    r = audit.verify(tmp_path)
    assert not r.ok, case
    assert any(expected in str(p) for p in r.problems), [str(p) for p in r.problems]


def test_everything_deleted_reads_as_empty_locally_but_not_against_the_anchor(tmp_path):
    fill(tmp_path)
    published = [audit.Checkpoint(5, entries(tmp_path)[-1]["hash"], "anchor")]
    _unlink("log", "head", "key")(tmp_path)
    assert audit.verify(tmp_path).ok  # indistinguishable from a node that never wrote one...
    r = audit.verify(tmp_path, published)  # ...but the cluster remembers
    assert not r.ok and r.anchored and "checkpoint seq 5" in str(r.problems[0])


# ---- tampering with the key: root on the node ---------------------------------------------------


def _root_rewrite(state, reason="rewritten", keep=None):
    """Rewrite history with the key, as root can: every entry re-hashed and re-MACed."""
    key = audit.read_key(state)
    es = entries(state)[:keep]
    prev = audit.GENESIS
    for e in es:
        if e["seq"] == 2:
            e["reason"] = reason
        e["prev"] = prev
        e["hash"] = prev = audit.entry_hash(e)
        e["mac"] = audit.entry_mac(key, e["hash"])
    write(state, [dumps(e) for e in es])
    return key, es


def test_root_rewrite_with_one_entry_appended_and_the_head_untouched(tmp_path):
    fill(tmp_path)
    key, es = _root_rewrite(tmp_path)
    e = {"seq": 6, "time": es[-1]["time"], "actor": "root", "action": "mode.set", "workload": None,
         "reason": "cover", "details": {}, "prev": es[-1]["hash"]}
    e["hash"] = audit.entry_hash(e)
    e["mac"] = audit.entry_mac(key, e["hash"])
    write(tmp_path, lines(tmp_path) + [dumps(e)])
    r = audit.verify(tmp_path)
    assert not r.ok and "entry 5's hash differs from the head's" in str(r.problems[0])


def test_root_rewrite_with_a_fresh_head_is_caught_by_the_anchor(tmp_path):
    fill(tmp_path)
    published = [audit.Checkpoint(e["seq"], e["hash"], "anchor") for e in entries(tmp_path)[2:4]]
    key, es = _root_rewrite(tmp_path)
    head = {"seq": 5, "hash": es[-1]["hash"], "mac": audit.head_mac(key, 5, es[-1]["hash"])}
    audit.head_path(tmp_path).write_text(json.dumps(head))
    assert audit.verify(tmp_path).ok  # consistent on the node: this is what the anchor is for
    r = audit.verify(tmp_path, published)
    assert not r.ok and r.checkpoints == 2
    assert "entry 3 differs from the checkpoint" in str(r.problems[0])


def test_root_truncation_with_the_head_rolled_back_is_caught_by_the_anchor(tmp_path):
    fill(tmp_path)
    published = [audit.Checkpoint(5, entries(tmp_path)[-1]["hash"], "anchor")]
    key = audit.read_key(tmp_path)
    es = entries(tmp_path)[:3]
    write(tmp_path, [dumps(e) for e in es])
    audit.head_path(tmp_path).write_text(json.dumps(
        {"seq": 3, "hash": es[-1]["hash"], "mac": audit.head_mac(key, 3, es[-1]["hash"])}))
    assert audit.verify(tmp_path).ok
    r = audit.verify(tmp_path, published)
    assert not r.ok and "checkpoint seq 5" in str(r.problems[0]) and "not in the log" in str(r.problems[0])


def test_the_anchor_accepts_an_intact_log(tmp_path):
    fill(tmp_path)
    published = [audit.Checkpoint(e["seq"], e["hash"]) for e in entries(tmp_path)]
    r = audit.verify(tmp_path, published)
    assert r.ok and r.checkpoints == 5 and r.anchored


# ---- appends --------------------------------------------------------------------------------------


def test_torn_last_line_blocks_appends(tmp_path):
    fill(tmp_path)
    raw = audit.log_path(tmp_path).read_bytes()
    audit.log_path(tmp_path).write_bytes(raw[:-20])
    with pytest.raises(audit.AuditError, match="partial line"):
        audit.append(tmp_path, "mode.set", reason="x")


def test_a_forged_last_entry_blocks_appends(tmp_path):
    fill(tmp_path)
    _forge_append(tmp_path)
    with pytest.raises(audit.AuditError, match="does not authenticate"):
        audit.append(tmp_path, "mode.set", reason="x")


def test_an_interrupted_append_is_reported(tmp_path):
    """The entry is durable before the head is written: a crash between the two leaves one entry
    after the head, which verify reports rather than accepts silently."""
    fill(tmp_path, 3)
    head = audit.head_path(tmp_path).read_text()
    fill(tmp_path, 1)
    audit.head_path(tmp_path).write_text(head)
    r = audit.verify(tmp_path)
    assert not r.ok and "1 entries after the head" in str(r.problems[0])


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
