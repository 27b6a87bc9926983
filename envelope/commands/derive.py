"""``envelope derive NAME``: derive a least-privilege policy from a workload's profile.

The four decisions are options here and are recorded in the policy: ``--substrates``
(granularity), ``--closure`` and its rule parameters (closure), ``--min-count``/``--min-sessions``
and ``--admit`` (confidence), ``--fingerprint``/``--expires-in`` (validity). Coverage-stop is
checked first; ``--force`` derives anyway, marked low-confidence and in alert mode.

``--substrates ...,iam`` derives IAM statements from the profile's ``aws:`` behaviours, for the
role of the ``cloud_identity:aws`` fingerprint (or ``--fingerprint cloud_identity:aws=ARN``); it
needs policy_sentry (``pip install 'envelope-least-privilege[iam]'``).

The capability substrate is derived only from sessions the capability probe observed; a profile
with none leaves it out, and says so on standard error and in ``granularity.unobserved``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from enforcer.derive import (
    DEFAULT_COVERAGE_HOURS, DEFAULT_COVERAGE_THRESHOLD, DEFAULT_IPV4_PREFIX, DEFAULT_IPV6_PREFIX, DEFAULT_K,
    DEFAULT_FILE_TREE_DEPTH, DEFAULT_MAX_PORTS, DEFAULT_MAX_SIBLINGS, DEFAULT_MIN_COUNTS, DEFAULT_MIN_SESSIONS,
    CoverageNotReached,
    DeriveError, DeriveOptions, derive,
)
from enforcer.mcp_closure import DEFAULT_MAX_VALUES
from enforcer.policy import DEFAULT_REVIEW_ACTIONS, REVIEW_ACTIONS, PolicyError, dump_policy, load_policy
from enforcer.name_closure import DEFAULT_MAX_NAME_LABELS, DEFAULT_MAX_NAME_SIBLINGS
from sensor.profile import Profile
from sensor.store import ProfileStore, ProfileStoreError, decode_profile
from sensor.workload import DEFAULT_SUBSTRATES, SUBSTRATES

from .. import options, wiring
from ..errors import Finding, UserError
from ..output import write_file
from .profile import load_profile


def register(sub) -> None:
    p = sub.add_parser("derive", help="derive a least-privilege policy from a workload's profile",
                       description=__doc__.splitlines()[0])
    p.add_argument("name", help="workload (name, namespace/name or full key) or a profile file (.json/.msgpack)")
    p.add_argument("--closure", default="structural",
                   help="literal | structural | probabilistic (default structural)")
    p.add_argument("--substrates", default=",".join(DEFAULT_SUBSTRATES),
                   help="comma-separated substrates to encode (default syscall,egress,exec,capability)")
    p.add_argument("--min-count", action="append", metavar="N|SUBSTRATE=N",
                   help=f"occurrences needed (default {DEFAULT_MIN_COUNTS['egress']}, syscall "
                        f"{DEFAULT_MIN_COUNTS['syscall']}: syscalls are judged by the sessions they "
                        f"recur in); repeat for per-substrate values")
    p.add_argument("--min-sessions", action="append", metavar="M|SUBSTRATE=M",
                   help=f"distinct sessions needed (default {DEFAULT_MIN_SESSIONS}); per substrate as above")
    p.add_argument("--review-action", action="append", metavar="SUBSTRATE=deny|alert",
                   help="what happens when a review item recurs: deny it, or let it through and "
                        "report it (default " + ", ".join(f"{k}={v}" for k, v in DEFAULT_REVIEW_ACTIONS.items()
                                                          if k in DEFAULT_SUBSTRATES)
                        + "; dangerous syscalls are always denied)")
    p.add_argument("--session-rule", default="union", choices=["union", "max", "sum"],
                   help="distinct sessions of an envelope element: union of its behaviours' sessions "
                        "(default; exact up to the profile's sample cap), max (lower bound) or sum (upper bound)")
    p.add_argument("--ipv4-prefix", type=int, default=DEFAULT_IPV4_PREFIX, help="IPv4 aggregation prefix (default 24)")
    p.add_argument("--ipv6-prefix", type=int, default=DEFAULT_IPV6_PREFIX, help="IPv6 aggregation prefix (default 64)")
    p.add_argument("--service-cidr", action="append", default=[], metavar="CIDR",
                   help="known service network; addresses inside it widen to it (repeatable)")
    p.add_argument("--max-ports", type=int, default=DEFAULT_MAX_PORTS,
                   help=f"more distinct ports than this per network become a flagged range (default {DEFAULT_MAX_PORTS})")
    p.add_argument("--max-name-siblings", type=int, default=DEFAULT_MAX_NAME_SIBLINGS,
                   help="more distinct names than this under one suffix become *.suffix, never at or "
                        f"above a public suffix (default {DEFAULT_MAX_NAME_SIBLINGS})")
    p.add_argument("--max-name-labels", type=int, default=DEFAULT_MAX_NAME_LABELS,
                   help="labels a *.suffix pattern admits in front of its suffix, at most "
                        f"(default {DEFAULT_MAX_NAME_LABELS})")
    p.add_argument("--max-siblings", type=int, default=DEFAULT_MAX_SIBLINGS,
                   help=f"more exec or file paths than this in one directory become /dir/*, more "
                        f"subdirectories with file behaviours /dir/** (default {DEFAULT_MAX_SIBLINGS})")
    p.add_argument("--file-tree-depth", type=int, default=DEFAULT_FILE_TREE_DEPTH,
                   help="file closure: a /dir/** tree starts at least this many components deep "
                        f"(default {DEFAULT_FILE_TREE_DEPTH}: never /tmp/**)")
    p.add_argument("--max-values", type=int, default=DEFAULT_MAX_VALUES,
                   help=f"mcp: more distinct strings than this at one argument path are not an enumeration "
                        f"(default {DEFAULT_MAX_VALUES})")
    p.add_argument("-k", "--stddev-k", type=float, default=DEFAULT_K,
                   help=f"probabilistic closure: soft-violation distance in standard deviations (default {DEFAULT_K:g})")
    p.add_argument("--coverage-threshold", type=float, default=DEFAULT_COVERAGE_THRESHOLD,
                   help="coverage-stop: new behaviours per substrate in the trailing window must be fewer "
                        f"than this (default {DEFAULT_COVERAGE_THRESHOLD:g})")
    p.add_argument("--coverage-hours", type=float, default=DEFAULT_COVERAGE_HOURS,
                   help=f"coverage-stop trailing window in hours (default {DEFAULT_COVERAGE_HOURS:g})")
    p.add_argument("--force", action="store_true",
                   help="derive although coverage-stop is not reached (low confidence, alert mode)")
    p.add_argument("--admit", action="append", default=[], metavar="KEY",
                   help="admit a review item (entry or behaviour key) explicitly; needs --reason")
    p.add_argument("--reason", action="append", default=[], metavar="TEXT",
                   help="why the matching --admit is admitted (one per --admit, or one for all)")
    p.add_argument("--fingerprint", action="append", default=[], metavar="KEY=VALUE",
                   help="validity fingerprint input, e.g. model=v3 (overrides the profile's)")
    p.add_argument("--expires-in", default=None, metavar="DURATION",
                   help="expiry after the end of the observation window, e.g. 14d, 36h")
    p.add_argument("--mode", default=None, help="observe | alert | enforce (default alert)")
    p.add_argument("--from-cluster", action="store_true",
                   help="derive from NAME's WorkloadProfile objects merged across every node (Kubernetes API)")
    p.add_argument("--kubeconfig", default=None, help="with --from-cluster: kubeconfig file")
    p.add_argument("--context", default=None, help="with --from-cluster: kubeconfig context")
    p.add_argument("--profile-namespace", default=None,
                   help="with --from-cluster: namespace of the WorkloadProfile objects (default envelope-system)")
    p.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml", help="yaml | json (default yaml)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the policy here instead of stdout")
    p.set_defaults(func=cmd_derive)


def load_profile_arg(name: str, state_dir) -> Profile:
    """A profile by workload name from the store, or from a file path."""
    path = Path(name)
    if path.suffix in (".json", ".msgpack") and path.is_file():
        return load_profile_file(path)
    return load_profile(ProfileStore(state_dir), name)


def load_cluster_profile_arg(args) -> Profile:
    """NAME's profile merged across the cluster's WorkloadProfile objects."""
    import os

    from sensor.kubeapi import ClusterApiError, api_client
    from sensor.workloadprofile import DEFAULT_NAMESPACE, load_cluster_profile

    namespace = args.profile_namespace or os.environ.get("POD_NAMESPACE") or DEFAULT_NAMESPACE
    try:
        profile, problems = load_cluster_profile(args.name, api_client(args.kubeconfig, args.context), namespace)
    except (ClusterApiError, LookupError) as e:
        raise UserError(f"--from-cluster: {e}") from None
    for problem in problems:
        print(f"envelope: warning: skipped {problem.name}: {problem.reason}", file=sys.stderr)
    return profile


def load_profile_file(path: Path) -> Profile:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from e
    if path.suffix != ".json":
        try:
            return decode_profile(raw, path)
        except ProfileStoreError as e:
            raise UserError(str(e)) from None
    try:
        return Profile.unpack(json.loads(raw.decode("utf-8")))
    except Exception as e:  # noqa: BLE001 - any failure to decode is a malformed file
        raise UserError(f"{path}: malformed profile ({type(e).__name__}: {str(e)[:200]})") from None


def options_from_args(args) -> DeriveOptions:
    try:
        subs = tuple(s.strip() for s in args.substrates.split(",") if s.strip())
        for s in subs:
            if s not in SUBSTRATES:
                raise DeriveError(f"--substrates: unknown substrate {s!r} (want some of {', '.join(SUBSTRATES)})")
        if len(args.reason) not in (0, 1, len(args.admit)) or (args.admit and not args.reason):
            raise DeriveError(f"--admit needs --reason: give one --reason per --admit ({len(args.admit)}), "
                              f"or one for all; got {len(args.reason)}")
        if args.reason and not args.admit:
            raise DeriveError("--reason given without --admit")
        reasons = args.reason * len(args.admit) if len(args.reason) == 1 else args.reason
        opts = DeriveOptions(
            closure=args.closure,
            substrates=subs,
            min_count=options.thresholds(args.min_count, DEFAULT_MIN_COUNTS, "--min-count"),
            min_sessions=options.thresholds(args.min_sessions, DEFAULT_MIN_SESSIONS, "--min-sessions"),
            ipv4_prefix=args.ipv4_prefix,
            ipv6_prefix=args.ipv6_prefix,
            service_cidrs=tuple(args.service_cidr),
            max_ports=args.max_ports,
            max_siblings=args.max_siblings, file_tree_depth=args.file_tree_depth,
            max_name_siblings=args.max_name_siblings,
            max_name_labels=args.max_name_labels,
            max_values=args.max_values,
            k=args.stddev_k,
            coverage_threshold=args.coverage_threshold,
            coverage_hours=args.coverage_hours,
            force=args.force,
            admits=tuple(zip(args.admit, reasons)),
            fingerprint=options.pairs(args.fingerprint, "--fingerprint"),
            expires_in=options.duration(args.expires_in, "--expires-in") if args.expires_in else None,
            mode=args.mode,
            session_rule=args.session_rule,
            review_actions={**DEFAULT_REVIEW_ACTIONS,
                            **options.choices(args.review_action, REVIEW_ACTIONS, "--review-action")},
            iam_actions=wiring.iam_actions() if "iam" in subs else None,
        )
        opts.validate()
    except DeriveError as e:
        raise UserError(str(e)) from e
    return opts


def cmd_derive(args, config) -> int:
    opts = options_from_args(args)
    if args.from_cluster:
        profile = load_cluster_profile_arg(args)
    else:
        if args.kubeconfig or args.context or args.profile_namespace:
            raise UserError("--kubeconfig, --context and --profile-namespace need --from-cluster")
        profile = load_profile_arg(args.name, config.state_dir)
    try:
        policy = derive(profile, opts)
    except CoverageNotReached as e:
        raise Finding(str(e)) from e
    except (DeriveError, PolicyError) as e:
        raise UserError(f"derive {profile.workload.key}: {e}") from e
    text = dump_policy(policy, args.output)
    if args.out:
        write_file(args.out, text.encode("utf-8"))
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    cov = policy.decisions["confidence"]["coverage"]
    new = ", ".join(f"{s} {n}" for s, n in cov["newBehaviours"].items())
    flag = " LOW CONFIDENCE (forced past coverage-stop)" if policy.low_confidence else ""
    allowed = (f"{len(policy.syscalls)} syscalls, {len(policy.egress)} egress rules, "
               f"{len(policy.names)} names, {len(policy.execs)} execs")
    if "file" in policy.substrates:
        allowed += f", {len(policy.files)} file entries"
    if policy.mcp is not None:
        allowed += f", {len(policy.mcp.calls)} MCP tools and prompts"
    if "iam" in policy.substrates:
        allowed += f", {len(policy.iam)} IAM statements for {policy.iam_identity or 'no known role'}"
    if "capability" in policy.substrates:
        allowed += f", {len(policy.capabilities)} capabilities"
    print(f"derived {policy.metadata_name} for {policy.workload.key}: closure {policy.closure}, mode "
          f"{policy.mode}{flag}; allow {allowed}; {len(policy.review)} in review, {len(policy.watch)} watched; new "
          f"behaviours in the last {cov['hours']:g} h: {new}"
          + (f"; events lost while recording: {sum(cov['loss'].values())}" if cov.get("loss") else "")
          + (f"; written to {args.out}" if args.out else ""), file=sys.stderr)
    for sub, why in sorted((policy.decisions["granularity"].get("unobserved") or {}).items()):
        print(f"envelope: note: substrate {sub} left out: {why}", file=sys.stderr)
    return 0


def read_policy(path: str, judging: bool = False):
    """Load a policy file for a command, as a one-line UserError on any problem. ``judging``:
    the command judges behaviours with it, so a policy with the iam substrate gets the IAM action
    mapper bound."""
    try:
        policy = load_policy(path)
    except PolicyError as e:
        raise UserError(str(e)) from e
    if judging and "iam" in policy.substrates:
        policy.iam_actions = wiring.iam_actions()
    return policy
