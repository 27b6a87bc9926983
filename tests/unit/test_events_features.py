"""Feature probing helpers that run without root: tracefs format parsing, BTF lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from sensor import features

EXIT_FORMAT = """name: sched_process_exit
ID: 310
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:char comm[16];	offset:8;	size:16;	signed:0;
	field:pid_t pid;	offset:24;	size:4;	signed:1;
	field:int prio;	offset:28;	size:4;	signed:1;
	field:bool group_dead;	offset:32;	size:1;	signed:0;

print fmt: "comm=%s pid=%d prio=%d group_dead=%s", REC->comm, REC->pid, REC->prio, REC->group_dead ? "true" : "false"
"""

EXEC_FORMAT = """name: sched_process_exec
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:__data_loc char[] filename;	offset:8;	size:4;	signed:0;
	field:pid_t pid;	offset:12;	size:4;	signed:1;
	field:pid_t old_pid;	offset:16;	size:4;	signed:1;
"""


def test_parse_tracepoint_fields():
    assert features.parse_tracepoint_fields(EXIT_FORMAT) == ["comm", "pid", "prio", "group_dead"]
    assert features.parse_tracepoint_fields(EXEC_FORMAT) == ["filename", "pid", "old_pid"]


def test_sensor_reads_only_fields_it_checks_for():
    src = (Path(features.__file__).resolve().parents[1] / "bpf" / "sensor.c").read_text()
    for field in ("group_dead", "child_pid", "old_pid", "data_loc_filename"):
        assert f"args->{field}" in src
    assert "group_dead" in features.TRACEPOINTS["sched/sched_process_exit"]
    assert "child_pid" in features.TRACEPOINTS["sched/sched_process_fork"]


def test_btf_func_id_finds_a_kernel_function():
    btf = Path("/sys/kernel/btf/vmlinux")
    if not btf.exists():
        pytest.skip("kernel without BTF")
    assert features.btf_func_id("do_nanosleep") > 0
    assert features.btf_func_id("no_such_function_in_any_kernel") is None


def test_check_results_carry_a_fix_when_they_fail():
    for c in features.run_checks():
        assert c.name and c.detail
        if not c.ok:
            assert c.fix, c


def test_failed_required_ignores_optional_checks():
    checks = [features.Check("a", False, "x", "fix a"),
              features.Check("b", False, "y", "fix b", required=False),
              features.Check("c", True, "z")]
    assert [c.name for c in features.failed_required(checks)] == ["a"]


def test_doctor_exits_non_zero_and_prints_the_fix_when_a_required_check_fails(monkeypatch, capsys):
    import argparse

    from envelope.commands import doctor
    checks = [features.Check("tracefs", False, "no tracefs", "mount -t tracefs nodev /sys/kernel/tracing"),
              features.Check("lsm", False, "EPERM", "needs BPF-LSM", required=False),
              features.Check("ringbuf", True, "ring buffer map created")]
    monkeypatch.setattr(doctor, "run_checks", lambda: checks)
    rc = doctor.run(argparse.Namespace(output="table"), None)
    out = capsys.readouterr().out
    assert rc == 3  # an environment failure, not a finding
    assert "mount -t tracefs nodev /sys/kernel/tracing" in out
    assert "1 required check(s) failed: tracefs" in out
    checks[0] = features.Check("tracefs", True, "mounted")
    assert doctor.run(argparse.Namespace(output="yaml"), None) == 0  # optional lsm absent: ok
    assert "ok: true" in capsys.readouterr().out
