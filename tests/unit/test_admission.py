"""Each node writes only its own objects: the ValidatingAdmissionPolicies of
daemonset/admission.yaml and the AuditAnchor CRD's transition rules, evaluated with cel-python on
the objects Envelope really writes (a WorkloadProfile chunk, an AuditAnchor, a policy's status)
and on what another node, or a token without a node, would try."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from enforcer.auditanchor import anchor_object
from enforcer.leastprivilegepolicy import NodeStatus, policy_to_cr, stale_condition, status_body
from enforcer.policy import EgressRule, Policy
from sensor.profile import Profile
from sensor.workload import Workload
from sensor.workloadprofile import contribution_to_crs

celpy = pytest.importorskip("celpy")

ROOT = Path(__file__).resolve().parents[2]
SA = "system:serviceaccount:envelope-system:envelope"
NODE_CLAIM = "authentication.kubernetes.io/node-name"
W = Workload("agents", "Deployment", "research-agent", "main")


def policies() -> dict[str, dict]:
    docs = yaml.safe_load_all((ROOT / "daemonset" / "admission.yaml").read_text())
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}


def admit(policy: str, operation: str, obj: dict | None, old: dict | None, *, node: str | None = "node-a",
          user: str = SA, sub: str = "") -> list[str]:
    """The messages of the validations that fail (empty: admitted), as the API server would
    evaluate them: match conditions first, then the variables in order, then each validation."""
    vap = policies()[policy]["spec"]
    env = celpy.Environment()
    extra = {NODE_CLAIM: [node]} if node else {}
    request = {"operation": operation, "subResource": sub,
               "userInfo": {"username": user, "extra": extra}}
    act = {"request": request, "object": obj, "oldObject": old}
    ctx = {k: celpy.json_to_cel(v) for k, v in act.items()}
    for cond in vap.get("matchConditions", []):
        if not bool(env.program(env.compile(cond["expression"])).evaluate(ctx)):
            return []  # not the daemon: the policy does not apply
    variables = {}
    for var in vap.get("variables", []):
        ctx["variables"] = celpy.json_to_cel(variables)
        value = env.program(env.compile(var["expression"])).evaluate(ctx)
        variables[var["name"]] = value
    ctx["variables"] = celpy.celtypes.MapType({celpy.celtypes.StringType(k): v for k, v in variables.items()})
    failed = []
    for v in vap["validations"]:
        result = env.program(env.compile(v["expression"])).evaluate(ctx)
        # an expression that errors would be refused too (failurePolicy: Fail), but a denial
        # must come from the rule, not from an error: that would be a broken policy
        assert not isinstance(result, Exception), (v["expression"], result)
        if not bool(result):
            failed.append(v.get("message") or v.get("messageExpression"))
    return failed


def profile_object(node: str) -> dict:
    p = Profile(W)
    c = p.node(node)
    c.open_session("s1", 1.0)
    c.observe("s1", "syscall:read", 3, 2.0)
    c.touch(3.0)
    return contribution_to_crs(W, c)[0]


# ---- WorkloadProfile and AuditAnchor objects ------------------------------------------------------


@pytest.mark.parametrize("make", [profile_object, lambda n: anchor_object(n, 0, "envelope-system", {1: ("a" * 64, 1.0)})],
                         ids=["workloadprofile", "auditanchor"])
def test_a_node_writes_its_own_objects_and_no_one_elses(make):
    mine, theirs = make("node-a"), make("node-b")
    P = "envelope-node-writes-its-own-objects"
    assert admit(P, "CREATE", mine, None) == []
    assert admit(P, "UPDATE", mine, mine) == []
    assert admit(P, "DELETE", None, mine) == []
    assert admit(P, "CREATE", theirs, None)  # an object in another node's name
    assert admit(P, "UPDATE", theirs, theirs)
    assert admit(P, "UPDATE", mine, theirs)  # taking another node's object over
    assert admit(P, "DELETE", None, theirs)
    no_claim = policies()[P]["spec"]["validations"][0]["message"]
    assert no_claim in admit(P, "CREATE", mine, None, node=None)  # no node claim: refused
    assert admit(P, "DELETE", None, theirs, user="system:admin") == []  # not the daemon: not its business


# ---- policy status and spec -------------------------------------------------------------------------


def policy_object() -> dict:
    p = Policy(W, mode="enforce", substrates=("syscall", "egress"), syscalls=("read",),
               egress=(EgressRule("tcp", "10.0.3.0/24", (443,)),))
    obj = policy_to_cr(p)
    obj["metadata"]["generation"] = 2
    obj["status"] = {"nodes": [NodeStatus("node-a", "applied", observed_generation=1).to_dict(),
                               NodeStatus("node-b", "applied", observed_generation=2).to_dict()]}
    return obj


def with_status(obj: dict, node: str, state: str) -> dict:
    out = copy.deepcopy(obj)
    nodes = [n for n in out["status"]["nodes"] if n["node"] != node]
    out["status"]["nodes"] = nodes + [NodeStatus(node, state, reason="x", observed_generation=2).to_dict()]
    return out


def test_a_node_reports_only_its_own_status_entry():
    P = "envelope-node-reports-its-own-status"
    old = policy_object()
    assert admit(P, "UPDATE", with_status(old, "node-a", "failed"), old, sub="status") == []
    fresh = copy.deepcopy(old)
    fresh["status"]["nodes"] = [n for n in fresh["status"]["nodes"] if n["node"] != "node-a"]
    assert admit(P, "UPDATE", old, fresh, sub="status") == []  # its first report
    assert admit(P, "UPDATE", with_status(old, "node-b", "failed"), old, sub="status")  # another's entry
    gone = copy.deepcopy(old)
    gone["status"]["nodes"] = [n for n in gone["status"]["nodes"] if n["node"] != "node-b"]
    assert admit(P, "UPDATE", gone, old, sub="status")  # removing another's entry
    cond = copy.deepcopy(old)
    body = status_body(old["metadata"]["name"], old["metadata"]["namespace"],
                       conditions=[stale_condition(True, "FingerprintChanged", "m", 2)])
    cond["status"]["conditions"] = body["status"]["conditions"]
    assert admit(P, "UPDATE", cond, old, sub="status") == []  # conditions are shared


def test_a_node_changes_a_policy_spec_only_from_enforce_to_alert():
    P = "envelope-node-reports-its-own-status"
    old = policy_object()
    alert = copy.deepcopy(old)
    alert["spec"]["mode"] = "alert"
    assert admit(P, "UPDATE", alert, old) == []
    assert admit(P, "UPDATE", old, alert)  # alert -> enforce is not a node's to make
    observe = copy.deepcopy(old)
    observe["spec"]["mode"] = "observe"
    assert admit(P, "UPDATE", observe, old)  # nor disarming
    wider = copy.deepcopy(alert)
    wider["spec"]["allow"]["egress"].append({"proto": "tcp", "cidr": "0.0.0.0/0", "ports": [443]})
    assert admit(P, "UPDATE", wider, old)  # nor widening with the mode change


# ---- the AuditAnchor CRD's transition rules -----------------------------------------------------------


def crd_rules() -> list[str]:
    crd = yaml.safe_load((ROOT / "daemonset" / "crds" / "auditanchors.envelope.dev.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    return [r["rule"] for r in version["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"]]


def transition_ok(new: dict, old: dict) -> bool:
    env = celpy.Environment()
    ctx = {"self": celpy.json_to_cel(new["spec"]), "oldSelf": celpy.json_to_cel(old["spec"])}
    return all(bool(env.program(env.compile(rule)).evaluate(ctx)) for rule in crd_rules())


def test_anchor_checkpoints_are_only_ever_added():
    one = anchor_object("node-a", 0, "envelope-system", {1: ("a" * 64, 1.0)})
    two = anchor_object("node-a", 0, "envelope-system", {1: ("a" * 64, 1.0), 5: ("b" * 64, 2.0)})
    assert transition_ok(two, one) and transition_ok(one, one)
    assert not transition_ok(one, two)  # a checkpoint removed
    edited = copy.deepcopy(two)
    edited["spec"]["checkpoints"]["1"]["hash"] = "c" * 64
    assert not transition_ok(edited, two)  # a checkpoint rewritten
    moved = copy.deepcopy(two)
    moved["spec"]["node"] = "node-b"
    assert not transition_ok(moved, two)
    renumbered = copy.deepcopy(two)
    renumbered["spec"]["epoch"] = 1
    assert not transition_ok(renumbered, two)
