"""The MCP envelope as a policy section: derivation through ``envelope derive``'s four decisions,
round trip and matching (pure)."""

from __future__ import annotations

import copy
import json
import random

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.derive import DeriveError, derive
from enforcer.mcp_envelope import McpJudge
from enforcer.policy import PolicyError, dump_policy, parse_policy
from sensor.mcp_evidence import ArgumentEvidence, prompt_get_key, resource_read_key, tool_call_key
from sensor.profile import BehaviourStats

from tests.unit.mcp_profiles import options, record

LOG, SHOW, TIME = tool_call_key("git_log"), tool_call_key("git_show"), tool_call_key("get_current_time")


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
    return calls


def derived(calls=None, catalogs=(), **kw):
    policy = derive(record(training() if calls is None else calls, catalogs), options(**kw))
    return policy, McpJudge.of(policy)


def entries(policy) -> dict:
    return {p["entry"]: p for p in policy.provenance}


def test_structural_envelope_names_each_rule_with_its_evidence():
    policy, _ = derived()
    got = entries(policy)
    assert set(policy.mcp.calls) == {LOG, SHOW, TIME, tool_call_key("fetch")}
    assert got[LOG]["rule"] == "exact" and got[LOG]["evidence"]["count"] == 12
    assert got[f"{LOG}#max_count:range:1..10 integer"]["evidence"]["count"] == 12
    assert got[f"{LOG}#max_count:range:1..10 integer"]["evidence"]["sessions"] == 4
    assert got[f"{LOG}#repo_path:path-prefix:/srv/repo/**"]["rule"] == "path-prefix"
    assert got[f"{SHOW}#revision:pattern:hash"]["evidence"]["count"] == 8
    assert f'{TIME}#timezone:enum:"America/New_York"' in got
    assert got[f"{tool_call_key('fetch')}#url:url:https://api.example.com/v1/docs/{{id}}"]["evidence"]["sessions"] == 4
    assert got[f"{tool_call_key('fetch')}#api_key:secret:any"]["rule"] == "secret"
    for p in policy.provenance:
        assert p["substrate"] == "mcp" and p["admitted"] == "threshold" and p["evidence"]["count"] >= 3
    # seen too rarely: to review and watch, never silently dropped or admitted
    review = {r["key"]: r for r in policy.review}
    assert review[tool_call_key("git_commit")]["why"] == "count 1 < 3; sessions 1 < 3"
    assert f'{TIME}#timezone:enum:"UTC"' in review and f'{TIME}#timezone:enum:"Europe/Paris"' in review
    assert set(review) <= set(policy.watch)
    assert "sk-" not in dump_policy(policy)
    # the policy answers for the keys; the decisions name the substrate's rules and thresholds
    assert policy.allows(LOG) and not policy.allows(tool_call_key("git_commit")) and policy.allows("mcp:tools/call:"
                                                                                                   "fetch")
    assert policy.decisions["closure"]["rules"]["mcp"]["rule"] == "exact-tools+argument-envelopes"
    assert policy.decisions["confidence"]["minSessions"] == {"mcp": 3}


def test_judge_allows_variation_inside_and_refuses_outside_with_a_reason():
    _, judge = derived()
    ok = [(LOG, {"repo_path": "/srv/repo", "max_count": 7}),
          (LOG, {"repo_path": "/srv/repo/./docs", "max_count": 2}),
          (SHOW, {"repo_path": "/srv/repo", "revision": "d3adb33f00"}),
          (TIME, {"timezone": "America/New_York"}),
          (tool_call_key("fetch"), {"url": "https://api.example.com/v1/docs/31337", "api_key": "anything"})]
    for key, args in ok:
        v = judge.judge_call(key, args)
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
        v = judge.judge_call(key, args)
        assert not v.allowed and needle in v.reason, (key, args, v.reason)
    v = judge.judge_call(TIME, {"timezone": "UTC"})
    assert v.watch and v.entry == f"{TIME}#timezone"
    assert judge.judge_call(tool_call_key("git_commit"), {}).watch


def test_exceptions_admit_a_whole_call_or_one_argument_path():
    _, judge = derived()
    reset, commit = tool_call_key("git_reset"), tool_call_key("git_commit")
    judge.set_exceptions({reset: "exception:a1", f"{LOG}#repo_path": "exception:b2", "syscall:ptrace": "exception:c3"})
    v = judge.judge_call(reset, {"repo_path": "/anything"})
    assert v.allowed and v.exception == "exception:a1" and judge.allows_tool("git_reset")
    v = judge.judge_call(LOG, {"repo_path": "/srv/other", "max_count": 2})
    assert v.allowed and v.exception == "exception:b2"
    assert not judge.judge_call(LOG, {"repo_path": "/srv/other", "max_count": 99}).allowed  # other paths still judged
    assert not judge.judge_call(commit, {}).allowed and "syscall:ptrace" not in judge.exceptions
    judge.set_exceptions({})
    assert not judge.judge_call(reset, {}).allowed


