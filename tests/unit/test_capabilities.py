"""The capability substrate without root: the capability table against the installed kernel
header, behaviour keys, the policy section, derivation (literal closure, confidence, admit-only
escape capabilities, unobserved profiles), the enforcement outputs (exec sets, the Kubernetes
fragment through ``envelope compile``), exceptions, declared container capabilities in
reconciliation, diff, and refused checks as profile evidence."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from enforcer import capabilities as caps_out
from enforcer import exceptions
from enforcer.declared import DeclaredError, container_capabilities, load_declared, read_declarations
from enforcer.derive import DeriveError, DeriveOptions, derive
from enforcer.diff import diff
from enforcer.elements import ADMIT_ONLY
from enforcer.policy import Policy, PolicyError, dump_policy, parse_entry, parse_policy
from enforcer.reconcile import reconcile
from enforcer.seccomp import DEFAULT_CONTAINER_CAPS
from envelope.cli import main
from sensor import capabilities, features
from sensor.aggregate import Aggregator, KeyReading
from sensor.profile import Profile
from sensor.workload import SUBSTRATES, Workload, substrate_of

HEADER = Path("/usr/include/linux/capability.h")
W = Workload("agents", "Deployment", "agent", "main")
T0 = 1_767_225_600.0
OBSERVED = {"observed": ["capability"]}


# ---- the table --------------------------------------------------------------------------------


def test_the_table_is_the_kernel_header():
    if not HEADER.exists():
        pytest.fail(f"{HEADER} is missing (linux-libc-dev); run make setup")
    text = HEADER.read_text()
    defined = {int(n): name for name, n in re.findall(r"^#define CAP_([A-Z_]+)\s+(\d+)\s*$", text, re.M)}
    last = re.search(r"^#define CAP_LAST_CAP\s+CAP_([A-Z_]+)", text, re.M).group(1)
    assert dict(capabilities.NAMES) == defined
    assert capabilities.NAMES[capabilities.LAST_CAP] == last and len(capabilities.NAMES) == 41
    assert sorted(capabilities.NAMES) == list(range(41))


def test_keys_and_names():
    assert capabilities.key("NET_RAW") == "capability:NET_RAW" == capabilities.key_of(13)
    assert capabilities.name(13) == "NET_RAW" and capabilities.name(capabilities.number("BPF")) == "BPF"
    assert capabilities.parse_key("capability:SYS_ADMIN") == "SYS_ADMIN"
    assert substrate_of("capability:CHOWN") == "capability" and "capability" in SUBSTRATES
    with pytest.raises(capabilities.CapabilityError, match=r"'CAP_CHOWN' is not a Linux capability name \(write CHOWN\)"):
        capabilities.number("CAP_CHOWN")
    with pytest.raises(capabilities.CapabilityError, match="not a Linux capability name"):
        capabilities.key("NET_RAWW")
    with pytest.raises(capabilities.CapabilityError):
        capabilities.key_of(41)
    with pytest.raises(capabilities.CapabilityError, match=r"capability number 41 is not in the table \(0..40\)"):
        capabilities.name(41)
    with pytest.raises(capabilities.CapabilityError):
        capabilities.parse_key("syscall:read")


def test_every_escape_capability_is_admit_only_with_its_own_reason():
    escape = {"SYS_ADMIN", "SYS_PTRACE", "SYS_MODULE", "BPF", "PERFMON", "NET_ADMIN", "SYS_RAWIO",
              "DAC_READ_SEARCH", "MAC_ADMIN", "MAC_OVERRIDE", "SYS_BOOT", "NET_RAW", "SYSLOG"}
    keys = {k for k in ADMIT_ONLY if k.startswith("capability:")}
    assert keys == {capabilities.key(c) for c in escape}
    reasons = [ADMIT_ONLY[k] for k in keys]
    assert len(set(reasons)) == len(reasons) and all(r.endswith("admit it explicitly") for r in reasons)
    assert "open_by_handle_at" in ADMIT_ONLY["capability:DAC_READ_SEARCH"]


# ---- the policy section ---------------------------------------------------------------------------


def test_policy_capabilities_judge_round_trip_and_name_their_entries():
    p = Policy(W, mode="enforce", capabilities=("NET_RAW", "CHOWN", "CHOWN"))
    assert p.capabilities == ("CHOWN", "NET_RAW")
    assert p.allows("capability:NET_RAW") and not p.allows("capability:SYS_ADMIN")
    assert p.entries()[-2:] == ["capability:CHOWN", "capability:NET_RAW"]
    text = dump_policy(p)
    assert "capabilities:\n    - CHOWN\n    - NET_RAW\n" in text
    assert dump_policy(parse_policy(text)) == text
    assert parse_entry("capability:NET_BIND_SERVICE") == ("capability", "NET_BIND_SERVICE")
    left_out = Policy(W, substrates=("syscall",))
    assert left_out.allows("capability:SYS_ADMIN") and "capabilities" not in dump_policy(left_out)


@pytest.mark.parametrize("bad, message", [
    ("- CAP_NET_RAW", r"spec.allow.capabilities\[0\]: 'CAP_NET_RAW' is not a Linux capability name \(write NET_RAW\)"),
    ("- net_raw", r"spec.allow.capabilities\[0\]: 'net_raw' is not a Linux capability name \(write NET_RAW\)"),
    ("- 13", r"spec.allow.capabilities\[0\]: 13 is not a Linux capability name"),
    ("NET_RAW", r"spec.allow.capabilities: expected a list"),
])
def test_bad_capability_entries_are_one_line_errors(bad, message):
    text = dump_policy(Policy(W, capabilities=("NET_RAW",))).replace("capabilities:\n    - NET_RAW",
                                                                      "capabilities: " + bad if not bad.startswith("- ")
                                                                      else "capabilities:\n    " + bad)
    with pytest.raises(PolicyError, match=message) as e:
        parse_policy(text)
    assert "\n" not in str(e.value)
    with pytest.raises(PolicyError, match="bad capability entry 'capability:RAW'"):
        parse_entry("capability:RAW")


# ---- derivation -----------------------------------------------------------------------------------


def profile(sessions: list[dict[str, int]], observed: bool | list[bool] = True,
            refused: dict[str, int] | None = None) -> Profile:
    p = Profile(W)
    node = p.node("n1")
    for i, b in enumerate(sessions):
        seen = observed[i] if isinstance(observed, list) else observed
        t = T0 + i * 86400.0
        node.open_session(f"s{i}", t, dict(OBSERVED) if seen else {})
        node.observe(f"s{i}", "syscall:read", 10, t + 1)
        for j, (k, c) in enumerate(sorted(b.items())):
            node.observe(f"s{i}", k, c, t + 2 + j)
        for k, c in (refused or {}).items():
            node.add_refusal(k, c, t + 50)
        node.close_session(f"s{i}", t + 600)
    node.touch(T0 + len(sessions) * 86400.0 + 2 * 86400.0)
    return p


STEADY = [{"capability:NET_BIND_SERVICE": 1, "capability:CHOWN": 2, "capability:NET_RAW": 2}] * 4 \
    + [{"capability:NET_BIND_SERVICE": 1, "capability:CHOWN": 2, "capability:NET_RAW": 2, "capability:SYS_ADMIN": 1}]


def test_derive_admits_used_capabilities_literally_and_keeps_escapes_in_review():
    pol = derive(profile(STEADY, refused={"capability:SYS_PTRACE": 1}))
    assert "capability" in pol.substrates
    assert pol.capabilities == ("CHOWN", "NET_BIND_SERVICE")
    prov = {p["entry"]: p for p in pol.provenance if p["substrate"] == "capability"}
    assert set(prov) == {"capability:CHOWN", "capability:NET_BIND_SERVICE"}
    assert prov["capability:CHOWN"]["rule"] == "literal" and prov["capability:CHOWN"]["evidence"]["count"] == 10
    assert prov["capability:CHOWN"]["evidence"]["sessions"] == 5
    review = {r["key"]: r for r in pol.review if r["substrate"] == "capability"}
    assert set(review) == {"capability:NET_RAW", "capability:SYS_ADMIN"}
    assert review["capability:NET_RAW"]["why"] == ADMIT_ONLY["capability:NET_RAW"]  # evidence enough, still no
    assert review["capability:SYS_ADMIN"]["why"] == "count 1 < 5; sessions 1 < 3"
    assert {"capability:NET_RAW", "capability:SYS_ADMIN"} <= set(pol.watch)
    assert "capability:SYS_PTRACE" not in pol.watch and not pol.allows("capability:SYS_PTRACE")  # refused: no entry
    rules = pol.decisions["closure"]["rules"]["capability"]
    assert rules["rule"] == "literal" and "nothing to widen" in rules["structural"]
    assert derive(profile(STEADY), DeriveOptions(closure="literal")).capabilities == pol.capabilities


def test_admit_an_escape_capability_with_its_reason():
    pol = derive(profile(STEADY), DeriveOptions(admits=(("capability:SYS_ADMIN", "mounts its scratch tmpfs; SEC-9"),
                                                        ("capability:NET_RAW", "ping checks; SEC-7"))))
    assert pol.capabilities == ("CHOWN", "NET_BIND_SERVICE", "NET_RAW", "SYS_ADMIN")
    prov = {p["entry"]: p for p in pol.provenance}
    assert prov["capability:SYS_ADMIN"]["admitted"] == "admit"
    assert prov["capability:SYS_ADMIN"]["reason"] == "mounts its scratch tmpfs; SEC-9"
    assert not any(r["substrate"] == "capability" for r in pol.review)
    with pytest.raises(DeriveError, match="--admit capability:SYS_MODULE: not in the review list"):
        derive(profile(STEADY), DeriveOptions(admits=(("capability:SYS_MODULE", "x"),)))


def test_a_profile_never_observed_with_the_probe_leaves_the_substrate_out():
    p = profile(STEADY, observed=False)
    pol = derive(p)
    assert "capability" not in pol.substrates and pol.capabilities == ()
    assert "was observed with the capability probe" in pol.decisions["granularity"]["unobserved"]["capability"]
    assert "capability" in pol.decisions["granularity"]["excluded"]
    assert caps_out.exec_capability_sets(Policy.from_dict(pol.to_dict()), "enforce") is None
    with pytest.raises(DeriveError, match="--admit capability:SYS_ADMIN: none of the profile's 5 sessions"):
        derive(p, DeriveOptions(admits=(("capability:SYS_ADMIN", "x"),)))
    with pytest.raises(DeriveError, match="nothing to derive"):
        derive(p, DeriveOptions(substrates=("capability",)))


def test_sessions_without_the_probe_are_counted_in_the_decision():
    pol = derive(profile(STEADY, observed=[True, True, True, False, True]))
    assert pol.decisions["granularity"]["observedSessions"] == {"capability": {"observed": 4, "sessions": 5}}
    assert pol.capabilities == ("CHOWN", "NET_BIND_SERVICE")


def test_no_capability_used_means_drop_all_when_observed():
    pol = derive(profile([{"syscall:write": 3}] * 5))
    assert "capability" in pol.substrates and pol.capabilities == ()
    enforced = Policy.from_dict({**pol.to_dict(), "spec": {**pol.to_dict()["spec"], "mode": "enforce"}})
    assert caps_out.exec_capability_sets(enforced) == frozenset()
    assert caps_out.k8s_capabilities(enforced) == {"drop": ["ALL"], "add": []}


# ---- enforcement outputs ------------------------------------------------------------------------


def test_exec_capability_sets():
    p = Policy(W, mode="enforce", capabilities=("NET_BIND_SERVICE", "CHOWN"))
    assert caps_out.exec_capability_sets(p) == frozenset({10, 0})
    assert caps_out.exec_capability_sets(p, exceptions=("NET_RAW",)) == frozenset({10, 0, 13})
    assert caps_out.exec_capability_sets(p, "alert") is None  # nothing to "log": the process keeps its set
    assert caps_out.exec_capability_sets(Policy(W, mode="observe", capabilities=("CHOWN",))) is None
    assert caps_out.exec_capability_sets(Policy(W, mode="alert", capabilities=("CHOWN",)), "enforce") == {0}
    assert caps_out.exec_capability_sets(Policy(W, mode="enforce", substrates=("syscall",))) is None
    with pytest.raises(caps_out.CapabilityCompileError, match="'RAW' is not a Linux capability name"):
        caps_out.exec_capability_sets(p, exceptions=("RAW",))


def test_exec_sets_are_what_the_confinement_keeps():
    """An enforced exec child keeps exactly the policy's set (a breaker only when the policy
    allows it); a policy without the substrate leaves the confinement's default (all but the
    capabilities that undo it); the BREAKERS' names are the table's."""
    from enforcer.confinement import BREAKERS, Confinement, admitted_breakers, kept_capabilities

    last = capabilities.LAST_CAP
    for number, (name, _why) in BREAKERS.items():
        assert capabilities.number(name) == number
    p = Policy(W, mode="enforce", capabilities=("NET_BIND_SERVICE",))
    keep = kept_capabilities(caps_out.exec_capability_sets(p), last)
    assert keep == {capabilities.number("NET_BIND_SERVICE")}
    c = Confinement(keep=keep, last_cap=last)
    assert c.describe()["capabilitiesKept"] == ["NET_BIND_SERVICE"]
    assert len(c.dropped()) == last
    admin = Policy(W, mode="enforce", capabilities=("SYS_ADMIN",))
    assert admitted_breakers(kept_capabilities(caps_out.exec_capability_sets(admin), last))[0].startswith("SYS_ADMIN (")
    unencoded = Policy(W, mode="enforce", substrates=("syscall",))
    default = kept_capabilities(caps_out.exec_capability_sets(unencoded), last)
    assert default == set(range(last + 1)) - set(BREAKERS) and capabilities.number("NET_RAW") in default


def write_policy(tmp_path, policy: Policy) -> Path:
    f = tmp_path / "policy.yaml"
    f.write_text(dump_policy(policy))
    return f


def test_compile_k8s_capabilities(tmp_path, capsys):
    f = write_policy(tmp_path, Policy(W, mode="alert", capabilities=("NET_BIND_SERVICE", "CHOWN")))
    assert main(["--state-dir", str(tmp_path / "s"), "compile", str(f), "--format", "k8s-capabilities"]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out) == {"drop": ["ALL"], "add": ["CHOWN", "NET_BIND_SERVICE"]}
    assert "the kubelet enforces a container's capabilities whatever the mode" in err
    assert main(["--state-dir", str(tmp_path / "s"), "compile", str(f), "--format", "k8s-capabilities",
                 "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"add": ["CHOWN", "NET_BIND_SERVICE"], "drop": ["ALL"]}
    exceptions.add(tmp_path / "s", W, "capability:NET_RAW", "1h", reason="ping trial")
    assert main(["--state-dir", str(tmp_path / "s"), "compile", str(f), "--format", "k8s-capabilities",
                 "--with-exceptions", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["add"] == ["CHOWN", "NET_BIND_SERVICE", "NET_RAW"]
    out_file = tmp_path / "caps.yaml"
    left_out = write_policy(tmp_path, Policy(W, substrates=("syscall", "egress")))
    assert main(["--state-dir", str(tmp_path / "s"), "compile", str(left_out), "--format", "k8s-capabilities",
                 "--out", str(out_file)]) == 2
    err = capsys.readouterr().err
    assert "the capability substrate is not encoded" in err and len(err.strip().splitlines()) == 1
    assert not out_file.exists()


def test_capability_exceptions():
    assert exceptions.normalise_key("capability:SYS_PTRACE") == "capability:SYS_PTRACE"
    with pytest.raises(exceptions.ExceptionError, match="'CAP_SYS_PTRACE' is not a Linux capability name"):
        exceptions.normalise_key("capability:CAP_SYS_PTRACE")


# ---- declared container capabilities, reconciliation -----------------------------------------------


def container(**ctx) -> dict:
    return {"name": "main", "image": "x", "securityContext": ctx}


def test_container_capabilities_as_a_runtime_computes_them():
    default = {c.removeprefix("CAP_") for c in DEFAULT_CONTAINER_CAPS}
    held, note = container_capabilities({"name": "c"}, None, "c")
    assert held == default and "runtime's default set" in note
    held, _ = container_capabilities(container(capabilities={"drop": ["NET_RAW", "cap_mknod"]}), None, "c")
    assert held == default - {"NET_RAW", "MKNOD"}
    held, _ = container_capabilities(container(capabilities={"drop": ["ALL"], "add": ["CAP_NET_BIND_SERVICE"]}), None, "c")
    assert held == {"NET_BIND_SERVICE"}
    held, _ = container_capabilities(container(capabilities={"add": ["ALL"]}), None, "c")
    assert held == set(capabilities.NUMBERS)
    held, note = container_capabilities(container(privileged=True, capabilities={"drop": ["ALL"]}), None, "c")
    assert held == set(capabilities.NUMBERS) and "privileged" in note
    _, note = container_capabilities(container(capabilities={"drop": ["ALL"]}), {"runAsUser": 1000}, "c")
    assert "runAsUser 1000" in note
    with pytest.raises(DeclaredError, match=r"c.securityContext.capabilities.add\[0\]: 'NET_RAWW' is not a Linux"):
        container_capabilities(container(capabilities={"add": ["NET_RAWW"]}), None, "c")


DEPLOYMENT = {
    "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "agent", "namespace": "agents"},
    "spec": {"template": {"spec": {"containers": [
        {"name": "main", "image": "agent:1", "securityContext": {
            "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE", "SYS_PTRACE", "KILL"]}}},
        {"name": "sidecar", "image": "proxy:1"},
    ]}}},
}


def test_reconcile_declared_capabilities_with_observed_and_refused(tmp_path):
    f = tmp_path / "deploy.yaml"
    f.write_text(yaml.safe_dump(DEPLOYMENT))
    decls = load_declared(f)
    assert [(d.format, d.container) for d in decls] == [("kubernetes-workload", "main"),
                                                         ("kubernetes-workload", "sidecar")]
    p = profile(STEADY, refused={"capability:SYS_PTRACE": 2, "capability:SYS_MODULE": 1})
    r = reconcile(p, decls)
    c = r["substrates"]["capability"]
    assert c["declarations"] == [f"{f}#main"]
    assert [d["key"] for d in c["wouldDeny"]] == ["capability:CHOWN", "capability:NET_RAW", "capability:SYS_ADMIN"]
    assert [u["grant"] for u in c["unused"]] == ["capability:KILL", "capability:SYS_PTRACE"]
    assert c["refused"] == [
        {"key": "capability:SYS_MODULE", "count": 5, "firstSeen": "2026-01-01T00:00:50Z",
         "lastSeen": "2026-01-05T00:00:50Z", "grantedBy": []},
        {"key": "capability:SYS_PTRACE", "count": 10, "firstSeen": "2026-01-01T00:00:50Z",
         "lastSeen": "2026-01-05T00:00:50Z", "grantedBy": [f"{f}#main"]}]
    assert [d.get("applies") for d in r["declarations"]] == [True, False]
    single = {**DEPLOYMENT, "spec": {"template": {"spec": {"containers": [DEPLOYMENT["spec"]["template"]["spec"]
                                                                          ["containers"][1]]}}}}
    (d,) = read_declarations(single, "pod")
    assert d.container is None  # one container: it is the workload's
    r = reconcile(p, [d])
    # the runtime's default set: NET_RAW, CHOWN and NET_BIND_SERVICE are in it, SYS_ADMIN is not
    assert [w["key"] for w in r["substrates"]["capability"]["wouldDeny"]] == ["capability:SYS_ADMIN"]
    assert {u["grant"] for u in r["substrates"]["capability"]["unused"]} >= {"capability:KILL", "capability:MKNOD"}


def test_reconcile_reports_sessions_the_probe_did_not_watch():
    p = profile(STEADY, observed=[True, False, True, True, True])
    (d,) = read_declarations({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                              "spec": {"containers": [{"name": "main", "image": "x"}]}}, "pod.yaml")
    r = reconcile(p, [d])
    assert {"kind": "unobserved", "substrate": "capability",
            "detail": "1 of 5 sessions were recorded without the capability probe"}.items() <= \
        next(b for b in r["blindSpots"] if b["kind"] == "unobserved").items()


def test_envelope_policy_as_a_declaration_grants_its_capabilities():
    from enforcer.declared import read_declared
    pol = Policy(W, capabilities=("CHOWN",))
    r = reconcile(profile(STEADY), [read_declared(pol.to_dict(), "policy.yaml")])
    assert [d["key"] for d in r["substrates"]["capability"]["wouldDeny"]] == \
        ["capability:NET_BIND_SERVICE", "capability:NET_RAW", "capability:SYS_ADMIN"]
    assert r["substrates"]["capability"]["unused"] == []


# ---- diff -------------------------------------------------------------------------------------------


def test_diff_lists_capabilities_added_and_removed_with_why():
    p = profile(STEADY)
    old = derive(p)
    new = derive(p, DeriveOptions(admits=(("capability:NET_RAW", "ping; SEC-7"),)))
    d = diff(old, new)
    (added,) = [a for a in d["added"] if a["entry"].startswith("capability:")]
    assert added["entry"] == "capability:NET_RAW" and added["admitted"] == "admit"
    assert added["previously"] == "in review in the old policy (capability:NET_RAW)"
    back = diff(new, derive(p, DeriveOptions(substrates=("syscall", "egress", "exec"))))
    assert {r["entry"]: r["why"] for r in back["removed"] if r["entry"].startswith("capability:")} == {
        f"capability:{c}": "substrate capability is not included in the new policy"
        for c in ("CHOWN", "NET_BIND_SERVICE", "NET_RAW")}


# ---- refused checks as evidence ---------------------------------------------------------------------


def test_refused_checks_are_evidence_apart_from_behaviours():
    agg = Aggregator("n1", None, str, clock=lambda: T0)
    agg.observed = ("capability",)
    agg.bind(7, W, "s1", start=T0)
    agg.on_refused_counts({7: {"capability:NET_RAW": KeyReading(2, T0 + 1, T0 + 2)}})
    agg.on_refused_counts({7: {"capability:NET_RAW": KeyReading(5, T0 + 1, T0 + 9)}, 8: {
        "capability:CHOWN": KeyReading(1, T0, T0)}})  # cgroup 8 is not bound: nothing
    agg.on_key_counts({7: {"capability:CHOWN": KeyReading(3, T0 + 1, T0 + 3)}})
    p = agg.profile(W)
    assert p.sessions()[0].meta["observed"] == ["capability"] and p.observed_sessions("capability") == 1
    assert set(p.behaviours()) == {"capability:CHOWN"}
    (r,) = p.refused().values()
    assert (r.count, r.first_seen, r.last_seen) == (5, T0 + 1, T0 + 9)
    back = Profile.unpack(p.pack())
    assert back.refused() == p.refused()
    other = Profile(W)
    other.node("n2").add_refusal("capability:NET_RAW", 1, T0 + 20)
    merged = p.merge(other).refused()["capability:NET_RAW"]
    assert (merged.count, merged.first_seen, merged.last_seen) == (6, T0 + 1, T0 + 20)
    assert p.to_json()["refused"] == [{"key": "capability:NET_RAW", "substrate": "capability", "count": 5,
                                       "first_seen": T0 + 1, "last_seen": T0 + 9}]
    empty = Profile(W)
    empty.node("n1")
    assert "refused" not in empty.pack()["nodes"][0]  # profiles without refusals pack as before


def test_refused_keys_are_bounded_like_behaviours():
    node = Profile(W).node("n1")
    node.caps["capability"] = 2
    for c in ("CHOWN", "KILL", "SETUID"):
        node.add_refusal(f"capability:{c}", 1, T0)
    assert sorted(node.refused) == ["capability:CHOWN", "capability:KILL"]
    assert node.capped and node.overflow["capability"].count == 1


# ---- kernel symbol ranges -----------------------------------------------------------------------


def test_kallsyms_ranges_and_hidden_addresses(tmp_path):
    f = tmp_path / "kallsyms"
    f.write_text("ffffffff81000000 T _stext\n"
                 "ffffffff81abb680 T cap_vm_enough_memory\n"
                 "ffffffff81abb680 t cap_vm_alias\n"
                 "ffffffff81abb6b0 T cap_mmap_addr\n"
                 "ffffffff81ac06d0 T security_vm_enough_memory_mm\n"
                 "ffffffffc0000000 t mod_fn\t[some_module]\n"
                 "ffffffff81ac0750 T security_mmap_file\n")
    syms = features.kallsyms_text(str(f))
    assert syms["cap_vm_enough_memory"] == (0xffffffff81abb680, 0xffffffff81abb6b0)
    assert syms["security_vm_enough_memory_mm"] == (0xffffffff81ac06d0, 0xffffffff81ac0750)
    assert "mod_fn" not in syms and "security_mmap_file" not in syms  # the last one has no known end
    hidden = tmp_path / "hidden"
    hidden.write_text("0000000000000000 T cap_vm_enough_memory\n0000000000000000 T security_mmap_file\n")
    assert features.kallsyms_text(str(hidden)) == {}
    assert features.kallsyms_names(str(hidden)) == {"cap_vm_enough_memory", "security_mmap_file"}
