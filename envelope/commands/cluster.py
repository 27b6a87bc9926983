"""Profiles and policies across the cluster, read through the Kubernetes API (``envelope cluster``).

``cluster profiles``         workloads with WorkloadProfile objects, merged across nodes
``cluster profile NAME``     one workload's profile merged across nodes (``--save FILE`` writes it
                             as a profile file that ``envelope derive FILE`` reads)
``cluster policies``         LeastPrivilegePolicy objects with each node's status
``cluster apply FILE``       create or update a policy object from a policy file, in its
                             workload's namespace

The API is found in-cluster (service account) or through the kubeconfig (``--kubeconfig``,
``--context``, else ``$KUBECONFIG`` or ``~/.kube/config``).
"""

from __future__ import annotations

import os
from pathlib import Path

import msgpack

from enforcer.leastprivilegepolicy import ClusterPolicies, node_statuses
from enforcer.policy import PolicyError, load_policy
from sensor.kubeapi import Backoff, ClusterApiError, api_client
from sensor.workloadprofile import DEFAULT_NAMESPACE, ClusterProfiles, load_cluster_profile
from sensor.profile import Profile

from ..errors import Finding, UserError
from ..output import add_output_option, emit, iso, write_file


def register(sub) -> None:
    p = sub.add_parser("cluster", help="profiles and policies across the cluster (Kubernetes API)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, $KUBECONFIG, ~/.kube/config)")
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("--profile-namespace", default=os.environ.get("POD_NAMESPACE") or DEFAULT_NAMESPACE,
                   help=f"namespace of the WorkloadProfile objects (default {DEFAULT_NAMESPACE})")
    csub = p.add_subparsers(dest="cluster_command", metavar="COMMAND")
    csub.required = True

    q = csub.add_parser("profiles", help="workloads with profiles, merged across nodes")
    add_output_option(q)
    q.set_defaults(func=cmd_profiles)

    q = csub.add_parser("profile", help="one workload's profile merged across nodes")
    q.add_argument("name", help="workload: name, namespace/name, namespace/kind/name or the full key")
    q.add_argument("--save", metavar="FILE", help="also write the merged profile to FILE (.msgpack or .json)")
    add_output_option(q)
    q.set_defaults(func=cmd_profile)

    q = csub.add_parser("policies", help="policies with each node's status")
    q.add_argument("-n", "--namespace", default=None, help="only this namespace")
    add_output_option(q)
    q.set_defaults(func=cmd_policies)

    q = csub.add_parser("apply", help="create or update a LeastPrivilegePolicy from a policy file")
    q.add_argument("file", help="policy file (YAML or JSON) as written by envelope derive")
    q.add_argument("--skip-replay-gate", metavar="REASON", default=None,
                   help="apply an enforce-mode policy without the replay gate (audited with REASON)")
    q.set_defaults(func=cmd_apply)


def _client(args):
    try:
        return api_client(args.kubeconfig, args.context)
    except ClusterApiError as e:
        raise UserError(str(e)) from None


def _profiles(args) -> ClusterProfiles:
    return ClusterProfiles.from_api_client(_client(args), namespace=args.profile_namespace,
                                           backoff=Backoff(attempts=3))


def _read_all(args):
    try:
        return _profiles(args).read_all()
    except ClusterApiError as e:
        raise UserError(str(e)) from None


def _summary(p: Profile) -> dict:
    start, end = p.window()
    behaviours = p.behaviours()
    return {"workload": p.workload.key, "nodes": sorted(p.nodes), "behaviours": len(behaviours),
            "sessions": p.session_count, "start": start, "end": end, "loss": sum(p.loss().values())}


def cmd_profiles(args, config) -> int:
    assembly = _read_all(args)
    rows = [_summary(p) for p in assembly.profiles.values()]
    data = {"profiles": rows, "problems": [{"object": x.name, "reason": x.reason} for x in assembly.problems]}
    emit(data, args.output,
         rows=[(r["workload"], len(r["nodes"]), r["behaviours"], r["sessions"], iso(r["end"]), r["loss"])
               for r in rows],
         headers=["workload", "nodes", "behaviours", "sessions", "last update", "lost"])
    _warn(assembly.problems)
    return 0


