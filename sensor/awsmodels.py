"""The AWS service models botocore ships, indexed for recognising operations on the wire.

Each model says how its operations travel (``metadata.protocols``):

- ``rest-xml`` / ``rest-json``: an HTTP method and a ``requestUri`` template per operation
  (``GET /{Bucket}/{Key+}``, ``GET /{Bucket}?list-type=2``); members bound to URI labels,
  headers and query parameters;
- ``json``: ``POST /`` with ``X-Amz-Target: <targetPrefix>.<Operation>`` and a JSON body;
- ``query`` / ``ec2``: ``Action=<Operation>`` in the query string or the form body;
- ``smithy-rpc-v2-cbor``: ``POST /service/<ServiceShape>/operation/<Operation>``, CBOR body.

The catalog loads only the services it is asked for (every model at once costs seconds and
hundreds of MiB), and indexes them by SigV4 signing name, which is what a request's credential
scope names. Loading reads botocore's packaged data once; everything built from it is immutable,
and matching against it is pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import botocore
import botocore.loaders
import botocore.model

# What the sensor decodes by default: the services whose resources it names, and a few that
# agent workloads call often (their operations are recognised; their resources are reported as
# undetermined until a rule names them).
DEFAULT_SERVICES = (
    "s3", "dynamodb", "dynamodbstreams", "sqs", "sns", "secretsmanager", "kms", "sts",
    "lambda", "ssm", "logs", "bedrock-runtime",
)

_LABEL_RE = re.compile(r"^\{([A-Za-z0-9_]+)(\+?)\}$")


@dataclass(frozen=True)
class Route:
    """One REST operation's request shape: method, path template and query literals."""

    operation: str
    method: str
    segments: tuple[tuple[str, str], ...]       # ("lit", text) | ("label", name) | ("greedy", name)
    query_literals: tuple[tuple[str, str | None], ...]  # (key, value or None for key-only)
    required_headers: tuple[str, ...]           # lower-case header names of required members
    required_query: tuple[str, ...]             # query names of required members
    deprecated: bool = False
    s3express_control: bool = False

    @property
    def literal_segments(self) -> int:
        return sum(1 for kind, _ in self.segments if kind == "lit")


def parse_request_uri(uri: str) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str | None], ...]]:
    """``/{Bucket}/{Key+}?uploads`` → segments and query literals."""
    path, _, query = uri.partition("?")
    segments = []
    for seg in path.strip("/").split("/") if path.strip("/") else []:
        m = _LABEL_RE.match(seg)
        if m:
            segments.append(("greedy" if m.group(2) else "label", m.group(1)))
        elif "{" in seg:
            raise ValueError(f"requestUri segment {seg!r} mixes text and a label")
        else:
            segments.append(("lit", seg))
    literals = []
    for item in query.split("&") if query else []:
        k, eq, v = item.partition("=")
        literals.append((k, v if eq else None))
    return tuple(segments), tuple(literals)


@dataclass
class ServiceEntry:
    """One service model and its wire index."""

    name: str
    model: botocore.model.ServiceModel
    protocols: tuple[str, ...]
    signing_name: str
    endpoint_prefix: str
    target_prefix: str | None
    routes: tuple[Route, ...] = ()
    targets: dict[str, str] = field(default_factory=dict)     # X-Amz-Target → operation
    actions: dict[str, str] = field(default_factory=dict)     # Action= → operation
    cbor_service: str | None = None


def _entry(name: str, raw: dict) -> ServiceEntry:
    model = botocore.model.ServiceModel(raw, service_name=name)
    md = model.metadata
    protocols = tuple(md.get("protocols") or [md["protocol"]])
    entry = ServiceEntry(
        name=name, model=model, protocols=protocols,
        signing_name=md.get("signingName") or md["endpointPrefix"],
        endpoint_prefix=md["endpointPrefix"], target_prefix=md.get("targetPrefix"),
    )
    routes = []
    for op_name in model.operation_names:
        op = model.operation_model(op_name)
        if any(p in ("rest-xml", "rest-json") for p in protocols):
            segments, literals = parse_request_uri(op.http.get("requestUri", "/"))
            req_h, req_q = [], []
            if op.input_shape is not None:
                for member in op.input_shape.required_members:
                    ser = op.input_shape.members[member].serialization
                    if ser.get("location") == "header":
                        req_h.append(ser.get("name", member).lower())
                    elif ser.get("location") == "querystring":
                        req_q.append(ser.get("name", member))
            express = any(p.name == "UseS3ExpressControlEndpoint" and p.value
                          for p in op.static_context_parameters)
            routes.append(Route(op_name, op.http.get("method", "POST"), segments, literals,
                                tuple(sorted(req_h)), tuple(sorted(req_q)), bool(op.deprecated), express))
        if entry.target_prefix:
            entry.targets[f"{entry.target_prefix}.{op_name}"] = op_name
        entry.actions[op_name] = op_name
    entry.routes = tuple(routes)
    if "smithy-rpc-v2-cbor" in protocols:
        entry.cbor_service = entry.target_prefix
    return entry


class ServiceCatalog:
    """The chosen services' models, indexed by signing name."""

    def __init__(self, services: Iterable[str] = DEFAULT_SERVICES, loader: botocore.loaders.Loader | None = None):
        loader = loader or botocore.loaders.create_loader()
        available = set(loader.list_available_services("service-2"))
        self._entries: dict[str, ServiceEntry] = {}
        for name in sorted(set(services)):
            if name not in available:
                raise ValueError(f"botocore ships no service model named {name!r}")
            self._entries[name] = _entry(name, loader.load_service_model(name, "service-2"))
        self._by_signing: dict[str, list[ServiceEntry]] = {}
        for e in self._entries.values():
            self._by_signing.setdefault(e.signing_name, []).append(e)
        self._partitions = [(p["id"], re.compile(p["regionRegex"]))
                            for p in loader.load_data("partitions")["partitions"]]
        self.botocore_version = getattr(botocore, "__version__", "unknown")

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def entry(self, name: str) -> ServiceEntry | None:
        return self._entries.get(name)

    def by_signing_name(self, signing_name: str) -> list[ServiceEntry]:
        return list(self._by_signing.get(signing_name, ()))


    def partition(self, region: str | None) -> str | None:
        """The partition (``aws``, ``aws-cn``, ``aws-us-gov``, ...) of a region, from botocore's
        partition data; None for a region no partition claims."""
        if not region:
            return None
        for pid, rx in self._partitions:
            if rx.match(region):
                return pid
        return None
