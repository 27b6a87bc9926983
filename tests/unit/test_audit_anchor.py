"""The audit log's heads anchored off the node, against the fake API server: the daemon's anchor
job (built by the daemon's own wiring) publishes each new authenticated head as a checkpoint of
the node's AuditAnchor, never a forged or rolled-back one, and ``envelope audit verify`` with the
cluster configured catches what root on the node can do to the local files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog

from enforcer import audit
from enforcer.auditanchor import MAX_CHECKPOINTS, PLURAL, ClusterAnchors, anchor_name
from envelope.anchor_job import AnchorJob
from envelope.cli import main
from envelope.config import Config
from envelope.daemon import build_cluster, cluster_client
from envelope.metrics import Metrics
from sensor.kubeapi import Backoff, api_client
from tests.fakes.apiserver import FakeApiServer

NODE = "worker-2"
NS = "envelope-system"


@pytest.fixture(autouse=True)
def _plain_logging():
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def kube(tmp_path):
    with FakeApiServer(bookmark_interval=0.2) as api:
        api.kubeconfig_path = api.kubeconfig(tmp_path / "kubeconfig")
        yield api


def anchors(kube, node=NODE) -> ClusterAnchors:
    return ClusterAnchors.from_api_client(api_client(kube.kubeconfig_path), node, NS,
                                          backoff=Backoff(attempts=2, base=0.01, cap=0.02))


def fill(state, n):
    for i in range(n):
        audit.append(state, "mode.set", workload="default/Deployment/a/main", reason=f"r{i}", actor="t")


def published(kube, node=NODE) -> dict[int, str]:
    out = {}
    for obj in kube.objects("envelope.dev", PLURAL).values():
        if obj["spec"]["node"] == node:
            out.update({int(k): v["hash"] for k, v in obj["spec"]["checkpoints"].items()})
    return out


def test_the_daemons_anchor_job_publishes_each_new_head(kube, tmp_path):
    state = tmp_path / "state"
    cfg = Config(state_dir=state, node_name=NODE, cluster="on", kubeconfig=kube.kubeconfig_path,
                 profile_namespace=NS)
    metrics = Metrics()
    cluster = build_cluster(cfg, metrics, cluster_client(cfg), backoff=Backoff(attempts=2, base=0.01, cap=0.02))
    job = cluster.anchor
    assert isinstance(job, AnchorJob)
    job.round()
    assert published(kube) == {}  # no log yet: nothing to anchor
    fill(state, 3)
    job.round()
    job.round()  # unchanged head: nothing new
    last = audit.read(state)[-1]
    assert published(kube) == {3: last["hash"]}
    fill(state, 2)
    job.round()
    assert published(kube) == {3: last["hash"], 5: audit.read(state)[-1]["hash"]}
    obj = kube.object("envelope.dev", PLURAL, NS, anchor_name(NODE, 0))
    assert obj["spec"]["node"] == NODE and obj["spec"]["epoch"] == 0
    assert job.stats["published"] == 2
    assert metrics.anchored_seq._value.get() == 5


def test_a_forged_or_rolled_back_head_is_never_anchored(kube, tmp_path):
    state = tmp_path / "state"
    fill(state, 3)
    job = AnchorJob(state, anchors(kube))
    job.round()
    good = published(kube)
    # a head written without the key
    head = json.loads(audit.head_path(state).read_text())
    audit.head_path(state).write_text(json.dumps(dict(head, seq=4, hash="f" * 64)))
    job.round()
    assert published(kube) == good and job.stats["refused"] == 1
    # root rolls the log back to 2 entries, with the key: the anchor job refuses to go back
    key = audit.read_key(state)
    es = [json.loads(x) for x in audit.log_path(state).read_text().splitlines()][:2]
    audit.log_path(state).write_text("".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in es))
    audit.head_path(state).write_text(json.dumps(
        {"seq": 2, "hash": es[-1]["hash"], "mac": audit.head_mac(key, 2, es[-1]["hash"])}))
    job.round()
    assert published(kube) == good and job.stats["refused"] == 2


def test_an_epoch_full_of_checkpoints_starts_the_next(kube, tmp_path, monkeypatch):
    import enforcer.auditanchor as aa
    monkeypatch.setattr(aa, "MAX_CHECKPOINTS", 2)
    state = tmp_path / "state"
    job = AnchorJob(state, anchors(kube))
    for _ in range(5):
        fill(state, 1)
        job.round()
    assert sorted(published(kube)) == [1, 2, 3, 4, 5]
    names = sorted(kube.objects("envelope.dev", PLURAL))
    assert [n for _ns, n in names] == [anchor_name(NODE, e) for e in (0, 1, 2)]
    assert MAX_CHECKPOINTS == 1000  # the CRD's maxProperties


def _verify(kube, state, capsys, *extra):
    cfg = Path(state).parent / "config.yaml"
    cfg.write_text(f"cluster: 'on'\nkubeconfig: {kube.kubeconfig_path}\nnode_name: {NODE}\n"
                   f"profile_namespace: {NS}\n")
    code = main(["--config", str(cfg), "--state-dir", str(state), "audit", "verify", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_with_the_cluster_catches_a_consistent_rewrite_by_root(kube, tmp_path, capsys):
    state = tmp_path / "state"
    fill(state, 4)
    AnchorJob(state, anchors(kube)).round()
    code, out, _ = _verify(kube, state, capsys)
    assert code == 0 and "4 entries, chain intact; 1 checkpoints anchored off the node agree" in out
    # root rewrites history with the key and writes a consistent head
    key = audit.read_key(state)
    es = [json.loads(x) for x in audit.log_path(state).read_text().splitlines()]
    prev = audit.GENESIS
    for e in es:
        if e["seq"] == 2:
            e["reason"] = "never happened"
        e["prev"] = prev
        e["hash"] = prev = audit.entry_hash(e)
        e["mac"] = audit.entry_mac(key, e["hash"])
    audit.log_path(state).write_text("".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in es))
    audit.head_path(state).write_text(json.dumps({"seq": 4, "hash": prev, "mac": audit.head_mac(key, 4, prev)}))
    assert audit.verify(state).ok  # the node alone cannot tell
    code, _, err = _verify(kube, state, capsys)
    assert code == 1 and "entry 4 differs from the checkpoint published off the node" in err


def test_verify_with_the_cluster_catches_everything_deleted(kube, tmp_path, capsys):
    state = tmp_path / "state"
    fill(state, 2)
    AnchorJob(state, anchors(kube)).round()
    for p in (audit.log_path(state), audit.head_path(state), audit.key_path(state)):
        p.unlink()
    code, _, err = _verify(kube, state, capsys)
    assert code == 1 and "checkpoint seq 2 published off the node" in err


def test_an_unreachable_anchor_is_a_problem_not_a_pass(kube, tmp_path, capsys):
    state = tmp_path / "state"
    fill(state, 1)
    kube.mode = "down"
    code, _, err = _verify(kube, state, capsys)
    assert code == 1 and "off-node anchor could not be read" in err


def test_another_nodes_checkpoints_do_not_count(kube, tmp_path):
    state = tmp_path / "state"
    fill(state, 2)
    AnchorJob(state, anchors(kube, "worker-9")).round()
    got = anchors(kube).read()
    assert got.checkpoints == [] and got.epoch == -1
