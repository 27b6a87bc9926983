"""``envelope compile POLICY --format oci-seccomp|spo|networkpolicy|cilium|iam|k8s-capabilities|landlock|landlock-ruleset [--out FILE]``.

Network exports take the cluster's Services (``--services FILE`` or ``--services-from-cluster``)
so that ClusterIP destinations are exported as the Services' pods (see :mod:`enforcer.netexport`).

``--format iam`` writes the IAM policy document of the policy's ``spec.allow.iam`` statements
for ``--iam-target boundary|managed|role|session`` (:mod:`enforcer.iamdocument`, which states
AWS's size limit for each); the size against the limit goes to standard error.

``--format k8s-capabilities`` writes the container ``securityContext.capabilities`` of the
policy's ``spec.allow.capabilities`` (:mod:`enforcer.capabilities`): ``drop: [ALL]`` and the
allowed ones added back.

Landlock formats compile the policy's exec and file entries (:mod:`enforcer.landlock_rules`),
with what each exec needs found in ``--root`` (the filesystem the ruleset is applied in: ``/``, or
a container's rootfs): ``landlock`` is the JSON of the Landlock maintainers' landlockconfig
project (``children`` rules enumerated from ``--root`` now), ``landlock-ruleset`` the ruleset file
that Envelope's static launcher applies in a container (:mod:`enforcer.landlock_formats`).

Compiles a policy file into an enforcement artefact. A malformed policy gives one error line and
writes nothing; ``--out FILE`` is written atomically, so an existing file is either replaced
whole or left as it was.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from enforcer import capabilities as capability_sets
from enforcer import exceptions as exc_store
from enforcer import iamdocument, netexport, seccomp
from enforcer.policy import PolicyError, load_policy
from enforcer.runtime import RUNTIMES

from ..errors import UserError
from ..output import write_file

FORMATS = ("oci-seccomp", "spo", "networkpolicy", "cilium", "iam", "k8s-capabilities", "landlock",
           "landlock-ruleset")
LANDLOCK_FORMATS = ("landlock", "landlock-ruleset")


def register(sub) -> None:
    p = sub.add_parser("compile", help="compile a policy to OCI seccomp, SPO, NetworkPolicy, Cilium, an "
                                       "IAM policy document, a container's securityContext.capabilities or a "
                                       "Landlock ruleset")
    p.add_argument("policy", help="policy file (YAML or JSON)")
    p.add_argument("--format", "-f", required=True, choices=FORMATS, help="output format")
    p.add_argument("--mode", choices=seccomp.MODES, default=None,
                   help="override the policy's mode (seccomp formats)")
    p.add_argument("--runtime", choices=sorted(RUNTIMES) + ["none"], default=None,
                   help="add the container runtime's completeness set (default: runc for "
                        "container workloads, none for host units)")
    p.add_argument("--arch", choices=sorted(seccomp.ARCHITECTURES), default="x86_64",
                   help="target machine architecture (seccomp formats; default x86_64)")
    p.add_argument("--with-exceptions", action="store_true",
                   help="also allow syscalls (seccomp formats) or capabilities (k8s-capabilities) of the "
                        "workload's active exceptions (state dir)")
    p.add_argument("--pod-label", action="append", metavar="KEY=VALUE",
                   help="pod selector label for network exports (default app=<workload name>); "
                        "repeat for several")
    p.add_argument("--services", metavar="FILE",
                   help="network exports: the cluster's Services (a Service or List, YAML or JSON, e.g. "
                        "`kubectl get services -A -o json`); ClusterIP destinations become the Services' pods")
    p.add_argument("--services-from-cluster", action="store_true",
                   help="network exports: read the Services through the Kubernetes API instead")
    p.add_argument("--kubeconfig", default=None, help="with --services-from-cluster: kubeconfig file")
    p.add_argument("--context", default=None, help="with --services-from-cluster: kubeconfig context")
    p.add_argument("--iam-target", choices=sorted(iamdocument.TARGETS), default="boundary",
                   help="iam format: what the document is attached as (default boundary: a permissions "
                        "boundary; session: an AssumeRole session policy; managed; role: inline)")
    p.add_argument("--root", default="/", metavar="DIR",
                   help="Landlock formats: the filesystem the ruleset is applied in (default /; a container's "
                        "rootfs for the launcher), where exec needs and children are looked up")
    p.add_argument("--inexpressible", choices=["refuse", "drop"], default="refuse",
                   help="Landlock formats: an entry Landlock cannot express without covering a sensitive path is "
                        "refused (default) or left out and listed")
    p.add_argument("--on-unsupported", choices=["refuse", "best-effort"], default="refuse",
                   help="landlock-ruleset: what the launcher does where the kernel cannot restrict a handled "
                        "right: refuse to run (default) or drop the right and print each gap")
    p.add_argument("--report", metavar="FILE",
                   help="write where each seccomp rule, IAM document statement or Landlock rule came from (JSON) "
                        "to FILE")
    p.add_argument("--out", metavar="FILE", help="write to FILE (atomically) instead of stdout")
    p.add_argument("-o", "--output", choices=["json", "yaml"], default=None,
                   help="serialization (default: json for oci-seccomp and iam, yaml for the Kubernetes objects "
                        "and k8s-capabilities; an IAM policy document is JSON only)")
    p.set_defaults(func=cmd_compile)


def render_landlock(policy, args) -> tuple[str, dict]:
    """The Landlock artefact and its report (every rule with the entries it came from, and where
    the ruleset is wider or narrower than the policy). landlockconfig is JSON only; the ruleset
    file is the launcher's own text format."""
    from enforcer.exec_needs import ExecNeedsError, resolve
    from enforcer.landlock import expand_children
    from enforcer.landlock_formats import (RulesetFileError, dump_landlockconfig, landlockconfig,
                                           landlockconfig_gaps, ruleset_file)
    from enforcer.landlock_rules import CHILDREN_OBJECT, LandlockCompileError, compile_policy
    if args.output == "yaml":
        raise UserError(f"-o yaml: --format {args.format} has one form (landlockconfig is JSON, the ruleset file "
                        f"is the launcher's text); drop -o")
    if not {"exec", "file"} & set(policy.substrates):
        raise UserError(f"{policy.workload}: the policy includes neither the exec nor the file substrate; "
                        f"a Landlock ruleset would restrict nothing (derive with --substrates ...,exec,file)")
    root = str(Path(args.root).resolve())
    try:
        needs = resolve(policy.execs, root=root) if "exec" in policy.substrates else {}
        compiled = compile_policy(policy, exec_needs=needs, inexpressible=args.inexpressible)
        report = compiled.to_dict()
        if args.format == "landlock-ruleset":
            return ruleset_file(compiled, args.on_unsupported), report
        expansions = {}
        for r in compiled.rules:
            if r.object == CHILDREN_OBJECT:
                try:
                    expansions[r.path] = expand_children(r, root)
                except OSError as e:
                    raise UserError(f"children rule on {r.path}: cannot list it under --root {root}: "
                                    f"{e.strerror}") from None
        report["landlockconfigGaps"] = landlockconfig_gaps(compiled)
        return dump_landlockconfig(landlockconfig(compiled, expansions)), report
    except (ExecNeedsError, LandlockCompileError, RulesetFileError) as e:
        raise UserError(str(e)) from None


