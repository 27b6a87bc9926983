"""The DNS observation extension of the sensor (``bpf/dns.c``) and the attribution of connects
to the names they were resolved from.

:class:`DnsObserver` is a :class:`sensor.probes.Extension`: its two cgroup skb programs, linked
to the root of the cgroup v2 hierarchy for as long as the sensor runs, copy every DNS message
to or from port 53 of any socket into a ring buffer, with the socket's cgroup. The sensor drains
that ring with its own and decodes the records (:class:`sensor.events.DnsMessageEvent`, parsed by
:mod:`sensor.dnsmessage`). A query is the behaviour ``dns:NAME``.

:class:`NameAttributor` keeps, per cgroup, which addresses the DNS answers it received gave for
which name, and until when (TTL plus :data:`GRACE`). The aggregator asks it about each behaviour
(:attr:`sensor.aggregate.Aggregator.attributors`): a ``connect`` or ``send`` to such an address,
within that time, is recorded as ``connect:tcp:api.example.com:443``, the address kept as its
evidence. A connect to an address that no answer explained stays an address behaviour; traffic
to the resolvers themselves (port 53) is never attributed. When several allowed answers gave the
same address, the most recent answer names it.

Ordering: an answer is copied to the ring before the socket can read it, so it was committed
before any connect that used it; the sensor drains its own ring first and the extensions' after
it, then hands the batch out in kernel time order, so the answer is seen first. A connect
counted in the kernel and read with the counters is covered too: the pump drains the rings after
taking the counters and before applying them (:meth:`sensor.pump.Pump.read_counters`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import structlog

from . import kernel
from .aggregate import KeyReading
from .events import DnsMessageEvent
from .kernel import BPF_CGROUP_INET_EGRESS, BPF_CGROUP_INET_INGRESS, Family, Map, Program
from .workload import BehaviourKeyError, name_key, parse_net_key

log = structlog.get_logger(__name__)

SOURCE = kernel.BPF_DIR / "dns.c"
GRACE = 10.0  # seconds an answer keeps explaining its addresses past its TTL (as bpf/egress.c)
MAX_ANSWERS = 65536  # (cgroup, address) pairs remembered; the oldest go first
_ZERO = b"\0\0\0\0"


class NameAttributor:
    """Which name explains a connect (see the module docstring). Pure: fed events and keys."""

    def __init__(self, grace: float = GRACE, capacity: int = MAX_ANSWERS):
        self.grace = grace
        self.capacity = capacity
        # (cgroup id, address) -> (name, received, expires), least recently answered first
        self.answers: OrderedDict[tuple[int, str], tuple[str, float, float]] = OrderedDict()
        self.explained = 0
        self.unexplained = 0

    def on_event(self, event, ts: float) -> None:
        if not isinstance(event, DnsMessageEvent) or event.direction != "answer":
            return
        m = event.message
        if m is None or not m.response or m.rcode != 0 or not m.qname:
            return
        for addr, ttl, _owner in m.addresses():
            key = (event.cgroup_id, addr)
            self.answers.pop(key, None)
            self.answers[key] = (m.qname, ts, ts + ttl + self.grace)
        while len(self.answers) > self.capacity:
            self.answers.popitem(last=False)

    def name_of(self, cgroup_id: int, addr: str, ts: float) -> str | None:
        hit = self.answers.get((cgroup_id, addr))
        if hit is None:
            return None
        name, received, expires = hit
        # A kernel-counted reading's time can trail the answer by the read interval; a connect
        # before the answer arrived cannot be explained by it.
        return name if received - 0.001 <= ts <= expires else None

    def attribute(self, cgroup_id: int, key: str, ts: float) -> tuple[str, str | None]:
        if not key.startswith(("connect:", "send:")):
            return key, None
        try:
            n = parse_net_key(key)
        except BehaviourKeyError:
            return key, None
        if n.port == 53:
            return key, None
        addr = n.addr.compressed
        if n.addr.version == 6 and n.addr.ipv4_mapped is not None:
            addr = str(n.addr.ipv4_mapped)
        name = self.name_of(cgroup_id, addr, ts)
        if name is None:
            self.unexplained += 1
            return key, None
        self.explained += 1
        return name_key(n.kind, n.proto, name, n.port), addr


class DnsObserver:
    """The sensor extension (``sensor.probes.Extension``) of ``bpf/dns.c``."""

    name = "dns"
    rings = ("events",)

    def __init__(self, ringbuf_pages: int = 256):
        if ringbuf_pages < 1 or ringbuf_pages & (ringbuf_pages - 1):
            raise ValueError(f"ringbuf_pages must be a power of two, got {ringbuf_pages}")
        self.ringbuf_pages = ringbuf_pages
        self._lost: Map | None = None

    def family(self, base_cflags: Sequence[str]) -> Family:
        flags = [f for f in base_cflags if f.startswith("-I")] + [
            f"-DDNS_RINGBUF_PAGES={self.ringbuf_pages}"]
        return Family("dns", str(SOURCE), tuple(flags), (
            Program("dns_answer", "cgroup_skb", "cgroup2-root", BPF_CGROUP_INET_INGRESS),
            Program("dns_query", "cgroup_skb", "cgroup2-root", BPF_CGROUP_INET_EGRESS),
        ), ("events", "lost"), fix="needs cgroup skb programs on cgroup v2; run `envelope doctor`")

    def attached(self, loaded: kernel.Loaded, sensor) -> None:
        self._lost = Map(loaded.maps["lost"], "lost")

    def tick(self) -> None:
        pass

    def behaviour_counts(self) -> dict[int, dict[str, KeyReading]]:
        return {}  # every DNS message is announced: queries are counted from the ring

    def attributor(self) -> NameAttributor:
        return NameAttributor()

    def loss(self) -> dict[str, int]:
        return {"ringbuf_full": self._lost.percpu_sum(_ZERO) if self._lost is not None else 0}

    def close(self) -> None:
        self._lost = None
