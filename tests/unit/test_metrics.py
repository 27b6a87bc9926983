"""Metrics and health, scraped for real over 127.0.0.1."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from envelope.metrics import Metrics, _call_label
from sensor.workloadprofile import PublishResult
from sensor.profile import Profile
from sensor.workload import Workload

W = Workload("agents", "Deployment", "research-agent", "main")
W2 = Workload("tools", "Deployment", "indexer", "main")


@pytest.fixture(autouse=True)
def _plain_logging():
    """Log to whatever stderr is now: an earlier test's ``envelope.cli.main`` may have bound
    structlog to a captured stream that pytest has since closed."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Step:  # the shape of sensor.pump.StepStats
    events: int = 0
    by_type: dict = field(default_factory=dict)
    new_cgroups: int = 0
    closed_cgroups: int = 0
    loss: dict = field(default_factory=dict)


@dataclass
class Agg:
    bindings: dict
    profiles: dict


@dataclass
class Observer:
    agg: Agg


def profile(w: Workload, keys: list[str], start: float = 1_764_000_000.0) -> Profile:
    p = Profile(w)
    c = p.node("node-a")
    c.open_session("s1", start)
    for i, k in enumerate(keys):
        c.observe("s1", k, 3, start + i)
    c.close_session("s1", start + 100)
    c.touch(start + 100)
    return p


@pytest.fixture
def served():
    clock = Clock()
    m = Metrics(clock=clock, max_silence=60, startup_grace=300, profile_interval=15)
    port = m.serve(0, host="127.0.0.1")
    yield m, clock, f"http://127.0.0.1:{port}"
    m.close()


def get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers.get("Content-Type", "")


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    code, text, _ = get(base + "/metrics")
    assert code == 200
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_scrape_reports_events_losses_profiles_and_coverage(served):
    m, clock, base = served
    profiles = {W: profile(W, ["syscall:read", "syscall:write", "exec:/usr/bin/git", "connect:tcp:10.0.3.7:443"]),
                W2: profile(W2, ["syscall:read"])}
    obs = Observer(Agg(bindings={1: W, 2: W, 3: W2}, profiles=profiles))
    m.observe_step(Step(events=5, by_type={"ExecEvent": 3, "ConnectEvent": 2}, loss={"ringbuf_reserve": 7}), obs)
    m.observe_step(Step(events=1, by_type={"ExecEvent": 1}, loss={"decode_error": 1}), obs)
    s = scrape(base)
    assert s[("envelope_events_total", (("type", "ExecEvent"),))] == 4
    assert s[("envelope_events_total", (("type", "ConnectEvent"),))] == 2
    assert s[("envelope_events_lost_total", (("counter", "ringbuf_reserve"),))] == 7
    assert s[("envelope_events_lost_total", (("counter", "decode_error"),))] == 1
    assert s[("envelope_cgroups_tracked", ())] == 3
    assert s[("envelope_profiles", ())] == 2
    wl = W.key
    assert s[("envelope_profile_behaviours", (("substrate", "syscall"), ("workload", wl)))] == 2
    assert s[("envelope_profile_behaviours", (("substrate", "egress"), ("workload", wl)))] == 1
    assert s[("envelope_coverage_new_behaviours", (("substrate", "exec"), ("workload", wl)))] == 1
    assert s[("envelope_profile_sessions", (("workload", wl),))] == 1
    assert s[("envelope_build_info", (("version", "0.1.0"),))] == 1


def test_refused_checks_are_a_gauge_per_workload_and_key(served):
    m, clock, base = served
    p = profile(W, ["capability:CHOWN"])
    p.node("n1").add_refusal("capability:NET_RAW", 3, 1.0)
    profiles = {W: p}
    m.observe_step(Step(), Observer(Agg(bindings={}, profiles=profiles)))
    s = scrape(base)
    assert s[("envelope_profile_refused", (("key", "capability:NET_RAW"), ("workload", W.key)))] == 3
    assert s[("envelope_profile_behaviours", (("substrate", "capability"), ("workload", W.key)))] == 1
    del profiles[W]
    clock.t += 16
    m.observe_step(Step(), Observer(Agg(bindings={}, profiles=profiles)))
    assert not any(k[0] == "envelope_profile_refused" for k in scrape(base))


