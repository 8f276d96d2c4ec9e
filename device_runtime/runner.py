"""`run JOB.json`: validate the job, train in a supervised child, write the result bundle.

Exit codes: 0 = bundle with status ok; 1 = bundle with status failed or oom_killed;
4 = no bundle could be written at all (one line on stderr says why).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import traceback
import zipimport
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

from . import meters
from .bundle import BundleError, BundleWriter
from .job import Job, JobError, job_id_of, output_dir_of, parse_job, read_job_json
from .supervisor import MIB, Budget, Supervision, supervise

EXIT_OK, EXIT_NOT_OK, EXIT_NO_BUNDLE = 0, 1, 4
TIMELINE_POINTS = 1000
LOG_TAIL_BYTES = 64 * 1024


def child_command(plan: Path, staging: Path) -> list[str]:
    """The same runtime, as a child: the .pyz it was started from, or the installed package."""
    loader = globals().get("__loader__")
    if isinstance(loader, zipimport.zipimporter):
        return [sys.executable, loader.archive, "_train", str(plan), str(staging)]
    return [sys.executable, "-m", "fedblocks.device_runtime", "_train", str(plan), str(staging)]


def child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "FEDBLOCKS_THREADS"):
            env[var] = str(threads)
    return env


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "machine": platform.machine(), "system": platform.system(), "kernel": platform.release(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
        "mem_total_bytes": None, "cpu_model": None, "android_model": None, "android_sdk": None,
    }
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_bytes"] = int(line.split()[1]) * 1024
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":")[0].strip()
            if key in ("Hardware", "model name") and ":" in line:
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except (OSError, ValueError):
        pass
    if shutil.which("getprop"):  # Android (adb shell, Termux)
        for key, prop in (("android_model", "ro.product.model"), ("android_sdk", "ro.build.version.sdk")):
            try:
                out = subprocess.run(["getprop", prop], capture_output=True, text=True, timeout=3)
                info[key] = out.stdout.strip() or None
            except (OSError, subprocess.SubprocessError):
                pass
    return info


def empty_metrics() -> dict[str, Any]:
    """Every key metrics.json has; values stay null where a run did not get that far."""
    return {
        "engine": None, "engine_version": None, "stage_id": None, "stage_kind": None, "batch_size": None,
        "threads": None, "augment": None, "num_samples": None, "steps": 0, "steps_planned": None, "samples_seen": 0,
        "epochs_completed": 0.0, "loss": [], "step_latency_s": [], "step_cpu_s": [], "step_latency_median_s": None,
        "data_load_s": None, "model_load_s": None, "train_s": None, "wall_s": None, "cpu_s": None,
        "memory": {"baseline_rss_bytes": None, "peak_rss_bytes": None, "footprint_bytes": None,
                   "baseline_anon_bytes": None, "peak_anon_bytes": None, "footprint_anon_bytes": None,
                   "predicted_footprint_bytes": None, "predicted_total_bytes": None, "peak_source": None, "peak_reset": None,
                   "sample_hz": None, "achieved_hz": None, "samples": 0, "budget_bytes": None,
                   "budget_applies_to": None, "kill_usage_bytes": None, "timeline": []},
        "energy": None, "energy_modelled": None,
        "battery": {"start": None, "end": None}, "thermal_c": {"start": None, "end": None},
        "cpu_freq_khz": {"start": None, "end": None, "mean": None},
        "device": device_info(),
        "split": None,  # SmartSplit jobs: cut, wire bytes, per-phase seconds, recompute decisions
    }


def _engine_memory(memory: dict[str, Any], engine: str | None) -> dict[str, Any] | None:
    """The manifest's own prediction for this engine (memory.engines.<engine>), if it has a valid one."""
    entry = (memory.get("engines") or {}).get(engine) if isinstance(memory.get("engines"), dict) else None
    keys = ("footprint_bytes", "momentum_bytes", "total_bytes")
    if isinstance(entry, dict) and all(isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool)
                                       for k in keys):
        return entry
    return None


