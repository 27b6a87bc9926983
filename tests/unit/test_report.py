"""``envelope report``: the page's data comes from the evidence, and the page is looked at as a
person would, in headless Chromium (Debian's chromium): the plots and tables are there and not
empty, and a screenshot shows them."""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess


from enforcer.policy import EgressRule, Policy, dump_policy
from enforcer.violations import Violation, ViolationStore
from envelope.cli import main
from envelope.report import coverage_curve
from sensor.profile import Profile
from sensor.store import ProfileStore
from sensor.workload import Workload
from tests.conftest import require

W = Workload("agents", "Deployment", "research-agent", "agent")
T0 = 1_767_225_600.0
HOUR = 3600.0


def growing_profile() -> Profile:
    """Ten hourly sessions; new behaviours stop after hour 4, a late one comes in hour 8."""
    p = Profile(W)
    c = p.node("n1")
    for h in range(10):
        sid = f"s{h}"
        c.open_session(sid, T0 + h * HOUR)
        keys = ["syscall:read", "syscall:write", "connect:tcp:10.0.3.7:443"]
        keys += [f"syscall:{n}" for n in ("openat", "close", "mmap", "futex")[: min(h, 4)]]
        if h >= 8:
            keys.append("exec:/usr/bin/git")
        for k in keys:
            c.observe(sid, k, 3, T0 + h * HOUR + 60)
        c.close_session(sid, T0 + h * HOUR + 1800)
    c.touch(T0 + 40 * HOUR)
    return p


def test_coverage_curve_counts_first_sightings_and_finds_coverage_stop():
    p = growing_profile()
    curve = coverage_curve(p, hours=24, threshold=1)
    s = curve["substrates"]
    assert curve["bin"] == "hour"
    assert s["syscall"]["total"] == 6 and s["syscall"]["perBin"] == {0: 2, 1: 1, 2: 1, 3: 1, 4: 1}
    # the last new syscall was seen in hour 4: quiet for 24 h from then on
    assert s["syscall"]["reachedAt"] == T0 + 4 * HOUR + 60 + 24 * HOUR
    assert s["exec"]["reachedAt"] is None or s["exec"]["reachedAt"] <= T0 + 40 * HOUR


def test_the_time_unit_follows_the_window():
    from envelope.report import time_unit
    assert [time_unit(s)[0] for s in (52, 15 * 60, 40 * HOUR, 30 * 86400)] == ["second", "minute", "hour", "day"]
    # a short window (the demo's) gets bins of seconds, not everything in bin 0
    p = Profile(W)
    c = p.node("n1")
    for i in range(4):
        c.open_session(f"s{i}", T0 + 10 * i)
        c.observe(f"s{i}", f"syscall:n{i}", 1, T0 + 10 * i + 1)
        c.close_session(f"s{i}", T0 + 10 * i + 5)
    curve = coverage_curve(p)
    assert curve["bin"] == "second" and sorted(curve["substrates"]["syscall"]["perBin"]) == [1, 11, 21, 31]


class _Dom(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.svgs, self.tables = [], {}, {}
        self._in_svg = self._in_table = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self._in_svg = a.get("id")
            self.svgs[self._in_svg] = 0
        if tag in ("path", "rect", "use") and self._in_svg:
            self.svgs[self._in_svg] += 1
        if tag == "table":
            self._in_table = a.get("class") or "table"
            self.tables.setdefault(self._in_table, 0)
        if tag == "tr" and self._in_table:
            self.tables[self._in_table] += 1

    def handle_endtag(self, tag):
        if tag == "figure":
            self._in_svg = None
        if tag == "table":
            self._in_table = None


def chromium() -> str:
    exe = shutil.which("chromium")
    require(None if exe else "needs Debian's chromium; run make setup")
    return exe


FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


def test_the_report_renders_in_chromium_with_its_plots_and_tables(tmp_path):
    state = tmp_path / "state"
    ProfileStore(state).save(growing_profile())
    ViolationStore(state).append([Violation(T0 + 9 * HOUR + 5, W.key, "egress", "connect:tcp:127.0.1.66:4444",
                                            "denied", count=4),
                                  Violation(T0 + 9 * HOUR + 9, W.key, "watch", "exec:/usr/bin/git", "alerted")])
    declared = tmp_path / "netpol.yaml"
    declared.write_text(dump_policy(Policy(W, substrates=("egress",), egress=(
        EgressRule("tcp", "10.0.3.0/24", (443,)), EgressRule("tcp", "198.51.100.0/24", (80,))))))
    out = tmp_path / "report.html"
    assert main(["--state-dir", str(state), "report", "research-agent", "--declared", str(declared),
                 "--out", str(out)]) == 0
    page = out.read_text()
    # self-contained: nothing to fetch (SVG namespace URIs are names, not requests)
    assert "<script" not in page and "<link" not in page and " src=" not in page
    assert 'href="http' not in page and "url(http" not in page

    exe = chromium()
    profile_dir = tmp_path / "chromium"
    dom = subprocess.run([exe, *FLAGS, f"--user-data-dir={profile_dir}", "--dump-dom", out.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-1000:]
    parsed = _Dom()
    parsed.feed(dom.stdout)
    assert parsed.svgs.get("coverage-plot", 0) > 20, parsed.svgs  # lines, bars, axes
    assert parsed.svgs.get("violations-plot", 0) > 5, parsed.svgs
    assert parsed.tables.get("allowed", 0) > 5 and parsed.tables.get("violations", 0) == 3
    assert parsed.tables.get("unused", 0) == 2  # header + the 198.51.100.0/24 grant nobody used
    assert "egress:tcp:198.51.100.0/24:80" in dom.stdout

    shot = tmp_path / "report.png"
    r = subprocess.run([exe, *FLAGS, f"--user-data-dir={profile_dir}", "--window-size=1280,3000",
                        f"--screenshot={shot}", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.stat().st_size > 20_000, r.stderr[-1000:]
    from PIL import Image
    img = Image.open(shot).convert("L")
    hist = img.histogram()
    dark = sum(hist[:128]) / (img.width * img.height)
    assert 0.01 < dark < 0.5, dark  # ink on the page, not a blank or black screenshot
    if os.environ.get("ENVELOPE_REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["ENVELOPE_REPORT_SCREENSHOT"])
