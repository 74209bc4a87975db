"""Adapters for third-party solver implementations; one module per upstream.

Installed as ``flash_plugin.adapters`` (never as a top-level ``adapters`` module).
"""
