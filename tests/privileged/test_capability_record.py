"""The capability substrate end to end: ``envelope record`` a small known workload for several
sessions (real BPF, a real cgroup per session), ``envelope derive``, ``explain``, ``compile``.

The workload binds port 99 (NET_BIND_SERVICE), chowns a file of its own (CHOWN), opens a raw
socket (NET_RAW), then drops to user nobody (SETGID twice, SETUID) and tries the raw socket again
(refused). One session also makes a UTS namespace and sets its hostname (SYS_ADMIN, twice).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from enforcer.capabilities import exec_capability_sets
from enforcer.elements import ADMIT_ONLY
from enforcer.policy import load_policy
from sensor.store import ProfileStore
from sensor.workload import Workload

ROOT = Path(__file__).resolve().parents[2]
WORKLOAD_C = Path(__file__).resolve().parent / "workloads" / "capability_workload.c"
SESSIONS = 5


def envelope(state, *args):
    return subprocess.run([sys.executable, "-m", "envelope.cli", "--state-dir", str(state), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture
def shared_dir():
    d = Path(tempfile.mkdtemp(prefix=f"envelope-caps-record-{os.getpid()}-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_record_derive_compile_capabilities(tmp_path, shared_dir):
    gcc = shutil.which("gcc") or pytest.fail("gcc is needed to build the test workload; run make setup")
    binary = shared_dir / "capability_workload"
    subprocess.run([gcc, "-O1", "-Wall", "-o", str(binary), str(WORKLOAD_C)], check=True)
    state = tmp_path / "state"
    for i in range(SESSIONS):
        target = shared_dir / f"scratch-{i}"
        target.write_text("x")
        ops = ["bind=99", f"chown={target}:65534", "raw", "mmap=20"]
        if i == 2:
            ops.append("uts=envelope-test")
        ops += ["drop", "raw"]
        r = envelope(state, "record", "--workload", "caps-agent", "--session", f"s{i}", "--", str(binary), *ops)
        assert r.returncode == 0, r.stderr
    w = Workload.host("caps-agent")
    p = ProfileStore(state).load(w)
    assert [s.meta.get("observed") for s in p.sessions()] == [["capability"]] * SESSIONS
    caps = {k: (s.count, s.sessions) for k, s in p.behaviours().items() if k.startswith("capability:")}
    assert caps == {"capability:NET_BIND_SERVICE": (5, 5), "capability:CHOWN": (5, 5), "capability:NET_RAW": (5, 5),
                    "capability:SETGID": (10, 5), "capability:SETUID": (5, 5), "capability:SYS_ADMIN": (2, 1)}
    assert {k: r.count for k, r in p.refused().items()} == {"capability:NET_RAW": 5}
    shown = json.loads(envelope(state, "profile", "show", "caps-agent", "--substrate", "capability", "-o", "json").stdout)
    assert [(r["key"], r["count"]) for r in shown["refused"]] == [("capability:NET_RAW", 5)]

    policy_file = tmp_path / "policy.yaml"
    r = envelope(state, "derive", "caps-agent", "--force", "--out", str(policy_file))
    assert r.returncode == 0, r.stderr
    assert "4 capabilities" in r.stderr
    pol = load_policy(policy_file)
    assert pol.capabilities == ("CHOWN", "NET_BIND_SERVICE", "SETGID", "SETUID")
    prov = {q["entry"]: q for q in pol.provenance}
    assert prov["capability:SETGID"]["evidence"]["count"] == 10 and prov["capability:SETGID"]["evidence"]["sessions"] == 5
    assert prov["capability:CHOWN"]["rule"] == "literal" and prov["capability:CHOWN"]["admitted"] == "threshold"
    review = {q["key"]: q for q in pol.review if q["substrate"] == "capability"}
    assert review["capability:NET_RAW"]["why"] == ADMIT_ONLY["capability:NET_RAW"]
    assert review["capability:SYS_ADMIN"]["evidence"]["count"] == 2
    assert {"capability:NET_RAW", "capability:SYS_ADMIN"} <= set(pol.watch)

    explained = envelope(state, "explain", str(policy_file))
    assert "capability: literal: a capability is one privilege" in explained.stdout
    assert "capability:NET_RAW" in explained.stdout and "capability:SETUID" in explained.stdout

    admitted = tmp_path / "admitted.yaml"
    r = envelope(state, "derive", "caps-agent", "--force", "--mode", "enforce", "--admit", "capability:NET_RAW",
                 "--reason", "health checks ping the gateway; SEC-7", "--out", str(admitted))
    assert r.returncode == 0, r.stderr
    pol2 = load_policy(admitted)
    assert pol2.capabilities == ("CHOWN", "NET_BIND_SERVICE", "NET_RAW", "SETGID", "SETUID")
    assert {q["entry"]: q.get("reason") for q in pol2.provenance}["capability:NET_RAW"] == \
        "health checks ping the gateway; SEC-7"
    assert exec_capability_sets(pol2) == frozenset({0, 6, 7, 10, 13})
    frag = envelope(state, "compile", str(admitted), "--format", "k8s-capabilities")
    assert frag.returncode == 0, frag.stderr
    assert yaml.safe_load(frag.stdout) == {"drop": ["ALL"],
                                           "add": ["CHOWN", "NET_BIND_SERVICE", "NET_RAW", "SETGID", "SETUID"]}
    d = envelope(state, "diff", str(policy_file), str(admitted), "-o", "json")
    assert d.returncode == 1
    assert "capability:NET_RAW" in [a["entry"] for a in json.loads(d.stdout)["added"]]
