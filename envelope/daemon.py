"""``envelope daemon``: watch every cgroup on the node and keep profiles up to date.

Wires the real components from one :class:`~envelope.config.Config`: the sensor, the identity
resolver, the aggregator and profile store, the metrics endpoint, and (when policies are
enforced on this node) the egress enforcer and violation detection. It logs one line containing
``ready`` once the probes are attached, flushes profiles on SIGTERM/SIGINT and exits cleanly.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import structlog

from sensor.pump import NodeBinding, Pump

from . import wiring
from .config import Config

log = structlog.get_logger("envelope.daemon")


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

    # -- wiring ------------------------------------------------------------------------------

    def _resolver(self):
        from sensor.identity import Resolver

        kube = self.cluster.kube if self.cluster else None
        return Resolver(host_root=self.config.host_root, kube=kube)

    def _cluster(self):
        """The Kubernetes side (pod identity, WorkloadProfile publishing, policies), or None."""
        if self.config.cluster == "off":
            return None
        from .cluster_sync import ClusterSync

        return ClusterSync.maybe(self.config, self.metrics)

    def _metrics(self):
        try:
            from .metrics import Metrics
        except ImportError:
            return None
        m = Metrics()
        m.serve(self.config.metrics_port)
        return m

    def _enforcement(self):
        from .enforcement import NodeEnforcement

        session = wiring.enforcement_session(self.config, pinned=True)
        return NodeEnforcement(self.config, session, self.metrics)

    def start(self) -> None:
        cfg = self.config
        self.sensor = wiring.open_sensor(cfg)
        agg = wiring.aggregator(cfg, wiring.profile_store(cfg))
        ignore = {c for c in [own_cgroup_id()] if c is not None}
        self.metrics = self._metrics()
        self.cluster = self._cluster()
        self.enforcement = self._enforcement()
        binding = NodeBinding(self._resolver(), ignore_cgroups=ignore,
                              on_bind=self.enforcement.on_bind)
        self.observer = Pump(self.sensor, binding, agg, counts_interval=cfg.poll_interval)
        self.enforcement.start(self.observer)
        if self.cluster:
            self.cluster.start(self.observer, self.enforcement)
        log.info("ready", node=cfg.node_name, state_dir=str(cfg.state_dir),
                 metrics_port=cfg.metrics_port if self.metrics else None)

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
        log.info("stopped")


def run(config: Config) -> int:
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda n, _f: stop.set())
    return Daemon(config, stop).run()
