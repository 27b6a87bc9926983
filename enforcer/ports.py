"""The ports of an egress rule, one shape for address and name rules alike: exact ports, or one
inclusive range. Checked and normalised once (:func:`checked`), written as entry text
(``443,8443`` or ``8000-8100``, :func:`text`) and as policy fields (``ports`` or ``portRange``,
:func:`fields`). Pure."""

from __future__ import annotations

from typing import Iterable


class PortsError(ValueError):
    """Ports that are not a port set; the message names the field (``ports:``, ``portRange:``)."""


def checked(ports: Iterable, port_range: tuple | None) -> tuple[tuple[int, ...], tuple[int, int] | None]:
    """Sorted unique ports and the range as integers; exactly one of them is given."""
    out = tuple(sorted(set(int(p) for p in ports)))
    for p in out:
        if not 0 < p < 65536:
            raise PortsError(f"ports: {p} is not a port (1-65535)")
    if port_range is not None:
        lo, hi = (int(x) for x in port_range)
        if not 0 < lo <= hi < 65536:
            raise PortsError(f"portRange: {lo}-{hi} is not a port range (1 <= min <= max <= 65535)")
        if out:
            raise PortsError("ports: give either ports or portRange, not both")
        return out, (lo, hi)
    if not out:
        raise PortsError("ports: empty (give ports or portRange)")
    return out, None


def text(ports: tuple[int, ...], port_range: tuple[int, int] | None) -> str:
    if port_range is not None:
        return f"{port_range[0]}-{port_range[1]}"
    return ",".join(str(p) for p in ports)


def fields(ports: tuple[int, ...], port_range: tuple[int, int] | None) -> dict:
    if port_range is not None:
        return {"portRange": {"min": port_range[0], "max": port_range[1]}}
    return {"ports": list(ports)}
