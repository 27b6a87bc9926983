"""The file substrate in the real kernel (bpf/files.c): successful accesses counted per cgroup as
``file:KIND:PATH`` behaviours with relative paths resolved, failures and O_PATH not counted, the
per-cgroup bound with its overflow counted, a gone cgroup's keys dropped, and -EACCES of a
watched cgroup under Landlock reported with path, access and process (no audit needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from enforcer import landlock
from enforcer.exec_needs import resolve
from enforcer.file_denials import FileDenialProbe
from enforcer.landlock_rules import compile_ruleset
from sensor.cgroup import CgroupFS
from sensor.events import FILE_ACC_EXEC, FILE_ACC_READ, FileDenialEvent, decode
from sensor.file_observer import FileObserver
from sensor.kernel import RingReader
from sensor.probes import Sensor

PY = "/usr/bin/python3"

# Does its file work, prints "ready", and waits for a line on stdin before exiting, so the
# test reads the counts while the process (its cwd, its fds) still exists.
WORKLOAD = textwrap.dedent("""
    import os, sys
    w = sys.argv[1]
    os.chdir(w)
    for _ in range(3):
        open("/etc/hostname").read()                       # read, absolute, three times
    with open("notes.txt", "w") as f:                     # write+create+truncate, relative to the cwd
        f.write("x")
    d = os.open("sub", os.O_RDONLY | os.O_DIRECTORY)       # list, relative
    fd = os.open("inner.txt", os.O_RDWR | os.O_CREAT, 0o600, dir_fd=d)  # read+write+create, dirfd-relative
    os.close(fd)
    os.close(os.open(w + "/sub", os.O_RDONLY))             # a directory without O_DIRECTORY: a list
    os.close(os.open(w + "/notes.txt", os.O_PATH))         # O_PATH: no access
    try:
        open(w + "/missing.txt")                           # fails: not a behaviour
    except FileNotFoundError:
        pass
    os.mkdir(w + "/made")
    os.rename(w + "/notes.txt", w + "/made/notes.txt")
    os.symlink("made", w + "/link")
    os.mkfifo(w + "/fifo")
    os.truncate(w + "/made/notes.txt", 0)
    os.unlink(w + "/made/notes.txt")
    os.rmdir(w + "/made")
    print("ready", flush=True)
    sys.stdin.readline()
