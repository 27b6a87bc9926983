"""Test fakes shared by every tier: one place, imported as ``tests.fakes.<name>``."""
