"""``envelope mcp wrap|proxy|derive``: the MCP gateway.

- ``envelope mcp wrap --workload NAME [--policy FILE] [--mode observe|alert|enforce] -- SERVER ARGS...``
  is what an MCP client launches instead of the stdio server (stdout carries MCP; Envelope logs
  on stderr). One run is one session.
- ``envelope mcp proxy --workload NAME --listen 127.0.0.1:PORT --upstream URL [--policy FILE] [--mode ...]``
  serves streamable HTTP in front of ``URL``. One MCP session (or, for requests without one, the
  run) is one session.
- ``envelope mcp derive --workload NAME [--out FILE] [-o yaml|json] ...`` derives an MCP
  envelope (``McpEnvelope``) from the recorded evidence.

Recording: argument evidence goes to ``<state-dir>/mcp/``; each behaviour also goes to the
workload's profile (counts, sessions, first/last seen, the ``tool_catalog`` fingerprint) once the
profile model knows the ``mcp`` substrate. Findings: calls refused or alerted on are logged on
stderr and appended to ``<state-dir>/violations.jsonl`` (substrate ``mcp`` once the violations
model knows it; watch-list recurrences as substrate ``watch``). A changed tool definition is
logged and audited as ``policy.stale``.
"""

from __future__ import annotations

import sys

import structlog

from enforcer import audit, violations
from enforcer.mcp_envelope import EnvelopeError, EnvelopeOptions, McpEnvelope, derive_envelope, dump_envelope, \
    parse_envelope
from enforcer.mcp_gateway import Finding, Limits, Problem, Stale
from enforcer.mcp_protocol import DEFAULT_MAX_MESSAGE_BYTES
from enforcer.policy import MODES
from enforcer.violations import Violation, ViolationStore
from sensor.aggregate import Aggregator
from sensor.mcp_sink import EvidenceSink, ProfileSink, profile_knows_mcp
from sensor.mcp_store import McpEvidenceStore, McpStoreError
from sensor.store import ProfileStore, ProfileStoreError
from sensor.workload import Workload

from ..errors import UserError

log = structlog.get_logger("envelope.mcp")


def register(sub) -> None:
    p = sub.add_parser("mcp", help="the MCP gateway: observe and enforce tool calls (stdio and streamable HTTP)")
    msub = p.add_subparsers(dest="mcp_command", metavar="SUBCOMMAND")
    msub.required = True

    def common(q) -> None:
        q.add_argument("--workload", required=True, help="workload name (host workload host/Unit/NAME/main) or key")
        q.add_argument("--policy", help="an McpEnvelope file (from 'envelope mcp derive'); needed for alert/enforce")
        q.add_argument("--mode", choices=MODES, help="override the envelope's mode (default: its mode, or observe)")
        q.add_argument("--session", help="session id for this run (default: a new one)")
        q.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                       help=f"largest JSON-RPC message relayed either way (default {DEFAULT_MAX_MESSAGE_BYTES})")
        q.add_argument("--flush-interval", type=float, default=30.0, help="seconds between evidence writes")

    w = msub.add_parser("wrap", help="run an MCP stdio server behind the gateway (the client launches this)")
    common(w)
    w.add_argument("server", nargs="+", metavar="-- SERVER [ARGS...]")
    w.set_defaults(func=cmd_wrap)

    x = msub.add_parser("proxy", help="serve streamable HTTP in front of an MCP server URL")
    common(x)
    x.add_argument("--listen", required=True, help="HOST:PORT to listen on, e.g. 127.0.0.1:8931 (port 0: any)")
    x.add_argument("--upstream", required=True, help="the MCP server's URL, e.g. http://127.0.0.1:8000/mcp")
    x.set_defaults(func=cmd_proxy)

    d = msub.add_parser("derive", help="derive an MCP envelope from the recorded evidence")
    d.add_argument("--workload", required=True)
    d.add_argument("--closure", choices=("literal", "structural"), default="structural")
    d.add_argument("--min-count", type=int, default=EnvelopeOptions.min_count)
    d.add_argument("--min-sessions", type=int, default=EnvelopeOptions.min_sessions)
    d.add_argument("--max-values", type=int, default=EnvelopeOptions.max_values,
                   help="more distinct strings than this are not an enumeration")
    d.add_argument("--max-siblings", type=int, default=EnvelopeOptions.max_siblings,
                   help="more sibling paths or URL segments than this widen to their parent or *")
    d.add_argument("--admit", action="append", default=[], metavar="ENTRY", help="admit a review entry")
    d.add_argument("--reason", action="append", default=[], help="why (one per --admit)")
    d.add_argument("--mode", choices=MODES, default="alert")
    d.add_argument("--out", help="write the envelope here instead of stdout")
    d.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")
    d.set_defaults(func=cmd_derive)


def workload_of(name: str) -> Workload:
    try:
        return Workload.parse(name) if name.count("/") == 3 else Workload.host(name)
    except ValueError as e:
        raise UserError(str(e)) from None


def load_envelope(path: str | None) -> McpEnvelope | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return parse_envelope(f.read(), path)
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    except EnvelopeError as e:
        raise UserError(str(e)) from None


