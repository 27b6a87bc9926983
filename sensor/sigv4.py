"""AWS Signature Version 4 in a captured request: what it says, and what must never be kept.

A SigV4-signed request names, in its credential scope, the access key id, the date, the region
and the signing name of the service::

    Authorization: AWS4-HMAC-SHA256 Credential=AKIA.../20250101/us-east-1/s3/aws4_request,
                   SignedHeaders=host;x-amz-date, Signature=<hex>
    ?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA...%2F20250101%2F...&X-Amz-Signature=...

(the second form is a presigned URL). SigV4a (``AWS4-ECDSA-P256-SHA256``) has no region in its
scope; its regions come from ``X-Amz-Region-Set``.

:func:`redact` is the one place that sees credential material. It runs on the capture before the
request is decoded or leaves the sensor, and returns the request with

- the access key id replaced by a keyed hash (HMAC-SHA256 under the sensor's key, 128 bits shown
  as ``hmac-sha256:<32 hex>``) and its four-letter kind (``AKIA`` long-term, ``ASIA`` temporary);
- the signature removed (header and query form); an ``Authorization`` of any other scheme
  (SigV2's ``AWS KEY:SIGNATURE``, bearer tokens) reduced to its scheme name, and SigV2 query
  credentials (``AWSAccessKeyId``, ``Signature``) hashed and removed;
- the session token (``X-Amz-Security-Token`` header or query parameter) replaced by
  ``redacted``: its presence is kept, its value is not;
- a streaming, chunk-signed body (``aws-chunked``, ``STREAMING-...`` payloads) dropped and marked
  truncated: it carries a signature per chunk and is payload, never a request parameter.

:func:`credential` reads the redacted form only; a request that still carries a raw key id, a
signature or a token value is refused with :class:`UnredactedCredentials`, so a decoder can never
be handed a secret by mistake and carry on.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from urllib.parse import quote

from .httprequest import CapturedRequest, DuplicateHeader

ALGORITHMS = ("AWS4-HMAC-SHA256", "AWS4-ECDSA-P256-SHA256")
HASH_PREFIX = "hmac-sha256:"
REDACTED = "redacted"
MIN_KEY_BYTES = 16
# Access key id prefixes that say what kind of credential signed (AWS IAM identifiers reference).
KEY_KINDS = {"AKIA": "long-term", "ASIA": "temporary", "ABIA": "service-bearer", "ACCA": "context"}

_KEY_ID_RE = re.compile(r"^[A-Z0-9]{16,128}$")
_HASHED_RE = re.compile(r"^hmac-sha256:([0-9a-f]{32})\.([A-Z]{4}|unknown)$")
_DATE_RE = re.compile(r"^\d{8}$")
_TOKEN_HEADER = "x-amz-security-token"
_SIG_QUERY = "x-amz-signature"
_CRED_QUERY = "x-amz-credential"
_ALG_QUERY = "x-amz-algorithm"


class SigV4Error(ValueError):
    """A request whose SigV4 parts do not parse."""


class Unsigned(SigV4Error):
    """A request with no SigV4 signature at all (anonymous, or another signing scheme)."""


class UnredactedCredentials(SigV4Error):
    """A request that still carries a raw access key id, a signature or a session token."""


@dataclass(frozen=True)
class Credential:
    """The credential scope of a redacted request; nothing in it is secret."""

    key_hash: str                 # hmac-sha256:<32 hex>
    key_kind: str                 # AKIA, ASIA, ... or "unknown"
    date: str                     # YYYYMMDD
    region: str | None            # None for SigV4a
    service: str                  # signing name, e.g. s3, dynamodb, execute-api
    algorithm: str
    presigned: bool
    session_token: bool           # a session token was sent (its value is never kept)
    region_set: tuple[str, ...] = ()   # SigV4a only

    @property
    def kind(self) -> str:
        return KEY_KINDS.get(self.key_kind, "unknown")


def _hash_key_id(key_id: str, key: bytes) -> str:
    digest = hmac.new(key, key_id.encode("ascii"), hashlib.sha256).hexdigest()[:32]
    prefix = key_id[:4] if key_id[:4] in KEY_KINDS else "unknown"
    return f"{HASH_PREFIX}{digest}.{prefix}"


def _split_auth(value: str) -> tuple[str, dict[str, str]]:
    algorithm, _, rest = value.strip().partition(" ")
    parts: dict[str, str] = {}
    for item in rest.split(","):
        k, eq, v = item.strip().partition("=")
        if not eq:
            raise SigV4Error(f"Authorization: {item.strip()!r} is not key=value")
        if k in parts:
            raise SigV4Error(f"Authorization: {k} given twice")
        parts[k] = v
    return algorithm, parts


def _scope(credential: str, algorithm: str) -> tuple[str, str, str | None, str]:
    """``KEY/DATE/REGION/SERVICE/aws4_request`` (SigV4a: ``KEY/DATE/SERVICE/aws4_request``)."""
    fields = credential.split("/")
    want = 4 if algorithm == "AWS4-ECDSA-P256-SHA256" else 5
    if len(fields) != want or fields[-1] != "aws4_request":
        raise SigV4Error(f"credential scope {'/'.join(['<key>'] + fields[1:])!r} is not "
                         f"{'KEY/DATE/SERVICE' if want == 4 else 'KEY/DATE/REGION/SERVICE'}/aws4_request")
    key_id, date = fields[0], fields[1]
    region = None if want == 4 else fields[2]
    service = fields[-2]
    if not _DATE_RE.match(date):
        raise SigV4Error(f"credential scope date {date!r} is not YYYYMMDD")
    if not service or (region is not None and not region):
        raise SigV4Error("credential scope has an empty region or service")
    return key_id, date, region, service


_KNOWN_SCHEMES = ALGORITHMS + ("AWS", "Bearer", "Basic", "Digest")


def _hashed_scope(credential_field: str, algorithm: str, key: bytes) -> str:
    key_id, date, region, service = _scope(credential_field, algorithm)
    if not _KEY_ID_RE.match(key_id):
        raise SigV4Error("the access key id is not an AWS key id")
    return "/".join([_hash_key_id(key_id, key), date] + ([region] if region else []) + [service, "aws4_request"])


def _redact_authorization(value: str, key: bytes) -> str:
    scheme = value.strip().split(" ", 1)[0]
    if scheme in ALGORITHMS:
        try:
            algorithm, parts = _split_auth(value)
            if "Credential" not in parts:
                raise SigV4Error("no Credential")
            out = f"{algorithm} Credential={_hashed_scope(parts['Credential'], algorithm, key)}"
            if "SignedHeaders" in parts:
                out += f", SignedHeaders={parts['SignedHeaders']}"
            return out
        except SigV4Error:
            return f"{scheme} {REDACTED}"
    # Any other scheme (SigV2 "AWS KEY:SIGNATURE", bearer tokens, ...): nothing of its value is
    # kept; the scheme name only when it is a known one (a bare value may itself be a secret).
    return f"{scheme} {REDACTED}" if scheme in _KNOWN_SCHEMES else REDACTED


def _redact_query(request: CapturedRequest, key: bytes) -> str:
    pairs = request.query_pairs()
    lowered = {k.lower() for k, _ in pairs}
    if not lowered & {_SIG_QUERY, _CRED_QUERY, _TOKEN_HEADER, "signature", "awsaccesskeyid"}:
        return request.target
    algorithm = next((v for k, v in pairs if k.lower() == _ALG_QUERY), "")
    out = []
    for k, v in pairs:
        lk = k.lower()
        if lk in (_SIG_QUERY, "signature"):
            continue
        if lk == _TOKEN_HEADER:
            v = REDACTED
        elif lk == _CRED_QUERY:
            try:
                v = _hashed_scope(v, algorithm, key) if algorithm in ALGORITHMS else REDACTED
            except SigV4Error:
                v = REDACTED
        elif lk == "awsaccesskeyid":
            v = _hash_key_id(v, key) if _KEY_ID_RE.match(v) else REDACTED
        out.append((k, v))
    query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in out)
    return request.path + ("?" + query if query else "")


def redact(request: CapturedRequest, key: bytes) -> CapturedRequest:
    """The request with its credential material replaced as the module docstring says.

    Total: any request comes back redacted. An ``Authorization`` header that is not well-formed
    SigV4 keeps at most its scheme name; a malformed credential scope in a query is dropped."""
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the key for hashing access key ids must be at least {MIN_KEY_BYTES} bytes")
    headers = []
    for k, v in request.headers:
        lk = k.lower()
        if lk == "authorization":
            v = _redact_authorization(v, key)
        elif lk == _TOKEN_HEADER:
            v = REDACTED
        headers.append((k, v))
    body, truncated = request.body, request.truncated
    if _chunk_signed(request):
        body, truncated = b"", True
    return request.with_changes(headers=tuple(headers), target=_redact_query(request, key), body=body,
                                truncated=truncated)


def _chunk_signed(request: CapturedRequest) -> bool:
    try:
        sha = (request.header("x-amz-content-sha256") or "").upper()
        encoding = (request.header("Content-Encoding") or "").lower()
    except DuplicateHeader:
        return True  # ambiguous framing: keep no body
    return sha.startswith("STREAMING-") or "aws-chunked" in encoding


def credential(request: CapturedRequest) -> Credential:
    """The credential scope of a request that :func:`redact` has processed."""
    token = request.header("X-Amz-Security-Token")
    if token is not None and token != REDACTED:
        raise UnredactedCredentials("X-Amz-Security-Token still carries a value")
    auth = request.header("Authorization")
    scheme = auth.strip().split(" ", 1)[0] if auth else None
    if auth is not None and auth.strip() in (f"{a} {REDACTED}" for a in ALGORITHMS):
        raise SigV4Error("the SigV4 Authorization header was malformed (its value was dropped)")
    if auth is not None and scheme not in ALGORITHMS and auth.strip() != f"{scheme} {REDACTED}" \
            and auth.strip() != REDACTED:
        raise UnredactedCredentials("Authorization still carries a value")
    if scheme in ALGORITHMS:
        algorithm, parts = _split_auth(auth)
        if "Signature" in parts:
            raise UnredactedCredentials("Authorization still carries a signature")
        cred = parts.get("Credential")
        presigned = False
    else:
        pairs = {k.lower(): v for k, v in request.query_pairs()}
        if "signature" in pairs or ("awsaccesskeyid" in pairs and not _HASHED_RE.match(pairs["awsaccesskeyid"])):
            raise UnredactedCredentials("SigV2 query credentials still in the query")
        if _ALG_QUERY not in pairs:
            if "awsaccesskeyid" in pairs or scheme == "AWS":
                raise Unsigned("signed with SigV2, which is not decoded")
            raise Unsigned(f"Authorization scheme {scheme} is not SigV4" if scheme else "no SigV4 signature")
        if _SIG_QUERY in pairs:
            raise UnredactedCredentials("X-Amz-Signature still in the query")
        if pairs.get(_TOKEN_HEADER, REDACTED) != REDACTED:
            raise UnredactedCredentials("X-Amz-Security-Token still in the query")
        algorithm = pairs[_ALG_QUERY]
        cred = pairs.get(_CRED_QUERY)
        token = pairs.get(_TOKEN_HEADER, token)
        presigned = True
    if algorithm not in ALGORITHMS:
        raise SigV4Error(f"algorithm {algorithm!r} is not SigV4")
    if not cred:
        raise SigV4Error("no credential scope")
    key_field, date, region, service = _scope(cred, algorithm)
    m = _HASHED_RE.match(key_field)
    if not m:
        raise UnredactedCredentials("the credential scope still carries a raw access key id")
    region_set: tuple[str, ...] = ()
    if region is None:
        region_set = tuple(r.strip() for r in (request.header("X-Amz-Region-Set") or "").split(",") if r.strip())
    return Credential(key_hash=f"{HASH_PREFIX}{m.group(1)}", key_kind=m.group(2), date=date, region=region,
                      service=service, algorithm=algorithm, presigned=presigned,
                      session_token=token is not None, region_set=region_set)
