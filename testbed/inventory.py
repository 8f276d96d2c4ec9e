"""Which devices exist, and ``fedblocks devices``.

Discovery, the one place that decides which devices a command uses:
1. ``--serial S`` (repeatable) given: exactly those, in that order.
2. Otherwise: every device the platform-tools adb server reports in state ``device``
   (asked over its socket, 127.0.0.1:$ANDROID_ADB_SERVER_PORT or 5037, only if a
   server is already running: nothing is started), then the virtual phones that a running
   ``fedblocks testbed virtual`` announced (testbed/virtual/registry.py), then the serials in
   ``FEDBLOCKS_DEVICES`` (comma-separated), without duplicates.

Serial forms: ``HOST:PORT`` (TCP: wireless adb, a virtual phone), ``emulator-N``, a USB
serial, or ``local:DIR`` (a LocalDevice on a host directory, for tests and dry runs).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .device import Device, DeviceError, DeviceProperties, sha256_file
from .errors import TestbedError
from .provision import Readiness, build_runtime, check_device

DEVICES_ENV = "FEDBLOCKS_DEVICES"
ADB_SERVER_PORT_ENV = "ANDROID_ADB_SERVER_PORT"


@dataclass(frozen=True)
class AdbServerEntry:
    serial: str
    state: str  # device | unauthorized | offline | ...


def adb_server_devices(timeout_s: float = 2.0) -> list[AdbServerEntry]:
    """Devices known to a running adb server (empty if none is running)."""
    port = int(os.environ.get(ADB_SERVER_PORT_ENV, "5037") or 5037)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            request = b"host:devices"
            sock.sendall(b"%04x" % len(request) + request)
            reply = _recv_exact(sock, 4)
            if reply != b"OKAY":
                return []
            length = int(_recv_exact(sock, 4), 16)
            payload = _recv_exact(sock, length).decode("utf-8", "replace")
    except (OSError, ValueError):
        return []
    entries = []
    for line in payload.splitlines():
        serial, _, state = line.partition("\t")
        if serial.strip():
            entries.append(AdbServerEntry(serial.strip(), state.strip()))
    return entries


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ValueError("adb server closed the connection")
        data += chunk
    return data


def env_serials() -> list[str]:
    return [s.strip() for s in os.environ.get(DEVICES_ENV, "").split(",") if s.strip()]


def discover_serials(explicit: Sequence[str] = ()) -> list[str]:
    """The devices a command should use (see the module docstring)."""
    from .virtual.registry import running_serials

    candidates = list(explicit) if explicit else (
        [e.serial for e in adb_server_devices() if e.state == "device"] + running_serials() + env_serials())
    seen: dict[str, None] = {}
    for serial in candidates:
        seen.setdefault(serial, None)
    return list(seen)


def open_device(serial: str, **kwargs: Any) -> Device:
    """Connect to a device by serial: ``local:DIR`` is a LocalDevice, anything else adb."""
    if serial.startswith("local:"):
        from .local_backend import LocalDevice

        return LocalDevice(Path(serial[len("local:"):]), serial=serial)
    from .adb_backend import AdbDevice

    return AdbDevice.connect(serial, **kwargs)


@dataclass
class InventoryEntry:
    serial: str
    properties: DeviceProperties | None
    readiness: Readiness | None
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "reachable": self.error is None,
            "error": self.error,
            "properties": self.properties.to_json() if self.properties else None,
            "runtime_ready": bool(self.readiness and self.readiness.ready),
            "readiness": self.readiness.to_json() if self.readiness else None,
        }


def inventory(serials: Sequence[str], runtime_sha256: str | None = None, max_workers: int = 8
              ) -> list[InventoryEntry]:
    """Properties and quick readiness of each device (concurrently; unreachable ones say why)."""

    def one(serial: str) -> InventoryEntry:
        try:
            with open_device(serial) as device:
                props = device.properties()
                readiness = check_device(device, deep=False, runtime_sha256=runtime_sha256)
                return InventoryEntry(serial, props, readiness, None)
        except (DeviceError, TestbedError) as exc:
            return InventoryEntry(serial, None, None, str(exc))

    if not serials:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(serials)))) as pool:
        return list(pool.map(one, serials))


def current_runtime_sha256() -> str:
    with tempfile.TemporaryDirectory(prefix="fedblocks-runtime-") as tmp:
        return sha256_file(build_runtime(Path(tmp)))


def devices_command(args: argparse.Namespace) -> int:
    serials = discover_serials(args.serial)
    if not args.serial:
        # devices the adb server knows but cannot use yet are worth a line too
        unusable = [e for e in adb_server_devices() if e.state != "device"]
    else:
        unusable = []
    entries = inventory(serials, current_runtime_sha256()) if serials else []
    if args.json:
        rows = [e.to_json() for e in entries]
        rows += [{"serial": e.serial, "reachable": False, "error": _state_hint(e.state), "properties": None,
                  "runtime_ready": False, "readiness": None} for e in unusable]
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not entries and not unusable:
        console.print("no devices: connect a phone (adb), set FEDBLOCKS_DEVICES=HOST:PORT,..., "
                      "or start virtual phones with `fedblocks testbed virtual` (see docs/testbed.md)")
        return 0
    table = Table(title="fedblocks devices")
    for column in ("serial", "model", "SoC", "ABI", "RAM", "battery", "temp", "runtime ready"):
        table.add_column(column)
    for e in entries:
        if e.properties is None:
            table.add_row(e.serial, "-", "-", "-", "-", "-", "-", f"[red]unreachable[/red]: {e.error}")
            continue
        p = e.properties
        ready = e.readiness
        ready_text = "[green]yes[/green]" if ready and ready.ready else (
            f"[yellow]no[/yellow]: {ready.problems[0] if ready else 'unknown'}")
        table.add_row(
            e.serial, p.model or "-", p.soc or "-", p.abi or "-",
            f"{p.ram_mb} MB" if p.ram_mb is not None else "-",
            f"{p.battery_pct}%" if p.battery_pct is not None else "-",
            f"{p.temperature_c:.1f} °C" if p.temperature_c is not None else "-",
            ready_text,
        )
    for u in unusable:
        table.add_row(u.serial, "-", "-", "-", "-", "-", "-", f"[red]{u.state}[/red]: {_state_hint(u.state)}")
    console.print(table)
    return 0


def _state_hint(state: str) -> str:
    if state == "unauthorized":
        return "accept 'Allow USB debugging?' on the phone"
    if state == "offline":
        return "adb sees it offline: replug it or toggle USB debugging"
    return f"adb state {state}"
