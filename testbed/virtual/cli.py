"""``fedblocks testbed virtual``: run N virtual phones until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import json
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import TestbedError
from . import registry
from .phone import VirtualTestbed, check_port
from .profiles import load_profile


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextmanager
def _announced(testbed: VirtualTestbed) -> Iterator[None]:
    """Announce the phones for device discovery (`fedblocks devices`) while they run."""
    for phone in testbed.phones:
        assert phone.process is not None
        registry.announce(phone.serial, phone.port, phone.process.pid)
    try:
        yield
    finally:
        for phone in testbed.phones:
            registry.withdraw(phone.port)


def virtual_command(args: argparse.Namespace) -> int:
    if args.count < 1 or args.count > 256:
        raise TestbedError(f"--count must be between 1 and 256, got {args.count}")
    ports = range(args.base_port, args.base_port + args.count)
    for port in ports:
        check_port(port)
        if not _port_free(port):
            raise TestbedError(f"port {port} is already in use: pick another --base-port")
    profile = load_profile(args.profile)
    keys = [Path(args.authorized_keys)] if args.authorized_keys else None
    if keys is not None and not keys[0].is_file():
        raise TestbedError(f"--authorized-keys {keys[0]} does not exist")
    state_dir = Path(args.state_dir) if args.state_dir else None

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with VirtualTestbed(args.count, args.base_port, profile, state_dir, keys) as testbed, \
                _announced(testbed):
            if args.json:
                print(json.dumps({"serials": testbed.serials, "profile": profile.name,
                                  "state_dir": str(testbed.state_dir),
                                  "sandboxes": [str(ph.sandbox) for ph in testbed.phones]}), flush=True)
            else:
                print(f"{args.count} virtual phone(s), profile {profile.name} ({profile.model}), "
                      f"state in {testbed.state_dir}:", flush=True)
                for phone in testbed.phones:
                    print(f"  {phone.serial}  sandbox {phone.sandbox}", flush=True)
                if not testbed.phones[0].authorized_keys:
                    print("no adb key exists yet: the phones accept ~/.android/adbkey.pub as soon as adb "
                          "creates it (on its first start)", flush=True)
                print(f"connect with: adb connect {testbed.serials[0]}   (Ctrl-C stops)", flush=True)
            while not stop.wait(0.5):
                dead = [ph for ph in testbed.phones if not ph.running]
                if dead:
                    raise TestbedError(f"virtual phone {dead[0].serial} exited; see {dead[0].log_path}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
