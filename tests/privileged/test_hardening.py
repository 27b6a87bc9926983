"""No way out, nothing lost, on the real kernel: a killed ``envelope record`` leaves nothing
running and keeps what it flushed; state and pins made under ``umask 000`` are root's alone (user
nobody can neither change a desired state nor unlink or open a pin); enforce and remove work for
any legal name; the daemon keeps running with a corrupt profile and a workload whose name makes a
long file name, and flushes and reads counters on time under an event flood it cannot keep up
with.

Pins go to a bpffs mounted for the test (a fresh instance: other runs' pins are not touched);
cgroups are named with this process's pid and removed."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from enforcer.policy import EgressRule, Policy, dump_policy
from sensor.cgroup import CgroupFS, host_unit_name
from sensor.store import ProfileStore
from sensor.workload import Workload
from tests.privileged.daemon_log import LogReader
from tests.privileged.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534
FLOOD_C = Path(__file__).resolve().parent / "workloads" / "udp_flood.c"


def envelope(*args, preexec=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "envelope.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=preexec, timeout=timeout)


def mode(p) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def as_nobody(fn) -> int:
    """Run ``fn()`` in a child as user nobody; returns the errno it got (0: it succeeded)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fn()
        except OSError as e:
            code = e.errno or -1
        except BaseException:
            code = -2
        finally:
            os.write(w, code.to_bytes(4, "little", signed=True))
            os._exit(0)
    os.close(w)
    data = os.read(r, 4)
    os.close(r)
    os.waitpid(pid, 0)
    return int.from_bytes(data, "little", signed=True)


