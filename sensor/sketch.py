"""The HyperLogLog sketch the kernel keeps of the behaviours it could not count.

When a cgroup has as many destinations (or exec paths) in the kernel's counter tables as its
cap allows, further new ones are not stored; ``bpf/sensor.c`` counts their occurrences and
adds each refused key to a sketch of ``SKETCH_REGISTERS`` one-byte registers in the cgroup's
``behaviour_slot``: the register chosen by the low ``SKETCH_INDEX_BITS`` bits of the key's
64-bit hash keeps the largest rank (1 + trailing zeros of the other bits) seen. This module
turns the registers into an estimate of how many distinct keys were refused (Flajolet et al.,
"HyperLogLog", 2007, with the small-range correction; the hash is 64 bits, so no large-range
correction is needed). Standard error about 1.04 / sqrt(128) = 9 %.

Pure: bytes in, a number out. :func:`add` is the kernel's register update, for tests.
"""

from __future__ import annotations

import math

from .mirrors import SKETCH_INDEX_BITS, SKETCH_REGISTERS

_ALPHA = 0.7213 / (1 + 1.079 / SKETCH_REGISTERS)


def estimate(registers: bytes) -> int:
    """Estimated number of distinct keys added to ``registers`` (0 for an empty sketch)."""
    m = len(registers)
    if m != SKETCH_REGISTERS:
        raise ValueError(f"a sketch has {SKETCH_REGISTERS} registers, got {m}")
    zeros = registers.count(0)
    if zeros == m:
        return 0
    raw = _ALPHA * m * m / sum(2.0 ** -r for r in registers)
    if raw <= 2.5 * m and zeros:
        return round(m * math.log(m / zeros))  # linear counting while most registers are empty
    return round(raw)


def add(registers: bytearray, h: int) -> None:
    """What ``sketch_add`` in ``bpf/sensor.c`` does with the 64-bit hash ``h``."""
    idx = h & (SKETCH_REGISTERS - 1)
    w = (h >> SKETCH_INDEX_BITS) | (1 << (64 - SKETCH_INDEX_BITS))
    rank = 1 + ((w & -w).bit_length() - 1)
    registers[idx] = max(registers[idx], rank)
