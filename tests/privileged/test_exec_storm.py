"""``envelope exec`` under a denial storm, stopped, and killed: real processes, real cgroups.

The storm generator (``bench/progs/denied_storm.c``, compiled here) retries a denied getsid(2)
as fast as it can, in several processes. The seccomp denial programs count every call in the
kernel; ``exec`` folds what it reads and appends it to the violations store at every step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.privileged.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
ENVELOPE = [sys.executable, "-m", "envelope.cli"]
STORM_C = ROOT / "bench" / "progs" / "denied_storm.c"


@pytest.fixture(scope="module")
def storm(tmp_path_factory) -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed to build the storm generator; run make setup")
    out = tmp_path_factory.mktemp("storm") / "denied_storm"
    subprocess.run([gcc, "-O2", "-Wall", "-o", str(out), str(STORM_C)], check=True)
    return str(out)


@pytest.fixture
def state_dir(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def policy_file(tmp_path, storm) -> Path:
    """Every syscall but getsid (the one the storm retries) and execve: no program may be exec'd
    but the storm itself, by the launch."""
    from enforcer.policy import Policy, dump_policy
    from sensor import syscalls
    from sensor.workload import Workload
    from tests.privileged.test_exec_context import launch_provenance
    p = Policy(workload=Workload.host(f"storm-{os.getpid()}"), mode="enforce",
               syscalls=tuple(n for n in syscalls.NUMBERS if n not in ("getsid", "execve", "execveat")),
               execs=(storm,), provenance=(launch_provenance(storm),))
    path = tmp_path / "policy.yaml"
    path.write_text(dump_policy(p))
    return path


@pytest.fixture
def start_exec():
    """Starts ``envelope exec``; afterwards kills whatever is left: the exec, and the cgroup of its
    command (a test that fails half way must not leave a storm running)."""
    started: list[tuple[subprocess.Popen, str | None]] = []

    def start(state_dir: Path, policy: Path, *cmd: str) -> subprocess.Popen:
        proc = subprocess.Popen(ENVELOPE + ["--state-dir", str(state_dir), "exec", "--policy", str(policy),
                                            "--stop-grace", "2", "--", *cmd],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append((proc, str(proc.pid)))
        return proc

    yield start
    from sensor.cgroup import CgroupFS
    for proc, tag in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        for name in exec_cgroups():
            if tag and name.startswith(f"exec-{tag}-"):
                CgroupFS().remove(f"/envelope/{name}")


def getsid_denials(state_dir: Path) -> int:
    r = subprocess.run(ENVELOPE + ["--state-dir", str(state_dir), "violations", "-o", "json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    found = json.loads(r.stdout) if r.stdout else []
    assert r.returncode == (1 if found else 0), r.stderr  # exit 1: violations are a finding
    return sum(v["count"] for v in found
               if v["behaviour"] == "syscall:getsid" and v["action"] == "denied")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def exec_cgroups() -> set[str]:
    from sensor.cgroup import cgroup2_mount_point
    d = cgroup2_mount_point() / "envelope"
    return {p.name for p in d.iterdir() if p.is_dir()} if d.exists() else set()


def own_cgroup(pid: int) -> str | None:
    """The exec cgroup of this exec process's confined command: exec-<pid>.<start>-<n>."""
    tag = str(pid)
    return next((n for n in exec_cgroups() if n.startswith(f"exec-{tag}-")), None)


def procs_in(name: str) -> list[int]:
    from sensor.cgroup import cgroup2_mount_point
    f = cgroup2_mount_point() / "envelope" / name / "cgroup.procs"
    try:
        return [int(x) for x in f.read_text().split()]
    except OSError:
        return []


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_storm_is_counted_visible_during_the_run_bounded_and_stops_on_sigterm(state_dir, policy_file, storm,
                                                                               start_exec):
    proc = start_exec(state_dir, policy_file, storm, "60", "3", "ignore-term")
    # visible to `envelope violations` while the command runs, and growing
    first = wait_for(lambda: getsid_denials(state_dir), 60, "denials in the store during the run")
    rss_a = rss_kib(proc.pid)
    time.sleep(3)
    second = getsid_denials(state_dir)
    rss_b = rss_kib(proc.pid)
    assert proc.poll() is None
    assert second > first > 0
    # folded as they arrive: millions of denials, no growth with their number (the issue saw
    # ~80 MB/s); 32 MiB leaves room for allocator noise, not for one object per denial
    assert second - first > 100_000, (first, second)
    assert rss_b - rss_a < 32 * 1024, (rss_a, rss_b)
    # SIGTERM: forwarded; the storm ignores it, so after the grace its cgroup is killed
    cg = own_cgroup(proc.pid)
    assert cg and procs_in(cg)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGKILL, err
    assert "did not stop in time" in err
    assert cg not in exec_cgroups()
    final = getsid_denials(state_dir)
    assert final >= second
    assert "violation(s) recorded" in err


def test_a_killed_exec_leaves_nothing_running(state_dir, policy_file, storm, start_exec):
    """SIGKILL of exec: its guard kills the command's cgroup at once; what exec had written stays."""
    proc = start_exec(state_dir, policy_file, storm, "60", "2", "ignore-term")
    wait_for(lambda: getsid_denials(state_dir), 60, "denials in the store during the run")
    cg = own_cgroup(proc.pid)
    victims = procs_in(cg)
    assert len(victims) >= 2
    proc.kill()
    proc.wait()
    wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in victims), 30,
             "the confined processes to be killed")
    wait_for(lambda: cg not in exec_cgroups(), 30, "the orphaned cgroup to be removed")
    assert getsid_denials(state_dir) > 0  # nothing it had written is lost


def test_the_next_start_reaps_what_a_killed_exec_and_its_guard_left(state_dir, policy_file, storm, start_exec):
    proc = start_exec(state_dir, policy_file, storm, "60", "1", "ignore-term")
    wait_for(lambda: getsid_denials(state_dir), 60, "the storm to run")
    cg = own_cgroup(proc.pid)
    victims = procs_in(cg)
    guards = [c for c in children(proc.pid) if c not in victims]
    for g in guards:  # the guard first, so nothing ends the storm but the next start
        os.kill(g, signal.SIGKILL)
    proc.kill()
    proc.wait()
    time.sleep(0.5)
    assert victims and all(Path(f"/proc/{p}").exists() for p in victims), "left running"
    assert cg in exec_cgroups()
    r = subprocess.run(ENVELOPE + ["--state-dir", str(state_dir), "exec", "--policy", str(policy_file),
                                   "--mode", "alert", "--", "/bin/true"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "reaping orphaned cgroup" in r.stderr and f"cgroup=/envelope/{cg} populated=True" in r.stderr, r.stderr
    assert cg not in exec_cgroups()
    wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in victims), 30, "the orphans to die")
