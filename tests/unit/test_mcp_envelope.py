"""MCP envelope derivation, round trip and matching (pure)."""

from __future__ import annotations

import json
import random

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.mcp_envelope import (
    EnvelopeError,
    EnvelopeOptions,
    McpEnvelope,
    derive_envelope,
    dump_envelope,
    parse_envelope,
)
from sensor.mcp_evidence import ArgumentEvidence, flatten, prompt_get_key, resource_read_key, tool_call_key
from sensor.profile import BehaviourStats
from sensor.workload import Workload

W = Workload.host("agent")
OPTS = EnvelopeOptions(min_count=3, min_sessions=3)
LOG, SHOW, TIME = tool_call_key("git_log"), tool_call_key("git_show"), tool_call_key("get_current_time")


def record(calls, evidence=None) -> ArgumentEvidence:
    """``calls``: (session, key, arguments) in order; timestamps follow the order."""
    e = evidence or ArgumentEvidence()
    for i, (s, key, args) in enumerate(calls):
        flat, cut = flatten(args)
        e.add(s, key, flat, 1_767_225_600.0 + i, cut)
    return e


def training() -> ArgumentEvidence:
    calls = []
    for s in range(4):
        sid = f"train-{s}"
        for n in (1, 5, 10):
            calls.append((sid, LOG, {"repo_path": "/srv/repo", "max_count": n}))
        calls.append((sid, SHOW, {"repo_path": "/srv/repo", "revision": f"{0x8cc56bf + s:x}"}))
        calls.append((sid, SHOW, {"repo_path": "/srv/repo/sub", "revision": f"{0xa1b2c3d4 + s:x}"}))
        calls.append((sid, TIME, {"timezone": ["Europe/Paris", "UTC"][s % 2]}))
        calls.append((sid, TIME, {"timezone": "America/New_York"}))
        calls.append((sid, tool_call_key("fetch"), {"url": f"https://api.example.com/v1/docs/{100 + s}",
                                                   "api_key": f"sk-{'A1b2' * 6}{s}"}))
    calls.append(("train-0", tool_call_key("git_commit"), {"repo_path": "/srv/repo", "message": "wip"}))
    return record(calls)


def entries(env: McpEnvelope) -> dict:
    return {p["entry"]: p for p in env.provenance}


def test_structural_envelope_names_each_rule_with_its_evidence():
    env = derive_envelope(W, training(), options=OPTS)
    got = entries(env)
    assert set(env.calls) == {LOG, SHOW, TIME, tool_call_key("fetch")}
    assert got[f"{LOG}#max_count:range:1..10 integer"]["evidence"]["count"] == 12
    assert got[f"{LOG}#max_count:range:1..10 integer"]["evidence"]["sessions"] == 4
    assert got[f"{LOG}#repo_path:path-prefix:/srv/repo/**"]["rule"] == "path-prefix"
    assert got[f"{SHOW}#revision:pattern:hash"]["evidence"]["count"] == 8
    assert f'{TIME}#timezone:enum:"America/New_York"' in got
    assert got[f"{tool_call_key('fetch')}#url:url:https://api.example.com/v1/docs/{{id}}"]["evidence"]["sessions"] == 4
    assert got[f"{tool_call_key('fetch')}#api_key:secret:any"]["rule"] == "secret"
    for p in env.provenance:
        assert p["substrate"] == "mcp" and p["admitted"] == "threshold" and p["evidence"]["count"] >= 3
    # seen too rarely: to review and watch, never silently dropped or admitted
    review = {r["key"]: r for r in env.review}
    assert review[tool_call_key("git_commit")]["why"] == "count 1 < 3; sessions 1 < 3"
    assert f'{TIME}#timezone:enum:"UTC"' in review and f'{TIME}#timezone:enum:"Europe/Paris"' in review
    assert set(review) <= set(env.watch)
    assert "sk-" not in dump_envelope(env)


