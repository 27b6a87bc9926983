"""The http substrate's enforcement: policies' allowed requests as the probe's rule graph.

A workload's ``allow.http`` entries (and the http exceptions in force) are compiled into a rule
graph (:func:`enforcer.http_patterns.compile_graph`) and written into the request capture's
``edges`` map; each of the workload's cgroups is then pointed at the graph's root with the mode
(:meth:`sensor.httpcapture.HttpCapture.set_rules`). A new graph gets fresh state ids, cgroups
switch to it with one map write each, and the old graph's edges are removed afterwards, so a
request is always judged against one whole graph, the old or the new.

In ``alert`` mode the probe reports a request outside the graph at once; in ``enforce`` mode it
kills the process before the request is sent (``HTTP_ENFORCEMENT`` in :mod:`enforcer.derive`); a
plaintext request's socket is then dropped by the capture's egress program and aborted from here
(:func:`enforcer.sockets.abort`), since a ``write`` that entered the kernel still queues its bytes:
a program on a uprobe here may signal (``bpf_send_signal``) but not make a call fail
(``bpf_override_return`` is refused, see :func:`sensor.features.uprobe_actions`), so enforce
mode is refused where the kernel does not let the probe signal.

The graph lives in the capture's maps, which live as long as the sensor that loaded them: the
daemon re-applies what it enforces when it starts (its desired states), like every unpinned
program set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from sensor.mirrors import HTTP_MODE_ALERT, HTTP_MODE_ENFORCE, HTTP_MODE_OBSERVE

from .http_patterns import Graph, HttpPattern, HttpPatternError, compile_graph, parse_entry
from .policy import Policy

log = structlog.get_logger(__name__)

MODE_CODES = {"observe": HTTP_MODE_OBSERVE, "alert": HTTP_MODE_ALERT, "enforce": HTTP_MODE_ENFORCE}
FIRST_STATE = 2       # 0 means "no rules", END edges hold 1
SWAP_GRACE = 0.05     # seconds an old graph stays after the cgroups left it (a probe mid-walk)


class HttpEnforceError(Exception):
    """Http rules that cannot be applied; the message says why."""


def http_mode(policy: Policy, mode: str) -> str:
    """The mode the http substrate runs in: observe when the policy leaves http out."""
    return mode if "http" in policy.substrates else "observe"


def effective_patterns(policy: Policy, exceptions) -> list[HttpPattern]:
    """The policy's allowed requests plus those of the http exceptions in force (pure)."""
    out = list(policy.http_patterns)
    for e in exceptions:
        if not e.allow.startswith("http:"):
            continue
        try:
            out.append(parse_entry(e.allow))
        except HttpPatternError:
            log.warning("http exception that is not a request pattern ignored", allow=e.allow, id=e.id)
    return sorted(set(out))


@dataclass
class _Applied:
    graph: Graph
    mode: str
    cgroups: dict  # cgroup id -> path
    gen: int


class HttpEnforcement:
    """Rule graphs of the workloads one enforcement session holds, in one request capture."""

    def __init__(self, capture, uprobe_actions=None):
        self.capture = capture
        self._actions = uprobe_actions
        self._next = FIRST_STATE
        self._gen = 0
        self.applied: dict[str, _Applied] = {}

    def can_kill(self) -> str | None:
        """Why enforce mode cannot work here (None: the probe may signal)."""
        if self._actions is None:
            from sensor.features import uprobe_actions
            self._actions = uprobe_actions()
        act = self._actions.get("send_signal")
        return None if act == "yes" else f"bpf_send_signal from a probe: {act}"

    def check(self, mode: str) -> None:
        """Before anything is touched: enforce mode needs the probe's signal."""
        if mode == "enforce":
            why = self.can_kill()
            if why:
                raise HttpEnforceError(f"http enforce mode needs the probe to kill the process ({why}); "
                                       "use alert mode")

    def apply(self, workload: str, patterns: list[HttpPattern], mode: str, cgroups: dict[int, str]) -> None:
        """Point ``cgroups`` (id -> path) of ``workload`` at a graph of ``patterns`` in ``mode``."""
        self.check(mode)
        prev = self.applied.get(workload)
        graph = compile_graph(patterns, self._next)
        self._next += graph.states
        self._gen += 1
        edges = self.capture.maps["edges"]
        written = []
        try:
            for e in graph.edges:
                edges.update(e.key(), e.value())
                written.append(e)
            targets = dict(prev.cgroups) if prev else {}
            targets.update(cgroups)
            for cg, path in sorted(targets.items()):
                self.capture.set_rules(cg, path, MODE_CODES[mode], graph.root, self._gen)
        except BaseException:
            for e in written:
                edges.delete(e.key())
            raise
        self.applied[workload] = _Applied(graph, mode, targets, self._gen)
        if prev is not None:
            self._drop(prev.graph)

    def attach(self, workload: str, cgroup_id: int, path: str) -> bool:
        """A new cgroup of an enforced workload: the same graph and mode."""
        cur = self.applied.get(workload)
        if cur is None:
            return False
        self.capture.set_rules(cgroup_id, path, MODE_CODES[cur.mode], cur.graph.root, cur.gen)
        cur.cgroups[cgroup_id] = path
        return True

    def remove(self, workload: str) -> None:
        """Back to observation for the workload's cgroups; its graph goes."""
        cur = self.applied.pop(workload, None)
        if cur is None:
            return
        for cg, path in cur.cgroups.items():
            if cg in self.capture.watched:
                self.capture.set_rules(cg, path, HTTP_MODE_OBSERVE, 0, 0)
        self._drop(cur.graph)

    def abort(self, cookie: int) -> bool:
        """Destroy a refused plaintext request's socket (its killed write's bytes stay queued in
        it; the capture drops its packets only while the capture runs)."""
        from .sockets import abort
        try:
            done = abort(cookie)
        except OSError as e:
            log.error("aborting a refused request's socket failed", cookie=cookie, error=str(e))
            return False
        log.info("refused request's socket aborted", cookie=cookie, found=done)
        return done

    def _drop(self, graph: Graph) -> None:
        time.sleep(SWAP_GRACE)
        edges = self.capture.maps.get("edges")
        if edges is None:
            return
        for e in graph.edges:
            edges.delete(e.key())


__all__ = ["HttpEnforceError", "HttpEnforcement", "MODE_CODES", "effective_patterns", "http_mode"]