def cmd_profile(args, config) -> int:
    try:
        profile, problems = load_cluster_profile(args.name, _client(args), namespace=args.profile_namespace)
    except (ClusterApiError, LookupError) as e:
        raise UserError(str(e)) from None
    if args.save:
        path = Path(args.save)
        if path.suffix == ".json":
            import json
            data = (json.dumps(profile.pack(), sort_keys=True) + "\n").encode()
        else:
            data = msgpack.packb(profile.pack(), use_bin_type=True)
        write_file(path, data)
    view = profile.to_json()
    emit(view, args.output,
         rows=[(b["key"], b["count"], b["sessions"], iso(b["first_seen"]), iso(b["last_seen"]))
               for b in view["behaviours"]],
         headers=["behaviour", "count", "sessions", "first seen", "last seen"])
    _warn(problems)
    return 0


def cmd_policies(args, config) -> int:
    client = ClusterPolicies.from_api_client(_client(args), node=config.node_name, backoff=Backoff(attempts=3))
    try:
        policies, problems = client.list(args.namespace)
    except ClusterApiError as e:
        raise UserError(str(e)) from None
    out, rows = [], []
    for cp in policies:
        statuses = node_statuses(cp.obj)
        out.append({"namespace": cp.namespace, "name": cp.name, "workload": cp.workload.key,
                    "mode": cp.policy.mode, "stale": cp.stale, "generation": cp.generation,
                    "nodes": {n: s.to_dict() for n, s in statuses.items()}})
        if not statuses:
            rows.append((f"{cp.namespace}/{cp.name}", cp.policy.mode, "yes" if cp.stale else "no", "-", "-", "", ""))
        for n, s in statuses.items():
            rows.append((f"{cp.namespace}/{cp.name}", cp.policy.mode, "yes" if cp.stale else "no", n, s.state,
                         s.localhost_profile or "", s.reason))
    emit({"policies": out, "problems": [{"object": x.name, "reason": x.reason} for x in problems]}, args.output,
         rows=rows, headers=["policy", "mode", "stale", "node", "state", "localhost profile", "reason"])
    _warn(problems)
    return 0


def cmd_apply(args, config) -> int:
    try:
        policy = load_policy(args.file)
    except PolicyError as e:
        raise UserError(str(e)) from None
    api = _client(args)
    if policy.mode == "enforce":
        replay_gate(args, config, policy, api)
    client = ClusterPolicies.from_api_client(api, node=config.node_name, backoff=Backoff(attempts=3))
    try:
        cp = client.create(policy)
    except ClusterApiError as e:
        raise UserError(str(e)) from None
    print(f"{PLURAL_NAME}/{cp.name} applied in {cp.namespace} (generation {cp.generation}, mode {cp.policy.mode})")
    return 0


PLURAL_NAME = "leastprivilegepolicy.envelope.dev"


def replay_gate(args, config, policy, api) -> None:
    """An enforce-mode policy goes to the cluster only if nothing in the workload's evidence,
    merged across nodes, would be denied on any substrate it encodes (``replay --strict``)."""
    from enforcer import audit
    from enforcer.replay import replay

    if args.skip_replay_gate is not None:
        if not args.skip_replay_gate.strip():
            raise UserError("--skip-replay-gate needs a reason")
        audit.append(config.state_dir, "replay.gate.skipped", workload=policy.workload.key,
                     reason=args.skip_replay_gate.strip(), details={"policy": policy.metadata_name})
        return
    profiles = ClusterProfiles.from_api_client(api, namespace=args.profile_namespace, backoff=Backoff(attempts=3))
    try:
        profile, _problems = profiles.read(policy.workload)
    except ClusterApiError as e:
        raise UserError(f"replay gate: {e}") from None
    if profile is None:
        raise Finding(f"replay gate: no evidence of {policy.workload.key} in the cluster to replay the "
                      f"enforce-mode policy against; observe first, or --skip-replay-gate REASON")
    r = replay(policy, profile)
    if r["wouldBreak"] or r["unknownOverflow"]:
        shown = ", ".join(d["key"] for d in r["denied"][:5]) or "behaviours over the profile's caps"
        raise Finding(f"replay gate: enforcing {policy.metadata_name} would deny {r['deniedBehaviours']} observed "
                      f"behaviours ({shown}{' ...' if r['deniedBehaviours'] > 5 else ''}); apply it in alert "
                      f"mode, or --skip-replay-gate REASON")


def _warn(problems) -> None:
    import sys
    for x in problems:
        print(f"envelope: warning: {x.name}: {x.reason}", file=sys.stderr)
