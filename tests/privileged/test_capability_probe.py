"""The capability probe against the real kernel: real BPF on capability:cap_capable, real cgroup v2
directories, real processes and a real runc container.

A small C workload (tests/privileged/workloads/capability_workload.c) performs operations whose
capability checks are known: a bind below 1024, a chown, a raw socket, a UTS namespace with a
hostname, private mappings. Each test runs it in fresh cgroups (named with this process's pid)
and expects exact counts for that cgroup and nothing for a sibling.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from sensor import capability_observer, features
from sensor.cgroup import CgroupFS, cgroup2_mount_point, cgroup_id
from sensor.kernel import LoadError, load

WORKLOAD_C = Path(__file__).resolve().parent / "workloads" / "capability_workload.c"
NOBODY = 65534


@pytest.fixture(scope="module")
def shared_dir():
    """A directory user nobody can reach (pytest's own tmp_path is root's only)."""
    d = Path(tempfile.mkdtemp(prefix=f"envelope-caps-{os.getpid()}-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def workload(shared_dir) -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed to build the test workload; run make setup")
    out = shared_dir / "capability_workload"
    subprocess.run([gcc, "-O1", "-Wall", "-o", str(out), str(WORKLOAD_C)], check=True)
    out.chmod(0o755)
    return str(out)


@pytest.fixture(scope="module")
def probe():
    how, detail = capability_observer.available()
    if how is None:
        pytest.fail(f"this kernel has no capability probe: {detail}")
    from sensor.probes import Sensor

    obs = capability_observer.CapabilityObserver(how=how)
    s = Sensor(extensions=[obs])
    s.attach()
    yield s, obs
    s.close()


@pytest.fixture
def cgroups():
    """Fresh cgroups under the cgroup2 mount, named with this pid; every one is removed afterwards."""
    fs = CgroupFS()
    made: list[str] = []

    def make() -> tuple[Path, int]:
        rel = f"/envelope-caps-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        made.append(rel)
        return fs.make(rel)

    yield make
    for rel in made:
        fs.remove(rel)


@pytest.fixture
def scratch(shared_dir) -> Path:
    d = shared_dir / uuid.uuid4().hex[:8]
    d.mkdir(mode=0o755)
    return d


def run_in(cgroup: Path, argv: list[str], as_nobody: bool = False) -> str:
    """Run ``argv`` in ``cgroup`` (joined before exec; with ``as_nobody``, the child then drops to
    user and group nobody before exec, so those checks are the pre-exec phase's)."""
    def enter():
        with open(cgroup / "cgroup.procs", "w") as f:
            f.write("0")
        if as_nobody:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)

    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, preexec_fn=enter)
    assert p.returncode == 0, p.stderr
    return p.stdout


def counts(readings: dict, cg: int) -> dict[str, int]:
    return {k: r.count for k, r in readings.get(cg, {}).items()}


def test_granted_checks_are_counted_exactly_for_their_cgroup_only(probe, cgroups, workload, scratch):
    sensor, _ = probe
    a, a_id = cgroups()
    b, b_id = cgroups()
    target = scratch / "owned-by-root"
    target.write_text("x")
    out = run_in(a, [workload, "bind=99", f"chown={target}:{NOBODY}", "raw"])
    assert out.split("\n")[:3] == ["bind ok", "chown ok", "raw ok"]
    run_in(b, [workload, "bind=0", "mmap=10"])  # an unprivileged bind and mappings: no capability
    granted = sensor.behaviour_counts(after_exec={a_id, b_id})
    assert counts(granted, a_id) == {"capability:CHOWN": 1, "capability:NET_BIND_SERVICE": 1,
                                     "capability:NET_RAW": 1}
    assert counts(granted, b_id) == {}
    refused = sensor.refused_counts(after_exec={a_id, b_id})
    assert counts(refused, a_id) == {} and counts(refused, b_id) == {}
    r = granted[a_id]["capability:NET_BIND_SERVICE"]
    assert r.first_seen <= r.last_seen and abs(r.last_seen - time.time()) < 60


def test_refused_checks_of_a_process_without_privilege_are_not_behaviour(probe, cgroups, workload, scratch):
    sensor, _ = probe
    c, c_id = cgroups()
    sibling, s_id = cgroups()
    target = scratch / "owned-by-nobody"
    target.write_text("x")
    os.chown(target, NOBODY, NOBODY)
    out = run_in(c, [workload, "bind=99", "raw", f"chown={target}:0", "uts=x"], as_nobody=True)
    assert out.split("\n")[:4] == ["bind errno 13", "raw errno 1", "chown errno 1", "unshare errno 1"]
    run_in(sibling, [workload, "bind=99"])
    assert counts(sensor.behaviour_counts(after_exec={c_id}), c_id) == {}
    assert counts(sensor.refused_counts(after_exec={c_id}), c_id) == {
        "capability:CHOWN": 1, "capability:NET_BIND_SERVICE": 1, "capability:NET_RAW": 1, "capability:SYS_ADMIN": 1}
    # before the exec the child dropped to nobody: setgroups and setgid (SETGID), setuid (SETUID),
    # granted; counted apart, in the pre-exec phase
    assert counts(sensor.behaviour_counts(), c_id) == {"capability:SETGID": 2, "capability:SETUID": 1}
    assert counts(sensor.refused_counts(), s_id) == {}
    assert counts(sensor.behaviour_counts(after_exec={s_id}), s_id) == {"capability:NET_BIND_SERVICE": 1}


