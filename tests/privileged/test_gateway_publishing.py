"""An MCP gateway's evidence reaches the cluster through the node's daemon: the real daemon (real
BPF sensor) runs against the fake API server of tests/fakes, and the official MCP client calls
mcp-server-time through ``envelope mcp wrap`` for a Deployment's workload, sharing the daemon's
state directory and node name. The daemon publishes the gateway's contribution (``<node>/mcp``)
as WorkloadProfile objects of its own, and the cluster profile has the tool calls."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import anyio
import yaml

from sensor.kubeapi import Backoff
from sensor.workload import Workload
from sensor.workloadprofile import ClusterProfiles
from tests.fakes.apiserver import FakeApiServer
from tests.privileged.daemon_log import running_daemon
from tests.privileged.test_daemon_cluster import wait_until
from tests.unit.mcp_peers import ENVELOPE, ROOT, StdioServerParameters, session, time_server

NODE = "gateway-test-node"
W = Workload("agents", "Deployment", "tool-agent", "agent")
CALL = "mcp:tools/call:get_current_time"


def test_the_daemon_publishes_a_gateways_contribution_beside_its_own(tmp_path: Path):
    with FakeApiServer() as kube:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(yaml.safe_dump({
            "state_dir": str(tmp_path / "state"), "node_name": NODE, "cluster": "on",
            "kubeconfig": kube.kubeconfig(tmp_path / "kubeconfig"), "kubelet_seccomp_dir": str(tmp_path / "kubelet"),
            "profile_namespace": "envelope-system", "policy_sync_interval": 0.5}))
        with running_daemon(cfg, "--flush-interval", "1") as (daemon, log):
            server = StdioServerParameters(command=ENVELOPE[0], args=[
                *ENVELOPE[1:], "--config", str(cfg), "mcp", "wrap", "--workload", W.key, "--", *time_server()],
                cwd=str(ROOT))
            calls = [("get_current_time", {"timezone": tz}) for tz in ("Europe/Paris", "Asia/Tokyo", "UTC")]
            with open(tmp_path / "gateway.log", "w") as errlog:
                _, tools, results = anyio.run(session, server, calls, "auto", errlog)
            assert "get_current_time" in {t.name for t in tools}
            assert all(getattr(r, "is_error", True) is False for r in results), results
            reader = ClusterProfiles.from_api_client(kube.api_client(), namespace="envelope-system",
                                                     backoff=Backoff(attempts=1))

            def published():
                p, _ = reader.read(W)
                return p is not None and CALL in p.behaviours()

            assert wait_until(published, 60), f"objects: {kube.names()}; daemon: {''.join(log)[-3000:]}"
            profile, problems = reader.read(W)
            assert problems == [] and list(profile.nodes) == [f"{NODE}/mcp"]
            stats = profile.behaviours()[CALL]
            assert (stats.count, stats.sessions) == (3, 1) and profile.closed_sessions == 1
            values = profile.arguments().calls[CALL].paths["timezone"].values
            assert set(values) == {json.dumps(tz) for tz in ("Europe/Paris", "Asia/Tokyo", "UTC")}  # evidence went too
            assert profile.fingerprints()["tool_catalog"], "the catalog fingerprint went too"
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=120) == 0, "".join(log)[-3000:]
