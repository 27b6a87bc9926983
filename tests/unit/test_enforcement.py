"""The daemon's enforcement side, the parts that need no kernel: re-baselines restart the
observation window exactly once, and detection judges what the aggregator observes."""

from pathlib import Path

from enforcer import state
from enforcer.policy import Policy
from envelope.config import Config
from enforcer.session import EnforcementSession
from envelope.enforcement import NodeEnforcement
from sensor.aggregate import Aggregator
from sensor.pump import NodeBinding, Pump
from sensor.store import ProfileStore
from sensor.workload import Workload
from tests.fakes.kernel import FakeKernel

W = Workload.host("agent")


def setup(tmp_path: Path):
    cfg = Config(state_dir=tmp_path / "state", bpffs=tmp_path / "bpffs")
    (tmp_path / "bpffs").mkdir()
    agg = Aggregator("n1", ProfileStore(cfg.state_dir), {0: "read"}.__getitem__)
    obs = Pump(None, NodeBinding(resolver=None), agg)
    session = EnforcementSession(cfg.state_dir, bpffs=cfg.bpffs, backend=FakeKernel())
    enf = NodeEnforcement(cfg, session, sync_interval=0.0, drain_interval=3600.0)
    enf.start(obs)
    return cfg, agg, enf


def test_rebaseline_restarts_the_window_once(tmp_path):
    cfg, agg, enf = setup(tmp_path)
    agg.bind(5, W, "s1", start=100.0)
    agg.on_counts({5: {0: 4}}, 101.0)
    agg.flush()
    enf.tick()  # first sight of the workload's generation
    state.rebaseline(cfg.state_dir, W, reason="new model version", actor="test", now=200.0)
    enf.tick()
    assert agg.profile(W).behaviours() == {}
    agg.on_counts({5: {0: 6}}, 201.0)
    enf.tick()  # same generation: no second restart
    assert agg.profile(W).behaviours()["syscall:read"].count == 2
    assert state.get_mode(cfg.state_dir, W) == "alert"


def test_watch_list_and_out_of_policy_execs_are_judged_from_observations(tmp_path):
    cfg, agg, enf = setup(tmp_path)
    policy = Policy(W, mode="enforce", substrates=("exec",), execs=("/usr/bin/python3",),
                    watch=("exec:/usr/bin/curl",))
    enf._judge_for(policy, "enforce")
    agg.bind(5, W, "s1", start=100.0)
    agg.observe(5, "exec:/usr/bin/python3", 1, 101.0)
    agg.observe(5, "exec:/usr/bin/curl", 1, 102.0)
    found = {(v.substrate, v.behaviour, v.action) for v in enf.store.list()}
    assert found == {("watch", "exec:/usr/bin/curl", "alerted"), ("exec", "exec:/usr/bin/curl", "alerted")}
