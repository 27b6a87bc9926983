"""Desired enforcement states: ``<state-dir>/enforce/<workload file name>.yaml``.

Each file holds a policy and the mode it is to be enforced in, written by a pinned enforcement
session when an apply succeeds (:mod:`enforcer.session`). The daemon follows these files: it
attaches the pinned programs to the workload's new cgroups and adopts them after a restart.

The daemon acts on these files, so it reads only what nobody but root could have written
(:meth:`sensor.state_dir.StateDir.read`), takes the workload from the policy inside (file names
are bounded and may be hashed), and skips a file that is not under its workload's name.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from sensor.safeyaml import YamlError, dump_yaml, load_yaml
from sensor.state_dir import StateDir, atomic_write
from sensor.workload import Workload

from .policy import Policy, PolicyError

log = structlog.get_logger(__name__)

SUFFIX = ".yaml"


def desired_path(state_dir, workload: Workload) -> Path:
    return StateDir(state_dir).desired(workload.key)


def encode_desired(policy: Policy, mode: str) -> bytes:
    doc = {"mode": mode, "policy": policy.to_dict()}
    return dump_yaml(doc).encode()


def write_desired(state_dir, policy: Policy, mode: str) -> None:
    atomic_write(desired_path(state_dir, policy.workload), encode_desired(policy, mode))


def parse_desired(raw: bytes, source: str) -> tuple[Policy, str]:
    """(policy, mode) from a desired-state file's bytes; ValueError naming ``source``."""
    doc = load_yaml(raw, source)
    if not isinstance(doc, dict) or not isinstance(doc.get("policy"), dict):
        raise PolicyError(f"{source}: not a desired state (no policy)")
    mode = doc.get("mode")
    if mode not in ("observe", "alert", "enforce"):
        raise PolicyError(f"{source}: mode {mode!r} is not observe, alert or enforce")
    try:
        return Policy.from_dict(doc["policy"]), mode
    except PolicyError as e:
        raise PolicyError(f"{source}: {e}") from None


def read_desired(state_dir) -> list[tuple[Workload, Policy, str]]:
    """Every desired state as (workload, policy, mode); files that are unreadable, untrusted
    or under another workload's name are logged and skipped."""
    layout = StateDir(state_dir)
    d = layout.enforce
    out = []
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*" + SUFFIX)):
        if p.name.startswith("."):
            continue
        try:
            policy, mode = parse_desired(layout.read(p), str(p))
            if not StateDir.names_key(p.name, SUFFIX, policy.workload.key):
                raise PolicyError(f"{p}: holds the desired state of {policy.workload.key}, whose "
                                  f"file is {StateDir.workload_name(policy.workload.key, SUFFIX)}")
            out.append((policy.workload, policy, mode))
        except (OSError, ValueError, YamlError) as e:
            log.warning("desired state skipped", path=str(p), error=str(e))
    return out
