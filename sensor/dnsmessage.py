"""DNS messages: a pure parser of the wire format (RFC 1035), enough to read what a resolver
answered a workload.

:func:`parse` takes the bytes of one message (UDP payload, or a TCP message without its length
prefix) and returns a :class:`Message`: its header bits, the question, and the answer section's
A, AAAA and CNAME records with their TTLs, names decompressed and lower-cased. A message that
was cut short (the sensor captures a bounded prefix) keeps what parsed and says ``truncated``;
anything else that does not parse raises :class:`DnsParseError`. Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

TYPE_A = 1
TYPE_CNAME = 5
TYPE_AAAA = 28
TYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
              33: "SRV", 65: "HTTPS", 64: "SVCB"}
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
MAX_POINTERS = 32  # compression pointers followed per name: a loop is malformed, not slow


class DnsParseError(ValueError):
    """Bytes that are not a DNS message."""


@dataclass(frozen=True)
class Record:
    name: str  # owner, lower case, no trailing dot
    type: int
    ttl: int
    data: str  # an address for A/AAAA, the target name for CNAME, "" otherwise


@dataclass(frozen=True)
class Message:
    id: int
    response: bool
    opcode: int
    rcode: int
    qname: str
    qtype: int
    answers: tuple[Record, ...] = ()
    truncated: bool = False  # the bytes ended inside the answer section
    tc: bool = False  # the resolver's TC bit: the full answer needs TCP

    def addresses(self) -> list[tuple[str, int, str]]:
        """``(address, ttl, owner)`` of every A and AAAA record in the answer section."""
        return [(r.data, r.ttl, r.name) for r in self.answers if r.type in (TYPE_A, TYPE_AAAA)]

    def chain(self) -> list[str]:
        """The question name and the CNAME targets reached from it, in order."""
        out = [self.qname]
        targets = {r.name: r.data for r in self.answers if r.type == TYPE_CNAME}
        while out[-1] in targets and targets[out[-1]] not in out and len(out) < 16:
            out.append(targets[out[-1]])
        return out


def _name(buf: bytes, pos: int) -> tuple[str, int]:
    """The name at ``pos`` and the position after it (after its first pointer, if any)."""
    labels: list[str] = []
    end = None
    jumps = 0
    total = 0
    while True:
        if pos >= len(buf):
            raise DnsParseError("name runs past the end of the message")
        n = buf[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(buf):
                raise DnsParseError("compression pointer cut short")
            if end is None:
                end = pos + 2
            jumps += 1
            if jumps > MAX_POINTERS:
                raise DnsParseError("compression pointer loop")
            pos = ((n & 0x3F) << 8) | buf[pos + 1]
            continue
        if n & 0xC0:
            raise DnsParseError(f"label type 0x{n & 0xC0:02x} is not supported")
        pos += 1
        if n == 0:
            break
        label = buf[pos:pos + n]
        if len(label) != n:
            raise DnsParseError("label runs past the end of the message")
        total += n + 1
        if total > 255:
            raise DnsParseError("name longer than 255 bytes")
        labels.append(label.decode("ascii", "backslashreplace").lower())
        pos += n
    return ".".join(labels), (end if end is not None else pos)


def parse(buf: bytes) -> Message:
    """Parse one DNS message (see the module docstring)."""
    if len(buf) < 12:
        raise DnsParseError(f"{len(buf)} bytes is shorter than a DNS header")
    mid, flags, qd, an, _ns, _ar = struct.unpack_from("!HHHHHH", buf, 0)
    if qd != 1:
        raise DnsParseError(f"{qd} questions (one expected)")
    qname, pos = _name(buf, 12)
    if pos + 4 > len(buf):
        raise DnsParseError("question cut short")
    qtype, _qclass = struct.unpack_from("!HH", buf, pos)
    pos += 4
    answers: list[Record] = []
    truncated = False
    for _ in range(an):
        try:
            owner, pos = _name(buf, pos)
        except DnsParseError:
            truncated = True
            break
        if pos + 10 > len(buf):
            truncated = True
            break
        rtype, _rclass, ttl, rdlen = struct.unpack_from("!HHIH", buf, pos)
        pos += 10
        if pos + rdlen > len(buf):
            truncated = True
            break
        rdata = buf[pos:pos + rdlen]
        if ttl & 0x80000000:
            ttl = 0  # RFC 2181 section 8
        if rtype == TYPE_A and rdlen == 4:
            answers.append(Record(owner, rtype, ttl, str(ipaddress.IPv4Address(rdata))))
        elif rtype == TYPE_AAAA and rdlen == 16:
            answers.append(Record(owner, rtype, ttl, ipaddress.IPv6Address(rdata).compressed))
        elif rtype == TYPE_CNAME:
            target, _ = _name(buf, pos)
            answers.append(Record(owner, rtype, ttl, target))
        pos += rdlen
    return Message(mid, bool(flags & 0x8000), (flags >> 11) & 0xF, flags & 0xF, qname, qtype,
                   tuple(answers), truncated, bool(flags & 0x0200))


def query(name: str, qtype: int = TYPE_A, mid: int = 0x1234) -> bytes:
    """A standard query for ``name`` (tests and benchmarks build messages with it)."""
    out = struct.pack("!HHHHHH", mid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        out += bytes([len(label)]) + label.encode("ascii")
    return out + b"\0" + struct.pack("!HH", qtype, 1)


@dataclass
class Answer:
    """What to put in a response built by :func:`response` (tests)."""

    name: str
    type: int
    ttl: int
    data: str
    extra: dict = field(default_factory=dict)


def response(q: bytes, answers: list[Answer], rcode: int = 0) -> bytes:
    """A response to query ``q`` with ``answers`` (owner names written in full, no compression)."""
    mid = struct.unpack_from("!H", q, 0)[0]
    _, qend = _name(q, 12)
    question = q[12:qend + 4]
    out = struct.pack("!HHHHHH", mid, 0x8180 | rcode, 1, len(answers), 0, 0) + question

    def wire(n: str) -> bytes:
        return b"".join(bytes([len(x)]) + x.encode() for x in n.split(".") if x) + b"\0"

    for a in answers:
        if a.type == TYPE_A:
            rdata = ipaddress.IPv4Address(a.data).packed
        elif a.type == TYPE_AAAA:
            rdata = ipaddress.IPv6Address(a.data).packed
        else:
            rdata = wire(a.data)
        out += wire(a.name) + struct.pack("!HHIH", a.type, 1, a.ttl, len(rdata)) + rdata
    return out
