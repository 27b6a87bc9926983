"""``envelope daemon``: watch every cgroup on the node and keep profiles up to date.

Wires the real components from one :class:`~envelope.config.Config`: the sensor, the identity
resolver, the aggregator and profile store, the metrics endpoint, and (when policies are
enforced on this node) the egress enforcer and violation detection. It logs one line containing
``ready`` once the probes are attached, flushes profiles on SIGTERM/SIGINT and exits cleanly.

This is the only place that builds the Kubernetes side (:func:`build_cluster`): one API client
and, from it, the four jobs, each handed what it needs: pod watching
(:class:`sensor.pods.PodWatcher`, which the identity resolver reads), profile publishing
(:class:`sensor.workloadprofile.PublisherThread`), policy application
(:class:`envelope.policy_job.PolicyJob`) and stale detection
(:class:`envelope.stale_job.StaleJob`), the last two over one policy informer.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from dataclasses import dataclass

import structlog

from sensor.pump import NodeBinding, Pump

from . import wiring
from .config import Config

log = structlog.get_logger("envelope.daemon")

CLUSTER_MODES = ("auto", "on", "off")
#: API attempts per call in the final flush on shutdown.
CLOSE_ATTEMPTS = 2


def cluster_client(config: Config):
    """The API client the config asks for, or None: ``off`` never; ``auto`` only inside a pod
    (``KUBERNETES_SERVICE_HOST``), an API that cannot be configured being a warning; ``on``
    always, an API that cannot be configured being a :class:`~envelope.errors.UserError`."""
    from sensor.kubeapi import ClusterApiError, api_client

    from .errors import UserError

    mode = getattr(config, "cluster", "auto")
    if isinstance(mode, bool):  # YAML 1.1 reads an unquoted on/off as a boolean
        mode = "on" if mode else "off"
    if mode not in CLUSTER_MODES:
        raise UserError(f"config cluster: {mode!r} is not one of {', '.join(CLUSTER_MODES)}")
    if mode == "off":
        return None
    if mode == "auto" and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        log.info("not in a pod: the Kubernetes API is not used (cluster: auto)", node=config.node_name)
        return None
    try:
        return api_client(config.kubeconfig)
    except ClusterApiError as e:
        if mode == "on":
            raise UserError(f"cluster: on, but {e}") from None
        log.warning("kubernetes api not configured; profiles stay on the node and policies are not "
                    "read (identities come from OCI annotations and cgroups)", error=str(e))
        return None


@dataclass
class Cluster:
    """The daemon's Kubernetes jobs, built by :func:`build_cluster`; the daemon drives them."""

    pods: object  # sensor.pods.PodWatcher
    policy_informer: object  # sensor.kubeapi.Informer
    publisher: object  # sensor.workloadprofile.PublisherThread
    policies: object  # envelope.policy_job.PolicyJob
    stale: object  # envelope.stale_job.StaleJob
    backoffs: tuple = ()  # the API calls' backoffs: shortened on close
    closing: threading.Event | None = None  # ends their retry sleeps
    anchor: object = None  # envelope.anchor_job.AnchorJob
    outbox: object = None  # sensor.outbox.Outbox: the node's gateways' contributions

    def start(self, observer=None, enforcement=None) -> None:
        self.pods.start()
        self.policies.enforcement = enforcement
        self.policy_informer.start()
        self.publisher.start()
        self.policies.start()
        self.stale.start(observer)
        if self.anchor is not None:
            self.anchor.start()

    def tick(self) -> None:
        """The loop's share: queued egress applications and a bindings snapshot; no network."""
        self.policies.tick()
        self.stale.tick()

    def publish(self, profiles, written=None) -> None:
        """Hand this node's flushed contributions to the publishing thread (a snapshot), and its
        gateways' that changed since the last flush."""
        try:
            self.publisher.publish(profiles, written)
            if self.outbox is not None:
                self.publisher.publish_contributions(self.outbox.changed())
        except Exception as e:  # noqa: BLE001 - a flush must not fail on the cluster side
            log.error("profile snapshot for publishing failed", error=f"{type(e).__name__}: {e}")

    def close(self, timeout: float = 20.0) -> bool:
        """Stop the jobs, then write what is still unpublished (one short last attempt), all
        within ``timeout`` seconds: against an API server that never answers, each job's wait
        comes out of one budget instead of adding up."""
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        for b in self.backoffs:  # calls in flight give up after this attempt
            b.attempts = min(b.attempts, CLOSE_ATTEMPTS)
        if self.closing is not None:
            self.closing.set()
        self.stale.close(left())
        self.policies.close(left())
        if self.anchor is not None:
            # the last head this run wrote goes off the node too, if the API answers in time
            if not _within(self.anchor.round, left(), "anchor-last-round"):
                log.warning("audit head not anchored on shutdown: the API server did not answer in time")
            self.anchor.close(left())
        try:
            published: list[bool] = []
            if not _within(lambda: published.append(self.publisher.close(left())), left() + 1.0,
                           "publish-last-round"):
                log.warning("final profile publishing did not finish: the API server did not answer in "
                            "time (the profiles stay on disk)")
            ok = bool(published and published[0])
        except Exception as e:  # noqa: BLE001 - shutdown goes on
            log.error("final profile publishing failed", error=f"{type(e).__name__}: {e}")
            ok = False
        self.policy_informer.stop()
        self.pods.stop()
        log.info("cluster jobs stopped", published=ok)
        return ok


