"""Errors an operator fixes outside the code: a setting, a service to start, a port to free."""

from __future__ import annotations


class StartupError(Exception):
    """A service or command cannot start. `str(exc)` is the one line to print: what is wrong
    and which setting to check. The command line prints it alone, with the traceback only
    under `--debug`."""
