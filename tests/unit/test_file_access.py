"""The file substrate's vocabulary on the kernel side: access bits to kinds and behaviour keys
(pure), and relative paths resolved through /proc (this process's own, no root needed)."""

from __future__ import annotations

import os

import pytest

from enforcer.file_patterns import KINDS, parse_key
from sensor import events
from sensor.file_access import ACCESS_KINDS, behaviours, join, kinds, normalise
from sensor.proc_paths import ProcPaths


def test_every_access_bit_is_a_kind_of_the_file_substrate():
    assert {k for _, k in ACCESS_KINDS} <= set(KINDS)
    bits = [b for b, _ in ACCESS_KINDS]
    assert len(set(bits)) == len(bits) and all(b & (b - 1) == 0 for b in bits)
    assert events.FILE_ACC_EXEC not in bits  # an exec is the exec substrate's


def test_an_open_for_read_write_create_truncate_is_four_behaviours():
    acc = events.FILE_ACC_READ | events.FILE_ACC_WRITE | events.FILE_ACC_CREATE | events.FILE_ACC_TRUNCATE
    assert behaviours(acc, "/srv/out.json") == (
        "file:read:/srv/out.json", "file:write:/srv/out.json", "file:truncate:/srv/out.json",
        "file:create:/srv/out.json")
    for key in behaviours(acc, "/srv/out.json"):
        parse_key(key)  # what the derivation reads


def test_directories_are_listed_and_made_not_read_and_created():
    assert kinds(events.FILE_ACC_READ, is_dir=True) == ("list",)
    assert kinds(events.FILE_ACC_CREATE, is_dir=True) == ("mkdir",)
    assert kinds(events.FILE_ACC_READ | events.FILE_ACC_LIST, is_dir=True) == ("list",)
    assert kinds(events.FILE_ACC_READ, is_dir=None) == ("read",)
    assert behaviours(events.FILE_ACC_EXEC, "/bin/sh") == ("exec:/bin/sh",)


@pytest.mark.parametrize("given,want", [
    ("/etc/ssl/../hosts", "/etc/hosts"), ("//etc//hosts", "/etc/hosts"), ("/tmp/./a/", "/tmp/a"),
    ("/", "/"), ("relative/x", None), ("", None)])
def test_normalise(given, want):
    assert normalise(given) == want


def test_join_resolves_against_an_absolute_base_only():
    assert join("/work/run", "../out.json") == "/work/out.json"
    assert join("relative", "x") is None


def test_proc_paths_follow_this_process(tmp_path):
    paths = ProcPaths()
    pid = os.getpid()
    assert paths.resolve(pid, events.FILE_AT_FDCWD, "a/../b") == os.path.join(os.getcwd(), "b")
    (tmp_path / "d").mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert paths.resolve(pid, fd, "d") == str(tmp_path / "d")
        assert paths.is_dir(pid, str(tmp_path / "d")) is True
    finally:
        os.close(fd)
    assert paths.resolve(pid, fd, "d") is None  # the fd is gone: not guessed
    assert paths.resolve(pid, events.FILE_DIRFD_ABSOLUTE, "/etc//hosts") == "/etc/hosts"
    assert paths.is_dir(pid, str(tmp_path / "missing")) is None
    assert paths.is_dir(2 ** 22 + 7, str(tmp_path / "d")) is True  # no such process: our own root
    r, w = os.pipe()
    try:
        assert paths.base(pid, r) is None  # not a directory
    finally:
        os.close(r)
        os.close(w)
