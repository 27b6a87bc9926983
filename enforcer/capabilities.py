"""The capability substrate's enforcement outputs, pure: a policy's ``spec.allow.capabilities``
as the set a launcher keeps, and as the container ``securityContext.capabilities`` Kubernetes
applies.

* :func:`exec_capability_sets`: the capability numbers an ``envelope exec`` child keeps (it
  drops the rest from its bounding set, clears its inheritable and ambient sets and sets its
  effective and permitted sets to these before ``execve``); None when nothing is to be dropped:
  the policy leaves the substrate out, or its mode does not enforce (a capability that is not
  held cannot be "allowed and logged": alert and observe keep what the process has).
* :func:`k8s_capabilities`: ``{"drop": ["ALL"], "add": [NAME, ...]}``, the fragment of a
  container's ``securityContext`` (names without ``CAP_``, as Kubernetes takes them). The
  kubelet enforces it whatever the policy's mode says.

Capabilities the kernel checks only for a root process are what a policy grants; a process that
runs as another user has none of them in its effective set anyway (its checks are refused and
recorded as such, never admitted).
"""

from __future__ import annotations

from typing import Iterable

from sensor import capabilities as names

from .policy import Policy

SUBSTRATE = "capability"


class CapabilityCompileError(ValueError):
    """A policy that cannot be compiled to a capability set; one line."""


def exec_capability_sets(policy: Policy, mode: str | None = None,
                         exceptions: Iterable[str] = ()) -> frozenset[int] | None:
    """The capability numbers to keep when ``policy`` is enforced in ``mode`` (default: the
    policy's), with the capability names of active exceptions (``exceptions``) added; None when
    the process keeps what it has (the policy does not encode the substrate, or the mode is not
    ``enforce``)."""
    effective = mode or policy.mode
    if SUBSTRATE not in policy.substrates or effective != "enforce":
        return None
    keep = set()
    for name in (*policy.capabilities, *exceptions):
        try:
            keep.add(names.number(name))
        except names.CapabilityError as e:
            raise CapabilityCompileError(f"capability exception: {e}") from None
    return frozenset(keep)


def k8s_capabilities(policy: Policy, exceptions: Iterable[str] = ()) -> dict:
    """The container ``securityContext.capabilities`` of ``policy``: drop everything, add back
    what it allows and what ``exceptions`` (capability names) add, sorted by name."""
    if SUBSTRATE not in policy.substrates:
        raise CapabilityCompileError(
            f"policy {policy.workload}: the capability substrate is not encoded (spec.decisions.granularity."
            f"substrates: {', '.join(policy.substrates)}); derive with --substrates ...,capability from a "
            f"profile recorded with the capability probe")
    extra = set(exceptions)
    for name in sorted(extra):
        try:
            names.number(name)
        except names.CapabilityError as e:
            raise CapabilityCompileError(f"capability exception: {e}") from None
    return {"drop": ["ALL"], "add": sorted(set(policy.capabilities) | extra)}
