"""The ``fedblocks`` command: a thin dispatcher over the subsystems' own CLI modules.

Each subsystem owns its subcommands (``register(subparsers)`` in its ``cli`` module);
this file only wires them together and turns user errors into one line + exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# (module, subcommands it registers). A module that is not there yet simply
# contributes nothing, so the CLI stays usable while subsystems land.
SUBSYSTEM_CLIS: tuple[str, ...] = (
    "fedblocks.export.cli",
    "fedblocks.testbed.cli",
    "fedblocks.host.run_cli",
    "fedblocks.host.report_cli",
    "fedblocks.host.bench",
)


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedblocks",
        description="Block-wise federated learning on Android phones: export, deploy, run, measure, report.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for modname in SUBSYSTEM_CLIS:
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                continue
            raise
        module.register(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"fedblocks {version('fedblocks')}"
    except PackageNotFoundError:
        return "fedblocks (not installed)"


def user_error_types() -> tuple[type[BaseException], ...]:
    """Every exception type that means "bad input": shown as one line, never a traceback."""
    types: list[type[BaseException]] = [UserError]
    for modname, attr in (
        ("fedblocks.export.errors", "ExportError"),
        ("fedblocks.testbed.errors", "TestbedError"),
        ("fedblocks.host.errors", "HostError"),
    ):
        try:
            types.append(getattr(importlib.import_module(modname), attr))
        except (ModuleNotFoundError, AttributeError):
            pass
    return tuple(types)


# Rich lays tables out for 80 columns when output is piped or logged, squeezing wide tables into
# columns one word wide; without a terminal to fit, every subcommand gets this width instead.
PIPED_COLUMNS = "160"


def main(argv: Sequence[str] | None = None) -> int:
    if not sys.stdout.isatty():
        os.environ.setdefault("COLUMNS", PIPED_COLUMNS)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("fedblocks: interrupted", file=sys.stderr)
        return 130
    except user_error_types() as exc:
        print(f"fedblocks {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
