"""Errors the testbed raises for problems a user can act on."""


class TestbedError(Exception):
    """A user-fixable testbed problem (unreachable device, refused auth, bad profile): one line, exit 2."""

    __test__ = False  # not a pytest test class
