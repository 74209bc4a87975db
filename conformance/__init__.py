"""Conformance suite for solvers: ``check_solver()``, ``parametrize_with_checks()`` and a pytest plugin.

Installed as ``flash_plugin.conformance`` (never as a top-level ``conformance`` module).
"""
