"""File closure through derivation (``derive --substrates file``): named widenings, kinds kept
apart, sensitive paths exact-only, confidence, review and watch."""

from __future__ import annotations

import pytest

from enforcer.derive import DeriveError
from tests.file_profiles import derive_files, provenance, rules


def test_more_than_k_siblings_become_children_and_fewer_stay_exact():
    spec = {f"file:read:/usr/lib/python3.11/{m}.py": (3, 3, 0) for m in "abcd"}
    spec |= {f"file:read:/etc/ssl/certs/{c}.pem": (5, 3, 0) for c in "xy"}
    p = derive_files(spec)
    got = rules(p)
    assert got == {"file:read:/usr/lib/python3.11/*": "directory-children",
                   "file:read:/etc/ssl/certs/x.pem": "exact", "file:read:/etc/ssl/certs/y.pem": "exact"}
    pr = provenance(p, "file:read:/usr/lib/python3.11/*")
    assert pr["evidence"]["count"] == 12 and "directory-children" in pr["flags"]
    assert p.decisions["closure"]["flagged"] == ["file:read:/usr/lib/python3.11/*"]


def test_subdirectories_become_a_tree_that_single_sessions_earn_together():
    # per-session output directories: each seen once, together over five sessions
    spec = {f"file:write:/srv/work/run-{i}/out.json": (1, 1, i) for i in range(5)}
    p = derive_files(spec, min_count=5, min_sessions=5)
    assert p.files == ("file:write:/srv/work/**",)
    pr = provenance(p, "file:write:/srv/work/**")
    assert pr["rule"] == "directory-tree" and pr["evidence"]["sessions"] == 5
    assert not p.review and not p.watch


def test_tree_depth_is_honoured_and_never_the_root():
    spec = {f"file:read:/d{i}/f": (9, 3, 0) for i in range(5)}
    assert all("**" not in e for e in derive_files(spec, file_tree_depth=1).files)
    spec = {f"file:read:/opt/d{i}/f": (9, 3, 0) for i in range(5)}
    assert derive_files(spec, file_tree_depth=1).files == ("file:read:/opt/**",)
    assert "file:read:/opt/**" not in derive_files(spec).files  # the default depth is 2
    assert derive_files({f"file:read:/opt/x/d{i}/f": (9, 3, 0) for i in range(5)}).files == (
        "file:read:/opt/x/**",)


def test_a_read_never_admits_a_write():
    spec = {f"file:read:/srv/data/{c}": (9, 3, 0) for c in "abcde"}
    spec["file:write:/srv/data/a"] = (9, 3, 0)
    p = derive_files(spec)
    assert "file:read:/srv/data/*" in p.files
    assert p.allows("file:write:/srv/data/a")
    assert not p.allows("file:write:/srv/data/b")
    assert not p.allows("file:create:/srv/data/b")


def test_sensitive_paths_stay_exact_and_block_widening():
    spec = {f"file:read:/home/agent/{c}": (9, 3, 0) for c in "abcde"}
    spec["file:read:/home/agent/.aws/credentials"] = (9, 3, 0)
    spec["file:read:/var/run/secrets/kubernetes.io/serviceaccount/token"] = (1, 1, 0)
    p = derive_files(spec)
    got = rules(p)
    assert "file:read:/home/agent/*" not in got  # would cover /home/agent/.aws etc.
    assert got["file:read:/home/agent/a"] == "exact"
    assert "blocked" in provenance(p, "file:read:/home/agent/a")["detail"]
    assert got["file:read:/home/agent/.aws/credentials"] == "exact:sensitive"
    # below the threshold: neither allowed nor dropped
    token = "file:read:/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert [r["key"] for r in p.review] == [token]
    assert p.review[0]["why"] == "count 1 < 5; sessions 1 < 3" and p.review[0]["rule"] == "exact:sensitive"
    assert p.watch == (token,)


def test_below_threshold_patterns_go_to_review_with_their_members_on_watch():
    p = derive_files({f"file:read:/opt/x/{c}": (1, 1, 0) for c in "abcd"})
    assert not p.files
    assert [r["key"] for r in p.review] == ["file:read:/opt/x/*"]
    assert len(p.watch) == 4


def test_an_admit_takes_one_reviewed_file_entry_with_its_reason():
    token = "file:read:/var/run/secrets/kubernetes.io/serviceaccount/token"
    p = derive_files({token: (1, 1, 0), "file:read:/etc/hosts": (9, 3, 0)},
                     admits=((token, "SEC-7: reads its own token"),))
    assert token in p.files
    assert provenance(p, token)["admitted"] == "admit" and provenance(p, token)["reason"].startswith("SEC-7")


def test_literal_closure_keeps_every_path():
    spec = {f"file:read:/opt/x/{c}": (9, 3, 0) for c in "abcd"}
    p = derive_files(spec, closure="literal")
    assert sorted(p.files) == sorted(spec)
    assert set(rules(p).values()) == {"literal"}


def test_unparseable_file_keys_are_reviewed_not_dropped():
    p = derive_files({"file:read:relative/path": (9, 3, 0), "file:read:/etc/hosts": (9, 3, 0)})
    assert p.files == ("file:read:/etc/hosts",)
    assert [r["key"] for r in p.review] == ["file:read:relative/path"]
    assert p.review[0]["why"] == "cannot be encoded by this substrate"


def test_bad_options_are_one_line_errors():
    with pytest.raises(DeriveError, match="file-tree-depth"):
        derive_files({"file:read:/etc/hosts": (9, 3, 0)}, file_tree_depth=0)
    with pytest.raises(DeriveError, match="max-siblings"):
        derive_files({"file:read:/etc/hosts": (9, 3, 0)}, max_siblings=0)


def test_the_closure_decision_is_recorded():
    p = derive_files({"file:read:/etc/hosts": (9, 3, 0)})
    assert p.decisions["granularity"]["substrates"] == ["file"]
    assert p.decisions["closure"]["rules"]["file"]["rule"] == "directory-children+directory-tree"
    assert p.decisions["closure"]["rules"]["file"]["treeMinDepth"] == 2


def test_deterministic():
    spec = {f"file:read:/opt/d{i}/f{j}": (i + j + 3, 3, 0) for i in range(5) for j in range(3)}
    from enforcer.policy import dump_policy
    a = dump_policy(derive_files(spec, file_tree_depth=1))
    b = dump_policy(derive_files(dict(reversed(list(spec.items()))), file_tree_depth=1))
    assert a == b


def test_per_session_directories_under_tmp_stay_in_review_at_the_default_depth():
    """/tmp/** is never derived unless asked for (--file-tree-depth 1): /tmp is shared."""
    spec = {f"file:write:/tmp/run-{i}/out.json": (1, 1, i) for i in range(5)}
    p = derive_files(spec, min_count=5, min_sessions=5)
    assert not p.files
    assert sorted(p.watch) == sorted(spec)
    assert derive_files(spec, min_count=5, min_sessions=5, file_tree_depth=1).files == ("file:write:/tmp/**",)
