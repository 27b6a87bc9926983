"""LeastPrivilegePolicy custom resources: Policy <-> object, and per-node status.

A policy object lives in its workload's namespace: ``policy_to_cr`` puts it there and
``policy_from_cr`` refuses one whose ``spec.workload.namespace`` is another namespace, so a
tenant cannot write (and weaken) the policy of someone else's workload. Its body is exactly
:meth:`Policy.to_dict <enforcer.policy.Policy.to_dict>` plus the namespace and labels.

Status (the ``status`` subresource):

``status.nodes``
    One entry per node, a list map keyed by ``node``. Each node's daemon applies its own entry
    with server-side apply under its own field manager (``envelope/<node>``), so nodes never
    overwrite each other: ``state`` is ``applied``, ``failed`` (with ``reason``), ``pending`` or
    ``removed``; ``localhostProfile`` is the value for the pod spec's
    ``securityContext.seccompProfile`` (``type: Localhost``); ``observedGeneration`` is the
    policy generation the node acted on.
``status.conditions`` (``metav1.Condition``: ``observedGeneration`` is the generation judged,
``lastTransitionTime`` changes only when ``status`` does)
    ``Stale``: a fingerprint input (image digest, model version, prompt template, tool catalog,
    identity) changed since the policy was derived. Applied under the shared field manager
    ``envelope/stale``, together with ``status.staleValidity``, the digest of the ``spec.decisions.validity``
    it judged: a mode change keeps the judgement (it is carried to the new generation), a
    re-derived policy (new validity) clears it (``False``, reason ``Rederived``).
    ``Ready``: ``True`` when every node that reports on the policy applied its current
    generation; ``False`` with reason ``Failed`` (a node failed) or ``Pending`` (a node has not
    acted on it yet). Applied under the shared field manager ``envelope/ready`` by any node whose
    reading of ``status.nodes`` differs from the condition (:mod:`enforcer.policy_actions`).

Every API call goes through :func:`sensor.kubeapi.call_with_retry`; :meth:`ClusterPolicies.report`,
:meth:`~ClusterPolicies.mark_stale`, :meth:`~ClusterPolicies.apply_condition` and
:meth:`~ClusterPolicies.set_mode` never raise on API failure, they return False (or None) and log.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

from sensor.timestamps import TimeFormatError, iso_time, parse_time
from sensor.kubeapi import Backoff, ClusterApiError, TimedApi, call_with_retry
from sensor.workload import Workload
from sensor.workloadprofile import (
    LABEL_MANAGED_BY, LABEL_WORKLOAD, LABEL_WORKLOAD_NAME, LABEL_WORKLOAD_NAMESPACE, Problem,
    label_value, workload_label,
)

from .policy import API_VERSION, KIND, MODES, Policy, PolicyError

log = structlog.get_logger("envelope.leastprivilegepolicy")

GROUP = "envelope.dev"
VERSION = "v1alpha1"
PLURAL = "leastprivilegepolicies"
LABEL_CONTAINER = "envelope.dev/container"
STATES = ("applied", "failed", "pending", "removed")
STALE = "Stale"
READY = "Ready"
STALE_MANAGER = "envelope/stale"
READY_MANAGER = "envelope/ready"


class PolicyCRError(ValueError):
    """A LeastPrivilegePolicy object that cannot be used; the message names it."""


# ---- Policy <-> object ---------------------------------------------------------------------------


def policy_to_cr(policy: Policy, namespace: str | None = None) -> dict:
    """The custom-resource object for ``policy``, in its workload's namespace. Deterministic."""
    ns = namespace if namespace is not None else policy.workload.namespace
    if ns != policy.workload.namespace:
        raise PolicyCRError(f"policy {policy.metadata_name}: a policy for a workload of namespace "
                            f"{policy.workload.namespace!r} must live in that namespace, not {ns!r}")
    doc = policy.to_dict()
    w = policy.workload
    labels = {LABEL_MANAGED_BY: "envelope", LABEL_WORKLOAD: workload_label(w),
              LABEL_CONTAINER: label_value(w.container)}
    labels[LABEL_WORKLOAD_NAMESPACE] = label_value(w.namespace)
    labels[LABEL_WORKLOAD_NAME] = label_value(w.name)
    doc["metadata"] = {"name": policy.metadata_name, "namespace": ns, "labels": dict(sorted(labels.items()))}
    return doc


