"""Names enforced in the kernel, with real parts: dnsmasq in a network namespace made with
pyroute2 (tests/privileged/dns_world.py), glibc's getaddrinfo through Python's socket, curl and
dig as clients, the egress programs of bpf/egress.c on real cgroups, and the DNS observation
extension of the sensor.

Every packet stays inside the namespace the test made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.privileged.dns_world import RESOLVER, SERVICE_PORT, DnsWorld

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "tests" / "privileged" / "workloads" / "name_agent.py"
ENVELOPE = [sys.executable, "-m", "envelope.cli"]
PY = "/usr/bin/python3"


@pytest.fixture
def cgroup():
    from sensor.cgroup import CgroupFS
    fs = CgroupFS()
    rel = f"/envelope-test/dns-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path, _ = fs.make(rel)
    yield str(path)
    fs.remove(rel)
    fs.remove_empty_parents(rel + "/x", stop="/")


def in_cgroup(world: DnsWorld, cg: str, argv: list[str], check=False) -> subprocess.CompletedProcess:
    """``argv`` inside the world's namespace and in cgroup ``cg``."""
    return subprocess.run(["sh", "-c", f'echo $$ > "{cg}/cgroup.procs" && exec "$@"', "sh",
                           *world.argv(argv)], capture_output=True, text=True, timeout=120,
                          check=check)


def agent(world, cg, *targets) -> list[dict]:
    r = in_cgroup(world, cg, [PY, str(AGENT), *targets])
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def program(names, mode="enforce", limits=None, resolver_tcp=False):
    from enforcer.egress import EgressProgram
    from enforcer.egress_rules import Limits
    from enforcer.policy import EgressRule
    rules = [EgressRule("udp", f"{RESOLVER}/32", (53,))]
    if resolver_tcp:
        rules.append(EgressRule("tcp", f"{RESOLVER}/32", (53,)))
    prog = EgressProgram.load(f"test/Unit/dns-{uuid.uuid4().hex[:8]}/main", None, limits or Limits())
    prog.write_policy(rules, mode, grace=0, names=names)
    return prog


def test_first_connect_after_each_fresh_lookup_is_allowed_and_others_are_denied(cgroup):
    """Every lookup answers a name never seen before with an address never seen before; the
    connect that follows at once must pass (the address is learned before the answer can be
    read). A disallowed name resolves but its address stays denied."""
    from enforcer.names import NameRule
    n = 40
    names = {f"n{i}.svc.example.test": [f"10.77.2.{i + 1}"] for i in range(n)}
    names["evil.example.test"] = ["10.77.3.1"]
    with DnsWorld(ttl=0) as world:
        world.set_names(names)
        prog = program([NameRule("*.svc.example.test", "tcp", (SERVICE_PORT,))])
        try:
            prog.attach(cgroup)
            steps = agent(world, cgroup, *[f"n{i}.svc.example.test:{SERVICE_PORT}" for i in range(n)],
                          f"evil.example.test:{SERVICE_PORT}", f"@10.77.2.99:{SERVICE_PORT}")
            assert [s["ok"] for s in steps[:n]] == [True] * n, steps[:n]
            assert steps[n]["address"] == "10.77.3.1" and steps[n]["errno"] == "EPERM"
            assert steps[n + 1]["errno"] == "EPERM"
            stats = prog.dns_stats()
            assert stats["learned"] == n and stats["not_allowed"] == 1
            assert {l["addr"] for l in prog.learned()} == {a for v in list(names.values())[:n] for a in v}
        finally:
            prog.detach(cgroup)
            prog.close()


def test_curl_and_dig_over_udp_and_tcp(cgroup):
    from enforcer.names import NameRule
    with DnsWorld(ttl=30) as world:
        world.set_names({"api.example.test": ["10.77.1.20"], "tcp.example.test": ["10.77.1.21"]})
        prog = program([NameRule("api.example.test", "tcp", (SERVICE_PORT,)),
                        NameRule("tcp.example.test", "tcp", (SERVICE_PORT,))], resolver_tcp=True)
        try:
            prog.attach(cgroup)
            r = in_cgroup(world, cgroup, ["curl", "-s", "-m", "5", f"http://api.example.test:{SERVICE_PORT}/"])
            assert r.returncode == 0 and r.stdout == "ok", r
            r = in_cgroup(world, cgroup, ["dig", "+tcp", "+short", "tcp.example.test"])
            assert r.stdout.split() == ["10.77.1.21"]
            assert any(l["addr"] == "10.77.1.21" for l in prog.learned())  # from the TCP answer
            r = in_cgroup(world, cgroup, ["curl", "-s", "-m", "5", f"http://10.77.1.21:{SERVICE_PORT}/"])
            assert r.stdout == "ok"  # dig's answer taught the cgroup the address, curl used it
        finally:
            prog.detach(cgroup)
            prog.close()


