"""The review notice exec and enforce print before enforce mode: counts and what happens."""

from __future__ import annotations

from enforcer.derive import DeriveOptions, derive
from envelope.review_notice import review_notice, review_summary
from tests.unit.test_derive import build, steady


def test_the_notice_counts_review_items_per_substrate_and_says_what_happens():
    extra = {"syscall:bpf": 1, "syscall:ftruncate": 1, "syscall:mremap": 2,
             "connect:tcp:198.51.100.7:4444": 1, "exec:/usr/bin/id": 1}
    pol = derive(build(steady(extra)))
    s = review_summary(pol)
    assert s["syscall"]["behaviours"] == 3 and s["syscall"]["alerted"] == 2 and s["syscall"]["denied"] == 1
    assert s["syscall"]["dangerous"] == ["bpf"]
    assert s["egress"] == {"behaviours": 1, "alerted": 0, "denied": 1, "dangerous": [], "action": "deny"}
    lines = review_notice(pol, exec_paths_enforced=False, execve_denied=True)
    text = "\n".join(lines)
    assert "5 behaviour(s) in review" in lines[0]
    assert "syscall: 2 let through and reported (review action alert); 1 denied and reported " \
           "(dangerous syscalls are always denied: bpf)" in text
    assert "egress: 1 denied and reported (review action deny)" in text
    assert "exec: 1 denied and reported (the policy allows no program: execve is denied)" in text
    # where exec paths are not enforced and execve is open, the notice does not promise a denial
    open_exec = "\n".join(review_notice(pol, exec_paths_enforced=False, execve_denied=False))
    assert "exec: 1 reported, not denied" in open_exec
    # an operator's choice shows
    loose = derive(build(steady(extra)), DeriveOptions(review_actions={"syscall": "deny", "egress": "alert",
                                                                      "exec": "deny"}))
    text = "\n".join(review_notice(loose, exec_paths_enforced=True, execve_denied=False))
    assert "egress: 1 let through and reported (review action alert)" in text
    assert "syscall: 3 denied and reported (review action deny; dangerous syscalls are always denied: bpf)" in text
    # where Landlock enforces exec paths, an exec in review is denied even with execve open
    assert "exec: 1 denied and reported (Landlock: only the policy's programs may run)" in text


def test_no_review_items_is_said_too():
    [line] = review_notice(derive(build(steady())), exec_paths_enforced=False, execve_denied=True)
    assert "no behaviours in review" in line
