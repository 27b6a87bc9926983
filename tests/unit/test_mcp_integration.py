"""The gateway's seams into the profile and violations models.

The profile sink and the violation records work against the real aggregator, profile store and
violations store.
"""

from __future__ import annotations

import json

import pytest

from enforcer import mcp_protocol as proto
from enforcer import violations
from enforcer.mcp_envelope import EnvelopeOptions, derive_envelope
from enforcer.mcp_gateway import Gateway, GatewayCore
from envelope.commands.mcp import Outputs
from envelope.config import Config
from sensor.aggregate import Aggregator
from sensor.mcp_evidence import tool_call_key
from sensor.mcp_sink import ProfileSink, profile_knows_mcp
from sensor.mcp_store import McpEvidenceStore
from sensor.store import ProfileStore
from sensor.workload import Workload

W = Workload.host("agent")
TOOLS = [{"name": "git_log", "description": "Shows the commit logs", "inputSchema": {"type": "object"}}]


def m(**body) -> bytes:
    return proto.encode({"jsonrpc": "2.0", **body})


def drive(gw: Gateway, sid: str, max_count: int) -> list:
    gw.open(sid, {"test": True})
    gw.client(sid, m(id=1, method="tools/list"))
    gw.server(sid, m(id=1, result={"tools": TOOLS}))
    outs = []
    for i, n in enumerate((max_count, 2)):
        d = gw.client(sid, m(id=10 + i, method="tools/call",
                             params={"name": "git_log", "arguments": {"repo_path": "/srv/repo", "max_count": n}}))
        outs.append(d)
    gw.close(sid)
    return outs


def test_gateway_sessions_become_profile_sessions(tmp_path):
    agg = Aggregator("node-a", ProfileStore(tmp_path), str, caps={"syscall": 8, "exec": 8, "egress": 8, "mcp": 64})
    sink = ProfileSink(agg, W, McpEvidenceStore(tmp_path))
    gw = Gateway(GatewayCore(None, "observe"), sink, None, clock=iter(range(1000, 2000)).__next__)
    for s in range(3):
        drive(gw, f"run-{s}", 1 + s)
    gw.flush()
    profile = ProfileStore(tmp_path).load(W)
    stats = profile.behaviours()
    assert stats[tool_call_key("git_log")].count == 6 and stats[tool_call_key("git_log")].sessions == 3
    assert stats["mcp:tools/list"].sessions == 3
    assert profile.closed_sessions == 3
    assert len(profile.fingerprints()["tool_catalog"]) == 1
    assert json.loads(json.dumps(profile.to_json()))["behaviours"][0]["substrate"] == "mcp"
    evidence = McpEvidenceStore(tmp_path).load(W)
    env = derive_envelope(W, evidence, {k: v for k, v in stats.items() if k.startswith("mcp:")},
                          EnvelopeOptions(min_count=3, min_sessions=3))
    assert env.judge_call(tool_call_key("git_log"), {"repo_path": "/srv/repo", "max_count": 3}).allowed
    assert not env.judge_call(tool_call_key("git_log"), {"repo_path": "/srv/repo", "max_count": 4}).allowed
    assert env.catalog["fingerprints"] == profile.fingerprints()["tool_catalog"]


def _alert_outputs(tmp_path):
    ev_sink = McpEvidenceStore(tmp_path / "train")
    from sensor.mcp_evidence import ArgumentEvidence, flatten

    e = ArgumentEvidence()
    for s in range(3):
        e.add(f"s{s}", tool_call_key("git_log"), flatten({"repo_path": "/srv/repo"})[0], 1.0)
    e.add("s0", tool_call_key("git_reset"), flatten({"repo_path": "/srv/repo"})[0], 1.0)
    ev_sink.merge(W, e)
    env = derive_envelope(W, ev_sink.load(W), options=EnvelopeOptions(min_count=3, min_sessions=3))
    config = Config.load(None, state_dir=tmp_path / "state")
    out = Outputs(config, W, env)
    return Gateway(GatewayCore(env, "alert"), out.sink, out.report), config


def test_findings_are_violations(tmp_path):
    gw, config = _alert_outputs(tmp_path)
    gw.client("s", m(id=1, method="tools/call", params={"name": "git_reset", "arguments": {"repo_path": "/srv/repo"}}))
    gw.client("s", m(id=2, method="tools/call", params={"name": "git_log", "arguments": {"repo_path": "/etc"}}))
    listed = violations.ViolationStore(config.state_dir).list(substrate="mcp")
    assert [(v.behaviour, v.action) for v in listed] == [(tool_call_key("git_reset"), "alerted"),
                                                         (tool_call_key("git_log"), "alerted")]
    assert "outside the envelope" in listed[1].detail["reason"] and listed[1].detail["entry"].endswith("#repo_path")
