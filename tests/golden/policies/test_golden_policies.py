"""Golden policies: fixture profiles in, byte-exact expected policies out.

Regenerate after an intended change with ``UPDATE_GOLDEN=1 python -m pytest tests/golden/policies``
and review the diff like code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import botocore
import pytest
import structlog

from envelope.cli import main
from enforcer.policy import load_policy

from . import fixtures

HERE = Path(__file__).resolve().parent

@pytest.fixture(autouse=True)
def _restore_logging():
    """``main`` configures structlog to write to the sys.stderr of the moment, which is pytest's
    capture stream here; reset it afterwards so later tests do not log into a closed stream."""
    yield
    structlog.reset_defaults()


CASES = {
    "research-agent.structural": ("research-agent", []),
    "research-agent.literal": ("research-agent", ["--closure", "literal"]),
    "research-agent.probabilistic": ("research-agent", ["--closure", "probabilistic", "--service-cidr",
                                                        "10.96.0.0/12", "--expires-in", "14d", "-k", "2.5"]),
    "code-agent.forced": ("code-agent", ["--force"]),
    "batch-job.admit": ("batch-job", ["--min-sessions", "egress=2", "--admit", "connect:tcp:192.0.2.200:443",
                                      "--reason", "quarterly upload; approved in SEC-41", "--fingerprint",
                                      "image=sha256:2222bbbb", "--fingerprint", "identity=unit:nightly-report",
                                      "--substrates", "syscall,egress"]),
    "corpus-agent.iam": ("corpus-agent", ["--substrates", "syscall,egress,exec,iam"]),
}


@pytest.mark.parametrize("name", sorted(fixtures.PROFILES))
def test_fixture_profiles_are_current(name):
    stored = json.loads(fixtures.profile_path(name).read_text())
    assert stored == json.loads(json.dumps(fixtures.PROFILES[name]().pack())), \
        "fixture profile is stale: run python -m tests.golden.policies.fixtures"


def _stable(text: str) -> str:
    """The IAM closure records the botocore release whose service models it used; botocore is
    released almost daily, so the golden files hold a placeholder for it."""
    return text.replace(f"serviceModels: botocore {botocore.__version__}", "serviceModels: botocore VERSION")


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_policy(case, capsys):
    profile, args = CASES[case]
    code = main(["derive", str(fixtures.profile_path(profile)), *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    out = _stable(out)
    expected = HERE / f"{case}.policy.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        expected.write_text(out)
    assert out == expected.read_text(), f"{case}: derived policy differs from {expected.name}"
    load_policy(expected)  # the golden file itself passes the schema check


def test_golden_expectations_hold():
    """What the fixtures are there to show, stated outright so a regenerated file cannot hide it."""
    s = load_policy(HERE / "research-agent.structural.policy.yaml")
    assert s.execs == ("/usr/bin/git", "/usr/bin/python3.11", "/usr/lib/git-core/*")
    assert {r["key"] for r in s.review} == {"egress:tcp:203.0.113.0/24:4444", "exec:/usr/bin/curl", "syscall:ptrace",
                                            "capability:NET_RAW", "capability:SYS_ADMIN"}
    # capabilities: the ones used in every session, literally; NET_RAW passed the threshold but is a way
    # around the egress envelope, so it waits for an explicit admit; the refused SYS_PTRACE is no entry
    assert s.capabilities == ("CHOWN", "NET_BIND_SERVICE")
    net_raw = next(r for r in s.review if r["key"] == "capability:NET_RAW")
    assert net_raw["evidence"]["sessions"] == 14 and net_raw["why"].startswith("raw and packet sockets")
    assert not s.allows("capability:SYS_PTRACE") and "capability:SYS_PTRACE" not in s.watch
    forced = load_policy(HERE / "code-agent.forced.policy.yaml")  # recorded without the capability probe
    assert "capability" not in forced.substrates and "capability" in forced.decisions["granularity"]["unobserved"]
    assert s.allows("connect:tcp:10.20.30.99:443") and not s.allows("connect:tcp:10.20.31.1:443")
    lit = load_policy(HERE / "research-agent.literal.policy.yaml")
    assert not lit.allows("connect:tcp:10.20.30.99:443") and "openat2" not in lit.syscalls
    prob = load_policy(HERE / "research-agent.probabilistic.policy.yaml")
    assert prob.detection and all(d["k"] == 2.5 for d in prob.detection)
    # the resolver sits in the known service CIDR, and stays one exact entry all the same
    assert any(r.cidr == "10.96.0.10/32" and r.ports == (53,) for r in prob.egress)
    assert not any(r.cidr == "10.96.0.0/12" for r in prob.egress)
    assert any(p["rule"] == "dns-resolver" for p in prob.provenance)
    forced = load_policy(HERE / "code-agent.forced.policy.yaml")
    assert forced.low_confidence and forced.mode == "alert"
    assert any(r.port_range == (8000, 8080) for r in forced.egress)
    assert "/usr/bin/gcc" not in forced.execs and "exec:/usr/bin/gcc" in forced.watch
    batch = load_policy(HERE / "batch-job.admit.policy.yaml")
    assert batch.substrates == ("syscall", "egress") and batch.allows("exec:/anything")
    admitted = [p for p in batch.provenance if p["admitted"] == "admit"]
    assert [p["entry"] for p in admitted] == ["egress:tcp:192.0.2.200/32:443"]
    assert batch.validity["fingerprint"]["identity"] == ["unit:nightly-report"]
    corpus = load_policy(HERE / "corpus-agent.iam.policy.yaml")
    assert [(s.action, s.resource, s.access_level) for s in corpus.iam] == [
        ("s3:ListBucket", "arn:aws:s3:::research-corpus-*", "List"),
        ("s3:GetObject", "arn:aws:s3:::research-corpus-*/papers/*", "Read"),
        ("sqs:SendMessage", "arn:aws:sqs:us-east-1:123456789012:research-jobs-*", "Write")]
    assert [r["key"] for r in corpus.review] == ["iam:s3:GetObject arn:aws:s3:::research-corpus-*/notes/draft.txt"]
    assert corpus.iam_identity == "arn:aws:iam::123456789012:role/research-agent"
    assert "python3.11" in corpus.execs[0] and "syscall:read" in corpus.entries()  # one policy, every substrate
