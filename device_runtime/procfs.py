"""Process memory and CPU time from /proc (Linux and Android kernels)."""

from __future__ import annotations

import os
from dataclasses import dataclass

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class MemoryReading:
    rss_bytes: int  # VmRSS: resident now
    hwm_bytes: int  # VmHWM: peak resident since start or since the last clear_refs reset


def read_memory(pid: int | str = "self") -> MemoryReading | None:
    """VmRSS/VmHWM of a live process; None when it is gone (or a zombie, which has no mm)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rss = hwm = None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    if rss is None or hwm is None:
        return None
    return MemoryReading(rss_bytes=rss, hwm_bytes=hwm)


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