class Outputs:
    """The gateway's edges for one CLI run: sink and reporter, wired to the state directory."""

    def __init__(self, config, workload: Workload, envelope: McpEnvelope | None):
        self.config = config
        self.workload = workload
        self.envelope = envelope
        evidence = McpEvidenceStore(config.state_dir)
        if profile_knows_mcp():
            caps = dict(config.caps)
            caps.setdefault("mcp", 4096)
            from sensor.syscalls import name as syscall_name

            agg = Aggregator(config.node_name, ProfileStore(config.state_dir), syscall_name, caps=caps)
            self.sink: EvidenceSink = ProfileSink(agg, workload, evidence)
        else:
            self.sink = EvidenceSink(evidence, workload)
            log.warning("mcp behaviours are kept as argument evidence only: the profile model does not know "
                        "the mcp substrate yet", evidence=str(evidence.path_for(workload)))
        self.violations = ViolationStore(config.state_dir)
        self._stale: set[tuple[str, str]] = set()

    def report(self, event) -> None:
        if isinstance(event, Finding):
            log.warning(f"mcp call {event.action}", behaviour=event.behaviour, reason=event.reason,
                        session=event.session)
            records = []
            if "mcp" in violations.SUBSTRATES:  # once the violations model knows the substrate
                records.append(Violation.from_dict(event.violation(self.workload.key)))
            if event.watch:
                records.append(Violation(event.ts, self.workload.key, "watch", event.entry, "alerted",
                                         {"session": event.session, "substrate": "mcp", "allowed": False,
                                          "reason": event.reason}))
            self.violations.append(records)
        elif isinstance(event, Stale):
            log.warning("mcp tool definition changed: the envelope is stale for it", tool=event.tool,
                        recorded=event.recorded, current=event.current, session=event.session)
            if (event.tool, event.current) not in self._stale:
                self._stale.add((event.tool, event.current))
                audit.append(self.config.state_dir, "policy.stale", workload=self.workload.key,
                             reason=f"MCP tool {event.tool!r} changed since the envelope was derived",
                             details={"trigger": "tool-catalog-change", "tool": event.tool,
                                      "recorded": event.recorded, "current": event.current})
        elif isinstance(event, Problem):
            log.warning("mcp message not relayed", direction=event.direction, code=event.code,
                        error=event.message, session=event.session)


def _prepare(args, config):
    workload = workload_of(args.workload)
    envelope = load_envelope(args.policy)
    if envelope is not None and envelope.workload != workload:
        raise UserError(f"--policy is for workload {envelope.workload.key}, not {workload.key}")
    mode = args.mode or (envelope.mode if envelope is not None else "observe")
    if envelope is None and mode != "observe":
        raise UserError(f"--mode {mode} needs --policy (an McpEnvelope from 'envelope mcp derive')")
    if args.max_message_bytes < 1024:
        raise UserError("--max-message-bytes must be at least 1024")
    if args.flush_interval <= 0:
        raise UserError("--flush-interval must be positive")
    return workload, envelope, mode, Outputs(config, workload, envelope), Limits(max_message_bytes=args.max_message_bytes)


def cmd_wrap(args, config) -> int:
    from enforcer.mcp_stdio import wrap

    server = args.server[1:] if args.server and args.server[0] == "--" else args.server
    if not server:
        raise UserError("no server command given (envelope mcp wrap --workload NAME -- SERVER ARGS...)")
    workload, envelope, mode, out, limits = _prepare(args, config)
    try:
        return wrap(workload, envelope, mode, server, out.sink, report=out.report, session=args.session,
                    limits=limits, flush_every=args.flush_interval)
    except (FileNotFoundError, PermissionError) as e:
        raise UserError(f"cannot start {server[0]}: {e.strerror}") from None


def cmd_proxy(args, config) -> int:
    from enforcer.mcp_http import parse_listen, proxy

    try:
        parse_listen(args.listen)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not args.upstream.startswith(("http://", "https://")):
        raise UserError(f"--upstream {args.upstream!r}: expected an http:// or https:// URL")
    workload, envelope, mode, out, limits = _prepare(args, config)

    def ready(port: int) -> None:
        print(f"envelope: mcp proxy ready on {args.listen.rpartition(':')[0]}:{port} -> {args.upstream}",
              file=sys.stderr, flush=True)

    return proxy(workload, args.listen, args.upstream, envelope, mode, out.sink, report=out.report,
                 session=args.session, limits=limits, ready=ready, flush_every=args.flush_interval)


def cmd_derive(args, config) -> int:
    workload = workload_of(args.workload)
    if len(args.admit) != len(args.reason):
        raise UserError("give one --reason for each --admit")
    try:
        evidence = McpEvidenceStore(config.state_dir).load(workload)
    except McpStoreError as e:
        raise UserError(str(e)) from None
    if evidence is None or not evidence.calls:
        raise UserError(f"no MCP evidence recorded for {workload.key}; record with 'envelope mcp wrap' or "
                        f"'envelope mcp proxy' first")
    behaviours = None
    if profile_knows_mcp():
        try:
            profile = ProfileStore(config.state_dir).load(workload)
        except ProfileStoreError as e:
            raise UserError(str(e)) from None
        if profile is not None:
            behaviours = {k: v for k, v in profile.behaviours().items() if k.startswith("mcp:")}
    opts = EnvelopeOptions(closure=args.closure, min_count=args.min_count, min_sessions=args.min_sessions,
                           max_values=args.max_values, max_siblings=args.max_siblings,
                           admits=tuple(zip(args.admit, args.reason)), mode=args.mode)
    try:
        env = derive_envelope(workload, evidence, behaviours, opts)
        text = dump_envelope(env, args.output)
    except EnvelopeError as e:
        raise UserError(str(e)) from None
    if args.out:
        from ..output import write_file

        write_file(args.out, text.encode("utf-8"))
        print(f"envelope: wrote {args.out}: {len(env.calls)} tools/prompts allowed, {len(env.resources)} "
              f"resources, {len(env.review)} in review", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
