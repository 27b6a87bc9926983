"""BehaviourTable: the columnar form contributions are published and summed in.

Contributions are built through the recording API; the table's round trip, its merge (against
the pairwise :meth:`BehaviourStats.merged`) and its checks on damaged input are tested through
the code the cluster reader runs (:func:`sensor.workloadprofile.decode_contribution`).
"""

from __future__ import annotations

import base64
import struct
import zlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensor.behaviour_table import BehaviourTable
from sensor.profile import BehaviourStats, NodeContribution, Profile
from sensor.workloadprofile import ProfileCRError, decode_contribution, encode_contribution
from tests.unit.test_merge_properties import W, contributions


def _pairwise(profile: Profile) -> dict[str, BehaviourStats]:
    out: dict[str, BehaviourStats] = {}
    for name in sorted(profile.nodes):
        for key, s in profile.nodes[name].behaviours.items():
            mine = BehaviourStats(s.count, s.sessions, s.first_seen, s.last_seen, s.session_sum, s.session_sumsq,
                                  sorted(f"{name}/{i}" for i in s.session_ids))
            out[key] = mine if key not in out else out[key].merged(mine)
    return dict(sorted(out.items()))


@settings(max_examples=60, deadline=None)
@given(contributions())
def test_a_table_gives_back_the_stats_it_was_made_of(c):
    table = BehaviourTable.from_stats(c.behaviours)
    again = BehaviourTable.unpack(msgpack.unpackb(msgpack.packb(table.pack()), raw=False), -1e12, 1e12)
    assert again.stats() == c.behaviours
    assert list(again.stats()) == sorted(c.behaviours)
    assert msgpack.packb(again.pack()) == msgpack.packb(table.pack()), "the same table packs to the same bytes"
    assert again == table


@settings(max_examples=60, deadline=None)
@given(st.lists(contributions(), min_size=1, max_size=3, unique_by=lambda c: c.node))
def test_the_merged_view_equals_the_pairwise_merge_whether_read_back_or_not(cs):
    p = Profile(W, {c.node: c for c in cs})
    expected = _pairwise(p)
    assert p.behaviours() == expected
    back = Profile(W, {c.node: decode_contribution(encode_contribution(W, c))[1] for c in cs})
    assert all("behaviours" not in vars(n) for n in back.nodes.values() if n.behaviour_table().keys), \
        "a contribution read back keeps its table until something asks for the dict"
    assert back.behaviours() == expected


def test_node_qualified_ids_that_coincide_count_once():
    """``a`` with session ``mcp/s`` and ``a/mcp`` with session ``s`` both give ``a/mcp/s``: the
    pairwise merge unions them as one id, so must the table merge."""
    p = Profile(W)
    for node, sid in (("a", "mcp/s"), ("a/mcp", "s"), ("b", "s")):
        c = p.node(node)
        c.open_session(sid, 10.0)
        c.observe(sid, "mcp:files/read", 2, 11.0)
    merged = p.behaviours()["mcp:files/read"]
    assert merged.session_ids == ["a/mcp/s", "b/s"] and merged.sessions == 3
    assert p.behaviours() == _pairwise(p)


def test_behaviours_without_session_ids_merge_too():
    p = Profile(W)
    for node in ("a", "b"):
        p.node(node).behaviours["syscall:read"] = BehaviourStats(2, 1, 10.0, 11.0)
    assert p.behaviours() == {"syscall:read": BehaviourStats(4, 2, 10.0, 11.0)} == _pairwise(p)


def test_a_contribution_read_back_builds_its_dict_once_and_then_the_dict_counts():
    c = NodeContribution("node-a")
    c.open_session("s1", 100.0)
    for key in ("syscall:read", "exec:/usr/bin/git"):
        c.observe("s1", key, 3, 101.0)
    c.close_session("s1", 102.0)
    _, back = decode_contribution(encode_contribution(W, c))
    assert "behaviours" not in vars(back)
    assert back.behaviours == c.behaviours
    back.open_session("s2", 103.0)
    back.observe("s2", "syscall:read", 4, 104.0)
    table = back.behaviour_table()
    assert {k: s.count for k, s in table.stats().items()} == {
        "exec:/usr/bin/git": 3, "syscall:read": 7}, "the table is made from the dict once the dict exists"


def test_a_payload_an_older_build_wrote_is_still_read():
    c = NodeContribution("node-a")
    c.open_session("s1", 100.0)
    c.observe("s1", "syscall:read", 3, 101.0)
    payload = {"schema": 1, "workload": W.to_dict(), "contribution": c.pack()}
    data = base64.b64encode(zlib.compress(msgpack.packb(payload, use_bin_type=True))).decode()
    w, back = decode_contribution(data)
    assert w == W and back.behaviours == c.behaviours and back.open_sessions == c.open_sessions


def _damaged(change) -> str:
    c = NodeContribution("node-a")
    c.open_session("s1", 100.0)
    for key in ("syscall:read", "syscall:write", "syscall:close"):
        c.observe("s1", key, 3, 101.0)
    payload = {"schema": 2, "workload": W.to_dict(), "contribution": c.pack(compact=True)}
    change(payload["contribution"]["behaviour_table"])
    return base64.b64encode(zlib.compress(msgpack.packb(payload, use_bin_type=True))).decode()


def _set(field, value):
    return lambda t: t.__setitem__(field, value)


