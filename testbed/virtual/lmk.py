"""A low-memory killer for a virtual phone.

Android's lmkd kills processes when free memory runs low. The virtual phone has a fixed
budget instead (profile.memory_budget_mb): when the summed RSS of all the phone's
processes exceeds it, the process tree (one shell command or orphaned job, see
proctree) with the largest RSS gets SIGKILL, like lmkd picking its victim. Each kill
is appended as one JSON line to <sandbox>/data/local/tmp/fedblocks/lmk.log, which the
host can pull; the killed shell command exits with status 137 (128 + SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .proctree import ProcInfo


@dataclass(frozen=True)
class KillRecord:
    time: float
    root_pid: int
    pids: list[int]
    command: str
    tree_rss_mb: float
    total_rss_mb: float
    budget_mb: float


class MemoryKiller:
    def __init__(self, budget_mb: int, log_path: Path) -> None:
        self.budget_bytes = budget_mb * 1024 * 1024
        self.log_path = log_path
        self.kills: list[KillRecord] = []

    def check(self, trees: dict[int, list[ProcInfo]]) -> KillRecord | None:
        tree_rss = {root: sum(p.rss_bytes for p in members) for root, members in trees.items()}
        total = sum(tree_rss.values())
        if total <= self.budget_bytes or not tree_rss:
            return None
        victim = max(tree_rss, key=lambda root: tree_rss[root])
        pids = [p.pid for p in trees[victim]]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        record = KillRecord(time.time(), victim, pids, _cmdline(victim), tree_rss[victim] / 2**20,
                            total / 2**20, self.budget_bytes / 2**20)
        self.kills.append(record)
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(asdict(record)) + "\n")
        except OSError as exc:  # the sandbox may be read-only or gone: still kill, say so
            print(f"lmk: cannot write {self.log_path}: {exc}", file=sys.stderr)
        print(f"lmk: killed tree {victim} ({record.tree_rss_mb:.0f} MiB; phone total "
              f"{record.total_rss_mb:.0f} > budget {record.budget_mb:.0f} MiB)", file=sys.stderr)
        return record


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()[:200]
    except OSError:
        return ""
