"""The runtime state watch with real inotify, on runtime state laid out like a node's under a
temporary host root: a container's annotations are read as its state appears and remembered
after the runtime deleted it; roots that appear later are found; memory is bounded."""

from __future__ import annotations

import json
import os
import secrets
import shutil

import pytest

from sensor import runtime_watch
from sensor.identity import cri_from_annotations
from sensor.runtime_watch import RememberingRuntimeState
from tests.polling import until as wait_for

RUNC_ROOT = "/run/runc"


def annotations(pod: str) -> dict:
    return {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.container-name": "worker",
            "io.kubernetes.cri.sandbox-name": pod, "io.kubernetes.cri.sandbox-namespace": "agents",
            "io.kubernetes.cri.sandbox-uid": "9d8c7b6a-0000-4000-8000-000000000001"}


def runc_create(host, cid: str, pod: str) -> None:
    """What runc writes at ``create``: the container's directory, then state.json by rename."""
    d = host / RUNC_ROOT.lstrip("/") / cid
    d.mkdir(parents=True)
    labels = [f"{k}={v}" for k, v in annotations(pod).items()] + ["bundle=/nonexistent"]
    tmp = d / ".state.json.tmp"
    tmp.write_text(json.dumps({"id": cid, "config": {"labels": labels}}))
    os.rename(tmp, d / "state.json")


def runc_delete(host, cid: str) -> None:
    shutil.rmtree(host / RUNC_ROOT.lstrip("/") / cid)


@pytest.fixture
def host(tmp_path):
    (tmp_path / RUNC_ROOT.lstrip("/")).mkdir(parents=True)
    return tmp_path


def watched(host, **kw) -> RememberingRuntimeState:
    state = RememberingRuntimeState(host, runc_roots=(RUNC_ROOT,), bundle_dirs=(), crio_userdata=(), **kw)
    assert state.watch.start()
    return state


def test_a_deleted_containers_annotations_are_remembered(host):
    state = watched(host)
    try:
        cid = secrets.token_hex(32)
        runc_create(host, cid, "indexer-7d9f-abcde")
        assert wait_for(lambda: state.watch.remembered(cid) is not None), state.watch.counts
        runc_delete(host, cid)
        found = state.annotations(cid)  # the live state is gone: what the watch read
        assert found is not None and found[1].endswith(f"{cid}/state.json")
        assert cri_from_annotations(found[0]).pod_name == "indexer-7d9f-abcde"
        assert state.annotations(secrets.token_hex(32)) is None  # never seen: nothing made up
    finally:
        state.watch.close()


def test_state_written_before_its_directory_was_watched_is_read_too(host):
    cid = secrets.token_hex(32)
    state = watched(host)
    try:
        # the directory and its state appear in one go (a rename of a prepared directory)
        staging = host / "staging"
        runc_create(staging, cid, "late-pod")
        os.rename(staging / RUNC_ROOT.lstrip("/") / cid, host / RUNC_ROOT.lstrip("/") / cid)
        assert wait_for(lambda: state.watch.remembered(cid) is not None), state.watch.counts
    finally:
        state.watch.close()


def test_a_root_that_appears_later_is_watched(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime_watch, "RETRY_ROOTS", 0.05)
    state = RememberingRuntimeState(tmp_path, runc_roots=(RUNC_ROOT,), bundle_dirs=(), crio_userdata=())
    assert state.watch.start()
    try:
        (tmp_path / RUNC_ROOT.lstrip("/")).mkdir(parents=True)  # the runtime starts after the daemon
        cid = secrets.token_hex(32)
        assert wait_for(lambda: RUNC_ROOT in state.watch._watched_roots)
        runc_create(tmp_path, cid, "after-pod")
        assert wait_for(lambda: state.watch.remembered(cid) is not None), state.watch.counts
    finally:
        state.watch.close()


def test_memory_is_bounded_oldest_first(host):
    state = RememberingRuntimeState(host, runc_roots=(RUNC_ROOT,), bundle_dirs=(), crio_userdata=())
    state.watch.capacity = 3
    assert state.watch.start()
    try:
        ids = [secrets.token_hex(32) for _ in range(5)]
        for i, cid in enumerate(ids):
            runc_create(host, cid, f"pod-{i}")
            assert wait_for(lambda: state.watch.remembered(cid) is not None)
            runc_delete(host, cid)
        assert [state.annotations(c) is not None for c in ids] == [False, False, True, True, True]
    finally:
        state.watch.close()


BUNDLES = "/run/containerd/io.containerd.runtime.v2.task/k8s.io"


def test_containerd_order_bundle_first_then_runc_state_with_the_init_cgroup(tmp_path):
    """containerd writes the bundle's config.json (the annotations) before ``runc create``
    writes runc's state (the init's pid): the watch keeps looking until it has both."""
    from sensor.cgroup import CgroupError, CgroupFS
    try:
        cgfs = CgroupFS()
        mine = cgfs.pid_cgroup(os.getpid())
    except CgroupError:
        pytest.skip("no cgroup v2 hierarchy here")
    assert mine is not None
    root = "/run/containerd/runc/k8s.io"
    for d in (root, BUNDLES):
        (tmp_path / d.lstrip("/")).mkdir(parents=True)
    state = RememberingRuntimeState(tmp_path, cgroupfs=cgfs, runc_roots=(root,), bundle_dirs=(BUNDLES,),
                                    crio_userdata=())
    assert state.watch.start()
    try:
        cid = secrets.token_hex(32)
        bundle = tmp_path / BUNDLES.lstrip("/") / cid
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps({"annotations": annotations("ctrd-pod")}))
        assert wait_for(lambda: state.watch.remembered(cid) is not None), state.watch.counts
        assert state.remembered_path(mine[1]) is None  # no runc state yet: no cgroup
        run = tmp_path / root.lstrip("/") / cid
        run.mkdir()
        (run / "state.json").write_text(json.dumps({"id": cid, "init_process_pid": os.getpid(),
                                                    "config": {"labels": [f"bundle={BUNDLES}/{cid}"]}}))
        assert wait_for(lambda: state.remembered_path(mine[1]) == mine[0]), state.watch.counts
    finally:
        state.watch.close()


def test_a_root_removed_and_made_again_is_watched_again(host, monkeypatch):
    monkeypatch.setattr(runtime_watch, "RETRY_ROOTS", 0.05)
    state = watched(host)
    try:
        shutil.rmtree(host / RUNC_ROOT.lstrip("/"))  # the runtime's state root goes (a restart)
        assert wait_for(lambda: RUNC_ROOT not in state.watch._watched_roots)
        (host / RUNC_ROOT.lstrip("/")).mkdir(parents=True)
        assert wait_for(lambda: RUNC_ROOT in state.watch._watched_roots)
        cid = secrets.token_hex(32)
        runc_create(host, cid, "after-restart")
        assert wait_for(lambda: state.watch.remembered(cid) is not None), state.watch.counts
    finally:
        state.watch.close()
