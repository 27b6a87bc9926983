"""Landlock for ``envelope exec``: what the exec runner calls to enforce the policy's exec and
file entries in its child.

:func:`prepare` runs in the parent before anything is applied: it probes the kernel's Landlock,
compiles the policy's ruleset (exec entries with what each exec needs, file entries) and builds
it (:func:`enforcer.landlock.for_exec`, every path opened ``O_PATH`` here), or refuses with one
line. The child then calls :meth:`ExecLandlock.restrict_in_child` after joining the cgroup and
before loading the seccomp filter and ``execve``.

Never silently weaker: in enforce mode a right this kernel cannot restrict, or no Landlock at
all, refuses the run, unless the operator passes ``--allow-landlock-gaps``; then the run goes on
without those rights, each gap is printed and recorded in the audit log. Landlock has no
log-only mode: in alert mode nothing is applied and the run reports, from observation, every
exec and file access that enforce mode would deny.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from enforcer import audit, landlock
from enforcer.exec_needs import ExecNeedsError
from enforcer.landlock_rules import EXEC_HANDLED, FILE_HANDLED, LandlockCompileError

from .errors import EnvironmentFailure, UserError

GAPS_FLAG = "--allow-landlock-gaps"


@dataclass
class ExecLandlock:
    ruleset: landlock.Ruleset | None
    enforced: frozenset[str] = frozenset()  # substrates Landlock restricts in this run
    gaps: tuple[str, ...] = ()  # what the policy asks that this kernel cannot restrict
    notes: list[str] = field(default_factory=list)  # for stderr

    def restrict_in_child(self) -> None:
        """In the forked child, after joining the cgroup, before seccomp and ``execve``."""
        if self.ruleset is not None:
            self.ruleset.restrict_self()

    def details(self) -> dict:
        """What was applied, for the audit log."""
        d: dict = {"enforced": sorted(self.enforced), "gaps": list(self.gaps)}
        if self.ruleset is not None:
            d.update(abi=self.ruleset.support.abi, rules=self.ruleset.rules_added,
                     skipped=len(self.ruleset.skipped))
        return d

    def close(self) -> None:
        if self.ruleset is not None:
            self.ruleset.close()


def _enforced(compiled) -> frozenset[str]:
    out = set()
    if set(EXEC_HANDLED) & set(compiled.handled_fs) and "exec" in compiled.substrates:
        out.add("exec")
    if set(FILE_HANDLED) & set(compiled.handled_fs) and "file" in compiled.substrates:
        out.add("file")
    return frozenset(out)


def prepare(policy, mode: str, *, allow_gaps: bool = False, support=None) -> ExecLandlock:
    """The Landlock part of one ``envelope exec`` run (see the module docstring)."""
    wanted = [s for s in ("exec", "file") if s in policy.substrates]
    if mode == "observe" or not wanted:
        return ExecLandlock(None)
    if mode != "enforce":
        return ExecLandlock(None, notes=[
            f"{mode} mode: Landlock is not applied (it has no log-only mode); {' and '.join(wanted)} "
            f"behaviours outside the policy are reported as alerts"])
    try:
        support = support or landlock.probe()
    except landlock.LandlockUnavailable as e:
        if not allow_gaps:
            raise EnvironmentFailure(f"exec: the policy's {' and '.join(wanted)} entries are enforced with Landlock: {e}; "
                            f"or pass {GAPS_FLAG} to run with them reported, not enforced") from None
        gap = f"no Landlock on this kernel ({e}): {' and '.join(wanted)} entries are reported, not enforced"
        return ExecLandlock(None, gaps=(gap,), notes=[f"warning: {gap}"])
    try:
        rs = landlock.for_exec(policy, mode, allow_gaps=allow_gaps, support=support)
    except landlock.LandlockGapError as e:
        raise EnvironmentFailure(f"exec: {e} (the flag is {GAPS_FLAG})") from None
    except LandlockCompileError as e:
        raise UserError(f"exec: Landlock ruleset: {e}") from None
    except ExecNeedsError as e:
        raise UserError(f"exec: what an exec needs: {e}") from None
    except landlock.LandlockError as e:
        raise EnvironmentFailure(f"exec: Landlock: {e}") from None
    if rs is None:
        return ExecLandlock(None)
    gaps = tuple(g.message(support.abi) for g in rs.gaps)
    out = ExecLandlock(rs, _enforced(rs.compiled), gaps)
    out.notes += [f"warning: Landlock gap ({GAPS_FLAG}): {g}" for g in gaps]
    # Denials are reported from the syscalls' exits, not from Landlock's audit log, so a kernel
    # that cannot log them after exec changes nothing here; it is still said.
    out.notes += [f"note: Landlock: {g}" for g in rs.flag_gaps]
    if rs.skipped:
        shown = ", ".join(s.path for s in rs.skipped[:3]) + (" ..." if len(rs.skipped) > 3 else "")
        out.notes.append(f"note: Landlock: {len(rs.skipped)} rule object(s) skipped (missing or not the expected "
                         f"type; the ruleset is only stricter): {shown}")
    return out


def for_run(config, policy, mode: str, allow_gaps: bool = False) -> ExecLandlock:
    """:func:`prepare` for one ``envelope exec`` run: its notes go to stderr, and gaps the
    operator allowed go to the audit log (an override)."""
    ll = prepare(policy, mode, allow_gaps=allow_gaps)
    for note in ll.notes:
        print(f"envelope: {note}", file=sys.stderr)
    if ll.gaps:
        audit.append(config.state_dir, "exec.landlock-gaps", workload=policy.workload.key,
                     reason=f"envelope exec {GAPS_FLAG}", details=ll.details())
    return ll
