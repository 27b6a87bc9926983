"""Where the MCP gateway's observations go: argument evidence, and the workload's profile.

The gateway calls a sink with ``open_session``, ``observe(session, key, evidence, ts)``,
``catalog(session, fingerprint, tools, ts)``, ``close_session`` and ``flush``
(:class:`enforcer.mcp_gateway.McpSink`).

- :class:`EvidenceSink` folds them into :class:`sensor.mcp_evidence.ArgumentEvidence`: per
  behaviour key, the calls and their argument values, and the tool catalogs seen.
- :class:`ProfileSink` does that and records each behaviour in the workload's profile through
  the :class:`sensor.aggregate.Aggregator`, with the usual counts, distinct sessions and
  first/last seen, and each catalog fingerprint as the profile's ``tool_catalog`` fingerprint. A
  gateway session is bound like a cgroup, under a negative binding id (cgroup ids are positive),
  so one aggregator can serve the kernel sensor and gateways at once.

The profile model records ``mcp:`` keys only once it knows the ``mcp`` substrate
(:func:`profile_knows_mcp`); :class:`ProfileSink` refuses to start before that rather than fail on
the first call.
"""

from __future__ import annotations

import itertools

from .aggregate import Aggregator
from .mcp_evidence import TOOLS_LIST, ArgumentEvidence
from .mcp_store import McpEvidenceStore
from .workload import BehaviourKeyError, Workload, substrate_of

_binding_ids = itertools.count(1)


def profile_knows_mcp() -> bool:
    """Whether the profile model (:mod:`sensor.workload`) accepts ``mcp:`` behaviour keys."""
    try:
        return substrate_of(TOOLS_LIST) == "mcp"
    except BehaviourKeyError:
        return False


class EvidenceSink:
    """Argument evidence in memory; with a store, each ``flush`` merges what is new into it."""

    def __init__(self, store: McpEvidenceStore | None = None, workload: Workload | None = None):
        if store is not None and workload is None:
            raise ValueError("an evidence store needs the workload the evidence belongs to")
        self.evidence = ArgumentEvidence()
        self.store = store
        self.workload = workload
        self.sessions: dict[str, dict] = {}

    def open_session(self, session: str, ts: float, meta: dict) -> None:
        self.sessions.setdefault(session, {"start": ts, "end": None, "meta": dict(meta)})

    def observe(self, session: str, key: str, evidence: dict, ts: float) -> None:
        if session not in self.sessions:
            self.open_session(session, ts, {})
        self.evidence.add(session, key, evidence.get("arguments") or {}, ts, bool(evidence.get("cut")))

    def catalog(self, session: str, fingerprint: str, tools: dict, ts: float) -> None:
        self.evidence.add_catalog(fingerprint, tools, ts)

    def close_session(self, session: str, ts: float) -> None:
        rec = self.sessions.get(session)
        if rec is not None and rec["end"] is None:
            rec["end"] = ts
        self.evidence.close_session(session)

    def flush(self) -> None:
        if self.store is None:
            return
        delta = self.evidence.take()
        if delta.calls or delta.catalogs:
            self.store.merge(self.workload, delta)


class ProfileSink(EvidenceSink):
    def __init__(self, aggregator: Aggregator, workload: Workload, store: McpEvidenceStore | None = None):
        if not profile_knows_mcp():
            raise RuntimeError("the profile model does not know the mcp substrate yet (sensor/workload.py); "
                               "mcp behaviours cannot be recorded in profiles")
        super().__init__(store, workload)
        self.aggregator = aggregator
        self._bindings: dict[str, int] = {}

    def open_session(self, session: str, ts: float, meta: dict) -> None:
        super().open_session(session, ts, meta)
        if session not in self._bindings:
            self._bindings[session] = bid = -next(_binding_ids)
            self.aggregator.bind(bid, self.workload, session, start=ts, meta={"source": "mcp-gateway", **meta})

    def observe(self, session: str, key: str, evidence: dict, ts: float) -> None:
        if session not in self._bindings:
            self.open_session(session, ts, {})
        super().observe(session, key, evidence, ts)
        self.aggregator.observe(self._bindings[session], key, 1, ts)

    def catalog(self, session: str, fingerprint: str, tools: dict, ts: float) -> None:
        super().catalog(session, fingerprint, tools, ts)
        self.aggregator.profile(self.workload).node(self.aggregator.node).add_fingerprint(
            "tool_catalog", fingerprint, ts)
        self.aggregator.dirty.add(self.workload)

    def close_session(self, session: str, ts: float) -> None:
        super().close_session(session, ts)
        bid = self._bindings.pop(session, None)
        if bid is not None:
            self.aggregator.unbind(bid, ts)

    def flush(self) -> None:
        super().flush()
        self.aggregator.flush()
