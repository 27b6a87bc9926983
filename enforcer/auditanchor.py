"""AuditAnchor custom resources: a node's audit-log heads, kept off the node.

Root on a node can read the audit key and rewrite the log, its head and its MACs consistently
(:mod:`enforcer.audit`). What it cannot rewrite is what the API server already holds: each time
the head moves, the node's daemon adds a checkpoint (``seq`` and ``hash`` of the last entry) to
its ``AuditAnchor`` object in the Envelope namespace, and ``envelope audit verify`` with the
cluster configured checks every published checkpoint against the log (one checkpoint covers
every entry before it: the hash chain makes a rewrite of any earlier entry change it).

The object (``envelope.dev/v1alpha1``, ``daemonset/crds/auditanchors.envelope.dev.yaml``)::

    metadata: {name: <node stem>-<hash of node>-<epoch>, labels: {envelope.dev/node: ...}}
    spec:
      node: <node name>            never changes
      epoch: 0                     never changes; the next object takes over at MAX_CHECKPOINTS
      checkpoints:                 only ever added to (the CRD's transition rules refuse an edit
        "17": {hash: ..., time: ...}   or a removal, whoever asks)

A checkpoint is added with a JSON merge patch of one key, so a node never rewrites what it
published. RBAC gives the daemon create, get, list and patch, never delete or update, and the
ValidatingAdmissionPolicy (``daemonset/admission.yaml``) lets it write only its own node's
objects. Every API call goes through :func:`sensor.kubeapi.call_with_retry`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import structlog

from sensor.kubeapi import Backoff, ClusterApiError, TimedApi, call_with_retry
from sensor.timestamps import iso_time
from sensor.workloadprofile import LABEL_MANAGED_BY, LABEL_NODE, dns_stem, label_value

from .audit import Checkpoint

log = structlog.get_logger("envelope.auditanchor")

GROUP = "envelope.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AuditAnchor"
PLURAL = "auditanchors"
#: checkpoints per object (the CRD's maxProperties); the next epoch's object takes over
MAX_CHECKPOINTS = 1000


def anchor_name(node: str, epoch: int) -> str:
    """A DNS-1123 name for ``node``'s anchor of ``epoch`` (at most 63 characters)."""
    digest = hashlib.sha256(node.encode()).hexdigest()[:10]
    stem = dns_stem(node, 40)
    return f"{stem}-{digest}-{epoch}" if stem else f"node-{digest}-{epoch}"


def anchor_object(node: str, epoch: int, namespace: str, checkpoints: dict[int, tuple[str, float]]
                  ) -> dict:
    """The object for ``node``'s anchor of ``epoch`` holding ``checkpoints`` (seq -> (hash, time))."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": anchor_name(node, epoch), "namespace": namespace,
                     "labels": {LABEL_MANAGED_BY: "envelope", LABEL_NODE: label_value(node)}},
        "spec": {"node": node, "epoch": epoch,
                 "checkpoints": {str(seq): {"hash": h, "time": iso_time(t)}
                                 for seq, (h, t) in sorted(checkpoints.items())}},
    }


def checkpoints_of(obj: dict, node: str) -> list[Checkpoint]:
    """The checkpoints in one anchor object of ``node`` (others' objects and bad entries give
    none: ``verify`` reports what it could not use through the count it checked)."""
    spec = obj.get("spec") or {}
    if spec.get("node") != node:
        return []
    name = (obj.get("metadata") or {}).get("name", "?")
    out = []
    for seq, cp in (spec.get("checkpoints") or {}).items():
        try:
            out.append(Checkpoint(int(seq), str(cp["hash"]), f"{PLURAL}/{name}"))
        except (TypeError, ValueError, KeyError):
            log.warning("unreadable checkpoint", anchor=name, seq=seq)
    return out


@dataclass
class Anchored:
    """What the cluster holds for one node: the epoch objects' checkpoints."""

    checkpoints: list[Checkpoint]
    epoch: int  # the highest epoch found (-1: none)
    in_epoch: int  # checkpoints in that epoch's object

    @property
    def last_seq(self) -> int:
        return max((c.seq for c in self.checkpoints), default=0)


