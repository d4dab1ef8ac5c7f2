"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class FedmedError(Exception):
    """A problem with the user's input (config, paths, data), not a bug in fedmed."""
