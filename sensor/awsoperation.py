"""Which AWS operation a captured request calls, and the parameters it passed, from its shape.

The request is matched against the service models of its signing name (:mod:`sensor.awsmodels`):

- JSON protocols by ``X-Amz-Target``;
- query protocols by ``Action=`` (query string, or form body);
- REST protocols by method, path template and query literals. Where several templates match, the
  most specific wins: more literal path segments, then more query literals, then more required
  header and query members present (``UploadPartCopy`` over ``UploadPart`` over ``PutObject``),
  then an ``x-id`` query naming the operation, then the operation that is not deprecated (the wire
  form of ``GetBucketLifecycle`` and ``GetBucketLifecycleConfiguration`` is the same), then, for
  S3, the host (``ListDirectoryBuckets`` is ``ListBuckets`` sent to the S3 Express control
  endpoint). A tie left after that is reported as ambiguous, never resolved by guessing.

S3 addressing is resolved first (:func:`s3_addressing`): virtual-hosted requests
(``research-corpus-v2.s3.us-east-1.amazonaws.com/papers/7.pdf``) are rewritten to path style
(``/research-corpus-v2/papers/7.pdf``); access-point hosts name an access point. On a host that
is neither an AWS S3 host, an IP address nor a configured S3 endpoint, the addressing style cannot
be known from the request, and the bucket is reported as undetermined.

Parameters come from where the model binds them: URI labels, headers, query parameters and the
body (JSON, XML or form). A body member whose value could not be read (the capture was cut, the
body is compressed or CBOR, or does not parse) is listed in ``undetermined``; it is never guessed
from a prefix, because a later duplicate member would win at the server. Members the model marks
``sensitive`` (secret strings, plaintexts, passwords) are never copied.
"""

from __future__ import annotations

import ipaddress
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import parse_qsl, unquote

from .awsmodels import Route, ServiceCatalog, ServiceEntry
from .httprequest import CapturedRequest, DuplicateHeader

REST = ("rest-xml", "rest-json")
QUERY = ("query", "ec2")


@dataclass(frozen=True)
class OperationCall:
    service: str
    operation: str
    protocol: str
    params: Mapping[str, Any]
    undetermined: frozenset[str] = frozenset()
    body: str = "none"            # none | complete | truncated | unparsed: <why>
    s3: "S3Address | None" = None
    withheld: frozenset[str] = frozenset()   # sensitive members that were sent (values not read)


@dataclass(frozen=True)
class Unmatched:
    reason: str
    service: str | None = None    # the service, when known but not the operation


@dataclass(frozen=True)
class S3Address:
    style: str                    # path | virtual | access-point | undetermined
    bucket: str | None = None     # virtual-hosted bucket
    access_point: tuple[str, str, str] | None = None   # (name, account, region)
    reason: str = ""


# ---- S3 addressing --------------------------------------------------------------------------

_AWS_SUFFIXES = (".amazonaws.com", ".amazonaws.com.cn")
_S3_LABEL_RE = re.compile(r"^s3(?:-fips|-external-1|-accelerate|-[a-z]{2}(?:-[a-z]+)+-\d+)?$")
_AP_RE = re.compile(r"^(?P<name>[a-z0-9-]+)-(?P<account>\d{12})$")
_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")


