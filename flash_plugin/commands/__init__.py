"""Subcommands of the ``flash-plugin`` command line, one module each (see `flash_plugin.cli`)."""
