"""Benchmarks: scripts (``python -m flash_plugin.bench.<name>``), not tests."""