def render(policy, args, state_dir) -> tuple[str, dict | None]:
    """The artefact text and, for seccomp, IAM and Landlock formats, the provenance report."""
    if args.format in LANDLOCK_FORMATS:
        return render_landlock(policy, args)
    if args.format == "iam":
        if args.output == "yaml":
            raise UserError("-o yaml: an IAM policy document is JSON (AWS reads no other form); drop -o")
        doc = iamdocument.compile_iam(policy, args.iam_target)
        t = doc.target
        print(f"envelope: iam {t.name} document ({t.what}): {doc.size} of {t.limit} characters"
              f"{'' if t.whitespace_counts else ' (whitespace not counted)'}, {len(doc.statements)} statements "
              f"from {len(policy.iam)} policy entries", file=sys.stderr)
        if not policy.iam:
            print("envelope: note: the policy allows no IAM action; the document denies everything",
                  file=sys.stderr)
        if t.name == "session":
            print("envelope: note: STS also bounds a session policy's packed size (PackedPolicySize), which "
                  "cannot be computed offline", file=sys.stderr)
        return doc.text, doc.report()
    if args.format == "k8s-capabilities":
        extra = exc_store.capability_allowances(state_dir, policy.workload) if args.with_exceptions else ()
        return serialize(capability_sets.k8s_capabilities(policy, extra), args.output or "yaml"), None
    if args.format in ("oci-seccomp", "spo"):
        extra = None
        if args.with_exceptions:
            extra = exc_store.syscall_allowances(state_dir, policy.workload)
        compiled = seccomp.profile_for(policy, args.mode, runtime=args.runtime, arch=args.arch,
                                       exceptions=extra)
        if args.format == "oci-seccomp":
            return serialize(compiled.profile, args.output or "json"), compiled.report_dict()
        doc = seccomp.compile_spo(policy, args.mode, runtime=compiled.runtime, arch=args.arch,
                                  extra_allow=extra)
        return serialize(doc, args.output or "yaml"), compiled.report_dict()
    labels = netexport.parse_pod_labels(args.pod_label)
    services = load_services(args)
    if services is not None:
        for note in netexport.service_destinations(policy, services).unresolved:
            print(f"envelope: note: {note}", file=sys.stderr)
    for warning in netexport.name_warnings(policy, args.format):
        print(f"envelope: warning: {warning}", file=sys.stderr)
    if args.format == "networkpolicy":
        return serialize(netexport.compile_networkpolicy(policy, labels, services), args.output or "yaml"), None
    return serialize(netexport.compile_cilium(policy, labels, services), args.output or "yaml"), None


