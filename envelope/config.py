"""One configuration object that the CLI, the daemon and the tests wire components from.

Every default lives here. The daemon also reads a YAML file (``--config``) whose keys are the
field names below; unknown keys are an error, and so is every value that is not what its key
takes (:data:`CHECKS`): numbers must be numbers (never booleans or strings), finite and in range;
booleans must be booleans; paths must be absolute, and those Envelope reads from (``host_root``,
``bpffs``) must exist. Each problem is one :class:`UserError` line naming the file
and the key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sensor.profile import DEFAULT_CAPS
from sensor.safeyaml import YamlError, load_yaml
from sensor.state_dir import UntrustedFileError, read_trusted
from sensor.workload import SUBSTRATES

from .errors import UserError

DEFAULT_STATE_DIR = "/var/lib/envelope"
#: Outside Kubernetes the metrics endpoint listens on loopback only; the DaemonSet's ConfigMap
#: sets 0.0.0.0, the pod's own network namespace, for the kubelet's probes and Prometheus.
DEFAULT_METRICS_ADDRESS = "127.0.0.1"
BPF_FS_MAGIC = 0xCAFE4A11


@dataclass
class Config:
    state_dir: Path = Path(os.environ.get("ENVELOPE_STATE_DIR", DEFAULT_STATE_DIR))
    node_name: str = field(default_factory=lambda: os.environ.get("NODE_NAME") or socket.gethostname())
    host_root: Path = Path("/")  # where the host's / is mounted (``/host`` in a pod)
    # Ring buffer shared by all CPUs, in pages (a power of two): 8 MiB absorbs the drain's
    # scheduling stalls at this machine's full exec and connect rates (BENCHMARKS.md).
    ringbuf_pages: int = 2048
    poll_interval: float = 1.0  # seconds between counter reads and profile updates
    flush_interval: float = 10.0  # seconds between profile writes in the daemon
    max_cgroups: int = 1024  # cgroup slots in the kernel syscall counter table
    # Observe DNS (bpf/dns.c): `dns:NAME` behaviours and connects attributed to resolved names.
    dns: bool = True
    # The request capture (bpf/http.c): HTTP and TLS-plaintext requests of the watched workloads,
    # their http: and aws: behaviours and model fingerprints; the http substrate's enforcement.
    http_capture: bool = True
    http_ringbuf_pages: int = 256  # capture ring buffer (records are up to 4 KiB + 64 bytes)
    # Probe SSL_read(_ex) too: the status of TLS responses (evidence), and a TLS response seen to
    # begin; costs a uprobe hit per TLS record read in every process mapping libssl (BENCHMARKS.md).
    http_tls_responses: bool = True
    s3_endpoints: list = field(default_factory=list)  # hosts to read as S3 endpoints (e.g. a MinIO)
    # The file substrate's observation (bpf/files.c on the file syscalls' exits): ~3.5 ns on every
    # syscall, one hash lookup per counted file access (BENCHMARKS.md). Off: no file behaviours.
    observe_files: bool = True
    file_keys: int = 131072  # (cgroup, access, path) keys the kernel counts, node-wide
    file_keys_per_cgroup: int = 8192  # keys one cgroup may hold; more are counted as overflow
    caps: dict = field(default_factory=lambda: dict(DEFAULT_CAPS))
    metrics_port: int = 9464
    metrics_address: str = DEFAULT_METRICS_ADDRESS  # where /metrics, /healthz and /readyz listen
    kubelet_seccomp_dir: Path = Path("/var/lib/kubelet/seccomp")
    bpffs: Path = Path("/sys/fs/bpf")
    fingerprint_annotations: dict = field(default_factory=lambda: {
        "model": "envelope.dev/model-version",
        "prompt_template": "envelope.dev/prompt-template",
        "tool_catalog": "envelope.dev/tool-catalog",
    })
    rebaseline_on_stale: bool = False  # on a fingerprint change: alert mode + new observation window
    cluster: str = "auto"  # Kubernetes API use: "auto" (when in a pod), "on" or "off"
    profile_namespace: str = field(default_factory=lambda: os.environ.get("POD_NAMESPACE", "envelope-system"))
    kubeconfig: str | None = None  # outside a pod, with cluster: "on"
    policy_sync_interval: float = 15.0  # seconds between policy-job rounds (retries, stale checks); policies are watched
    # Count capability checks per cgroup (bpf/capabilities.c). On a kernel with no capability probe
    # the sensor runs without it (one warning; `envelope doctor` says why) and sessions say so.
    observe_capabilities: bool = True
    capability_keys: int = 16384  # kernel counters of (cgroup, capability, granted/refused, phase)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **overrides) -> "Config":
        cfg = cls()
        if path:
            try:
                # a ConfigMap mount links config.yaml into a ..data directory: follow it, and
                # check what it names (nobody but root may have been able to write it)
                raw = read_trusted(path, follow=True)
            except UntrustedFileError as e:
                raise UserError(f"config {path}: {e}") from None
            except OSError as e:
                raise UserError(f"config {path}: cannot read: {e.strerror or e}") from None
            try:
                data = load_yaml(raw, f"config {path}")
            except YamlError as e:
                raise UserError(str(e)) from None
            if data is None:
                data = {}
            if not isinstance(data, dict):
                raise UserError(f"config {path}: top level must be a mapping of keys to values")
            bad = [k for k in data if not isinstance(k, str)]
            if bad:
                raise UserError(f"config {path}: key {bad[0]!r} is not a name")
            cfg = cfg.replace(**data, _source=f"config {path}")
        return cfg.replace(**{k: v for k, v in overrides.items() if v is not None})

    def replace(self, _source: str = "override", **changes) -> "Config":
        """A copy with ``changes``, each checked (:data:`CHECKS`); None leaves a key as it is."""
        names = {f.name for f in dataclasses.fields(self)}
        out = {}
        for k, v in changes.items():
            if k not in names:
                raise UserError(f"{_source}: unknown config key {k!r} (keys: see envelope/config.py)")
            if v is None:
                continue
            try:
                out[k] = CHECKS[k](v)
            except ConfigValueError as e:
                raise UserError(f"{_source}: {k}: {e}") from None
        return dataclasses.replace(self, **out)


# ---- checks ---------------------------------------------------------------------------------


class ConfigValueError(ValueError):
    """A value its key does not take; the message says what it takes."""


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(kind: type, lo: float, hi: float, *, power_of_two: bool = False
            ) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and isinstance(v, float)
                                                                     and not v.is_integer()):
            want = "a whole number" if kind is int else "a number"
            raise ConfigValueError(f"must be {want}, got {_show(v)}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigValueError(f"must be finite, got {v}")
        v = kind(v)
        if not lo <= v <= hi:
            raise ConfigValueError(f"must be within {lo:g}..{hi:g}, got {v:g}")
        if power_of_two and v & (v - 1):
            raise ConfigValueError(f"must be a power of two, got {v}")
        return v
    return check


def _positive_seconds(hi: float) -> Callable[[Any], float]:
    base = _number(float, -math.inf, hi)

    def check(v: Any) -> float:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0:
            raise ConfigValueError(f"must be more than 0 seconds, got {v:g}")
        return base(v)
    return check


def _text(pattern: str, what: str, max_len: int) -> Callable[[Any], str]:
    rx = re.compile(pattern)

    def check(v: Any) -> str:
        if not isinstance(v, str) or not v:
            raise ConfigValueError(f"must be a non-empty string, got {_show(v)}")
        if len(v) > max_len or not rx.fullmatch(v):
            raise ConfigValueError(f"{_show(v)} is not {what}")
        return v
    return check


def _path(*, must_exist: str | None = None, bpf: bool = False) -> Callable[[Any], Path]:
    def check(v: Any) -> Path:
        if isinstance(v, Path):
            v = str(v)
        if not isinstance(v, str) or not v:
            raise ConfigValueError(f"must be a path, got {_show(v)}")
        if "\0" in v:
            raise ConfigValueError("must not contain a NUL byte")
        if not v.startswith("/"):
            raise ConfigValueError(f"must be an absolute path, got {_show(v)}")
        p = Path(v)
        if must_exist == "dir" and not p.is_dir():
            raise ConfigValueError(f"{v} is not an existing directory")
        if must_exist == "file" and not p.is_file():
            raise ConfigValueError(f"{v} is not an existing file")
        if bpf:
            try:
                magic = _fs_magic(p)
            except OSError as e:
                raise ConfigValueError(f"{v}: {e.strerror}") from None
            if magic is not None and magic != BPF_FS_MAGIC:
                raise ConfigValueError(f"{v} is not a bpf filesystem (mount one with "
                                       f"`mount -t bpf bpf {v}`)")
        return p
    return check


def _fs_magic(p: Path) -> int | None:
    """The filesystem type of ``p`` (statfs f_type), or None where it cannot be asked."""
    import ctypes

    from sensor.libc import LIBC, checked

    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]

    buf = StatFs()
    checked(f"statfs {p}", LIBC.statfs(os.fsencode(str(p)), ctypes.byref(buf)))
    return buf.f_type & 0xFFFFFFFF


def _state_dir(v: Any) -> Path:
    if isinstance(v, (str, Path)) and str(v) and not str(v).startswith("/") and "\0" not in str(v):
        v = os.path.abspath(str(v))  # --state-dir ./demo: relative to where the command runs
    return _path()(v)


def _caps(v: Any) -> dict:
    if not isinstance(v, dict):
        raise ConfigValueError(f"must be a mapping of substrate to a number of behaviours, got {_show(v)}")
    out = dict(DEFAULT_CAPS)
    one = _number(int, 1, 1_000_000)
    for k, n in v.items():
        if k not in SUBSTRATES:
            raise ConfigValueError(f"unknown substrate {_show(k)} (substrates: {', '.join(SUBSTRATES)})")
        try:
            out[k] = one(n)
        except ConfigValueError as e:
            raise ConfigValueError(f"{k}: {e}") from None
    return out


_ANNOTATION_KEY = re.compile(r"(?:[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def _annotations(v: Any) -> dict:
    if not isinstance(v, dict):
        raise ConfigValueError(f"must be a mapping of fingerprint name to annotation key, got {_show(v)}")
    for k, key in v.items():
        if not isinstance(k, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", k):
            raise ConfigValueError(f"{_show(k)} is not a fingerprint name (lower case, digits, _)")
        if not isinstance(key, str) or not _ANNOTATION_KEY.fullmatch(key):
            raise ConfigValueError(f"{k}: {_show(key)} is not a Kubernetes annotation key")
    return dict(v)


def _boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigValueError(f"must be true or false (a YAML boolean), got {_show(v)}")
    return v


def _cluster(v: Any) -> str:
    if isinstance(v, bool):  # YAML 1.1 reads an unquoted on/off as a boolean
        return "on" if v else "off"
    if v not in ("auto", "on", "off"):
        raise ConfigValueError(f"{_show(v)} is not one of auto, on, off")
    return v


def _address(v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigValueError(f"must be an IP address, got {_show(v)}")
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ConfigValueError(f"{_show(v)} is not an IP address (127.0.0.1 listens on loopback "
                               f"only, 0.0.0.0 on every interface)") from None


def _kubeconfig(v: Any) -> str:
    # whether it exists is for cluster_client to say: with cluster "auto" a missing one is a warning
    if isinstance(v, str) and v and "\0" not in v:
        return v
    raise ConfigValueError(f"must be the path of a kubeconfig file, got {_show(v)}")


_DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"


def _hosts(v: Any) -> list:
    """Host names (what a Host header carries: lower case, an optional :port)."""
    if not isinstance(v, list):
        raise ConfigValueError(f"must be a list of host names, got {_show(v)}")
    for h in v:
        if not isinstance(h, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?(:[0-9]{1,5})?", h):
            raise ConfigValueError(f"{_show(h)} is not a host name (lower case, an optional :port)")
    return list(v)


#: How each key's value is checked (and normalised) whenever it is set.
CHECKS: dict[str, Callable[[Any], Any]] = {
    "state_dir": _state_dir,
    "node_name": _text(r"[A-Za-z0-9]([-A-Za-z0-9._]*[A-Za-z0-9])?", "a node name (letters, digits, -, ., _)", 253),
    "host_root": _path(must_exist="dir"),
    "ringbuf_pages": _number(int, 1, 1 << 18, power_of_two=True),
    "poll_interval": _positive_seconds(3600),
    "flush_interval": _positive_seconds(86400),
    "max_cgroups": _number(int, 1, 65535),
    "caps": _caps,
    "metrics_port": _number(int, 0, 65535),
    "metrics_address": _address,
    "kubelet_seccomp_dir": _path(),
    "bpffs": _path(must_exist="dir", bpf=True),
    "fingerprint_annotations": _annotations,
    "rebaseline_on_stale": _boolean,
    "dns": _boolean,
    "cluster": _cluster,
    "profile_namespace": _text(_DNS_LABEL, "a Kubernetes namespace name", 63),
    "kubeconfig": _kubeconfig,
    "policy_sync_interval": _positive_seconds(86400),
    "observe_capabilities": _boolean,
    "capability_keys": _number(int, 64, 1 << 20),
    "http_capture": _boolean,
    "http_ringbuf_pages": _number(int, 1, 1 << 16, power_of_two=True),
    "http_tls_responses": _boolean,
    "s3_endpoints": _hosts,
    "observe_files": _boolean,
    # keys are allocated on use (~320 bytes each): 2^20 bounds the map at ~320 MiB
    "file_keys": _number(int, 1, 1 << 20),
    "file_keys_per_cgroup": _number(int, 1, 1 << 20),
}
