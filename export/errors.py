"""Errors the export pipeline raises for bad input."""


class ExportError(Exception):
    """A user-fixable export problem (unknown model, bad --input, engine missing...): one line, exit 2."""