def test_judge_allows_variation_inside_and_refuses_outside_with_a_reason():
    env = derive_envelope(W, training(), options=OPTS)
    ok = [(LOG, {"repo_path": "/srv/repo", "max_count": 7}),
          (LOG, {"repo_path": "/srv/repo/./docs", "max_count": 2}),
          (SHOW, {"repo_path": "/srv/repo", "revision": "d3adb33f00"}),
          (TIME, {"timezone": "America/New_York"}),
          (tool_call_key("fetch"), {"url": "https://api.example.com/v1/docs/31337", "api_key": "anything"})]
    for key, args in ok:
        v = env.judge_call(key, args)
        assert v.allowed, (key, args, v.reason)
    bad = [(LOG, {"repo_path": "/srv/other", "max_count": 2}, "repo_path"),
           (LOG, {"repo_path": "/srv/repo/../../etc", "max_count": 2}, "repo_path"),
           (LOG, {"repo_path": "/srv/repository", "max_count": 2}, "repo_path"),
           (LOG, {"repo_path": "/srv/repo", "max_count": 11}, "max_count"),
           (LOG, {"repo_path": "/srv/repo", "max_count": 2.5}, "max_count"),
           (LOG, {"repo_path": "/srv/repo", "max_count": "5"}, "max_count"),
           (LOG, {"repo_path": "/srv/repo", "start_timestamp": "2020"}, "never observed"),
           (SHOW, {"repo_path": "/srv/repo", "revision": "HEAD~3"}, "revision"),
           (TIME, {"timezone": "UTC"}, "under review"),
           (tool_call_key("fetch"), {"url": "https://evil.example/v1/docs/1"}, "url"),
           (tool_call_key("git_commit"), {"message": "x"}, "under review"),
           (tool_call_key("git_reset"), {"repo_path": "/srv/repo"}, "not in the allowlist")]
    for key, args, needle in bad:
        v = env.judge_call(key, args)
        assert not v.allowed and needle in v.reason, (key, args, v.reason)
    v = env.judge_call(TIME, {"timezone": "UTC"})
    assert v.watch and v.entry == f"{TIME}#timezone"
    assert env.judge_call(tool_call_key("git_commit"), {}).watch


def test_reasons_never_echo_secrets():
    env = derive_envelope(W, training(), options=OPTS)
    v = env.judge_call(LOG, {"repo_path": "ghp_" + "z" * 36, "max_count": 1})
    assert not v.allowed and "ghp_" not in v.reason and "<redacted>" in v.reason


def test_many_siblings_widen_to_their_directory_and_free_text_is_flagged():
    calls = []
    for s in range(3):
        for name in ("alpha", "beta", "gamma", "delta"):
            calls.append((f"s{s}", LOG, {"repo_path": f"/srv/repos/{name}"}))
        for i in range(12):
            calls.append((f"s{s}", tool_call_key("git_commit"), {"message": f"change number {s}-{i}"}))
    env = derive_envelope(W, record(calls), options=OPTS)
    got = entries(env)
    assert got[f"{LOG}#repo_path:path-prefix:/srv/repos/**"]["flags"] == ["directory-prefix"]
    assert env.judge_call(LOG, {"repo_path": "/srv/repos/epsilon"}).allowed
    assert not env.judge_call(LOG, {"repo_path": "/srv/other/alpha"}).allowed
    assert env.decisions["blindSpots"] == []
    free = [p for p in env.provenance if p["rule"] == "free-text"]
    assert len(free) == 1 and free[0]["flags"] == ["free-text"] and free[0]["entry"].endswith("length<=32")
    assert env.judge_call(tool_call_key("git_commit"), {"message": "another change"}).allowed
    assert not env.judge_call(tool_call_key("git_commit"), {"message": "x" * 33}).allowed


def test_evidence_that_was_cut_or_capped_is_a_listed_blind_spot():
    calls = [(f"s{s}", LOG, {"files": [f"f{s}-{i}" for i in range(100)]}) for s in range(3)]
    env = derive_envelope(W, record(calls), options=OPTS)
    spots = {b["key"]: b["finding"] for b in env.decisions["blindSpots"]}
    assert "3 call(s)" in spots[LOG] and "not kept" in spots[f"{LOG}#files[]"]


def test_literal_closure_keeps_exact_values():
    env = derive_envelope(W, training(), options=EnvelopeOptions(closure="literal", min_count=3, min_sessions=3))
    assert env.judge_call(LOG, {"repo_path": "/srv/repo", "max_count": 5}).allowed
    assert not env.judge_call(LOG, {"repo_path": "/srv/repo", "max_count": 7}).allowed
    assert not env.judge_call(LOG, {"repo_path": "/srv/repo/sub", "max_count": 5}).allowed


def test_profile_stats_decide_tool_confidence_and_admits_are_recorded():
    ev = training()
    stats = {tool_call_key("git_commit"): BehaviourStats(9, 4, 1.0, 2.0, session_ids=["a", "b", "c", "d"])}
    env = derive_envelope(W, ev, stats, OPTS)
    assert tool_call_key("git_commit") in env.calls
    env = derive_envelope(W, ev, options=EnvelopeOptions(min_count=3, min_sessions=3,
                                                         admits=((tool_call_key("git_commit"), "SEC-12"),)))
    p = entries(env)[tool_call_key("git_commit")]
    assert p["admitted"] == "admit" and p["reason"] == "SEC-12"
    with pytest.raises(EnvelopeError, match="not in the review list"):
        derive_envelope(W, ev, options=EnvelopeOptions(admits=(("mcp:tools/call:nope", "x"),)))
    with pytest.raises(EnvelopeError, match="reason"):
        derive_envelope(W, ev, options=EnvelopeOptions(admits=((tool_call_key("git_commit"), " "),)))