def policy_from_cr(obj: dict) -> Policy:
    """The Policy in a custom-resource object (server fields and status are ignored)."""
    meta = obj.get("metadata") or {}
    where = f"{meta.get('namespace', '?')}/{meta.get('name', '?')}"
    doc = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
           "metadata": {"name": meta.get("name") or ""}, "spec": obj.get("spec")}
    try:
        policy = Policy.from_dict(doc)
    except PolicyError as e:
        raise PolicyCRError(f"{PLURAL} {where}: {e}") from None
    ns = meta.get("namespace")
    if ns is not None and ns != policy.workload.namespace:
        raise PolicyCRError(f"{PLURAL} {where}: spec.workload.namespace {policy.workload.namespace!r} is not "
                            f"the policy's own namespace; refused")
    return policy


# ---- status ----------------------------------------------------------------------------------------


@dataclass
class NodeStatus:
    """What one node did with one policy."""

    node: str
    state: str
    reason: str = ""
    localhost_profile: str | None = None
    mode: str | None = None
    observed_generation: int | None = None
    seccomp_digest: str | None = None
    cgroups: int | None = None
    stale: bool | None = None
    updated: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"node status state {self.state!r} is not one of {', '.join(STATES)}")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"node status mode {self.mode!r} is not one of {', '.join(MODES)}")

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"node": self.node, "state": self.state}
        if self.reason:
            d["reason"] = self.reason[:4096]
        if self.localhost_profile is not None:
            d["localhostProfile"] = self.localhost_profile
        if self.mode is not None:
            d["mode"] = self.mode
        if self.observed_generation is not None:
            d["observedGeneration"] = int(self.observed_generation)
        if self.seccomp_digest is not None:
            d["seccompDigest"] = self.seccomp_digest
        if self.cgroups is not None:
            d["cgroups"] = int(self.cgroups)
        if self.stale is not None:
            d["stale"] = bool(self.stale)
        d["lastUpdateTime"] = iso_time(self.updated)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NodeStatus":
        t = d.get("lastUpdateTime")
        updated = (cr_time(t) or 0.0) if t else 0.0
        return cls(node=d["node"], state=d["state"], reason=d.get("reason", ""),
                   localhost_profile=d.get("localhostProfile"), mode=d.get("mode"),
                   observed_generation=d.get("observedGeneration"), seccomp_digest=d.get("seccompDigest"),
                   cgroups=d.get("cgroups"), stale=d.get("stale"), updated=updated)


def cr_time(text: str | None) -> float | None:
    """A time field of a status or condition as epoch seconds; None when absent or malformed
    (other writers' objects are read, never trusted)."""
    if not text:
        return None
    try:
        return parse_time(text)
    except TimeFormatError:
        return None


def make_condition(ctype: str, status: bool | str, reason: str, message: str, generation: int | None,
                   now: float, previous: dict | None = None) -> dict:
    """A ``metav1.Condition``. ``lastTransitionTime`` is kept from ``previous`` unless the
    status changes (pure)."""
    st = status if isinstance(status, str) else ("True" if status else "False")
    c = {"type": ctype, "status": st, "reason": reason, "message": message[:32768]}
    if previous is not None and previous.get("status") == st and previous.get("lastTransitionTime"):
        c["lastTransitionTime"] = previous["lastTransitionTime"]
    else:
        c["lastTransitionTime"] = iso_time(now)
    if generation is not None:
        c["observedGeneration"] = int(generation)
    return c


def stale_condition(stale: bool, reason: str, message: str, generation: int | None,
                    now: float | None = None, previous: dict | None = None) -> dict:
    """A ``Stale`` condition (metav1.Condition shape)."""
    return make_condition(STALE, stale, reason, message, generation, time.time() if now is None else now, previous)