def build_cluster(config: Config, metrics, client, *, backoff=None, watch_backoff=None,
                  watch_timeout: int = 300, publish_retry: float = 30.0, request_timeout=None) -> Cluster:
    """Every Kubernetes collaborator of the daemon, from one API client (tests call this too)."""
    from enforcer.auditanchor import ClusterAnchors
    from enforcer.exceptions import syscall_allowances
    from enforcer.kubelet import KubeletSeccompDir
    from enforcer.leastprivilegepolicy import ClusterPolicies
    from sensor.kubeapi import REQUEST_TIMEOUT, Backoff, Informer
    from sensor.outbox import Outbox
    from sensor.pods import PodWatcher
    from sensor.workloadprofile import ClusterProfiles, ProfilePublisher, PublisherThread

    from .anchor_job import AnchorJob
    from .policy_job import PolicyJob
    from .stale_job import StaleJob

    timeout = request_timeout or REQUEST_TIMEOUT
    on_api_error = metrics.api_error if metrics is not None else None
    base = backoff or Backoff()
    stop = threading.Event()  # retry sleeps end when the jobs close
    calls = dataclasses.replace(base, sleep=stop.wait) if base.sleep is time.sleep else base
    pods = PodWatcher(config.node_name, client, fingerprint_keys=config.fingerprint_annotations,
                      backoff=watch_backoff, watch_timeout=watch_timeout, request_timeout=timeout,
                      on_error=on_api_error)
    profiles = ClusterProfiles.from_api_client(client, namespace=config.profile_namespace, backoff=calls,
                                               on_api_error=on_api_error)
    publisher = PublisherThread(ProfilePublisher(profiles, config.node_name,
                                                 on_result=metrics.published if metrics is not None else None),
                                retry_interval=publish_retry)
    policies = ClusterPolicies.from_api_client(client, config.node_name, backoff=calls, on_api_error=on_api_error)
    informer = Informer("leastprivilegepolicies", policies.list_fn, backoff=watch_backoff,
                        watch_timeout=watch_timeout, request_timeout=timeout, on_error=on_api_error)
    interval = float(config.policy_sync_interval)
    stale = StaleJob(config.node_name, policies, informer, pods, state_dir=config.state_dir,
                     rebaseline=bool(config.rebaseline_on_stale), metrics=metrics, interval=interval)
    job = PolicyJob(config.node_name, policies, informer, KubeletSeccompDir.from_config(config),
                    metrics=metrics, interval=interval, stale_here=stale.is_stale_here,
                    exceptions=lambda w: syscall_allowances(config.state_dir, w))
    stale.on_change = job.wake
    informer.on_event = lambda *event: (job.wake(), stale.wake())
    anchors = ClusterAnchors.from_api_client(client, config.node_name, config.profile_namespace,
                                             backoff=calls, on_api_error=on_api_error)
    anchor = AnchorJob(config.state_dir, anchors, metrics=metrics)
    cluster = Cluster(pods, informer, publisher, job, stale, backoffs=(calls,), closing=stop, anchor=anchor,
                      outbox=Outbox(config.state_dir, config.node_name))
    log.info("kubernetes api configured", node=config.node_name, host=client.configuration.host,
             profile_namespace=config.profile_namespace)
    return cluster


def own_cgroup_id() -> int | None:
    """The daemon's own cgroup, left out so the daemon does not profile itself."""
    from sensor.cgroup import CgroupFS

    try:
        found = CgroupFS().pid_cgroup(os.getpid())
    except Exception:  # noqa: BLE001 - best effort
        return None
    return found[1] if found else None


