"""Blind spots of the name (DNS) view of egress, stated per workload with the review
(``decisions.granularity.blindSpots.egress``, beside what the sensor found for other substrates).

What the DNS programs cannot see, they cannot explain, so each of these is a finding, never
ignored (pure: behaviour keys in, one line per finding out, ``KIND: why: keys``):

* ``dns-over-tls``: connects to port 853. Names resolved over DoT are invisible;
  their addresses are never learned, so under enforcement connects to them stay denied.
* ``dns-over-https``: connects to well-known DNS-over-HTTPS resolvers (by name or
  address, on 443). Same consequence as DoT; the HTTPS channel itself may be allowed.
* ``address-without-answer``: connects and sends to addresses no DNS answer to
  this workload explained: hard-coded addresses, ``/etc/hosts`` entries, names resolved where the
  sensor cannot see (nscd or another cache outside the cgroup, DoH/DoT). They stay address
  entries, judged by the address rules only.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from sensor.workload import BehaviourKeyError, parse_name_key, parse_net_key

DOT_PORT = 853
DOH_NAMES = frozenset({
    "dns.google", "dns.google.com", "cloudflare-dns.com", "mozilla.cloudflare-dns.com",
    "one.one.one.one", "1dot1dot1dot1.cloudflare-dns.com", "dns.quad9.net", "dns9.quad9.net",
    "doh.opendns.com", "dns.nextdns.io", "doh.cleanbrowsing.org", "dns.adguard-dns.com",
    "doh.dns.sb", "dns.alidns.com", "doh.pub",
})
DOH_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "1.1.1.1", "1.0.0.1", "8.8.8.8", "8.8.4.4", "9.9.9.9", "149.112.112.112", "208.67.222.222",
    "208.67.220.220", "94.140.14.14", "2606:4700:4700::1111", "2606:4700:4700::1001",
    "2001:4860:4860::8888", "2001:4860:4860::8844", "2620:fe::fe"))
SHOWN = 10


def _item(kind: str, keys: list[str], why: str) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:SHOWN]) + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")
    return f"{kind}: {why}: {shown}"


def blind_spots(keys: Iterable[str]) -> list[str]:
    """The findings for a workload's egress behaviour keys, sorted by kind."""
    keys = list(keys)
    dot, doh, unexplained = [], [], []
    uses_dns = any(k.startswith("dns:") for k in keys)
    for k in keys:
        if not k.startswith(("connect:", "send:")):
            continue
        try:
            n = parse_name_key(k)
            if n.port == DOT_PORT:
                dot.append(k)
            elif n.port == 443 and n.name in DOH_NAMES:
                doh.append(k)
            continue
        except BehaviourKeyError:
            pass
        try:
            a = parse_net_key(k)
        except BehaviourKeyError:
            continue
        if a.port == DOT_PORT:
            dot.append(k)
        elif a.port == 443 and a.addr in DOH_ADDRESSES:
            doh.append(k)
        elif a.port != 53:
            unexplained.append(k)
    out = []
    if dot:
        out.append(_item("dns-over-tls", dot,
                         "DNS over TLS (port 853) inside the workload: its names are invisible and "
                         "their addresses are never learned"))
    if doh:
        out.append(_item("dns-over-https", doh,
                         "a DNS-over-HTTPS resolver: names resolved through it are invisible and "
                         "their addresses are never learned"))
    if unexplained:
        lead = ("destinations no DNS answer to this workload explained (hard-coded addresses, "
                "/etc/hosts, or names resolved outside the sensor's view)" if uses_dns else
                "no DNS query was observed: every destination is an address (hard-coded, "
                "/etc/hosts, or resolved outside the sensor's view, e.g. nscd or DoH)")
        out.append(_item("address-without-answer", unexplained, lead))
    return sorted(out)
