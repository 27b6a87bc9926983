"""The request capture end to end: real BPF (the sensor hook, cgroup programs, uprobes on the
system libssl), real clients nobody here wrote (urllib, requests, httpx, curl, the official
openai package, boto3), real servers (Python's http.server over HTTPS and plaintext, moto).

Recorded sessions become http:, aws: behaviours and a model fingerprint; credentials are found
nowhere in the state directory; a policy derived with the http substrate lets held-out variations
pass and, for a new method or path, reports the request at once (alert) or kills the process
before the request reaches the server (enforce).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from envelope import wiring
from envelope.config import Config
from envelope.recording import record
from sensor.store import ProfileStore
from sensor.workload import Workload
from tests.privileged.httpservers import Peers

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "tests" / "privileged" / "workloads" / "http_client.py"
SECRETS = (b"sk-test-SECRET-do-not-keep", b"COOKIE-do-not-keep")
TRAIN_IDS = ([8812, 9313], [17, 404040], [555, 23], [7, 61])
CLIENTS = ("urllib", "requests", "httpx", "curl")


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    p = Peers(tmp_path_factory.mktemp("peers"))
    yield p
    p.close()


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def sensor(state):
    cfg = Config(state_dir=state, ringbuf_pages=256)
    s = wiring.open_sensor(cfg)
    yield s
    s.close()


def _steps(ids, client):
    steps = [f"GET:/v1/docs/{i}?token=q-secret" for i in ids] + [f"plain-GET:/v1/plain/{i}" for i in ids]
    steps += ["POST:/v1/notes", "GET:/missing/thing"]
    steps.append("chat:gpt-test-1")
    return steps


def _record(state, sensor, peers, workload, client, steps):
    cfg = Config(state_dir=state, ringbuf_pages=256, poll_interval=0.2)
    argv = [sys.executable, str(CLIENT), client, peers.https, peers.http, str(peers.ca), *steps]
    res = record(cfg, Workload.host(workload), argv, sensor=sensor)
    assert res.exit_code == 0, f"{client} run failed"
    return ProfileStore(state).load(Workload.host(workload))


def envelope(state, *args, **kw):
    return subprocess.run([sys.executable, "-m", "envelope.cli", "--state-dir", str(state), *args],
                          cwd=ROOT, capture_output=True, text=True, **kw)


@pytest.mark.parametrize("client", CLIENTS + ("openai",))
def test_each_client_becomes_behaviours(state, sensor, peers, client):
    steps = ["chat:gpt-test-1"] if client == "openai" else _steps([8812, 9313], client)
    prof = _record(state, sensor, peers, f"client-{client}", client, steps)
    keys = set(prof.behaviours())
    host, plain = peers.https.split("//")[1], peers.http.split("//")[1]
    want = {f"http:POST {host}/v1/chat/completions 200"}
    if client != "openai":
        want |= {f"http:GET {host}/v1/docs/8812 200", f"http:GET {host}/v1/docs/9313 200",
                 f"http:GET {plain}/v1/plain/8812 200", f"http:POST {host}/v1/notes 201",
                 f"http:GET {host}/missing/thing 404"}
    assert want <= keys, sorted(k for k in keys if k.startswith("http:"))
    assert prof.fingerprints()["model"] == ["gpt-test-1"]
    stacks = prof.tls_stacks()
    assert any(any(s.startswith("openssl-dynamic:") for s in v) for v in stacks.values()), stacks


@pytest.mark.parametrize("client", ("requests-session", "httpx-session"))
def test_every_answer_on_a_kept_alive_tls_connection_has_its_status(state, sensor, peers, client):
    """A megabyte body (dozens of TLS reads the probes let pass unread), then more requests on the
    same connection: each answer's status is still read from the first bytes of its own head."""
    since = peers.mark()
    steps = ["GET:/download/1048576", "GET:/missing/after", "POST:/v1/notes", "GET:/download/300000",
             "DELETE:/v1/notes/5", "GET:/v1/docs/77"]
    prof = _record(state, sensor, peers, f"kept-alive-{client}", client, steps)
    reqs = peers.tls.seen[since[0]:]
    assert [(r["method"], r["path"]) for r in reqs] == [tuple(s.split(":", 1)) for s in steps]
    assert len({r["peer"] for r in reqs}) == 1, "the client opened more than one connection"
    host = peers.https.split("//")[1]
    keys = {k for k in prof.behaviours() if k.startswith("http:")}
    assert keys == {f"http:GET {host}/download/1048576 200", f"http:GET {host}/missing/after 404",
                    f"http:POST {host}/v1/notes 201", f"http:GET {host}/download/300000 200",
                    f"http:DELETE {host}/v1/notes/5 204", f"http:GET {host}/v1/docs/77 200"}, sorted(keys)
    assert not any(n for k, n in sensor.loss().items() if k.startswith("http_")), sensor.loss()


