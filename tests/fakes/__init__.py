"""Test fakes shared by every test tier (and the cluster-scale benchmark): one place, imported
as ``tests.fakes.<name>``, never through ``sys.path`` tricks."""
