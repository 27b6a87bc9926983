"""The benchmark harness: a case that measured nothing fails its benchmark and every ratio on it."""

import json
import sys
import types

from bench import Checks
from bench.__main__ import ratio_status, render, run_child


def test_a_failed_check_makes_the_case_invalid_with_its_first_reason():
    c = Checks()
    assert c.require("derived", True, "filter in force")
    assert not c.require("derived", False, "clock_gettime failed: EPERM")
    c.require("derived", False, "a later reason")
    c.require("bare", True, "calls returned the parent")
    assert not c.ok("derived") and c.ok("bare")
    f = c.fields()
    assert f["invalid"] == {"derived": "clock_gettime failed: EPERM"}
    assert f["checks"]["derived"] == "FAILED: clock_gettime failed: EPERM"
    assert f["checks"]["bare"] == "calls returned the parent"


def test_a_ratio_on_an_invalid_case_is_failed_never_met():
    invalid = {"derived": "measured nothing"}
    bad = Checks.ratio(-3.38, "derived", "default-profile")
    good = Checks.ratio(0.9, "default-profile")
    assert ratio_status(bad, "<= 1.0", invalid).startswith("failed")
    assert ratio_status(good, "<= 1.0", invalid) == "met"
    assert ratio_status(Checks.ratio(1.2, "bare"), "<= 1.0", invalid) == "missed"
    assert ratio_status(0.5, "<= 1.0", invalid) == "met"  # a plain value names no case


def test_a_benchmark_with_an_invalid_case_is_reported_failed(tmp_path, monkeypatch):
    mod = types.ModuleType("bench.bench_fake")

    def run(quick=False):
        c = Checks()
        c.require("derived", False, "the loop's clock reads were denied")
        return {"title": "fake", "rows": [{"case": "derived", "ns/call": 0.0}],
                "ratios": {"derived / bare": c.ratio(0.0, "derived")},
                "targets": {"derived / bare": "<= 1.0"}, **c.fields()}

    mod.run = run
    monkeypatch.setitem(sys.modules, "bench.bench_fake", mod)
    out = tmp_path / "r.json"
    monkeypatch.setattr("os.dup2", lambda *a: None)  # keep pytest's stdout
    monkeypatch.setattr("bench.__main__.signal.signal", lambda *a: None)  # and its SIGTERM
    assert run_child("fake", True, out) == 1
    rec = json.loads(out.read_text())
    assert rec["status"] == "failed"
    assert "measured nothing" in rec["error"] and "clock reads were denied" in rec["error"]
    text = render("fake", rec)
    assert "| derived / bare | 0 |  | <= 1.0 | failed (derived measured nothing) |" in text
    assert "| met |" not in text


def test_a_partial_run_replaces_its_own_sections_and_keeps_the_others(tmp_path, monkeypatch):
    import bench.__main__ as harness

    def rec(title, value):
        return {"title": title, "module": "bench/x.py", "status": "ok", "rows": [{"case": "c", "value": value}]}

    md = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(harness, "BENCHMARKS_MD", md)
    md.write_text("# Benchmarks\n\nprose\n\n")
    harness.update_benchmarks_md({"benches": {"a": rec("A", 1), "b": rec("B", 2)}})
    md.write_text(md.read_text() + "\nafter the results\n")
    harness.update_benchmarks_md({"benches": {"b": rec("B", 3), "c": rec("C", 4)}}, ran=["b", "c"])
    text = md.read_text()
    results = text.split(harness.BEGIN)[1].split(harness.END)[0]
    assert [t for t, _ in harness._sections(results)] == ["A", "B", "C"], "the old order, new sections last"
    assert "| c | 1 |" in results and "| c | 3 |" in results and "| c | 2 |" not in results
    assert text.startswith("# Benchmarks\n\nprose") and text.rstrip().endswith("after the results")
