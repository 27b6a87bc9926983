"""Tampering with pinned enforcement state is detected, repaired and reported: a root process
that reaches bpffs opens the workload's pinned config map and writes the mode word to observe,
or empties the rules; the enforcement session's next check repairs the state, writes a
``policy.tamper`` audit entry and reports an ``integrity`` violation."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap

from enforcer import audit
from enforcer.egress import pin_dir_for
from enforcer.session import EnforcementSession
from tests.privileged.test_egress_pinning import (  # noqa: F401 - fixtures
    ROOT, bpffs_cleanup, cgroup, connect_in, policy_for, ports, workload)

ATTACK = textwrap.dedent("""
    import struct, sys
    sys.path.insert(0, {root!r})
    from sensor import kernel
    pin = {pin!r}
    cfg = kernel.Map(kernel.obj_get(pin + "/map_config"))
    gen, = struct.unpack("<I", cfg.lookup(struct.pack("<I", 0)))
    cfg.update(struct.pack("<I", 0), struct.pack("<I", gen & 0xff))  # mode 0: observe
    for name in ("rules4_0", "rules4_1", "rules6_0", "rules6_1"):
        rules = kernel.Map(kernel.obj_get(pin + "/map_" + name))
        for k in rules.keys():
            rules.delete(k)
    print("tampered")
""")


def test_a_rewritten_mode_word_and_emptied_rules_are_repaired_and_reported(
        tmp_path, cgroup, workload, ports, bpffs_cleanup):
    allowed, forbidden, _ = ports
    state = tmp_path / "state"
    s = EnforcementSession(state, bpffs="/sys/fs/bpf", verify_interval=0)
    try:
        s.apply(policy_for(workload, [allowed]), "enforce", [cgroup])
        assert connect_in(cgroup, forbidden) == errno.EPERM
        assert s.sync() == []
        assert {v.substrate for v in s.poll_violations()} == {"egress"}  # the denied connect, no integrity

        pin = str(pin_dir_for("/sys/fs/bpf", workload.key))
        r = subprocess.run([sys.executable, "-c", ATTACK.format(root=str(ROOT), pin=pin)],
                           capture_output=True, text=True)
        assert r.stdout.strip() == "tampered", r.stderr
        assert connect_in(cgroup, forbidden) == 0  # the attack worked: egress open
        assert connect_in(cgroup, allowed) == 0

        assert s.sync() == [workload.key]
        assert connect_in(cgroup, forbidden) == errno.EPERM  # repaired
        assert connect_in(cgroup, allowed) == 0
        found = [v for v in s.poll_violations() if v.substrate == "integrity"]
        assert len(found) == 1 and found[0].detail["repaired"]
        problems = found[0].detail["problems"]
        assert any(p.startswith("mode is observe") for p in problems)
        assert any("removed" in p for p in problems)
        [entry] = audit.read(state, action="policy.tamper")
        assert entry["workload"] == workload.key
    finally:
        s.remove(workload, reason="test done")
        s.close()
