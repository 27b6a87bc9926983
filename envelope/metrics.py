"""Prometheus metrics and the health endpoints of the node daemon.

One :class:`Metrics` object owns a private registry (so tests and several daemons in one
process never share counters) and serves, on one port:

``/metrics``  the registry, in the Prometheus text format or OpenMetrics when asked for;
``/healthz``  200 while the daemon's loop is alive: it has called :meth:`Metrics.beat` (every
              :meth:`~Metrics.observe_step` does) within ``max_silence`` seconds, or it is still
              within ``startup_grace`` of starting; 503 otherwise, so the kubelet restarts a
              daemon whose loop is stuck;
``/readyz``   200 once the loop has run (or :meth:`~Metrics.set_ready` said so) and is alive.

Metric names (all prefixed ``envelope_``)::

    events_total{type}                        events decoded from the ring buffer, by event type
    events_lost_total{counter}                lost events: ring-buffer reserve failures, decode errors, ...
    cgroups_tracked                           cgroups bound to a workload session on this node
    profiles                                  workloads with a profile on this node
    profile_behaviours{workload,substrate}    distinct behaviours in a workload's profile
    profile_sessions{workload}                sessions in a workload's profile
    coverage_new_behaviours{workload,substrate}  behaviours first seen in the last 24 h of the
                                              observation window (the coverage rate)
    profile_refused{workload,key}             checks the kernel refused a workload, by key
                                              (capability:NAME; evidence, not behaviour)
    violations_total{workload,action,substrate}  policy violations, by action (deny|log|watch)
    policy_stale{workload}                    1 while a workload's policy is stale
    policies_stale                            stale policies on this node
    policy_apply_failures_total{workload,substrate}  failed policy applications
    api_errors_total{call}                    failed Kubernetes API calls (each attempt)
    profile_publish_total{result}             WorkloadProfile publications: written|unchanged|failed
    profiles_quarantined_total                profile files that could not be read, moved aside
    audit_anchor_total{result}                audit heads anchored off the node: published|failed|refused
    audit_anchored_seq                        the last audit entry anchored off the node
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Mapping

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.exposition import choose_encoder

from sensor.workload import SUBSTRATES, substrate_of

log = structlog.get_logger("envelope.metrics")


def _workload_label(workload: Any) -> str:
    return getattr(workload, "key", None) or str(workload)


def _call_label(what: str) -> str:
    """``apply workloadprofiles/agents-x-1a2b`` -> ``apply workloadprofiles``: bounded cardinality."""
    words = what.split()
    if not words:
        return "unknown"
    out = [words[0]]
    for w in words[1:]:
        if w in ("of", "on"):
            continue
        out.append(w.split("/", 1)[0])
        break
    return " ".join(out)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, max_silence: float = 60.0,
                 startup_grace: float = 300.0, profile_interval: float = 15.0,
                 clock: Callable[[], float] = time.monotonic, version: str = "0.1.0"):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.clock = clock
        self.max_silence = max_silence
        self.startup_grace = startup_grace
        self.profile_interval = profile_interval
        self.started = clock()
        self.last_beat: float | None = None
        self._ready: bool | None = None
        self._next_profiles = 0.0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stale: set[str] = set()
        self._profile_labels: set[tuple[str, ...]] = set()
        r = self.registry

        self.info = Info("envelope_build", "Envelope build information", registry=r)
        self.info.info({"version": version})
        self.events = Counter("envelope_events_total", "Events decoded from the ring buffer, by type",
                              ["type"], registry=r)
        self.lost = Counter("envelope_events_lost_total",
                            "Lost events: ring-buffer reserve failures, decode errors, unknown versions",
                            ["counter"], registry=r)
        self.unresolved = Gauge("envelope_cgroups_unresolved",
                                "Bound container cgroups whose identity is still incomplete, by reason",
                                ["reason"], registry=r)
        self._unresolved_seen: set[str] = set()
        self.cgroups = Gauge("envelope_cgroups_tracked", "cgroups bound to a workload session on this node",
                             registry=r)
        self.profiles = Gauge("envelope_profiles", "Workloads with a profile on this node", registry=r)
        self.behaviours = Gauge("envelope_profile_behaviours", "Distinct behaviours in a workload's profile",
                                ["workload", "substrate"], registry=r)
        self.sessions = Gauge("envelope_profile_sessions", "Sessions in a workload's profile", ["workload"],
                              registry=r)
        self.coverage = Gauge("envelope_coverage_new_behaviours",
                              "Behaviours first seen in the last 24 hours of the observation window",
                              ["workload", "substrate"], registry=r)
        self.refused = Gauge("envelope_profile_refused",
                             "Checks the kernel refused a workload (capability:NAME), counted in its profile",
                             ["workload", "key"], registry=r)
        self._refused_labels: set[tuple[str, str]] = set()
        self.violations = Counter("envelope_violations_total", "Policy violations by workload and action",
                                  ["workload", "action", "substrate"], registry=r)
        self.stale = Gauge("envelope_policy_stale", "1 while the workload's policy is stale", ["workload"],
                           registry=r)
        self.stale_total = Gauge("envelope_policies_stale", "Stale policies on this node", registry=r)
        self.apply_failures = Counter("envelope_policy_apply_failures_total", "Failed policy applications",
                                      ["workload", "substrate"], registry=r)
        self.api_errors = Counter("envelope_api_errors_total", "Failed Kubernetes API call attempts", ["call"],
                                  registry=r)
        self.publish = Counter("envelope_profile_publish_total", "WorkloadProfile publications by result",
                               ["result"], registry=r)
        self.quarantined = Counter("envelope_profiles_quarantined_total",
                                   "Profile files that could not be read, moved to profiles/quarantine",
                                   registry=r)
        self.anchor = Counter("envelope_audit_anchor_total",
                              "Audit heads anchored off the node, by result (published, failed, refused)",
                              ["result"], registry=r)
        self.anchored_seq = Gauge("envelope_audit_anchored_seq",
                                  "The last audit entry whose head is anchored off the node", registry=r)

    # ---- recording ---------------------------------------------------------------------------

    def beat(self) -> None:
        self.last_beat = self.clock()

    def set_ready(self, ready: bool) -> None:
        self._ready = ready

    def observe_step(self, st: Any, observer: Any = None) -> None:
        """Account one daemon loop step (a ``StepStats``) and beat the liveness heart."""
        for kind, n in (getattr(st, "by_type", None) or {}).items():
            if n:
                self.events.labels(type=kind).inc(n)
        self.observe_loss(getattr(st, "loss", None) or {})
        if observer is not None:
            agg = getattr(observer, "agg", None)
            bindings = getattr(agg, "bindings", None)
            if bindings is not None:
                self.cgroups.set(len(bindings))
            unresolved = getattr(getattr(observer, "binding", None), "unresolved", None)
            if unresolved is not None:
                counts = unresolved()
                for reason in self._unresolved_seen - set(counts):
                    self.unresolved.labels(reason=reason).set(0)
                for reason, n in counts.items():
                    self.unresolved.labels(reason=reason).set(n)
                self._unresolved_seen |= set(counts)
            profiles = getattr(agg, "profiles", None)
            now = self.clock()
            if profiles is not None and now >= self._next_profiles:
                self._next_profiles = now + self.profile_interval
                self.observe_profiles(profiles)
        if self._ready is None:
            self._ready = True
        self.beat()

    def observe_loss(self, deltas: Mapping[str, int]) -> None:
        for counter, n in deltas.items():
            if n > 0:
                self.lost.labels(counter=counter).inc(n)

    def observe_profiles(self, profiles: Mapping[Any, Any] | Iterable[Any]) -> None:
        """Set the profile gauges from ``{workload: Profile}`` (or an iterable of profiles)."""
        items = list(profiles.values()) if isinstance(profiles, Mapping) else list(profiles)
        self.profiles.set(len(items))
        seen: set[tuple[str, ...]] = set()
        refused: set[tuple[str, str]] = set()
        for p in items:
            w = _workload_label(p.workload)
            counts = {s: 0 for s in SUBSTRATES}
            for key in p.behaviours():
                counts[substrate_of(key)] += 1
            rate = p.coverage_rate(24.0)
            for s in SUBSTRATES:
                self.behaviours.labels(workload=w, substrate=s).set(counts[s])
                self.coverage.labels(workload=w, substrate=s).set(rate.get(s, 0))
                seen.add((w, s))
            self.sessions.labels(workload=w).set(p.session_count)
            for key, refusal in p.refused().items():
                self.refused.labels(workload=w, key=key).set(refusal.count)
                refused.add((w, key))
        for w, key in self._refused_labels - refused:
            self.refused.remove(w, key)
        self._refused_labels = refused
        for w, s in self._profile_labels - seen:  # workloads gone from this node
            self.behaviours.remove(w, s)
            self.coverage.remove(w, s)
            try:
                self.sessions.remove(w)
            except KeyError:
                pass
        self._profile_labels = seen

    def violation(self, workload: Any, action: str, substrate: str, n: int = 1) -> None:
        self.violations.labels(workload=_workload_label(workload), action=action, substrate=substrate).inc(n)

    def apply_failure(self, workload: Any, substrate: str) -> None:
        self.apply_failures.labels(workload=_workload_label(workload), substrate=substrate).inc()

    def set_stale(self, workload: Any, stale: bool) -> None:
        w = _workload_label(workload)
        self.stale.labels(workload=w).set(1 if stale else 0)
        (self._stale.add if stale else self._stale.discard)(w)
        self.stale_total.set(len(self._stale))

    def api_error(self, what: str, exc: BaseException | None = None) -> None:
        """Count one failed API attempt; fits ``on_api_error`` of the cluster clients."""
        self.api_errors.labels(call=_call_label(what)).inc()

    def published(self, result: Any) -> None:
        """Count a ``sensor.workloadprofile.PublishResult``."""
        outcome = "failed" if not result.ok else ("unchanged" if result.unchanged else "written")
        self.publish.labels(result=outcome).inc()

    def profile_quarantined(self, path: Any = None, reason: str = "") -> None:
        """Count one quarantined profile file; fits ``ProfileStore.on_quarantine``."""
        self.quarantined.inc()

    def audit_anchor(self, result: str, seq: int | None = None) -> None:
        self.anchor.labels(result=result).inc()
        if seq is not None:
            self.anchored_seq.set(seq)

    # ---- health ------------------------------------------------------------------------------

    def live(self) -> tuple[bool, str]:
        now = self.clock()
        if self.last_beat is None:
            if now - self.started <= self.startup_grace:
                return True, "starting"
            return False, f"no loop step in the {self.startup_grace:.0f}s after start"
        silent = now - self.last_beat
        if silent <= self.max_silence:
            return True, "ok"
        return False, f"no loop step for {silent:.0f}s (limit {self.max_silence:.0f}s)"

    def ready(self) -> tuple[bool, str]:
        ok, why = self.live()
        if not ok:
            return False, why
        if not self._ready:
            return False, "not ready: probes not attached yet" if self._ready is None else "not ready"
        return True, "ok"

    # ---- HTTP --------------------------------------------------------------------------------

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics, /healthz and /readyz on a daemon thread; returns the bound port.
        ``host`` is the address to listen on (``metrics_address``: loopback unless told
        otherwise; the DaemonSet's ConfigMap says 0.0.0.0, the pod's own network namespace)."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    encoder, ctype = choose_encoder(self.headers.get("Accept"))
                    try:
                        body = encoder(metrics.registry)
                    except Exception as e:  # noqa: BLE001 - a collector failing must not kill the server
                        log.error("metrics exposition failed", error=str(e))
                        return self._reply(500, f"exposition failed: {e}\n".encode())
                    return self._reply(200, body, ctype)
                if path in ("/healthz", "/readyz"):
                    ok, why = metrics.live() if path == "/healthz" else metrics.ready()
                    return self._reply(200 if ok else 503, (why + "\n").encode())
                return self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

            do_HEAD = do_GET

        server_class = ThreadingHTTPServer
        if ":" in host:
            class server_class(ThreadingHTTPServer):  # noqa: N801 - an IPv6 listener
                address_family = socket.AF_INET6
        server = server_class((host, port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="envelope-metrics", daemon=True)
        self._thread.start()
        bound = server.server_address[1]
        log.info("metrics endpoint listening", host=host, port=bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
