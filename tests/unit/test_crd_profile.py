"""WorkloadProfile objects: names, labels, compact form, chunking and size limits, decoding errors."""

from __future__ import annotations

import base64
import json
import re
import zlib

import msgpack
import pytest

from sensor.workloadprofile import (
    DEFAULT_CHUNK_SIZE, ENCODING, LABEL_CHUNK_COUNT, LABEL_CHUNK_INDEX, LABEL_NODE, LABEL_WORKLOAD,
    MAX_CHUNKS, ProfileCRError, assemble, contribution_to_crs, decode_contribution,
    encode_contribution, label_value, object_name, profile_to_crs,
)
from sensor.profile import Profile
from sensor.workload import Workload

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
W = Workload("agents", "Deployment", "researcher", "main")
ETCD_LIMIT = int(1.5 * 1024 * 1024)


def big_profile(node: str = "node-a", n_exec: int = 2048, n_egress: int = 4096) -> Profile:
    """A profile at the default caps: every exec and egress slot filled with distinct keys."""
    p = Profile(W)
    c = p.node(node)
    for s in range(20):
        sid = f"{node}-session-{s}"
        c.open_session(sid, 1000.0 + s, {"container_id": f"{s:064x}", "pod_uid": f"uid-{s}"})
        for i in range(s, n_exec, 20):
            c.observe(sid, f"exec:/opt/agent/tools/bin/tool-{i:05d}", 1 + i % 7, 1000.0 + s + i / 1e4)
        for i in range(s, n_egress, 20):
            c.observe(sid, f"connect:tcp:10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:{1024 + i}",
                      1 + i % 5, 1000.0 + s + i / 1e5)
        c.close_session(sid, 2000.0 + s)
    c.touch(3000.0)
    return p


@pytest.mark.parametrize("workload,node", [
    (W, "node-a"),
    (Workload("Team_Alpha", "StatefulSet", "A.Very.Long.Name." * 12, "sidecar-proxy"), "ip-10-0-3-7.ec2.internal"),
    (Workload("host", "Unit", "/system.slice/agent.service", "main"), "x" * 253),
    (Workload("---", "Deployment", "...", "..."), "..."),
])
def test_names_and_labels_are_valid_and_distinct(workload, node):
    name = object_name(workload, node)
    assert DNS_LABEL.match(name) and len(name) <= 63
    other = object_name(Workload(workload.namespace, "Job", workload.name, workload.container), node)
    assert other != name  # the kind is part of the hash even when the stem is the same
    p = Profile(workload)
    c = p.node(node)
    c.open_session("s", 1.0)
    c.observe("s", "syscall:read", 1, 1.0)
    for obj in contribution_to_crs(workload, c, chunk_size=64):
        assert DNS_LABEL.match(obj["metadata"]["name"]) and len(obj["metadata"]["name"]) <= 63
        for k, v in obj["metadata"]["labels"].items():
            assert LABEL_VALUE.match(v) and len(v) <= 63, (k, v)


def test_label_value_hashes_only_what_does_not_fit():
    assert label_value("node-a") == "node-a"
    long = label_value("n" * 64)
    assert long.startswith("h-") and len(long) <= 63 and long != label_value("n" * 65)


def test_compact_form_is_documented_msgpack_zlib_base64_and_deterministic():
    p = big_profile(n_exec=50, n_egress=50)
    c = p.nodes["node-a"]
    data = encode_contribution(W, c)
    payload = msgpack.unpackb(zlib.decompress(base64.b64decode(data)), raw=False, strict_map_key=False)
    assert payload["schema"] == 2 and payload["workload"] == W.to_dict()
    assert payload["contribution"] == c.pack(compact=True)
    assert encode_contribution(W, c) == data
    w, back = decode_contribution(data)
    assert w == W and back.pack(compact=True) == c.pack(compact=True)
    assert back.behaviours == c.behaviours and back.sessions == c.sessions
    obj = contribution_to_crs(W, c)[0]
    assert obj["spec"]["encoding"] == ENCODING
    assert obj["spec"]["summary"]["behaviours"] == len(c.behaviours)
    assert obj["spec"]["summary"]["execs"] == 50 and obj["spec"]["summary"]["egress"] == 50


def test_profile_at_default_caps_fits_etcd_and_round_trips():
    p = big_profile()
    objs = profile_to_crs(p)
    for obj in objs:
        assert len(json.dumps(obj)) < ETCD_LIMIT - 256 * 1024  # room for managedFields and status
    assert assemble(objs).profiles[W].pack() == p.pack()


