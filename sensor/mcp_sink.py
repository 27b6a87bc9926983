"""Where the MCP gateway's observations go: the workload's profile.

The gateway calls a sink with ``open_session``, ``observe(session, key, evidence, ts)``,
``catalog(session, fingerprint, tools, ts)``, ``close_session`` and ``flush``
(:class:`enforcer.mcp_gateway.McpSink`).

:class:`ProfileSink` records each MCP behaviour in the workload's profile with the usual counts,
distinct sessions and first/last seen, each complete tool listing's catalog fingerprint as the
profile's ``tool_catalog`` fingerprint, and the calls' argument values as the contribution's
argument evidence (:class:`sensor.mcp_evidence.ArgumentEvidence`). A gateway writes its own
contribution (``<node>/mcp`` by default, see :func:`gateway_contribution`), never the sensor's:
the sensor and any number of gateways record one workload at once, and readers merge the
contributions like any others.

Between flushes the sink keeps what it saw in memory: per session and behaviour a count and
first/last seen, the sessions opened and closed, the catalogs, and argument evidence that
remembers, per open session, which values were already counted (so a session is counted once
per value across flushes). :meth:`ProfileSink.flush` applies all of it to the stored
contribution under the profile's lock (:meth:`sensor.store.ProfileStore.update`), so gateways
running in parallel never lose each other's evidence.
"""

from __future__ import annotations

from typing import Callable

import structlog

from . import outbox
from .mcp_evidence import ArgumentEvidence
from .profile import DEFAULT_CAPS, Profile
from .store import ProfileStore
from .workload import Workload

log = structlog.get_logger(__name__)

#: The profile fingerprint key a gateway records the catalog fingerprint under.
CATALOG_FINGERPRINT = "tool_catalog"


def gateway_contribution(node: str) -> str:
    """The contribution a gateway on ``node`` writes: its own, beside the sensor's ``node``."""
    return f"{node}/mcp"


class ProfileSink:
    def __init__(self, store: ProfileStore | None, workload: Workload, contribution: str,
                 caps: dict | None = None, clock: Callable[[], float] | None = None):
        self.store = store
        self.workload = workload
        self.contribution = contribution
        self.caps = dict(caps or DEFAULT_CAPS)
        self.clock = clock
        self.evidence = ArgumentEvidence()
        self._opened: dict[str, tuple[float, dict]] = {}
        self._closed: dict[str, float] = {}
        self._counts: dict[tuple[str, str], list] = {}  # (session, key) -> [count, first, last]
        self._catalogs: dict[str, float] = {}
        self._last = 0.0
        self.profile: Profile | None = None  # what the last flush wrote (for inspection)

    def open_session(self, session: str, ts: float, meta: dict) -> None:
        self._opened.setdefault(session, (ts, dict(meta)))
        self._last = max(self._last, ts)

    def observe(self, session: str, key: str, evidence: dict, ts: float) -> None:
        c = self._counts.get((session, key))
        if c is None:
            self._counts[(session, key)] = [1, ts, ts]
        else:
            c[0] += 1
            c[1], c[2] = min(c[1], ts), max(c[2], ts)
        self.evidence.add(session, key, evidence.get("arguments") or {}, ts, bool(evidence.get("cut")))
        self._last = max(self._last, ts)

    def catalog(self, session: str, fingerprint: str, tools: dict, ts: float) -> None:
        self._catalogs[fingerprint] = max(ts, self._catalogs.get(fingerprint, ts))
        self.evidence.add_catalog(fingerprint, tools, ts)
        self._last = max(self._last, ts)

    def close_session(self, session: str, ts: float) -> None:
        self._closed.setdefault(session, ts)
        self.evidence.close_session(session)
        self._last = max(self._last, ts)

    def pending(self) -> bool:
        return bool(self._opened or self._closed or self._counts or self._catalogs)

    def apply(self, profile: Profile, arguments: ArgumentEvidence) -> None:
        """Add what was seen since the last flush (and ``arguments``, the argument evidence
        taken for it) to ``profile``'s gateway contribution."""
        c = profile.node(self.contribution)
        c.caps = dict(self.caps)
        for session, (ts, meta) in sorted(self._opened.items()):
            c.open_session(session, ts, {"source": "mcp-gateway", **meta})
        for (session, key), (n, first, last) in sorted(self._counts.items()):
            c.observe(session, key, n, last, first)
        for fp, ts in sorted(self._catalogs.items()):
            c.add_fingerprint(CATALOG_FINGERPRINT, fp, ts)
        c.add_arguments(arguments)
        for session, ts in sorted(self._closed.items()):
            c.close_session(session, ts)
        c.touch(self.clock() if self.clock else self._last)

    def flush(self) -> None:
        if not self.pending():
            return
        delta = self.evidence.take()
        try:
            if self.store is None:
                self.profile = self.profile or Profile(self.workload)
                self.apply(self.profile, delta)
            else:
                self.profile = self.store.update(self.workload, lambda p: self.apply(p, delta))
        except BaseException:
            # not written: keep the delta for the next flush (what open sessions saw stays known)
            rest = delta.merged(ArgumentEvidence(self.evidence.calls, self.evidence.catalogs))
            self.evidence.calls, self.evidence.catalogs = rest.calls, rest.catalogs
            raise
        self._opened, self._closed, self._counts, self._catalogs = {}, {}, {}, {}
        if self.store is not None:
            try:  # for the node's daemon to publish it beside its own (sensor.outbox)
                outbox.mark(self.store.layout.root, self.workload, self.contribution)
            except OSError as e:
                log.warning("gateway contribution written but not marked for publishing",
                            workload=self.workload.key, error=str(e))
