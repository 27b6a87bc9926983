"""Cluster scale, simulated: 5,000 nodes x 200 workloads publishing partial profiles.

Every figure goes through the real publishing and reading code (``sensor.workloadprofile``:
``ClusterProfiles``, ``ProfilePublisher``, ``PublisherThread``, the real ``kubernetes`` client)
to the one fake API server of ``tests/fakes`` (server-side apply with managed fields, as the
real API server stores objects), over HTTP on 127.0.0.1.

Three measurements, each on the part of the cluster that decides it:

* **merge**: one workload's partial profiles from every node (5,000 objects, one per node,
  published through ``ClusterProfiles.publish``), read back and merged as ``envelope derive
  --from-cluster`` and ``envelope cluster profile`` do (paged list by label, chunk reassembly,
  digest check, decode, per-node merge, the summed behaviours). The other 199 workloads' objects
  are not loaded: the reader selects by label, so they cost the API server's index, not the
  reader (the fake is no model of the API server's own cost).
* **writes**: a sample of nodes, each a real ``Aggregator`` with 200 bound workloads and its own
  ``PublisherThread``, through several flush intervals; every API write request (apply, delete)
  for WorkloadProfile objects is counted at the server. A node writes only its own objects, so
  the rate per workload per node does not depend on the number of nodes. Two cases: every
  workload active in every interval (the worst case), and 30 % active.
* **size**: the largest WorkloadProfile object as stored (JSON with ``managedFields``), for the
  realistic contributions above and for a worst case at the default caps (1,024 syscalls named,
  2,048 exec paths, 4,096 egress destinations, 5,000 sessions on the node), which is chunked.
"""

from __future__ import annotations

import json
import random
import sys
import time

from sensor.aggregate import Aggregator
from sensor.kubeapi import Backoff
from sensor.profile import NodeContribution
from sensor.workload import Workload
from sensor.workloadprofile import (LABEL_WORKLOAD, ClusterProfiles, ProfilePublisher, PublisherThread,
                                    collector_paused, assemble, workload_label)

from . import ROOT, progress, summarize

TITLE = "Cluster scale (5,000 nodes x 200 workloads, simulated)"
ETCD_LIMIT = 1.5 * 1024 * 1024
TARGETS = {"merge one workload from all nodes, s": "<= 1",
           "API writes per workload per node per flush": "<= 1",
           "largest WorkloadProfile object, MiB": f"< {ETCD_LIMIT / 1024 / 1024}"}
T0 = 1_767_225_600.0
NS = "envelope-bench"


def params(quick: bool) -> dict:
    return {"nodes": 500 if quick else 5000, "workloads": 200, "sample_nodes": 3 if quick else 10,
            "flushes": 3 if quick else 5, "repeats": 2 if quick else 5}


def method(quick: bool) -> str:
    p = params(quick)
    return (f"Merge: one workload's contribution from each of {p['nodes']:,} nodes published with "
            f"`ClusterProfiles.publish` to the fake API server of `tests/fakes` (in a child process) "
            f"over HTTP, then "
            f"`ClusterProfiles.read` + the summed behaviours timed with `time.perf_counter`, "
            f"{p['repeats']} repeats, median with min-max; its phases (the paged list, the assembly into "
            f"per-node contributions, the sum) in {p['repeats']} repeats of their own. Writes: {p['sample_nodes']} nodes, each a real "
            f"`Aggregator` with {p['workloads']} workloads and its own `PublisherThread`, for "
            f"{p['flushes']} flush intervals; write requests counted by the server. Size: the largest "
            f"object the server stores (JSON, with managedFields), and a contribution at the default caps. "
            f"Seeded, so every run publishes the same objects." + (" Quick mode: fewer nodes." if quick else ""))


def _syscalls() -> list[str]:
    from sensor import syscalls  # the x86_64 table
    return sorted({n for n in (syscalls.lookup(nr) for nr in range(syscalls.NR_SLOTS)) if n})


def contribution(node: str, workload_index: int, rng: random.Random, names: list[str], sessions: int = 2) -> NodeContribution:
    """A realistic partial profile: the workload's replicas on this node."""
    c = NodeContribution(node)
    base = random.Random(workload_index)  # the workload's behaviour is the same on every node
    syscalls = base.sample(names, 90)
    execs = [f"/usr/bin/tool{base.randrange(40)}" for _ in range(12)]
    egress = [f"connect:tcp:10.{workload_index % 200}.{base.randrange(8)}.{base.randrange(1, 250)}:443" for _ in range(20)]
    keys = [f"syscall:{s}" for s in syscalls] + [f"exec:{e}" for e in execs] + egress
    for s in range(sessions):
        sid = f"{node}-w{workload_index}-s{s}"
        start = T0 + rng.random() * 3600
        c.open_session(sid, start, {"pod": f"w{workload_index}-{s}", "node": node})
        for k in keys:
            if rng.random() < 0.9:
                c.observe(sid, k, rng.randint(1, 500), start + rng.random() * 600)
    c.touch(T0 + 7200)
    return c