def validity_digest(obj: dict) -> str:
    """What a Stale judgement is about: the digest of the object's ``spec.decisions.validity``."""
    validity = ((obj.get("spec") or {}).get("decisions") or {}).get("validity") or {}
    return hashlib.sha256(json.dumps(validity, sort_keys=True, default=str).encode()).hexdigest()[:32]


def status_body(name: str, namespace: str, *, node: NodeStatus | None = None,
                conditions: list[dict] | None = None, extra: dict | None = None) -> dict:
    """The server-side-apply body for the status subresource: only what one manager owns (and
    all of it: server-side apply removes what a manager stops sending)."""
    status: dict[str, Any] = dict(extra or {})
    if node is not None:
        status["nodes"] = [node.to_dict()]
    if conditions is not None:
        status["conditions"] = conditions
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": namespace},
            "status": status}


def node_statuses(obj: dict) -> dict[str, NodeStatus]:
    out = {}
    for d in ((obj.get("status") or {}).get("nodes") or []):
        try:
            s = NodeStatus.from_dict(d)
        except (KeyError, ValueError, TypeError):
            continue
        out[s.node] = s
    return dict(sorted(out.items()))


def condition(obj: dict, ctype: str) -> dict | None:
    for c in ((obj.get("status") or {}).get("conditions") or []):
        if c.get("type") == ctype:
            return c
    return None


def is_stale(obj: dict) -> bool:
    """Stale, as judged for the object's current validity: a re-derived policy (new
    ``spec.decisions.validity``) starts fresh, a mode change does not. Objects written before
    ``staleValidity`` existed are judged by ``observedGeneration``."""
    c = condition(obj, STALE)
    if c is None or c.get("status") != "True":
        return False
    judged = (obj.get("status") or {}).get("staleValidity")
    if judged is not None:
        return judged == validity_digest(obj)
    gen = (obj.get("metadata") or {}).get("generation")
    return gen is None or c.get("observedGeneration") in (None, gen)


# ---- the cluster client ---------------------------------------------------------------------------


@dataclass
class ClusterPolicy:
    """A policy as the cluster holds it: the Policy plus where it is and its status."""

    policy: Policy
    namespace: str
    name: str
    generation: int | None
    obj: dict

    @property
    def workload(self) -> Workload:
        return self.policy.workload

    @property
    def stale(self) -> bool:
        return is_stale(self.obj)

    def node_status(self, node: str) -> NodeStatus | None:
        return node_statuses(self.obj).get(node)


