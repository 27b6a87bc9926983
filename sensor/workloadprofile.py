"""WorkloadProfile custom resources: each node's partial profile, published to the cluster.

Kubernetes is Envelope's distributed store. Every node's daemon publishes, per workload, its own
:class:`~sensor.profile.NodeContribution` as one or more ``WorkloadProfile`` objects
(``envelope.dev/v1alpha1``) in the Envelope namespace; no other writer touches them. Any reader
lists a workload's objects, reassembles them and merges the nodes' contributions with
:meth:`Profile.merge <sensor.profile.Profile.merge>` (per node, the newest contribution wins;
counts sum over nodes, sessions union, first seen is the minimum and last seen the maximum). The
result is deterministic, commutative and idempotent: the same objects read twice add nothing.

Compact form (``spec.encoding: msgpack+zlib+base64``)
    The payload is ``msgpack({"schema", "workload", "contribution"})`` with the contribution in
    the compact form of :meth:`NodeContribution.pack` (its behaviours as a
    :class:`~sensor.behaviour_table.BehaviourTable`, without the per-session counts of sessions
    still open, which only the node itself needs; ``schema`` 2, and 1, the files' form, is still
    read), compressed with zlib at level 9 and base64
    encoded. Packing is sorted, so the same contribution always gives byte-identical data and the
    same ``spec.chunk.digest`` (SHA-256 of the base64 text); an unchanged contribution is not
    rewritten.

Size and chunking
    etcd refuses objects over about 1.5 MiB. The base64 text is cut into chunks of at most
    ``chunk_size`` characters (default 1,000,000, which leaves room for metadata and managed
    fields). Chunk 0, the *head*, has a fixed name per (workload, node) and carries the chunk
    count, the digest and a readable summary; chunks 1..n-1, the *tails*, are named after the
    digest. A writer creates the new tails first, then updates the head, then deletes tails of
    other digests, so any consistent list of the objects holds a complete set for each head it
    contains. A reader takes only complete sets whose digest checks out and reports the rest.

Names and labels
    ``metadata.name`` is DNS-1123 safe: a readable stem from namespace, workload name, container
    and node, cut to fit, then a hash of the exact workload key and node (``-<10 hex>``), so two
    workloads never share a name. Labels: ``envelope.dev/workload`` (SHA-256 prefix of the
    workload key; a label value cannot hold the key itself), ``envelope.dev/node``,
    ``envelope.dev/chunk-index``, ``envelope.dev/chunk-count``, ``envelope.dev/digest`` and
    ``app.kubernetes.io/managed-by: envelope``; readers select by the workload label and then
    check ``spec.workload`` exactly.

API calls go through :func:`sensor.kubeapi.call_with_retry`: transient failures (connection
errors, 408, 429, 5xx) are retried with capped exponential backoff and jitter; the daemon's
:meth:`publish <ClusterProfiles.publish>` never raises on an API failure, it returns what
happened. :class:`PublisherThread` is the daemon's profile-publishing job.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import gc
import hashlib
import re
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

import msgpack
import structlog

from sensor.timestamps import iso_time
from .kubeapi import Backoff, ClusterApiError, TimedApi, call_with_retry
from .profile import NodeContribution, Profile, newer_contribution
from .workload import Workload, substrate_of

log = structlog.get_logger("envelope.workloadprofile")
T = TypeVar("T")

GROUP = "envelope.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "WorkloadProfile"
PLURAL = "workloadprofiles"
DEFAULT_NAMESPACE = "envelope-system"
ENCODING = "msgpack+zlib+base64"
DEFAULT_CHUNK_SIZE = 1_000_000  # base64 characters per object; etcd's limit is ~1.5 MiB per object
MAX_CHUNKS = 64
FIELD_MANAGER = "envelope-daemon"
# The payload's schema: 2 is the compact contribution (NodeContribution.pack(compact=True)); 1,
# the profile files' form, is still read, so objects an older build wrote merge with new ones.
PAYLOAD_SCHEMA = 2
READABLE_PAYLOAD_SCHEMAS = (1, 2)
LIST_PAGE = 500  # objects per list request (kubectl's page size)

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_WORKLOAD = "envelope.dev/workload"
LABEL_NODE = "envelope.dev/node"
LABEL_CHUNK_INDEX = "envelope.dev/chunk-index"
LABEL_CHUNK_COUNT = "envelope.dev/chunk-count"
LABEL_DIGEST = "envelope.dev/digest"
LABEL_WORKLOAD_NAMESPACE = "envelope.dev/workload-namespace"
LABEL_WORKLOAD_NAME = "envelope.dev/workload-name"

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_NOT_DNS = re.compile(r"[^a-z0-9-]+")


class ProfileCRError(ValueError):
    """A WorkloadProfile object that cannot be decoded."""


# ---- names and labels ------------------------------------------------------------------------


def _hash(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def dns_stem(text: str, limit: int) -> str:
    """``text`` lowered to DNS-1123 label characters, runs of others as one ``-``, cut to
    ``limit`` and trimmed so it starts and ends with a letter or digit (may be empty)."""
    s = _NOT_DNS.sub("-", text.lower())[:limit]
    return s.strip("-")


def label_value(text: str) -> str:
    """``text`` when it is a valid label value, else ``h-`` and a hash prefix of it."""
    if len(text) <= 63 and _LABEL_VALUE.match(text):
        return text
    return "h-" + _hash(text, 40)


def workload_label(workload: Workload) -> str:
    return _hash(workload.key, 40)


def object_name(workload: Workload, node: str) -> str:
    """The head object's name for ``workload`` on ``node`` (at most 63 characters)."""
    stem = dns_stem(f"{workload.namespace}-{workload.name}-{workload.container}-{node}", 52)
    h = _hash(f"{workload.key}\n{node}", 10)
    return f"{stem}-{h}" if stem else f"wp-{h}"