def test_chunking_splits_labels_and_reassembles():
    p = big_profile(n_exec=400, n_egress=400)
    objs = profile_to_crs(p, chunk_size=4096)
    assert len(objs) > 3
    count = len(objs)
    (digest,) = {o["spec"]["chunk"]["digest"] for o in objs}
    size = sum(len(o["spec"]["data"]) for o in objs)
    for i, obj in enumerate(objs):
        assert obj["spec"]["chunk"] == {"index": i, "count": count, "digest": digest, "size": size}
        assert obj["metadata"]["labels"][LABEL_CHUNK_INDEX] == str(i)
        assert obj["metadata"]["labels"][LABEL_CHUNK_COUNT] == str(count)
        assert len(obj["spec"]["data"]) <= 4096
        assert ("summary" in obj["spec"]) == (i == 0)
    assert objs[0]["metadata"]["name"] == object_name(W, "node-a")
    assert len({o["metadata"]["name"] for o in objs}) == count
    assert assemble(list(reversed(objs))).profiles[W].pack() == p.pack()


def test_oversized_profile_is_refused_with_context():
    p = big_profile(n_exec=300, n_egress=300)
    with pytest.raises(ProfileCRError, match=f"more than {MAX_CHUNKS}"):
        contribution_to_crs(W, p.nodes["node-a"], chunk_size=16)


def test_a_tampered_chunk_is_reported_and_other_nodes_still_merge():
    a, b = big_profile("node-a", 60, 60), big_profile("node-b", 30, 30)
    objs = profile_to_crs(a, chunk_size=512) + profile_to_crs(b)
    tail = next(o for o in objs if o["spec"]["node"] == "node-a" and o["spec"]["chunk"]["index"] == 2)
    tail["spec"]["data"] = tail["spec"]["data"][::-1]
    assembly = assemble(objs)
    assert sorted(assembly.profiles[W].nodes) == ["node-b"]
    assert [p.reason for p in assembly.problems] == ["chunk data does not match its digest"]


def test_tails_of_an_older_version_are_ignored():
    old, new = big_profile("node-a", 60, 60), big_profile("node-a", 80, 60)
    new.nodes["node-a"].touch(4000.0)
    old_objs = profile_to_crs(old, chunk_size=512)
    new_objs = profile_to_crs(new, chunk_size=512)
    # the writer has updated the head but not yet deleted the old tails
    mixed = new_objs + old_objs[1:]
    assembly = assemble(mixed)
    assert assembly.problems == []
    assert assembly.profiles[W].pack() == new.pack()


@pytest.mark.parametrize("mutate,reason", [
    (lambda o: o["spec"].update(encoding="json"), "unknown encoding"),
    (lambda o: o["spec"].pop("workload"), "malformed spec"),
    (lambda o: o["spec"]["chunk"].update(count=2), "incomplete chunk set"),
    (lambda o: o.update(kind="Pod"), "not a WorkloadProfile"),
])
def test_malformed_objects_are_reported(mutate, reason):
    p = big_profile(n_exec=5, n_egress=5)
    (obj,) = profile_to_crs(p)
    mutate(obj)
    assembly = assemble([obj])
    assert W not in assembly.profiles
    assert len(assembly.problems) == 1 and reason in assembly.problems[0].reason


def test_payload_for_another_workload_is_refused():
    p = big_profile(n_exec=5, n_egress=5)
    (obj,) = profile_to_crs(p)
    other = Workload("agents", "Deployment", "writer", "main")
    obj["spec"]["workload"] = other.to_dict()
    assembly = assemble([obj])
    assert assembly.profiles == {}
    assert "payload is for agents/Deployment/researcher/main" in assembly.problems[0].reason


def test_decode_rejects_garbage_and_other_schemas():
    with pytest.raises(ProfileCRError, match="does not decode"):
        decode_contribution("not base64 at all!")
    raw = base64.b64encode(zlib.compress(msgpack.packb({"schema": 99}))).decode()
    with pytest.raises(ProfileCRError, match="unsupported payload schema 99"):
        decode_contribution(raw)


def test_labels_select_by_workload_and_node():
    p = big_profile(n_exec=5, n_egress=5)
    (obj,) = profile_to_crs(p)
    labels = obj["metadata"]["labels"]
    assert labels[LABEL_NODE] == "node-a"
    assert len(labels[LABEL_WORKLOAD]) == 40
    assert labels["envelope.dev/workload-namespace"] == "agents"
    assert labels["envelope.dev/workload-name"] == "researcher"
    assert DEFAULT_CHUNK_SIZE + 64 * 1024 < ETCD_LIMIT
