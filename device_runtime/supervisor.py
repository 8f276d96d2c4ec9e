"""Runs the training child and watches it: memory at >= 20 Hz, the budget, a timeout.

The supervisor samples VmRSS and VmHWM of the child from /proc/<pid>/status; VmHWM
catches a spike between two samples. Over budget -> SIGKILL, like Android's
low-memory killer (which also kills without warning). The child's progress lines
are read as they appear so the budget can be measured above the post-load baseline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import procfs

MIB = 1024 * 1024


@dataclass(frozen=True)
class Budget:
    limit_bytes: int
    applies_to: str = "process"  # process: whole-process RSS (what the LMK sees) | footprint: above baseline


class ProgressReader:
    """Incrementally parses complete JSON lines from the child's progress file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return []
        self._offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        new: list[dict[str, Any]] = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn line from a killed child
            if isinstance(record, dict) and isinstance(record.get("event"), str):
                new.append(record)
        self.events.extend(new)
        return new

    def first(self, event: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e["event"] == event), None)


@dataclass
class Supervision:
    returncode: int
    started_t: float
    ended_t: float
    events: list[dict[str, Any]]
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (monotonic t, VmRSS bytes)
    anon_samples: list[tuple[float, int]] = field(default_factory=list)  # (monotonic t, RssAnon bytes)
    hwm_after_load: int | None = None  # highest VmHWM sampled after the post-load reset
    cpu_s_last: float | None = None
    killed_for: str | None = None  # "budget" | "timeout"
    kill_usage_bytes: int | None = None

    def first(self, event: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e["event"] == event), None)

    def last(self, event: str) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e["event"] == event), None)


def supervise(cmd: list[str], progress_path: Path, log_path: Path, memory_hz: float,
              budget: Budget | None = None, timeout_s: float | None = None,
              env: dict[str, str] | None = None) -> Supervision:
    """Run cmd to completion (or kill it), sampling its memory at memory_hz."""
    reader = ProgressReader(progress_path)
    interval = 1.0 / memory_hz
    with open(log_path, "ab") as log:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, close_fds=True)
    result = Supervision(returncode=0, started_t=started, ended_t=started, events=reader.events)
    baseline: int | None = None
    loaded = False
    next_t = started
    try:
        while True:
            now = time.monotonic()
            for event in reader.poll():
                if event["event"] == "loaded":
                    loaded = True
                    baseline = event.get("baseline_rss_bytes")
            mem = procfs.read_memory(proc.pid)
            cpu = procfs.cpu_seconds(proc.pid)
            if cpu is not None:
                result.cpu_s_last = cpu
            if mem is not None:
                result.rss_samples.append((now, mem.rss_bytes))
                if mem.anon_bytes is not None:
                    result.anon_samples.append((now, mem.anon_bytes))
                if loaded:
                    result.hwm_after_load = max(result.hwm_after_load or 0, mem.hwm_bytes)
                if budget is not None:
                    usage = _usage(mem, budget, loaded, baseline)
                    if usage is not None and usage > budget.limit_bytes:
                        result.killed_for, result.kill_usage_bytes = "budget", usage
                        _kill(proc)
                        break
            if timeout_s is not None and now - started > timeout_s:
                result.killed_for = "timeout"
                _kill(proc)
                break
            if proc.poll() is not None:
                break
            next_t += interval
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_t = time.monotonic()  # fell behind (busy machine): do not burst
    finally:
        if proc.poll() is None and result.killed_for is None:
            _kill(proc)  # the supervisor itself is being interrupted
        result.returncode = proc.wait()
        result.ended_t = time.monotonic()
        reader.poll()
    return result


def _usage(mem: procfs.MemoryReading, budget: Budget, loaded: bool, baseline: int | None) -> int | None:
    # VmHWM catches a spike that rose and fell between two samples.
    if budget.applies_to == "process":
        return max(mem.rss_bytes, mem.hwm_bytes)
    if not loaded or baseline is None:
        return None  # footprint budgets start once the model is loaded
    return max(mem.rss_bytes, mem.hwm_bytes) - baseline


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
