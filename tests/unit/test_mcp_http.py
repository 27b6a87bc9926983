"""The gateway on streamable HTTP, end to end: mcp-server-git's and mcp-server-time's own servers
(``create_server`` from the PyPI packages) served over the SDK's streamable-HTTP transport by
uvicorn on loopback, ``envelope mcp proxy`` in front, the official client on the other side, in
both protocol eras (session-based 2025-11-25 with Mcp-Session-Id, SSE, GET stream and DELETE;
stateless 2026-07-28 with routing headers)."""

from __future__ import annotations

import anyio
import httpx2
import pytest
from mcp_server_git.server import create_server as git_http_server
from mcp_server_time.server import create_server as time_http_server

from enforcer import audit
from sensor.store import ProfileStore
from sensor.workload import Workload
from tests.unit.mcp_peers import POISON, Proxy, ServedApp, envelope, git, make_repo, session, text

ERAS = {"auto": "2026-07-28", "legacy": "2025-11-25"}


def git_app(json_response: bool = False, stateless: bool = False):
    return git_http_server(None).streamable_http_app(json_response=json_response, stateless_http=stateless)


def test_sessions_derive_and_enforce_over_http(tmp_path):
    repo, commits = make_repo(tmp_path / "repo")
    other, _ = make_repo(tmp_path / "other", 1)
    state = tmp_path / "state"
    w = "git-http"
    with ServedApp(git_app()) as upstream:
        with Proxy(state, w, upstream.url) as px:
            for s, era in enumerate(["legacy", "legacy", "legacy", "auto", "auto"]):
                calls = [("git_status", {"repo_path": str(repo)}),
                         ("git_log", {"repo_path": str(repo), "max_count": 1 + s % 3}),
                         ("git_show", {"repo_path": str(repo), "revision": commits[s % 3]})]
                version, tools, results = anyio.run(session, px.url, calls, era)
                assert version == ERAS[era]
                assert all(not r.is_error for r in results), [text(r) for r in results]
        assert px.proc.returncode == 0, px.stderr
        ev = ProfileStore(state).load(Workload.host(w)).arguments()
        status = ev.calls["mcp:tools/call:git_status"].calls
        # three handshake-era MCP sessions, and the run's own session for the stateless requests
        assert status.count == 5 and status.sessions == 4
        assert len(ev.catalogs) == 1  # both eras list the same catalog
        out = envelope(state, "derive", w, "--substrates", "mcp", "--force", "--min-count", "3", "--min-sessions", "3",
                       "--out", str(tmp_path / "env.yaml"))
        assert out.returncode == 0, out.stderr

        head = git(repo, "rev-parse", "HEAD")
        calls = [("git_log", {"repo_path": str(repo), "max_count": 2}),
                 ("git_show", {"repo_path": str(repo), "revision": commits[3]}),
                 ("git_log", {"repo_path": str(other), "max_count": 1}),
                 ("git_commit", {"repo_path": str(repo), "message": "injected"})]
        with Proxy(state, w, upstream.url, "--policy", str(tmp_path / "env.yaml"), "--mode", "enforce") as px:
            for era in ERAS:
                _, tools, results = anyio.run(session, px.url, calls, era)
                assert {t.name for t in tools} == {"git_log", "git_show", "git_status"}
                assert [r.is_error for r in results] == [False, False, True, True], era
                assert "outside the envelope" in text(results[2]) and "change 0" not in text(results[2])
                assert "not in the allowlist" in text(results[3])
        assert px.stderr.count("mcp call denied") == 4
        assert git(repo, "rev-parse", "HEAD") == head

        with Proxy(state, w, upstream.url, "--policy", str(tmp_path / "env.yaml"), "--mode", "alert") as px:
            _, tools, results = anyio.run(session, px.url, calls[2:3], "legacy")
            assert not results[0].is_error and "change 0" in text(results[0])
        assert "mcp call alerted" in px.stderr


@pytest.mark.parametrize("json_response,stateless", [(True, False), (False, True)])
def test_json_answers_and_sessionless_servers(tmp_path, json_response, stateless):
    repo, _ = make_repo(tmp_path / "repo", 1)
    with ServedApp(git_app(json_response, stateless)) as upstream, Proxy(tmp_path, "w", upstream.url) as px:
        for era in ERAS:
            _, tools, results = anyio.run(session, px.url, [("git_log", {"repo_path": str(repo)})], era)
            assert tools and not results[0].is_error and "change 0" in text(results[0])