def predicted_footprint(memory: dict[str, Any], momentum: float, engine: str | None = None) -> int | None:
    """What peak - baseline should be by the manifest.

    The engine's own prediction when the manifest has one (memory.engines.<engine>:
    footprint_bytes, plus momentum_bytes for a job with momentum); otherwise the
    engine-agnostic grads + optimizer state + activations. Parameters are excluded: they
    are resident before the baseline is taken (after load). The manifest counts SGD
    without momentum; a job with momentum adds one buffer per trainable tensor.
    """
    entry = _engine_memory(memory, engine)
    if entry is not None:
        return entry["footprint_bytes"] + (entry["momentum_bytes"] if momentum > 0 else 0)
    parts = [memory.get(k) for k in ("grads_bytes", "optimizer_bytes", "activations_bytes")]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in parts):
        return None
    grads, optimizer, activations = parts
    if optimizer == 0 and momentum > 0:
        optimizer = grads
    return grads + optimizer + activations


def run_job(job_path: Path) -> int:
    """Run one job file end to end; returns the process exit code."""
    job_path = Path(job_path).absolute()
    job_dir = job_path.parent
    raw: Any = None
    early_error: str | None = None
    try:
        raw = read_job_json(job_path)
    except JobError as exc:
        early_error = str(exc)
    writer = BundleWriter(output_dir_of(raw, job_dir))
    job_id = job_id_of(raw)
    try:
        writer.open()
    except BundleError as exc:
        print(f"fedblocks-runtime: error: {exc}", file=sys.stderr)
        return EXIT_NO_BUNDLE
    try:
        metrics = empty_metrics()
        status, reason = "failed", early_error or ""
        if early_error is None:
            try:
                job = parse_job(raw, job_dir)
                job.verify_files()
            except JobError as exc:
                reason = str(exc)
            else:
                try:
                    status, reason = _train_supervised(job, writer.staging, metrics)
                except Exception as exc:  # a runtime bug must still end in a bundle, not a traceback alone
                    traceback.print_exc(file=sys.stderr)
                    status, reason = "failed", f"runtime internal error: {type(exc).__name__}: {exc}"[:500]
        final = writer.commit(job_id, status, reason, metrics)
    except BundleError as exc:
        writer.discard()
        print(f"fedblocks-runtime: error: {exc}", file=sys.stderr)
        return EXIT_NO_BUNDLE
    except BaseException:
        writer.discard()  # never leave a half-written staging directory behind
        raise
    print(json.dumps({"job_id": job_id, "status": status, "bundle": str(final)}))
    if status != "ok":
        print(f"fedblocks-runtime: {status}: {reason}", file=sys.stderr)
    return EXIT_OK if status == "ok" else EXIT_NOT_OK


