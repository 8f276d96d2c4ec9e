"""A split job on the simulated testbed: the device runtime's own split loop, in the host process.

The simulated client runs the phone's side exactly as engines/split.py's torch front
does (single forward, z.backward(g), torch.optim.SGD, torch.utils.checkpoint for the
units the on-device manager switches on) and talks to the round's edge server over
loopback TCP with the same framing and conversation (split_job.converse). What is
modelled, as on the simulated testbed generally: memory (the manager decides from the
prediction; a rung whose prediction plus the parameters exceeds the budget ends
oom_killed, "modelled"), latency (host time / the profile's cpu_speed) and energy.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np

from fedblocks.device_runtime.bundle import BundleWriter
from fedblocks.device_runtime.data import batch_indices, load_shard, steps_planned
from fedblocks.device_runtime.engines.split import TorchSplitFront
from fedblocks.device_runtime.spec import TensorSpec
from fedblocks.device_runtime.split_config import SplitConfigError, parse_split_config
from fedblocks.device_runtime.split_job import SplitFailed, StepRecord, converse
from fedblocks.device_runtime.split_manager import RecomputeManager
from fedblocks.host.clients.base import JobOutcome, JobRequest

MIB = 1024 * 1024


def run_split_job(client: Any, request: JobRequest, cancel: threading.Event) -> JobOutcome:
    """SimulatedClient.run for a job with a peer (module doc)."""
    import dataclasses

    from fedblocks.export.weights import load_weights, save_weights

    t0 = time.monotonic()
    writer = BundleWriter(request.bundle_dir)
    staging = writer.open()
    stage = request.stage
    profile = client.profile
    metrics: dict[str, Any] = {"testbed": "simulated", "stage_id": stage.id, "stage_kind": stage.kind,
                               "batch_size": request.batch_size, "engine": "torch-eager (simulated)", "loss": [],
                               "step_latency_s": [], "steps": 0, "samples_seen": 0, "split": None}
    peer = request.peer
    assert peer is not None
    try:
        split = parse_split_config(dict(peer.job_fields(peer.host, peer.port)).get("split"), stage)
    except SplitConfigError as exc:
        writer.commit(request.job_id, "failed", str(exc), metrics)
        return JobOutcome(request.bundle_dir, time.monotonic() - t0)
    params = int(stage.memory.get("params_bytes", 0) or 0)
    budget = None if request.budget_mb is None else int(request.budget_mb * MIB)
    # the prediction counts training memory above the parameters, like the phone's footprint budget
    manager = RecomputeManager(split.ladder, split.footprint_bytes,
                               None if budget is None else budget - params, "footprint",
                               split.approach_fraction, supported=True)
    if split.recompute == "all":
        manager.rung = len(split.ladder)
    elif split.recompute == "auto":
        manager.initial()
    units = manager.units
    predicted = (manager.predicted(manager.rung) or 0) + params
    metrics["memory"] = {"predicted_footprint_bytes": predicted, "footprint_bytes": None, "peak_rss_bytes": None,
                         "peak_source": "modelled", "budget_bytes": budget}
    if budget is not None and predicted > budget:
        reason = (f"predicted footprint {predicted / MIB:.1f} MB (recompute {list(units) or 'off'}) exceeds the "
                  f"budget {request.budget_mb:.0f} MB (modelled low-memory kill, simulated testbed)")
        writer.commit(request.job_id, "oom_killed", reason, metrics)
        return JobOutcome(request.bundle_dir, time.monotonic() - t0)

    with client.torch_lock:
        cpu0, wall0 = time.process_time(), time.monotonic()
        b = stage.batch_size
        data = load_shard(request.shard.path, dataclasses.replace(
            stage, inputs=(stage.inputs[0], TensorSpec("y", (b,), "int64"))))
        program = client.stage_builder(stage.id)
        program.load_global_state(load_weights(request.artifacts["global_weights"].path), strict=True)
        program.train()
        front = TorchSplitFront(stage, {}, request.optimizer, module=program)
        front.set_weights(load_weights(request.init_weights.path))
        front.set_recompute(units)
        n = len(data["y"])
        planned = steps_planned(n, b, request.epochs, request.max_steps)
        metrics.update(num_samples=n, steps_planned=planned)

        def on_step(t: StepRecord) -> None:
            if cancel.is_set():
                raise SplitFailed("cancelled by the round loop")
            metrics["loss"].append(t.loss if math.isfinite(t.loss) else None)
            metrics["step_latency_s"].append(t.latency_s / profile.cpu_speed)
            metrics["steps"] = t.i + 1
            metrics["samples_seen"] = (t.i + 1) * b

        batches = ((i, data["x"][idx], data["y"][idx])
                   for i, idx in enumerate(batch_indices(n, b, request.seed, request.epochs, request.max_steps)))
        summary: dict[str, Any] = {}
        status, reason = "ok", ""
        try:
            converse(front, split, request.job_id, "torch", b, planned, batches, on_step, None, summary)
        except SplitFailed as exc:
            status, reason = "failed", str(exc)
        finally:
            front.set_recompute(())  # the program is reused by later jobs: restore its own forwards
        summary["recompute"] = {**manager.summary(), "policy": split.recompute, "final_units": list(units),
                                "modelled": True}
        metrics["split"] = summary
        if status == "ok":
            updated = {k: np.asarray(v, dtype=np.float32) for k, v in front.get_weights().items()}
            save_weights(staging / "weights.npz", updated)
        cpu_s = (time.process_time() - cpu0) / profile.cpu_speed
        wall_s = (time.monotonic() - wall0) / profile.cpu_speed
    lat = metrics["step_latency_s"]
    metrics.update(step_latency_median_s=float(np.median(lat)) if lat else None, latency_source="modelled",
                   train_s=wall_s, cpu_s=cpu_s)
    joules = cpu_s * profile.active_mw / 1000 + wall_s * profile.idle_mw / 1000
    metrics["energy"] = {"source": "modelled", "joules": joules, "window_s": wall_s,
                         "power_profile": {"name": profile.name, "cpu_active_mw": profile.active_mw,
                                           "idle_mw": profile.idle_mw},
                         "note": "host CPU time scaled by the profile's cpu_speed x profile power"}
    if status == "failed" and reason.endswith("cancelled by the round loop"):
        writer.discard()
        return JobOutcome(None, time.monotonic() - t0, straggler=True, error=reason)
    writer.commit(request.job_id, status, reason, metrics)
    return JobOutcome(request.bundle_dir, time.monotonic() - t0)
