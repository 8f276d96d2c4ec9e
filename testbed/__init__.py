"""fedblocks.testbed: devices (real phones over adb, virtual phones, a local directory).

Public API (imported lazily, so ``python -m fedblocks.testbed.virtual.adbd`` stays light)::

    from fedblocks.testbed import AdbDevice, LocalDevice, DeviceCache, open_device, discover_serials

See docs/testbed.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "Device": "device", "DeviceError": "device", "DeviceTimeout": "device",
    "DeviceConnectionError": "device", "TransferError": "device", "ShellResult": "device",
    "DeviceProperties": "device", "JobHandle": "device", "JobStatus": "device",
    "TransferProgress": "device", "sha256_file": "device",
    "TestbedError": "errors",
    "AdbDevice": "adb_backend", "LocalDevice": "local_backend",
    "DeviceCache": "cache", "CacheStats": "cache",
    "AdbKey": "keys", "default_key": "keys", "load_key": "keys", "create_key": "keys",
    "open_device": "inventory", "discover_serials": "inventory",
    "Readiness": "provision", "check_device": "provision", "provision_device": "provision",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedblocks.testbed' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
