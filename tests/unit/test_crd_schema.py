"""The CRDs: apiextensions.k8s.io/v1 with structural schemas, and the objects Envelope writes
(WorkloadProfile chunks, LeastPrivilegePolicy bodies and status) validate against them and
lose nothing to the API server's pruning of unknown fields."""

from __future__ import annotations

import copy
import datetime as dt
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from enforcer.leastprivilegepolicy import NodeStatus, policy_from_cr, policy_to_cr, stale_condition, status_body
from enforcer.derive import DeriveOptions, derive
from enforcer.policy import dump_policy, load_policy
from sensor.workloadprofile import profile_to_crs
from sensor.profile import Profile
from sensor.workload import Workload

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "daemonset" / "crds"
W = Workload("agents", "Deployment", "research-agent", "main")


def crd(plural: str) -> dict:
    return yaml.safe_load((CRD_DIR / f"{plural}.envelope.dev.yaml").read_text())


def schema_of(plural: str) -> dict:
    (version,) = crd(plural)["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


# ---- structural schema rules (apiextensions.k8s.io/v1) ----------------------------------------


def structural_problems(node: dict, path: str = "") -> list[str]:
    """The rules of a structural schema, as the API server checks them."""
    out = []
    for junctor in ("allOf", "anyOf", "oneOf", "not"):
        if junctor in node:
            out.append(f"{path}: logical junctor {junctor} not used by Envelope's schemas")
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if not node.get("type") and not node.get("x-kubernetes-int-or-string") and not preserve:
        out.append(f"{path or '<root>'}: no type")
    if "properties" in node and "additionalProperties" in node:
        out.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if node.get("type") == "array":
        if "items" not in node:
            out.append(f"{path}: array without items")
        else:
            out += structural_problems(node["items"], path + "[]")
        if node.get("x-kubernetes-list-type") == "map":
            keys = node.get("x-kubernetes-list-map-keys") or []
            req = set(node["items"].get("required", []))
            for k in keys:
                if k not in req and "default" not in node["items"].get("properties", {}).get(k, {}):
                    out.append(f"{path}: list map key {k} must be required or defaulted")
    for name, sub in (node.get("properties") or {}).items():
        if path == "" and name == "metadata":
            if set(sub) - {"type"} or sub.get("type") != "object":
                out.append("metadata: only restrictions on name and generateName are allowed")
            continue
        out += structural_problems(sub, f"{path}.{name}")
    ap = node.get("additionalProperties")
    if isinstance(ap, dict):
        out += structural_problems(ap, f"{path}.*")
    for r in node.get("required", []):
        if r not in (node.get("properties") or {}):
            out.append(f"{path}: required field {r} is not in properties")
    return out


def to_json_schema(node: dict) -> dict:
    """OpenAPI v3 (Kubernetes dialect) to JSON Schema; objects without
    x-kubernetes-preserve-unknown-fields refuse unknown fields, as pruning would drop them."""
    out: dict = {}
    for k in ("enum", "minimum", "maximum", "minLength", "maxLength", "pattern", "format", "required",
              "minItems", "maxItems"):
        if k in node:
            out[k] = node[k]
    if "type" in node:
        out["type"] = [node["type"], "null"] if node.get("nullable") else node["type"]
    if "properties" in node:
        out["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(node["additionalProperties"])
    if "items" in node:
        out["items"] = to_json_schema(node["items"])
    if out.get("type") == "object" and "properties" not in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["maxProperties"] = 0  # an object with no fields declared keeps none
    return out


FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value) -> bool:
    if value is None:  # formats apply to strings; nullable fields may be null
        return True
    if not isinstance(value, str) or "T" not in value:
        raise ValueError(f"{value!r} is not RFC 3339")
    dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return True


def validate(obj: dict, plural: str) -> None:
    schema = to_json_schema(schema_of(plural))
    schema["properties"]["metadata"] = {"type": "object"}
    jsonschema.Draft202012Validator(schema, format_checker=FORMATS).validate(obj)


def prune(obj, node: dict, root: bool = True):
    """What the API server stores: unknown fields dropped unless preserved (metadata is
    ObjectMeta, which the schema does not prune)."""
    if root:
        out = prune({k: v for k, v in obj.items() if k != "metadata"}, node, False)
        return out | ({"metadata": copy.deepcopy(obj["metadata"])} if "metadata" in obj else {})
    if isinstance(obj, dict) and node.get("type", "object") == "object":
        if node.get("x-kubernetes-preserve-unknown-fields") and "properties" not in node:
            return copy.deepcopy(obj)
        props = node.get("properties")
        ap = node.get("additionalProperties")
        out = {}
        for k, v in obj.items():
            if props and k in props:
                out[k] = prune(v, props[k], False)
            elif isinstance(ap, dict):
                out[k] = prune(v, ap, False)
            elif node.get("x-kubernetes-preserve-unknown-fields"):
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(obj, list) and "items" in node:
        return [prune(x, node["items"], False) for x in obj]
    return copy.deepcopy(obj)


# ---- the CRDs themselves --------------------------------------------------------------------------


@pytest.mark.parametrize("plural,kind", [("workloadprofiles", "WorkloadProfile"),
                                         ("leastprivilegepolicies", "LeastPrivilegePolicy")])
def test_crd_is_v1_structural_and_named_right(plural, kind):
    c = crd(plural)
    assert c["apiVersion"] == "apiextensions.k8s.io/v1" and c["kind"] == "CustomResourceDefinition"
    assert c["metadata"]["name"] == f"{plural}.envelope.dev"
    assert c["spec"]["group"] == "envelope.dev" and c["spec"]["scope"] == "Namespaced"
    assert c["spec"]["names"]["plural"] == plural and c["spec"]["names"]["kind"] == kind
    (v,) = c["spec"]["versions"]
    assert v["name"] == "v1alpha1" and v["served"] and v["storage"]
    assert structural_problems(v["schema"]["openAPIV3Schema"]) == []


def test_structural_checker_catches_a_missing_type():
    bad = copy.deepcopy(schema_of("workloadprofiles"))
    del bad["properties"]["spec"]["properties"]["node"]["type"]
    assert structural_problems(bad) == [".spec.node: no type"]


@pytest.mark.parametrize("plural", ["workloadprofiles", "leastprivilegepolicies"])
def test_printer_columns_point_at_schema_fields(plural):
    (v,) = crd(plural)["spec"]["versions"]
    root = v["schema"]["openAPIV3Schema"]
    for col in v["additionalPrinterColumns"]:
        path = re.sub(r"\[\?\(.*?\)\]", "[]", col["jsonPath"])  # filters select list items
        if path.startswith(".metadata."):
            continue
        node = root
        for part in path.lstrip(".").split("."):
            name = part.split("[", 1)[0]
            assert name in node.get("properties", {}), f"{col['name']}: {path} not in the schema"
            node = node["properties"][name]
            if "[" in part:
                node = node["items"]


def test_policy_capability_names_are_the_capability_table():
    allow = schema_of("leastprivilegepolicies")["properties"]["spec"]["properties"]["allow"]["properties"]
    from sensor.capabilities import NAMES
    assert allow["capabilities"]["items"]["enum"] == sorted(NAMES.values())


def test_policy_status_is_a_subresource_with_per_node_list_map():
    (v,) = crd("leastprivilegepolicies")["spec"]["versions"]
    assert v["subresources"] == {"status": {}}
    nodes = v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["nodes"]
    assert nodes["x-kubernetes-list-type"] == "map" and nodes["x-kubernetes-list-map-keys"] == ["node"]
    assert nodes["items"]["properties"]["state"]["enum"] == ["applied", "failed", "pending", "removed"]


def test_preserve_unknown_fields_only_inside_decision_and_evidence_records():
    allowed = {".spec.decisions.granularity", ".spec.decisions.closure", ".spec.decisions.closure.rules",
               ".spec.decisions.closure.syscallGroups[]", ".spec.decisions.confidence",
               ".spec.decisions.validity", ".spec.decisions.validity.triggers[]", ".spec.detection[]",
               ".spec.provenance[]", ".spec.review[]"}

    def walk(node, path):
        if node.get("x-kubernetes-preserve-unknown-fields"):
            yield path
        for k, v in (node.get("properties") or {}).items():
            yield from walk(v, f"{path}.{k}")
        if "items" in node:
            yield from walk(node["items"], path + "[]")

    assert set(walk(schema_of("leastprivilegepolicies"), "")) <= allowed
    assert list(walk(schema_of("workloadprofiles"), "")) == []
    spec = schema_of("leastprivilegepolicies")["properties"]["spec"]["properties"]
    for typed in ("workload", "allow"):
        assert list(walk(spec[typed], "")) == []


# ---- WorkloadProfile objects ----------------------------------------------------------------------


def research_profile(nodes=("node-a", "node-b"), sessions=6) -> Profile:
    p = Profile(W)
    base = 1_764_000_000.0
    for n in nodes:
        c = p.node(n)
        for s in range(sessions):
            sid = f"{n}-{s}"
            t = base + s * 3600
            c.open_session(sid, t, {"pod_uid": f"uid-{s}", "container_id": f"{s:064x}"})
            for key, count in [("syscall:read", 400), ("syscall:write", 120), ("syscall:openat", 60),
                               ("syscall:connect", 4), ("syscall:execve", 2), ("syscall:exit_group", 1),
                               ("connect:tcp:10.0.3.7:443", 4), ("send:udp:10.96.0.10:53", 8),
                               ("exec:/usr/bin/git", 2), ("exec:/usr/local/bin/python3", 1)]:
                c.observe(sid, key, count + s, t + 1)
            c.close_session(sid, t + 600)
        c.add_fingerprint("image", "sha256:" + "ab" * 32, base)
        c.touch(base + sessions * 3600)
    return p


def test_workload_profile_objects_validate_and_survive_pruning():
    objs = profile_to_crs(research_profile(), chunk_size=300)
    assert len(objs) > 2
    for obj in objs:
        validate(obj, "workloadprofiles")
        assert prune(obj, schema_of("workloadprofiles")) == obj


def test_workload_profile_schema_rejects_bad_objects():
    (obj,) = profile_to_crs(research_profile(nodes=("node-a",)))
    for mutate in (lambda o: o["spec"].update(encoding="gzip"),
                   lambda o: o["spec"]["chunk"].update(digest="xyz"),
                   lambda o: o["spec"].pop("node"),
                   lambda o: o["spec"].update(updated="yesterday"),
                   lambda o: o["spec"].update(extra=1)):
        bad = copy.deepcopy(obj)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            validate(bad, "workloadprofiles")


# ---- LeastPrivilegePolicy objects -----------------------------------------------------------------


def derived_policies() -> list:
    p = research_profile()
    out = []
    for closure in ("literal", "structural", "probabilistic"):
        out.append(derive(p, DeriveOptions(closure=closure, force=True, expires_in=7 * 86400,
                                           fingerprint={"model": "gpt-x-2026-10"})))
    out.append(derive(p, DeriveOptions(closure="structural", force=True, substrates=("syscall", "egress"),
                                       mode="enforce")))
    golden = sorted((ROOT / "tests" / "golden" / "compiled" / "policies").glob("*.yaml"))
    out += [load_policy(f) for f in golden]
    out.append(load_policy(ROOT / "tests" / "golden" / "policies" / "corpus-agent.iam.policy.yaml"))
    out.append(load_policy(ROOT / "tests" / "golden" / "policies" / "research-agent.structural.policy.yaml"))
    return out


@pytest.mark.parametrize("policy", derived_policies(), ids=lambda p: f"{p.metadata_name}-{p.closure}-{p.mode}")
def test_policy_object_validates_and_round_trips_through_pruning(policy):
    obj = policy_to_cr(policy)
    validate(obj, "leastprivilegepolicies")
    stored = prune(obj, schema_of("leastprivilegepolicies"))
    assert stored == obj, "the API server would drop fields of this policy"
    back = policy_from_cr(stored | {"status": {"nodes": []}})
    assert dump_policy(back) == dump_policy(policy)


def test_policy_schema_rejects_what_the_enforcer_cannot_act_on():
    obj = policy_to_cr(derived_policies()[0])
    for mutate in (lambda o: o["spec"].update(mode="block"),
                   lambda o: o["spec"]["allow"]["syscalls"].append("Not A Syscall"),
                   lambda o: o["spec"]["allow"]["egress"].append({"proto": "icmp", "cidr": "0.0.0.0/0",
                                                                  "ports": [1]}),
                   lambda o: o["spec"]["allow"].update(files=["/etc"]),
                   lambda o: o["spec"]["allow"].update(iam=[{"action": "s3:GetObject", "resource": "arn:aws:s3:::b/*",
                                                             "accessLevel": "Everything", "rule": "exact"}]),
                   lambda o: o["spec"]["allow"].update(iam=[{"action": "s3 GetObject", "resource": "*",
                                                             "accessLevel": "Read", "rule": "exact"}]),
                   lambda o: o["spec"]["allow"].update(capabilities=["CAP_NET_RAW"]),
                   lambda o: o["spec"]["decisions"]["granularity"].update(substrates=["capabilities"]),
                   lambda o: o["spec"]["workload"].pop("container")):
        bad = copy.deepcopy(obj)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            validate(bad, "leastprivilegepolicies")


def test_status_bodies_validate():
    st = NodeStatus("node-a", "applied", localhost_profile="envelope/agents/deployment_research-agent_main.json",
                    mode="enforce", observed_generation=3, seccomp_digest="sha256:" + "0" * 64, cgroups=2,
                    stale=False, updated=1_764_000_000.0)
    from enforcer.policy_actions import ready_condition

    body = status_body("research-agent-main", "agents", node=st,
                       conditions=[stale_condition(True, "FingerprintChanged", "image digest changed", 3,
                                                   1_764_000_000.0)],
                       extra={"staleValidity": "0123456789abcdef0123456789abcdef"})
    obj = policy_to_cr(derived_policies()[0]) | {"status": body["status"]}
    obj["status"]["conditions"].append(ready_condition(obj, 1_764_000_000.0))
    validate(obj, "leastprivilegepolicies")
    assert prune(obj, schema_of("leastprivilegepolicies")) == obj
    assert NodeStatus.from_dict(st.to_dict()) == st
    bad = copy.deepcopy(obj)
    bad["status"]["nodes"][0]["state"] = "maybe"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad, "leastprivilegepolicies")
    bad = copy.deepcopy(obj)
    bad["status"]["conditions"][0]["reason"] = "has spaces"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad, "leastprivilegepolicies")


