"""The composition root's builders: every real component the CLI and the daemon use, made from
the one :class:`~envelope.config.Config`. Nothing else constructs a sensor, an aggregator or an
enforcement session; tests build the same components with these functions or hand fakes to the
constructors directly.
"""

from __future__ import annotations

from .config import Config
from .errors import UserError


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
    from sensor.probes import ProbeAttachError, Sensor

    capture = request_capture(config)
    sensor = Sensor(ringbuf_pages=config.ringbuf_pages, max_cgroups=config.max_cgroups,
                    extensions=[capture] if capture is not None else [])
    try:
        sensor.attach()
    except ProbeAttachError as e:
        sensor.close()
        raise UserError(f"{e} (run `envelope doctor` for details)") from e
    return sensor


def aggregator(config: Config, store=None):
    """An aggregator for this node; ``store`` None keeps profiles in memory only."""
    from sensor import syscalls
    from sensor.aggregate import Aggregator

    return Aggregator(config.node_name, store, syscalls.name, caps=config.caps)


def profile_store(config: Config):
    from sensor.store import ProfileStore

    return ProfileStore(config.state_dir)


def enforcement_session(config: Config, *, pinned: bool, denials: bool = True, sensor=None):
    """The enforcement session on the real kernel: pinned for the daemon and ``envelope
    enforce``, unpinned for ``envelope exec``. With a ``sensor`` that runs the request capture,
    the session judges the http substrate through it."""
    from enforcer.session import EnforcementSession

    http = None
    capture = capture_of(sensor)
    if capture is not None:
        from enforcer.http_enforce import HttpEnforcement
        http = HttpEnforcement(capture)
    return EnforcementSession(config.state_dir, pinned=pinned, bpffs=config.bpffs, denials=denials,
                              http=http)


def capture_of(sensor):
    """The request capture extension of an attached sensor, or None."""
    from sensor.httpcapture import HttpCapture
    for ext in getattr(sensor, "extensions", ()):
        if isinstance(ext, HttpCapture):
            return ext
    return None