class ClusterAnchors:
    """Read and extend one node's AuditAnchor objects. ``api`` is a ``CustomObjectsApi``."""

    def __init__(self, api, node: str, namespace: str, backoff: Backoff | None = None,
                 on_api_error: Callable[[str, BaseException], None] | None = None):
        self.api = api
        self.node = node
        self.namespace = namespace
        self.backoff = backoff or Backoff()
        self.on_api_error = on_api_error

    @classmethod
    def from_api_client(cls, client, node: str, namespace: str, **kw) -> "ClusterAnchors":
        from kubernetes.client import CustomObjectsApi
        return cls(TimedApi(CustomObjectsApi(client)), node, namespace, **kw)

    def _call(self, fn, what: str):
        return call_with_retry(fn, what, self.backoff, self.on_api_error)

    def read(self) -> Anchored:
        """Every checkpoint this node published. Raises :class:`ClusterApiError`."""
        items: list[dict] = []
        token = None
        while True:
            kw: dict[str, Any] = {"limit": 100, "label_selector": f"{LABEL_NODE}={label_value(self.node)}"}
            if token:
                kw["_continue"] = token
            page = self._call(lambda: self.api.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, **kw), f"list {PLURAL}")
            items += list(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                break
        checkpoints: list[Checkpoint] = []
        epoch, in_epoch = -1, 0
        for obj in items:
            cps = checkpoints_of(obj, self.node)
            checkpoints += cps
            e = (obj.get("spec") or {}).get("epoch")
            if isinstance(e, int) and (obj.get("spec") or {}).get("node") == self.node and e >= epoch:
                epoch, in_epoch = e, len(cps)
        return Anchored(sorted(checkpoints, key=lambda c: c.seq), epoch, in_epoch)

    def add(self, anchored: Anchored, seq: int, digest: str, at: float) -> Anchored:
        """Publish one checkpoint: a merge patch of one key into the current epoch's object, or
        a new object when there is none or it is full. Returns what is now anchored; raises
        :class:`ClusterApiError`."""
        epoch = anchored.epoch
        if epoch < 0 or anchored.in_epoch >= MAX_CHECKPOINTS:
            epoch += 1
            obj = anchor_object(self.node, epoch, self.namespace, {seq: (digest, at)})
            try:
                self._call(lambda: self.api.create_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, obj), f"create {PLURAL}/{obj['metadata']['name']}")
                in_epoch = 1
            except ClusterApiError as e:
                if e.status != 409:
                    raise
                return self.add(self.read(), seq, digest, at)  # made meanwhile: start over from it
        else:
            name = anchor_name(self.node, epoch)
            patch = {"spec": {"checkpoints": {str(seq): {"hash": digest, "time": iso_time(at)}}}}
            self._call(lambda: self.api.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, patch,
                _content_type="application/merge-patch+json"), f"patch {PLURAL}/{name}")
            in_epoch = anchored.in_epoch + 1
        log.info("audit head anchored", node=self.node, seq=seq, epoch=epoch)
        return Anchored(anchored.checkpoints + [Checkpoint(seq, digest)], epoch, in_epoch)


def verify_anchored(state_dir, anchors: ClusterAnchors):
    """:func:`enforcer.audit.verify` against the checkpoints ``anchors`` holds; an API that
    cannot be read is one problem of the result, so the check is never silently skipped."""
    from . import audit

    try:
        anchored = anchors.read()
    except ClusterApiError as e:
        result = audit.verify(state_dir)
        result.problems.append(audit.Problem(0, f"the off-node anchor could not be read ({e}): "
                                                f"history rewritten on this node would go unnoticed"))
        return result
    return audit.verify(state_dir, anchored.checkpoints)
