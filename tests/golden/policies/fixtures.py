"""Fixture profiles for the golden policies, built deterministically through the profile API.

Each builder records sessions the way the sensor does (open, observe, close) so the evidence has
realistic counts, session counts, first/last seen times and per-session sums. Run this module to
rewrite the ``*.profile.json`` files (the packed profiles ``envelope derive FILE`` reads).
"""

from __future__ import annotations

import json
from pathlib import Path

from sensor.profile import Profile
from sensor.workload import Workload

HERE = Path(__file__).resolve().parent
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
HOUR = 3600.0
DAY = 86400.0

BASE_SYSCALLS = {
    "read": 400, "write": 120, "openat": 60, "close": 70, "newfstatat": 40, "mmap": 30, "munmap": 10,
    "brk": 6, "futex": 25, "epoll_wait": 50, "rt_sigaction": 8, "rt_sigprocmask": 12, "getpid": 3,
    "clock_gettime": 2, "exit_group": 1,
}


def _session(node, sid: str, start: float, end: float | None, behaviours: dict[str, int],
             capabilities: dict[str, int] | None = None, refused: dict[str, int] | None = None) -> None:
    """One session; ``capabilities`` given (granted checks, possibly none) marks it observed by the
    capability probe, whose refused checks are ``refused``."""
    meta = {"container_id": sid, **({"observed": ["capability"]} if capabilities is not None else {})}
    node.open_session(sid, start, meta)
    for i, (key, count) in enumerate(sorted(behaviours.items())):
        node.observe(sid, key, count, start + 1.0 + i)
    for i, (key, count) in enumerate(sorted((capabilities or {}).items())):
        node.observe(sid, key, count, start + 60.0 + i)
    for i, (key, count) in enumerate(sorted((refused or {}).items())):
        node.add_refusal(key, count, start + 90.0 + i)
    if end is not None:
        node.close_session(sid, end)


def research_agent() -> Profile:
    """A stable research agent observed for 14 days on two nodes: API calls to one /24 on 443,
    DNS through the cluster DNS service, git with its helpers, and a few rare behaviours. The
    capability probe watched every session: it serves metrics on port 80 (NET_BIND_SERVICE),
    chowns its scratch files (CHOWN), pings its model gateway in half the sessions (NET_RAW, an
    escape of the egress envelope), mounted something once (SYS_ADMIN), and was refused
    SYS_PTRACE when it tried to attach to a child."""
    p = Profile(Workload("research", "Deployment", "research-agent", "agent"))
    nodes = [p.node("node-a"), p.node("node-b")]
    for day in range(14):
        for j in range(2):
            node = nodes[(day + j) % 2]
            start = T0 + day * DAY + j * 6 * HOUR
            b = {f"syscall:{k}": v + day for k, v in BASE_SYSCALLS.items()}
            b[f"connect:tcp:10.20.30.{10 + (day * 2 + j) % 7}:443"] = 4 + j
            b["send:udp:10.96.0.10:53"] = 6
            b["connect:tcp:[fd00:ab::1]:8443"] = 2
            b["exec:/usr/bin/git"] = 2
            b[f"exec:/usr/lib/git-core/git-{['fetch', 'remote-https', 'index-pack', 'unpack-objects', 'rev-list'][(day + j) % 5]}"] = 1
            b["exec:/usr/bin/python3.11"] = 1
            if day == 3 and j == 0:
                b["exec:/usr/bin/curl"] = 1
                b["connect:tcp:203.0.113.77:4444"] = 1
                b["syscall:ptrace"] = 1
            if day in (5, 9):
                b["syscall:getrandom"] = 2
            caps = {"capability:NET_BIND_SERVICE": 1, "capability:CHOWN": 2 + j}
            if (day + j) % 2 == 0:
                caps["capability:NET_RAW"] = 1
            if day == 3 and j == 0:
                caps["capability:SYS_ADMIN"] = 1
            refused = {"capability:SYS_PTRACE": 1} if day in (3, 8) else None
            _session(node, f"s{day:02d}{j}", start, start + 2 * HOUR, b, caps, refused)
    for n in nodes:
        n.add_fingerprint("image", "sha256:1111aaaa", T0)
        n.add_fingerprint("model", "claude-x-2026-01", T0)
        n.add_fingerprint("prompt_template", "sha256:p1", T0)
        n.touch(T0 + 14 * DAY)
    return p


