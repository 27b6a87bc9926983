"""The daemon's audit-anchoring job: every new head of the node's audit log goes off the node.

Every ``interval`` seconds (and on :meth:`AnchorJob.wake`) the job reads ``audit.head``; when it
names an entry after the last checkpoint published, and it authenticates (the head's MAC, and the
log's last entry is that entry with a valid MAC: a forged head is never anchored), the job adds a
checkpoint to the node's ``AuditAnchor`` (:class:`enforcer.auditanchor.ClusterAnchors`). A head
that goes *back* (a lower seq, or the same seq with another hash) is what a rewrite on the node
looks like: it is logged as an error and counted, and nothing is published over it (the cluster
keeps what it had). API failures are retried at the next round.
"""

from __future__ import annotations

import hmac
import time

import structlog

from enforcer import audit
from enforcer.auditanchor import Anchored, ClusterAnchors
from sensor.kubeapi import ClusterApiError

from .job import Job

log = structlog.get_logger("envelope.anchor_job")

INTERVAL = 5.0


class AnchorJob(Job):
    name = "envelope-anchor"

    def __init__(self, state_dir, anchors: ClusterAnchors, *, interval: float = INTERVAL, metrics=None):
        super().__init__(interval)
        self.state_dir = state_dir
        self.anchors = anchors
        self.metrics = metrics
        self.anchored: Anchored | None = None
        self.stats = {"rounds": 0, "published": 0, "refused": 0, "failed": 0}

    def start(self) -> "AnchorJob":
        self.start_thread()
        return self

    def _authentic_head(self) -> dict | None:
        """The head, if it and the log's last entry authenticate under the key."""
        head = audit.head(self.state_dir)
        if not head:
            return None
        key = audit.read_key(self.state_dir)
        seq, digest = head.get("seq"), head.get("hash")
        if key is None or not isinstance(seq, int) or not isinstance(digest, str):
            return None
        if not hmac.compare_digest(audit.head_mac(key, seq, digest), str(head.get("mac", ""))):
            self._refuse(f"audit head seq {seq} does not authenticate")
            return None
        last = audit.last_entry(self.state_dir) or {}
        if last.get("seq") != seq or last.get("hash") != digest or audit.entry_hash(last) != digest \
                or not hmac.compare_digest(audit.entry_mac(key, digest), str(last.get("mac", ""))):
            self._refuse(f"audit head seq {seq} is not the log's authenticated last entry")
            return None
        return head

    def _refuse(self, why: str) -> None:
        self.stats["refused"] += 1
        log.error("audit head not anchored", reason=why)
        if self.metrics is not None:
            self.metrics.audit_anchor("refused")

    def round(self) -> None:
        self.stats["rounds"] += 1
        try:
            head = self._authentic_head()
        except (OSError, ValueError, audit.AuditError) as e:
            log.warning("audit head unreadable", error=str(e))
            return
        if head is None:
            return
        try:
            if self.anchored is None:
                self.anchored = self.anchors.read()
            published = {c.seq: c.hash for c in self.anchored.checkpoints}
            seq, digest = head["seq"], head["hash"]
            if seq in published and published[seq] != digest or seq < self.anchored.last_seq:
                self._refuse(f"audit head seq {seq} goes back on what was anchored (up to seq "
                             f"{self.anchored.last_seq}): the log was rewritten on this node")
                return
            if seq in published:
                return
            self.anchored = self.anchors.add(self.anchored, seq, digest, time.time())
        except ClusterApiError as e:
            self.stats["failed"] += 1
            log.warning("audit head not anchored yet", error=str(e))
            if self.metrics is not None:
                self.metrics.audit_anchor("failed")
            self.anchored = None  # read again next round
            return
        self.stats["published"] += 1
        if self.metrics is not None:
            self.metrics.audit_anchor("published", seq)