def test_profile_gauges_refresh_on_their_interval_and_drop_gone_workloads(served):
    m, clock, base = served
    profiles = {W: profile(W, ["syscall:read"]), W2: profile(W2, ["syscall:read"])}
    obs = Observer(Agg(bindings={}, profiles=profiles))
    m.observe_step(Step(), obs)
    del profiles[W2]
    m.observe_step(Step(), obs)  # within profile_interval: not recomputed
    assert scrape(base)[("envelope_profiles", ())] == 2
    clock.t += 16
    m.observe_step(Step(), obs)
    s = scrape(base)
    assert s[("envelope_profiles", ())] == 1
    assert not any(k[0] == "envelope_profile_behaviours" and ("workload", W2.key) in k[1] for k in s)


def test_violations_stale_apply_failures_api_errors_and_publications(served):
    m, clock, base = served
    m.violation(W, "deny", "egress")
    m.violation(W, "deny", "egress", 2)
    m.violation(W, "log", "syscall")
    m.set_stale(W, True)
    m.set_stale(W2, True)
    m.set_stale(W2, False)
    m.apply_failure(W, "seccomp")
    m.api_error("apply workloadprofiles/agents-research-agent-main-node-a-1a2b3c", RuntimeError())
    m.api_error("apply workloadprofiles/other-name-9f9f", RuntimeError())
    m.api_error("report status on leastprivilegepolicies agents/x")
    m.published(PublishResult(W, "node-a", ok=True, written=1))
    m.published(PublishResult(W, "node-a", ok=True, unchanged=True))
    m.published(PublishResult(W, "node-a", ok=False, error="gave up"))
    s = scrape(base)
    assert s[("envelope_violations_total", (("action", "deny"), ("substrate", "egress"), ("workload", W.key)))] == 3
    assert s[("envelope_violations_total", (("action", "log"), ("substrate", "syscall"), ("workload", W.key)))] == 1
    assert s[("envelope_policy_stale", (("workload", W.key),))] == 1
    assert s[("envelope_policy_stale", (("workload", W2.key),))] == 0
    assert s[("envelope_policies_stale", ())] == 1
    assert s[("envelope_policy_apply_failures_total", (("substrate", "seccomp"), ("workload", W.key)))] == 1
    assert s[("envelope_api_errors_total", (("call", "apply workloadprofiles"),))] == 2
    assert s[("envelope_api_errors_total", (("call", "report status"),))] == 1
    for result in ("written", "unchanged", "failed"):
        assert s[("envelope_profile_publish_total", (("result", result),))] == 1


def test_openmetrics_on_request(served):
    m, clock, base = served
    m.violation(W, "deny", "exec")
    code, text, ctype = get(base + "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert code == 200 and ctype.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")


def test_health_follows_the_loop_heartbeat(served):
    m, clock, base = served
    assert get(base + "/healthz")[0] == 200  # starting
    code, body, _ = get(base + "/readyz")
    assert code == 503 and "not attached" in body
    m.observe_step(Step())
    assert get(base + "/healthz")[:2] == (200, "ok\n")
    assert get(base + "/readyz")[0] == 200
    clock.t += 61  # the loop stopped stepping
    code, body, _ = get(base + "/healthz")
    assert code == 503 and "no loop step for 61s" in body
    assert get(base + "/readyz")[0] == 503
    m.beat()
    assert get(base + "/healthz")[0] == 200
    m.set_ready(False)
    assert get(base + "/readyz")[0] == 503 and get(base + "/healthz")[0] == 200


def test_a_loop_that_never_starts_fails_liveness_after_the_grace(served):
    m, clock, base = served
    clock.t += 301
    code, body, _ = get(base + "/healthz")
    assert code == 503 and "after start" in body


def test_unknown_path_is_404_and_close_frees_the_port():
    m = Metrics()
    port = m.serve(0, host="127.0.0.1")
    assert get(f"http://127.0.0.1:{port}/nope")[0] == 404
    m.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_registries_are_private():
    a, b = Metrics(), Metrics()
    a.violation(W, "deny", "egress")
    assert a.registry.get_sample_value("envelope_violations_total",
                                       {"workload": W.key, "action": "deny", "substrate": "egress"}) == 1
    assert b.registry.get_sample_value("envelope_violations_total",
                                       {"workload": W.key, "action": "deny", "substrate": "egress"}) is None


def test_call_labels_are_bounded():
    assert _call_label("list workloadprofiles in envelope-system (envelope.dev/workload=abc)") == "list workloadprofiles"
    assert _call_label("set mode of leastprivilegepolicies agents/x") == "set mode"
    assert _call_label("") == "unknown"
