"""What an exec needs, read from real files: this host's binaries and a small root built here."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from enforcer.exec_needs import in_root, resolve

GIT = "/usr/bin/git"


@pytest.mark.skipif(not Path(GIT).exists(), reason="git is installed by make setup")
def test_dynamic_elf_needs_its_loader_and_libraries():
    n = resolve([GIT])[GIT]
    assert n.execute == ("/lib64/ld-linux-x86-64.so.2",)
    assert "/lib/x86_64-linux-gnu/libc.so.6" in n.read and "/etc/ld.so.cache" in n.read
    assert any("libz.so" in p for p in n.read) and not n.notes


def test_script_static_binary_and_symlinks_inside_a_root(tmp_path):
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "app").mkdir()
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    os.symlink("busybox", root / "bin/sh")
    os.symlink("/bin", root / "sbin")  # absolute: resolved inside the root, not on the host
    (root / "app/tool").write_text("#!/sbin/sh -e\necho hi\n")
    (root / "app/tool").chmod(0o755)
    (root / "app/data").write_text("not a program\n")
    needs = resolve(["/app/tool", "/bin/sh", "/app/data", "/app/missing", "/app/*"], root=str(root))
    assert needs["/app/tool"].execute == ("/sbin/sh",) and needs["/app/tool"].read == ()
    assert needs["/bin/sh"].execute == () and not needs["/bin/sh"].notes  # static: nothing else
    assert needs["/app/data"].notes == ("/app/data: neither an ELF file nor a #! script",)
    assert needs["/app/missing"].notes == ("/app/missing: not found",)
    assert needs["/app/*"].execute == ("/sbin/sh",)
    assert in_root(str(root), "/sbin/sh") == "/bin/busybox"
    assert in_root(str(root), "/../../etc/passwd") is None  # never leaves the root
