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


# ---- checksums, quarantine, listing around damage ---------------------------------------------------

import msgpack  # noqa: E402

from sensor.aggregate import Aggregator  # noqa: E402
from sensor.store import MAGIC, decode_profile, encode_profile  # noqa: E402


def test_every_byte_flip_is_detected(tmp_path):
    """A file that loads silently after damage is worse than one that does not load: flip each
    byte of a saved profile in turn; every one is refused."""
    store = ProfileStore(tmp_path)
    path = store.save(make_profile())
    raw = path.read_bytes()
    assert raw.startswith(MAGIC)
    for i in range(len(raw)):
        flipped = raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:]
        with pytest.raises(ProfileStoreError):
            decode_profile(flipped, path)


def test_the_unframed_format_still_reads_and_is_written_framed(tmp_path):
    store = ProfileStore(tmp_path)
    p = make_profile()
    path = store.path_for(p.workload)
    path.parent.mkdir(parents=True)
    path.write_bytes(msgpack.packb(p.pack(), use_bin_type=True))
    os.chmod(path, 0o600)
    assert store.load(p.workload).pack() == p.pack()
    store.save(store.load(p.workload))
    assert path.read_bytes() == encode_profile(p)


def test_a_corrupt_profile_is_quarantined_and_the_workload_starts_afresh(tmp_path):
    seen = []
    store = ProfileStore(tmp_path, on_quarantine=lambda path, reason: seen.append((path, reason)))
    p = make_profile()
    path = store.save(p)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    agg = Aggregator("node-a", store, str)
    agg.bind(7, p.workload, "s2")  # the daemon binding a cgroup of the workload
    assert agg.profile(p.workload).behaviours() == {} and not path.exists()
    [(moved, reason)] = seen
    assert moved.parent == tmp_path / "profiles" / "quarantine" and moved.read_bytes() == bytes(raw)
    assert "checksum mismatch" in reason
    assert store.quarantined() == [moved]
    agg.flush()
    assert store.load(p.workload) is not None  # written anew


def test_profile_list_lists_around_a_bad_file(tmp_path, capsys):
    import json

    from envelope.cli import main

    store = ProfileStore(tmp_path)
    good = make_profile("good")
    store.save(good)
    bad_path = store.save(make_profile("bad"))
    bad_path.write_bytes(bad_path.read_bytes()[:40])
    assert main(["--state-dir", str(tmp_path), "profile", "list", "-o", "json"]) == 0
    items = json.loads(capsys.readouterr().out)
    by = {i["workload"]: i for i in items}
    assert by[good.workload.key]["behaviours"] == 1
    assert "corrupt or truncated" in by["agents/Deployment/bad/main"]["error"]
    assert main(["--state-dir", str(tmp_path), "profile", "show", "bad"]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_a_file_with_another_workloads_profile_is_reported(tmp_path):
    store = ProfileStore(tmp_path)
    a = make_profile("a")
    store.save(a)
    os.replace(store.path_for(a.workload), store.path_for(make_profile("b").workload))
    [f] = store.scan()
    assert f.workload == a.workload and "holds the profile of" in f.error
    with pytest.raises(ProfileStoreError, match="not agents/Deployment/b/main"):
        store.load(make_profile("b").workload)
