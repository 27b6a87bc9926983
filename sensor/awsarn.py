"""ARNs as they appear in behaviour keys: literal text encoded, undetermined parts marked.

An ARN in a behaviour key is ``arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE``, where

- every character of a name that came from a request (a bucket, an object key, a table name) is
  kept when it is printable ASCII other than ``%``, ``*``, ``?`` and ``$``, and written as
  ``%XX`` (its UTF-8 bytes) otherwise, so a key never contains a space, a control character or
  a wildcard character that came from data;
- a bare ``?`` stands for something the request did not determine: a whole field
  (``arn:aws:dynamodb:us-east-1::table/?`` when the table name was cut from the capture), or one
  character each (the six random characters that end a Secrets Manager secret's ARN when the
  request named the secret by name: ``secret:prod/db-??????``);
- an empty account field in a service whose ARNs carry one means the request named no account:
  the resource belongs to the caller's own account (DynamoDB ``TableName``, SQS ``QueueName``).

Derived policies use the same encoding for their resource patterns, with ``*`` and ``?`` as IAM
wildcards; compiling a document decodes ``%XX`` and escapes literal ``*``, ``?`` and ``$``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNDETERMINED = "?"
_SAFE = frozenset(chr(c) for c in range(0x21, 0x7F)) - set("%*?$")
_PCT_RE = re.compile(r"%([0-9A-F]{2})")


def literal(text: str) -> str:
    """Encode request-supplied text for a behaviour-key ARN."""
    out = []
    for ch in text:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def decode(text: str) -> str:
    """The characters an encoded name stands for (``%XX`` decoded as UTF-8)."""
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "%":
            m = _PCT_RE.match(text, i)
            if not m:
                raise ValueError(f"bad percent escape at {i} in {text!r}")
            raw.append(int(m.group(1), 16))
            i += 3
        else:
            raw.extend(text[i].encode("utf-8"))
            i += 1
    return raw.decode("utf-8")


@dataclass(frozen=True)
class Arn:
    partition: str
    service: str
    region: str
    account: str
    resource: str

    @classmethod
    def parse(cls, text: str) -> "Arn":
        parts = text.split(":", 5)
        if len(parts) != 6 or parts[0] != "arn" or not parts[2]:
            raise ValueError(f"{text!r} is not an ARN (arn:partition:service:region:account:resource)")
        return cls(*parts[1:])

    def __str__(self) -> str:
        return f"arn:{self.partition}:{self.service}:{self.region}:{self.account}:{self.resource}"

    @property
    def determined(self) -> bool:
        return UNDETERMINED not in str(self)