# ---- CEL validation rules (x-kubernetes-validations) -------------------------------------------


def rules(node: dict, path: tuple = ()) -> list[tuple[tuple, str]]:
    out = [(path, r["rule"]) for r in node.get("x-kubernetes-validations", [])]
    for k, v in (node.get("properties") or {}).items():
        out += rules(v, path + (k,))
    if "items" in node:
        out += rules(node["items"], path + ("[]",))
    return out


def values_at(obj, path: tuple) -> list:
    if not path:
        return [obj]
    head, rest = path[0], path[1:]
    if head == "[]":
        return [v for x in (obj if isinstance(obj, list) else []) for v in values_at(x, rest)]
    if isinstance(obj, dict) and head in obj:
        return values_at(obj[head], rest)
    return []


def cel_results(obj: dict, plural: str) -> list[tuple[str, bool]]:
    celpy = pytest.importorskip("celpy")
    env = celpy.Environment()
    out = []
    for path, rule in rules(schema_of(plural)):
        program = env.program(env.compile(rule))
        for value in values_at(obj, path):
            out.append((rule, bool(program.evaluate({"self": celpy.json_to_cel(value)}))))
    return out


def test_cel_rules_compile_and_hold_for_what_envelope_writes():
    objs = profile_to_crs(research_profile(), chunk_size=300)
    results = [r for o in objs for r in cel_results(o, "workloadprofiles")]
    assert len(results) == len(objs) and all(ok for _, ok in results)
    policy = policy_to_cr(derived_policies()[3])
    policy["spec"]["allow"]["egress"].append({"proto": "tcp", "cidr": "10.1.0.0/16", "portRange": {"min": 8000,
                                                                                                  "max": 8100}})
    results = cel_results(policy, "leastprivilegepolicies")
    assert {rule for rule, _ in results} == {"has(self.ports) != has(self.portRange)", "self.min <= self.max"}
    assert all(ok for _, ok in results)