class ClusterPolicies:
    """Read LeastPrivilegePolicy objects and report one node's status on them.

    ``api`` is a ``kubernetes.client.CustomObjectsApi`` (or anything with its methods).
    """

    def __init__(self, api, node: str, backoff: Backoff | None = None,
                 on_api_error: Callable[[str, BaseException], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.api = api
        self.node = node
        self.backoff = backoff or Backoff()
        self.on_api_error = on_api_error
        self.clock = clock
        self.field_manager = f"envelope/{node}"[:128]
        self._reported: dict[tuple[str, str], dict] = {}

    @classmethod
    def from_api_client(cls, client, node: str, **kw) -> "ClusterPolicies":
        """Over an ApiClient: every call with the request timeout of :mod:`sensor.kubeapi`."""
        from kubernetes.client import CustomObjectsApi
        return cls(TimedApi(CustomObjectsApi(client)), node, **kw)

    @property
    def list_fn(self):
        """The cluster-wide list call, for an :class:`~sensor.kubeapi.Informer` (the watch)."""
        return functools.partial(self.api.list_cluster_custom_object, GROUP, VERSION, PLURAL)

    def wrap(self, obj: dict) -> ClusterPolicy:
        """A policy object as :class:`ClusterPolicy`; raises :class:`PolicyCRError`."""
        return self._wrap(obj)

    def _call(self, fn, what: str):
        return call_with_retry(fn, what, self.backoff, self.on_api_error)

    @staticmethod
    def _wrap(obj: dict) -> ClusterPolicy:
        meta = obj.get("metadata") or {}
        return ClusterPolicy(policy_from_cr(obj), str(meta.get("namespace", "")), str(meta.get("name", "")),
                             meta.get("generation"), obj)

    def list(self, namespace: str | None = None) -> tuple[list[ClusterPolicy], list[Problem]]:
        """Every policy (or one namespace's); invalid ones are reported, not raised.
        Raises :class:`ClusterApiError` when the API cannot be read."""
        items: list[dict] = []
        token = None
        while True:
            kw: dict[str, Any] = {"limit": 200}
            if token:
                kw["_continue"] = token
            if namespace is None:
                page = self._call(lambda: self.api.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kw),
                                  f"list {PLURAL}")
            else:
                page = self._call(lambda: self.api.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, **kw), f"list {PLURAL} in {namespace}")
            items += list(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                break
        out, problems = [], []
        for obj in items:
            try:
                out.append(self._wrap(obj))
            except PolicyCRError as e:
                problems.append(Problem(str((obj.get("metadata") or {}).get("name", "?")), str(e)))
        out.sort(key=lambda p: (p.namespace, p.name))
        return out, problems

    def get(self, namespace: str, name: str) -> ClusterPolicy | None:
        try:
            obj = self._call(lambda: self.api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name),
                             f"get {PLURAL} {namespace}/{name}")
        except ClusterApiError as e:
            if e.status == 404:
                return None
            raise
        return self._wrap(obj)

    def create(self, policy: Policy) -> ClusterPolicy:
        """Create or update the policy object (server-side apply of the spec)."""
        obj = policy_to_cr(policy)
        name, ns = obj["metadata"]["name"], obj["metadata"]["namespace"]
        out = self._call(lambda: self.api.patch_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, name, obj, field_manager="envelope", force=True,
            _content_type="application/apply-patch+yaml"), f"apply {PLURAL} {ns}/{name}")
        if not out:  # the client decodes only 200 bodies; an apply that creates answers 201
            found = self.get(ns, name)
            if found is None:
                raise ClusterApiError(f"apply {PLURAL} {ns}/{name}: object not found after apply", 404)
            return found
        return self._wrap(out)

    def _apply_status(self, cp: ClusterPolicy, body: dict, manager: str, what: str) -> bool:
        try:
            self._call(lambda: self.api.patch_namespaced_custom_object_status(
                GROUP, VERSION, cp.namespace, PLURAL, cp.name, body, field_manager=manager, force=True,
                _content_type="application/apply-patch+yaml"), f"{what} {PLURAL} {cp.namespace}/{cp.name}")
        except ClusterApiError as e:
            log.warning("policy status not written", policy=f"{cp.namespace}/{cp.name}", node=self.node,
                        error=str(e))
            return False
        return True

    def report(self, cp: ClusterPolicy, state: str, reason: str = "", *, always: bool = False, **fields) -> bool:
        """Apply this node's status entry (``applied``/``failed``/...). An entry equal to the last
        one this client wrote (but for its time) is not written again unless ``always``.
        Never raises on API failure."""
        status = NodeStatus(self.node, state, reason, observed_generation=cp.generation,
                            updated=self.clock(), **fields)
        key = (cp.namespace, cp.name)
        same = {k: v for k, v in status.to_dict().items() if k != "lastUpdateTime"}
        if not always and self._reported.get(key) == same:
            return True
        ok = self._apply_status(cp, status_body(cp.name, cp.namespace, node=status), self.field_manager,
                                "report status on")
        if ok:
            self._reported[key] = same
        return ok

    def mark_stale(self, cp: ClusterPolicy, reason: str, message: str) -> bool:
        """Set the Stale condition for the policy's current generation and validity. Never raises
        on API failure."""
        cond = stale_condition(True, reason, message, cp.generation, self.clock(), condition(cp.obj, STALE))
        return self.apply_condition(cp, cond)

    def apply_condition(self, cp: ClusterPolicy, cond: dict) -> bool:
        """Apply one condition (``Stale`` or ``Ready``) under its shared field manager. A Stale
        condition carries ``status.staleValidity`` with it. Never raises on API failure."""
        if cond["type"] == STALE:
            extra = {"staleValidity": validity_digest(cp.obj)}
            body = status_body(cp.name, cp.namespace, conditions=[cond], extra=extra)
            return self._apply_status(cp, body, STALE_MANAGER, "set Stale on")
        body = status_body(cp.name, cp.namespace, conditions=[cond])
        return self._apply_status(cp, body, READY_MANAGER, f"set {cond['type']} on")

    def set_mode(self, cp: ClusterPolicy, mode: str) -> ClusterPolicy | None:
        """Change ``spec.mode`` (e.g. to alert when re-baselining); the updated policy, or None
        when the API failed (never raises on API failure)."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        try:
            out = self._call(lambda: self.api.patch_namespaced_custom_object(
                GROUP, VERSION, cp.namespace, PLURAL, cp.name, {"spec": {"mode": mode}},
                _content_type="application/merge-patch+json"), f"set mode of {PLURAL} {cp.namespace}/{cp.name}")
            return self._wrap(out) if out else self.get(cp.namespace, cp.name)
        except (ClusterApiError, PolicyCRError) as e:
            log.warning("policy mode not changed", policy=f"{cp.namespace}/{cp.name}", mode=mode, error=str(e))
            return None


def for_workload(policies: list[ClusterPolicy], workload: Workload) -> ClusterPolicy | None:
    """The policy of ``workload`` among ``policies`` (the first by name if several)."""
    found = sorted((p for p in policies if p.workload == workload), key=lambda p: p.name)
    return found[0] if found else None


def on_fingerprint_change(state_dir, workload: Workload, changed: list[str], *, cp: ClusterPolicy | None = None,
                          policies: ClusterPolicies | None = None, rebaseline: bool = False, metrics=None,
                          detail: str = "", actor: str | None = None, now: float | None = None) -> dict:
    """A node's reaction when fingerprint inputs of ``workload`` changed (``changed`` names the
    keys): an audit entry (``policy.stale``), the stale metric, the policy's ``Stale``
    condition and, with ``rebaseline`` (config ``rebaseline_on_stale``), a re-baseline: alert
    mode and a new observation window locally, and ``spec.mode: alert`` on the cluster policy.
    Local steps happen whether or not the API answers; the result says what was done."""
    from . import audit, state

    keys = sorted(set(changed))
    message = f"fingerprint inputs changed: {', '.join(keys)}" + (f" ({detail})" if detail else "")
    where = f"{cp.namespace}/{cp.name}" if cp is not None else None
    out: dict[str, Any] = {"workload": workload.key, "changed": keys, "policy": where,
                           "stale_condition": None, "rebaselined": False, "cluster_mode": None}
    audit.append(state_dir, "policy.stale", workload=workload.key, reason=message,
                 details={"changed": keys, "policy": where, "generation": cp.generation if cp else None,
                          "rebaseline": rebaseline}, actor=actor, now=now)
    if metrics is not None:
        metrics.set_stale(workload, True)
    if cp is not None and policies is not None:
        out["stale_condition"] = policies.mark_stale(cp, "FingerprintChanged", message)
    if rebaseline:
        state.rebaseline(state_dir, workload, reason=message, actor=actor, now=now)
        out["rebaselined"] = True
        if cp is not None and policies is not None and cp.policy.mode == "enforce":
            changed_cp = policies.set_mode(cp, "alert")
            if changed_cp is not None:
                out["cluster_mode"] = "alert"
                # the mode change is a new generation; it is as stale as the one it replaced
                out["stale_condition"] = policies.mark_stale(changed_cp, "FingerprintChanged", message)
    log.warning("policy stale", workload=workload.key, changed=keys, policy=where, rebaseline=rebaseline)
    return out
