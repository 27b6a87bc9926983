"""One faithful fake Kubernetes API server, on 127.0.0.1, for every test that talks to the API.

No API server can run on this machine, so the clients under test (the official ``kubernetes``
client plus Envelope's code) talk HTTP to this one. It keeps the API's rules that Envelope relies
on, as the real server applies them:

* **Server-side apply** with managed fields: each field manager owns the fields it applied (list
  maps item by key, ``x-kubernetes-list-type`` read from the CRDs in ``daemonset/crds``); a
  field a manager stops sending is removed unless another manager owns it; a field applied with
  a different value than another manager's is a 409 conflict unless ``force=true``, which moves
  ownership. Merge patches and updates take ownership of what they change (``Update``
  operations). ``metadata.managedFields`` is rendered in the FieldsV1 form.
* ``resourceVersion`` (one counter for the store), ``generation`` bumped on spec changes only,
  optimistic concurrency on update, the ``status`` subresource (the main resource ignores
  status and the status subresource ignores the rest).
* **List** with label selectors (``=``, ``==``, ``!=``), field selectors (``metadata.name``,
  ``metadata.namespace``, ``spec.nodeName``) and pagination (``limit``, ``continue``).
* **Watch** from a ``resourceVersion`` with ``ADDED``/``MODIFIED``/``DELETED`` events, bookmarks
  when asked (``allowWatchBookmarks``; every ``bookmark_interval`` seconds and at the end),
  ``timeoutSeconds``, and ``410 Gone`` for a version older than the retained history
  (``history`` events; :meth:`FakeApiServer.compact` drops it).

Faults, for the failure tests: :attr:`faults` (next responses: an HTTP status, ``"drop"`` to
close the connection), :attr:`mode` ``"down"`` (every request 503) and ``"blackhole"`` (every
request is read and never answered: the server accepts and hangs, as a black-holed API server
does). Every request is logged in :attr:`requests` as ``(method, path, content type)``.

Objects can be put in directly (:meth:`put`, e.g. recorded fixtures) or through the API.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "daemonset" / "crds"

#: Built-in resources: (group, plural) -> (kind, api version, namespaced)
BUILTIN = {
    ("", "pods"): ("Pod", "v1", True),
    ("", "serviceaccounts"): ("ServiceAccount", "v1", True),
    ("", "services"): ("Service", "v1", True),
    ("", "namespaces"): ("Namespace", "v1", False),
    ("apps", "replicasets"): ("ReplicaSet", "apps/v1", True),
    ("apps", "deployments"): ("Deployment", "apps/v1", True),
    ("batch", "jobs"): ("Job", "batch/v1", True),
}

Path_ = tuple  # a field path: (("f", name) | ("k", key-json) | ("v", value-json), ...)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- schemas: which lists are list maps or sets -------------------------------------------------------


class Resource:
    def __init__(self, group: str, plural: str, kind: str, version: str, namespaced: bool,
                 schema: dict | None = None, status_subresource: bool = False):
        self.group, self.plural, self.kind, self.version = group, plural, kind, version
        self.namespaced, self.schema, self.status_subresource = namespaced, schema or {}, status_subresource

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


def _child(schema: dict, key: str) -> dict:
    if not schema:
        return {}
    props = schema.get("properties") or {}
    if key in props:
        return props[key]
    extra = schema.get("additionalProperties")
    return extra if isinstance(extra, dict) else {}


def _item_key(item: dict, keys: list[str]) -> str:
    return json.dumps({k: item.get(k) for k in keys}, sort_keys=True, separators=(",", ":"))


def fieldset(value: Any, schema: dict, prefix: Path_ = ()) -> dict[Path_, Any]:
    """The leaf fields of ``value`` as ``{path: value}``, granular where the schema says so:
    maps by key, list maps by item key, sets by value; other lists are atomic."""
    out: dict[Path_, Any] = {}
    if isinstance(value, dict) and (not schema or schema.get("type", "object") == "object") \
            and schema.get("x-kubernetes-map-type") != "atomic":
        if not value and prefix:
            out[prefix] = value
        for k, v in value.items():
            out.update(fieldset(v, _child(schema, k), prefix + (("f", k),)))
        return out
    if isinstance(value, list):
        ltype = schema.get("x-kubernetes-list-type", "atomic") if schema else "atomic"
        items = schema.get("items") or {}
        if ltype == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            for item in value:
                p = prefix + (("k", _item_key(item, keys)),)
                out[p + (("i", "."),)] = None  # the item itself
                out.update(fieldset(item, items, p))
            return out
        if ltype == "set":
            for item in value:
                out[prefix + (("v", json.dumps(item, sort_keys=True)),)] = item
            return out
    out[prefix] = value
    return out


def _get(obj: Any, path: Path_, schema: dict) -> tuple[bool, Any]:
    cur, sch = obj, schema
    for kind, key in path:
        if kind == "f":
            if not isinstance(cur, dict) or key not in cur:
                return False, None
            cur, sch = cur[key], _child(sch, key)
        elif kind == "k":
            keys = sch.get("x-kubernetes-list-map-keys") or []
            found = [i for i in (cur or []) if _item_key(i, keys) == key]
            if not found:
                return False, None
            cur, sch = found[0], sch.get("items") or {}
        elif kind == "v":
            return (json.loads(key) in (cur or [])), json.loads(key)
        elif kind == "i":
            return True, None
    return True, cur


def _delete(obj: dict, path: Path_, schema: dict) -> None:
    """Remove the field at ``path`` (a leaf, a set value, or a whole list-map item)."""
    if path and path[-1][0] == "i":
        path = path[:-1]
    parents: list[tuple[Any, tuple, dict]] = []
    cur, sch = obj, schema
    for step in path[:-1]:
        kind, key = step
        parents.append((cur, step, sch))
        if kind == "f":
            if not isinstance(cur, dict) or key not in cur:
                return
            cur, sch = cur[key], _child(sch, key)
        elif kind == "k":
            keys = sch.get("x-kubernetes-list-map-keys") or []
            found = [i for i in (cur or []) if _item_key(i, keys) == key]
            if not found:
                return
            cur, sch = found[0], sch.get("items") or {}
    kind, key = path[-1]
    if kind == "f" and isinstance(cur, dict):
        cur.pop(key, None)
    elif kind == "k" and isinstance(cur, list):
        keys = sch.get("x-kubernetes-list-map-keys") or []
        cur[:] = [i for i in cur if _item_key(i, keys) != key]
    elif kind == "v" and isinstance(cur, list):
        v = json.loads(key)
        cur[:] = [i for i in cur if i != v]
    # drop containers left empty by the removal
    for parent, (pkind, pkey), psch in reversed(parents):
        if pkind == "f" and isinstance(parent, dict) and parent.get(pkey) in ({}, []):
            parent.pop(pkey, None)
        else:
            break


def _merge(old: Any, new: Any, schema: dict) -> Any:
    """Apply ``new`` over ``old`` the way server-side apply merges: maps by key, list maps by
    item key, sets by union, everything else replaced."""
    if isinstance(old, dict) and isinstance(new, dict) and schema.get("x-kubernetes-map-type") != "atomic":
        out = dict(old)
        for k, v in new.items():
            out[k] = _merge(old.get(k), v, _child(schema, k)) if k in old else copy.deepcopy(v)
        return out
    if isinstance(old, list) and isinstance(new, list):
        ltype = schema.get("x-kubernetes-list-type", "atomic")
        if ltype == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            items = {_item_key(i, keys): i for i in old}
            order = list(items)
            for i in new:
                k = _item_key(i, keys)
                items[k] = _merge(items[k], i, schema.get("items") or {}) if k in items else copy.deepcopy(i)
                if k not in order:
                    order.append(k)
            return [items[k] for k in order]
        if ltype == "set":
            return list(old) + [i for i in new if i not in old]
    return copy.deepcopy(new)


def fields_v1(paths) -> dict:
    """Managed fields in the API's FieldsV1 form."""
    root: dict = {}
    for path in sorted(paths, key=str):
        node = root
        for kind, key in path:
            if kind == "i":
                node["."] = {}
                continue
            name = {"f": f"f:{key}", "k": f"k:{key}", "v": f"v:{key}"}[kind]
            node = node.setdefault(name, {})
    return root


