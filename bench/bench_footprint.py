"""Footprint of ``envelope daemon``: resident memory and CPU, idle, with 100 live workloads,
and while it also enforces syscall and egress policies on 10 of them.

The daemon runs as it would on a node (``envelope --state-dir <tmp> daemon``). Once it logs
"ready" it is sampled idle, then while 100 real cgroups each run a small steady workload
(``bench/progs/workload.c``: a few syscalls, a file read, a fork+exec and a TCP connect every
100 ms), then while ``envelope enforce`` has put 10 of those workloads under alert-mode
syscall + egress policies (the daemon loads the seccomp-denial probe and attaches the egress
programs: the state in which a daemon that compiled BPF itself would map LLVM), then idle again
after they stop. On SIGTERM it flushes; the profiles it wrote are read back to check that it
really saw the workloads.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil

from . import (ROOT, Cgroup, build_programs, kill_process_group, process_cpu_seconds, process_memory,
               process_rss_bytes, process_tree, progress, summarize, unavailable)

TITLE = "Daemon footprint (RSS and CPU, idle and with 100 workloads)"
TARGETS = {"peak RSS MB with 100 workloads": "<= 60",
           "peak RSS MB while enforcing on 10 workloads": "<= 60"}
WORKLOADS = 100
ENFORCED = 10
PERIOD_MS = 100
MB = 1024 * 1024


def params(quick: bool) -> dict:
    if quick:
        return {"idle_s": 5, "load_s": 15, "enforce_s": 10, "after_s": 5}
    return {"idle_s": 20, "load_s": 60, "enforce_s": 30, "after_s": 10}


def method(quick: bool) -> str:
    p = params(quick)
    return (
        f"`.venv/bin/envelope --state-dir <tmp> daemon` is started and waited for until it logs "
        f"\"ready\" (probes attached). Its process tree (the daemon and any children) is then "
        f"sampled every 0.5 s: RSS from `/proc/<pid>/statm`, CPU from `/proc/<pid>/stat` "
        f"(user + system) over each phase. Phases: **idle** {p['idle_s']} s; **load** "
        f"{p['load_s']} s with {WORKLOADS} workloads, each a process in its own new cgroup v2 "
        f"(`bench/progs/workload.c`: getpid, uname, a read of /proc/self/stat, a fork+exec of a "
        f"static no-op and a TCP connect to a local listener every {PERIOD_MS} ms, i.e. about "
        f"{WORKLOADS * 1000 // PERIOD_MS:,} execs/s and connects/s in all); **enforcing** "
        f"{p['enforce_s']} s with the same load while {ENFORCED} of the workloads are under "
        f"`envelope enforce` policies in alert mode (every syscall of the table and TCP to the "
        f"load's listener allowed, so nothing floods the violation log: what is measured is "
        f"the daemon holding the denial probe and {ENFORCED} pinned egress sets; its memory "
        f"maps are checked for libbcc, LLVM and clang); **after** "
        f"{p['after_s']} s once they are gone. RSS is reported as median and peak per phase, and at "
        f"the end of each phase split into anonymous and file-backed or shared (shared libraries such as "
        f"LLVM, which BCC maps) memory, with PSS beside it. "
        f"Finally SIGTERM makes the daemon flush, and its profile store is read back to count how "
        f"many of the {WORKLOADS} workloads it recorded."
    )


class Daemon:
    """``envelope daemon`` as a subprocess, its log collected by a thread."""

    def __init__(self, state_dir: Path):
        exe = ROOT / ".venv" / "bin" / "envelope"
        if not exe.exists():
            found = shutil.which("envelope")
            if not found:
                raise FileNotFoundError(f"{exe} not found (make setup)")
            exe = Path(found)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen([str(exe), "--state-dir", str(state_dir), "daemon"], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.reader = threading.Thread(target=self._read, name="daemon-log", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if "ready" in line:
                self.ready.set()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.2):
            if self.proc.poll() is not None:
                self.reader.join(timeout=2)
                raise DaemonUnavailable(f"daemon exited with status {self.proc.returncode} before "
                                        f"ready: {' | '.join(self.lines[-5:])}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not ready after {timeout:.0f} s: {' | '.join(self.lines[-5:])}")

    def last_error(self) -> str:
        """The daemon's last words: a traceback's final line, or its last log lines."""
        self.reader.join(timeout=2)
        for line in reversed(self.lines):
            if line and not line[0].isspace() and ("Error" in line or "Exception" in line):
                return line.strip()
        return " | ".join(self.lines[-3:])

    def pids(self) -> list[int]:
        """The daemon and its descendants."""
        return process_tree(self.proc.pid)

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_process_group(self.proc)
        kill_process_group(self.proc)  # any children left behind
        self.reader.join(timeout=5)
        return self.proc.returncode


class DaemonUnavailable(RuntimeError):
    pass


def sample(daemon: Daemon, seconds: float, label: str) -> dict:
    """Sample the daemon tree's RSS every 0.5 s for ``seconds``; CPU as cores used over the phase."""
    def tree_cpu() -> float:
        total = 0.0
        for pid in daemon.pids():
            try:
                total += process_cpu_seconds(pid)
            except psutil.NoSuchProcess:
                pass
        return total

    def tree_rss() -> int:
        total = 0
        for pid in daemon.pids():
            try:
                total += process_rss_bytes(pid)
            except psutil.NoSuchProcess:
                pass
        return total

    rss = []
    cpu0, t0 = tree_cpu(), time.monotonic()
    next_report = t0 + 10
    died = None
    while time.monotonic() - t0 < seconds:
        if daemon.proc.poll() is not None:
            died = (f"daemon exited with status {daemon.proc.returncode} during {label} after "
                    f"{time.monotonic() - t0:.0f} s: {daemon.last_error()}")
            break
        rss.append(tree_rss() / MB)
        if time.monotonic() >= next_report:
            progress(f"{label}: {time.monotonic() - t0:.0f}/{seconds} s, RSS {rss[-1]:.1f} MB")
            next_report += 10
        time.sleep(0.5)
    cores = None if died else (tree_cpu() - cpu0) / (time.monotonic() - t0)
    s = summarize(rss)
    row = {"RSS MB (median)": s["median"], "RSS MB (peak)": s["max"], "CPU cores": cores}
    mem: dict[str, int] = {}
    for pid in ([] if died else daemon.pids()):
        try:
            for k, v in process_memory(pid).items():
                mem[k] = mem.get(k, 0) + v
        except psutil.NoSuchProcess:
            pass
    row.update({"anon MB (end)": mem["RssAnon"] / MB if "RssAnon" in mem else None,
                "file MB (end)": mem["RssFile"] / MB if "RssFile" in mem else None,
                "PSS MB (end)": mem["Pss"] / MB if "Pss" in mem else None,
                "processes": len(daemon.pids()) if not died else None,
                "samples": s["n"]})
    if died:
        raise DaemonDied(died, row)
    return row


