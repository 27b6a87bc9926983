"""A small known workload that only uses MCP tools: the demo agent's MCP client and calls
(``git_status`` and ``git_log`` on ``--repo``; with ``--other-repo`` also a ``git_log`` there),
against the server in ``--mcp-config``. Run by the system Python, like the demo agent."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from envelope.demo_agent import use_mcp_tools  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--task", type=int, default=0)
p.add_argument("--mcp-config", required=True)
p.add_argument("--repo", required=True)
p.add_argument("--other-repo")
args = p.parse_args()
entry = json.loads(Path(args.mcp_config).read_text())["mcpServers"]["git"]
sys.exit(use_mcp_tools([entry["command"], *entry.get("args", [])], args.repo, args.task, args.other_repo, None))