def test_overcommit_accounting_is_left_out_and_a_real_sys_admin_is_not(probe, cgroups, workload):
    sensor, obs = probe
    if features.overcommit_ranges() is None:
        pytest.fail("kernel addresses are hidden from this root process (kptr_restrict=2?)")
    c, c_id = cgroups()
    run_in(c, [workload, "mmap=1"])  # the first CAP_SYS_ADMIN check (anywhere) learns the stack layout
    before = obs.stats()
    out = run_in(c, [workload, "mmap=200"])
    assert out.strip() == "mmap 200"
    after = obs.stats()
    assert after["overcommit"] - before["overcommit"] >= 200  # each private writable mapping asked once
    # with the layout learnt the caller is read from the stack, not walked for (the slow path stays for
    # checks made another way, e.g. while another program is attached to the tracepoint too)
    assert after["stack_walks"] - before["stack_walks"] < 20
    assert "capability:SYS_ADMIN" not in counts(sensor.behaviour_counts(after_exec={c_id}), c_id)
    d, d_id = cgroups()
    out = run_in(d, [workload, "uts=envelope-test", "mmap=50"])
    assert out.split("\n")[:2] == ["unshare ok", "sethostname ok"]
    # unshare(CLONE_NEWUTS) and sethostname in the new namespace: one CAP_SYS_ADMIN check each
    assert counts(sensor.behaviour_counts(after_exec={d_id}), d_id) == {"capability:SYS_ADMIN": 2}
    assert obs.loss() == {"map_full": 0, "unknown_capability": 0}


def test_a_forgotten_cgroup_loses_its_counters(probe, cgroups, workload):
    sensor, obs = probe
    c, c_id = cgroups()
    run_in(c, [workload, "bind=99"])
    assert counts(sensor.behaviour_counts(after_exec={c_id}), c_id) == {"capability:NET_BIND_SERVICE": 1}
    sensor.forget_cgroup(c_id)
    sensor.behaviour_counts()  # the extension forgets after this reading
    assert c_id not in sensor.behaviour_counts() and c_id not in sensor.refused_counts()


@pytest.mark.runc
def test_a_containers_runtime_setup_is_not_its_behaviour(probe, workload, tmp_path):
    """runc init mounts, sets the hostname and drops capabilities in the container's cgroup before
    it execs the container's command: counted, but in the phase before the first exec. runc's
    default capability set has no CAP_CHOWN, so the command's chown is refused."""
    from tests.privileged.runc_bundle import RuncContainer

    sensor, _ = probe
    with RuncContainer.deployment("agents", "caps-agent", "main",
                                  ["sh", "-c", "touch /tmp/f && chown 65534 /tmp/f; exit 0"], tmp_path,
                                  readonly_rootfs=False) as ctr:
        ctr.create()
        cid = cgroup_id(Path(cgroup2_mount_point()) / ctr.cgroups_path.strip("/"))
        ctr.start()
        ctr.wait()
        after = counts(sensor.behaviour_counts(after_exec={cid}), cid)
        whole = counts(sensor.behaviour_counts(), cid)
        refused = counts(sensor.refused_counts(after_exec={cid}), cid)
    assert after == {}
    assert refused == {"capability:CHOWN": 1}
    assert whole.get("capability:SYS_ADMIN", 0) >= 1  # runc init's mounts and sethostname, before the exec


def test_the_kprobe_fallback_passes_the_verifier_and_attaches_where_kprobes_exist(probe, cgroups, workload):
    """Where the tracepoint is missing the probe falls back to a kprobe and a kretprobe on
    cap_capable. The programs load here (the verifier accepts them); they attach only where the
    kernel has kprobes."""
    loaded = load(capability_observer.family("kprobe", attach=False))
    try:
        assert set(loaded.programs) == {"envelope_cap_capable_entry", "envelope_cap_capable_return"}
        assert set(loaded.attachments) == {"raw_tracepoint__sched_process_exec"}
    finally:
        loaded.close()
    if not features.kprobes_available():
        with pytest.raises(LoadError, match="kprobe envelope_cap_capable_entry on cap_capable"):
            load(capability_observer.family("kprobe"))
        return
    from sensor.probes import Sensor

    obs = capability_observer.CapabilityObserver(how="kprobe")
    with Sensor(extensions=[obs]) as s:
        c, c_id = cgroups()
        run_in(c, [workload, "bind=99", "mmap=20"])
        assert counts(s.behaviour_counts(after_exec={c_id}), c_id) == {"capability:NET_BIND_SERVICE": 1}
