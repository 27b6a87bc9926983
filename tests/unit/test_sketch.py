"""The HyperLogLog estimate of what the kernel dropped beyond a cgroup's caps."""

import random

import pytest

from sensor import sketch
from sensor.mirrors import SKETCH_REGISTERS


def _sketch_of(n: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    regs = bytearray(SKETCH_REGISTERS)
    for _ in range(n):
        sketch.add(regs, rng.getrandbits(64))
    return bytes(regs)


def test_an_empty_sketch_is_zero():
    assert sketch.estimate(bytes(SKETCH_REGISTERS)) == 0


@pytest.mark.parametrize("n", [1, 5, 50, 300, 5_000, 20_000])
def test_estimates_are_within_three_standard_errors(n):
    # 1.04 / sqrt(128) is 9 %; small counts are exact or nearly so (linear counting)
    for seed in range(3):
        est = sketch.estimate(_sketch_of(n, seed))
        assert abs(est - n) <= max(1, 0.28 * n), (n, seed, est)


def test_the_same_key_twice_counts_once():
    regs = bytearray(SKETCH_REGISTERS)
    for _ in range(10):
        sketch.add(regs, 0x9E3779B97F4A7C15)
    assert sketch.estimate(bytes(regs)) == 1


def test_a_sketch_has_the_kernels_size():
    with pytest.raises(ValueError):
        sketch.estimate(bytes(10))


def test_the_rank_is_one_plus_the_trailing_zeros_above_the_index_bits():
    regs = bytearray(SKETCH_REGISTERS)
    sketch.add(regs, (0b1000 << 7) | 5)  # register 5, three trailing zeros: rank 4
    assert regs[5] == 4
    sketch.add(regs, 5)  # no bits above the index: the guard bit gives the largest rank
    assert regs[5] == 64 - 7 + 1
