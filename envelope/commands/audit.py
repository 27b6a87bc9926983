"""``envelope audit verify`` and ``envelope audit show``: the hash-chained audit log."""

from __future__ import annotations

import sys

from enforcer import audit, state

from ..errors import UserError
from ..output import add_output_option, emit


def register(sub) -> None:
    p = sub.add_parser("audit", help="verify or show the append-only audit log")
    psub = p.add_subparsers(dest="audit_command", metavar="ACTION")
    psub.required = True
    v = psub.add_parser("verify", help="check the hash chain, its MACs and head, and the heads "
                                       "anchored off the node; exit 1 naming each problem")
    v.add_argument("--from-cluster", action="store_true",
                   help="check the node's AuditAnchor objects too (automatic with cluster: on, "
                        "or inside a pod)")
    v.add_argument("--kubeconfig", default=None, help="kubeconfig for --from-cluster")
    add_output_option(v)
    v.set_defaults(func=cmd_verify)
    s = psub.add_parser("show", help="list audit entries")
    s.add_argument("--workload", help="only entries for this workload (name or full key)")
    s.add_argument("--action", help="only actions starting with this (mode, exception, apply, ...)")
    add_output_option(s)
    s.set_defaults(func=cmd_show)


def _anchors(args, config):
    """The node's AuditAnchor client when a cluster is configured (or asked for), else None."""
    from enforcer.auditanchor import ClusterAnchors
    from sensor.kubeapi import Backoff, ClusterApiError, api_client

    from ..daemon import cluster_client

    if args.from_cluster:
        try:
            client = api_client(args.kubeconfig or config.kubeconfig)
        except ClusterApiError as e:
            raise UserError(f"--from-cluster: {e}") from None
    else:
        client = cluster_client(config)
    if client is None:
        return None
    return ClusterAnchors.from_api_client(client, config.node_name, config.profile_namespace,
                                          backoff=Backoff(attempts=3))


def cmd_verify(args, config) -> int:
    from enforcer.auditanchor import verify_anchored

    anchors = _anchors(args, config)
    try:
        result = audit.verify(config.state_dir) if anchors is None else verify_anchored(config.state_dir, anchors)
    except audit.AuditError as e:
        raise UserError(str(e)) from None
    if args.output != "table":
        emit(result.to_dict(), args.output)
    elif result.ok:
        anchored = (f"; {result.checkpoints} checkpoints anchored off the node agree" if result.anchored
                    else "; not anchored off the node (no cluster configured)")
        print(f"{result.path}: {result.entries} entries, chain intact{anchored}")
    if not result.ok:
        for p in result.problems:
            print(f"envelope: audit: {result.path}: {p}", file=sys.stderr)
        return 1
    return 0


def cmd_show(args, config) -> int:
    workload = args.workload
    if workload:
        try:
            workload = state.resolve_workload(config.state_dir, workload).key
        except state.StateError:
            pass  # a workload no longer known still has its history: match the text as given
    entries = audit.read(config.state_dir, workload=workload, action=args.action)
    rows = [[e.get("seq"), e.get("time"), e.get("actor"), e.get("action"), e.get("workload") or "-",
             e.get("reason")] for e in entries]
    emit(entries, args.output, rows, ["seq", "time", "actor", "action", "workload", "reason"])
    return 0
