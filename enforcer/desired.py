"""Desired enforcement states: ``<state-dir>/enforce/<quoted workload key>.yaml``.

Each file holds a policy and the mode it is to be enforced in, written by a pinned enforcement
session when an apply succeeds (:mod:`enforcer.session`). The daemon follows these files: it
attaches the pinned programs to the workload's new cgroups and adopts them after a restart.
"""

from __future__ import annotations

from pathlib import Path

import structlog
import yaml

from sensor.state_dir import StateDir, atomic_write
from sensor.workload import Workload

from .policy import Policy, parse_policy

log = structlog.get_logger(__name__)


def desired_path(state_dir, workload: Workload) -> Path:
    return StateDir(state_dir).desired(workload.key)


def write_desired(state_dir, policy: Policy, mode: str) -> None:
    doc = {"mode": mode, "policy": policy.to_dict()}
    atomic_write(desired_path(state_dir, policy.workload), yaml.safe_dump(doc, sort_keys=True).encode())


def read_desired(state_dir) -> list[tuple[Workload, Policy, str]]:
    """Every desired state as (workload, policy, mode); unreadable files are logged and skipped."""
    d = StateDir(state_dir).enforce
    out = []
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.yaml")):
        try:
            doc = yaml.safe_load(p.read_text())
            policy = parse_policy(yaml.safe_dump(doc["policy"]), str(p))
            key = StateDir.workload_of(p.name, ".yaml") or ""
            out.append((Workload.parse(key), policy, str(doc["mode"])))
        except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as e:
            log.warning("unreadable desired state", path=str(p), error=str(e))
    return out
