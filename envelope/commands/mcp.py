"""``envelope mcp wrap|proxy``: the MCP gateway.

- ``envelope mcp wrap --workload NAME [--policy FILE] [--mode observe|alert|enforce] -- SERVER ARGS...``
  is what an MCP client launches instead of the stdio server (stdout carries MCP; Envelope logs
  on stderr). One run is one session.
- ``envelope mcp proxy --workload NAME --listen 127.0.0.1:PORT --upstream URL [--policy FILE] [--mode ...]``
  serves streamable HTTP in front of ``URL``. One MCP session (or, for requests without one, the
  run) is one session.

Recording: every MCP behaviour goes to the workload's profile (counts, sessions, first/last
seen, the ``tool_catalog`` fingerprint, argument evidence), in the gateway's own contribution
(:mod:`sensor.mcp_sink`); ``envelope derive NAME --substrates ...,mcp`` derives the policy's MCP
section from it. Judging: ``--policy`` is a ``LeastPrivilegePolicy`` with the ``mcp`` substrate.
The gateway starts in ``--mode``, else the workload's mode (``envelope mode``), else the policy's,
and follows mode changes and exceptions while it runs (:mod:`enforcer.mcp_controls`).
Refusals, alerts and a stale tool catalog are violations with substrate ``mcp``.
"""

from __future__ import annotations

import sys

from enforcer import audit
from enforcer.mcp_controls import GatewayControls
from enforcer.mcp_gateway import Limits
from enforcer.mcp_protocol import DEFAULT_MAX_MESSAGE_BYTES
from enforcer.modes import MODES
from enforcer.policy import Policy, PolicyError, load_policy, policy_hash
from enforcer.state import StateError
from sensor.workload import Workload

from .. import wiring
from ..errors import UserError


def register(sub) -> None:
    p = sub.add_parser("mcp", help="the MCP gateway: observe and enforce tool calls (stdio and streamable HTTP)")
    msub = p.add_subparsers(dest="mcp_command", metavar="SUBCOMMAND")
    msub.required = True

    def common(q) -> None:
        q.add_argument("--workload", required=True, help="workload name (host workload host/Unit/NAME/main) or key")
        q.add_argument("--policy", help="a policy with the mcp substrate (envelope derive NAME --substrates ...,mcp); "
                                        "needed for alert and enforce")
        q.add_argument("--mode", choices=MODES,
                       help="start in this mode (default: the workload's mode, else the policy's, else observe); "
                            "'envelope mode' changes it while the gateway runs")
        q.add_argument("--session", help="session id for this run (default: a new one)")
        q.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                       help=f"largest JSON-RPC message relayed either way (default {DEFAULT_MAX_MESSAGE_BYTES})")
        q.add_argument("--flush-interval", type=float, default=30.0, help="seconds between profile writes")

    w = msub.add_parser("wrap", help="run an MCP stdio server behind the gateway (the client launches this)")
    common(w)
    w.add_argument("server", nargs="+", metavar="-- SERVER [ARGS...]")
    w.set_defaults(func=cmd_wrap)

    x = msub.add_parser("proxy", help="serve streamable HTTP in front of an MCP server URL")
    common(x)
    x.add_argument("--listen", required=True, help="HOST:PORT to listen on, e.g. 127.0.0.1:8931 (port 0: any)")
    x.add_argument("--upstream", required=True, help="the MCP server's URL, e.g. http://127.0.0.1:8000/mcp")
    x.set_defaults(func=cmd_proxy)


def workload_of(name: str) -> Workload:
    try:
        return Workload.parse(name) if name.count("/") == 3 else Workload.host(name)
    except ValueError as e:
        raise UserError(str(e)) from None


def read_mcp_policy(path: str | None, workload: Workload) -> Policy | None:
    if not path:
        return None
    try:
        policy = load_policy(path)
    except PolicyError as e:
        raise UserError(str(e)) from None
    if policy.workload != workload:
        raise UserError(f"--policy {path} is for workload {policy.workload.key}, not {workload.key}")
    if "mcp" not in policy.substrates:
        raise UserError(f"--policy {path} does not include the mcp substrate; derive it with "
                        f"'envelope derive {workload.name} --substrates ...,mcp'")
    return policy


def _gateway(args, config):
    workload = workload_of(args.workload)
    policy = read_mcp_policy(args.policy, workload)
    if args.max_message_bytes < 1024:
        raise UserError("--max-message-bytes must be at least 1024")
    if args.flush_interval <= 0:
        raise UserError("--flush-interval must be positive")
    try:
        mode = GatewayControls.initial_mode(config.state_dir, workload, policy, args.mode)
    except StateError as e:
        raise UserError(str(e)) from None
    if policy is None and mode != "observe":
        raise UserError(f"--mode {mode} needs --policy (a policy with the mcp substrate)")
    # Who acts is looked up in every mode (it may take an NSS lookup), so that what a gateway does
    # while its workload is recorded covers what it does when it enforces.
    actor = audit.default_actor()
    if policy is not None and mode != "observe":
        action = "mcp.override" if mode != policy.mode else "mcp.apply"
        audit.append(config.state_dir, action, workload=workload.key, actor=actor,
                     reason=f"envelope mcp {args.mcp_command} in {mode} mode"
                            + (f" (policy says {policy.mode})" if mode != policy.mode else ""),
                     details={"mode": mode, "policy_mode": policy.mode, "policy_sha256": policy_hash(policy).hex(),
                              "transport": args.mcp_command})
    gateway = wiring.mcp_gateway(config, workload, policy, mode, Limits(max_message_bytes=args.max_message_bytes),
                                 actor=actor)
    return workload, gateway


def cmd_wrap(args, config) -> int:
    from enforcer.mcp_stdio import wrap

    server = args.server[1:] if args.server and args.server[0] == "--" else args.server
    if not server:
        raise UserError("no server command given (envelope mcp wrap --workload NAME -- SERVER ARGS...)")
    workload, gateway = _gateway(args, config)
    try:
        return wrap(gateway, workload, server, session=args.session, flush_every=args.flush_interval)
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
    workload, gateway = _gateway(args, config)

    def ready(port: int) -> None:
        print(f"envelope: mcp proxy ready on {args.listen.rpartition(':')[0]}:{port} -> {args.upstream}",
              file=sys.stderr, flush=True)

    return proxy(gateway, workload, args.listen, args.upstream, session=args.session, ready=ready,
                 flush_every=args.flush_interval)