class Daemon:
    def __init__(self, config: Config, stop: threading.Event | None = None):
        self.config = config
        self.stop = stop or threading.Event()
        self.sensor = None
        self.observer: Pump | None = None
        self.metrics = None
        self.enforcement = None
        self.cluster = None
        self.runtime_watch = None

    # -- wiring ------------------------------------------------------------------------------

    def _resolver(self):
        from sensor.identity import Resolver
        from sensor.runtime_watch import RememberingRuntimeState

        kube = self.cluster.pods if self.cluster else None
        runtime = RememberingRuntimeState(self.config.host_root)
        runtime.watch.start()  # short-lived containers' state, read as it appears
        self.runtime_watch = runtime.watch
        return Resolver(host_root=self.config.host_root, kube=kube, runtime=runtime)

    def _cluster(self):
        """The Kubernetes side (pod identity, WorkloadProfile publishing, policies), or None."""
        client = cluster_client(self.config)
        return build_cluster(self.config, self.metrics, client) if client is not None else None

    def _metrics(self):
        try:
            from .metrics import Metrics
        except ImportError:
            return None
        from .errors import UserError

        m = Metrics()
        try:
            m.serve(self.config.metrics_port, self.config.metrics_address)
        except OSError as e:
            raise UserError(f"metrics endpoint {self.config.metrics_address}:{self.config.metrics_port}: "
                            f"cannot listen: {e.strerror or e}; fix: metrics_address / metrics_port") from None
        return m

    def _enforcement(self):
        from .enforcement import NodeEnforcement

        session = wiring.enforcement_session(self.config, pinned=True, sensor=self.sensor)
        return NodeEnforcement(self.config, session, self.metrics)

    def start(self) -> None:
        from sensor.cgroup import reap_command_orphans
        from sensor.state_dir import StateDir, UntrustedFileError, private_dirs

        from .errors import UserError

        cfg = self.config
        try:  # the state directory and its own directories 0700, whatever made them
            private_dirs(cfg.state_dir)
            StateDir(cfg.state_dir).secure()
        except (UntrustedFileError, OSError) as e:
            raise UserError(f"state directory {cfg.state_dir}: {e}") from None
        reap_command_orphans()  # commands a killed exec or record left running
        self.metrics = self._metrics()
        self.sensor = wiring.open_sensor(cfg)
        agg = wiring.aggregator(cfg, wiring.profile_store(cfg, self.metrics))
        ignore = {c for c in [own_cgroup_id()] if c is not None}
        self.cluster = self._cluster()
        self.enforcement = self._enforcement()
        binding = NodeBinding(self._resolver(), ignore_cgroups=ignore,
                              on_bind=self.enforcement.on_bind)
        self.observer = Pump(self.sensor, binding, agg, counts_interval=cfg.poll_interval)
        self.enforcement.start(self.observer)
        if self.cluster:
            self.cluster.start(self.observer, self.enforcement)
        log.info("ready", node=cfg.node_name, state_dir=str(cfg.state_dir),
                 metrics=f"{cfg.metrics_address}:{cfg.metrics_port}" if self.metrics else None)

    def run(self) -> int:
        self.start()
        cfg = self.config
        next_flush = time.monotonic() + cfg.flush_interval
        try:
            while not self.stop.is_set():
                st = self.observer.step(100)
                if self.metrics:
                    self.metrics.observe_step(st, self.observer)
                self.enforcement.tick()
                if self.cluster:
                    self.cluster.tick()
                if time.monotonic() >= next_flush:
                    self.flush()
                    next_flush = time.monotonic() + cfg.flush_interval
        finally:
            self.shutdown()
        return 0

    def flush(self) -> None:
        written = self.observer.agg.flush()
        if written:
            log.debug("profiles flushed", count=len(written))
        if self.cluster:
            self.cluster.publish(self.observer.agg.profiles, written)

    def shutdown(self) -> None:
        if self.observer:
            try:
                # what the loop saw last: pending events and counters, and the sessions of
                # cgroups that are gone by now (closed, not left open until a restart)
                self.observer.finish(rounds=1)
                self.observer.collect_gone()
                self.flush()
                log.info("profiles flushed on shutdown", profiles=len(self.observer.agg.profiles))
            except Exception as e:  # noqa: BLE001 - still close the probes
                log.error("flush on shutdown failed", error=str(e))
        if self.cluster:
            self.cluster.close()
        if self.enforcement:
            self.enforcement.close()
        if self.sensor:
            self.sensor.close()
        if self.metrics:
            self.metrics.close()
        if self.runtime_watch:
            self.runtime_watch.close()
        log.info("stopped")


def _within(fn, seconds: float, name: str) -> bool:
    """Run ``fn`` in a daemon thread and wait at most ``seconds``; True if it finished. A call
    still blocked on the network when the process exits is abandoned with it."""
    t = threading.Thread(target=fn, name=name, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


def run(config: Config) -> int:
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda n, _f: stop.set())
    return Daemon(config, stop).run()