class DaemonDied(RuntimeError):
    def __init__(self, message: str, row: dict):
        super().__init__(message)
        self.row = row


def run(quick: bool = False) -> dict:
    p = params(quick)
    state = Path(tempfile.mkdtemp(prefix="envelope-bench-state-"))
    progs = None
    daemon = None
    sink = None
    group = None
    workers: list[subprocess.Popen] = []
    cleanup: list = []
    rows, notes, errors = [], [], []
    try:
        try:
            daemon = Daemon(state)
            progress("daemon started; waiting for 'ready'")
            daemon.wait_ready(timeout=180)
        except (FileNotFoundError, DaemonUnavailable) as e:
            return unavailable(TITLE, method(quick), f"envelope daemon not available: {e}", TARGETS)
        progress("daemon ready")
        progs = build_programs(["workload", "tcp_sink", "true_static"])
        names = [f"w{i:03d}" for i in range(WORKLOADS)]
        try:
            rows.append({"case": "idle", **sample(daemon, p["idle_s"], "idle")})

            sink = subprocess.Popen([progs["tcp_sink"], "2"], stdout=subprocess.PIPE, text=True,
                                    start_new_session=True)
            port = int(sink.stdout.readline().strip().split("=", 1)[1])
            group = Cgroup("footprint")
            cgroups = [group.child(n) for n in names]
            duration = p["load_s"] + 30  # outlives the sampling; killed at the end of the phase
            for cg in cgroups:
                workers.append(subprocess.Popen(
                    [progs["workload"], str(cg.procs), str(duration), str(PERIOD_MS), str(port),
                     progs["true_static"]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            progress(f"{WORKLOADS} workloads running in {group.path}/w000..w{WORKLOADS - 1:03d}")
            time.sleep(2)  # let every workload join its cgroup and the daemon meet each one
            early = [w for w in workers if w.poll() is not None]
            if early:
                raise RuntimeError(f"{len(early)} workloads exited early: {early[0].stderr.read()[-300:]}")
            rows.append({"case": f"load, {WORKLOADS} workloads", **sample(daemon, p["load_s"], "load")})
            enforced = _enforce_some(state, port, daemon)
            cleanup.append(lambda: _unenforce(state, enforced))
            row = {"case": f"load, enforcing {len(enforced)} workloads",
                   **sample(daemon, p["enforce_s"], "enforcing")}
            row["compiler mapped"] = _compiler_mapped(daemon.proc.pid)
            rows.append(row)
            if len(enforced) < ENFORCED:
                notes.append(f"only {len(enforced)} of {ENFORCED} workloads could be enforced")
            for w in workers:
                w.kill()
            for w in workers:
                w.wait()
            group.remove()
            group = None
            rows.append({"case": "after load", **sample(daemon, p["after_s"], "after")})
        except DaemonDied as e:
            phase = ["idle", f"load, {WORKLOADS} workloads", "enforcing", "after load"][len(rows)]
            rows.append({"case": f"{phase} (daemon died)", **e.row})
            errors.append(str(e))
            progress(str(e))

        if daemon.proc.poll() is None:
            progress("stopping daemon (SIGTERM, flush)")
            code = daemon.stop()
            notes.append(f"daemon exit status after SIGTERM: {code}")
        daemon = None
        seen = _workloads_recorded(state, names)
        for row in rows:
            row["workloads recorded"] = None
        if len(rows) > 1:
            rows[1]["workloads recorded"] = f"{seen}/{WORKLOADS}"
            if seen < WORKLOADS:
                notes.append(f"the daemon's store holds profiles for only {seen} of the {WORKLOADS} "
                             "workload cgroups")
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        if group is not None:
            group.remove()
        if sink is not None:
            kill_process_group(sink)
        if daemon is not None:
            daemon.stop()
        for undo in cleanup:
            undo()
        if progs is not None:
            progs.cleanup()
        shutil.rmtree(state, ignore_errors=True)

    idle = rows[0] if rows and rows[0]["case"] == "idle" else {}
    load = rows[1] if len(rows) > 1 and rows[1]["case"] == f"load, {WORKLOADS} workloads" else {}
    enf = rows[2] if len(rows) > 2 and rows[2]["case"].startswith("load, enforcing") else {}
    peak = load.get("RSS MB (peak)")
    if enf and enf.get("compiler mapped"):
        errors.append(f"the enforcing daemon maps a compiler: {enf['compiler mapped']}")
    ratios = {
        "peak RSS MB with 100 workloads": peak,
        "peak RSS MB while enforcing on 10 workloads": enf.get("RSS MB (peak)")
        if enf.get("case") == f"load, enforcing {ENFORCED} workloads" else None,
        "RSS growth idle → 100 workloads (MB)": (peak - idle["RSS MB (median)"]) if peak and idle else None,
        "CPU cores with 100 workloads": load.get("CPU cores"),
        "CPU cores idle": idle.get("CPU cores"),
    }
    return {"title": TITLE, "method": method(quick), "rows": rows, "ratios": ratios, "targets": TARGETS,
            "notes": notes, "params": p, "errors": errors}


def _enforce_some(state: Path, port: int, daemon: Daemon) -> list[str]:
    """Put :data:`ENFORCED` of the load's workloads under alert-mode syscall + egress policies with
    ``envelope enforce`` and wait until the daemon has applied them."""
    from enforcer.policy import EgressRule, Policy, dump_policy
    from sensor import syscalls
    from sensor.store import ProfileStore

    found = sorted(w for w in ProfileStore(state).workloads()
                   if re.search(r"footprint[/_]w\d{3}$", w.name))[:ENFORCED]
    exe = ROOT / ".venv" / "bin" / "envelope"
    done = []
    for w in found:
        policy = Policy(w, mode="alert", substrates=("syscall", "egress"),
                        syscalls=tuple(sorted(syscalls.NUMBERS)),
                        egress=(EgressRule("tcp", "127.0.0.1/32", (port,)),))
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(dump_policy(policy, "yaml"))
            f.flush()
            r = subprocess.run([str(exe), "--state-dir", str(state), "enforce", w.key, "--policy",
                                f.name, "--reason", "footprint benchmark"], capture_output=True,
                               text=True)
        if r.returncode == 0:
            done.append(w.key)
        else:
            progress(f"enforce {w.key} failed: {r.stderr.strip()[-200:]}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        applied = {k for k in done if any("policy applied" in line and k in line for line in daemon.lines)}
        if applied == set(done):
            break
        time.sleep(0.5)
    progress(f"{len(done)} workloads enforced (alert mode)")
    return done


def _unenforce(state: Path, keys: list[str]) -> None:
    """Detach and unpin what :func:`_enforce_some` put in place."""
    exe = ROOT / ".venv" / "bin" / "envelope"
    for key in keys:
        r = subprocess.run([str(exe), "--state-dir", str(state), "enforce", key, "--remove", "--reason",
                            "footprint benchmark done"], capture_output=True, text=True)
        if r.returncode != 0:
            progress(f"remove {key} failed: {r.stderr.strip()[-200:]}")


def _compiler_mapped(pid: int) -> str:
    """Compiler libraries in a process's memory maps ("" when none)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError as e:
        return f"unreadable: {e}"
    libs = sorted({line.split()[-1] for line in maps.splitlines()
                   if any(k in line for k in ("libbcc", "LLVM", "libclang"))})
    return ", ".join(libs)


def _workloads_recorded(state: Path, names: list[str]) -> int:
    """How many of the workload cgroups the daemon's profile store has a profile for."""
    from sensor.store import ProfileStore
    wanted = set(names)
    found = set()
    for workload in ProfileStore(state).workloads():
        # A host cgroup's workload is named after its path, "/" written as "_" or kept.
        m = re.search(r"footprint[/_](w\d{3})$", workload.name)
        if m and m.group(1) in wanted:
            found.add(m.group(1))
    return len(found)