def _train_supervised(job: Job, staging: Path, metrics: dict[str, Any]) -> tuple[str, str]:
    stage, root = job.stage, job.meters.sysfs_root
    metrics.update(engine=job.engine, stage_id=stage.id, stage_kind=stage.kind, batch_size=stage.batch_size,
                   threads=job.training.threads, augment=job.training.augment)
    mem = metrics["memory"]
    total = stage.memory.get("total_bytes")
    engine_memory = _engine_memory(stage.memory, job.engine)
    if engine_memory is not None:
        total = engine_memory["total_bytes"] + (engine_memory["momentum_bytes"] if job.training.optimizer.momentum else 0)
    mem.update(sample_hz=job.meters.memory_hz, budget_applies_to=job.budget_applies_to,
               predicted_footprint_bytes=predicted_footprint(stage.memory, job.training.optimizer.momentum, job.engine),
               predicted_total_bytes=total if isinstance(total, int) else None,
               budget_bytes=None if job.budget_mb is None else int(job.budget_mb * MIB))

    plan = staging / "plan.json"
    plan.write_text(json.dumps(job.to_dict()), encoding="utf-8")
    meter = meters.pick_energy_meter(root, job.meters.energy_source, job.meters.current_unit,
                                     job.meters.voltage_unit)
    sampler = meters.SysfsSampler(root, meter, job.meters.energy_hz)
    metrics["battery"]["start"] = meters.battery_snapshot(root)
    metrics["thermal_c"]["start"] = meters.thermal_snapshot(root)
    metrics["cpu_freq_khz"]["start"] = {k: v["cur_khz"] for k, v in meters.cpufreq_snapshot(root).items()}
    budget = None if job.budget_mb is None else Budget(int(job.budget_mb * MIB), job.budget_applies_to)
    sampler.start()
    try:
        sup = supervise(child_command(plan, staging), staging / "progress.jsonl", staging / "runtime.log",
                        job.meters.memory_hz, budget, job.timeout_s, child_env(job.training.threads))
    finally:
        sampler.stop()
    metrics["battery"]["end"] = meters.battery_snapshot(root)
    metrics["thermal_c"]["end"] = meters.thermal_snapshot(root)
    metrics["cpu_freq_khz"]["end"] = {k: v["cur_khz"] for k, v in meters.cpufreq_snapshot(root).items()}
    _fill_metrics(job, sup, sampler, meter, metrics)
    _trim_log(staging / "runtime.log")
    return _status_of(job, sup, staging)


def _fill_metrics(job: Job, sup: Supervision, sampler: meters.SysfsSampler,
                  meter: meters.FuelGauge | meters.Odpm | None, metrics: dict[str, Any]) -> None:
    loaded, trained = sup.first("loaded"), sup.first("trained")
    steps = [e for e in sup.events if e["event"] == "step"]
    latencies = [float(e["latency_s"]) for e in steps]
    metrics.update(
        steps=len(steps), samples_seen=len(steps) * job.stage.batch_size,
        loss=[e.get("loss") for e in steps], step_latency_s=latencies,
        step_cpu_s=[e.get("cpu_s") for e in steps],
        step_latency_median_s=median(latencies[1:] if len(latencies) > 1 else latencies) if latencies else None,
        wall_s=sup.ended_t - sup.started_t,
    )
    split = sup.last("split")
    if split is not None:
        metrics["split"] = {k: v for k, v in split.items() if k not in ("event", "t")}
    if loaded is None:
        return
    num_samples = int(loaded.get("num_samples") or 0)
    per_epoch = num_samples // job.stage.batch_size if num_samples else 0
    metrics.update(engine_version=loaded.get("engine_version"), num_samples=num_samples,
                   steps_planned=loaded.get("steps_planned"), data_load_s=loaded.get("data_load_s"),
                   model_load_s=loaded.get("model_load_s"),
                   epochs_completed=round(len(steps) / per_epoch, 4) if per_epoch else 0.0)
    start = float(loaded["t"])
    end = float(trained["t"]) if trained else (float(steps[-1]["t"]) if steps and not sup.killed_for
                                               else sup.ended_t)
    metrics["train_s"] = end - start

    # Memory: baseline after load (VmHWM reset there); peak over the training window.
    mem = metrics["memory"]
    baseline = loaded.get("baseline_rss_bytes")
    peak_reset = bool(loaded.get("peak_reset"))
    in_window = [rss for t, rss in sup.rss_samples if start <= t <= end]
    candidates = list(in_window)
    peak_source = "sampled"
    if peak_reset:
        hwm = trained.get("hwm_bytes") if trained else sup.hwm_after_load
        if hwm:
            candidates.append(int(hwm))
            peak_source = "vmhwm"
    peak = max(candidates) if candidates else None
    # Anonymous memory only (sampled; no kernel peak counter): excludes code pages of the engine's
    # libraries that the first step faults in, which VmRSS counts and the prediction does not.
    anon_base = loaded.get("baseline_anon_bytes")
    anon_window = [a for t, a in sup.anon_samples if start <= t <= end]
    anon_peak = max(anon_window) if anon_window else None
    mem.update(baseline_anon_bytes=anon_base, peak_anon_bytes=anon_peak,
               footprint_anon_bytes=(anon_peak - anon_base) if anon_peak is not None and anon_base is not None
               else None)
    mem.update(baseline_rss_bytes=baseline, peak_rss_bytes=peak, peak_source=peak_source, peak_reset=peak_reset,
               footprint_bytes=(peak - baseline) if peak is not None and baseline is not None else None,
               samples=len(sup.rss_samples), kill_usage_bytes=sup.kill_usage_bytes,
               achieved_hz=_rate([t for t, _ in sup.rss_samples]),
               timeline=_timeline(sup.rss_samples, sup.started_t))

    # CPU time of the training window (child's own numbers; the last /proc sample if it was killed).
    cpu_end = trained.get("cpu_s") if trained else sup.cpu_s_last
    cpu_s = (cpu_end - loaded["cpu_s"]) if cpu_end is not None and loaded.get("cpu_s") is not None else None
    metrics["cpu_s"] = cpu_s
    modelled = meters.modelled_energy(cpu_s, end - start, job.meters.power_profile).to_dict()
    metrics["energy_modelled"] = modelled
    metrics["energy"] = meter.energy(start, end).to_dict() if meter is not None else modelled
    metrics["cpu_freq_khz"]["mean"] = sampler.mean_freq_khz(start, end) or None


