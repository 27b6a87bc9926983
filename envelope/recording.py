"""Record one session of a workload: run a command in a fresh cgroup v2 under the sensor.

Everything in that cgroup, children and child cgroups included, is one session of the
workload. The cgroup's syscalls count from the command's exec: the launcher's own few calls
between joining the cgroup and exec'ing the command are not the workload's. The command's exit
status is returned so the CLI can pass it through.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import structlog

from sensor.cgroup import CgroupFS, OrphanGuard, owner_tag, reap_command_orphans
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
    loss: dict = field(default_factory=dict)
    behaviours: int = 0


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _join_cgroup(procs_file: str) -> Callable[[], None]:
    def join() -> None:
        with open(procs_file, "w") as f:
            f.write("0")
    return join


def record(config: Config, workload: Workload, argv: Sequence[str], session: str | None = None,
           fingerprints: dict | None = None, sensor=None,
           progress: Callable[[str], None] | None = None) -> RecordResult:
    """Run ``argv`` as one recorded session of ``workload`` and update its profile."""
    if not argv:
        raise UserError("record: no command given (usage: envelope record --workload NAME -- CMD ...)")
    say = progress or (lambda msg: None)
    session = session or f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    cgfs = CgroupFS()
    reap_command_orphans(cgfs)  # what a killed exec or record left behind
    rel = f"/envelope.record/{owner_tag()}-{uuid.uuid4().hex[:8]}"
    cg_path, cg_id = cgfs.make(rel)
    guard = OrphanGuard(cgfs, rel)  # kills the command's cgroup if this process dies first
    own_sensor = sensor is None
    if own_sensor:
        say("attaching probes (compiling BPF, a few seconds)")
        try:
            sensor = wiring.open_sensor(config)
        except BaseException:
            cgfs.remove(rel)
            guard.release()
            raise
    agg = wiring.aggregator(config, wiring.profile_store(config))
    binding = TreeBinding(str(cg_path), workload, session, meta={"cgroup": rel, "argv": list(argv)},
                          fingerprints=fingerprints)
    pump = Pump(sensor, binding, agg, counts_interval=config.poll_interval)
    binding.bind(cg_id, agg)
    loss_before = sensor.loss()
    forwarded: list[int] = []
    proc = None
    try:
        say(f"recording session {session} of {workload.key}: {' '.join(argv)}")
        try:
            proc = subprocess.Popen(list(argv), preexec_fn=_join_cgroup(str(Path(cg_path) / "cgroup.procs")))
        except (FileNotFoundError, PermissionError) as e:
            raise UserError(f"record: cannot run {argv[0]!r}: {e.strerror}") from e
        old = {s: signal.signal(s, lambda n, _f: (forwarded.append(n), proc.send_signal(n)))
               for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while proc.poll() is None:
                pump.step(100)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        # The command is done; end whatever it left behind in the cgroup, then drain the rest.
        cgfs.kill_all(rel)
        pump.finish()
        loss_after = sensor.loss()
        loss = {k: v - loss_before.get(k, 0) for k, v in loss_after.items() if v - loss_before.get(k, 0) > 0}
        code = exit_status(proc.returncode)
        agg.close_session(workload, session, meta={"exit_code": code})
        agg.flush()
        n = len(agg.profile(workload).behaviours())
        return RecordResult(code, session, cg_id, loss, n)
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