def chunk_name(head: str, digest: str, index: int) -> str:
    """A tail chunk's name: the head's name, the payload digest, the index."""
    return f"{head[:40].rstrip('-')}-{digest[:10]}-{index}"


# ---- compact form ----------------------------------------------------------------------------


def encode_contribution(workload: Workload, contribution: NodeContribution) -> str:
    """The compact text form (msgpack, zlib, base64) of one node's contribution."""
    try:
        payload = {"schema": PAYLOAD_SCHEMA, "workload": workload.to_dict(),
                   "contribution": contribution.pack(compact=True)}
    except ValueError as e:
        raise ProfileCRError(f"{workload.key} on {contribution.node}: {e}") from e
    raw = msgpack.packb(payload, use_bin_type=True)
    return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")


def decode_contribution(data: str) -> tuple[Workload, NodeContribution]:
    try:
        raw = zlib.decompress(base64.b64decode(data.encode("ascii"), validate=True))
        payload = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except (binascii.Error, zlib.error, ValueError, msgpack.UnpackException, UnicodeEncodeError) as e:
        raise ProfileCRError(f"payload does not decode ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("schema") not in READABLE_PAYLOAD_SCHEMAS:
        schema = payload.get("schema") if isinstance(payload, dict) else None
        raise ProfileCRError(f"unsupported payload schema {schema!r} (this build reads "
                             f"{', '.join(map(str, READABLE_PAYLOAD_SCHEMAS))})")
    try:
        return Workload.from_dict(payload["workload"]), NodeContribution.unpack(payload["contribution"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ProfileCRError(f"payload is not a node contribution ({type(e).__name__}: {e})") from e


def _summary(contribution: NodeContribution) -> dict:
    per: dict[str, int] = {}
    for key in contribution.behaviours:
        sub = substrate_of(key)
        per[sub] = per.get(sub, 0) + 1
    return {
        "behaviours": len(contribution.behaviours),
        "syscalls": per.get("syscall", 0),
        "egress": per.get("egress", 0),
        "execs": per.get("exec", 0),
        "sessions": len(contribution.sessions),
        "closedSessions": contribution.closed_sessions,
        "lost": sum(contribution.loss.values()),
        "capped": contribution.capped,
    }


def contribution_to_crs(workload: Workload, contribution: NodeContribution,
                        namespace: str = DEFAULT_NAMESPACE,
                        chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[dict]:
    """The WorkloadProfile objects for one node's contribution: the head first, then tails.

    Pure and deterministic: the same contribution gives the same objects.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    data = encode_contribution(workload, contribution)
    digest = hashlib.sha256(data.encode("ascii")).hexdigest()
    pieces = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)] or [""]
    if len(pieces) > MAX_CHUNKS:
        raise ProfileCRError(
            f"{workload.key} on {contribution.node}: {len(data)} bytes of profile need {len(pieces)} "
            f"chunks of {chunk_size}, more than {MAX_CHUNKS}; lower the behaviour caps")
    head = object_name(workload, contribution.node)
    base_labels = {
        LABEL_MANAGED_BY: "envelope",
        LABEL_WORKLOAD: workload_label(workload),
        LABEL_NODE: label_value(contribution.node),
        LABEL_CHUNK_COUNT: str(len(pieces)),
        LABEL_DIGEST: digest[:40],
    }
    for key, value in ((LABEL_WORKLOAD_NAMESPACE, workload.namespace), (LABEL_WORKLOAD_NAME, workload.name)):
        if len(value) <= 63 and _LABEL_VALUE.match(value):
            base_labels[key] = value
    out = []
    for index, piece in enumerate(pieces):
        spec: dict[str, Any] = {
            "workload": workload.to_dict(),
            "node": contribution.node,
            "generation": contribution.generation,
            "updated": iso_time(contribution.updated, precise=True),
            "schema": PAYLOAD_SCHEMA,
            "encoding": ENCODING,
            "chunk": {"index": index, "count": len(pieces), "digest": digest, "size": len(data)},
            "data": piece,
        }
        if index == 0:
            spec["summary"] = _summary(contribution)
        out.append({
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": head if index == 0 else chunk_name(head, digest, index),
                "namespace": namespace,
                "labels": dict(sorted((base_labels | {LABEL_CHUNK_INDEX: str(index)}).items())),
            },
            "spec": spec,
        })
    return out


def profile_to_crs(profile: Profile, namespace: str = DEFAULT_NAMESPACE,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[dict]:
    """Every node's objects for a profile, nodes in name order."""
    out: list[dict] = []
    for node in sorted(profile.nodes):
        out += contribution_to_crs(profile.workload, profile.nodes[node], namespace, chunk_size)
    return out


@dataclass(frozen=True)
class Problem:
    """An object or chunk set a reader skipped, and why."""

    name: str
    reason: str


@dataclass
class Assembly:
    profiles: dict[Workload, Profile] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def _spec_of(obj: dict) -> tuple[str, Workload, str, dict]:
    name = str((obj.get("metadata") or {}).get("name", "?"))
    spec = obj.get("spec")
    if obj.get("kind", KIND) != KIND or not isinstance(spec, dict):
        raise ProfileCRError("not a WorkloadProfile")
    try:
        workload = Workload.from_dict(spec["workload"])
        node = str(spec["node"])
        chunk = spec["chunk"]
        info = {"index": int(chunk["index"]), "count": int(chunk["count"]),
                "digest": str(chunk["digest"]), "data": str(spec["data"]),
                "encoding": spec.get("encoding", ENCODING)}
    except (KeyError, TypeError, ValueError) as e:
        raise ProfileCRError(f"malformed spec ({type(e).__name__}: {e})") from e
    return name, workload, node, info


@contextlib.contextmanager
def collector_paused():
    """The cyclic garbage collector paused while reading: the objects and payloads of thousands
    of nodes are millions of small acyclic objects, and the collections their allocation triggers
    took more than half the time of a merge (measured with 5,000 nodes, bench_cluster)."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def assemble(objects: Iterable[dict]) -> Assembly:
    """Reassemble chunks, decode each node's contribution and merge per workload.

    Pure: the result depends only on the set of objects, not on their order or repetition.
    Incomplete chunk sets, bad digests and undecodable payloads are reported in ``problems``
    and left out.
    """
    with collector_paused():
        return _assemble(objects)


def _assemble(objects: Iterable[dict]) -> Assembly:
    groups: dict[tuple[Workload, str], dict[str, dict[int, tuple[str, dict]]]] = {}
    problems: list[Problem] = []
    for obj in objects:
        try:
            name, workload, node, info = _spec_of(obj)
        except ProfileCRError as e:
            problems.append(Problem(str((obj.get("metadata") or {}).get("name", "?")), str(e)))
            continue
        if info["encoding"] != ENCODING:
            problems.append(Problem(name, f"unknown encoding {info['encoding']!r}"))
            continue
        chunks = groups.setdefault((workload, node), {}).setdefault(info["digest"], {})
        prev = chunks.get(info["index"])
        if prev is None or (info["data"], name) < (prev[1]["data"], prev[0]):  # order-free on clashes
            chunks[info["index"]] = (name, info)

    contributions: dict[Workload, list[NodeContribution]] = {}
    for (workload, node), sets in sorted(groups.items(), key=lambda kv: (kv[0][0].key, kv[0][1])):
        for digest, chunks in sorted(sets.items()):
            head = chunks.get(0)
            if head is None:  # tails left over from an earlier version; its head has moved on
                continue
            count = head[1]["count"]
            missing = [i for i in range(count) if i not in chunks]
            if missing or any(c[1]["count"] != count for c in chunks.values()):
                problems.append(Problem(head[0], f"incomplete chunk set: missing {missing} of {count}"))
                continue
            data = "".join(chunks[i][1]["data"] for i in range(count))
            if hashlib.sha256(data.encode("ascii", "replace")).hexdigest() != digest:
                problems.append(Problem(head[0], "chunk data does not match its digest"))
                continue
            try:
                pw, contribution = decode_contribution(data)
            except ProfileCRError as e:
                problems.append(Problem(head[0], str(e)))
                continue
            if pw != workload or contribution.node != node:
                problems.append(Problem(head[0], f"payload is for {pw.key} on {contribution.node}, "
                                                 f"spec says {workload.key} on {node}"))
                continue
            contributions.setdefault(workload, []).append(contribution)

    out = Assembly(problems=sorted(set(problems), key=lambda p: (p.name, p.reason)))
    for workload in sorted(contributions):
        nodes: dict[str, NodeContribution] = {}
        for c in contributions[workload]:  # per node the newer contribution, in one pass
            prev = nodes.get(c.node)
            nodes[c.node] = c if prev is None else newer_contribution(prev, c)
        out.profiles[workload] = Profile(workload, dict(sorted(nodes.items())))
    return out


def crs_to_profile(objects: Iterable[dict], workload: Workload) -> Profile | None:
    """The merged profile of one workload from a list of objects, or None if none is there."""
    return assemble(objects).profiles.get(workload)


@dataclass
class PublishResult:
    workload: Workload
    node: str
    ok: bool
    written: int = 0  # objects applied
    deleted: int = 0  # stale tail chunks removed
    unchanged: bool = False
    error: str | None = None


class ClusterProfiles:
    """Publish this node's contributions and read merged profiles through the API.

    ``api`` is a ``kubernetes.client.CustomObjectsApi`` (or anything with its methods).
    """

    def __init__(self, api, namespace: str = DEFAULT_NAMESPACE, backoff: Backoff | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, field_manager: str = FIELD_MANAGER,
                 on_api_error: Callable[[str, BaseException], None] | None = None):
        self.api = api
        self.namespace = namespace
        self.backoff = backoff or Backoff()
        self.chunk_size = chunk_size
        self.field_manager = field_manager
        self.on_api_error = on_api_error
        self._published: dict[tuple[str, str], str] = {}  # (workload key, node) -> digest
        self._chunks: dict[tuple[str, str], int] = {}  # (workload key, node) -> chunks last written

    @classmethod
    def from_api_client(cls, client, **kw) -> "ClusterProfiles":
        """Over an ApiClient: every call with the request timeout of :mod:`sensor.kubeapi`."""
        from kubernetes.client import CustomObjectsApi
        return cls(TimedApi(CustomObjectsApi(client)), **kw)

    def _call(self, fn: Callable[[], T], what: str) -> T:
        return call_with_retry(fn, what, self.backoff, self.on_api_error)

    # ---- writing -----------------------------------------------------------------------------

    def publish(self, workload: Workload, contribution: NodeContribution) -> PublishResult:
        """Write this node's contribution. Never raises on API failure: the result says."""
        res = PublishResult(workload, contribution.node, ok=False)
        try:
            objs = contribution_to_crs(workload, contribution, self.namespace, self.chunk_size)
        except ProfileCRError as e:
            res.error = str(e)
            log.error("profile not published", workload=workload.key, error=res.error)
            return res
        digest = objs[0]["spec"]["chunk"]["digest"]
        key = (workload.key, contribution.node)
        if self._published.get(key) == digest:
            res.ok = res.unchanged = True
            return res
        try:
            for obj in objs[1:] + objs[:1]:  # tails first, the head last: readers never see a torn set
                self._apply(obj)
                res.written += 1
            if self._chunks.get(key, 0) != 1:  # tails may exist from before: clear the old ones
                res.deleted = self._delete_stale(workload, contribution.node, digest)
        except ClusterApiError as e:
            res.error = str(e)
            log.warning("profile not published", workload=workload.key, node=contribution.node,
                        error=res.error)
            return res
        self._published[key] = digest
        self._chunks[key] = len(objs)
        res.ok = True
        return res

    def _apply(self, obj: dict) -> None:
        name = obj["metadata"]["name"]
        self._call(lambda: self.api.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, obj,
            field_manager=self.field_manager, force=True,
            _content_type="application/apply-patch+yaml"), f"apply {PLURAL}/{name}")

    def _delete_stale(self, workload: Workload, node: str, digest: str) -> int:
        selector = f"{LABEL_WORKLOAD}={workload_label(workload)},{LABEL_NODE}={label_value(node)}"
        deleted = 0
        for obj in self._list(selector):
            spec = obj.get("spec") or {}
            if (spec.get("chunk") or {}).get("digest") == digest or spec.get("node") != node:
                continue
            try:
                if Workload.from_dict(spec["workload"]) != workload:
                    continue  # another workload whose key hashes to the same label prefix
            except (KeyError, TypeError):
                continue
            deleted += self._delete(obj["metadata"]["name"])
        return deleted

    def _delete(self, name: str) -> int:
        """Delete one object; 1 if it was there, 0 if it was gone already."""
        try:
            self._call(lambda: self.api.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name), f"delete {PLURAL}/{name}")
            return 1
        except ClusterApiError as e:
            if e.status != 404:
                raise
            return 0

    def remove(self, workload: Workload, node: str) -> int:
        """Delete every object of ``workload`` from ``node`` (the workload is gone for good)."""
        selector = f"{LABEL_WORKLOAD}={workload_label(workload)},{LABEL_NODE}={label_value(node)}"
        n = 0
        for obj in self._list(selector):
            spec = obj.get("spec") or {}
            if spec.get("node") != node:
                continue
            n += self._delete(obj["metadata"]["name"])
        self._published.pop((workload.key, node), None)
        self._chunks.pop((workload.key, node), None)
        return n

    # ---- reading -----------------------------------------------------------------------------

    def _list(self, selector: str | None = None) -> list[dict]:
        items: list[dict] = []
        token = None
        while True:
            kwargs: dict[str, Any] = {"limit": LIST_PAGE}
            if selector:
                kwargs["label_selector"] = selector
            if token:
                kwargs["_continue"] = token
            page = self._call(lambda: self.api.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, **kwargs),
                f"list {PLURAL} in {self.namespace}" + (f" ({selector})" if selector else ""))
            items += list(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    def read(self, workload: Workload) -> tuple[Profile | None, list[Problem]]:
        """The workload's profile merged across nodes, and any objects that were skipped."""
        with collector_paused():  # the list's JSON too
            assembly = assemble(self._list(f"{LABEL_WORKLOAD}={workload_label(workload)}"))
        return assembly.profiles.get(workload), assembly.problems

    def read_all(self) -> Assembly:
        with collector_paused():
            return assemble(self._list(f"{LABEL_MANAGED_BY}=envelope"))


class ProfilePublisher:
    """The daemon's side: after each flush, publish this node's contributions of the profiles
    that changed: the node's own and its gateways' (``<node>/...``, :mod:`sensor.outbox`). A
    publication that failed is retried at the next call even if its profile has not changed
    again. Workloads outside Kubernetes (namespace ``host``) stay on the node."""

    def __init__(self, cluster: ClusterProfiles, node: str,
                 on_result: Callable[[PublishResult], None] | None = None, include_host: bool = False):
        self.cluster = cluster
        self.node = node
        self.on_result = on_result
        self.include_host = include_host
        self.pending: set[Workload] = set()

    def publish(self, profiles: dict[Workload, Profile], written: Iterable[Workload] | None = None
                ) -> list[PublishResult]:
        targets = set(profiles if written is None else written) | self.pending
        results = []
        for w in sorted(targets):
            p = profiles.get(w)
            ours = self.ours(p) if p is not None else []
            if not ours or (w.namespace == "host" and not self.include_host):
                self.pending.discard(w)
                continue
            ok = True
            for contribution in ours:
                res = self.cluster.publish(w, contribution)
                ok = ok and res.ok
                if self.on_result is not None:
                    self.on_result(res)
                results.append(res)
            (self.pending.discard if ok else self.pending.add)(w)
        return results

    def ours(self, profile: Profile) -> list[NodeContribution]:
        """``profile``'s contributions of this node: its own, then its gateways' by name."""
        own = [profile.nodes[self.node]] if self.node in profile.nodes else []
        return own + [c for n, c in sorted(profile.nodes.items()) if n.startswith(self.node + "/")]


def match_workloads(workloads: Iterable[Workload], name: str) -> list[Workload]:
    """Workloads matching a full key, ``namespace/kind/name``, ``namespace/name`` or a bare name."""
    return sorted(w for w in workloads
                  if name in (w.key, w.name, f"{w.namespace}/{w.name}", f"{w.namespace}/{w.kind}/{w.name}"))


def load_cluster_profile(name: str, client, namespace: str = DEFAULT_NAMESPACE,
                         backoff: Backoff | None = None) -> tuple[Profile, list[Problem]]:
    """The profile of workload ``name`` merged across every node's WorkloadProfile objects
    (what ``envelope derive --from-cluster NAME`` derives from).

    Raises :class:`ClusterApiError` when the API cannot be read, and :class:`LookupError` with
    a one-line message when ``name`` matches no workload or several.
    """
    assembly = ClusterProfiles.from_api_client(client, namespace=namespace,
                                               backoff=backoff or Backoff(attempts=3)).read_all()
    found = match_workloads(assembly.profiles, name)
    if not found:
        raise LookupError(f"no WorkloadProfile objects for {name!r} in {namespace}")
    if len(found) > 1:
        raise LookupError(f"{name!r} matches {len(found)} workloads: {', '.join(w.key for w in found)}; "
                          "give namespace/kind/name/container")
    return assembly.profiles[found[0]], assembly.problems


class PublisherThread:
    """Publishing off the daemon's poll loop: :meth:`publish` snapshots this node's changed
    contributions (cheap, in the caller's thread) and returns; a worker thread writes them, the
    newest snapshot per workload only, retrying failures with backoff. API outages therefore
    never stall event draining. :meth:`close` makes a last attempt to write what is pending
    (the graceful-shutdown flush) and stops the worker.
    """

    def __init__(self, publisher: ProfilePublisher, retry_interval: float = 30.0):
        self.publisher = publisher
        self.retry_interval = retry_interval
        self._latest: dict[Workload, dict[str, NodeContribution]] = {}  # per contribution name
        self._busy = False  # a round is writing
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.results: list[PublishResult] = []  # the last round's results, for inspection
        backoff = publisher.cluster.backoff
        if backoff.sleep is time.sleep:  # make retry sleeps end when close() is called
            publisher.cluster.backoff = dataclasses.replace(backoff, sleep=self._stop.wait)

    def start(self) -> "PublisherThread":
        self._thread = threading.Thread(target=self._run, name="envelope-publisher", daemon=True)
        self._thread.start()
        return self

    def publish(self, profiles: dict[Workload, Profile], written: Iterable[Workload] | None = None) -> None:
        node = self.publisher.node
        with self._lock:
            for w in sorted(set(profiles if written is None else written)):
                p = profiles.get(w)
                c = p.nodes.get(node) if p is not None else None
                if c is not None:
                    # a snapshot the loop cannot change
                    self._latest.setdefault(w, {})[node] = NodeContribution.unpack(c.pack())
        self._wake.set()

    def publish_contributions(self, found: dict[Workload, dict[str, NodeContribution]]) -> None:
        """Hand over contributions read from the store (the node's gateways', :mod:`sensor.outbox`)."""
        if not found:
            return
        with self._lock:
            for w, contributions in found.items():
                self._latest.setdefault(w, {}).update(contributions)
        self._wake.set()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until every snapshot handed over so far was written (or failed and waits for
        its retry); True if that happened within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._latest and not self._busy:
                    return True
            time.sleep(0.01)
        return False

    def _round(self) -> bool:
        with self._lock:
            batch, self._latest = self._latest, {}
            self._busy = bool(batch)
        try:
            return self._write(batch)
        finally:
            with self._lock:
                self._busy = False

    def _write(self, batch: dict) -> bool:
        if not batch:
            return True
        profiles = {w: Profile(w, dict(cs)) for w, cs in batch.items()}
        results = self.publisher.publish(profiles, written=list(batch))
        self.results = results
        failed = {r.workload for r in results if not r.ok}
        with self._lock:
            for w in failed:
                newer = self._latest.setdefault(w, {})
                for name, c in batch[w].items():
                    newer.setdefault(name, c)  # unless a newer snapshot arrived meanwhile
        self.publisher.pending -= failed  # retried from the snapshot above, not from pending
        return not failed

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                ok = self._round()
            except Exception as e:  # noqa: BLE001 - the worker must outlive any one failure
                log.error("profile publishing round failed", error=f"{type(e).__name__}: {e}")
                ok = False
            if not ok:
                self._stop.wait(self.retry_interval)
                self._wake.set()

    def close(self, timeout: float = 20.0) -> bool:
        """Stop the worker and write what is still pending once; True if everything was written."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        try:
            return self._round()
        except Exception as e:  # noqa: BLE001 - shutdown goes on
            log.error("final profile publishing failed", error=f"{type(e).__name__}: {e}")
            return False