def _status_of(job: Job, sup: Supervision, staging: Path) -> tuple[str, str]:
    steps_done = sum(1 for e in sup.events if e["event"] == "step")
    if sup.killed_for == "budget":
        used = (sup.kill_usage_bytes or 0) / MIB
        what = "process RSS" if job.budget_applies_to == "process" else "training footprint above baseline"
        return "oom_killed", (f"{what} reached {used:.1f} MiB, over the budget of {job.budget_mb:g} MiB; "
                              f"killed with SIGKILL after {steps_done} steps")
    if sup.killed_for == "timeout":
        return "failed", f"timed out after {job.timeout_s:g} s (timeout_s) at step {steps_done}"
    failed = sup.last("failed")
    if failed is not None:
        return "failed", str(failed.get("reason") or "training failed")
    rc = sup.returncode
    if rc == -signal.SIGKILL:
        return "oom_killed", (f"training process killed by SIGKILL from outside the runtime after {steps_done} "
                              "steps (most likely the system's low-memory killer)")
    if rc < 0:
        return "failed", f"training process died of signal {signal.Signals(-rc).name} after {steps_done} steps"
    if rc != 0 or sup.first("done") is None or not (staging / "weights.npz").is_file():
        tail = _last_log_line(staging / "runtime.log")
        return "failed", f"training process exited with code {rc} without finishing" + (f": {tail}" if tail else "")
    return "ok", ""


def _rate(ts: list[float]) -> float | None:
    return round((len(ts) - 1) / (ts[-1] - ts[0]), 2) if len(ts) > 1 and ts[-1] > ts[0] else None


def _timeline(samples: list[tuple[float, int]], t0: float) -> list[list[float]]:
    """At most TIMELINE_POINTS (seconds since start, RSS bytes) pairs; each bucket keeps its maximum."""
    if not samples:
        return []
    stride = max(1, -(-len(samples) // TIMELINE_POINTS))
    out = []
    for i in range(0, len(samples), stride):
        bucket = samples[i:i + stride]
        t, rss = max(bucket, key=lambda s: s[1])
        out.append([round(t - t0, 4), rss])
    return out


def _trim_log(path: Path) -> None:
    try:
        size = path.stat().st_size
        if size > LOG_TAIL_BYTES:
            with open(path, "rb") as f:
                f.seek(size - LOG_TAIL_BYTES)
                tail = f.read()
            path.write_bytes(b"[... log truncated ...]\n" + tail)
    except OSError:
        pass


def _last_log_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""