def _publishes(api) -> int:
    return api.count("PATCH", "/workloadprofiles/") + api.count("DELETE", "/workloadprofiles/")


def largest(api) -> int:
    return max((len(json.dumps(o).encode()) for o in api.objects("envelope.dev", "workloadprofiles").values()),
               default=0)


class ServerProcess:
    """The fake API server in a child process, so the reader's time is the reader's own (in the
    cluster the API server runs elsewhere)."""

    def __enter__(self) -> "ServerProcess":
        import subprocess

        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.apiserver", "1000"], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        assert self.url.startswith("http://127.0.0.1:"), f"fake API server did not start: {self.url!r}"
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def api_client(self):
        from sensor.kubeapi import api_client
        return api_client(host=self.url)


def bench_merge(prm: dict, names: list[str]) -> dict:
    rng = random.Random(11)
    w = Workload("agents", "Deployment", "researcher", "agent")
    with ServerProcess() as api:
        client = api.api_client()
        writer = ClusterProfiles.from_api_client(client, namespace=NS, backoff=Backoff(attempts=3))
        t = time.perf_counter()
        for i in range(prm["nodes"]):
            res = writer.publish(w, contribution(f"node-{i:05d}", 7, rng, names))
            assert res.ok, res.error
            if (i + 1) % 1000 == 0:
                progress(f"cluster: published {i + 1:,} of {prm['nodes']:,} nodes' contributions")
        publish_s = time.perf_counter() - t
        stored = writer._list()
        assert len(stored) == prm["nodes"], f"{len(stored)} objects stored, {prm['nodes']} published"
        size = max(len(json.dumps(o).encode()) for o in stored)
        reader = ClusterProfiles.from_api_client(client, namespace=NS, backoff=Backoff(attempts=3))
        times, merged = [], None
        for _ in range(prm["repeats"]):
            t = time.perf_counter()
            merged, problems = reader.read(w)
            behaviours = merged.behaviours()
            times.append(time.perf_counter() - t)
            assert problems == [], problems
        assert len(merged.nodes) == prm["nodes"] and merged.session_count == 2 * prm["nodes"]
        total = sum(c.behaviours[k].count for c in merged.nodes.values() for k in c.behaviours)
        assert sum(b.count for b in behaviours.values()) == total, "the merge summed every node's counts"
        phases = _phases(reader, w, prm["repeats"])
    s = summarize(times)
    progress(f"cluster: merged {prm['nodes']:,} nodes in {s['median']:.3f} s (median)")
    return {"case": f"merge 1 workload x {prm['nodes']:,} nodes", "objects": len(stored),
            "merge_s": round(s["median"], 4), "merge_min_s": round(s["min"], 4), "merge_max_s": round(s["max"], 4),
            **phases, "behaviours": len(behaviours), "sessions": merged.session_count,
            "publish_per_object_ms": round(1000 * publish_s / prm["nodes"], 2), "largest_object_bytes": size}


def _phases(reader: ClusterProfiles, w: Workload, repeats: int) -> dict:
    """Where a merge's time goes, in repeats of their own on the same objects: the paged list
    (requests, the server's answers, the client's JSON), the assembly (digests, decoding into
    per-node contributions), the sum over nodes. Medians; the collector paused as ``read`` does."""
    out: dict[str, list[float]] = {"list_s": [], "assemble_s": [], "sum_s": []}
    selector = f"{LABEL_WORKLOAD}={workload_label(w)}"
    for _ in range(repeats):
        with collector_paused():
            t0 = time.perf_counter()
            objects = reader._list(selector)
            t1 = time.perf_counter()
            profile = assemble(objects).profiles[w]
            t2 = time.perf_counter()
            profile.behaviours()
            t3 = time.perf_counter()
        for name, v in zip(out, (t1 - t0, t2 - t1, t3 - t2)):
            out[name].append(v)
    return {name: round(summarize(v)["median"], 4) for name, v in out.items()}


