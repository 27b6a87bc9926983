"""The Landlock compiler: how each kind of entry maps to objects and rights, what is refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from enforcer.landlock_rules import (BY_NAME, EXEC_HANDLED, FILE_HANDLED, FS_RIGHTS, KIND_RIGHTS, ExecNeeds,
                                     LandlockCompileError, compile_policy, compile_ruleset, fs_mask, fs_names)
from enforcer.policy import Policy
from sensor.workload import Workload

W = "agents/Deployment/research-agent/agent"


def rules(c):
    return {(r.path, r.object): r.rights for r in c.rules}


def notes(c):
    return {(n.entry, n.rule) for n in c.notes}


def test_uapi_bits_and_abi_versions():
    # include/uapi/linux/landlock.h (Linux 6.18) and the kernel docs' ABI history
    assert [(r.name, r.bit) for r in FS_RIGHTS][:3] == [("execute", 1), ("write_file", 2), ("read_file", 4)]
    assert BY_NAME["refer"].abi == 2 and BY_NAME["truncate"].abi == 3 and BY_NAME["ioctl_dev"].abi == 5
    assert BY_NAME["bind_tcp"].abi == 4 and BY_NAME["signal"].abi == 6 and BY_NAME["log_new_exec_on"].abi == 7
    assert fs_names(fs_mask(["read_file", "execute"])) == ("execute", "read_file")
    assert fs_mask(r.name for r in FS_RIGHTS) == (1 << 16) - 1


def test_exec_only_handles_execute_and_needs_interpreters():
    needs = {"/usr/bin/git": ExecNeeds(execute=("/lib64/ld-linux-x86-64.so.2",),
                                       read=("/lib/x86_64-linux-gnu/libc.so.6",))}
    c = compile_ruleset(W, execs=["/usr/bin/git"], exec_needs=needs)
    assert c.handled_fs == EXEC_HANDLED + ("refer",) and c.abi == 2
    # reads are not handled, so libraries need no rule; refer is granted everywhere (without it
    # any ruleset denies renames across directories), so a kernel without it is no gap
    assert rules(c) == {("/usr/bin/git", "file"): ("execute",),
                        ("/lib64/ld-linux-x86-64.so.2", "file"): ("execute",),
                        ("/", "tree"): ("refer",)}
    assert c.unrestricted == {"refer"} and c.gaps({"execute"}) == ()


def test_with_files_execs_need_read_and_libraries_are_read_only():
    needs = {"/usr/bin/git": ExecNeeds(execute=("/lib64/ld-linux-x86-64.so.2",),
                                       read=("/etc/ld.so.cache", "/lib/x86_64-linux-gnu/libc.so.6"))}
    c = compile_ruleset(W, execs=["/usr/bin/git"], files=[], exec_needs=needs)
    assert set(c.handled_fs) == set(EXEC_HANDLED + FILE_HANDLED) and c.abi == 5
    r = rules(c)
    assert r[("/usr/bin/git", "file")] == ("execute", "read_file")
    assert r[("/lib64/ld-linux-x86-64.so.2", "file")] == ("execute", "read_file")
    assert r[("/lib/x86_64-linux-gnu/libc.so.6", "file")] == ("read_file",)
    sources = {x.path: x.sources for x in c.rules}
    assert sources["/lib/x86_64-linux-gnu/libc.so.6"] == ("exec-needs:library:/usr/bin/git",)


def test_each_kind_maps_to_its_rights_and_object():
    files = ["file:read:/etc/resolv.conf", "file:write:/var/log/agent.log", "file:truncate:/var/log/agent.log",
             "file:list:/srv/data", "file:create:/tmp/out/result.json", "file:write:/tmp/out/result.json",
             "file:remove:/tmp/out/old.json", "file:mkdir:/tmp/out/sub", "file:ioctl:/dev/fuse"]
    c = compile_ruleset(W, files=files)
    r = rules(c)
    assert r[("/etc/resolv.conf", "file")] == ("read_file",)
    assert r[("/var/log/agent.log", "file")] == ("write_file", "truncate")
    assert r[("/srv/data", "tree")] == ("read_dir",)
    assert r[("/dev/fuse", "file")] == ("ioctl_dev",)
    # parent kinds land on the directory; the created file's write too
    assert r[("/tmp/out", "tree")] == ("write_file", "remove_file", "make_dir", "make_reg")
    assert r[("/tmp/out/result.json", "file")] == ("write_file",)
    assert ("file:create:/tmp/out/result.json", "landlock:parent-hierarchy") in notes(c)
    assert ("file:write:/tmp/out/result.json", "landlock:created-file-via-parent") in notes(c)
    assert ("file:list:/srv/data", "landlock:read-dir-hierarchy") in notes(c)
    assert set(KIND_RIGHTS) == {"read", "list", "write", "truncate", "ioctl", "create", "remove", "mkdir", "rmdir",
                                "symlink", "mkfifo", "mksock", "mknod"}


def test_children_become_a_hierarchy_unless_something_sensitive_lies_beneath():
    c = compile_ruleset(W, files=["file:read:/usr/lib/python3.11/*"], execs=["/usr/local/bin/*"])
    r = rules(c)
    assert r[("/usr/lib/python3.11", "tree")] == ("read_file",)
    assert r[("/usr/local/bin", "tree")] == ("execute", "read_file")
    assert ("file:read:/usr/lib/python3.11/*", "landlock:children-as-hierarchy") in notes(c)
    # /var/* does not include a sensitive path, but /var/** does: enumerate the children
    c = compile_ruleset(W, files=["file:read:/var/*", "file:read:/home/agent/*"])
    by = {(x.path, x.object): x for x in c.rules}
    assert ("/var", "tree") not in by and by[("/var", "children")].exclude == ("lib", "run")
    assert ".netrc" in by[("/home/agent", "children")].exclude
    assert ".ssh" in by[("/home/agent", "children")].exclude
    assert ("file:read:/var/*", "landlock:children-enumerated") in notes(c)


def test_hierarchies_over_sensitive_paths_are_refused_or_dropped():
    entries = ["file:read:/var/**", "file:create:/root/notes.txt", "file:read:/etc/hostname"]
    with pytest.raises(LandlockCompileError) as e:
        compile_ruleset(W, files=entries)
    msg = str(e.value)
    assert "2 entries" in msg and "file:read:/var/**" in msg and "/root/notes.txt" in msg and "fix:" in msg
    c = compile_ruleset(W, files=entries, inexpressible="drop")
    assert set(rules(c)) == {("/etc/hostname", "file")}
    assert {n.entry for n in c.notes if n.rule == "inexpressible:dropped"} == set(entries[:2])


def test_an_exact_sensitive_path_is_a_plain_file_rule():
    c = compile_ruleset(W, files=["file:read:/var/run/secrets/kubernetes.io/serviceaccount/token",
                                  "file:list:/var/run/secrets/kubernetes.io/serviceaccount"])
    r = rules(c)
    assert r[("/var/run/secrets/kubernetes.io/serviceaccount/token", "file")] == ("read_file",)
    assert r[("/var/run/secrets/kubernetes.io/serviceaccount", "tree")] == ("read_dir",)


def test_gaps_and_without():
    c = compile_ruleset(W, execs=["/bin/true"], files=["file:truncate:/tmp/x", "file:read:/tmp/y"])
    supported_abi2 = [r.name for r in FS_RIGHTS if r.abi <= 2]
    gaps = c.gaps(supported_abi2)
    assert [g.right for g in gaps] == ["truncate", "ioctl_dev"]
    assert "needs Landlock ABI 3; this kernel has ABI 2" in gaps[0].message(2)
    narrowed = c.without(g.right for g in gaps)
    assert "truncate" not in narrowed.handled_fs and ("/tmp/x", "file") not in rules(narrowed)
    assert narrowed.abi == 2


def test_policy_substrates_decide_what_is_handled():
    wl = Workload("agents", "Deployment", "research-agent", "agent")
    p = Policy(workload=wl, mode="enforce", substrates=("syscall", "egress"), execs=("/usr/bin/git",))
    assert compile_policy(p).empty
    p = Policy(workload=wl, mode="enforce", execs=("/usr/bin/git",))
    assert compile_policy(p).handled_fs == ("execute", "refer")


def test_bad_entries_name_themselves():
    with pytest.raises(LandlockCompileError, match="exec:/usr/\\*\\*"):
        compile_ruleset(W, execs=["/usr/**"])
    with pytest.raises(LandlockCompileError, match="file:read:tmp"):
        compile_ruleset(W, files=["file:read:tmp"])


def test_not_restricted_list_matches_the_installed_uapi_warning():
    """The installed uapi header's warning lists syscalls Landlock cannot restrict; every one of
    them that is still unrestricted on ABI 7 is in our list (truncate became restrictable in ABI 3,
    ioctl on devices in ABI 5)."""
    from enforcer.landlock_rules import NOT_RESTRICTED
    header = Path("/usr/include/linux/landlock.h")
    if not header.exists():
        pytest.skip("linux-libc-dev not installed")
    warned = set(re.findall(r":manpage:`(\w+)\(2\)`", header.read_text().split(".. warning::", 1)[1]))
    ours = " ".join(NOT_RESTRICTED)
    for name in warned - {"truncate", "ioctl"}:
        assert f"{name}(2)" in ours, name