def test_cel_rules_reject_what_they_are_for():
    (obj,) = profile_to_crs(research_profile(nodes=("node-a",)))
    obj["spec"]["chunk"]["index"] = 1
    assert [ok for _, ok in cel_results(obj, "workloadprofiles")] == [False]
    policy = policy_to_cr(derived_policies()[3])
    policy["spec"]["allow"]["egress"] = [
        {"proto": "tcp", "cidr": "10.1.0.0/16", "ports": [443], "portRange": {"min": 1, "max": 2}},
        {"proto": "tcp", "cidr": "10.2.0.0/16", "portRange": {"min": 9000, "max": 8000}},
    ]
    # both-given fails the first rule; min above max fails the second; the other checks pass
    assert sorted(ok for _, ok in cel_results(policy, "leastprivilegepolicies")) == [False, False, True, True]


def test_the_policy_crd_takes_every_substrate():
    """The granularity decision's substrates are an enum in the CRD: one the API server does not
    know would refuse every policy that encodes it."""
    from sensor.workload import SUBSTRATES
    spec = schema_of("leastprivilegepolicies")["properties"]["spec"]
    substrates = spec["properties"]["decisions"]["properties"]["granularity"]["properties"]["substrates"]
    assert set(substrates["items"]["enum"]) == set(SUBSTRATES)
