"""Where `fedblocks testbed virtual` announces the phones it runs, so that `fedblocks devices`
(and every command that discovers devices) finds them without `adb connect` or FEDBLOCKS_DEVICES.

One JSON file per running phone, ``<cache>/virtual-phones/<port>.json`` = {serial, pid}, where
<cache> is $FEDBLOCKS_CACHE or ~/.cache/fedblocks (the same root as the host's dataset cache).
An entry counts only while its adbd process is alive; stale files are removed when read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CACHE_ENV = "FEDBLOCKS_CACHE"


def registry_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "fedblocks"
    return root / "virtual-phones"


def announce(serial: str, port: int, pid: int) -> Path:
    folder = registry_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{port}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"serial": serial, "pid": pid}))
    tmp.replace(path)
    return path


def withdraw(port: int) -> None:
    (registry_dir() / f"{port}.json").unlink(missing_ok=True)


def running_serials() -> list[str]:
    """Serials of announced phones whose adbd still runs, by port."""
    folder = registry_dir()
    if not folder.is_dir():
        return []
    serials: list[tuple[int, str]] = []
    for path in folder.glob("*.json"):
        try:
            entry = json.loads(path.read_text())
            serial, pid, port = str(entry["serial"]), int(entry["pid"]), int(path.stem)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(pid):
            serials.append((port, serial))
        else:
            path.unlink(missing_ok=True)
    return [serial for _, serial in sorted(serials)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, someone else's
        return True
    return True
