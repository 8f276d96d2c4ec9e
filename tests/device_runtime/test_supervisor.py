"""The supervisor against a real memory-hog child: sampling, budget kill (like the LMK), partial progress."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from fedblocks.device_runtime.supervisor import MIB, Budget, ProgressReader, supervise

# A child that behaves like the trainer: reports "loaded" with its baseline after a VmHWM reset,
# then "steps" that each keep 16 MiB more (pages touched, so they are resident).
HOG = r"""
import json, sys, time
pre_mb, steps = int(sys.argv[2]), int(sys.argv[3])
out = open(sys.argv[1], "a")
def emit(event, **kw):
    out.write(json.dumps({"event": event, "t": time.monotonic(), **kw}) + "\n"); out.flush()
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
preload = bytearray(pre_mb * 1024 * 1024)
for i in range(0, len(preload), 4096): preload[i] = 1
open("/proc/self/clear_refs", "w").write("5")
emit("loaded", baseline_rss_bytes=rss())
keep = []
for i in range(steps):
    chunk = bytearray(16 * 1024 * 1024)
    for j in range(0, len(chunk), 4096): chunk[j] = 1
    keep.append(chunk)
    emit("step", i=i, loss=1.0 / (i + 1), latency_s=0.01)
    time.sleep(0.03)
emit("done")
"""


def hog(tmp: Path, pre_mb: int, steps: int) -> list[str]:
    script = tmp / "hog.py"
    script.write_text(HOG)
    return [sys.executable, str(script), str(tmp / "progress.jsonl"), str(pre_mb), str(steps)]


def test_unlimited_run_samples_memory(tmp_path: Path) -> None:
    sup = supervise(hog(tmp_path, 0, 6), tmp_path / "progress.jsonl", tmp_path / "log", memory_hz=50)
    assert sup.returncode == 0 and sup.killed_for is None
    assert [e["event"] for e in sup.events] == ["loaded"] + ["step"] * 6 + ["done"]
    baseline = sup.first("loaded")["baseline_rss_bytes"]
    assert sup.hwm_after_load is not None and sup.hwm_after_load - baseline >= 5 * 16 * MIB
    rates = len(sup.rss_samples) / (sup.ended_t - sup.started_t)
    assert rates >= 20, f"sampled only {rates:.1f} Hz"


def test_process_budget_kills_and_keeps_partial_progress(tmp_path: Path) -> None:
    # Python + 40 MiB preload is well under 150 MiB; 40 steps of 16 MiB would pass it.
    budget = Budget(150 * MIB, "process")
    sup = supervise(hog(tmp_path, 40, 40), tmp_path / "progress.jsonl", tmp_path / "log", 50, budget)
    assert sup.killed_for == "budget" and sup.returncode == -signal.SIGKILL
    assert sup.kill_usage_bytes is not None and sup.kill_usage_bytes > budget.limit_bytes
    # Sampling at 50 Hz against 16 MiB steps every ~30 ms: caught within a couple of steps.
    assert sup.kill_usage_bytes < budget.limit_bytes + 4 * 16 * MIB
    steps = [e for e in sup.events if e["event"] == "step"]
    assert 1 <= len(steps) < 40 and sup.first("done") is None
    assert [e["i"] for e in steps] == list(range(len(steps)))


def test_footprint_budget_ignores_the_baseline(tmp_path: Path) -> None:
    # A 120 MiB baseline is not counted; a 64 MiB footprint budget is passed at the 4th-5th step.
    budget = Budget(64 * MIB, "footprint")
    sup = supervise(hog(tmp_path, 120, 40), tmp_path / "progress.jsonl", tmp_path / "log", 50, budget)
    assert sup.killed_for == "budget"
    steps = [e for e in sup.events if e["event"] == "step"]
    assert 3 <= len(steps) <= 8
    baseline = sup.first("loaded")["baseline_rss_bytes"]
    assert baseline > 120 * MIB and sup.kill_usage_bytes > 64 * MIB


def test_timeout(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import time; time.sleep(30)"]
    t0 = time.monotonic()
    sup = supervise(cmd, tmp_path / "p", tmp_path / "log", 50, timeout_s=0.5)
    assert sup.killed_for == "timeout" and time.monotonic() - t0 < 10


def test_external_sigkill_is_reported_as_such(tmp_path: Path) -> None:
    """Another killer (the real LMK) kills the child: the supervisor sees a SIGKILL it did not send."""
    pid_file = tmp_path / "pid"
    cmd = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                                 "time.sleep(30)"]

    def killer() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = pid_file.read_text() if pid_file.exists() else ""
            if text:
                os.kill(int(text), signal.SIGKILL)
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer)
    t.start()
    sup = supervise(cmd, tmp_path / "p", tmp_path / "log", 50, timeout_s=20)
    t.join()
    assert sup.killed_for is None and sup.returncode == -signal.SIGKILL


def test_progress_reader_skips_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"event": "step", "i": 0}\n{"event": "st')
    reader = ProgressReader(path)
    assert [e["i"] for e in reader.poll()] == [0]
    with open(path, "a") as f:
        f.write('ep", "i": 1}\n')
    assert [e["i"] for e in reader.poll()] == [1]
