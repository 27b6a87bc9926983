"""``envelope exec``'s Landlock decision (:mod:`envelope.exec_landlock`): applied in enforce mode
only, never silently weaker (a right this kernel cannot restrict refuses the run unless the
operator allows the gap), nothing in alert mode. Rulesets are built on the real kernel here
(Landlock needs no privilege); what they deny is tested in tests/privileged."""

from __future__ import annotations

import pytest

from enforcer import landlock
from enforcer.landlock_rules import FS_RIGHTS
from enforcer.policy import Policy
from envelope import exec_landlock
from envelope.errors import UserError
from sensor.workload import Workload

W = Workload.host("exec-landlock")
POLICY = Policy(W, mode="enforce", substrates=("syscall", "exec", "file"), execs=("/usr/bin/true",),
                files=("file:read:/etc/hosts",))


def support(abi: int) -> landlock.LandlockSupport:
    """What a kernel of this ABI restricts (the ABI table of enforcer.landlock_rules)."""
    return landlock.LandlockSupport(abi, 0, frozenset(r.name for r in FS_RIGHTS if r.abi <= abi), frozenset(),
                                    frozenset(), frozenset())


def test_enforce_mode_builds_the_ruleset_of_exec_and_file_entries():
    ll = exec_landlock.prepare(POLICY, "enforce", support=landlock.probe())
    try:
        assert ll.ruleset is not None and ll.enforced == {"exec", "file"} and not ll.gaps
        paths = {r.path for r in ll.ruleset.compiled.rules}
        assert {"/usr/bin/true", "/etc/hosts"} <= paths
        assert any("ld-linux" in p for p in paths)  # the dynamic loader, from exec needs
        assert ll.details()["rules"] == ll.ruleset.rules_added > 0
    finally:
        ll.close()


def test_a_right_the_kernel_cannot_restrict_refuses_unless_allowed():
    with pytest.raises(UserError) as e:
        exec_landlock.prepare(POLICY, "enforce", support=support(4))
    msg = str(e.value)
    assert "ioctl_dev" in msg and "ABI 5" in msg and exec_landlock.GAPS_FLAG in msg and "\n" not in msg
    ll = exec_landlock.prepare(POLICY, "enforce", allow_gaps=True, support=support(4))
    try:
        assert ll.ruleset is not None and ll.enforced == {"exec", "file"}
        assert len(ll.gaps) == 1 and "ioctl_dev" in ll.gaps[0]
        assert "ioctl_dev" not in ll.ruleset.compiled.handled_fs
        assert any(exec_landlock.GAPS_FLAG in n for n in ll.notes)
        assert any("log_new_exec_on" in n for n in ll.notes)  # a logging gap is said, not a restriction gap
    finally:
        ll.close()


def test_no_landlock_at_all_refuses_unless_allowed(monkeypatch):
    def unavailable():
        raise landlock.LandlockUnavailable(38, "landlock_create_ruleset: ENOSYS, this kernel has no Landlock")
    monkeypatch.setattr(landlock, "probe", unavailable)
    with pytest.raises(UserError, match="exec and file entries are enforced with Landlock"):
        exec_landlock.prepare(POLICY, "enforce")
    ll = exec_landlock.prepare(POLICY, "enforce", allow_gaps=True)
    assert ll.ruleset is None and ll.enforced == frozenset() and "reported, not enforced" in ll.gaps[0]


def test_alert_and_observe_apply_nothing():
    ll = exec_landlock.prepare(POLICY, "alert", support=support(7))
    assert ll.ruleset is None and ll.enforced == frozenset()
    assert "no log-only mode" in ll.notes[0]
    assert exec_landlock.prepare(POLICY, "observe").notes == []
    no_landlock = Policy(W, mode="enforce", substrates=("syscall", "egress"))
    assert exec_landlock.prepare(no_landlock, "enforce").ruleset is None


def test_an_entry_landlock_cannot_express_is_one_error_line():
    bad = Policy(W, mode="enforce", substrates=("file",), files=("file:read:/home/agent/**",))
    with pytest.raises(UserError, match="cannot be enforced by Landlock without covering a sensitive path"):
        exec_landlock.prepare(bad, "enforce", support=landlock.probe())