def _int32(*values: int) -> bytes:
    return b"".join(v.to_bytes(4, "little", signed=True) for v in values)


@pytest.mark.parametrize("change, message", [
    (_set("counts", b"\x01" * 7), "counts: 7 bytes"),
    (_set("offsets", _int32(0, 2**31 - 1, -2, 3)), "do not cover"),  # differences that wrap in int32
    (_set("ids", ["s2", "s1"]), "session ids are not distinct and sorted"),
    (lambda t: t.__setitem__("times", t["times"][:-8] + struct.pack("<d", -1.0)), "non-negative"),
    (_set("times", [1.0] * 8), "not bytes"),
    (_set("keys", ["syscall:write", "syscall:read", "syscall:close"]), "not distinct and sorted"),
    (_set("offsets", _int32(0, 0, 0, 5)), "do not cover"),
    (_set("index", _int32(0, 0, 7)), "out of range"),
    (_set("index", b"\x00" * 5), "whole number"),
    (_set("times", b"\x00" * 8 + b"\x00\x00\x00\x00\x00\x00\xf8\x7f" + b"\x00" * 8 * 10), "off the calendar"),
    (_set("times", b"\x00" * 8 * 11 + b"\x00\x00\x00\x00\x00\x00\xf8\x7f"), "not a finite"),
    (lambda t: t.__setitem__("counts", (-1).to_bytes(8, "little", signed=True) + t["counts"][8:]), "non-negative"),
])
def test_a_damaged_table_is_refused_with_the_reason(change, message):
    with pytest.raises(ProfileCRError, match=message):
        decode_contribution(_damaged(change))


def test_a_schema_1_count_out_of_the_columns_range_is_refused_when_read():
    for count in (-1, 2**63):
        c = NodeContribution("node-a")
        c.open_session("s1", 100.0)
        c.observe("s1", "syscall:read", 3, 101.0)
        packed = c.pack()
        packed["behaviours"]["syscall:read"][0] = count
        data = base64.b64encode(zlib.compress(msgpack.packb(
            {"schema": 1, "workload": W.to_dict(), "contribution": packed}, use_bin_type=True))).decode()
        with pytest.raises(ProfileCRError, match="negative or past"):
            decode_contribution(data)


def _read_back(p: Profile) -> Profile:
    return Profile(W, {n: decode_contribution(encode_contribution(W, c))[1] for n, c in p.nodes.items()})


def test_counts_sum_exactly_past_int64():
    p = Profile(W)
    for node in ("a", "b", "c"):
        p.node(node).behaviours["syscall:read"] = BehaviourStats(2**63 - 1, 2**62, 10.0, 11.0, 0.0, 0.0, ["s"])
    back = _read_back(p)
    assert all(n.tabled for n in back.nodes.values())
    for view in (p, back):
        merged = view.behaviours()["syscall:read"]
        assert merged.count == 3 * (2**63 - 1) and merged.sessions == 3 * 2**62
    assert back.behaviours() == p.behaviours() == _pairwise(p)


def test_float_sums_add_up_in_node_name_order_as_before():
    """Per-session sums of very different sizes do not add associatively: the columns must add
    them in the order the loop over contributions holding their stats does, bit for bit."""
    import random

    rng = random.Random(5)
    p = Profile(W)
    for n in range(50):
        c = p.node(f"node-{rng.randrange(10**6):06d}")
        for k in ("syscall:read", "syscall:write", "exec:/bin/sh"):
            if rng.random() < 0.8:
                c.behaviours[k] = BehaviourStats(rng.randint(1, 9), 1, 100.0 + n, 200.0 + n,
                                                 rng.choice([1e-9, 1.0, 3.3, 1e16]) * rng.random(),
                                                 rng.choice([1e-12, 7.1, 1e30]) * rng.random(), [f"s{n}"])
    assert not any(n.tabled for n in p.nodes.values())
    looped = p.behaviours()
    assert _read_back(p).behaviours() == looped, "summed in columns, bit for bit the same"


def test_window_and_the_json_view_leave_contributions_read_back_lazy():
    c = NodeContribution("node-a")
    c.open_session("s1", 100.0)
    c.observe("s1", "syscall:read", 3, 150.0)
    c.touch(120.0)
    back = Profile(W, {"node-a": decode_contribution(encode_contribution(W, c))[1]})
    assert back.window() == (100.0, 150.0)
    view = back.to_json()
    assert view["behaviours"][0]["key"] == "syscall:read" and view["window"]["end"] == 150.0
    assert "behaviours" not in vars(back.nodes["node-a"])


def test_recording_and_publishing_never_load_numpy():
    """numpy costs a node's daemon 12 MB and a thread: it is for readers that merge many nodes."""
    import subprocess
    import sys

    code = """
import sys
import envelope.daemon, envelope.metrics, sensor.workloadprofile as wp
from sensor.profile import NodeContribution, Profile
from sensor.workload import Workload
w = Workload("agents", "Deployment", "x", "main")
c = NodeContribution("n")
c.open_session("s", 1.0); c.observe("s", "syscall:read", 2, 2.0); c.close_session("s", 3.0)
p = Profile(w, {"n": c})
p.behaviours(); p.to_json(); wp.contribution_to_crs(w, c)
assert "numpy" not in sys.modules, "numpy was imported"
_, back = wp.decode_contribution(wp.encode_contribution(w, c))
assert "numpy" in sys.modules, "reading back checks the table with numpy"
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
