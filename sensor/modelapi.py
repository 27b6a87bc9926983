"""Model API requests: which model a request asks for, from OpenAI-compatible and Anthropic shapes.

The ``model`` of a model API request is a fingerprint input of the workload (the policy was
derived for an agent driving that model; a different model is a different agent). It is read
from the JSON body the capture kept, which may be cut (the capture is bounded): the body is
scanned, not parsed whole, and ``model`` is taken only when it is a top-level key whose string
value lies complete inside what was captured. A body cut before it, a nested ``model`` or a
non-string value gives no model, never a guess.

Shapes:

- OpenAI-compatible: ``POST`` to a path ending in ``/chat/completions``, ``/completions``,
  ``/responses``, ``/embeddings``, ``/moderations``, ``/images/generations``,
  ``/audio/speech`` or ``/audio/transcriptions`` (any prefix: ``/v1``, ``/openai/deployments/x``);
- Anthropic: ``POST`` to ``/v1/messages``, ``/v1/messages/count_tokens`` or ``/v1/complete``.

Pure: requests in, a :class:`ModelCall` or None out.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .httprequest import CapturedRequest, DuplicateHeader

FINGERPRINT_KEY = "model"
MAX_MODEL = 200

_OPENAI = re.compile(r"/(chat/completions|completions|responses|embeddings|moderations|images/generations|"
                     r"audio/speech|audio/transcriptions)/?$")
_ANTHROPIC = re.compile(r"^/v1/(messages|messages/count_tokens|complete)/?$")
_WS = b" \t\r\n"


@dataclass(frozen=True)
class ModelCall:
    api: str        # openai | anthropic
    model: str | None  # None: the request's shape is a model API's, its model was not read
    reason: str = ""


def _skip_ws(b: bytes, i: int) -> int:
    while i < len(b) and b[i] in _WS:
        i += 1
    return i


def _string_end(b: bytes, i: int) -> int | None:
    """Index after the JSON string starting at b[i] == '"', None when it is cut."""
    i += 1
    while i < len(b):
        c = b[i]
        if c == 0x5C:  # backslash
            i += 2
            continue
        if c == 0x22:
            return i + 1
        i += 1
    return None


def top_level_string(body: bytes, name: str) -> tuple[str | None, str]:
    """The string value of top-level key ``name`` of a JSON object prefix, and why not if None."""
    i = _skip_ws(body, 0)
    if i >= len(body) or body[i] != 0x7B:
        return None, "the body is not a JSON object"
    depth, i = 0, i
    expect_key = False
    while i < len(body):
        c = body[i]
        if c == 0x22:
            end = _string_end(body, i)
            if end is None:
                return None, f"the body was cut before {name!r}"
            if depth == 1 and expect_key:
                key = body[i:end]
                j = _skip_ws(body, end)
                if j < len(body) and body[j] == 0x3A:
                    j = _skip_ws(body, j + 1)
                    try:
                        k = json.loads(key)
                    except ValueError:
                        return None, "the body is not valid JSON"
                    if k == name:
                        if j >= len(body):
                            return None, f"the body was cut in {name!r}"
                        if body[j] != 0x22:
                            return None, f"{name!r} is not a string"
                        vend = _string_end(body, j)
                        if vend is None:
                            return None, f"the body was cut in {name!r}"
                        try:
                            return json.loads(body[j:vend]), ""
                        except ValueError:
                            return None, "the body is not valid JSON"
                    expect_key = False
                    i = j
                    continue
            i = end
            continue
        if c in (0x7B, 0x5B):
            depth += 1
            expect_key = c == 0x7B and depth == 1
        elif c in (0x7D, 0x5D):
            depth -= 1
            if depth == 0:
                return None, f"no top-level {name!r}"
        elif c == 0x2C and depth == 1:
            expect_key = True
        i += 1
    return None, f"the body was cut before {name!r}"


def model_call(request: CapturedRequest) -> ModelCall | None:
    """The model API call a request is, or None when its shape is no model API's."""
    if request.method != "POST":
        return None
    path = request.path
    if _ANTHROPIC.match(path):
        api = "anthropic"
    elif _OPENAI.search(path):
        api = "openai"
    else:
        return None
    try:
        ctype = (request.header("Content-Type") or "").lower()
        encoding = (request.header("Content-Encoding") or "").lower()
    except DuplicateHeader as e:
        return ModelCall(api, None, str(e))
    if encoding and encoding != "identity":
        return ModelCall(api, None, f"the body is {encoding}-encoded")
    if "json" not in ctype:
        return ModelCall(api, None, f"the body is not JSON ({ctype or 'no Content-Type'})")
    model, why = top_level_string(request.body, "model")
    if model is None:
        return ModelCall(api, None, why)
    if not model or len(model) > MAX_MODEL or any(ord(ch) < 0x20 for ch in model):
        return ModelCall(api, None, "the model name is empty, too long or has control characters")
    return ModelCall(api, model)


__all__ = ["FINGERPRINT_KEY", "ModelCall", "model_call", "top_level_string"]
