"""The processes a virtual phone runs: everything descending from its adbd.

adbd makes itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so background jobs
whose shell exited (``nohup ... &``) are re-parented to adbd instead of init and stay
counted: the phone's processes are exactly the descendants of the adbd pid. Each direct
child of adbd is the root of one "tree" (one shell command, or an orphaned job).
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    state: str
    cpu_ticks: int   # utime + stime
    rss_bytes: int


def read_proc(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # comm is in parentheses and may contain spaces or ')': split at the last ')'.
    fields = raw[raw.rfind(b")") + 2:].split()
    try:
        return ProcInfo(pid, int(fields[1]), fields[0].decode(), int(fields[11]) + int(fields[12]),
                        int(fields[21]) * PAGE_SIZE)
    except (IndexError, ValueError):
        return None


def scan() -> dict[int, ProcInfo]:
    procs: dict[int, ProcInfo] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = read_proc(int(entry))
            if info is not None:
                procs[info.pid] = info
    return procs


def trees(procs: dict[int, ProcInfo], root_pid: int) -> dict[int, list[ProcInfo]]:
    """Direct child of ``root_pid`` -> every process in its subtree (itself included)."""
    children: dict[int, list[int]] = {}
    for info in procs.values():
        children.setdefault(info.ppid, []).append(info.pid)
    result: dict[int, list[ProcInfo]] = {}
    for top in children.get(root_pid, []):
        members: list[ProcInfo] = []
        stack = [top]
        while stack:
            pid = stack.pop()
            if pid in procs:
                members.append(procs[pid])
            stack.extend(children.get(pid, []))
        result[top] = members
    return result


class PhoneScanner:
    """Repeated scans of one phone's processes, skipping processes known not to be ours.

    A process that is not a descendant of the root cannot become one (re-parenting only
    moves a subreaper's own descendants to it), so after one read it is skipped; the
    skip list is dropped every ``refresh_s`` in case its pid was reused by a new process.
    """

    def __init__(self, root_pid: int, refresh_s: float = 0.5) -> None:
        self.root_pid = root_pid
        self.refresh_s = refresh_s
        self._foreign: set[int] = set()
        self._refreshed = 0.0

    def scan(self) -> dict[int, list[ProcInfo]]:
        now = time.monotonic()
        if now - self._refreshed > self.refresh_s:
            self._foreign.clear()
            self._refreshed = now
        pids = {int(entry) for entry in os.listdir("/proc") if entry.isdigit()}
        procs: dict[int, ProcInfo] = {}
        for pid in pids - self._foreign:
            info = read_proc(pid)
            if info is not None:
                procs[pid] = info
        phone = trees(procs, self.root_pid)
        members = {info.pid for infos in phone.values() for info in infos}
        self._foreign = (self._foreign & pids) | (set(procs) - members - {self.root_pid})
        return phone


def descendants(root_pid: int) -> list[ProcInfo]:
    return [p for members in trees(scan(), root_pid).values() for p in members]


def become_subreaper() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