def test_aaaa_answers_and_ipv6_connects(cgroup):
    """An AAAA answer teaches the IPv6 address; curl -6 reaches it, another IPv6 address stays
    denied."""
    from enforcer.names import NameRule
    with DnsWorld(ttl=30) as world:
        world.set_names({"v6.example.test": ["fd77::1:20"], "other6.example.test": ["fd77::1:21"]})
        prog = program([NameRule("v6.example.test", "tcp", (SERVICE_PORT,))])
        try:
            prog.attach(cgroup)
            r = in_cgroup(world, cgroup, ["curl", "-6", "-s", "-m", "5", f"http://v6.example.test:{SERVICE_PORT}/"])
            assert r.returncode == 0 and r.stdout == "ok", r
            assert {l["addr"] for l in prog.learned()} == {"fd77::1:20"}
            r = in_cgroup(world, cgroup, ["curl", "-6", "-s", "-m", "5", f"http://other6.example.test:{SERVICE_PORT}/"])
            assert r.returncode == 7  # couldn't connect: EPERM
        finally:
            prog.detach(cgroup)
            prog.close()


def test_ttl_zero_expiry_and_an_open_connection(cgroup):
    """TTL 0: the address is allowed for the grace only. A connection opened in time stays
    open after expiry; a new connect after it is denied until the name is resolved again."""
    import dataclasses

    from enforcer.egress_rules import Limits
    from enforcer.names import NameRule
    code = f"""
import socket, sys, time
a = socket.getaddrinfo("short.example.test", {SERVICE_PORT}, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
s = socket.create_connection((a, {SERVICE_PORT}), timeout=5)
time.sleep(2.5)
s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n"); print("open", s.recv(100).endswith(b"ok"))
try:
    socket.create_connection((a, {SERVICE_PORT}), timeout=5); print("again", "ok")
except OSError as e:
    print("again", e.errno)
a = socket.getaddrinfo("short.example.test", {SERVICE_PORT}, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
socket.create_connection((a, {SERVICE_PORT}), timeout=5); print("resolved", "ok")
"""
    with DnsWorld(ttl=0) as world:
        world.set_names({"short.example.test": ["10.77.1.30"]})
        prog = program([NameRule("short.example.test", "tcp", (SERVICE_PORT,))],
                       limits=dataclasses.replace(Limits(), dns_grace=1.0))
        try:
            prog.attach(cgroup)
            r = in_cgroup(world, cgroup, [PY, "-c", code])
            assert r.stdout.split("\n")[:3] == ["open True", "again 1", "resolved ok"], (r.stdout, r.stderr)
            assert all(l["ttl"] == 0 for l in prog.learned())
        finally:
            prog.detach(cgroup)
            prog.close()


def test_shared_address_and_many_address_answers(cgroup):
    """An address shared by an allowed and a disallowed name is allowed only once an answer
    for the allowed name gave it to this cgroup. An answer with more addresses than the parser
    takes (32) teaches the first 32; the rest stay denied and are counted as truncated."""
    from enforcer.names import NameRule
    many = [f"10.77.4.{i}" for i in range(1, 41)]
    with DnsWorld(ttl=30) as world:
        world.set_names({"ok.example.test": ["10.77.1.40"], "other.example.test": ["10.77.1.40"],
                         "many.example.test": many})
        prog = program([NameRule("ok.example.test", "tcp", (SERVICE_PORT,)),
                        NameRule("many.example.test", "tcp", (SERVICE_PORT,))])
        try:
            prog.attach(cgroup)
            s = agent(world, cgroup, f"other.example.test:{SERVICE_PORT}")
            assert s[0]["errno"] == "EPERM"
            s = agent(world, cgroup, f"ok.example.test:{SERVICE_PORT}", f"other.example.test:{SERVICE_PORT}")
            assert [x["ok"] for x in s] == [True, True]
            r = in_cgroup(world, cgroup, ["dig", "+short", "+bufsize=1232", "many.example.test"])
            answered = r.stdout.split()
            assert len(answered) == 40
            learned = {l["addr"] for l in prog.learned() if l["addr"].startswith("10.77.4.")}
            assert len(learned) == 32 and learned <= set(answered)
            assert prog.dns_stats()["truncated"] >= 1
            late = sorted(set(answered) - learned)
            s = agent(world, cgroup, f"@{sorted(learned)[0]}:{SERVICE_PORT}", f"@{late[0]}:{SERVICE_PORT}")
            assert [x["ok"] for x in s] == [True, False] and s[1]["errno"] == "EPERM"
        finally:
            prog.detach(cgroup)
            prog.close()


