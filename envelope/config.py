"""One configuration object that the CLI, the daemon and the tests wire components from.

Every default lives here. The daemon also reads a YAML file (``--config``) whose keys are the
field names below; unknown keys are an error.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sensor.profile import DEFAULT_CAPS

from .errors import UserError

DEFAULT_STATE_DIR = "/var/lib/envelope"


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
    caps: dict = field(default_factory=lambda: dict(DEFAULT_CAPS))
    metrics_port: int = 9464
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

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **overrides) -> "Config":
        cfg = cls()
        if path:
            try:
                data = yaml.safe_load(Path(path).read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise UserError(f"config {path}: {e}") from e
            if not isinstance(data, dict):
                raise UserError(f"config {path}: top level must be a mapping")
            cfg = cfg.replace(**data, _source=str(path))
        return cfg.replace(**{k: v for k, v in overrides.items() if v is not None})

    def replace(self, _source: str = "override", **changes) -> "Config":
        names = {f.name: f for f in dataclasses.fields(self)}
        changes = {k: v for k, v in changes.items() if v is not None}
        for k, v in changes.items():
            if k not in names:
                raise UserError(f"{_source}: unknown config key {k!r}")
            default = getattr(self, k)
            if isinstance(default, Path):
                changes[k] = Path(v)
            elif isinstance(default, (int, float)) and not isinstance(default, bool):
                try:
                    changes[k] = type(default)(v)
                except (TypeError, ValueError):
                    raise UserError(f"{_source}: {k} must be a number, got {v!r}") from None
        return dataclasses.replace(self, **changes)
