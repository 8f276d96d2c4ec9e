"""CPU throttling by duty-cycling: a phone with cpu_speed s < 1 runs its processes for
s * PERIOD, then holds them with SIGSTOP for (1 - s) * PERIOD, so CPU-bound work takes
about 1/s as long as on this host. Only the phone's own descendants are signalled;
every stopped process is continued again when the throttle stops.
"""

from __future__ import annotations

import os
import signal
import threading

from . import proctree

PERIOD_S = 0.1


class Throttle:
    def __init__(self, speed: float, root_pid: int, period_s: float = PERIOD_S) -> None:
        self.speed = speed
        self.root_pid = root_pid
        self.period_s = period_s
        self._stop = threading.Event()
        self._stopped: set[int] = set()
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

    def _run(self) -> None:
        run_s = self.speed * self.period_s
        hold_s = self.period_s - run_s
        while not self._stop.wait(run_s):
            for info in proctree.descendants(self.root_pid):
                if info.state in ("Z", "X"):
                    continue
                try:
                    os.kill(info.pid, signal.SIGSTOP)
                    self._stopped.add(info.pid)
                except (ProcessLookupError, PermissionError):
                    pass
            self._stop.wait(hold_s)
            self._resume()

    def _resume(self) -> None:
        for pid in list(self._stopped):
            try:
                os.kill(pid, signal.SIGCONT)
            except (ProcessLookupError, PermissionError):
                pass
            self._stopped.discard(pid)