def code_agent() -> Profile:
    """A code-generation agent still exploring on its last day: many ports to one network, an
    IPv6 registry, a growing set of tools; coverage-stop is not reached."""
    p = Profile(Workload("dev", "Deployment", "code-agent", "main"))
    node = p.node("node-a")
    for day in range(6):
        start = T0 + day * DAY
        b = {f"syscall:{k}": v for k, v in BASE_SYSCALLS.items()}
        b["syscall:clone3"] = 3
        b["syscall:wait4"] = 3
        b["syscall:pipe2"] = 2
        for port in (8000, 8001, 8002, 8003, 8004, 8080):
            b[f"connect:tcp:172.16.5.20:{port}"] = 2
        if day == 0:
            b["connect:tcp:172.16.5.21:8004"] = 1
        b["connect:tcp:[2001:db8:1::10]:443"] = 3
        b["connect:tcp:[2001:db8:1::11]:443"] = 3
        b["exec:/usr/local/bin/python3.11"] = 5
        b["exec:/bin/sh"] = 3
        _session(node, f"c{day}", start, start + 3 * HOUR, b)
    # the last day brings new tools and a new destination
    start = T0 + 6 * DAY
    b = {f"syscall:{k}": v for k, v in BASE_SYSCALLS.items()}
    b.update({"exec:/usr/bin/gcc": 1, "exec:/usr/bin/make": 1, "syscall:memfd_create": 1,
              "connect:tcp:198.51.100.9:443": 1})
    _session(node, "c6", start, None, b)
    node.touch(start + 4 * HOUR)
    return p


def batch_job() -> Profile:
    """A host unit recorded with ``envelope record``: one run per day, no annotations."""
    p = Profile(Workload.host("nightly-report"))
    node = p.node("host-1")
    for day in range(10):
        start = T0 + day * DAY + 2 * HOUR
        b = {f"syscall:{k}": v for k, v in BASE_SYSCALLS.items()}
        b["syscall:stat"] = 4
        b["syscall:sendto"] = 2
        b["send:udp:127.0.0.53:53"] = 2
        b["connect:tcp:192.0.2.15:5432"] = 1
        b["exec:/usr/local/bin/report"] = 1
        if day % 4 == 0:
            b["connect:tcp:192.0.2.200:443"] = 1
        _session(node, f"run{day}", start, start + 600, b)
    node.touch(T0 + 11 * DAY)
    return p


def corpus_agent() -> Profile:
    """The research-corpus agent of the README: five days of sessions that list the bucket
    research-corpus-v2, read two or three papers, check one with HeadObject and post a job to the
    queue research-jobs-v1, under the role of its service account; the first session also reads a
    draft once. Then two quiet days."""
    p = Profile(Workload("research", "Deployment", "corpus-agent", "agent"))
    node = p.node("node-a")
    tasks = [[1, 2, 3], [2, 4, 5], [3, 6], [1, 7, 8], [5, 6, 8]]
    for day, docs in enumerate(tasks):
        start = T0 + day * DAY
        b = {f"syscall:{k}": v for k, v in BASE_SYSCALLS.items()}
        b["syscall:connect"] = 4
        b["connect:tcp:52.216.8.10:443"] = 3   # the S3 and SQS endpoints
        b["connect:tcp:52.46.128.20:443"] = 1
        b["exec:/usr/bin/python3.11"] = 1
        b["aws:s3:ListObjectsV2 arn:aws:s3:::research-corpus-v2"] = 1
        for d in docs:
            b[f"aws:s3:GetObject arn:aws:s3:::research-corpus-v2/papers/{d}.pdf"] = 1
        b[f"aws:s3:HeadObject arn:aws:s3:::research-corpus-v2/papers/{docs[0]}.pdf"] = 1
        b["aws:sqs:SendMessage arn:aws:sqs:us-east-1:123456789012:research-jobs-v1"] = 1
        b["aws:sts:GetCallerIdentity"] = 1
        if day == 0:
            b["aws:s3:GetObject arn:aws:s3:::research-corpus-v2/notes/draft.txt"] = 1
        _session(node, f"s{day}", start, start + HOUR, b)
    node.add_fingerprint("image", "sha256:3333cccc", T0)
    node.add_fingerprint("service_account", "research/corpus-agent", T0)
    node.add_fingerprint("cloud_identity:aws", "arn:aws:iam::123456789012:role/research-agent", T0)
    node.touch(T0 + 7 * DAY)
    return p


PROFILES = {"research-agent": research_agent, "code-agent": code_agent, "batch-job": batch_job,
            "corpus-agent": corpus_agent}


def profile_path(name: str) -> Path:
    return HERE / f"{name}.profile.json"


def write_profiles() -> None:
    for name, build in PROFILES.items():
        profile_path(name).write_text(json.dumps(build().pack(), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    write_profiles()