def test_learned_addresses_survive_a_restart_in_the_pinned_maps(cgroup, tmp_path):
    """A pinned session learns an address; its process goes away; a new one adopts the pins
    with no window: the address stays allowed without a new lookup, and new answers are still
    learned. Then the set is removed."""
    from enforcer.names import NameRule
    from enforcer.policy import EgressRule, Policy
    from enforcer.session import EnforcementSession
    from sensor.workload import Workload
    w = Workload.host(f"dns-pin-{uuid.uuid4().hex[:8]}")
    pol = Policy(w, mode="enforce", substrates=("egress",),
                 egress=(EgressRule("udp", f"{RESOLVER}/32", (53,)),),
                 names=(NameRule("*.svc.example.test", "tcp", (SERVICE_PORT,)),))
    with DnsWorld(ttl=300) as world:
        world.set_names({"a.svc.example.test": ["10.77.5.1"], "b.svc.example.test": ["10.77.5.2"]})
        s1 = EnforcementSession(tmp_path, pinned=True)
        s1.apply(pol, "enforce", [cgroup])
        try:
            assert agent(world, cgroup, f"a.svc.example.test:{SERVICE_PORT}")[0]["ok"]
            s1.close()  # the daemon is gone; the pinned programs and maps stay
            assert agent(world, cgroup, f"@10.77.5.1:{SERVICE_PORT}")[0]["ok"]
            s2 = EnforcementSession(tmp_path, pinned=True)
            assert s2.adopt_pinned() == [w.key]
            prog = s2.enforced[w.key].program
            assert {l["addr"] for l in prog.learned()} == {"10.77.5.1"}
            steps = agent(world, cgroup, f"@10.77.5.1:{SERVICE_PORT}", f"b.svc.example.test:{SERVICE_PORT}",
                          f"@10.77.5.9:{SERVICE_PORT}")
            assert [x["ok"] for x in steps] == [True, True, False]
            # a policy swap that keeps the name keeps what was learned; one that drops it clears it
            s2.apply(pol, "enforce", [cgroup], reason="same names")
            assert {l["addr"] for l in prog.learned()} == {"10.77.5.1", "10.77.5.2"}
            import dataclasses
            s2.apply(dataclasses.replace(pol, names=()), "enforce", [cgroup], reason="no names")
            assert prog.learned() == []
            assert agent(world, cgroup, f"@10.77.5.1:{SERVICE_PORT}")[0]["errno"] == "EPERM"
            s2.remove(w, reason="test done")
            s2.close()
        finally:
            from enforcer.egress import EgressProgram, pin_dir_for
            pin = pin_dir_for("/sys/fs/bpf", w.key)
            if pin.exists():
                EgressProgram.adopt(pin).remove()


def test_observation_names_connects_and_keeps_addresses(cgroup):
    """The sensor's DNS extension: queries become dns:NAME, connects to answered addresses are
    recorded under the name with the address as evidence, a hard-coded address stays one."""
    from sensor import syscalls
    from sensor.aggregate import Aggregator
    from sensor.dns import DnsObserver
    from sensor.probes import Sensor
    from sensor.pump import Pump, TreeBinding
    from sensor.workload import Workload
    w = Workload.host("dns-observe")
    with DnsWorld(ttl=30) as world:
        world.set_names({"api.example.test": ["10.77.1.50"]})
        # events of this cgroup only: other work on the machine must not crowd the ring
        cid = os.stat(cgroup).st_ino
        sensor = Sensor(ringbuf_pages=1024, cflags=[f"-DEVENT_CGROUP={cid}"],
                        extensions=[DnsObserver()])
        sensor.attach()
        try:
            agg = Aggregator("n1", None, syscalls.name)
            pump = Pump(sensor, TreeBinding(cgroup, w, "s1"), agg, counts_interval=0.2)
            agent(world, cgroup, f"api.example.test:{SERVICE_PORT}", f"@10.77.1.51:{SERVICE_PORT}")
            pump.finish()
            keys = set(agg.profiles[w].behaviours())
            assert {"dns:api.example.test", f"connect:tcp:api.example.test:{SERVICE_PORT}",
                    f"connect:tcp:10.77.1.51:{SERVICE_PORT}"} <= keys
            assert f"connect:tcp:10.77.1.50:{SERVICE_PORT}" not in keys
            assert agg.profiles[w].evidence()[f"connect:tcp:api.example.test:{SERVICE_PORT}"] == {"10.77.1.50": 1}
            assert sensor.loss()["dns_ringbuf_full"] == 0
        finally:
            pump.release()
            sensor.close()