LATE_TLS = """
import sys, time
time.sleep(3)  # scanned meanwhile: no TLS library mapped yet (Python imports ssl lazily)
sys.path.insert(0, sys.argv[1])
import http_client
rc = http_client.main(sys.argv[2:])
time.sleep(1)  # still running when its capture is read
sys.exit(rc)
"""


def test_a_process_loading_tls_after_its_scan_is_labelled_by_its_capture(state, sensor, peers):
    cap = next(e for e in sensor.extensions if e.name == "http")
    saved = cap.scan_interval
    cap.scan_interval, cap._next_scan = 3600.0, 0.0  # one scan at the start, none after it
    try:
        cfg = Config(state_dir=state, ringbuf_pages=256, poll_interval=0.2)
        argv = [sys.executable, "-c", LATE_TLS, str(CLIENT.parent), "urllib", peers.https, peers.http,
                str(peers.ca), "GET:/v1/docs/5"]
        res = record(cfg, Workload.host("late-tls"), argv, sensor=sensor)
    finally:
        cap.scan_interval, cap._next_scan = saved, 0.0  # the module's other tests scan as usual
    assert res.exit_code == 0
    stacks = ProfileStore(state).load(Workload.host("late-tls")).tls_stacks()
    labels = [s for v in stacks.values() for s in v]
    assert "none" in labels, stacks  # the scan came before the import ...
    assert any(s.startswith("openssl-dynamic:") for s in labels), stacks  # ... the capture told the rest


def test_credentials_are_kept_nowhere(state, sensor, peers):
    prof = _record(state, sensor, peers, "client-secrets", "urllib", _steps([1], "urllib"))
    found = [p for p in Path(state).rglob("*") if p.is_file() and any(s in p.read_bytes() for s in SECRETS)]
    assert not found, found
    # the query (?token=...) is in the command line the session records, never in a behaviour
    assert any(k.startswith("http:GET ") and "/v1/docs/1 " in k for k in prof.behaviours())
    assert not any("q-secret" in k or "token" in k for k in prof.behaviours())


