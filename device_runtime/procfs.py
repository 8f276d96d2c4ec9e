"""Process memory and CPU time from /proc (Linux and Android kernels)."""

from __future__ import annotations

import os
from dataclasses import dataclass

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class MemoryReading:
    rss_bytes: int  # VmRSS: resident now
    hwm_bytes: int  # VmHWM: peak resident since start or since the last clear_refs reset
    anon_bytes: int | None = None  # RssAnon: heap/stack/anonymous mappings (no code or file pages)


def read_memory(pid: int | str = "self") -> MemoryReading | None:
    """VmRSS/VmHWM of a live process; None when it is gone (or a zombie, which has no mm)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            fields[key] = int(line.split()[1]) * 1024
    if "VmRSS" not in fields or "VmHWM" not in fields:
        return None
    return MemoryReading(rss_bytes=fields["VmRSS"], hwm_bytes=fields["VmHWM"], anon_bytes=fields.get("RssAnon"))


def reset_peak(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (`echo 5 > clear_refs`, kernel >= 4.0); False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int | str = "self") -> float | None:
    """utime + stime of every thread of the process, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = text[text.rfind(")") + 2:].split()
    try:
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14, 15 of stat(5)
    except (IndexError, ValueError):
        return None
