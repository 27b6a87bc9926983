"""What a node does with a LeastPrivilegePolicy it reads from the cluster: the rules, pure.

The daemon's policy job (``envelope/policy_job.py``) and stale-detection job
(``envelope/stale_job.py``) do the side effects; every decision they take is a function here,
over policy objects (dicts as the API serves them) and plain values, so each is tested without
an API server, a kernel or a filesystem:

* :func:`content_digest`: whether an object changed in a way that needs acting on (generation
  and spec; status writes by other nodes do not);
* :func:`kubelet_seccomp`: the one seccomp profile the kubelet gets for a policy;
* :func:`egress_step`: apply egress programs, leave them, or fail (no enforcement here);
* :func:`ready_condition`: the ``Ready`` condition ``status.nodes`` implies;
* :func:`stale_followup`: what a new generation does to a ``Stale`` judgement (carried through
  a mode change, cleared by a re-derivation);
* :func:`condition_differs`: whether a condition must be written;
* :func:`stale_signature` and :func:`takes_cluster_steps`: a fingerprint change handled once,
  and by which node on the cluster side.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable, Mapping

from .leastprivilegepolicy import (
    READY, STALE, condition, make_condition, node_statuses, validity_digest,
)
from .seccomp import CompiledSeccomp, profile_for

#: Modes in which a policy constrains egress (observe never denies nor alerts).
EGRESS_MODES = ("alert", "enforce")


def content_digest(obj: Mapping) -> str:
    """What a policy object is, for "did it change": its generation and spec."""
    meta = obj.get("metadata") or {}
    doc = {"generation": meta.get("generation"), "spec": obj.get("spec")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def kubelet_seccomp(policy, mode: str, exceptions: Mapping[str, str] | None = None) -> CompiledSeccomp:
    """The OCI seccomp profile written for the kubelet: the policy in ``mode`` with the
    workload's container runtime completeness set and this node's syscall exceptions, from the
    one builder every path uses (:func:`enforcer.seccomp.profile_for`), so it agrees with what
    the node's denial probe compares against."""
    return profile_for(policy, mode, target="workload", exceptions=exceptions)


def egress_step(policy, mode: str, *, enforcing: bool, applied_before: bool) -> str:
    """``"apply"``, ``"none"`` or ``"fail"`` for a policy's egress on this node.

    Alert and enforce apply the programs. A policy whose egress was applied and is now
    ``observe`` is applied in observe so its programs stop denying (``applied_before``). A
    policy that constrains egress on a node without egress enforcement fails (its seccomp
    profile is in place all the same)."""
    constrains = "egress" in policy.substrates and mode in EGRESS_MODES
    if not enforcing:
        return "fail" if constrains else "none"
    if mode in EGRESS_MODES or applied_before:
        return "apply"
    return "none"


def ready_condition(obj: Mapping, now: float) -> dict:
    """The ``Ready`` condition ``status.nodes`` implies for the object's current generation:
    ``True`` (``Applied``) when every reporting node applied it, else ``False`` with ``Failed``
    (some node failed it; the message names up to three) or ``Pending`` (a node reported an
    older generation, or none reported yet). ``lastTransitionTime`` is kept unless the status
    changes."""
    gen = (obj.get("metadata") or {}).get("generation")
    statuses = node_statuses(dict(obj))
    failed = sorted(n for n, s in statuses.items() if s.state == "failed" and s.observed_generation == gen)
    behind = sorted(n for n, s in statuses.items() if s.observed_generation != gen or s.state == "pending")
    previous = condition(dict(obj), READY)
    if failed:
        names = ", ".join(failed[:3]) + (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
        return make_condition(READY, False, "Failed", f"failed on {names} (see status.nodes)", gen, now, previous)
    if behind or not statuses:
        return make_condition(READY, False, "Pending", f"waiting for nodes to act on generation {gen}",
                              gen, now, previous)
    return make_condition(READY, True, "Applied", f"generation {gen} applied on every reporting node",
                          gen, now, previous)


def stale_followup(obj: Mapping, now: float) -> dict | None:
    """The ``Stale`` condition to write for the object's current generation, or None.

    A Stale judgement is about ``spec.decisions.validity``: when the validity changed (the policy was
    re-derived) it is cleared (``False``, ``Rederived``); when only something else changed (a
    mode change, an edited allow list) it is carried to the new generation, its
    ``lastTransitionTime`` kept. Nothing is written while the condition already speaks for the
    current generation."""
    obj = dict(obj)
    c = condition(obj, STALE)
    if c is None or c.get("status") != "True":
        return None
    gen = (obj.get("metadata") or {}).get("generation")
    judged = (obj.get("status") or {}).get("staleValidity")
    if judged is not None and judged != validity_digest(obj):
        return make_condition(STALE, False, "Rederived", "the policy was derived again since it was marked stale",
                              gen, now, c)
    if gen is not None and c.get("observedGeneration") != gen:
        return make_condition(STALE, True, str(c.get("reason") or "FingerprintChanged"),
                              str(c.get("message") or ""), gen, now, c)
    return None


def condition_differs(current: Mapping | None, wanted: Mapping) -> bool:
    """Whether ``wanted`` must be written over ``current``: status, reason or observed
    generation differ (a message alone is not worth a write from every node)."""
    if current is None:
        return True
    return any(current.get(k) != wanted.get(k) for k in ("status", "reason", "observedGeneration"))


def stale_signature(recorded: Mapping, fired: Mapping[str, Iterable[str]]) -> list:
    """What identifies one fingerprint change: the recorded fingerprint and the values that
    fired, so the same change is handled once (also across a restart)."""
    return [json.dumps(dict(recorded), sort_keys=True, default=str),
            [[k, sorted(v)] for k, v in sorted(fired.items())]]


def takes_cluster_steps(already_stale: bool, rebaseline: bool, mode: str) -> bool:
    """Whether this node sets the cluster's Stale condition (and, re-baselining, moves the
    policy to alert): every node audits and re-baselines its own evidence, but a generation
    another node already marked stale is not marked again, unless it still enforces and this
    node re-baselines."""
    return not already_stale or (rebaseline and mode == "enforce")
