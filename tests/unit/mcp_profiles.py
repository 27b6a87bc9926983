"""MCP evidence as the gateway records it, for the pure tests: calls fed through the gateway's
profile sink into a profile, and policies derived from it with the mcp substrate."""

from __future__ import annotations

from enforcer.derive import DeriveOptions, derive
from enforcer.mcp_envelope import McpJudge
from sensor.mcp_evidence import flatten
from sensor.mcp_sink import ProfileSink
from sensor.profile import Profile
from sensor.workload import Workload

W = Workload.host("agent")
T0 = 1_767_225_600.0


def record(calls, catalogs=(), workload: Workload = W, contribution: str = "node-a/mcp",
           profile: Profile | None = None) -> Profile:
    """``calls``: (session, key, arguments) in order (timestamps follow the order), each session
    opened at its first call and closed after its last; ``catalogs``: (fingerprint, {tool: hash})."""
    sink = ProfileSink(None, workload, contribution, clock=lambda: T0 + len(calls) + 10)
    sink.profile = profile
    last = {s: i for i, (s, _, _) in enumerate(calls)}
    for i, (s, key, args) in enumerate(calls):
        sink.open_session(s, T0 + i, {})
        flat, cut = flatten(args)
        sink.observe(s, key, {"arguments": flat, "cut": cut}, T0 + i)
        if last[s] == i:
            sink.close_session(s, T0 + i)
    for fp, tools in catalogs:
        sink.catalog("catalog", fp, tools, T0)
    sink.flush()
    return sink.profile


def options(**kw) -> DeriveOptions:
    base = dict(substrates=("mcp",), force=True, min_count={"mcp": 3}, min_sessions={"mcp": 3})
    base.update(kw)
    return DeriveOptions(**base)


def policy_of(calls, catalogs=(), **kw):
    return derive(record(calls, catalogs), options(**kw))


def judge_of(calls, catalogs=(), **kw) -> McpJudge:
    return McpJudge.of(policy_of(calls, catalogs, **kw))
