"""``fedblocks devices`` and ``fedblocks testbed ...``: argument parsing only.

The work lives in testbed.virtual (virtual phones), testbed.provision and
testbed.inventory; this module just wires their entry points to argparse.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    devices = sub.add_parser("devices", help="list reachable devices (real and virtual) and their readiness")
    devices.add_argument("--serial", action="append", default=[], help="only this serial (repeatable)")
    devices.add_argument("--json", action="store_true", help="machine-readable output")
    devices.set_defaults(func=_devices)

    testbed = sub.add_parser("testbed", help="virtual phones and provisioning of real ones")
    tsub = testbed.add_subparsers(dest="testbed_command", metavar="ACTION")
    tsub.required = True

    virtual = tsub.add_parser("virtual", help="run N virtual phones (an adbd each) until interrupted")
    virtual.add_argument("--count", type=int, default=1, help="number of phones (default 1)")
    virtual.add_argument("--base-port", type=int, default=6520,
                         help="first TCP port; phones use P..P+N-1 (keep outside 5555-5585)")
    virtual.add_argument("--profile", default="midrange", help="built-in profile name or a TOML file")
    virtual.add_argument("--authorized-keys", default=None,
                         help="file of accepted adb public keys (default: ~/.android/adbkey.pub and the fedblocks key)")
    virtual.add_argument("--state-dir", default=None, help="where the phones' sandboxes live (default: a temp dir)")
    virtual.add_argument("--json", action="store_true", help="print the serials as JSON")
    virtual.set_defaults(func=_virtual)

    provision = tsub.add_parser("provision", help="push the device runtime and check python + engines")
    provision.add_argument("--serial", action="append", default=[], help="device serial (repeatable; default: all)")
    provision.add_argument("--json", action="store_true", help="machine-readable output")
    provision.set_defaults(func=_provision)


def _devices(args: argparse.Namespace) -> int:
    from fedblocks.testbed.inventory import devices_command

    return devices_command(args)


def _virtual(args: argparse.Namespace) -> int:
    from fedblocks.testbed.virtual.cli import virtual_command

    return virtual_command(args)


def _provision(args: argparse.Namespace) -> int:
    from fedblocks.testbed.provision import provision_command

    return provision_command(args)