def test_prompts_and_resources():
    calls = []
    for s in range(3):
        calls.append((f"s{s}", prompt_get_key("summarise"), {"style": "short"}))
        calls.append((f"s{s}", resource_read_key("file:///logs/{name}"), {}))
        calls.append((f"s{s}", resource_read_key(f"https://docs.example.com/pages/{40 + s}"), {}))
    env = derive_envelope(W, record(calls), options=OPTS)
    assert env.judge_call(prompt_get_key("summarise"), {"style": "short"}).allowed
    assert not env.judge_call(prompt_get_key("summarise"), {"style": "long"}).allowed
    key = resource_read_key("file:///logs/{name}")
    assert env.judge_resource("file:///logs/app.log", "file:///logs/{name}", key).allowed
    assert not env.judge_resource("file:///etc/passwd", None, resource_read_key("file:///etc/passwd")).allowed
    assert env.judge_resource("https://docs.example.com/pages/7", None,
                              resource_read_key("https://docs.example.com/pages/7")).allowed


def test_catalog_records_tool_hashes_and_marks_tools_that_changed_while_observed():
    ev = training()
    ev.add_catalog("sha256:one", {"git_log": "sha256:a", "git_show": "sha256:b"}, 1.0)
    env = derive_envelope(W, ev, options=OPTS)
    assert env.catalog == {"fingerprints": ["sha256:one"], "tools": {"git_log": "sha256:a", "git_show": "sha256:b"}}
    ev.add_catalog("sha256:two", {"git_log": "sha256:a", "git_show": "sha256:c"}, 2.0)
    env = derive_envelope(W, ev, options=OPTS)
    assert env.tool_hash("git_log") == "sha256:a" and env.tool_hash("git_show") == "changed-during-observation"


def test_round_trip_yaml_and_json_is_byte_identical():
    env = derive_envelope(W, training(), options=OPTS)
    for fmt in ("yaml", "json"):
        text = dump_envelope(env, fmt)
        back = parse_envelope(text)
        assert dump_envelope(back, fmt) == text
        for key, args in ((LOG, {"repo_path": "/srv/repo", "max_count": 3}), (LOG, {"repo_path": "/x"})):
            assert back.judge_call(key, args) == env.judge_call(key, args)


@settings(max_examples=25, deadline=None)
@given(st.randoms(use_true_random=False))
def test_derivation_does_not_depend_on_the_order_evidence_arrived(rnd: random.Random):
    calls = []
    for s in range(4):
        for n in range(5):
            calls.append((f"s{s}", LOG, {"repo_path": rnd.choice(["/a/x", "/a/y", "/b"]), "max_count": n}))
    a = derive_envelope(W, record(calls), options=OPTS)
    # the same calls, sessions interleaved differently (each session keeps its own order of values)
    shuffled = sorted(calls, key=lambda c: (rnd.random(), c[0]))
    b = derive_envelope(W, record(shuffled), options=OPTS)
    def decided(env):  # what was allowed and reviewed, and on how much evidence (times follow arrival)
        spec = env.to_dict()["spec"]
        counts = [(p["entry"], p["evidence"]["count"], p["evidence"]["sessions"]) for p in spec["provenance"]]
        review = [(r["key"], r["evidence"]["count"], r["evidence"]["sessions"]) for r in spec["review"]]
        return json.dumps([spec["allow"], spec["watch"], counts, review], sort_keys=True)
    assert decided(a) == decided(b)
    assert dump_envelope(derive_envelope(W, record(calls), options=OPTS)) == dump_envelope(a)


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(kind="LeastPrivilegePolicy"), "kind"),
    (lambda d: d["spec"]["allow"]["calls"][0].update(key="syscall:read"), "key"),
    (lambda d: d["spec"]["allow"]["calls"][0]["arguments"].append({"path": "x", "rule": "magic"}), "rule"),
    (lambda d: d["spec"]["allow"]["calls"][0]["arguments"].append({"path": "x", "rule": "range", "min": 3, "max": 1}),
     "min"),
    (lambda d: d["spec"]["allow"]["calls"][0]["arguments"].append(
        {"path": "x", "rule": "path-prefix", "prefix": "/a/../b"}), "prefix"),
    (lambda d: d["spec"].update(mode="block"), "mode"),
    (lambda d: d["spec"]["allow"]["resources"].append({"rule": "url", "value": "nope"}), "resources"),
])
def test_bad_documents_are_one_line_errors_naming_the_field(mutate, needle):
    d = derive_envelope(W, training(), options=OPTS).to_dict()
    mutate(d)
    with pytest.raises(EnvelopeError) as e:
        parse_envelope(yaml.safe_dump(d), "env.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("env.yaml: ")
