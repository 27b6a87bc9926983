"""What enforce mode does with a policy's review items, said before enforcement starts.

Behaviours below the confidence threshold are neither allowed nor dropped: each substrate's
review action (``spec.decisions.confidence.reviewActions``) says whether a recurrence is denied
or let through and reported. ``envelope exec`` and ``envelope enforce`` print these lines before
they start, so nobody meets a review item as an unexplained EPERM. Pure: a policy in, lines out.
"""

from __future__ import annotations

from enforcer.policy import Policy
from enforcer.syscall_groups import dangerous


def review_summary(policy: Policy) -> dict[str, dict]:
    """Per substrate: behaviours in review, how many are let through, how many denied, and the
    dangerous syscalls among the denied."""
    out: dict[str, dict] = {}
    for item in policy.review:
        sub = item.get("substrate", "")
        behaviours = list((item.get("evidence") or {}).get("behaviours") or [item.get("key")])
        s = out.setdefault(sub, {"behaviours": 0, "alerted": 0, "denied": 0, "dangerous": [],
                                 "action": policy.review_action(sub)})
        s["behaviours"] += len(behaviours)
        let_through = (policy.review_action(sub) == "alert" and item.get("action") != "deny"
                       and bool(item.get("entries")))
        s["alerted" if let_through else "denied"] += len(behaviours)
        if not let_through and sub == "syscall":
            s["dangerous"] += [b.split(":", 1)[1] for b in behaviours if dangerous(b.split(":", 1)[1])]
    return dict(sorted(out.items()))


def review_notice(policy: Policy, *, exec_paths_enforced: bool, execve_denied: bool) -> list[str]:
    """The lines to print before enforcing ``policy`` in enforce mode.

    ``exec_paths_enforced``: the exec substrate's paths are enforced where this runs (``envelope
    exec`` in enforce mode with a Landlock that restricts execute rights);
    ``execve_denied``: no program may be exec'd at all (the seccomp filter denies ``execve``)."""
    summary = review_summary(policy)
    w = policy.workload.key
    if not summary:
        return [f"envelope: {w}: no behaviours in review; everything outside the policy is denied "
                f"where enforced, and reported"]
    total = sum(s["behaviours"] for s in summary.values())
    lines = [f"envelope: {w}: {total} behaviour(s) in review (below the confidence threshold); "
             f"when one recurs under enforce mode:"]
    for sub, s in summary.items():
        parts = []
        if s["alerted"]:
            parts.append(f"{s['alerted']} let through and reported (review action alert)")
        if s["denied"]:
            how = "denied and reported"
            if sub == "exec" and not exec_paths_enforced and not execve_denied:
                how = "reported, not denied (exec paths are not enforced here)"
            elif sub == "exec" and execve_denied:
                how = "denied and reported (the policy allows no program: execve is denied)"
            elif sub == "exec":
                how = "denied and reported (Landlock: only the policy's programs may run)"
            if s["dangerous"] and len(s["dangerous"]) == s["denied"]:
                why = "dangerous syscalls are always denied: " + ", ".join(s["dangerous"])
            elif s["dangerous"]:
                why = (f"review action {s['action']}; dangerous syscalls are always denied: "
                       + ", ".join(s["dangerous"]))
            else:
                why = f"review action {s['action']}"
            parts.append(f"{s['denied']} {how} ({why})")
        lines.append(f"envelope:   {sub}: " + "; ".join(parts))
    lines.append("envelope:   `envelope explain POLICY` lists them; `envelope derive --admit KEY --reason "
                 "TEXT` or `--review-action SUBSTRATE=alert|deny` changes what happens")
    return lines
