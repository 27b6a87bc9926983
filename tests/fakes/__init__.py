"""Test doubles shared by every test tier (and the cluster-scale benchmark): one place, imported
as ``tests.fakes``, never through ``sys.path`` tricks."""
