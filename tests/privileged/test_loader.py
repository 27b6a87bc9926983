"""Program families loaded side by side (:func:`sensor.kernel.load_all`): real loader children
compiling real families against this kernel, in the order asked, all or nothing."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from sensor import capability_observer
from sensor.kernel import (Family, LoadError, Program, link_prog_id, load_all, obj_id, prog_fd_by_id,
                           prog_run_count, run_stats)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def broken(tmp_path: Path, name: str) -> Family:
    src = tmp_path / f"{name}.c"
    src.write_text("int this_is_not_a_bpf_program( {\n")
    return Family(name, str(src), programs=(Program("nothing", "raw_tracepoint", "sys_enter"),))


MEET = "tests.privileged.loader_rendezvous:meet"


def meeting(f: Family, name: str) -> Family:
    return dataclasses.replace(f, name=name, setup=MEET)


def test_families_load_side_by_side_in_the_order_given(tmp_path, monkeypatch):
    monkeypatch.setenv("ENVELOPE_TEST_RENDEZVOUS", str(tmp_path))  # each child waits for the other
    families = [meeting(capability_observer.family("tracepoint"), "caps-tracepoint"),
                meeting(capability_observer.family("kprobe", attach=False), "caps-kprobe")]
    loaded = load_all(families)
    try:
        assert [x.family for x in loaded] == ["caps-tracepoint", "caps-kprobe"]
        assert set(loaded[0].attachments) >= {"raw_tracepoint__cap_capable"}
        assert set(loaded[1].programs) == {"envelope_cap_capable_entry", "envelope_cap_capable_return"}
        ids = [obj_id(fd) for x in loaded for fd in (*x.maps.values(), *x.programs.values())]
        assert len(set(ids)) == len(ids)
    finally:
        for x in loaded:
            x.close()
    assert len(list(tmp_path.iterdir())) == 2  # both children were alive at once


def test_one_at_a_time_the_children_never_meet(tmp_path, monkeypatch):
    """The rendezvous above can fail: loaded one after another, neither child meets the other."""
    monkeypatch.setenv("ENVELOPE_TEST_RENDEZVOUS", str(tmp_path))
    monkeypatch.setenv("ENVELOPE_TEST_RENDEZVOUS_WAIT", "2")
    families = [meeting(capability_observer.family("tracepoint"), "caps-tracepoint"),
                meeting(capability_observer.family("kprobe", attach=False), "caps-kprobe")]
    with pytest.raises(LoadError, match="of 2 loader children met"):
        load_all(families, parallel=1)


def test_one_failure_closes_the_others_and_the_first_failure_is_said(tmp_path):
    before = open_fds()
    families = [capability_observer.family("tracepoint"), broken(tmp_path, "first-broken"),
                capability_observer.family("kprobe", attach=False), broken(tmp_path, "second-broken")]
    with pytest.raises(LoadError, match=r"^first-broken: compile "):
        load_all(families)
    assert open_fds() <= before, "fds of the families that loaded were left open"


def test_a_raw_tracepoint_link_names_its_program_and_its_runs_are_counted_while_stats_are_on(tmp_path):
    """What the syscall benchmark checks its empty programs with: the link's program, and the
    kernel's count of its runs under BPF_ENABLE_STATS."""
    src = tmp_path / "empty.c"
    src.write_text("RAW_TRACEPOINT_PROBE(sys_enter) { return 0; }\n")
    (loaded,) = load_all([Family("empty", str(src), programs=(
        Program("raw_tracepoint__sys_enter", "raw_tracepoint", "sys_enter"),))])
    try:
        prog_fd = prog_fd_by_id(link_prog_id(loaded.attachments["raw_tracepoint__sys_enter"]))
        try:
            with run_stats():
                before = prog_run_count(prog_fd)
                for _ in range(1000):
                    os.getppid()
                after = prog_run_count(prog_fd)
            assert after - before >= 1000  # every getppid entered it (and others' syscalls too)
        finally:
            os.close(prog_fd)
    finally:
        loaded.close()
