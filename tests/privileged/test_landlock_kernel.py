"""Landlock on the real kernel: the feature probe, each rule object, refusals, and denial
visibility through the audit netlink stream."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from enforcer import kernel_audit, landlock
from enforcer.exec_needs import resolve
from enforcer.landlock_rules import FS_RIGHTS, LandlockCompileError, compile_ruleset
from enforcer.landlock_denials import DenialAssembler

W = "host/Unit/landlock-test/main"
ENV = {"LC_ALL": "C", "PATH": "/usr/bin:/bin"}


@pytest.fixture(scope="module")
def support():
    return landlock.probe()


@pytest.fixture
def tree(tmp_path):
    for d in ("data", "data/sub", "out", "other"):
        (tmp_path / d).mkdir()
    (tmp_path / "data/a.txt").write_text("a\n")
    (tmp_path / "data/b.txt").write_text("b\n")
    (tmp_path / "data/sub/c.txt").write_text("c\n")
    (tmp_path / "other/secret").write_text("s\n")
    return tmp_path


def run(ruleset, argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=30,
                          preexec_fn=landlock.preexec(ruleset), **kw)


def build(execs, files, support, **kw):
    compiled = compile_ruleset(W, execs=execs, files=files, exec_needs=resolve(execs))
    return landlock.Ruleset.build(compiled, support, **kw)


def test_probe_agrees_with_the_abi_table(support):
    assert support.abi >= 1
    # every right the ABI table places at or below the kernel's ABI is supported, and none above
    assert support.fs == frozenset(r.name for r in FS_RIGHTS if r.abi <= support.abi)
    if support.abi >= 7:  # the kernel this project runs on
        assert support.restrict_flags == {"log_same_exec_off", "log_new_exec_on", "log_subdomains_off"}
        assert support.net == {"bind_tcp", "connect_tcp"} and support.scopes == {"abstract_unix_socket", "signal"}
        assert support.errata & 1


def test_file_tree_and_children_objects(tree, support):
    files = [f"file:read:{tree}/data/a.txt", f"file:read:{tree}/data/sub/*", f"file:list:{tree}/data"]
    with build(["/usr/bin/cat", "/usr/bin/ls"], files, support) as rs:
        assert run(rs, ["/usr/bin/cat", f"{tree}/data/a.txt"]).stdout == "a\n"
        assert run(rs, ["/usr/bin/cat", f"{tree}/data/sub/c.txt"]).stdout == "c\n"
        r = run(rs, ["/usr/bin/cat", f"{tree}/data/b.txt"])  # a sibling of an exact file: not granted
        assert r.returncode != 0 and "Permission denied" in r.stderr
        assert run(rs, ["/usr/bin/ls", f"{tree}/data"]).stdout.split() == ["a.txt", "b.txt", "sub"]
        r = run(rs, ["/usr/bin/ls", f"{tree}/other"])
        assert r.returncode != 0 and "Permission denied" in r.stderr
        with pytest.raises(PermissionError):
            run(rs, ["/usr/bin/head", f"{tree}/data/a.txt"])  # exec not allowed


def test_children_enumeration_skips_excluded_names_and_directories(tree, support):
    compiled = compile_ruleset(W, execs=["/usr/bin/cat"], files=[f"file:read:{tree}/data/*"],
                               exec_needs=resolve(["/usr/bin/cat"]))
    # the same rule as the compiler makes beside a sensitive path, with b.txt excluded
    rules = tuple(replace(r, object="children", exclude=("b.*",)) if r.path == f"{tree}/data" else r
                  for r in compiled.rules)
    with landlock.Ruleset.build(replace(compiled, rules=rules), support) as rs:
        assert run(rs, ["/usr/bin/cat", f"{tree}/data/a.txt"]).returncode == 0
        assert run(rs, ["/usr/bin/cat", f"{tree}/data/b.txt"]).returncode != 0
        assert run(rs, ["/usr/bin/cat", f"{tree}/data/sub/c.txt"]).returncode != 0
        assert rs.rules_added >= 2


def test_writes_creates_and_truncates_need_their_own_rights(tree, support):
    target = tree / "out/r.txt"
    target.write_text("old\n")
    files = [f"file:write:{target}", f"file:read:{target}"]
    with build(["/usr/bin/sh", "/usr/bin/cat"], files, support) as rs:
        r = run(rs, ["/usr/bin/sh", "-c", f"echo more >> {target}"])  # O_APPEND: write only
        assert r.returncode == 0, r.stderr
        r = run(rs, ["/usr/bin/sh", "-c", f"echo new > {target}"])  # O_TRUNC needs truncate
        assert r.returncode != 0 and "Permission denied" in r.stderr
        r = run(rs, ["/usr/bin/sh", "-c", f"echo x > {tree}/out/new.txt"])  # creation needs make_reg
        assert r.returncode != 0
    assert target.read_text() == "old\nmore\n" and not (tree / "out/new.txt").exists()
    files += [f"file:truncate:{target}", f"file:create:{tree}/out/new.txt", f"file:write:{tree}/out/new.txt"]
    with build(["/usr/bin/sh"], files, support) as rs:
        assert run(rs, ["/usr/bin/sh", "-c", f"echo new > {target} && echo x > {tree}/out/new.txt"]).returncode == 0
    assert target.read_text() == "new\n" and (tree / "out/new.txt").read_text() == "x\n"


def test_missing_objects_and_directories_as_files_are_skipped_and_listed(tree, support):
    files = [f"file:read:{tree}/nope.txt", f"file:read:{tree}/data"]
    with build(["/usr/bin/cat"], files, support) as rs:
        reasons = {s.path: s.reason for s in rs.skipped}
        assert "No such file" in reasons[f"{tree}/nope.txt"]
        assert "is a directory" in reasons[f"{tree}/data"]
        # the directory was not granted as a tree: its files stay unreadable
        assert run(rs, ["/usr/bin/cat", f"{tree}/data/a.txt"]).returncode != 0


def test_rights_the_kernel_lacks_are_refused_or_listed(tree, support):
    compiled = compile_ruleset(W, execs=["/usr/bin/sh"], files=[f"file:write:{tree}/out/t.txt"],
                               exec_needs=resolve(["/usr/bin/sh"]))
    older = replace(support, abi=2, fs=frozenset(r.name for r in FS_RIGHTS if r.abi <= 2))
    with pytest.raises(landlock.LandlockGapError) as e:
        landlock.Ruleset.build(compiled, older)
    assert "truncate" in str(e.value) and "ioctl_dev" in str(e.value) and "fix:" in str(e.value)
    (tree / "out/t.txt").write_text("old\n")
    with landlock.Ruleset.build(compiled, older, allow_gaps=True) as rs:
        assert [g.right for g in rs.gaps] == ["truncate", "ioctl_dev"]
        # truncate is then really not restricted: O_TRUNC on an allowed-for-write file works
        assert run(rs, ["/usr/bin/sh", "-c", f"echo new > {tree}/out/t.txt"]).returncode == 0
    assert (tree / "out/t.txt").read_text() == "new\n"


def test_inexpressible_entries_never_reach_the_kernel():
    with pytest.raises(LandlockCompileError, match="sensitive"):
        compile_ruleset(W, files=["file:read:/var/lib/**"])


def test_denied_open_and_exec_are_reported_with_path_access_and_process(tree, support):
    with kernel_audit.AuditLease(), kernel_audit.AuditReader() as reader:
        assert kernel_audit.status()["enabled"] in (1, 2)
        with build(["/usr/bin/cat"], [f"file:read:{tree}/data/a.txt"], support) as rs:
            p = subprocess.Popen(["/usr/bin/cat", f"{tree}/other/secret"], env=ENV, stderr=subprocess.PIPE,
                                 preexec_fn=landlock.preexec(rs))
            p.communicate(timeout=30)
            with pytest.raises(PermissionError):
                run(rs, ["/bin/sh", "-c", "true"])
        assembler, denials = DenialAssembler(), []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(denials) < 2:
            for t, text in reader.read():
                denials += assembler.feed(t, text)
            time.sleep(0.05)
        denials += assembler.flush()
        assert reader.lost == 0
    mine = [d for d in denials if d.pid == p.pid or d.ppid == os.getpid()]
    read = [d for d in mine if d.path == f"{tree}/other/secret"]
    assert read and read[0].blockers == ("fs.read_file",) and read[0].comm == "cat"
    assert read[0].syscall == "openat" and read[0].exit == -errno.EACCES and read[0].pid == p.pid
    sh = Path("/bin/sh").resolve()
    exe = [d for d in mine if d.path == str(sh)]
    assert exe and exe[0].blockers == ("fs.execute", "fs.read_file") and exe[0].syscall == "execve"
    assert exe[0].behaviours() == (f"exec:{sh}",)


def test_for_exec_builds_in_enforce_mode_only_and_composes_with_seccomp(tree, support):
    """``envelope exec``'s order: cgroup, Landlock, seccomp, execve. The seccomp filter allows no
    landlock_* syscall, which works because Landlock is enforced before the filter is loaded."""
    from enforcer import seccomp as sc
    from enforcer.policy import Policy
    from sensor.workload import Workload
    wl = Workload("host", "Unit", "landlock-exec", "main")
    base = ("access", "arch_prctl", "brk", "close", "execve", "exit_group", "fadvise64", "fstat", "getrandom",
            "mmap", "mprotect", "munmap", "newfstatat", "openat", "pread64", "prlimit64", "read", "rseq",
            "set_robust_list", "set_tid_address", "write")
    policy = Policy(workload=wl, mode="enforce", syscalls=base, execs=("/usr/bin/cat",),
                    substrates=("syscall", "exec", "file"), files=(f"file:read:{tree}/data/a.txt",))
    assert landlock.for_exec(policy, "alert") is None and landlock.for_exec(policy, "observe") is None
    rs = landlock.for_exec(policy, "enforce", support=support)
    flt = sc.build_filter(sc.compile_oci(policy, "enforce"))
    try:
        ok = subprocess.run(["/usr/bin/cat", f"{tree}/data/a.txt"], capture_output=True, text=True, env=ENV,
                            preexec_fn=landlock.preexec(rs, then=flt.load))
        assert ok.returncode == 0 and ok.stdout == "a\n", ok.stderr
        denied = subprocess.run(["/usr/bin/cat", f"{tree}/other/secret"], capture_output=True, text=True, env=ENV,
                                preexec_fn=landlock.preexec(rs, then=flt.load))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        # the other order fails: under the filter, the Landlock calls are denied (EPERM)
        pid = os.fork()
        if pid == 0:
            try:
                flt.load()
                rs.restrict_self()
                os._exit(0)
            except landlock.LandlockError as e:
                os._exit(100 + (e.errno or 0))
            except BaseException:
                os._exit(99)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 100 + errno.EPERM
    finally:
        rs.close()


def test_an_exec_only_ruleset_leaves_renames_across_directories_alone(tree, support):
    """Any Landlock ruleset denies reparenting (EXDEV) unless it grants ``refer``; a ruleset
    about execs only grants it everywhere, so a program that writes a temporary file and renames
    it into another directory (redis's append-only file) keeps working."""
    import sys
    if "refer" not in support.fs:
        pytest.skip("Landlock ABI 1: no ruleset can allow reparenting")
    py = os.path.realpath(sys.executable)

    def rename(src, dst):
        return [py, "-c", "import os, sys; os.rename(sys.argv[1], sys.argv[2])", str(src), str(dst)]

    with build([py], None, support) as rs:
        r = run(rs, rename(tree / "data/a.txt", tree / "out/a.txt"))
        assert r.returncode == 0, r.stderr
        assert (tree / "out/a.txt").read_text() == "a\n"
    # the same ruleset without the grant: the kernel refuses the rename
    compiled = compile_ruleset(W, execs=[py], files=None, exec_needs=resolve([py]))
    without = replace(compiled, rules=tuple(r for r in compiled.rules if r.path != "/"))
    with landlock.Ruleset.build(without, support) as rs:
        r = run(rs, rename(tree / "out/a.txt", tree / "data/a.txt"))
        assert r.returncode != 0 and "Invalid cross-device link" in r.stderr, r.stderr