@pytest.fixture
def world(tmp_path):
    """A base directory everybody may enter (so nobody's failures are the state's own modes),
    a private bpffs for pins, and a config that points there."""
    base = Path(tempfile.mkdtemp(prefix=f"envelope-harden-{os.getpid()}-", dir="/tmp"))
    os.chmod(base, 0o755)
    bpffs = base / "bpf"
    bpffs.mkdir()
    os.chmod(bpffs, 0o755)
    if subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], capture_output=True).returncode != 0:
        shutil.rmtree(base)
        pytest.fail("cannot mount a bpffs for the test")
    os.chmod(bpffs, 0o755)
    cfg = base / "config.yaml"
    cfg.write_text(f"bpffs: {bpffs}\nflush_interval: 1.0\npoll_interval: 0.5\n")
    os.chmod(cfg, 0o644)
    yield base, base / "state", bpffs, cfg
    for pin_dir in sorted((bpffs / "envelope").glob("*")) if (bpffs / "envelope").is_dir() else []:
        from enforcer.egress import EgressProgram
        try:
            EgressProgram.adopt(pin_dir).remove()
        except Exception:  # noqa: BLE001 - cleanup
            pass
    subprocess.run(["umount", str(bpffs)], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def cgroup():
    fs = CgroupFS()
    made = []

    def make(name: str) -> Path:
        rel = f"/envelope.test/{name}"
        path, _ = fs.make(rel)
        made.append(rel)
        return path
    yield make
    for rel in made:
        fs.remove(rel)
    if made:
        fs.remove_empty_parents(made[-1], stop="/")


# ---- record survives its own death -------------------------------------------------------------

KILLED_SRC = r"""
import ctypes, os, subprocess, sys, time
libc = ctypes.CDLL(None)
grandchild = subprocess.Popen(["/bin/sleep", "600"], start_new_session=True)
for _ in range(5):
    libc.personality(0xffffffff)
open(sys.argv[1], "w").write(f"{os.getpid()} {grandchild.pid}")
time.sleep(600)
"""


def test_a_killed_record_leaves_nothing_running_and_keeps_what_it_flushed(world):
    base, state, _bpffs, cfg = world
    marker = base / "pids"
    w = Workload.host(f"killed-{os.getpid()}")
    rec = subprocess.Popen([sys.executable, "-m", "envelope.cli", "--config", str(cfg), "--state-dir", str(state),
                            "record", "--workload", w.name, "--session", "s1", "--",
                            "/usr/bin/python3", "-c", KILLED_SRC, str(marker)],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = ProfileStore(state)
    child = grandchild = None
    try:
        wait_for(marker.exists, what="the recorded command to start")
        child, grandchild = map(int, marker.read_text().split())

        def flushed():
            try:
                p = store.load(w)
            except Exception:  # noqa: BLE001 - the file may be mid-write... it never is (atomic)
                raise
            b = p.behaviours() if p else {}
            return b.get("syscall:personality") and b["syscall:personality"].count == 5
        wait_for(flushed, what="the running session to be flushed")
        own = [d for d in (CgroupFS().root / "envelope.record").iterdir() if d.name.startswith(f"{rec.pid}-")]
        assert len(own) == 1
        os.kill(rec.pid, signal.SIGKILL)
        rec.wait()
        wait_for(lambda: not alive(child), timeout=30, what="the command to die with its recorder")
        # the recorder's guard kills the whole cgroup when its owner dies; a cgroup left behind
        # (a guard killed too) is reaped by the next start
        wait_for(lambda: not alive(grandchild), timeout=30, what="what it started to die too")
        left = own[0].is_dir()
        r = envelope("--config", cfg, "--state-dir", state, "record", "--workload", w.name, "--session", "s2",
                     "--", "/bin/true")
        assert r.returncode == 0, r.stderr
        if left:
            assert "reaping orphaned cgroup" in r.stderr and f"/envelope.record/{own[0].name}" in r.stderr, r.stderr
        assert f"closed session s1 of {w.key}: its recorder died" in r.stderr
        assert not own[0].exists()
    finally:
        if rec.poll() is None:
            rec.kill()
        for pid in (child, grandchild):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
    p = store.load(w)
    sessions = {s.id: s for s in p.sessions()}
    assert set(sessions) == {"s1", "s2"}
    assert sessions["s1"].end is not None and sessions["s1"].meta["ended"] == "recorder died"
    assert p.behaviours()["syscall:personality"].count == 5  # what was flushed before the kill


# ---- state that nobody else can change ------------------------------------------------------------


def _listener_policy(w: Workload, path: Path) -> Path:
    f = path.parent / f"{uuid.uuid4().hex[:8]}.yaml"
    f.write_text(dump_policy(Policy(w, mode="enforce", substrates=("egress",),
                                    egress=(EgressRule("tcp", "127.0.0.1/32", (9,)),))))
    return f


def test_state_and_pins_made_under_umask_000_are_roots_alone(world, cgroup):
    base, state, bpffs, cfg = world
    w = Workload.host(f"umask-{os.getpid()}")
    cg = cgroup(f"umask-{os.getpid()}")
    policy = _listener_policy(w, base / "x")
    r = envelope("--config", cfg, "--state-dir", state, "enforce", w.key, "--policy", policy, "--cgroup", cg,
                 "--reason", "umask test", preexec=lambda: os.umask(0))
    assert r.returncode == 0, r.stderr
    from enforcer.egress import pin_dir_for
    from sensor.state_dir import StateDir
    layout = StateDir(state)
    pin = pin_dir_for(bpffs, w.key)
    for d in (state, layout.enforce, layout.modes, layout.keys, bpffs / "envelope", pin):
        assert mode(d) == 0o700, d
    for f in (layout.desired(w.key), layout.mode(w.key), layout.audit_log, layout.audit_head, layout.audit_key,
              *pin.iterdir()):
        assert mode(f) == 0o600, f
    desired = layout.desired(w.key)
    a_pin = pin / "map_config"
    # what user nobody did before: replace the desired state, unlink a pin, open a map by path
    assert as_nobody(lambda: open(desired, "w").write("mode: observe\n")) == errno.EACCES
    assert as_nobody(lambda: os.listdir(state)) == errno.EACCES
    assert as_nobody(lambda: os.unlink(a_pin)) == errno.EACCES

    def open_map():
        from sensor import kernel
        os.close(kernel.obj_get(a_pin))
    assert as_nobody(open_map) in (errno.EACCES, errno.EPERM)
    assert a_pin.exists()
    r = envelope("--config", cfg, "--state-dir", state, "enforce", w.key, "--remove", "--reason", "done")
    assert r.returncode == 0, r.stderr
    assert not pin.exists()


@pytest.mark.parametrize("name", ["l" * 230, "/system.slice/agent.service"], ids=["230 characters", "slashes"])
def test_enforce_and_remove_any_legal_name(world, cgroup, name):
    base, state, bpffs, cfg = world
    w = Workload("host", "Unit", name, "main")
    cg = cgroup(f"name-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    policy = _listener_policy(w, base / "x")
    r = envelope("--config", cfg, "--state-dir", state, "enforce", w.key, "--policy", policy, "--cgroup", cg,
                 "--reason", "any name")
    assert r.returncode == 0, r.stderr
    from enforcer import audit
    from enforcer.desired import read_desired
    from enforcer.egress import pin_dir_for
    assert [x[0] for x in read_desired(state)] == [w]
    assert pin_dir_for(bpffs, w.key).is_dir()
    r = envelope("--config", cfg, "--state-dir", state, "enforce", w.key, "--remove", "--reason", "done")
    assert r.returncode == 0, r.stderr
    assert "enforcement removed" in r.stdout
    assert read_desired(state) == [] and not pin_dir_for(bpffs, w.key).exists()
    assert [e["action"] for e in audit.read(state)] == ["policy.apply", "mode.set", "policy.remove"]
    assert audit.verify(state).ok


# ---- a daemon that keeps running ------------------------------------------------------------------


def _daemon(state, cfg, *extra):
    proc = subprocess.Popen([sys.executable, "-m", "envelope.cli", "--config", str(cfg), "--state-dir", str(state),
                             "--log-json", "daemon", "--metrics-port", "0", *extra],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    log = LogReader(proc.stderr)
    line = log.wait_for("metrics endpoint listening")
    port = json.loads(line)["port"]
    log.wait_for("ready")
    return proc, log, port


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run_in(cg: Path, argv: list[str]) -> int:
    return subprocess.Popen(argv, preexec_fn=lambda: open(f"{cg}/cgroup.procs", "w").write("0")).wait()


def test_the_daemon_quarantines_a_corrupt_profile_and_keeps_long_names(world, cgroup):
    base, state, _bpffs, cfg = world
    bad_cg = cgroup(f"corrupt-{os.getpid()}.scope")
    long_cg = cgroup("l" * 200 + f"-{os.getpid()}.scope")
    bad = Workload.host(host_unit_name(str(bad_cg)))
    long = Workload.host(host_unit_name(str(long_cg)))
    store = ProfileStore(state)
    path = store.path_for(bad)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"ENVPROF\x01" + os.urandom(64))  # a profile whose digest does not match
    os.chmod(path, 0o600)
    assert len(store.path_for(long).name) <= 200 and "+" in store.path_for(long).name
    proc, _log, port = _daemon(state, cfg)
    try:
        for cg in (bad_cg, long_cg):
            assert _run_in(cg, ["/usr/bin/python3", "-c", "import ctypes; ctypes.CDLL(None).personality(0xffffffff)"]) == 0
        wait_for(lambda: set(store.workloads()) >= {bad, long}, what="both profiles to be flushed")
        [q] = store.quarantined()
        assert q.name.endswith(path.name) and q.read_bytes().startswith(b"ENVPROF\x01")
        assert _metrics(port)["envelope_profiles_quarantined_total"] == 1.0
        assert proc.poll() is None  # still running
        assert "syscall:personality" in store.load(long).behaviours()
    finally:
        _stop(proc)
    assert proc.returncode == 0


def test_the_daemon_flushes_and_reads_counters_on_time_under_a_flood(world, cgroup, tmp_path):
    """An event flood the daemon cannot keep up with (one sender at full speed, a new destination
    every datagram): while it lasts, profiles are written and counters read again and again, and
    what the ring could not hold is counted as lost, not hidden."""
    base, state, _bpffs, cfg = world
    flood = tmp_path / "udp_flood"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(flood), str(FLOOD_C)], check=True)
    cg = cgroup(f"flood-{os.getpid()}.scope")
    w = Workload.host(host_unit_name(str(cg)))
    store = ProfileStore(state)
    proc, _log, port = _daemon(state, cfg)
    try:
        before = _metrics(port)
        gen = subprocess.Popen([str(flood), "12"], stdout=subprocess.PIPE, text=True,
                               preexec_fn=lambda: open(f"{cg}/cgroup.procs", "w").write("0"))
        seen: dict[int, float] = {}  # node contribution generation -> sendto count then
        while gen.poll() is None:
            try:
                p = store.load(w)
            except Exception:  # noqa: BLE001 - not written yet
                p = None
            if p is not None:
                c = p.nodes[next(iter(p.nodes))]
                b = c.behaviours.get("syscall:sendto")
                seen.setdefault(c.generation, b.count if b else 0)
            time.sleep(0.25)
        out = gen.stdout.read()
        sends = int(out.split()[0].split("=")[1])
        after = _metrics(port)
    finally:
        _stop(proc)
    events = sum(v for k, v in after.items() if k.startswith("envelope_events_total")) - \
        sum(v for k, v in before.items() if k.startswith("envelope_events_total"))
    assert sends > 100_000 and events > 0, (sends, events)  # it was a flood
    assert len(seen) >= 4, seen  # the profile was written again and again while it ran
    counts = [seen[g] for g in sorted(seen)]
    assert counts[-1] > counts[0], counts  # and the syscall counters were read in between
    p = store.load(w)
    # destinations are counted in the kernel and only first sightings announced, up to the
    # cgroup's cap: every send is in the profile, none of it hidden, whatever the ring took
    assert p.behaviours()["syscall:sendto"].count >= sends
    assert p.capped and p.overflow()["egress"].count > 0  # a million destinations: capped, bounded
