"""A running MCP gateway's link to the node's enforcement state: what it follows, where it reports.

Follows (:meth:`GatewayControls.follow`, before each client message, for the cost of two
``stat`` calls when nothing changed):

- **the workload's mode** (``envelope mode NAME MODE``, :mod:`enforcer.state`): a mode set after
  the gateway started replaces the one it started with (``--mode``, the state's, or the
  policy's), and the gateway judges in it from the next message on;
- **active exceptions** (``envelope exception add``, :mod:`enforcer.exceptions`): ``mcp:`` keys
  admit a whole call (``mcp:tools/call:NAME``) or any value at one argument path
  (``mcp:tools/call:NAME#PATH``); they start and lapse on the clock, and an exceptions file that
  cannot be read counts as no exceptions (fail closed).

Reports (:meth:`GatewayControls.report`, the gateway's reporter):

- a refused or alerted call is a violation with substrate ``mcp`` in ``violations.jsonl``, beside
  the kernel's (and, when its entry is on the watch list, a ``watch`` violation too);
- a complete tool listing's catalog fingerprint is checked with :func:`enforcer.validity.check`;
  when the ``tool-catalog-change`` trigger fires the policy is stale: audited once per new
  fingerprint as ``policy.stale`` (with the tools whose definitions changed) and reported as an
  ``mcp`` violation on ``mcp:tools/list``;
- a call admitted only by an exception, a changed tool definition, and a message not relayed
  are logged on stderr.

Every override is audited where it is made: mode changes and exceptions by the commands that set
them, the gateway's start in ``enforce``/``alert`` by ``envelope mcp`` (``mcp.apply``, or
``mcp.override`` when its mode differs from the policy's).
"""

from __future__ import annotations

import os

import structlog

from sensor.workload import Workload

from . import audit, exceptions, state, validity, violations
from .mcp_gateway import Admitted, CatalogSeen, Finding, GatewayCore, Problem, Stale
from .policy import Policy

log = structlog.get_logger("envelope.mcp")


def _stat(path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class GatewayControls:
    def __init__(self, state_dir, workload: Workload, policy: Policy | None, mode: str, actor: str | None = None):
        self.state_dir = state_dir
        self.actor = actor or audit.default_actor()
        self.workload = workload
        self.policy = policy
        self.mode = mode
        self.store = violations.ViolationStore(state_dir)
        self._mode_path = state.mode_path(state_dir, workload)
        self._exceptions_path = exceptions.file_path(state_dir)
        current = self._read_state()
        self._since = current.get("since") if current else None
        self._sig: tuple | None = None
        self._next_expiry: float | None = None
        self._changed_tools: set[str] = set()
        self._stale: set[str] = set()

    @staticmethod
    def initial_mode(state_dir, workload: Workload, policy: Policy | None, requested: str | None) -> str:
        """The mode a gateway starts in: ``--mode``, else the workload's (``envelope mode``) when
        it has one, else the policy's; ``observe`` without a policy."""
        if requested:
            return requested
        if policy is None:
            return "observe"
        st = state.read_state(state_dir, workload)
        return st["mode"] if st else policy.mode

    def _read_state(self) -> dict | None:
        try:
            return state.read_state(self.state_dir, self.workload)
        except state.StateError as e:
            log.error("mcp gateway cannot read the workload's mode; keeping the current one", error=str(e))
            return None

    # ---- following ---------------------------------------------------------------------------

    def follow(self, core: GatewayCore, now: float) -> None:
        sig = (_stat(self._mode_path), _stat(self._exceptions_path))
        due = self._next_expiry is not None and now >= self._next_expiry
        if sig == self._sig and not due:
            return
        mode_changed = self._sig is None or sig[0] != self._sig[0]
        self._sig = sig
        if mode_changed:
            st = self._read_state()
            if st and st.get("since") != self._since:
                self._since = st.get("since")
                if st["mode"] != core.mode:
                    if st["mode"] != "observe" and core.judge is None:
                        log.error("mcp gateway has no policy: it stays in observe mode", requested=st["mode"])
                    else:
                        log.warning("mcp gateway follows the workload's mode", workload=self.workload.key,
                                    old=core.mode, new=st["mode"], actor=st.get("actor"), reason=st.get("reason"))
                        core.set_mode(st["mode"])
                        self.mode = st["mode"]
        if core.judge is not None:
            try:
                active = exceptions.active_exceptions(self.state_dir, self.workload, now)
            except exceptions.ExceptionError as e:
                log.error("mcp gateway cannot read exceptions; none apply", error=str(e))
                active = []
            allowed = {e.allow: f"exception:{e.id}" for e in active if e.allow.startswith("mcp:")}
            if allowed != core.judge.exceptions:
                log.info("mcp exceptions in force", workload=self.workload.key, exceptions=sorted(allowed.values()))
            core.judge.set_exceptions(allowed)
            expiries = [e.expires for e in active if e.allow.startswith("mcp:")]
            self._next_expiry = min(expiries) if expiries else None

    # ---- reporting ---------------------------------------------------------------------------

    def report(self, event) -> None:
        if isinstance(event, Finding):
            log.warning(f"mcp call {event.action}", behaviour=event.behaviour, reason=event.reason,
                        session=event.session)
            records = [violations.Violation.from_dict(event.violation(self.workload.key))]
            if event.watch:
                records.append(violations.Violation(event.ts, self.workload.key, "watch", event.entry, "alerted",
                                                    {"session": event.session, "substrate": "mcp",
                                                     "allowed": False, "reason": event.reason}))
            self.store.append(records)
        elif isinstance(event, Admitted):
            log.warning("mcp call allowed by exception", behaviour=event.behaviour, exception=event.exception,
                        session=event.session)
        elif isinstance(event, Stale):
            log.warning("mcp tool definition changed: the policy is stale for it", tool=event.tool,
                        recorded=event.recorded, current=event.current, session=event.session)
            self._changed_tools.add(event.tool)
        elif isinstance(event, CatalogSeen):
            self._check_catalog(event)
        elif isinstance(event, Problem):
            log.warning("mcp message not relayed", direction=event.direction, code=event.code,
                        error=event.message, session=event.session)

    def _check_catalog(self, event: CatalogSeen) -> None:
        if self.policy is None or self.mode == "observe":
            return
        result = validity.check(self.policy, {"tool_catalog": event.fingerprint}, event.ts)
        fired = [t for t in result["triggers"] if t["key"] == "tool_catalog" and t["fired"]]
        tools, self._changed_tools = sorted(self._changed_tools), set()
        if not fired or event.fingerprint in self._stale:
            return
        self._stale.add(event.fingerprint)
        trigger = fired[0]
        reason = f"the MCP tool catalog changed since the policy was derived ({trigger['reason']})"
        details = {"trigger": trigger["trigger"], "key": "tool_catalog", "current": event.fingerprint,
                   "recorded": trigger["recorded"], "tools": tools, "source": "mcp-gateway"}
        log.warning("policy stale: the MCP tool catalog changed", workload=self.workload.key, tools=tools,
                    current=event.fingerprint)
        audit.append(self.state_dir, "policy.stale", workload=self.workload.key, reason=reason, details=details,
                     actor=self.actor)
        self.store.append([violations.Violation(event.ts, self.workload.key, "mcp", "mcp:tools/list", "alerted",
                                                {"session": event.session, "reason": reason, **details})])