def test_reasons_never_echo_secrets():
    _, judge = derived()
    v = judge.judge_call(LOG, {"repo_path": "ghp_" + "z" * 36, "max_count": 1})
    assert not v.allowed and "ghp_" not in v.reason and "<redacted>" in v.reason


def test_many_siblings_widen_to_their_directory_and_free_text_is_flagged():
    calls = []
    for s in range(3):
        for name in ("alpha", "beta", "gamma", "delta"):
            calls.append((f"s{s}", LOG, {"repo_path": f"/srv/repos/{name}"}))
        for i in range(12):
            calls.append((f"s{s}", tool_call_key("git_commit"), {"message": f"change number {s}-{i}"}))
    policy, judge = derived(calls)
    got = entries(policy)
    assert got[f"{LOG}#repo_path:path-prefix:/srv/repos/**"]["flags"] == ["directory-prefix"]
    assert judge.judge_call(LOG, {"repo_path": "/srv/repos/epsilon"}).allowed
    assert not judge.judge_call(LOG, {"repo_path": "/srv/other/alpha"}).allowed
    assert not [r for r in policy.review if r["rule"] == "blind-spot"]
    free = [p for p in policy.provenance if p["rule"] == "free-text"]
    assert len(free) == 1 and free[0]["flags"] == ["free-text"] and free[0]["entry"].endswith("length<=32")
    assert judge.judge_call(tool_call_key("git_commit"), {"message": "another change"}).allowed
    assert not judge.judge_call(tool_call_key("git_commit"), {"message": "x" * 33}).allowed


def test_evidence_that_was_cut_or_capped_is_a_listed_blind_spot():
    calls = [(f"s{s}", LOG, {"files": [f"f{s}-{i}" for i in range(100)]}) for s in range(3)]
    policy, _ = derived(calls)
    spots = {r["key"]: r["why"] for r in policy.review if r["rule"] == "blind-spot"}
    assert "3 call(s)" in spots[f"{LOG}#<cut>"] and "not kept" in spots[f"{LOG}#files[]"]
    assert not set(spots) & set(policy.watch)  # findings, not behaviours to watch


def test_literal_closure_keeps_exact_values():
    _, judge = derived(closure="literal")
    assert judge.judge_call(LOG, {"repo_path": "/srv/repo", "max_count": 5}).allowed
    assert not judge.judge_call(LOG, {"repo_path": "/srv/repo", "max_count": 7}).allowed
    assert not judge.judge_call(LOG, {"repo_path": "/srv/repo/sub", "max_count": 5}).allowed


def test_tool_confidence_comes_from_the_profile_and_admits_are_recorded():
    profile = record(training())
    commit = tool_call_key("git_commit")
    contribution = profile.nodes["node-a/mcp"]
    contribution.behaviours[commit] = BehaviourStats(9, 4, 1.0, 2.0, session_ids=["a", "b", "c", "d"])
    assert commit in derive(profile, options()).mcp.calls
    policy = derive(record(training()), options(admits=((commit, "SEC-12"),)))
    p = entries(policy)[commit]
    assert p["admitted"] == "admit" and p["reason"] == "SEC-12"
    arg = f'{TIME}#timezone:enum:"UTC"'
    policy = derive(record(training()), options(admits=((arg, "SEC-13"),)))
    assert entries(policy)[arg]["reason"] == "SEC-13" and McpJudge.of(policy).judge_call(TIME, {"timezone": "UTC"}).allowed
    for admit, needle in (("mcp:tools/call:nope", "not in the review list"),
                          (f"{LOG}#max_count:enum:99", "not in the review list"),
                          (f"{tool_call_key('git_reset')}#x:enum:1", "its tool is not allowed")):
        with pytest.raises(DeriveError, match=needle):
            derive(record(training()), options(admits=((admit, "x"),)))
    with pytest.raises(DeriveError, match="reason"):
        derive(record(training()), options(admits=((commit, " "),)))


