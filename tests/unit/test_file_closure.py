"""File closure: named widenings, kinds kept apart, sensitive paths exact-only, confidence."""

from __future__ import annotations

import pytest

from enforcer.file_closure import FileClosureError, FileClosureOptions, allows, derive_files
from sensor.profile import BehaviourStats

T0 = 1_767_225_600.0


def stats(count: int, sessions: int, first: int = 0) -> BehaviourStats:
    return BehaviourStats(count, sessions, T0 + first, T0 + first + 60,
                          session_ids=[f"s{first + i}" for i in range(sessions)])


def by_entry(result):
    return {e.entry: e for e in result.allowed}


def test_more_than_k_siblings_become_children_and_fewer_stay_exact():
    keys = {f"file:read:/usr/lib/python3.11/{m}.py": stats(2, 3) for m in "abcd"}
    keys |= {f"file:read:/etc/ssl/certs/{c}.pem": stats(5, 3) for c in "xy"}
    r = derive_files(keys)
    got = by_entry(r)
    assert got["file:read:/usr/lib/python3.11/*"].rule == "directory-children"
    assert got["file:read:/usr/lib/python3.11/*"].evidence["count"] == 8
    assert "directory-children" in got["file:read:/usr/lib/python3.11/*"].flags
    assert got["file:read:/etc/ssl/certs/x.pem"].rule == "exact"
    assert set(got) == {"file:read:/usr/lib/python3.11/*", "file:read:/etc/ssl/certs/x.pem",
                        "file:read:/etc/ssl/certs/y.pem"}


def test_subdirectories_become_a_tree_that_single_sessions_earn_together():
    # per-session output directories: each seen once, together over five sessions
    keys = {f"file:write:/tmp/work/run-{i}/out.json": stats(1, 1, first=i) for i in range(5)}
    r = derive_files(keys, FileClosureOptions(min_count=5, min_sessions=5))
    assert [e.entry for e in r.allowed] == ["file:write:/tmp/work/**"]
    assert r.allowed[0].rule == "directory-tree" and r.allowed[0].evidence["sessions"] == 5
    assert not r.review and not r.watch


def test_tree_never_at_the_root_and_min_depth_is_honoured():
    keys = {f"file:read:/d{i}/f": stats(9, 9) for i in range(5)}
    assert all("**" not in e.entry for e in derive_files(keys).allowed)
    keys = {f"file:read:/opt/d{i}/f": stats(9, 9) for i in range(5)}
    assert [e.entry for e in derive_files(keys).allowed] == ["file:read:/opt/**"]
    assert "file:read:/opt/**" not in derive_files(keys, FileClosureOptions(tree_min_depth=2)).entries()


def test_a_read_never_admits_a_write():
    keys = {f"file:read:/srv/data/{c}": stats(9, 9) for c in "abcde"}
    keys["file:write:/srv/data/a"] = stats(9, 9)
    r = derive_files(keys)
    assert "file:read:/srv/data/*" in r.entries()
    assert allows(r.allowed, "file:write:/srv/data/a")
    assert not allows(r.allowed, "file:write:/srv/data/b")
    assert not allows(r.allowed, "file:create:/srv/data/b")


def test_sensitive_paths_stay_exact_and_block_widening():
    keys = {f"file:read:/home/agent/{c}": stats(9, 9) for c in "abcde"}
    keys["file:read:/home/agent/.aws/credentials"] = stats(9, 9)
    keys["file:read:/var/run/secrets/kubernetes.io/serviceaccount/token"] = stats(1, 1)
    r = derive_files(keys)
    got = by_entry(r)
    assert "file:read:/home/agent/*" not in got  # would cover /home/agent/.aws etc.
    assert got["file:read:/home/agent/a"].rule == "exact"
    assert "blocked" in got["file:read:/home/agent/a"].detail
    assert got["file:read:/home/agent/.aws/credentials"].rule == "exact:sensitive"
    # below the threshold: neither allowed nor dropped
    assert [x.key for x in r.review] == ["file:read:/var/run/secrets/kubernetes.io/serviceaccount/token"]
    assert r.review[0].why == "count 1 < 5; sessions 1 < 3"
    assert r.watch == ("file:read:/var/run/secrets/kubernetes.io/serviceaccount/token",)


def test_below_threshold_patterns_go_to_review_with_their_members_on_watch():
    keys = {f"file:read:/opt/x/{c}": stats(1, 1) for c in "abcd"}
    r = derive_files(keys)
    assert not r.allowed
    assert [x.key for x in r.review] == ["file:read:/opt/x/*"]
    assert len(r.watch) == 4


def test_literal_closure_keeps_every_path():
    keys = {f"file:read:/opt/x/{c}": stats(9, 9) for c in "abcd"}
    r = derive_files(keys, FileClosureOptions(closure="literal"))
    assert sorted(r.entries()) == sorted(keys)
    assert {e.rule for e in r.allowed} == {"literal"}


def test_unparseable_file_keys_are_reviewed_not_dropped():
    r = derive_files({"file:read:relative/path": stats(9, 9), "syscall:read": stats(9, 9)})
    assert [x.key for x in r.review] == ["file:read:relative/path"]
    assert r.review[0].why == "cannot be encoded by this substrate"


def test_bad_options_are_one_line_errors():
    with pytest.raises(FileClosureError, match="tree-min-depth"):
        derive_files({}, FileClosureOptions(tree_min_depth=0))
    with pytest.raises(FileClosureError, match="file closure"):
        derive_files({}, FileClosureOptions(closure="probabilistic"))


def test_deterministic():
    keys = {f"file:read:/opt/d{i}/f{j}": stats(i + j + 1, 3) for i in range(5) for j in range(3)}
    a = derive_files(keys).to_dict()
    b = derive_files(dict(reversed(list(keys.items())))).to_dict()
    assert a == b
