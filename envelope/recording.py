"""Record one session of a workload: run a command in a fresh cgroup v2 under the sensor.

Everything in that cgroup, children and child cgroups included, is one session of the
workload. The cgroup's syscalls count from the command's exec: the launcher's own few calls
between joining the cgroup and exec'ing the command are not the workload's. The command's exit
status is returned so the CLI can pass it through.

A recording survives its own death. The profile is written every ``flush_interval`` while the
command runs, so a ``kill -9`` of ``envelope record`` loses at most that much of the session;
the command's first process dies with the recorder (``PR_SET_PDEATHSIG``), and whatever else it
left in the cgroup is killed (``cgroup.kill``) by the next ``envelope record`` to start
(:func:`sensor.cgroup.reap_orphans`), which also closes, in the workload it records, sessions
left open by a recorder that died.

The recorder's own sensor observes only the recorded cgroup and what is made below it (the
kernel filters, before counting or reserving ring space), so other processes on the node cannot
fill its ring buffer. The loss a recording reports, and its profile is charged with, is the loss
the kernel counted against the recorded cgroups; the node-wide counters (loss no cgroup could be
named for, or, with a shared sensor, other cgroups' loss) are reported beside it, never charged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import structlog

from sensor.cgroup import CgroupFS, OrphanGuard, reap_command_orphans
from sensor.pump import Pump, TreeBinding
from sensor.workload import Workload

from . import wiring
from .config import Config
from .errors import UserError

log = structlog.get_logger("envelope.record")


@dataclass
class RecordResult:
    exit_code: int
    session: str
    cgroup_id: int
    loss: dict = field(default_factory=dict)  # lost from this session's cgroups (in its profile)
    behaviours: int = 0
    node_loss: dict = field(default_factory=dict)  # the node's, beyond ``loss``: not charged


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


PREFIX = "/envelope.record"
_PR_SET_PDEATHSIG = 1


def _join_cgroup(procs_file: str, parent: int) -> Callable[[], None]:
    from sensor.libc import LIBC

    def join() -> None:
        # die with the recorder (a killed recorder must not leave its command running)
        LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the recorder died before the prctl
            os._exit(137)
        with open(procs_file, "w") as f:
            f.write("0")
    return join


def close_orphaned_sessions(agg, workload: Workload, now: float | None = None) -> list[str]:
    """Close the workload's recorded sessions that are still open although their cgroup is
    gone: their recorder died. They keep what was flushed of them."""
    contrib = agg.profile(workload).node(agg.node)
    cgfs = None
    closed = []
    for sid, rec in sorted(contrib.sessions.items()):
        rel = str(rec.meta.get("cgroup", ""))
        if rec.end is not None or not rel.startswith(PREFIX + "/"):
            continue
        if cgfs is None:
            cgfs = CgroupFS()
        if cgfs.abspath(rel).exists():
            continue
        agg.close_session(workload, sid, now, meta={"ended": "recorder died"})
        closed.append(sid)
    return closed


def record(config: Config, workload: Workload, argv: Sequence[str], session: str | None = None,
           fingerprints: dict | None = None, sensor=None,
           progress: Callable[[str], None] | None = None) -> RecordResult:
    """Run ``argv`` as one recorded session of ``workload`` and update its profile."""
    if not argv:
        raise UserError("record: no command given (usage: envelope record --workload NAME -- CMD ...)")
    say = progress or (lambda msg: None)
    session = session or f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    cgfs = CgroupFS()
    for orphan in reap_command_orphans(cgfs):
        say(f"killed what a recorder or exec that died left running in {orphan}")
    rel = f"{PREFIX}/{os.getpid()}-{uuid.uuid4().hex[:8]}"
    cg_path, cg_id = cgfs.make(rel)
    # kills the whole cgroup the moment this process dies (the death signal reaches only the
    # command itself); forked before the probes exist, so it holds none of them
    guard = OrphanGuard(cgfs, rel)
    own_sensor = sensor is None
    if own_sensor:
        say("attaching probes (compiling BPF, a few seconds)")
        try:
            sensor = wiring.open_sensor(config, tracked_only=True)
        except BaseException:
            cgfs.remove(rel)
            guard.release()
            raise
    agg = wiring.aggregator(config, wiring.profile_store(config))
    for sid in close_orphaned_sessions(agg, workload):
        say(f"closed session {sid} of {workload.key}: its recorder died")
    binding = TreeBinding(str(cg_path), workload, session, meta={"cgroup": rel, "argv": list(argv)},
                          fingerprints=fingerprints)
    pump = Pump(sensor, binding, agg, counts_interval=config.poll_interval)
    pump.bind(cg_id)  # tracked from here: before the command joins the cgroup
    forwarded: list[int] = []
    proc = None
    try:
        say(f"recording session {session} of {workload.key}: {' '.join(argv)}")
        try:
            proc = subprocess.Popen(list(argv), preexec_fn=_join_cgroup(str(Path(cg_path) / "cgroup.procs"),
                                                                        os.getpid()))
        except (FileNotFoundError, PermissionError) as e:
            raise UserError(f"record: cannot run {argv[0]!r}: {e.strerror}") from e
        old = {s: signal.signal(s, lambda n, _f: (forwarded.append(n), proc.send_signal(n)))
               for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            next_flush = time.monotonic() + config.flush_interval
            while proc.poll() is None:
                pump.step(100)
                if time.monotonic() >= next_flush:  # a killed recorder loses at most this much
                    agg.flush()
                    next_flush = time.monotonic() + config.flush_interval
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        # The command is done; end whatever it left behind in the cgroup, then drain the rest.
        cgfs.kill_all(rel)
        pump.finish()
        loss = dict(sorted(pump.loss_charged.items()))
        node_loss = {k: v - loss.get(k, 0) for k, v in sorted(pump.node_loss.items())
                     if v > loss.get(k, 0)}
        code = exit_status(proc.returncode)
        agg.close_session(workload, session, meta={"exit_code": code})
        agg.flush()
        n = len(agg.profile(workload).behaviours())
        return RecordResult(code, session, cg_id, loss, n, node_loss)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        try:
            cgfs.remove(rel)
            cgfs.remove_empty_parents(rel)
        except Exception as e:  # noqa: BLE001 - cleanup must not hide the command's result
            log.warning("cgroup cleanup failed", cgroup=rel, error=str(e))
        pump.release()
        if own_sensor:
            sensor.close()
        guard.release()


def progress_printer(enabled: bool = True) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if enabled:
            print(f"envelope: {msg}", file=sys.stderr, flush=True)
    return say