def test_prompts_and_resources():
    calls = []
    for s in range(3):
        calls.append((f"s{s}", prompt_get_key("summarise"), {"style": "short"}))
        calls.append((f"s{s}", resource_read_key("file:///logs/{name}"), {}))
        calls.append((f"s{s}", resource_read_key(f"https://docs.example.com/pages/{40 + s}"), {}))
    policy, judge = derived(calls)
    assert judge.judge_call(prompt_get_key("summarise"), {"style": "short"}).allowed
    assert not judge.judge_call(prompt_get_key("summarise"), {"style": "long"}).allowed
    key = resource_read_key("file:///logs/{name}")
    assert judge.judge_resource("file:///logs/app.log", "file:///logs/{name}", key).allowed
    assert not judge.judge_resource("file:///etc/passwd", None, resource_read_key("file:///etc/passwd")).allowed
    assert judge.judge_resource("https://docs.example.com/pages/7", None,
                                resource_read_key("https://docs.example.com/pages/7")).allowed
    assert entries(policy)["mcp:resources/read#url:https://docs.example.com/pages/{id}"]["rule"] == "url-pattern"
    assert policy.allows(key) and policy.allows(resource_read_key("https://docs.example.com/pages/99"))
    assert not policy.allows(resource_read_key("https://evil.example.com/pages/99"))


def test_catalog_records_tool_hashes_and_marks_tools_that_changed_while_observed():
    one = ("sha256:one", {"git_log": "sha256:a", "git_show": "sha256:b"})
    policy, _ = derived(catalogs=[one])
    assert policy.mcp.catalog == {"git_log": "sha256:a", "git_show": "sha256:b"}
    assert policy.validity["fingerprint"]["tool_catalog"] == ["sha256:one"]
    assert {"name": "tool-catalog-change", "key": "tool_catalog", "source": "fingerprint"} in policy.validity["triggers"]
    policy, judge = derived(catalogs=[one, ("sha256:two", {"git_log": "sha256:a", "git_show": "sha256:c"})])
    assert judge.tool_hash("git_log") == "sha256:a" and judge.tool_hash("git_show") == "changed-during-observation"
    assert sorted(policy.validity["fingerprint"]["tool_catalog"]) == ["sha256:one", "sha256:two"]


def test_round_trip_yaml_and_json_is_byte_identical():
    policy, judge = derived()
    for fmt in ("yaml", "json"):
        text = dump_policy(policy, fmt)
        back = parse_policy(text)
        assert dump_policy(back, fmt) == text
        for key, args in ((LOG, {"repo_path": "/srv/repo", "max_count": 3}), (LOG, {"repo_path": "/x"})):
            assert McpJudge.of(back).judge_call(key, args) == judge.judge_call(key, args)


@settings(max_examples=25, deadline=None)
@given(st.randoms(use_true_random=False))
def test_derivation_does_not_depend_on_the_order_evidence_arrived(rnd: random.Random):
    calls = []
    for s in range(4):
        for n in range(5):
            calls.append((f"s{s}", LOG, {"repo_path": rnd.choice(["/a/x", "/a/y", "/b"]), "max_count": n}))
    a, _ = derived(calls)
    # the same calls, sessions interleaved differently (each session keeps its own order of values)
    shuffled = sorted(calls, key=lambda c: (rnd.random(), c[0]))
    b, _ = derived(shuffled)

    def decided(policy):  # what was allowed and reviewed, and on how much evidence (times follow arrival)
        spec = policy.to_dict()["spec"]
        counts = [(p["entry"], p["evidence"]["count"], p["evidence"]["sessions"]) for p in spec["provenance"]]
        review = [(r["key"], r["evidence"]["count"], r["evidence"]["sessions"]) for r in spec["review"]]
        return json.dumps([spec["allow"], spec["watch"], counts, review], sort_keys=True)
    assert decided(a) == decided(b)
    assert dump_policy(derived(calls)[0]) == dump_policy(a)


@pytest.mark.parametrize("mutate,needle", [
    (lambda m: m["tools"][0].update(name=""), "spec.allow.mcp.tools[0].name"),
    (lambda m: m["tools"].append(copy.deepcopy(m["tools"][0])), "listed twice"),  # no YAML alias
    (lambda m: m["tools"][0]["arguments"].append({"path": "x", "rule": "magic"}), "rule"),
    (lambda m: m["tools"][0]["arguments"].append({"path": "x", "rule": "range", "min": 3, "max": 1}), "min"),
    (lambda m: m["tools"][0]["arguments"].append({"path": "x", "rule": "path-prefix", "prefix": "/a/../b"}),
     "prefix"),
    (lambda m: m["methods"].append("tools/call"), "spec.allow.mcp.methods[0]"),
    (lambda m: m["resources"].append({"rule": "url", "value": "nope"}), "resources"),
    (lambda m: m.update(catalog={"git_log": 7}), "spec.allow.mcp.catalog"),
    (lambda m: m.update(servers=[]), "spec.allow.mcp.servers: unknown field"),
])
def test_bad_sections_are_one_line_errors_naming_the_field(mutate, needle):
    d = derived()[0].to_dict()
    mutate(d["spec"]["allow"]["mcp"])
    with pytest.raises(PolicyError) as e:
        parse_policy(yaml.safe_dump(d), "policy.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("policy.yaml: ")
