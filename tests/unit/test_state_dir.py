"""The state directory: bounded, collision-free file names for any workload key, readers that
take the key from the content, 0700/0600 whatever the umask, and files nobody but root could have
written as the only ones the daemon acts on."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer import state
from enforcer.desired import read_desired, write_desired
from enforcer.policy import EgressRule, Policy
from sensor.profile import Profile
from sensor.state_dir import (
    MAX_NAME, StateDir, UntrustedFileError, atomic_write, private_dirs, read_trusted,
)
from sensor.store import ProfileStore
from sensor.workload import Workload

NOBODY = 65534
LONG = Workload("agents", "Deployment", "a" * 230, "main")  # a legal 230-character name
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown files to another user")


def mode(p) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


# ---- names ------------------------------------------------------------------------------------


def test_short_keys_keep_their_readable_quoted_name():
    assert StateDir.workload_name("agents/Deployment/x/main", ".yaml") == "agents%2FDeployment%2Fx%2Fmain.yaml"
    assert StateDir.workload_of("agents%2FDeployment%2Fx%2Fmain.yaml", ".yaml") == "agents/Deployment/x/main"


def test_long_keys_get_a_bounded_hashed_name():
    name = StateDir.workload_name(LONG.key, ".msgpack")
    assert len(name.encode()) <= MAX_NAME < 255 - len(".x.XXXXXXXX")  # room for atomic_write's temp name
    assert "+" in name and name.startswith("agents%2FDeployment%2Faaaa")
    other = Workload("agents", "Deployment", "a" * 229 + "b", "main")
    assert StateDir.workload_name(other.key, ".msgpack") != name
    assert StateDir.workload_of(name, ".msgpack") is None  # readers take the key from the content


keys = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=600)


@settings(max_examples=300, deadline=None)
@given(keys, keys)
def test_names_are_bounded_and_never_shared(a, b):
    na, nb = StateDir.workload_name(a, ".json"), StateDir.workload_name(b, ".json")
    assert len(na.encode()) <= MAX_NAME and "/" not in na and na not in (".", "..")
    assert (na == nb) == (a == b)


def test_every_file_of_a_long_workload_is_written_and_read_back(tmp_path):
    store = ProfileStore(tmp_path)
    p = Profile(LONG)
    p.node("n").open_session("s", 1.0)
    store.save(p)
    assert store.workloads() == [LONG] and store.load(LONG).workload == LONG
    write_desired(tmp_path, Policy(LONG, mode="enforce", substrates=("egress",),
                                   egress=(EgressRule("tcp", "10.0.0.0/8", (443,)),)), "enforce")
    [(w, _p, m)] = read_desired(tmp_path)
    assert (w, m) == (LONG, "enforce")
    state.set_mode(tmp_path, LONG, "alert", reason="long name", actor="t")
    assert state.get_mode(tmp_path, LONG) == "alert"
    assert state.known_workloads(tmp_path) == [LONG]


def test_keys_with_slashes_in_the_name_round_trip(tmp_path):
    w = Workload.parse("host/Unit//user.slice/session-3.scope/main")
    assert w.name == "/user.slice/session-3.scope" and w.key == "host/Unit//user.slice/session-3.scope/main"
    state.set_mode(tmp_path, w, "alert", reason="r", actor="t")
    assert state.resolve_workload(tmp_path, w.key) == w


# ---- modes, whatever the umask ------------------------------------------------------------------


def test_directories_are_0700_and_files_0600_under_umask_000(tmp_path):
    old = os.umask(0)
    try:
        root = tmp_path / "state"
        state.set_mode(root, Workload.host("a"), "alert", reason="r", actor="t")
        ProfileStore(root).save(Profile(Workload.host("a")))
        write_desired(root, Policy(Workload.host("a"), mode="alert", substrates=("egress",)), "alert")
    finally:
        os.umask(old)
    layout = StateDir(root)
    for d in (layout.root, layout.enforce, layout.modes, layout.profiles, layout.keys):
        assert mode(d) == 0o700, d
    for f in (layout.mode("host/Unit/a/main"), layout.profile("host/Unit/a/main"),
              layout.desired("host/Unit/a/main"), layout.audit_log, layout.audit_head, layout.audit_key):
        assert mode(f) == 0o600, f


def test_secure_tightens_what_an_older_version_left_open(tmp_path):
    root = tmp_path / "state"
    for d in (root, root / "enforce", root / "enforce" / "modes", root / "profiles"):
        d.mkdir()
        os.chmod(d, 0o777)
    StateDir(root).secure()
    assert {mode(d) for d in (root, root / "enforce", root / "enforce" / "modes", root / "profiles")} == {0o700}


def test_private_dirs_leave_existing_directories_alone(tmp_path):
    os.chmod(tmp_path, 0o755)
    private_dirs(tmp_path / "a" / "b")
    assert mode(tmp_path) == 0o755 and mode(tmp_path / "a") == 0o700 and mode(tmp_path / "a" / "b") == 0o700


# ---- trusted reads --------------------------------------------------------------------------------


def test_read_trusted_accepts_roots_private_file(tmp_path):
    atomic_write(tmp_path / "s" / "f", b"x")
    assert read_trusted(tmp_path / "s" / "f", tmp_path / "s") == b"x"


def test_read_trusted_refuses_writable_by_others(tmp_path):
    atomic_write(tmp_path / "s" / "f", b"x")
    os.chmod(tmp_path / "s" / "f", 0o666)
    with pytest.raises(UntrustedFileError, match="writable by group and others"):
        read_trusted(tmp_path / "s" / "f", tmp_path / "s")
    os.chmod(tmp_path / "s" / "f", 0o600)
    os.chmod(tmp_path / "s", 0o777)
    with pytest.raises(UntrustedFileError, match="directory writable"):
        read_trusted(tmp_path / "s" / "f", tmp_path / "s")


def test_read_trusted_refuses_links(tmp_path):
    atomic_write(tmp_path / "s" / "f", b"x")
    os.symlink(tmp_path / "s" / "f", tmp_path / "s" / "l")
    with pytest.raises(UntrustedFileError, match="symbolic link"):
        read_trusted(tmp_path / "s" / "l", tmp_path / "s")
    os.link(tmp_path / "s" / "f", tmp_path / "s" / "h")
    with pytest.raises(UntrustedFileError, match="hard links"):
        read_trusted(tmp_path / "s" / "h", tmp_path / "s")


@root_only
def test_read_trusted_refuses_a_file_owned_by_someone_else(tmp_path):
    atomic_write(tmp_path / "s" / "f", b"x")
    os.chown(tmp_path / "s" / "f", NOBODY, NOBODY)
    with pytest.raises(UntrustedFileError, match=f"owned by uid {NOBODY}"):
        read_trusted(tmp_path / "s" / "f", tmp_path / "s")


@root_only
def test_a_desired_state_planted_by_another_user_is_not_acted_on(tmp_path):
    """What user nobody did under umask 000 before: replace a desired state with an allow-all
    policy. The daemon's reader skips it."""
    w = Workload.host("agent")
    write_desired(tmp_path, Policy(w, mode="enforce", substrates=("egress",)), "enforce")
    path = StateDir(tmp_path).desired(w.key)
    os.chown(path, NOBODY, NOBODY)
    assert read_desired(tmp_path) == []
    os.chown(path, 0, 0)
    os.chmod(path, 0o646)
    assert read_desired(tmp_path) == []
    os.chmod(path, 0o600)
    assert [x[0] for x in read_desired(tmp_path)] == [w]


@root_only
def test_a_mode_file_planted_by_another_user_is_refused(tmp_path):
    w = Workload.host("agent")
    state.set_mode(tmp_path, w, "enforce", reason="r", actor="t")
    path = StateDir(tmp_path).mode(w.key)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(state.StateError, match="not root"):
        state.read_state(tmp_path, w)


def test_a_file_under_another_workloads_name_is_not_that_workloads(tmp_path):
    a, b = Workload.host("a"), Workload.host("b")
    write_desired(tmp_path, Policy(a, mode="enforce", substrates=("egress",)), "enforce")
    layout = StateDir(tmp_path)
    os.replace(layout.desired(a.key), layout.desired(b.key))
    assert read_desired(tmp_path) == []  # a's policy under b's name: neither a's nor b's
    state.set_mode(tmp_path, a, "alert", reason="r", actor="t")
    os.replace(layout.mode(a.key), layout.mode(b.key))
    with pytest.raises(state.StateError, match="holds the state of"):
        state.read_state(tmp_path, b)
    assert state.known_workloads(tmp_path) == []
    data = json.loads(Path(layout.mode(b.key)).read_text())
    assert data["workload"] == a.key