def test_a_changed_tool_description_is_detected_over_http(tmp_path):
    state = tmp_path / "state"
    with ServedApp(time_http_server("UTC").streamable_http_app()) as upstream:
        with Proxy(state, "t", upstream.url) as px:
            for _ in range(3):
                anyio.run(session, px.url, [("get_current_time", {"timezone": "Asia/Tokyo"})], "legacy")
    assert envelope(state, "derive", "t", "--substrates", "mcp", "--force", "--min-count", "3", "--out",
                    str(tmp_path / "env.yaml")).returncode == 0
    poisoned = time_http_server("UTC")
    poisoned._tool_manager.get_tool("get_current_time").description = POISON
    with ServedApp(poisoned.streamable_http_app()) as upstream:
        with Proxy(state, "t", upstream.url, "--policy", str(tmp_path / "env.yaml"), "--mode", "enforce") as px:
            _, tools, results = anyio.run(session, px.url, [("get_current_time", {"timezone": "Asia/Tokyo"})])
            assert tools == [] and results[0].is_error and "changed since" in text(results[0])
    assert "tool definition changed" in px.stderr
    assert [e["details"]["tools"] for e in audit.read(state, action="policy.stale")] == [["get_current_time"]]


def test_malformed_and_oversized_messages_over_http(tmp_path):
    repo, commits = make_repo(tmp_path / "repo", 1)
    (repo / "big.txt").write_text("y" * 300_000 + "\n")
    git(repo, "add", "big.txt")
    git(repo, "commit", "-q", "-m", "big file")
    big = git(repo, "rev-parse", "HEAD")
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
               "mcp-protocol-version": "2026-07-28", "mcp-method": "tools/list"}
    with ServedApp(git_app()) as upstream, Proxy(tmp_path, "w", upstream.url, "--max-message-bytes", "131072") as px:
        with httpx2.Client(timeout=30) as c:
            r = c.post(px.url, content=b'{"jsonrpc":"2.0","id":1,"method":', headers=headers)
            assert r.status_code == 400 and r.json()["error"]["code"] == -32700
            r = c.post(px.url, content=b'{"jsonrpc":"2.0","id":2,"method":"tools/list","params":{"p":"'
                                       + b"z" * 200_000 + b'"}}', headers=headers)
            assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]
            r = c.post(px.url, content=b"[]", headers=headers)
            assert r.status_code == 400 and "batches" in r.json()["error"]["message"]
            assert c.get(f"http://127.0.0.1:{px.port}/elsewhere").status_code == 404
        calls = [("git_show", {"repo_path": str(repo), "revision": big}),
                 ("git_show", {"repo_path": str(repo), "revision": commits[0]})]
        for era in ERAS:
            _, tools, results = anyio.run(session, px.url, calls, era)
            assert isinstance(results[0], Exception) and "limit" in str(results[0]), era
            assert not results[1].is_error and "change 0" in text(results[1])
    assert px.proc.returncode == 0
    assert px.stderr.count("mcp message not relayed") >= 5


def _docs_server():
    """The SDK's own MCPServer with a resource template and a prompt (the reference servers have neither)."""
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("docs")

    @server.resource("file:///logs/{name}")
    def log_file(name: str) -> str:
        return f"contents of {name}"

    @server.prompt()
    def summarise(style: str) -> str:
        return f"Summarise the logs in a {style} style."

    return server.streamable_http_app()


async def _docs_session(url: str, reads: list[str], styles: list[str]) -> list:
    from mcp import Client
    from mcp.shared.exceptions import MCPError

    out = []
    async with Client(url, mode="legacy") as c:
        await c.list_resource_templates()
        for uri in reads:
            try:
                out.append((await c.read_resource(uri)).contents[0].text)
            except MCPError as e:
                out.append(e)
        for style in styles:
            try:
                out.append((await c.get_prompt("summarise", {"style": style})).messages[0].content.text)
            except MCPError as e:
                out.append(e)
    return out


def test_resources_and_prompts_over_http(tmp_path):
    state = tmp_path / "state"
    with ServedApp(_docs_server()) as upstream:
        with Proxy(state, "docs", upstream.url) as px:
            for name in ("app.log", "db.log", "web.log"):
                got = anyio.run(_docs_session, px.url, [f"file:///logs/{name}"], ["short"])
                assert got == [f"contents of {name}", "Summarise the logs in a short style."]
        ev = ProfileStore(state).load(Workload.host("docs")).arguments()
        assert set(ev.calls) == {"mcp:resources/read:file:///logs/{name}", "mcp:prompts/get:summarise"}
        assert envelope(state, "derive", "docs", "--substrates", "mcp", "--force", "--min-count", "3", "--out",
                        str(tmp_path / "env.yaml")).returncode == 0
        with Proxy(state, "docs", upstream.url, "--policy", str(tmp_path / "env.yaml"), "--mode", "enforce") as px:
            got = anyio.run(_docs_session, px.url, ["file:///logs/new.log", "file:///etc/passwd"],
                            ["short", "verbose"])
    assert got[0] == "contents of new.log" and got[2] == "Summarise the logs in a short style."
    assert isinstance(got[1], Exception) and got[1].error.code == -32010 and "not in the allowlist" in str(got[1])
    assert isinstance(got[3], Exception) and got[3].error.code == -32010 and "style" in str(got[3])