@pytest.fixture(scope="module")
def policy(state, sensor, peers, tmp_path_factory):
    """Four training sessions (different clients, different document ids), derived with http."""
    for i, ids in enumerate(TRAIN_IDS):
        _record(state, sensor, peers, "agent", CLIENTS[i % len(CLIENTS)], _steps(ids, CLIENTS[i % len(CLIENTS)]))
    out = tmp_path_factory.mktemp("policy") / "policy.yaml"
    r = envelope(state, "derive", "agent", "--substrates", "http", "--force", "--min-count", "2",
                 "--min-sessions", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_derived_policy_templates_ids_and_keeps_methods(policy, peers):
    from enforcer.policy import load_policy
    pol = load_policy(policy)
    host, plain = peers.https.split("//")[1], peers.http.split("//")[1]
    assert f"http:GET {host}/v1/docs/{{id}}" in pol.http
    assert f"http:GET {plain}/v1/plain/{{id}}" in pol.http
    assert f"http:POST {host}/v1/chat/completions" in pol.http
    assert not any(e.startswith("http:DELETE") for e in pol.http)
    assert pol.decisions["granularity"]["enforcement"]["http"]["action"] == "kill-process"
    assert pol.validity["fingerprint"]["model"] == ["gpt-test-1"]


def _exec(state, policy, mode, peers, client, steps):
    return envelope(state, "exec", "--policy", str(policy), "--mode", mode, "--",
                    sys.executable, str(CLIENT), client, peers.https, peers.http, str(peers.ca), *steps,
                    timeout=300)


def _violations(state) -> list[dict]:
    r = envelope(state, "violations", "--substrate", "http", "-o", "json")
    assert r.returncode in (0, 1), r.stderr  # 1: there are findings
    data = json.loads(r.stdout)
    return data if isinstance(data, list) else data.get("violations", [])


@pytest.mark.parametrize("client", ["requests", "curl"])
def test_held_out_variations_pass_under_enforce(tmp_path, policy, peers, client):
    state = tmp_path / "state"
    r = _exec(state, policy, "enforce", peers, client, _steps([31337, 2718281], client))
    assert r.returncode == 0, r.stderr
    assert not _violations(state)


def test_alert_reports_a_new_method_and_path_at_once(tmp_path, policy, peers):
    state = tmp_path / "state"
    before = peers.mark()
    r = _exec(state, policy, "alert", peers, "httpx", ["GET:/v1/docs/5", "DELETE:/v1/docs/5", "plain-GET:/admin/keys"])
    assert r.returncode == 0, r.stderr
    got = {(v["behaviour"], v["action"]) for v in _violations(state)}
    host, plain = peers.https.split("//")[1], peers.http.split("//")[1]
    assert got == {(f"http:DELETE {host}/v1/docs/5", "alerted"), (f"http:GET {plain}/admin/keys", "alerted")}
    v = next(v for v in _violations(state) if "DELETE" in v["behaviour"])
    assert v["detail"]["method"] == "DELETE" and v["detail"]["path"] == "/v1/docs/5" and v["detail"]["comm"]
    assert ("DELETE", "/v1/docs/5") in peers.seen(before)  # alert mode lets it through


@pytest.mark.parametrize("step,seen", [("DELETE:/v1/docs/5", ("DELETE", "/v1/docs/5")),
                                       ("plain-GET:/admin/keys", ("GET", "/admin/keys"))])
def test_enforce_kills_before_the_request_reaches_the_server(tmp_path, policy, peers, step, seen):
    state = tmp_path / "state"
    before = peers.mark()
    r = _exec(state, policy, "enforce", peers, "urllib", ["GET:/v1/docs/5", step, "GET:/v1/docs/6"])
    assert r.returncode == 128 + 9, (r.returncode, r.stderr)
    after = peers.seen(before)
    assert ("GET", "/v1/docs/5") in after           # allowed, answered
    assert seen not in after                         # stopped in the probe
    assert ("GET", "/v1/docs/6") not in after        # the process is gone
    (v,) = _violations(state)
    assert v["action"] == "denied" and v["detail"]["enforced"]


def test_boto3_against_moto_gives_aws_behaviours(state, sensor, tmp_path_factory):
    from tests.motoserver import MotoServer
    server = MotoServer(tmp_path_factory.mktemp("moto"), 1000)
    server.start()
    script = tmp_path_factory.mktemp("aws") / "agent.py"
    script.write_text(f"""
import boto3
from botocore.config import Config
kw = dict(endpoint_url={server.endpoint!r}, verify={str(server.ca_path)!r}, region_name="us-east-1",
          aws_access_key_id="AKIAIOSFODNN7EXAMPLE", aws_secret_access_key="wJalrXUtnFEMI-secret",
          config=Config(retries={{"max_attempts": 1}}))
s3 = boto3.client("s3", **kw)
s3.create_bucket(Bucket="research-corpus-v2")
s3.put_object(Bucket="research-corpus-v2", Key="papers/7.pdf", Body=b"paper")
assert s3.get_object(Bucket="research-corpus-v2", Key="papers/7.pdf")["Body"].read() == b"paper"
s3.list_objects_v2(Bucket="research-corpus-v2", Prefix="papers/")
sqs = boto3.client("sqs", **kw)
url = sqs.create_queue(QueueName="research-jobs-v1")["QueueUrl"]
sqs.send_message(QueueUrl=url, MessageBody="job")
""")
    try:
        cfg = Config(state_dir=state, ringbuf_pages=256, poll_interval=0.2)
        res = record(cfg, Workload.host("aws-agent"), [sys.executable, str(script)], sensor=sensor)
        assert res.exit_code == 0
    finally:
        server.stop()
    prof = ProfileStore(state).load(Workload.host("aws-agent"))
    keys = set(prof.behaviours())
    assert "aws:s3:GetObject arn:aws:s3:::research-corpus-v2/papers/7.pdf" in keys, sorted(keys)
    assert "aws:s3:PutObject arn:aws:s3:::research-corpus-v2/papers/7.pdf" in keys
    assert "aws:s3:ListObjectsV2 arn:aws:s3:::research-corpus-v2" in keys
    assert any(k.startswith("aws:sqs:SendMessage ") and k.endswith(":research-jobs-v1") for k in keys), sorted(keys)
    for p in Path(state).rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert b"AKIAIOSFODNN7EXAMPLE" not in data and b"wJalrXUtnFEMI-secret" not in data, p


def test_a_tls_stack_without_probes_is_a_blind_spot(state, sensor, peers):
    """wget speaks TLS through GnuTLS, which no probe is on: its TLS requests are not seen and the
    profile says so, per executable and per connection (with the TLS record it saw go out)."""
    cfg = Config(state_dir=state, ringbuf_pages=256, poll_interval=0.2)
    # two downloads a second apart: the process lives long enough for a scan of its mappings
    argv = ["/usr/bin/wget", "-q", "-O", "/dev/null", "--wait=1", f"--ca-certificate={peers.ca}",
            f"{peers.https}/v1/docs/1", f"{peers.https}/v1/docs/2"]
    res = record(cfg, Workload.host("wget-agent"), argv, sensor=sensor)
    assert res.exit_code == 0
    prof = ProfileStore(state).load(Workload.host("wget-agent"))
    assert not any(k.startswith("http:") for k in prof.behaviours())
    spots = prof.blind_spots().get("http", [])
    assert any("wget" in s and "gnutls" in s for s in spots), spots
    assert any("TLS stack no probe is on" in s for s in spots), spots
