"""Profile store: atomic round trips, listing, and clear errors on damaged files."""

import os

import pytest

from sensor.profile import Profile
from sensor.store import ProfileStore, ProfileStoreError
from sensor.workload import Workload


def make_profile(name="demo"):
    p = Profile(Workload("agents", "Deployment", name, "main"))
    c = p.node("node-a")
    c.open_session("s1", 1.0)
    c.observe("s1", "syscall:read", 3, 2.0)
    c.touch(3.0)
    return p


def test_roundtrip_and_listing(tmp_path):
    store = ProfileStore(tmp_path)
    p = make_profile()
    path = store.save(p)
    assert path.parent == tmp_path / "profiles"
    assert store.load(p.workload).pack() == p.pack()
    assert store.workloads() == [p.workload]
    assert store.find("demo") == [p.workload]
    assert store.find("agents/demo") == [p.workload]
    assert store.find("nope") == []
    assert not [f for f in os.listdir(path.parent) if f.startswith(".")]  # no temp files left


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_file_gives_clear_error_and_stays(tmp_path, damage):
    store = ProfileStore(tmp_path)
    path = store.save(make_profile())
    raw = path.read_bytes()
    data = {"truncate": raw[: len(raw) // 2], "garbage": b"\xc1\xff\x00junk", "empty": b""}[damage]
    path.write_bytes(data)
    with pytest.raises(ProfileStoreError) as e:
        store.load(make_profile().workload)
    assert str(path) in str(e.value) and "left in place" in str(e.value)
    assert path.read_bytes() == data


def test_save_replaces_atomically(tmp_path):
    store = ProfileStore(tmp_path)
    p = make_profile()
    store.save(p)
    p.node("node-a").observe("s1", "syscall:write", 1, 4.0)
    store.save(p)
    assert "syscall:write" in store.load(p.workload).behaviours()