def _split_port(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.index("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def s3_addressing(host: str, endpoints: tuple[str, ...] = ()) -> S3Address:
    """How an S3 request names its bucket: in the path, or in the host (``endpoints`` are
    host names of non-AWS S3 endpoints under which buckets are virtual-hosted)."""
    h = _split_port(host)
    if _is_ip(h):
        return S3Address("path")
    for ep in endpoints:
        ep = ep.lower().strip(".")
        if h == ep:
            return S3Address("path")
        if h.endswith("." + ep):
            return S3Address("virtual", bucket=h[: -len(ep) - 1])
    if not h.endswith(_AWS_SUFFIXES):
        return S3Address("undetermined", reason=f"host {h!r} is not an AWS S3 host, an IP address or a "
                                                "configured S3 endpoint: path or virtual-hosted style unknown")
    labels = h.split(".")
    # The endpoint labels sit at the right end; a bucket may itself be named like one ("s3").
    for i in range(len(labels) - 1, -1, -1):
        label = labels[i]
        if label == "s3-accesspoint" and i >= 1:
            m = _AP_RE.match(".".join(labels[:i]))
            region = next((x for x in labels[i + 1:] if _REGION_RE.match(x)), "")
            if m and region:
                return S3Address("access-point", access_point=(m.group("name"), m.group("account"), region))
            return S3Address("undetermined", reason=f"access-point host {h!r} not understood")
        if label == "s3express-control":
            return S3Address("path")  # directory-bucket control API: buckets are in the path
        if label.startswith("s3express-"):  # zonal endpoint of directory buckets: virtual-hosted
            return S3Address("virtual", bucket=".".join(labels[:i])) if i else \
                S3Address("undetermined", reason=f"host {h!r} names no directory bucket")
        if label in ("s3-control", "s3-object-lambda"):
            return S3Address("undetermined", reason=f"host {h!r} is not a bucket endpoint")
        if _S3_LABEL_RE.match(label):
            head = labels[:i]
            if head and head[-1].startswith("vpce-"):  # interface endpoint: [bucket.]bucket.vpce-ID.s3...
                head = head[:-1]
                if not head or head[-1] != "bucket":
                    return S3Address("undetermined", reason=f"VPC endpoint host {h!r} is not a bucket endpoint")
                head = head[:-1]
            return S3Address("virtual", bucket=".".join(head)) if head else S3Address("path")
    return S3Address("undetermined", reason=f"host {h!r} has no S3 endpoint label")


# ---- REST routing ---------------------------------------------------------------------------


def _path_parts(path: str) -> list[str]:
    raw = path[1:] if path.startswith("/") else path
    return raw.split("/") if raw else []


def _match_route(route: Route, method: str, parts: list[str], query: list[tuple[str, str]],
                 headers: CapturedRequest) -> dict[str, str] | None:
    if route.method != method:
        return None
    labels: dict[str, str] = {}
    i = 0
    for kind, name in route.segments:
        if kind == "greedy":
            rest = "/".join(parts[i:])
            if not rest:
                return None
            labels[name] = unquote(rest)
            i = len(parts)
            break
        if i >= len(parts):
            return None
        seg = parts[i]
        if kind == "lit":
            if unquote(seg) != name:
                return None
        else:
            if not seg:
                return None
            labels[name] = unquote(seg)
        i += 1
    rest = parts[i:]
    if rest and rest != [""]:
        return None
    keys = {k for k, _ in query}
    for k, v in route.query_literals:
        if v is None:
            if k not in keys:
                return None
        elif (k, v) not in query:
            return None
    for h in route.required_headers:
        if not headers.has_header(h):
            return None
    for q in route.required_query:
        if q not in keys:
            return None
    return labels


def _route_score(route: Route, query: list[tuple[str, str]], host: str) -> tuple:
    x_id = 1 if ("x-id", route.operation) in query else 0
    # Operations the model routes to the S3 Express control endpoint for directory buckets work
    # on ordinary endpoints too; only a tie (ListBuckets / ListDirectoryBuckets) is settled by it.
    express = 1 if (not route.s3express_control) == ("s3express-control" not in host) else 0
    return (route.literal_segments, len(route.query_literals),
            len(route.required_headers) + len(route.required_query), x_id, 0 if route.deprecated else 1, express)


# ---- parameters -----------------------------------------------------------------------------


def _sensitive(shape) -> bool:
    return bool(getattr(shape, "metadata", {}).get("sensitive"))


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _xml_value(elem: ET.Element, shape) -> Any:
    if _sensitive(shape):
        return None
    if shape.type_name == "structure":
        out: dict[str, Any] = {}
        for name, mshape in shape.members.items():
            xml_name = mshape.serialization.get("name", name)
            if mshape.type_name == "list" and mshape.serialization.get("flattened"):
                items = [c for c in elem if _local(c.tag) == xml_name]
                if items:
                    out[name] = [_xml_value(c, mshape.member) for c in items]
                continue
            child = next((c for c in elem if _local(c.tag) == xml_name), None)
            if child is not None:
                out[name] = _xml_value(child, mshape)
        return out
    if shape.type_name == "list":
        item_name = shape.member.serialization.get("name", "member")
        return [_xml_value(c, shape.member) for c in elem if _local(c.tag) == item_name]
    return elem.text or ""


def _body_members(op) -> dict[str, Any]:
    if op.input_shape is None:
        return {}
    return {n: s for n, s in op.input_shape.members.items() if not s.serialization.get("location")}


def _read_params(entry: ServiceEntry, op_name: str, protocol: str, request: CapturedRequest,
                 labels: Mapping[str, str], form: list[tuple[str, str]] | None) -> tuple[dict, set, str, set]:
    op = entry.model.operation_model(op_name)
    params: dict[str, Any] = {}
    undetermined: set[str] = set()
    withheld: set[str] = set()
    shape = op.input_shape
    if shape is None:
        return params, undetermined, "none", withheld
    query = request.query_pairs()
    for name, mshape in shape.members.items():
        ser = mshape.serialization
        loc = ser.get("location")
        wire = ser.get("name", name)
        if _sensitive(mshape):
            if (loc == "header" and request.has_header(wire)) or (loc == "querystring" and any(k == wire for k, _ in query)):
                withheld.add(name)
            continue
        if loc == "uri":
            if wire in labels:
                params[name] = labels[wire]
        elif loc == "header":
            try:
                v = request.header(wire)
            except DuplicateHeader:
                undetermined.add(name)
                continue
            if v is not None:
                params[name] = v
        elif loc == "querystring" and mshape.type_name in ("string", "integer", "long", "boolean", "timestamp"):
            values = [v for k, v in query if k == wire]
            if len(values) > 1:
                undetermined.add(name)
            elif values:
                params[name] = values[0]
    body_members = _body_members(op)
    payload = shape.serialization.get("payload")
    if payload and shape.members[payload].type_name in ("blob", "string"):
        body_members = {}  # the body is the payload itself (object data), never a parameter
    if not body_members:
        return params, undetermined, "none" if not request.body else "complete", withheld
    if request.truncated:
        undetermined.update(body_members)
        return params, undetermined, "truncated", withheld
    encoding = (request.header("Content-Encoding") or "").lower()
    if encoding and encoding != "identity":
        undetermined.update(body_members)
        return params, undetermined, f"unparsed: content-encoding {encoding}", withheld
    try:
        if protocol in QUERY:
            values: dict[str, list[str]] = {}
            for k, v in form or []:
                values.setdefault(k, []).append(v)
            for name, mshape in body_members.items():
                if _sensitive(mshape):
                    continue
                wire = mshape.serialization.get("name", name)
                got = values.get(wire)
                if got and len(got) > 1:
                    undetermined.add(name)
                elif got:
                    params[name] = got[0]
        elif protocol == "smithy-rpc-v2-cbor":
            undetermined.update(body_members)
            return params, undetermined, "unparsed: CBOR bodies are not decoded", withheld
        elif not request.body.strip():
            pass
        elif protocol == "rest-xml":
            root = ET.fromstring(request.body)
            if payload:
                value = _xml_value(root, shape.members[payload])
                if value is not None:
                    params[payload] = value
            else:
                params.update({k: v for k, v in _xml_value(root, shape).items() if k in body_members})
        else:
            doc = json.loads(request.body)
            if not isinstance(doc, dict):
                raise ValueError("the JSON body is not an object")
            if payload and protocol == "rest-json":
                doc = {payload: doc}
            for name, mshape in body_members.items():
                wire = mshape.serialization.get("name", name) if protocol == "rest-json" else name
                if wire in doc and not _sensitive(mshape):
                    params[name] = doc[wire]
    except (ValueError, ET.ParseError, UnicodeDecodeError) as e:
        undetermined.update(body_members)
        return params, undetermined, f"unparsed: {str(e).splitlines()[0][:80]}", withheld
    return params, undetermined, "complete", withheld


# ---- matching -------------------------------------------------------------------------------


def _form(request: CapturedRequest) -> list[tuple[str, str]] | None:
    ctype = (request.header("Content-Type") or "").lower()
    if request.method == "POST" and "application/x-www-form-urlencoded" in ctype and not request.truncated:
        try:
            return parse_qsl(request.body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            return None
    return None


def match(request: CapturedRequest, catalog: ServiceCatalog, signing_name: str,
          s3_endpoints: tuple[str, ...] = ()) -> OperationCall | Unmatched:
    """The operation ``request`` calls among the catalog's services signed as ``signing_name``."""
    entries = catalog.by_signing_name(signing_name)
    if not entries:
        return Unmatched(f"no service model for signing name {signing_name!r} in the catalog")
    try:
        target = request.header("X-Amz-Target")
    except DuplicateHeader:
        return Unmatched("X-Amz-Target sent more than once")
    host = _split_port(request.host)
    found: list[tuple[tuple, ServiceEntry, str, str, dict, S3Address | None]] = []
    unknown_services: list[str] = []
    for entry in entries:
        protocols = entry.protocols
        if target is not None:
            if "json" in protocols and entry.target_prefix and target.startswith(entry.target_prefix + "."):
                op = entry.targets.get(target)
                if op is None:
                    unknown_services.append(entry.name)
                    continue
                found.append(((9,), entry, op, "json", {}, None))
            continue
        if any(p in QUERY for p in protocols):
            form = _form(request)
            actions = [v for k, v in request.query_pairs() if k == "Action"] + \
                      [v for k, v in (form or []) if k == "Action"]
            if len(actions) == 1 and actions[0] in entry.actions:
                proto = next(p for p in protocols if p in QUERY)
                found.append(((8,), entry, actions[0], proto, {}, None))
                continue
            if len(actions) > 1:
                return Unmatched("Action given more than once", entry.name)
            if request.truncated and request.method == "POST" and not actions:
                unknown_services.append(entry.name)
        if "smithy-rpc-v2-cbor" in protocols and entry.cbor_service:
            m = re.match(r"^/service/([^/]+)/operation/([^/?]+)$", request.path)
            if m and m.group(1) == entry.cbor_service and m.group(2) in entry.actions:
                found.append(((8,), entry, m.group(2), "smithy-rpc-v2-cbor", {}, None))
                continue
        if any(p in REST for p in protocols):
            addr = None
            path = request.path
            if entry.name == "s3":
                addr = s3_addressing(request.host, s3_endpoints)
                if addr.style == "undetermined":
                    return Unmatched(addr.reason, "s3")
                if addr.style == "virtual":
                    path = "/" + addr.bucket + (path if path != "/" else "")
                elif addr.style == "access-point":
                    path = "/" + addr.access_point[0] + (path if path != "/" else "")
            parts = _path_parts(path)
            query = request.query_pairs()
            proto = next(p for p in protocols if p in REST)
            best: list[tuple[tuple, Route, dict]] = []
            for route in entry.routes:
                labels = _match_route(route, request.method, parts, query, request)
                if labels is not None:
                    best.append((_route_score(route, query, host), route, labels))
            if best:
                best.sort(key=lambda t: t[0], reverse=True)
                top = [b for b in best if b[0] == best[0][0]]
                if len(top) > 1:
                    names = ", ".join(sorted(b[1].operation for b in top))
                    return Unmatched(f"request shape matches {names} equally", entry.name)
                score, route, labels = top[0]
                found.append(((1,) + score, entry, route.operation, proto, labels, addr))
    if not found:
        if unknown_services:
            return Unmatched("operation not determined from the request", unknown_services[0])
        return Unmatched(f"no operation of {', '.join(e.name for e in entries)} matches "
                         f"{request.method} {request.path}", entries[0].name if len(entries) == 1 else None)
    if len(found) > 1:
        by_host = [f for f in found if f[1].endpoint_prefix in host.split(".")]
        if len(by_host) == 1:
            found = by_host
        else:
            found.sort(key=lambda f: f[0], reverse=True)
            if found[0][0] == found[1][0]:
                names = ", ".join(sorted(f"{f[1].name}:{f[2]}" for f in found))
                return Unmatched(f"request matches {names} equally")
    _, entry, op, proto, labels, addr = found[0]
    params, undetermined, body, withheld = _read_params(entry, op, proto, request, labels,
                                                        _form(request) if proto in QUERY else None)
    return OperationCall(entry.name, op, proto, params, frozenset(undetermined), body, addr, frozenset(withheld))