""")


@pytest.fixture
def cgroup():
    fs = CgroupFS()
    rel = f"/envelope-test-files-{os.getpid()}-{time.monotonic_ns()}"
    path, cid = fs.make(rel)
    yield path, cid
    fs.remove(rel)


def start_in(cgroup_path, argv, **kw):
    def join():
        with open(os.path.join(cgroup_path, "cgroup.procs"), "w") as f:
            f.write("0")
    return subprocess.Popen(argv, preexec_fn=join, **kw)


def readings_for(sensor, cid, want, timeout=10.0):
    """Poll (announcements resolve relative paths) until ``want`` keys are counted."""
    deadline = time.monotonic() + timeout
    got = {}
    while time.monotonic() < deadline:
        sensor.poll(50)
        got = sensor.behaviour_counts().get(cid, {})
        if want <= set(got):
            break
    return got


def test_accesses_are_counted_per_cgroup_as_file_behaviours(tmp_path, cgroup):
    path, cid = cgroup
    w = tmp_path / "w"
    (w / "sub").mkdir(parents=True)
    with Sensor(ringbuf_pages=64, extensions=[FileObserver()]) as sensor:
        p = start_in(path, [PY, "-S", "-c", WORKLOAD, str(w)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     text=True)
        try:
            assert p.stdout.readline() == "ready\n"
            want = {
                "file:read:/etc/hostname",
                f"file:write:{w}/notes.txt", f"file:create:{w}/notes.txt", f"file:truncate:{w}/notes.txt",
                f"file:list:{w}/sub",
                f"file:read:{w}/sub/inner.txt", f"file:write:{w}/sub/inner.txt", f"file:create:{w}/sub/inner.txt",
                f"file:mkdir:{w}/made", f"file:remove:{w}/notes.txt", f"file:create:{w}/made/notes.txt",
                f"file:symlink:{w}/link", f"file:mkfifo:{w}/fifo", f"file:truncate:{w}/made/notes.txt",
                f"file:remove:{w}/made/notes.txt", f"file:rmdir:{w}/made",
            }
            got = readings_for(sensor, cid, want)
        finally:
            p.communicate("go\n", timeout=30)
        loss = sensor.loss()
        mine_lost = sensor.cgroup_loss().get(cid, {})
    mine = {k: r for k, r in got.items() if k.startswith("file:") and str(w) in k or k == "file:read:/etc/hostname"}
    assert want <= set(mine), sorted(want - set(mine))
    assert got["file:read:/etc/hostname"].count == 3
    assert got[f"file:list:{w}/sub"].count == 2  # once with O_DIRECTORY, once found to be a directory
    assert got["file:read:/etc/hostname"].first_seen <= got["file:read:/etc/hostname"].last_seen
    assert abs(got["file:read:/etc/hostname"].last_seen - time.time()) < 60  # wall clock, not ktime
    assert not [k for k in mine if "missing.txt" in k]  # a failed open is no behaviour
    assert f"file:read:{w}/notes.txt" not in mine  # the O_PATH open is no access either
    # node-wide kernel counters are named; what belongs to this cgroup is its own: nothing lost here
    assert {"files_ringbuf_full_first", "files_path_unreadable", "files_map_full"} <= set(loss)
    assert mine_lost == {}, mine_lost


def test_the_per_cgroup_bound_counts_overflow_and_a_gone_cgroup_is_forgotten(tmp_path, cgroup):
    path, cid = cgroup
    for i in range(20):
        (tmp_path / f"f{i}").write_text("x")
    obs = FileObserver(per_cgroup=8)
    script = f"import glob\nfor p in sorted(glob.glob({str(tmp_path)!r} + '/f*')): open(p).read()\n"
    with Sensor(ringbuf_pages=64, extensions=[obs]) as sensor:
        p = start_in(path, [PY, "-S", "-c", script])
        assert p.wait(30) == 0
        sensor.poll(50)
        got = sensor.behaviour_counts().get(cid, {})
        assert len(got) == 8  # python's own opens and the first files, up to the bound
        from sensor.mirrors import U64, FileCgroup
        fc = FileCgroup.unpack(obs._cgroups.lookup(U64.pack(cid)))
        assert fc["keys"] == 8 and fc["overflow"] >= 12
        assert sensor.cgroup_loss()[cid]["files_cgroup_overflow"] == fc["overflow"]
        sensor.forget_cgroup(cid)
        sensor.behaviour_counts()  # the extension forgets after this last reading
        assert cid not in sensor.behaviour_counts()
        assert obs._cgroups.lookup(U64.pack(cid)) is None
        assert not [k for k in obs._counts.keys() if k.startswith(U64.pack(cid))]  # its keys deleted


def test_landlock_refusals_of_a_watched_cgroup_are_reported_from_the_syscall_exit(tmp_path, cgroup):
    path, cid = cgroup
    allowed, secret = tmp_path / "allowed.txt", tmp_path / "secret.txt"
    allowed.write_text("ok\n")
    secret.write_text("no\n")
    compiled = compile_ruleset("test/Unit/files/main", execs=[PY, "/usr/bin/true"],
                               files=[f"file:read:{allowed}", "file:read:/usr/lib/python3.11/**",
                                      "file:list:/usr/lib/python3.11/**",
                                      "file:read:/etc/ld.so.cache", "file:read:/lib/x86_64-linux-gnu/*"],
                               exec_needs=resolve([PY]))
    script = textwrap.dedent(f"""
        import os, subprocess
        print(open({str(allowed)!r}).read().strip())
        for attempt in (lambda: open({str(secret)!r}).read(), lambda: subprocess.run(["/bin/sh", "-c", "true"])):
            try:
                attempt()
            except PermissionError:
                print("EACCES")
    """)
    probe = FileDenialProbe()
    reader = RingReader()
    events = []
    reader.add(probe.events_fd, lambda raw: events.append(decode(raw)))
    try:
        probe.watch(cid)
        with landlock.Ruleset.build(compiled) as rs:
            def child():
                with open(os.path.join(path, "cgroup.procs"), "w") as f:
                    f.write("0")
                rs.restrict_self()
            p = subprocess.Popen([PY, "-S", "-c", script], preexec_fn=child, stdout=subprocess.PIPE, text=True)
            out, _ = p.communicate(timeout=60)
        assert out.split() == ["ok", "EACCES", "EACCES"]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(events) < 2:
            reader.poll(100)
        # an unwatched cgroup's refusals are not reported
        probe.unwatch(cid)
        with landlock.Ruleset.build(compiled) as rs:
            subprocess.run([PY, "-S", "-c", script], preexec_fn=rs.restrict_self, capture_output=True, timeout=60)
        reader.poll(200)
    finally:
        reader.close()
        probe.close()
    denials = [e for e in events if isinstance(e, FileDenialEvent)]
    by_path = {e.path: e for e in denials}
    assert {str(secret), "/bin/sh"} <= set(by_path), denials  # and what python reads that this ruleset leaves out
    cred = by_path[str(secret)]
    assert cred.access == FILE_ACC_READ and cred.ret == -13 and cred.syscall == "openat"
    assert cred.cgroup_id == cid and cred.pid == p.pid and cred.comm == "python3"
    sh = by_path["/bin/sh"]
    assert sh.access == FILE_ACC_EXEC and sh.syscall == "execve" and sh.pid != p.pid  # the forked child


def test_proc_paths_of_a_process_the_reader_may_not_ptrace_are_unknown_not_guessed(tmp_path):
    """With the DaemonSet's capabilities (BPF, PERFMON, NET_ADMIN) ptrace's access check refuses
    /proc/<pid>/cwd and root of a root process that has more capabilities: its relative paths
    and directories are unknown (None), never looked up in the reader's own root instead."""
    (tmp_path / "d").mkdir()
    target = subprocess.Popen(["sleep", "30"], cwd=tmp_path)
    probe = ("import sys; from sensor.proc_paths import ProcPaths; from sensor.events import FILE_AT_FDCWD\n"
             "p = ProcPaths(); pid = int(sys.argv[1])\n"
             "print(p.base(pid, FILE_AT_FDCWD), p.is_dir(pid, sys.argv[2]))\n")
    try:
        def run(prefix):
            out = subprocess.run(prefix + [sys.executable, "-c", probe, str(target.pid), str(tmp_path / "d")],
                                 capture_output=True, text=True, check=True,
                                 cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
            return out.stdout.split()
        assert run([]) == [str(tmp_path), "True"]
        assert run(["setpriv", "--bounding-set", "-all,+bpf,+perfmon,+net_admin", "--"]) == ["None", "None"]
    finally:
        target.kill()
        target.wait()
