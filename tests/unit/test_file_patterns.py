"""File behaviour keys, entries and path patterns; the sensitive-path list."""

from __future__ import annotations

import pytest

from enforcer.file_patterns import (CHILDREN, EXACT, TREE, FilePattern, FilePatternError, glob_intersects,
                                    glob_matches, parse_entry, parse_key)
from enforcer.sensitive_paths import SENSITIVE, sensitive_match, sensitive_overlaps


def test_keys_and_entries_parse():
    assert parse_key("file:read:/etc/ssl/certs/ca.pem") == ("read", "/etc/ssl/certs/ca.pem")
    assert parse_entry("file:write:/tmp/agent/*") == ("write", FilePattern("/tmp/agent", CHILDREN))
    assert parse_entry("file:read:/usr/lib/**") == ("read", FilePattern("/usr/lib", TREE))
    assert str(FilePattern("/", CHILDREN)) == "/*" and str(FilePattern("/", TREE)) == "/**"


@pytest.mark.parametrize("bad", ["file:read:relative", "file:read:/a/../b", "file:read:/a/", "file:read:/a//b",
                                 "file:read:/a/*b", "file:exec:/bin/sh", "exec:/bin/sh", "file:read:/a\nb",
                                 "file:read"])
def test_bad_keys_are_refused_with_the_key_named(bad):
    with pytest.raises(FilePatternError) as e:
        parse_key(bad)
    assert repr(bad)[1:10] in str(e.value) or bad in str(e.value)


def test_pattern_matching():
    children = FilePattern("/tmp/a", CHILDREN)
    assert children.matches("/tmp/a/x") and not children.matches("/tmp/a/x/y") and not children.matches("/tmp/a")
    tree = FilePattern("/tmp/a", TREE)
    assert tree.matches("/tmp/a/x/y") and not tree.matches("/tmp/a") and not tree.matches("/tmp/ab")
    assert FilePattern("/tmp/a", EXACT).matches("/tmp/a") and not FilePattern("/tmp/a").matches("/tmp/a/b")


def test_globs():
    assert glob_matches("/home/*/.ssh/**", "/home/u/.ssh/id_rsa")
    assert glob_matches("/home/*/.ssh/**", "/home/u/.ssh")  # P/** covers P
    assert not glob_matches("/home/*/.ssh/**", "/home/u/v/.ssh/id_rsa")
    assert glob_matches("/etc/ssh/ssh_host_*_key", "/etc/ssh/ssh_host_ed25519_key")
    assert not glob_matches("/etc/ssh/ssh_host_*_key", "/etc/ssh/ssh_host_ed25519_key.pub")
    assert glob_intersects("/home/agent/*", "/home/*/.ssh/**")
    assert glob_intersects("/home/**", "/home/*/.ssh/**")
    assert not glob_intersects("/home/*", "/home/*/.ssh/**")  # direct children of /home are not in .ssh
    assert not glob_intersects("/usr/lib/**", "/home/*/.ssh/**")
    assert glob_intersects("/etc/ssh/*", "/etc/ssh/ssh_host_*_key")
    assert glob_intersects("/**", "/run/secrets/**")


def test_sensitive_list_covers_the_named_credentials():
    for path in ("/root/.aws/credentials", "/home/dev/.ssh/id_ed25519", "/etc/shadow",
                 "/var/run/secrets/kubernetes.io/serviceaccount/token", "/proc/1/root/etc/passwd",
                 "/proc/self/environ", "/run/containerd/containerd.sock", "/home/dev/.kube/config",
                 "/root/.config/gcloud/application_default_credentials.json"):
        assert sensitive_match(path) is not None, path
    for path in ("/etc/passwd", "/etc/ssl/certs/ca-certificates.crt", "/usr/lib/python3.11/os.py",
                 "/tmp/agent-1/out.json", "/proc/self/status", "/home/dev/work/notes.md"):
        assert sensitive_match(path) is None, path
    assert [s.pattern for s in SENSITIVE] == sorted(s.pattern for s in SENSITIVE)
    assert all(s.reason for s in SENSITIVE)


def test_sensitive_overlaps_uses_the_pattern_region():
    assert sensitive_overlaps(FilePattern("/usr/lib", TREE)) == []
    names = {s.pattern for s in sensitive_overlaps(FilePattern("/var", TREE))}
    assert "/var/run/secrets/**" in names and "/var/lib/kubelet/**" in names
    assert sensitive_overlaps(FilePattern("/var", CHILDREN)) == []
