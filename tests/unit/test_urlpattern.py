"""URL patterns: hosts and path templates (pure)."""

from __future__ import annotations

import pytest

from enforcer import urlpattern as up


@pytest.mark.parametrize("seg,cls", [
    ("42", "number"), ("0", "number"), ("123e4567-e89b-12d3-a456-426614174000", "uuid"),
    ("8cc56bf", "hash"), ("8cc56bfbc2b2446e4396d975246116443ae77bdd", "hash"),
    ("AbC123xyz789QwErTy456", "opaque"), ("docs", None), ("deadbeef", None), ("v1", None), ("README.md", None),
])
def test_identifier_classes(seg, cls):
    assert up.identifier_class(seg) == cls


def test_ids_become_templates_and_many_siblings_a_wildcard():
    urls = ["https://api.example.com/v1/docs/12", "https://api.example.com/v1/docs/977",
            "https://api.example.com/v1/users/5f3c2a1e-0000-4000-8000-000000000001/profile",
            "https://API.example.com:443/v1/docs/13/"]
    pats, rejected = up.derive(urls + ["not a url"], max_siblings=3)
    assert rejected == ["not a url"]
    assert [p.pattern.text for p in pats] == ["https://api.example.com/v1/docs/{id}",
                                              "https://api.example.com/v1/users/{id}/profile"]
    docs = pats[0]
    assert docs.rule == "url-template" and len(docs.members) == 3
    many = [f"https://h.example/repos/{n}/issues" for n in ("alpha", "beta", "gamma", "delta")]
    pats, _ = up.derive(many, max_siblings=3)
    assert [p.pattern.text for p in pats] == ["https://h.example/repos/*/issues"]
    assert pats[0].rule == "url-template+url-sibling-wildcard" and pats[0].wildcards == 1
    pats, _ = up.derive(many[:3], max_siblings=3)
    assert len(pats) == 3


def test_patterns_never_cross_scheme_host_or_port_and_resolve_dot_segments():
    p = up.UrlPattern.parse("https://api.example.com/v1/docs/{id}")
    assert p.matches("https://api.example.com/v1/docs/99")
    assert p.matches("https://api.example.com:443/v1/docs/99?x=1#f")
    assert not p.matches("http://api.example.com/v1/docs/99")
    assert not p.matches("https://api.example.com:8443/v1/docs/99")
    assert not p.matches("https://evil.example/v1/docs/99")
    assert not p.matches("https://api.example.com.evil.example/v1/docs/99")
    assert not p.matches("https://api.example.com/v1/docs/readme")
    assert not p.matches("https://api.example.com/v1/docs/99/../../../admin/1")
    assert up.UrlPattern.parse("https://h.example/a/*").matches("https://h.example/a/b/../c")
    with pytest.raises(ValueError):
        up.UrlPattern.parse("https://h.example/a{id}")
    with pytest.raises(ValueError):
        up.UrlPattern.parse("no-scheme/path")
