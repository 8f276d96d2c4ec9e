"""Errors the host raises for bad input (config, run directories, data)."""


class HostError(Exception):
    """A user-fixable problem in host input: one line, exit code 2."""
