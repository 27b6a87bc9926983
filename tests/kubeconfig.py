"""A kubeconfig pointing at a local test API server (no TLS, a dummy token)."""

from __future__ import annotations

import json
from pathlib import Path


def write_kubeconfig(path: Path, server: str, token: str = "not-a-secret") -> str:
    """Write a one-context kubeconfig for ``server`` (e.g. ``http://127.0.0.1:PORT``) to ``path``."""
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": {"server": server}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "node"}}],
        "users": [{"name": "node", "user": {"token": token}}]}))
    return str(path)
