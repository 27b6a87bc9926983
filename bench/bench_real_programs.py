"""Real programs under policies derived from their own sessions: false denials and abuses.

The catalog and its runner are the privileged suite's (``tests/privileged/real_programs.py``):
seven programs nobody here wrote, each recorded over six varied sessions with ``envelope
record``, a policy derived with the defaults (``--force``: the sessions span seconds), then
under ``envelope exec --mode enforce`` four held-out legitimate variations per program and the
program's abuses. A held-out run is a **false denial** when anything was denied or the program
did not do its work; an abuse is **denied** when its attempt failed with EPERM and the denial was
reported, **reported** when it got through and was reported (a spawn the policy's exec entries
let through: exec paths are Landlock's to enforce), **missed** otherwise.

The same held-out runs are also judged, for comparison, under a policy derived from the same
profile without the syscall envelope: literal closure (no syscall groups), syscalls needing 5
occurrences like the other substrates, and review items denied (``--closure literal
--min-count syscall=5 --review-action syscall=deny``).

Every case checks that it measured what it claims: each held-out run ran (its outcome was
judged), each injected abuse's attempt ran (its report line is on stderr), and 28 held-out runs
(8 with ``--quick``) were judged, or the benchmark fails.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from . import progress

TITLE = "Real programs: held-out false denials and abuse denials under derived policies"
TARGETS = {"false denials in 28 held-out runs (defaults)": "<= 1", "abuses missed": "== 0"}
QUICK_PROGRAMS = ("nginx", "sqlite3")


def method(quick: bool) -> str:
    from tests.privileged import real_programs as rp
    progs = QUICK_PROGRAMS if quick else tuple(rp.PROGRAMS)
    return (f"Programs: {', '.join(progs)}. Per program: 6 sessions recorded with `envelope record`, "
            f"`envelope derive --force` with the defaults, then under `envelope exec --mode enforce` "
            f"{rp.HOLDOUTS} held-out legitimate variations (false denial: anything denied, or the work not "
            f"done) and its abuses (denied: failed with EPERM and reported as a denial; reported: got "
            f"through and reported). The held-out runs are judged again under a policy derived from the same "
            f"profile without the syscall envelope (`--closure literal --min-count syscall=5 --review-action "
            f"syscall=deny`). Clients run in the benchmark process on loopback.")


def run(quick: bool = False) -> dict:
    from tests.privileged import real_programs as rp
    progs = QUICK_PROGRAMS if quick else tuple(rp.PROGRAMS)
    work = Path(tempfile.mkdtemp(prefix="envelope-bench-real-"))
    suite = rp.Suite(work, rp.build_injected(work))
    listener = rp.Listener()
    rows, notes = [], []
    totals = {"holdouts": 0, "false": 0, "strict_false": 0, "abuses": 0, "denied": 0, "reported": 0,
              "missed": 0, "alerts": 0}
    try:
        for name in progs:
            t0 = time.monotonic()
            prog = rp.build_program(name, work / name, listener.port)
            for i, r in enumerate(prog.sessions):
                out = suite.record(name, r, f"s{i}-{r.name}")
                if out.problem:
                    raise RuntimeError(f"{name} session {r.name} did not do its work: {out.problem}")
            default = suite.derive(name)
            strict = suite.derive(name, "--closure", "literal", "--min-count", "syscall=5",
                                  "--review-action", "syscall=deny", name="literal")
            false = strict_false = alerts = 0
            for r in prog.holdouts:
                for policy, is_default in ((default, True), (strict, False)):
                    out = suite.enforce(name, policy, r)
                    bad = bool(out.problem or out.denied)
                    if bad:
                        what = out.problem or ", ".join(sorted({v["behaviour"] for v in out.denied}))
                        notes.append(f"{name} {r.name} ({'defaults' if is_default else 'literal'}): {what}")
                    if is_default:
                        false += bad
                        alerts += len(out.alerted)
                    else:
                        strict_false += bad
            verdicts = {"denied": 0, "reported": 0, "missed": 0}
            for r in prog.abuses:
                out = suite.enforce(name, default, r)
                for a in r.abuses:
                    if a.attempt and f"{a.attempt}:" not in out.stderr:
                        raise RuntimeError(f"{name} {a.name}: the attempt never ran")
                    verdict, detail = rp.abuse_verdict(out, a)
                    verdicts[verdict] += 1
                    if verdict != "denied":
                        notes.append(f"{name} {a.name}: {verdict}: {detail}")
            if listener.accepted:
                raise RuntimeError(f"{name}: an abuse connection got through")
            n_abuses = sum(verdicts.values())
            rows.append({"case": name, "sessions": len(prog.sessions), "held-out runs": len(prog.holdouts),
                         "false denials (defaults)": false, "false denials (literal)": strict_false,
                         "review alerts (defaults)": alerts, "abuses": n_abuses,
                         "denied": verdicts["denied"], "reported, not denied": verdicts["reported"],
                         "missed": verdicts["missed"], "seconds": round(time.monotonic() - t0, 1)})
            for k, v in (("holdouts", len(prog.holdouts)), ("false", false), ("strict_false", strict_false),
                         ("abuses", n_abuses), ("denied", verdicts["denied"]),
                         ("reported", verdicts["reported"]), ("missed", verdicts["missed"]), ("alerts", alerts)):
                totals[k] += v
            progress(f"{name}: {false} false denial(s) of {len(prog.holdouts)} (literal: {strict_false}), "
                     f"abuses {verdicts}")
    finally:
        listener.close()
    want = rp.HOLDOUTS * len(progs)
    if totals["holdouts"] != want:
        raise RuntimeError(f"judged {totals['holdouts']} held-out runs, expected {want}")
    rows.append({"case": "all", "sessions": 6 * len(progs), "held-out runs": totals["holdouts"],
                 "false denials (defaults)": totals["false"], "false denials (literal)": totals["strict_false"],
                 "review alerts (defaults)": totals["alerts"], "abuses": totals["abuses"],
                 "denied": totals["denied"], "reported, not denied": totals["reported"],
                 "missed": totals["missed"], "seconds": None})
    n, a = totals["holdouts"], totals["abuses"]
    ratios = {
        f"false denials in {n} held-out runs (defaults)": totals["false"],
        "false-denial rate (defaults)": totals["false"] / n,
        "false-denial rate (literal, 5 over 3, review denied)": totals["strict_false"] / n,
        "abuse denial rate": totals["denied"] / a if a else None,
        "abuses reported, not denied": totals["reported"],
        "abuses missed": totals["missed"],
    }
    return {"title": TITLE, "method": method(quick), "rows": rows, "ratios": ratios, "targets": TARGETS,
            "notes": notes}
