"""Scenario: record → derive → enforce, on real runc containers, through Envelope's own pipeline.

A busybox "agent" container of Deployment agents/research-agent runs several times under runc
with a kubelet-style cgroupsPath and CRI annotations. The sensor counts its syscalls in the
kernel, the resolver names its workload from the cgroup and the OCI annotations, and the
aggregator builds its profile. ``derive`` makes a policy, ``compile_oci`` turns it into the OCI
profile (with runc's runtime-completeness set), and the container runs again with that profile in
its ``config.json``: it starts and does its work, while a variation that calls ``unshare`` gets
EPERM, and the seccomp denial probe reports that denial for the container's cgroup.
"""

from __future__ import annotations

import time

import pytest

from enforcer.derive import DeriveOptions, derive
from enforcer.seccomp import DENY_ERRNO, compile_oci
from sensor.pump import session_of
from sensor.aggregate import Aggregator
from sensor.cgroup import CgroupFS
from sensor.identity import Resolver
from sensor.probes import Sensor
from sensor.syscalls import name as syscall_name
from sensor.workload import Workload
from tests.privileged.runc_bundle import RuncContainer

WORKLOAD = Workload("agents", "Deployment", "research-agent", "agent")
WORK = "echo started; ls / > /dev/null; cat /etc/passwd > /dev/null; date > /dev/null; echo done"
SESSIONS = 5

pytestmark = pytest.mark.runc


def run_recorded(sensor: Sensor, agg: Aggregator, resolver: Resolver, cgfs: CgroupFS, workdir) -> str:
    """One container instance, recorded as one session; returns its stdout."""
    with RuncContainer.deployment("agents", "research-agent", "agent", ["/bin/sh", "-c", WORK],
                                  workdir) as c:
        c.create()
        pid = c.wait_running()
        rel, cid = cgfs.pid_cgroup(pid)
        ident = resolver.resolve(cid, pid)
        agg.bind(cid, ident.workload, session_of(ident))
        c.start()
        deadline = time.monotonic() + 60
        while (st := c.state()) is not None and st.get("status") != "stopped":
            assert time.monotonic() < deadline, "container did not finish"
            for ev in sensor.poll(50):
                agg.on_event(ev, sensor.wall_time(ev.ktime))
        for ev in sensor.poll(50):
            agg.on_event(ev, sensor.wall_time(ev.ktime))
        # before runc removes the cgroup; from the container's first exec, as the daemon counts
        agg.on_counts(sensor.syscall_counts(after_exec={cid}), time.time())
        agg.unbind(cid)
        return c.read_stdout()


def test_recorded_container_policy_starts_it_again_and_denies_what_it_never_did(tmp_path):
    cgfs = CgroupFS()
    resolver = Resolver(cgfs)
    agg = Aggregator("node-a", None, syscall_name)
    with Sensor() as sensor:
        for i in range(SESSIONS):
            out = run_recorded(sensor, agg, resolver, cgfs, tmp_path / f"rec{i}")
            assert out.split() == ["started", "done"]
    profile = agg.profile(WORKLOAD)
    assert profile.session_count == SESSIONS
    behaviours = profile.behaviours()
    # busybox's shell runs some applets by exec'ing /proc/self/exe: the sensor
    # reports the path exactly as it was passed to execve
    assert {k for k in behaviours if k.startswith("exec:")} == {"exec:/bin/sh", "exec:/proc/self/exe"}
    assert behaviours["exec:/proc/self/exe"].sessions == SESSIONS
    assert "syscall:unshare" not in behaviours

    # The observation window is seconds long, so coverage-stop would refuse: force it, as the
    # demo does, and enforce explicitly.
    policy = derive(profile, DeriveOptions(force=True, mode="enforce"))
    assert policy.workload == WORKLOAD and policy.low_confidence
    assert "getdents64" in policy.syscalls and "unshare" not in policy.syscalls
    compiled = compile_oci(policy, "enforce", runtime="runc")
    assert any(e.rule == "runtime-completeness:runc" for e in compiled.report)

    # The same container, started again under the derived profile, does its work.
    with RuncContainer.deployment("agents", "research-agent", "agent", ["/bin/sh", "-c", WORK],
                                  tmp_path / "again", seccomp=compiled.profile) as c:
        c.run()
        assert c.wait() == 0, c.read_stderr()
        assert c.read_stdout().split() == ["started", "done"]

    # A variation that makes a syscall the workload never made is denied, and the denial is
    # reported for the container's cgroup even though seccomp stops it before sys_enter.
    from enforcer.denials import DenialProbe
    from sensor.kernel import RingReader as RingBufferReader
    from sensor.events import SeccompDenialEvent, decode

    probe, reader = DenialProbe(), RingBufferReader()
    denials: list = []
    reader.add(probe.events_fd, lambda raw: denials.append(decode(raw)))
    try:
        with RuncContainer.deployment("agents", "research-agent", "agent",
                                      ["/bin/sh", "-c", "unshare -n true; echo rc=$?"], tmp_path / "bad",
                                      seccomp=compiled.profile) as c:
            c.create()
            pid = c.wait_running()
            _, cid = cgfs.pid_cgroup(pid)
            probe.watch(cid, "enforce", DENY_ERRNO, policy.syscalls)
            c.start()
            c.wait()
            out, err = c.read_stdout(), c.read_stderr()
            assert "rc=1" in out, (out, err)
            assert "Operation not permitted" in err
            deadline = time.monotonic() + 10
            found: list = []
            while not found and time.monotonic() < deadline:
                reader.poll(100)
                found = [d for d in denials if isinstance(d, SeccompDenialEvent)
                         and d.cgroup_id == cid and d.name == "unshare"]
            assert found, denials
    finally:
        reader.close()
        probe.close()