def serialize(doc, fmt: str) -> str:
    """JSON as every artefact is written (sorted, indented) or YAML as kubectl reads it."""
    if fmt == "json":
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"
    return netexport.dump(doc)


def load_services(args) -> list[dict] | None:
    """The Services for ClusterIP destinations: from ``--services FILE`` or through the API."""
    if getattr(args, "services", None) and getattr(args, "services_from_cluster", False):
        raise UserError("give --services FILE or --services-from-cluster, not both")
    if getattr(args, "services_from_cluster", False):
        from kubernetes.client import CoreV1Api

        from sensor.kubeapi import Backoff, ClusterApiError, TimedApi, api_client, list_all

        try:
            core = TimedApi(CoreV1Api(api_client(args.kubeconfig, args.context)))
            items, _ = list_all(lambda **kw: core.list_service_for_all_namespaces(_preload_content=False, **kw),
                                "list services", Backoff(attempts=3))
        except ClusterApiError as e:
            raise UserError(f"--services-from-cluster: {e}") from None
        return items
    if not getattr(args, "services", None):
        return None
    from sensor.safeyaml import YamlError, load_yaml

    try:
        doc = load_yaml(Path(args.services).read_bytes(), f"--services {args.services}")
    except OSError as e:
        raise UserError(f"--services {args.services}: {e.strerror or e}") from None
    except YamlError as e:
        raise UserError(str(e)) from None
    items = doc.get("items") if isinstance(doc, dict) and "items" in doc else [doc]
    if not isinstance(items, list) or any(not isinstance(i, dict) or i.get("kind", "Service") != "Service"
                                          for i in items):
        raise UserError(f"--services {args.services}: expected a Service or a List of Services")
    return items


def cmd_compile(args, config) -> int:
    try:
        policy = load_policy(args.policy)
        text, report = render(policy, args, config.state_dir)
    except (PolicyError, seccomp.SeccompCompileError, netexport.NetExportError,
            exc_store.ExceptionError, iamdocument.IamDocumentError, capability_sets.CapabilityCompileError) as e:
        raise UserError(str(e)) from None
    if args.format in ("networkpolicy", "cilium") and policy.mode != "enforce":
        print(f"envelope: note: policy mode is {policy.mode}; a {args.format} export always "
              f"enforces (the mode is kept as an annotation)", file=sys.stderr)
    if args.format == "k8s-capabilities" and policy.mode != "enforce":
        print(f"envelope: note: policy mode is {policy.mode}; the kubelet enforces a container's capabilities "
              f"whatever the mode", file=sys.stderr)
    if args.format == "iam" and policy.mode != "enforce":
        print(f"envelope: note: policy mode is {policy.mode}; AWS enforces an attached IAM document "
              f"whatever the mode", file=sys.stderr)
    if args.format in LANDLOCK_FORMATS:
        if policy.mode != "enforce":
            print(f"envelope: note: policy mode is {policy.mode}; a Landlock ruleset always enforces (Landlock "
                  f"has no log-only mode): apply it where the policy is enforced", file=sys.stderr)
        notes: dict[str, int] = {}
        for n in report["notes"]:
            notes[n["rule"]] = notes.get(n["rule"], 0) + 1
        for rule, n in sorted(notes.items()):
            print(f"envelope: {rule}: {n} entr{'y' if n == 1 else 'ies'} (see --report)", file=sys.stderr)
        for gap in report.get("landlockconfigGaps", []):
            print(f"envelope: note: landlockconfig: {gap}", file=sys.stderr)
    if args.format in ("oci-seccomp", "spo") and not report.get("constrained", True):
        print("envelope: note: the policy leaves the syscall substrate out; the profile allows "
              "every syscall", file=sys.stderr)
    if args.format in ("oci-seccomp", "spo"):
        added: dict[str, int] = {}
        for r in report["rules"]:
            if not r["rule"].startswith("policy"):
                added[r["rule"]] = added.get(r["rule"], 0) + 1
        for rule, n in sorted(added.items()):
            print(f"envelope: {rule}: {n} syscall(s) added (see --report)", file=sys.stderr)
    if args.report and report is not None:
        write_file(args.report, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    if args.out:
        write_file(args.out, text.encode())
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0