def test_a_counter_read_before_the_answer_is_drained_still_names_the_connect(cgroup):
    """The connect is counted in the kernel and its answer waits in the DNS ring: a counter read
    that comes first (the pump reads counters between drains) must not record the address. The
    pump drains the rings after taking the counters and before applying them."""
    from sensor import syscalls
    from sensor.aggregate import Aggregator
    from sensor.dns import DnsObserver
    from sensor.probes import Sensor
    from sensor.pump import Pump, TreeBinding
    from sensor.workload import Workload
    w = Workload.host("dns-counted-first")
    with DnsWorld(ttl=30) as world:
        world.set_names({"api.example.test": ["10.77.1.52"]})
        cid = os.stat(cgroup).st_ino
        sensor = Sensor(ringbuf_pages=1024, cflags=[f"-DEVENT_CGROUP={cid}"], extensions=[DnsObserver()])
        sensor.attach()
        try:
            agg = Aggregator("n1", None, syscalls.name)
            pump = Pump(sensor, TreeBinding(cgroup, w, "s1"), agg, counts_interval=3600)
            agent(world, cgroup, f"api.example.test:{SERVICE_PORT}")
            pump.read_counters()  # before any drain: the answer is still in its ring
            pump.finish()
            keys = set(agg.profiles[w].behaviours())
            assert f"connect:tcp:api.example.test:{SERVICE_PORT}" in keys
            assert f"connect:tcp:10.77.1.52:{SERVICE_PORT}" not in keys, sorted(keys)
        finally:
            pump.release()
            sensor.close()


def test_rotation_record_derive_explain_enforce_and_a_denial(tmp_path):
    """The README's worked example, through the CLI: three recorded sessions see api.example.test
    at three addresses; the derived policy allows the name (not the addresses) and the resolver;
    a held-out session gets a fourth address and works under enforcement; a hard-coded address
    and a disallowed name are denied and reported."""
    state = tmp_path / "state"
    name = f"dns-agent-{os.getpid()}"

    def env(*args, check=True):
        r = subprocess.run([*ENVELOPE, "--state-dir", str(state), *args], capture_output=True,
                           text=True, cwd=ROOT, timeout=300)
        if check:
            assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-2000:])
        return r

    with DnsWorld(ttl=30) as world:
        for addr in ("10.77.1.10", "10.77.1.11", "10.77.1.12"):
            world.set_names({"api.example.test": [addr], "evil.example.test": ["10.77.1.66"]})
            env("record", "--workload", name, "--", *world.argv(
                [PY, str(AGENT), f"api.example.test:{SERVICE_PORT}", f"api.example.test:{SERVICE_PORT}"]))
        pol = tmp_path / "policy.yaml"
        env("derive", name, "--force", "--substrates", "egress", "--min-count", "egress=2",
            "--out", str(pol))
        from enforcer.policy import load_policy
        p = load_policy(pol)
        assert [r.id for r in p.names] == [f"name:tcp:api.example.test:{SERVICE_PORT}"]
        assert [r.id for r in p.egress] == [f"egress:udp:{RESOLVER}/32:53"]
        out = env("explain", str(pol)).stdout
        assert "resolved to 10.77.1.10, 10.77.1.11, 10.77.1.12" in out and "dns-resolver" in out

        world.set_names({"api.example.test": ["10.77.1.13"], "evil.example.test": ["10.77.1.66"]})
        # envelope exec runs in the world (its enforced child may not enter a namespace)
        r = subprocess.run(world.host_argv([*ENVELOPE, "--state-dir", str(state), "exec", "--policy",
                                            str(pol), "--mode", "enforce", "--", PY, str(AGENT),
                                            f"api.example.test:{SERVICE_PORT}",
                                            f"@10.77.1.99:{SERVICE_PORT}",
                                            f"evil.example.test:{SERVICE_PORT}"]),
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
        steps = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        assert [(s["address"], s["ok"], s["errno"]) for s in steps] == [
            ("10.77.1.13", True, None), ("10.77.1.99", False, "EPERM"), ("10.77.1.66", False, "EPERM")]
        r = env("violations", "--workload", name, "-o", "json", check=False)
        assert r.returncode == 1, r.stderr  # it lists violations
        v = json.loads(r.stdout)
        found = {(x["behaviour"], x["action"]) for x in v}
        assert (f"connect:tcp:10.77.1.99:{SERVICE_PORT}", "denied") in found
        assert (f"connect:tcp:10.77.1.66:{SERVICE_PORT}", "denied") in found
        assert ("dns:evil.example.test", "alerted") in found
