"""Properties of file closure over generated behaviours (hypothesis): it never widens across access
kinds, and never widens into a sensitive path."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcer.file_closure import FileClosureOptions, allows, derive_files
from enforcer.file_patterns import KINDS, parse_entry, parse_key
from enforcer.sensitive_paths import SENSITIVE, sensitive_match, sensitive_overlaps
from sensor.profile import BehaviourStats

T0 = 1_767_225_600.0
# Directory trees mixing ordinary places with sensitive ones, so widenings are tempted into them.
DIRS = ["/usr/lib/python3", "/usr/lib/python3/site", "/usr/share/zoneinfo", "/etc", "/etc/ssl/certs",
        "/tmp/work", "/tmp/work/run", "/home/agent", "/home/agent/.ssh", "/home/agent/.aws", "/root",
        "/root/.kube", "/var/run/secrets/kubernetes.io/serviceaccount", "/var/lib/kubelet/pods",
        "/proc/self", "/proc/1/root/etc", "/srv/data", "/srv/data/a", "/srv/data/b", "/srv/data/c",
        "/srv/data/d", "/srv/data/e"]
NAMES = ["a", "b", "c", "d", "e", "token", "credentials", "shadow", "config", "id_rsa", ".netrc"]
KIND_LIST = sorted(KINDS)

path_st = st.builds(lambda d, n: f"{d}/{n}", st.sampled_from(DIRS), st.sampled_from(NAMES))
key_st = st.builds(lambda k, p: f"file:{k}:{p}", st.sampled_from(KIND_LIST[:5]), path_st)
stats_st = st.builds(lambda c, s: BehaviourStats(c, s, T0, T0 + 10, session_ids=[f"s{i}" for i in range(s)]),
                     st.integers(1, 12), st.integers(1, 6))
behaviours_st = st.dictionaries(key_st, stats_st, min_size=1, max_size=40)
options_st = st.builds(FileClosureOptions, min_count=st.integers(0, 8), min_sessions=st.integers(0, 4),
                       max_siblings=st.integers(1, 4), tree_min_depth=st.integers(1, 3))
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(behaviours_st, options_st)
def test_closure_never_widens_across_access_kinds(behaviours, opts):
    result = derive_files(behaviours, opts)
    for e in result.allowed:
        members = e.evidence["behaviours"]
        assert all(parse_key(m)[0] == e.kind for m in members), e
        assert parse_entry(e.entry)[0] == e.kind
    # what one kind is allowed does not depend on the other kinds' behaviours at all
    for kind in {parse_key(k)[0] for k in behaviours}:
        alone = derive_files({k: v for k, v in behaviours.items() if parse_key(k)[0] == kind}, opts)
        assert sorted(e.entry for e in alone.allowed) == sorted(e.entry for e in result.allowed if e.kind == kind)
    # and no path gains a kind nobody observed for anything it covers
    for k in behaviours:
        kind, path = parse_key(k)
        for other in KIND_LIST:
            if other != kind and not any(parse_key(b)[0] == other for b in behaviours):
                assert not allows(result.allowed, f"file:{other}:{path}")


@SETTINGS
@given(behaviours_st, options_st)
def test_closure_never_widens_into_a_sensitive_path(behaviours, opts):
    result = derive_files(behaviours, opts)
    for e in result.allowed:
        _, pattern = parse_entry(e.entry)
        if pattern.scope == "exact":
            if sensitive_match(pattern.base) is not None:
                # only when observed exactly, with this kind, above the threshold
                assert e.rule == "exact:sensitive"
                s = behaviours[e.entry]
                assert s.count >= opts.min_count and s.sessions >= opts.min_sessions
            continue
        assert sensitive_overlaps(pattern, SENSITIVE) == [], e.entry
    # any sensitive path admitted at all was itself observed with that kind
    for d in DIRS:
        for n in NAMES:
            p = f"{d}/{n}"
            if sensitive_match(p) is None:
                continue
            for kind in KIND_LIST[:5]:
                if allows(result.allowed, f"file:{kind}:{p}"):
                    assert f"file:{kind}:{p}" in behaviours


@SETTINGS
@given(behaviours_st, options_st)
def test_everything_observed_is_allowed_or_reviewed(behaviours, opts):
    result = derive_files(behaviours, opts)
    for k in behaviours:
        assert allows(result.allowed, k) or k in result.watch, k
    assert derive_files(behaviours, opts).to_dict() == result.to_dict()
