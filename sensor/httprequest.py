"""A captured HTTP/1.x request: what the request capture hands to the decoders of each protocol.

The capture is bounded: the request line and headers come first and are complete, the body is at
most what was left of the capture's budget. ``truncated`` says that ``body`` is a prefix of what
was sent, so a decoder never mistakes a cut body for a whole one.

Header names keep their case as sent; lookups ignore case. A header that matters for decoding and
appears more than once is ambiguous (which one a server honours is not knowable from here), so
:meth:`CapturedRequest.header` refuses it rather than picking one.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl


class DuplicateHeader(ValueError):
    """A header that must appear at most once appeared several times."""


@dataclass(frozen=True)
class CapturedRequest:
    method: str                              # "GET", as sent
    host: str                                # the Host header (authority), port included when sent
    target: str                              # request-target: path and query, percent-encoded as sent
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    truncated: bool = False                  # body is a prefix of the body that was sent

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), None when absent; :class:`DuplicateHeader`
        when it was sent more than once."""
        lname = name.lower()
        values = [v for k, v in self.headers if k.lower() == lname]
        if len(values) > 1:
            raise DuplicateHeader(f"header {name} sent {len(values)} times")
        return values[0] if values else None

    def has_header(self, name: str) -> bool:
        lname = name.lower()
        return any(k.lower() == lname for k, _ in self.headers)

    @property
    def path(self) -> str:
        """The percent-encoded path, without the query."""
        return self.target.split("?", 1)[0] or "/"

    @property
    def query(self) -> str:
        """The raw query string, without the ``?``."""
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    def query_pairs(self) -> list[tuple[str, str]]:
        """Decoded query parameters in order; a key without ``=`` has the value ``""``."""
        return parse_qsl(self.query, keep_blank_values=True)

    def with_changes(self, **changes) -> "CapturedRequest":
        fields = {"method": self.method, "host": self.host, "target": self.target,
                  "headers": self.headers, "body": self.body, "truncated": self.truncated}
        fields.update(changes)
        return CapturedRequest(**fields)