# ---- the store ------------------------------------------------------------------------------------------


class Store:
    """Objects of every resource, the event history and the managed fields. Thread-safe."""

    def __init__(self, history: int = 10_000):
        self.lock = threading.RLock()
        self.resources: dict[tuple[str, str], Resource] = {}
        self.objects: dict[tuple[str, str], dict[tuple[str, str], dict]] = {}
        self.managers: dict[tuple, dict[tuple[str, str, str], dict[Path_, Any]]] = {}
        self.rv = 0
        self.events: list[tuple[int, str, tuple[str, str], dict]] = []
        self.history = history
        self.oldest = 0  # events at or below this resourceVersion are gone (410)
        self.max_page: int | None = None
        self.encoded: dict[tuple, tuple[str, bytes]] = {}  # (group, plural, key) -> (resourceVersion, JSON)
        self.selected: tuple = (None, None, [])  # (resourceVersion, selection, items) of the last list
        self.changed = threading.Condition(self.lock)
        for (group, plural), (kind, api_version, namespaced) in BUILTIN.items():
            version = api_version.split("/")[-1]
            self.resources[(group, plural)] = Resource(group, plural, kind, version, namespaced)
        for path in sorted(CRD_DIR.glob("*.yaml")):
            self.add_crd(yaml.safe_load(path.read_text()))

    def add_crd(self, crd: dict) -> None:
        spec = crd["spec"]
        version = next(v for v in spec["versions"] if v.get("storage"))
        self.resources[(spec["group"], spec["names"]["plural"])] = Resource(
            spec["group"], spec["names"]["plural"], spec["names"]["kind"], version["name"],
            spec.get("scope") == "Namespaced", version["schema"]["openAPIV3Schema"],
            "status" in (version.get("subresources") or {}))

    def resource(self, group: str, plural: str) -> Resource:
        try:
            return self.resources[(group, plural)]
        except KeyError:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({group}/{plural})")

    # -- writes --

    def _record(self, etype: str, res: Resource, obj: dict) -> None:
        self.events.append((self.rv, etype, (res.group, res.plural), copy.deepcopy(obj)))
        if len(self.events) > self.history:
            drop = len(self.events) - self.history
            self.oldest = self.events[drop - 1][0]
            del self.events[:drop]
        self.changed.notify_all()

    def compact(self) -> None:
        """Forget the event history (as etcd compaction does): older watches get 410."""
        with self.lock:
            self.oldest = self.rv
            self.events.clear()

    def _render_managed(self, res: Resource, key: tuple[str, str], obj: dict) -> None:
        entries = []
        for (manager, operation, sub), paths in sorted(self.managers.get((res.group, res.plural, key), {}).items()):
            if not paths:
                continue
            e = {"manager": manager, "operation": operation, "apiVersion": res.api_version,
                 "fieldsType": "FieldsV1", "fieldsV1": fields_v1(paths), "time": _now()}
            if sub:
                e["subresource"] = sub
            entries.append(e)
        obj["metadata"]["managedFields"] = entries

    def _store(self, res: Resource, key, obj: dict, cur: dict | None, sub: str | None,
               uid: str | None = None) -> dict:
        meta = obj.setdefault("metadata", {})
        meta["name"], meta["namespace"] = key[1], key[0] or None
        if not res.namespaced:
            meta.pop("namespace", None)
        if meta.get("namespace") is None:
            meta.pop("namespace", None)
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        if cur is None:
            meta["uid"] = uid or str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            meta["generation"] = 1
            etype = "ADDED"
        else:
            cm = cur["metadata"]
            meta["uid"], meta["creationTimestamp"] = cm["uid"], cm.get("creationTimestamp")
            spec_old = {k: v for k, v in cur.items() if k not in ("metadata", "status", "apiVersion", "kind")}
            spec_new = {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}
            meta["generation"] = cm.get("generation", 1) + (1 if spec_old != spec_new else 0)
            etype = "MODIFIED"
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        self._render_managed(res, key, obj)
        self.objects.setdefault((res.group, res.plural), {})[key] = obj
        self._record(etype, res, obj)
        return obj

    def put(self, obj: dict, group: str | None = None, plural: str | None = None) -> dict:
        """Store ``obj`` as it is (a recorded fixture), keeping its uid; no managed fields."""
        with self.lock:
            if plural is None:
                group, plural = next(((g, p) for (g, p), r in self.resources.items()
                                      if r.kind == obj["kind"] and r.api_version == obj["apiVersion"]))
            res = self.resource(group or "", plural)
            obj = copy.deepcopy(obj)
            key = (obj["metadata"].get("namespace", "") if res.namespaced else "", obj["metadata"]["name"])
            cur = self.objects.get((res.group, res.plural), {}).get(key)
            out = self._store(res, key, obj, cur, None, uid=obj["metadata"].get("uid"))
            return copy.deepcopy(out)

    def _parts(self, res: Resource, obj: dict, sub: str | None) -> dict:
        """What a write to the main resource or the status subresource may change."""
        body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
        meta = {k: v for k, v in (body.get("metadata") or {}).items()
                if k in ("labels", "annotations", "ownerReferences", "finalizers")}
        if sub == "status":
            return {"status": body.get("status")} if "status" in body else {}
        body = {k: v for k, v in body.items() if k != "metadata" and not (res.status_subresource and k == "status")}
        if meta:
            body["metadata"] = meta
        return body

    def apply(self, res: Resource, key, body: dict, manager: str, force: bool, sub: str | None) -> tuple[int, dict]:
        with self.lock:
            cur = self.objects.get((res.group, res.plural), {}).get(key)
            if cur is None and sub:
                raise ApiError(404, "NotFound", f"{res.plural} \"{key[1]}\" not found")
            rv = (body.get("metadata") or {}).get("resourceVersion")
            if rv and cur is not None and rv != cur["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", "the object has been modified; please apply your changes to the latest version")
            mkey = (res.group, res.plural, key)
            owners = self.managers.setdefault(mkey, {})
            me = (manager, "Apply", sub or "")
            applied = self._parts(res, body, sub)
            new = fieldset(applied, res.schema)
            base = copy.deepcopy(cur) if cur is not None else {"metadata": {}}
            # conflicts with other managers' values
            conflicts = []
            for other, paths in owners.items():
                if other == me:
                    continue
                for p in set(paths) & set(new):
                    found, value = _get(base, p, res.schema)
                    if found and value != new[p] and p[-1][0] != "i":
                        conflicts.append((other[0], p))
            if conflicts and not force:
                names = sorted({c[0] for c in conflicts})
                raise ApiError(409, "Conflict", f"Apply failed with {len(conflicts)} conflicts: conflicts with "
                               f"{', '.join(repr(n) for n in names)}")
            # fields this manager stops sending, owned by nobody else, are removed
            mine = owners.get(me, {})
            others = set().union(*(set(p) for o, p in owners.items() if o != me)) if owners else set()
            # outer fields first, a list-map item before its own fields: removing the item
            # removes them, and its key fields are never removed from an item that stays
            for p in sorted(set(mine) - set(new), key=lambda p: (len(p), p[-1][0] != "i", str(p))):
                under = p[:-1] if p[-1][0] == "i" else p  # a list-map item: anything inside it
                if p in others or any(q[:len(under)] == under for q in others if len(q) > len(under)):
                    continue
                if len(p) >= 2 and p[-1][0] == "f" and p[-2][0] == "k" and p[-1][1] in json.loads(p[-2][1]):
                    continue
                _delete(base, p, res.schema)
            merged = _merge(base, applied, res.schema)
            for o in list(owners):
                if o == me:
                    continue
                moved = {c[1] for c in conflicts if c[0] == o[0]}
                owners[o] = {p: v for p, v in owners[o].items() if p not in moved}
            owners[me] = new
            out = self._store(res, key, merged, cur, sub)
            return (201 if cur is None else 200), copy.deepcopy(out)

    def update(self, res: Resource, key, new_obj: dict, manager: str, sub: str | None,
               create: bool = False) -> tuple[int, dict]:
        """A write that is not an apply (create, update, merge patch): the manager takes the
        fields whose values it changed."""
        with self.lock:
            cur = self.objects.get((res.group, res.plural), {}).get(key)
            if cur is None and not create:
                raise ApiError(404, "NotFound", f"{res.plural} \"{key[1]}\" not found")
            if cur is not None and create:
                raise ApiError(409, "AlreadyExists", f"{res.plural} \"{key[1]}\" already exists")
            base = copy.deepcopy(cur) if cur is not None else {"metadata": {}}
            parts = self._parts(res, new_obj, sub)
            if sub == "status":
                merged = dict(base, status=parts.get("status"))
            else:
                merged = {k: v for k, v in base.items() if k in ("metadata", "status") and
                          (k != "status" or res.status_subresource)}
                merged.update({k: v for k, v in parts.items() if k != "metadata"})
                meta = dict(base.get("metadata") or {})
                for k in ("labels", "annotations", "ownerReferences", "finalizers"):
                    if k in (parts.get("metadata") or {}):
                        meta[k] = parts["metadata"][k]
                    elif k in meta and cur is not None and k not in (new_obj.get("metadata") or {}):
                        meta.pop(k)
                merged["metadata"] = meta
            old_fields = fieldset(self._parts(res, base, sub), res.schema)
            new_fields = fieldset(self._parts(res, merged, sub), res.schema)
            changed = {p: v for p, v in new_fields.items() if old_fields.get(p, object()) != v or p not in old_fields}
            owners = self.managers.setdefault((res.group, res.plural, key), {})
            for o in list(owners):
                owners[o] = {p: v for p, v in owners[o].items() if p not in changed and p in new_fields}
            me = (manager, "Update", sub or "")
            owners[me] = {**{p: v for p, v in owners.get(me, {}).items() if p in new_fields}, **changed}
            out = self._store(res, key, merged, cur, sub)
            return (201 if cur is None else 200), copy.deepcopy(out)

    def delete(self, res: Resource, key) -> dict:
        with self.lock:
            objs = self.objects.get((res.group, res.plural), {})
            cur = objs.pop(key, None)
            if cur is None:
                raise ApiError(404, "NotFound", f"{res.plural} \"{key[1]}\" not found")
            self.managers.pop((res.group, res.plural, key), None)
            self.encoded.pop((res.group, res.plural, key), None)
            self.rv += 1
            cur = copy.deepcopy(cur)
            cur["metadata"]["resourceVersion"] = str(self.rv)
            self._record("DELETED", res, cur)
            return cur

    # -- reads --

    def _page(self, res: Resource, ns: str | None, q: dict) -> tuple[list[tuple], dict]:
        """The (key, object) pairs of one page of a list, and the list's metadata. Under the lock.
        The selection is kept until the next write, so the pages of one list select once."""
        sel = (res.group, res.plural, ns, q.get("labelSelector"), q.get("fieldSelector"))
        if self.selected[:2] != (self.rv, sel):
            match = matcher(q)
            self.selected = (self.rv, sel, [(k, o) for k, o in sorted(self.objects.get((res.group, res.plural), {}).items())
                                            if (ns is None or k[0] == ns) and match(o)])
        items = self.selected[2]
        start = 0
        token = q.get("continue")
        if token:
            try:
                at, start = (int(x) for x in token.split(":"))
            except ValueError:
                raise ApiError(400, "BadRequest", "invalid continue token")
            if at < self.oldest:
                raise ApiError(410, "Expired", "The provided continue parameter is too old")
        limit = int(q.get("limit") or 0) or len(items) or 1
        if self.max_page:
            limit = min(limit, self.max_page)  # a server may return fewer items than asked
        meta: dict[str, Any] = {"resourceVersion": str(self.rv)}
        if start + limit < len(items):
            meta["continue"] = f"{self.rv}:{start + limit}"
            meta["remainingItemCount"] = len(items) - start - limit
        return items[start:start + limit], meta

    def list(self, res: Resource, ns: str | None, q: dict) -> dict:
        with self.lock:
            page, meta = self._page(res, ns, q)
            return {"apiVersion": res.api_version, "kind": f"{res.kind}List", "metadata": meta,
                    "items": copy.deepcopy([o for _, o in page])}

    def list_json(self, res: Resource, ns: str | None, q: dict) -> bytes:
        """:meth:`list` as the JSON the server sends. Each object's encoding is kept until its
        next write (by resourceVersion), as the real API server's watch cache keeps serialised
        objects: a large list is then assembled, not encoded again for every page."""
        with self.lock:
            page, meta = self._page(res, ns, q)
            items = []
            for key, obj in page:
                ck = (res.group, res.plural, key)
                rv = obj["metadata"]["resourceVersion"]
                hit = self.encoded.get(ck)
                if hit is None or hit[0] != rv:
                    hit = self.encoded[ck] = (rv, json.dumps(obj).encode())
                items.append(hit[1])
        head = json.dumps({"apiVersion": res.api_version, "kind": f"{res.kind}List", "metadata": meta})
        return head[:-1].encode() + b', "items": [' + b", ".join(items) + b"]}"

    def get(self, res: Resource, key) -> dict:
        with self.lock:
            cur = self.objects.get((res.group, res.plural), {}).get(key)
            if cur is None:
                raise ApiError(404, "NotFound", f"{res.plural} \"{key[1]}\" not found")
            return copy.deepcopy(cur)


