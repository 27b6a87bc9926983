"""Small, exact profiles for the cluster tests: one node's sessions of a workload."""

from __future__ import annotations

from sensor.profile import Profile
from sensor.workload import Workload

W = Workload("agents", "Deployment", "researcher", "main")


def node_profile(node: str, sessions: int, keys=("syscall:read", "syscall:openat"), workload=W) -> Profile:
    p = Profile(workload)
    c = p.node(node)
    for s in range(sessions):
        sid = f"{node}-s{s}"
        c.open_session(sid, 100.0 + s, {"pod": f"pod-{s}"})
        for i, k in enumerate(keys):
            c.observe(sid, k, 1 + i + s, 100.0 + s + i)
        c.close_session(sid, 200.0 + s)
    c.touch(300.0 + sessions)
    return p
