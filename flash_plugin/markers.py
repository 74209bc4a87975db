"""pluggy markers of the ``flash_plugin`` project (re-exported as ``flash_plugin.hookimpl``)."""

import pluggy

PROJECT_NAME = "flash_plugin"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