def _selector_terms(text: str | None) -> list[tuple[str, str, str]]:
    out = []
    for term in filter(None, (text or "").split(",")):
        for op in ("!=", "==", "="):
            if op in term:
                k, v = term.split(op, 1)
                out.append((k.strip(), "!=" if op == "!=" else "=", v.strip()))
                break
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
    return out


def _field(obj: dict, name: str):
    cur: Any = obj
    for part in name.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return "" if cur is None else str(cur)


def matcher(q: dict):
    """The predicate of a request's label and field selectors, parsed once."""
    labels_terms = _selector_terms(q.get("labelSelector"))
    field_terms = _selector_terms(q.get("fieldSelector"))
    for k, _, _ in field_terms:
        if k not in ("metadata.name", "metadata.namespace", "spec.nodeName"):
            raise ApiError(400, "BadRequest", f"field label not supported: {k}")

    def match(obj: dict) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return (all((labels.get(k) == v) == (op == "=") for k, op, v in labels_terms)
                and all((_field(obj, k) == v) == (op == "=") for k, op, v in field_terms))
    return match


def matches(obj: dict, q: dict) -> bool:
    return matcher(q)(obj)


def _merge_patch(old, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(old) if isinstance(old, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


# ---- the HTTP server ---------------------------------------------------------------------------------------


class FakeApiServer:
    """See the module docstring. Use as a context manager; :meth:`api_client` and
    :meth:`kubeconfig` point clients at it."""

    def __init__(self, history: int = 10_000, bookmark_interval: float = 0.5):
        self.store = Store(history)
        self.requests: list[tuple[str, str, str]] = []
        self.faults: list[int | str] = []
        self.mode = "ok"  # ok | down | blackhole
        self.bookmark_interval = bookmark_interval
        self.closing = threading.Event()
        self.hanging = 0  # requests held by the black hole right now
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                # headers and body go out in two writes: without this, Nagle's algorithm and the
                # client's delayed ACK add 40 ms to every response
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *a):
                pass

            def _send(self, code: int, obj: dict):
                self._send_json(code, json.dumps(obj).encode())

            def _send_json(self, code: int, data: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, e: ApiError):
                self._send(e.code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                    "reason": e.reason, "message": e.message, "code": e.code})

            def _handle(self, method: str):
                url = urlparse(self.path)
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                ctype = self.headers.get("Content-Type", "")
                with api.lock:
                    api.requests.append((method, url.path, ctype))
                    fault = api.faults.pop(0) if api.faults else None
                    mode = api.mode
                if mode == "blackhole":
                    with api.lock:
                        api.hanging += 1
                    try:
                        api.closing.wait()  # accepted, read, never answered
                    finally:
                        with api.lock:
                            api.hanging -= 1
                    self.close_connection = True
                    return
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if mode == "down":
                    return self._error(ApiError(503, "ServiceUnavailable", "the API server is unavailable"))
                if isinstance(fault, int):
                    return self._error(ApiError(fault, "InternalError", "injected failure"))
                try:
                    body = json.loads(raw) if raw else None
                    q = {k: v[-1] for k, v in parse_qs(url.query).items()}
                    self._route(method, url.path, q, body, ctype)
                except ApiError as e:
                    self._error(e)

            def _route(self, method, path, q, body, ctype):
                parts = path.strip("/").split("/")
                if parts[0] == "api":  # /api/v1/...
                    group, rest = "", parts[2:]
                elif parts[0] == "apis" and len(parts) >= 3:
                    group, rest = parts[1], parts[3:]
                else:
                    raise ApiError(404, "NotFound", f"no route {path}")
                ns = None
                if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) > 2:
                    ns, rest = rest[1], rest[2:]
                if not rest:
                    raise ApiError(404, "NotFound", f"no route {path}")
                res = api.store.resource(group, rest[0])
                name = rest[1] if len(rest) > 1 else None
                sub = rest[2] if len(rest) > 2 else None
                if sub not in (None, "status") or (sub == "status" and not res.status_subresource
                                                     and res.schema):
                    raise ApiError(404, "NotFound", f"no subresource {sub}")
                key = ((ns or "") if res.namespaced else "", name or "")
                if name is None:
                    if method == "GET" and q.get("watch") in ("true", "1"):
                        return self._watch(res, ns, q)
                    if method == "GET":
                        return self._send_json(200, api.store.list_json(res, ns, q))
                    if method == "POST":
                        key = (key[0], (body.get("metadata") or {}).get("name", ""))
                        return self._send(*api.store.update(res, key, body, q.get("fieldManager", "unknown"),
                                                            None, create=True))
                    raise ApiError(405, "MethodNotAllowed", method)
                if method == "GET":
                    return self._send(200, api.store.get(res, key))
                if method == "DELETE":
                    api.store.delete(res, key)
                    return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                if method == "PUT":
                    cur = api.store.get(res, key)
                    if (body.get("metadata") or {}).get("resourceVersion") != cur["metadata"]["resourceVersion"]:
                        raise ApiError(409, "Conflict", "the object has been modified")
                    return self._send(*api.store.update(res, key, body, q.get("fieldManager", "unknown"), sub))
                if method == "PATCH":
                    if ctype.startswith("application/apply-patch"):
                        if not q.get("fieldManager"):
                            raise ApiError(400, "BadRequest", "fieldManager is required for apply requests")
                        return self._send(*api.store.apply(res, key, body, q["fieldManager"],
                                                           q.get("force") == "true", sub))
                    if ctype.startswith("application/merge-patch"):
                        cur = api.store.get(res, key)
                        merged = _merge_patch(cur, body)
                        return self._send(*api.store.update(res, key, merged, q.get("fieldManager", "unknown"), sub))
                    raise ApiError(415, "UnsupportedMediaType", ctype)
                raise ApiError(405, "MethodNotAllowed", method)

            def _chunk(self, obj: dict) -> None:
                data = (json.dumps(obj) + "\n").encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def _watch(self, res: Resource, ns: str | None, q: dict) -> None:
                store = api.store
                bookmarks = q.get("allowWatchBookmarks") == "true"
                deadline = time.monotonic() + float(q.get("timeoutSeconds") or 1800)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.close_connection = True
                with store.lock:
                    rv = q.get("resourceVersion")
                    if rv in (None, "", "0"):
                        start = store.rv
                        initial = [("ADDED", o) for o in store.list(res, ns, q)["items"]]
                    else:
                        start = int(rv)
                        initial = []
                        if start < store.oldest:
                            initial = None
                if initial is None:
                    self._chunk({"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "reason": "Expired", "code": 410,
                        "message": f"too old resource version: {start} ({store.oldest + 1})"}})
                    self.wfile.write(b"0\r\n\r\n")
                    return
                try:
                    for etype, obj in initial:
                        self._chunk({"type": etype, "object": obj})
                    seen = start
                    next_bookmark = time.monotonic() + api.bookmark_interval
                    while not api.closing.is_set():
                        now = time.monotonic()
                        if now >= deadline:
                            break
                        with store.lock:
                            if store.oldest > seen:
                                self._chunk({"type": "ERROR", "object": {
                                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                    "reason": "Expired", "code": 410, "message": "too old resource version"}})
                                break
                            pending = [(r, t, o) for r, t, gp, o in store.events
                                       if r > seen and gp == (res.group, res.plural)
                                       and (ns is None or (o.get("metadata") or {}).get("namespace") == ns)]
                            latest = store.rv
                            if not pending and latest == seen:
                                store.changed.wait(min(0.1, max(0.0, deadline - now)))
                        for r, t, o in pending:
                            if matches(o, q):
                                self._chunk({"type": t, "object": o})
                        seen = max([seen, latest] + [r for r, _, _ in pending])
                        if bookmarks and time.monotonic() >= next_bookmark:
                            self._chunk({"type": "BOOKMARK", "object": {
                                "kind": res.kind, "apiVersion": res.api_version,
                                "metadata": {"resourceVersion": str(seen)}}})
                            next_bookmark = time.monotonic() + api.bookmark_interval
                    if bookmarks:
                        self._chunk({"type": "BOOKMARK", "object": {
                            "kind": res.kind, "apiVersion": res.api_version,
                            "metadata": {"resourceVersion": str(seen)}}})
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError, OSError):
                    return

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

            def do_PATCH(self):
                self._handle("PATCH")

            def do_DELETE(self):
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    # -- lifecycle --

    def __enter__(self) -> "FakeApiServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        with self.store.lock:
            self.store.changed.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # -- helpers for tests --

    def api_client(self):
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        cfg.retries = False  # Envelope's own backoff is what is under test
        return client.ApiClient(cfg)

    def kubeconfig(self, path: Path) -> str:
        from tests.kubeconfig import write_kubeconfig

        return write_kubeconfig(Path(path), self.url)

    def put(self, obj: dict) -> dict:
        return self.store.put(obj)

    def compact(self) -> None:
        self.store.compact()

    def objects(self, group: str, plural: str) -> dict[tuple[str, str], dict]:
        with self.store.lock:
            return copy.deepcopy(self.store.objects.get((group, plural), {}))

    def object(self, group: str, plural: str, namespace: str, name: str) -> dict | None:
        return self.objects(group, plural).get((namespace, name))

    def names(self, group: str = "envelope.dev", plural: str = "workloadprofiles") -> list[str]:
        return sorted(k[1] for k in self.objects(group, plural))

    def delete(self, group: str, plural: str, namespace: str, name: str) -> None:
        self.store.delete(self.store.resource(group, plural), (namespace, name))

    def count(self, method: str | None = None, contains: str = "", ctype: str | None = None) -> int:
        with self.lock:
            return sum(1 for m, p, c in self.requests
                       if (method is None or m == method) and contains in p and (ctype is None or c.startswith(ctype)))



def main() -> None:
    """``python -m tests.fakes.apiserver``: serve until stdin closes, the URL on the first line
    of stdout (for a benchmark that keeps the server out of the measured process)."""
    import sys

    with FakeApiServer(history=int(sys.argv[1]) if len(sys.argv) > 1 else 10_000) as api:
        print(api.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
