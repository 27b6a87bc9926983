"""Every config value is checked when it is set: finite numbers in range, booleans that are
booleans, absolute paths, paths that exist where Envelope reads from them. Each bad config is
one line and exit 2 through the CLI, never an internal error."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest

from envelope.cli import main
from envelope.config import DEFAULT_METRICS_ADDRESS, Config
from envelope.errors import UserError
from envelope.metrics import Metrics

BAD = {
    "flush_interval: .nan": "flush_interval: must be finite",
    "flush_interval: .inf": "flush_interval: must be finite",
    "flush_interval: -1": "flush_interval: must be more than 0",
    "flush_interval: 0": "flush_interval: must be more than 0",
    "flush_interval: ten": "flush_interval: must be a number",
    "poll_interval: true": "poll_interval: must be a number",
    "poll_interval: 1.0e+308": "poll_interval: must be within",
    "policy_sync_interval: .nan": "policy_sync_interval: must be finite",
    "caps: {syscall: -5}": "caps: syscall: must be within",
    "caps: {egress: 1.5}": "caps: egress: must be a whole number",
    "caps: {dns: 10}": "caps: unknown substrate",
    "caps: 100": "caps: must be a mapping",
    "caps: {syscall: '100'}": "caps: syscall: must be a whole number",
    "ringbuf_pages: 3": "ringbuf_pages: must be a power of two",
    "ringbuf_pages: 0": "ringbuf_pages: must be within",
    "ringbuf_pages: 2048.5": "ringbuf_pages: must be a whole number",
    "max_cgroups: 0": "max_cgroups: must be within 1..65535",
    "max_cgroups: 100000": "max_cgroups: must be within 1..65535",
    "metrics_port: 70000": "metrics_port: must be within 0..65535",
    "metrics_port: '9464'": "metrics_port: must be a whole number",
    "metrics_address: localhost:9464": "metrics_address: 'localhost:9464' is not an IP address",
    "bpffs: /nonexistent/bpf": "bpffs: /nonexistent/bpf is not an existing directory",
    "bpffs: /tmp": "bpffs: /tmp is not a bpf filesystem",
    "bpffs: relative/bpf": "bpffs: must be an absolute path",
    "kubelet_seccomp_dir: var/lib/kubelet/seccomp": "kubelet_seccomp_dir: must be an absolute path",
    "host_root: /nonexistent/host": "host_root: /nonexistent/host is not an existing directory",
    "state_dir: 123": "state_dir: must be a path",
    "state_dir: [a]": "state_dir: must be a path",
    "rebaseline_on_stale: 'false'": "rebaseline_on_stale: must be true or false",
    "rebaseline_on_stale: 1": "rebaseline_on_stale: must be true or false",
    "cluster: sometimes": "cluster: 'sometimes' is not one of auto, on, off",
    "node_name: 5": "node_name: must be a non-empty string",
    "node_name: 'a/b'": "node_name: 'a/b' is not a node name",
    "profile_namespace: Envelope_System": "profile_namespace: 'Envelope_System' is not a Kubernetes namespace",
    "fingerprint_annotations: [model]": "fingerprint_annotations: must be a mapping",
    "fingerprint_annotations: {model: 'not a key!'}": "fingerprint_annotations: model:",
    "kubeconfig: 7": "kubeconfig: must be the path of a kubeconfig file",
    "observe_capabilities: 'yes'": "observe_capabilities: must be true or false",
    "capability_keys: 10": "capability_keys: must be within 64..",
    "caps: {capability: 0}": "caps: capability: must be within",
    "no_such_key: 1": "unknown config key 'no_such_key'",
    "[1, 2]": "top level must be a mapping",
    "1: 2": "key 1 is not a name",
    "flush_interval: 1\nflush_interval: 2": "line 2: duplicate key 'flush_interval'",
    "a: &x 1\nb: *x": "YAML aliases are not accepted",
    "flush_interval: [": "not valid YAML",
}


@pytest.mark.parametrize("text", sorted(BAD))
def test_a_bad_config_is_one_line_and_exit_2(tmp_path, capsys, text):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text + "\n")
    code = main(["--config", str(cfg), "--state-dir", str(tmp_path / "state"), "profile", "list"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("envelope: error: "), err
    assert "internal error" not in err and BAD[text] in lines[0], err
    assert str(cfg) in lines[0]


def test_a_config_that_others_can_write_is_refused(tmp_path, capsys):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("flush_interval: 5\n")
    os.chmod(cfg, 0o666)
    assert main(["--config", str(cfg), "--state-dir", str(tmp_path / "s"), "profile", "list"]) == 2
    assert "writable by group and others" in capsys.readouterr().err


def test_good_values_are_normalised():
    c = Config().replace(caps={"egress": 10}, cluster=False, metrics_address="::1", flush_interval=5,
                         ringbuf_pages=4096.0, state_dir="relative/state")
    assert c.caps["egress"] == 10 and c.caps["syscall"] == Config().caps["syscall"]
    assert c.cluster == "off" and c.metrics_address == "::1"
    assert isinstance(c.flush_interval, float) and c.ringbuf_pages == 4096 and isinstance(c.ringbuf_pages, int)
    assert c.state_dir == Path(os.path.abspath("relative/state"))


def test_daemon_flags_are_checked_too(tmp_path, capsys):
    code = main(["--state-dir", str(tmp_path), "daemon", "--flush-interval", "nan"])
    err = capsys.readouterr().err
    assert code == 2 and "command line: flush_interval: must be finite" in err


def test_the_metrics_endpoint_listens_on_loopback_by_default():
    assert Config().metrics_address == DEFAULT_METRICS_ADDRESS == "127.0.0.1"
    m = Metrics()
    port = m.serve(0, Config().metrics_address)
    try:
        assert m._server.server_address[0] == "127.0.0.1"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert b"200" in s.recv(100)
    finally:
        m.close()


def test_an_explicit_nan_never_reaches_the_daemon():
    with pytest.raises(UserError):
        Config().replace(flush_interval=math.nan)


def test_every_key_has_a_check():
    import dataclasses

    from envelope.config import CHECKS
    assert {f.name for f in dataclasses.fields(Config)} == set(CHECKS)
    for name, check in CHECKS.items():  # and every default passes its own check
        if name in ("host_root", "bpffs", "state_dir", "kubeconfig") or getattr(Config(), name) is None:
            continue
        check(getattr(Config(), name))


def test_sensor_extensions_take_every_family_the_config_turns_on(tmp_path):
    """One builder for the sensor's program families: each one the config turns on is there,
    each one it turns off is not (a second definition once shadowed the capability probe)."""
    from envelope.config import Config
    from envelope.wiring import sensor_extensions
    from sensor import capability_observer

    state = tmp_path / "state"
    on = {type(e).__name__ for e in sensor_extensions(Config(state_dir=state))}
    assert {"HttpCapture", "FileObserver", "DnsObserver"} <= on
    assert ("CapabilityObserver" in on) == (capability_observer.available()[0] is not None)
    off = Config(state_dir=state, observe_capabilities=False, http_capture=False, observe_files=False,
                 dns=False)
    assert sensor_extensions(off) == []
    assert [type(e).__name__ for e in sensor_extensions(off.replace(dns=True))] == ["DnsObserver"]
