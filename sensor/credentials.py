"""Credentials in captured requests: removed before a request leaves the capture.

:func:`redact` is what the request capture calls on every request it reassembled, before the
request is decoded into behaviours or goes anywhere else; nothing it removes is stored.

- A SigV4-signed request (``Authorization: AWS4-...`` or the presigned ``X-Amz-*`` query) goes to
  :func:`sensor.sigv4.redact`, the one place that handles AWS credentials: the access key id
  survives as a keyed hash in the credential scope, signatures and session tokens do not.
- Any other ``Authorization`` or ``Proxy-Authorization`` keeps its scheme name only
  (``Bearer redacted``).
- ``Cookie``, ``Set-Cookie``, ``x-api-key``, ``api-key``, ``X-Amz-Security-Token`` and every
  header whose name says it holds a token, a secret, a password, a key or a session
  (:func:`secret_header`) keep their name, with the value ``redacted``.
- The query of a request that is not SigV4-signed is dropped: keys hold paths only, and a query
  is where API keys and tokens travel (``?api_key=...``, ``?access_token=...``).

The body is left as it is: only the AWS decoder (SigV4 requests; it reads no parameter the
service model marks sensitive) and the model API reader (the ``model`` field) look at it, and
neither keeps it.
"""

from __future__ import annotations

import re

from . import sigv4
from .httprequest import CapturedRequest

REDACTED = sigv4.REDACTED
_AUTH = ("authorization", "proxy-authorization")
_SECRET_NAMES = frozenset({"cookie", "set-cookie", "x-api-key", "api-key", "apikey", "x-amz-security-token",
                           "x-goog-api-key", "x-auth-token", "x-access-token", "x-csrf-token",
                           "x-xsrf-token", "private-token", "x-vault-token", "x-session-token",
                           "ocp-apim-subscription-key"})
_SECRET_WORDS = re.compile(r"(^|[-_])(token|secret|password|passwd|credential|credentials|session|"
                           r"api[-_]?key|auth|signature)($|[-_])", re.I)
_KNOWN_SCHEMES = ("Bearer", "Basic", "Digest", "Negotiate", "NTLM", "AWS", "Token")


def secret_header(name: str) -> bool:
    """Whether a header's value is treated as a credential (by name)."""
    n = name.lower()
    return n in _AUTH or n in _SECRET_NAMES or bool(_SECRET_WORDS.search(n))


def sigv4_signed(request: CapturedRequest) -> bool:
    """Signed with SigV4 or SigV4a, in the Authorization header or a presigned query."""
    for k, v in request.headers:
        if k.lower() == "authorization" and v.strip().split(" ", 1)[0] in sigv4.ALGORITHMS:
            return True
    q = request.query.lower()
    return "x-amz-algorithm=" in q or "x-amz-credential=" in q or "x-amz-signature=" in q


def _scheme_only(value: str) -> str:
    scheme = value.strip().split(" ", 1)[0]
    return f"{scheme} {REDACTED}" if scheme in _KNOWN_SCHEMES else REDACTED


def redact(request: CapturedRequest, key: bytes) -> CapturedRequest:
    """The request with every credential removed (see the module docstring); ``key`` is the
    sensor's key for hashing AWS access key ids."""
    signed = sigv4_signed(request)
    if signed:
        request = sigv4.redact(request, key)
    headers = []
    for k, v in request.headers:
        lk = k.lower()
        if lk in _AUTH:
            if not (signed and lk == "authorization"):
                v = _scheme_only(v)
        elif secret_header(k) and not (signed and lk == "x-amz-security-token"):
            v = REDACTED
        headers.append((k, v))
    target = request.target if signed else request.path
    return request.with_changes(headers=tuple(headers), target=target)


__all__ = ["REDACTED", "redact", "secret_header", "sigv4_signed"]
