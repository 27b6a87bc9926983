"""Properties of file derivation (``derive --substrates file``) over generated behaviours
(hypothesis): it never widens across access kinds, never widens into a sensitive path, and
leaves nothing observed unaccounted for."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcer.file_patterns import KINDS, parse_entry, parse_key
from enforcer.sensitive_paths import SENSITIVE, sensitive_match, sensitive_overlaps
from tests.file_profiles import derive_files, file_profile

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
# (count, sessions, first session): count >= sessions
obs_st = st.integers(1, 6).flatmap(lambda s: st.tuples(st.integers(s, 12), st.just(s), st.integers(0, 4)))
behaviours_st = st.dictionaries(key_st, obs_st, min_size=1, max_size=40)
options_st = st.fixed_dictionaries({"min_count": st.integers(0, 8), "min_sessions": st.integers(0, 4),
                                    "max_siblings": st.integers(1, 4), "file_tree_depth": st.integers(1, 3)})
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def entry_evidence(policy, entry: str) -> dict:
    return next(p["evidence"] for p in policy.provenance if p["entry"] == entry)


@SETTINGS
@given(behaviours_st, options_st)
def test_closure_never_widens_across_access_kinds(behaviours, opts):
    policy = derive_files(behaviours, **opts)
    for e in policy.files:
        kind = parse_entry(e)[0]
        assert all(parse_key(m)[0] == kind for m in entry_evidence(policy, e)["behaviours"]), e
    # what one kind is allowed does not depend on the other kinds' behaviours at all
    for kind in {parse_key(k)[0] for k in behaviours}:
        alone = derive_files({k: v for k, v in behaviours.items() if parse_key(k)[0] == kind}, **opts)
        assert sorted(alone.files) == sorted(e for e in policy.files if parse_entry(e)[0] == kind)
    # and no path gains a kind nobody observed for anything it covers
    for k in behaviours:
        _, path = parse_key(k)
        for other in KIND_LIST:
            if not any(parse_key(b)[0] == other for b in behaviours):
                assert not policy.allows(f"file:{other}:{path}")


@SETTINGS
@given(behaviours_st, options_st)
def test_closure_never_widens_into_a_sensitive_path(behaviours, opts):
    profile = file_profile(behaviours)
    stats = profile.behaviours()
    policy = derive_files(profile, **opts)
    for e in policy.files:
        _, pattern = parse_entry(e)
        if pattern.scope == "exact":
            if sensitive_match(pattern.base) is not None:
                # only when observed exactly, with this kind, above the threshold
                rule = next(p["rule"] for p in policy.provenance if p["entry"] == e)
                assert rule == "exact:sensitive"
                s = stats[e]
                assert s.count >= opts["min_count"] and s.sessions >= opts["min_sessions"]
            continue
        assert sensitive_overlaps(pattern, SENSITIVE) == [], e
    # any sensitive path admitted at all was itself observed with that kind
    for d in DIRS:
        for n in NAMES:
            p = f"{d}/{n}"
            if sensitive_match(p) is None:
                continue
            for kind in KIND_LIST[:5]:
                if policy.allows(f"file:{kind}:{p}"):
                    assert f"file:{kind}:{p}" in behaviours


@SETTINGS
@given(behaviours_st, options_st)
def test_everything_observed_is_allowed_or_reviewed(behaviours, opts):
    policy = derive_files(behaviours, **opts)
    reviewed = {m for r in policy.review for m in r["evidence"]["behaviours"]}
    for k in behaviours:
        assert policy.allows(k) or (k in policy.watch and k in reviewed), k
    assert policy == derive_files(behaviours, **opts)
