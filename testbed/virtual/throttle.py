"""CPU throttling by duty-cycling: a phone with cpu_speed s < 1 runs its processes for
s * PERIOD, then holds them with SIGSTOP for (1 - s) * PERIOD, so CPU-bound work takes
about 1/s as long as on this host. Only the phone's own descendants are signalled;
every stopped process is continued again when the throttle stops. Signals go through
pidfds, so a recycled pid never gets stopped by mistake.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

PERIOD_S = 0.1


class Throttle:
    def __init__(self, speed: float, phone_pids: Callable[[], list[int]], busy: threading.Event,
                 period_s: float = PERIOD_S) -> None:
        self.speed = speed
        self.phone_pids = phone_pids   # a fresh scan of the phone's live processes
        self.busy = busy   # set while the phone has processes; nothing to hold otherwise
        self.period_s = period_s
        self._stop = threading.Event()
        self._stopped: set[int] = set()
        self._fds: dict[int, int] = {}
        self._thread = threading.Thread(target=self._run, name="throttle", daemon=True)

    @property
    def active(self) -> bool:
        return self.speed < 0.999

    def start(self) -> None:
        if self.active:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self._resume()
        self._forget_exited(set())

    def _run(self) -> None:
        run_s = self.speed * self.period_s
        hold_s = self.period_s - run_s
        while not self._stop.wait(run_s):
            if not self.busy.wait(self.period_s):
                self._forget_exited(set())
                continue
            pids = self.phone_pids()
            self._forget_exited(set(pids))
            for pid in pids:
                fd = self._pidfd(pid)
                if fd is not None and _signal(fd, signal.SIGSTOP):
                    self._stopped.add(pid)
            self._stop.wait(hold_s)
            self._resume()

    def _pidfd(self, pid: int) -> int | None:
        """A pidfd per process, opened once: signals through it can never hit a process
        that reused the pid after the phone's process exited."""
        fd = self._fds.get(pid)
        if fd is None:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                return None
            self._fds[pid] = fd
        return fd

    def _forget_exited(self, alive: set[int]) -> None:
        for pid in [pid for pid in self._fds if pid not in alive and pid not in self._stopped]:
            os.close(self._fds.pop(pid))

    def _resume(self) -> None:
        for pid in list(self._stopped):
            fd = self._fds.get(pid)
            if fd is not None:
                _signal(fd, signal.SIGCONT)
            self._stopped.discard(pid)


def _signal(pidfd: int, sig: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except OSError:   # exited (ESRCH) or not ours
        return False
    return True
