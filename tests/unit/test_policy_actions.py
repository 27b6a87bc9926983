"""The rules for acting on a cluster policy (enforcer.policy_actions), without an API server."""

from __future__ import annotations

import copy

import pytest

from enforcer import policy_actions as rules
from enforcer.leastprivilegepolicy import (
    NodeStatus, condition, is_stale, make_condition, policy_to_cr, stale_condition, validity_digest,
)
from enforcer.policy import EgressRule, Policy
from enforcer.runtime import RUNC
from enforcer.seccomp import compile_oci
from sensor.workload import Workload

W = Workload("agents", "Deployment", "research-agent", "agent")
T0 = 1_796_000_000.0
VALIDITY = {"fingerprint": {"image": ["sha256:aa"]}, "derivedAt": "2026-11-20T16:00:00Z"}
POLICY = Policy(W, mode="enforce", syscalls=("read", "write"), egress=(EgressRule("tcp", "10.0.3.0/24", (443,)),),
                validity=VALIDITY)


def obj(policy=POLICY, generation=1, nodes=(), conditions=(), stale_validity=None) -> dict:
    o = policy_to_cr(policy)
    o["metadata"]["generation"] = generation
    status: dict = {}
    if nodes:
        status["nodes"] = [n.to_dict() for n in nodes]
    if conditions:
        status["conditions"] = list(conditions)
    if stale_validity is not None:
        status["staleValidity"] = stale_validity
    if status:
        o["status"] = status
    return o


def test_content_digest_ignores_status_but_not_spec_or_generation():
    a = obj()
    assert rules.content_digest(a) == rules.content_digest(obj(nodes=[NodeStatus("n1", "applied")]))
    assert rules.content_digest(a) != rules.content_digest(obj(generation=2))
    b = copy.deepcopy(a)
    b["spec"]["mode"] = "alert"
    assert rules.content_digest(a) != rules.content_digest(b)


def test_kubelet_seccomp_adds_the_runtime_and_follows_the_mode():
    got = rules.kubelet_seccomp(POLICY, "enforce")
    assert got.profile == compile_oci(POLICY, "enforce", runtime="runc").profile
    assert set(RUNC.syscalls) <= set(got.allowed())
    assert rules.kubelet_seccomp(POLICY, "alert").profile["defaultAction"] == "SCMP_ACT_LOG"
    host = Policy(Workload.host("backup"), mode="enforce", syscalls=("read",))
    assert rules.kubelet_seccomp(host, "enforce").runtime is None


@pytest.mark.parametrize("mode,enforcing,before,step", [
    ("enforce", True, False, "apply"),
    ("alert", True, False, "apply"),
    ("observe", True, False, "none"),
    ("observe", True, True, "apply"),  # was enforced: applied in observe so it stops denying
    ("enforce", False, False, "fail"),  # constrains egress, nothing here can enforce it
    ("observe", False, False, "none"),
])
def test_egress_step(mode, enforcing, before, step):
    assert rules.egress_step(POLICY, mode, enforcing=enforcing, applied_before=before) == step


def test_egress_step_of_a_policy_without_the_egress_substrate():
    p = Policy(W, mode="enforce", substrates=("syscall",), syscalls=("read",))
    assert rules.egress_step(p, "enforce", enforcing=False, applied_before=False) == "none"


def test_ready_follows_the_nodes_and_keeps_its_transition_time():
    none = rules.ready_condition(obj(generation=2), T0)
    assert (none["status"], none["reason"], none["observedGeneration"]) == ("False", "Pending", 2)
    behind = obj(generation=2, nodes=[NodeStatus("n1", "applied", observed_generation=2),
                                      NodeStatus("n2", "applied", observed_generation=1)])
    assert rules.ready_condition(behind, T0)["reason"] == "Pending"
    ok = obj(generation=2, nodes=[NodeStatus("n1", "applied", observed_generation=2),
                                  NodeStatus("n2", "applied", observed_generation=2)],
             conditions=[rules.ready_condition(behind, T0)])
    ready = rules.ready_condition(ok, T0 + 60)
    assert (ready["status"], ready["reason"]) == ("True", "Applied")
    assert ready["lastTransitionTime"] == "2026-11-30T00:54:20Z"  # T0 + 60: a transition
    again = rules.ready_condition(obj(generation=2, nodes=[NodeStatus("n1", "applied", observed_generation=2)],
                                      conditions=[ready]), T0 + 3600)
    assert again["lastTransitionTime"] == ready["lastTransitionTime"], "no transition, no new time"
    assert not rules.condition_differs(ready, again)
    failed = obj(generation=2, nodes=[NodeStatus("n1", "applied", observed_generation=2),
                                      NodeStatus("n2", "failed", "seccomp: read-only", observed_generation=2)],
                 conditions=[ready])
    f = rules.ready_condition(failed, T0 + 7200)
    assert (f["status"], f["reason"]) == ("False", "Failed") and "n2" in f["message"]
    assert rules.condition_differs(ready, f)


def test_a_stale_judgement_is_carried_through_a_mode_change_and_cleared_by_a_rederivation():
    marked = stale_condition(True, "FingerprintChanged", "image changed", 1, T0)
    o = obj(generation=1, conditions=[marked], stale_validity=validity_digest(obj()))
    assert is_stale(o) and rules.stale_followup(o, T0 + 1) is None, "already speaks for generation 1"
    moved = obj(policy=Policy(W, mode="alert", syscalls=POLICY.syscalls, egress=POLICY.egress, validity=VALIDITY),
                generation=2, conditions=[marked], stale_validity=validity_digest(obj()))
    assert is_stale(moved)
    carried = rules.stale_followup(moved, T0 + 10)
    assert (carried["status"], carried["observedGeneration"]) == ("True", 2)
    assert carried["lastTransitionTime"] == marked["lastTransitionTime"] and carried["message"] == "image changed"
    rederived = obj(policy=Policy(W, mode="enforce", syscalls=POLICY.syscalls,
                                  validity={**VALIDITY, "fingerprint": {"image": ["sha256:bb"]}}),
                    generation=3, conditions=[marked], stale_validity=validity_digest(obj()))
    assert not is_stale(rederived)
    cleared = rules.stale_followup(rederived, T0 + 20)
    assert (cleared["status"], cleared["reason"], cleared["observedGeneration"]) == ("False", "Rederived", 3)
    assert cleared["lastTransitionTime"] != marked["lastTransitionTime"]
    assert rules.stale_followup(obj(), T0) is None  # never stale: nothing to write


def test_make_condition_shape():
    c = make_condition("Ready", True, "Applied", "m" * 40000, 4, T0)
    assert set(c) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}
    assert len(c["message"]) == 32768 and c["lastTransitionTime"].endswith("Z")
    assert condition({"status": {"conditions": [c]}}, "Ready") == c


def test_a_change_is_handled_once_and_the_cluster_side_by_whoever_is_first():
    a = rules.stale_signature({"image": ["sha256:aa"]}, {"image": {"sha256:bb"}})
    assert a == rules.stale_signature({"image": ["sha256:aa"]}, {"image": ["sha256:bb"]})
    assert a != rules.stale_signature({"image": ["sha256:aa"]}, {"image": {"sha256:cc"}})
    assert rules.takes_cluster_steps(False, False, "enforce")
    assert not rules.takes_cluster_steps(True, False, "enforce")
    assert rules.takes_cluster_steps(True, True, "enforce")  # still enforcing: move it to alert
    assert not rules.takes_cluster_steps(True, True, "alert")