def bench_writes(FakeApiServer, prm: dict, names: list[str], active: float) -> dict:
    rng = random.Random(13)
    workloads = [Workload("agents", "Deployment", f"agent-{i:03d}", "main") for i in range(prm["workloads"])]
    syscall_numbers = dict(enumerate(names))
    with FakeApiServer(history=1000) as api:
        nodes = []
        for n in range(prm["sample_nodes"]):
            node = f"node-{n:05d}"
            agg = Aggregator(node, None, syscall_numbers.__getitem__)
            for i, w in enumerate(workloads):
                agg.bind(1000 + i, w, f"{node}-{w.name}", meta={"pod": w.name})
            profiles = ClusterProfiles.from_api_client(api.api_client(), namespace=NS, backoff=Backoff(attempts=3))
            nodes.append((agg, PublisherThread(ProfilePublisher(profiles, node), retry_interval=0.5).start()))
        counters = {(n, i): {} for n in range(len(nodes)) for i in range(len(workloads))}
        writes, changed = 0, 0
        for flush in range(prm["flushes"]):
            before = _publishes(api)
            for n, (agg, publisher) in enumerate(nodes):
                for i in range(len(workloads)):
                    if flush > 0 and rng.random() >= active:
                        continue
                    per = counters[(n, i)]
                    for nr in rng.sample(range(len(names)), 30):
                        per[nr] = per.get(nr, 0) + rng.randint(1, 50)
                    agg.on_counts({1000 + i: dict(per)}, T0 + flush * 10)
                written = agg.flush()
                changed += len(written)
                publisher.publish(agg.profiles, written)
            for _, p in nodes:
                assert p.wait_idle(300), "a publisher did not finish its round"
            writes += _publishes(api) - before
        for _, p in nodes:
            assert p.close() is True
        stored = len(api.names())
        size = largest(api)
    assert stored == prm["sample_nodes"] * prm["workloads"], f"{stored} objects stored"
    opportunities = prm["sample_nodes"] * prm["workloads"] * prm["flushes"]
    progress(f"cluster: {writes:,} writes for {opportunities:,} workload-node-flushes ({active:.0%} active)")
    return {"case": f"writes, {active:.0%} of workloads active per flush", "objects": stored,
            "writes": writes, "workload_node_flushes": opportunities, "changed_flushes": changed,
            "writes_per_workload_node_flush": round(writes / opportunities, 4),
            "writes_per_changed_flush": round(writes / changed, 4) if changed else None,
            "largest_object_bytes": size}


def bench_worst_case(FakeApiServer, names: list[str]) -> dict:
    """A contribution at the default caps with many sessions: chunked under etcd's limit."""
    rng = random.Random(17)
    w = Workload("batch", "CronJob", "nightly-eval", "main")
    c = NodeContribution("node-00000")
    keys = ([f"syscall:{s}" for s in names] + [f"exec:/opt/tools/bin/t{i}" for i in range(2048)]
            + [f"connect:tcp:10.{i // 250 % 250}.{i % 250}.{1 + i % 200}:{443 + i % 7}" for i in range(4096)])
    for s in range(5000):
        sid = f"cron-{s:05d}"
        start = T0 + 60 * s
        c.open_session(sid, start, {"pod": f"nightly-eval-{s}", "cgroup": f"/kubepods/besteffort/pod{s:08x}/c"})
        for k in rng.sample(keys, 40) if s else keys:
            c.observe(sid, k, rng.randint(1, 9), start + 1)
        c.close_session(sid, start + 30)
    c.touch(T0 + 60 * 5000)
    with FakeApiServer(history=100) as api:
        res = ClusterProfiles.from_api_client(api.api_client(), namespace=NS, backoff=Backoff(attempts=3)).publish(w, c)
        assert res.ok, res.error
        size, chunks = largest(api), len(api.names())
    progress(f"cluster: worst case {len(c.behaviours):,} behaviours, 5,000 sessions: {chunks} objects, "
             f"largest {size / 1024 / 1024:.2f} MiB")
    return {"case": "one contribution at the default caps, 5,000 sessions", "objects": chunks,
            "behaviours": len(c.behaviours), "sessions": len(c.sessions), "largest_object_bytes": size}


def run(quick: bool = False) -> dict:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.fakes.apiserver import FakeApiServer  # the one fake API server

    prm = params(quick)
    names = _syscalls()
    rows = [bench_merge(prm, names),
            bench_writes(FakeApiServer, prm, names, 1.0),
            bench_writes(FakeApiServer, prm, names, 0.3),
            bench_worst_case(FakeApiServer, names)]
    largest_bytes = max(r["largest_object_bytes"] for r in rows)
    return {
        "title": TITLE,
        "method": method(quick),
        "rows": rows,
        "ratios": {"merge one workload from all nodes, s": rows[0]["merge_s"],
                   "API writes per workload per node per flush": max(rows[1]["writes_per_workload_node_flush"],
                                                                     rows[2]["writes_per_workload_node_flush"]),
                   "largest WorkloadProfile object, MiB": round(largest_bytes / 1024 / 1024, 3)},
        "targets": TARGETS,
        "notes": [f"the merge case reads {prm['nodes']:,} objects; the writes cases sample "
                  f"{prm['sample_nodes']} nodes (a node writes only its own objects)"],
    }


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2))
