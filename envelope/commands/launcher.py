"""``envelope launcher oci|pod``: put the static Landlock launcher in front of a container's command.

No container runtime applies Landlock, so a container's first process must: Envelope's static
launcher reads a ruleset file (``envelope compile --format landlock-ruleset``), enforces it and
execs the real command. These commands write the spec changes that put it there
(:mod:`enforcer.launcher`):

* ``oci CONFIG.json --ruleset FILE``: an OCI runtime spec whose ``process.args`` start with the
  launcher, which and the ruleset are bind-mounted read-only at ``/.envelope/``;
* ``pod MANIFEST --ruleset CONTAINER=FILE ... --image IMAGE``: a Pod, or a workload with a pod
  template (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob), whose containers
  start under the launcher, copied from Envelope's image (``--image``) by an init container, with
  a ConfigMap carrying the rulesets (printed first).

Pure rewrites of the given files: nothing is applied, the output is written atomically with
``--out`` or printed, and bad input is one error line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from enforcer.landlock_formats import RulesetFileError, parse_ruleset_file
from enforcer.launcher import LauncherSpecError, launcher_binary, oci_with_launcher, pod_with_launcher, ruleset_configmap
from sensor.safeyaml import YamlError, dump_yaml, load_yaml
from sensor.state_dir import atomic_write

from ..errors import UserError

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")


def register(sub) -> None:
    p = sub.add_parser("launcher", help="put the static Landlock launcher in an OCI spec or a pod template")
    s = p.add_subparsers(dest="launcher_command", metavar="oci|pod", required=True)
    o = s.add_parser("oci", help="rewrite an OCI runtime spec (config.json) to start under the launcher")
    o.add_argument("spec", help="config.json")
    o.add_argument("--ruleset", required=True, metavar="FILE", help="ruleset file (compile --format landlock-ruleset)")
    o.add_argument("--launcher", default=None, metavar="PATH",
                   help="host path of the launcher binary (default: the one make setup built)")
    o.add_argument("--out", metavar="FILE", help="write here (atomically) instead of stdout")
    o.set_defaults(func=cmd_oci)
    k = s.add_parser("pod", help="rewrite a Pod or workload manifest to start its containers under the launcher")
    k.add_argument("manifest", help="YAML or JSON: a Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job or CronJob")
    k.add_argument("--ruleset", action="append", required=True, metavar="CONTAINER=FILE",
                   help="the ruleset file of one container (repeat; containers not named keep their command)")
    k.add_argument("--image", required=True, help="Envelope's image, which carries the launcher")
    k.add_argument("--configmap", default=None, help="ConfigMap name (default <name>-envelope-rulesets)")
    k.add_argument("--image-config", metavar="FILE", default=None,
                   help="for containers without command: {container: {entrypoint: [...], cmd: [...]}} (YAML/JSON)")
    k.add_argument("--out", metavar="FILE", help="write here (atomically) instead of stdout")
    k.set_defaults(func=cmd_pod)


def _load(path: str, what: str):
    try:
        return load_yaml(Path(path).read_bytes(), f"{what} {path}")
    except OSError as e:
        raise UserError(f"{what} {path}: {e.strerror}") from None
    except YamlError as e:
        raise UserError(str(e)) from None


def _ruleset(path: str) -> str:
    try:
        text = Path(path).read_text()
        parse_ruleset_file(text)
    except OSError as e:
        raise UserError(f"--ruleset {path}: {e.strerror}") from None
    except RulesetFileError as e:
        raise UserError(f"--ruleset {path}: {e}") from None
    return text


def _write(text: str, output: str | None) -> None:
    try:
        if output:
            atomic_write(Path(output), text.encode())
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
    except OSError as e:
        raise UserError(f"cannot write output: {e.filename or ''}: {e.strerror}") from None


def cmd_oci(args, config) -> int:
    spec = _load(args.spec, "spec")
    _ruleset(args.ruleset)
    try:
        launcher = args.launcher or str(launcher_binary())
        out = oci_with_launcher(spec if isinstance(spec, dict) else {}, launcher_source=str(Path(launcher).resolve()),
                                ruleset_source=str(Path(args.ruleset).resolve()))
    except LauncherSpecError as e:
        raise UserError(f"{args.spec}: {e}") from None
    _write(json.dumps(out, indent=2) + "\n", args.out)
    return 0


def _template(doc: dict) -> tuple[dict, callable]:
    """The pod template inside ``doc`` and how to put a rewritten one back."""
    kind = doc.get("kind")
    if kind == "Pod":
        return {"metadata": doc.get("metadata") or {}, "spec": doc.get("spec")}, \
            lambda t: {**doc, "metadata": t["metadata"], "spec": t["spec"]}
    if kind in WORKLOAD_KINDS:
        spec = doc.get("spec") or {}
        return spec.get("template") or {}, lambda t: {**doc, "spec": {**spec, "template": t}}
    if kind == "CronJob":
        spec = doc.get("spec") or {}
        job = (spec.get("jobTemplate") or {}).get("spec") or {}
        return job.get("template") or {}, lambda t: {
            **doc, "spec": {**spec, "jobTemplate": {**spec["jobTemplate"], "spec": {**job, "template": t}}}}
    raise UserError(f"kind {kind!r}: want a Pod or a workload with a pod template "
                    f"({', '.join(WORKLOAD_KINDS)}, CronJob)")


def cmd_pod(args, config) -> int:
    doc = _load(args.manifest, "manifest")
    if not isinstance(doc, dict):
        raise UserError(f"manifest {args.manifest}: not a Kubernetes object")
    rulesets = {}
    for item in args.ruleset:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--ruleset must be CONTAINER=FILE, got {item!r}")
        rulesets[name] = _ruleset(path)
    image_config = _load(args.image_config, "--image-config") if args.image_config else None
    meta = doc.get("metadata") or {}
    name, namespace = meta.get("name") or "workload", meta.get("namespace") or "default"
    cm_name = args.configmap or f"{name}-envelope-rulesets"
    template, put_back = _template(doc)
    try:
        rewritten = pod_with_launcher(template, image=args.image, configmap=cm_name, containers=sorted(rulesets),
                                      image_config=image_config)
        cm = ruleset_configmap(cm_name, namespace, rulesets)
    except LauncherSpecError as e:
        raise UserError(f"{args.manifest}: {str(e).replace('pass image_config', 'pass --image-config')}") from None
    _write("---\n".join(dump_yaml(d, sort_keys=False, default_flow_style=False) for d in (cm, put_back(rewritten))),
           args.out)
    return 0
