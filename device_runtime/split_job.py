"""A SmartSplit job on the phone, batch by batch (the training child runs it for a job with `split`).

Per step i (batch order as for every job: data.batch_indices):
  1. forward to the cut (engines/split.py) -> z;
  2. send ACTIVATION(i, z) and LABELS(i, y) to the edge server (framing.py);
  3. receive GRADIENT(i, dL/dz) and LOSS(i) (the server's cross-entropy: the step's loss);
  4. backward from g, SGD step, running statistics.
Then DONE -> ACK: the server counts the phone's round only after ACK, and the phone
writes its weights only after ACK, so a job that drops anywhere leaves nothing half-done
on either side. The on-device manager (split_manager.py) may switch recompute on before
and between steps; its decisions and the wire counters go into metrics.json `split`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import framing, procfs
from .data import batch_indices, load_shard, steps_planned
from .engines.base import PINNED_MMAP_THRESHOLD, pin_mmap_threshold, trim_heap
from .engines.split import SplitFront, load_split_front
from .job import Job
from .spec import TensorSpec
from .split_config import SplitConfig
from .split_manager import RecomputeManager
from .trainer import TrainingFailed, engine_version
from .weights import WeightsError, load_weights, save_weights, validate_weights


class SplitFailed(TrainingFailed):
    """The split conversation failed (server unreachable, refused, bad frame, dropped)."""


@dataclass(frozen=True)
class StepRecord:
    i: int
    loss: float  # the server's loss for the batch
    latency_s: float  # forward + send + wait + backward
    cpu_s: float
    t_start: float
    forward_s: float
    wait_s: float  # from the last byte of z sent to the last byte of g received
    backward_s: float


def converse(front: SplitFront, split: SplitConfig, job_id: str, engine: str, batch_size: int, planned: int,
             batches: Iterable[tuple[int, np.ndarray, np.ndarray]], on_step: Callable[[StepRecord], None],
             before_step: Callable[[], None] | None = None, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """The phone's side of the conversation (framing.py) over `batches` of (step, x, y).

    Fills and returns `summary`: cut, server, steps, wire bytes/frames, per-phase seconds.
    SplitFailed for anything that goes wrong on the wire; exceptions of on_step propagate.
    """
    summary = {} if summary is None else summary
    summary.update(cut=split.cut, server=f"{split.host}:{split.port}", engine=engine,
                   torch_conv=front.conv, activation_shape=list(split.activation_shape),
                   forward_passes_per_step=front.forward_passes, steps=0)
    phase = {"forward_s": 0.0, "wait_s": 0.0, "backward_s": 0.0}
    wire = None
    try:
        try:
            wire = framing.FrameSocket.connect(split.host, split.port, split.connect_timeout_s, split.io_timeout_s,
                                               split.max_frame_bytes)
        except OSError as exc:
            raise SplitFailed(f"cannot reach the split server at {split.host}:{split.port} ({exc})") from None
        wire.send_json(framing.MSG_HELLO, 0, {"job_id": job_id, "token": split.token, "cut": split.cut,
                                              "batch_size": batch_size, "steps": planned, "engine": engine,
                                              "activation_shape": list(split.activation_shape)})
        wire.recv(framing.MSG_WELCOME)
        for i, x, y in batches:
            if before_step is not None:
                before_step()
            c_start, t_start = time.process_time(), time.monotonic()
            z = front.forward(x)
            t_fwd = time.monotonic()
            wire.send_array(framing.MSG_ACTIVATION, i, z)
            wire.send_array(framing.MSG_LABELS, i, np.asarray(y, dtype=np.int64))
            del z  # on the wire: the front frees it before g arrives (activation_sent)
            front.activation_sent()
            g = wire.recv(framing.MSG_GRADIENT, step=i, shape=split.activation_shape).array
            loss_frame = wire.recv(framing.MSG_LOSS, step=i)
            t_recv = time.monotonic()
            front.backward_step(g)  # type: ignore[arg-type]
            del g
            t_end, c_end = time.monotonic(), time.process_time()
            phase["forward_s"] += t_fwd - t_start
            phase["wait_s"] += t_recv - t_fwd
            phase["backward_s"] += t_end - t_recv
            summary["steps"] = i + 1
            on_step(StepRecord(i, float(loss_frame.array), t_end - t_start, c_end - c_start,  # type: ignore[arg-type]
                               t_start, t_fwd - t_start, t_recv - t_fwd, t_end - t_recv))
        summary["activations_freed"] = front.activations_freed
        wire.send_json(framing.MSG_DONE, summary["steps"], {"steps": summary["steps"]})
        wire.recv(framing.MSG_ACK)
    except (framing.FrameError, framing.PeerClosed) as exc:
        raise SplitFailed(f"split conversation with {split.host}:{split.port} failed: {exc}") from None
    finally:
        if wire is not None:
            summary.update(bytes_sent=wire.bytes_sent, bytes_received=wire.bytes_received,
                           frames_sent=wire.frames_sent, frames_received=wire.frames_received)
            wire.close()
        summary["phase_s"] = {k: round(v, 6) for k, v in phase.items()}
    return summary


def _initial_units(job: Job, manager: RecomputeManager) -> tuple[str, ...]:
    policy = job.split.recompute  # type: ignore[union-attr]
    if isinstance(policy, tuple):
        return policy
    if policy == "all":
        return tuple(u for r in job.split.ladder for u in r.units)  # type: ignore[union-attr]
    if policy == "auto":
        manager.initial()
        return manager.units
    return ()


def train_split(job: Job, staging: Path, progress: Any) -> None:
    split = job.split
    assert split is not None
    stage = job.stage
    b = stage.batch_size
    t0 = time.monotonic()
    # the shard holds x and the labels y (the labels go to the server; g comes from it)
    shard_spec = dataclasses.replace(stage, inputs=(stage.inputs[0], TensorSpec("y", (b,), "int64")))
    data = load_shard(job.data.path, shard_spec)
    weights = load_weights(job.init_weights.path, stage)
    num_samples = len(data["y"])
    data_load_s = time.monotonic() - t0

    t0 = time.monotonic()
    front = load_split_front(job.engine, stage, {role: str(ref.path) for role, ref in job.artifacts.items()},
                             job.training.optimizer, torch_conv=split.torch_conv)
    front.set_weights(weights)
    model_load_s = time.monotonic() - t0
    del weights

    trim_heap()  # as in trainer.train: freed load-time memory must not absorb the first allocations
    peak_reset = procfs.reset_peak("self")
    mem = procfs.read_memory("self")
    baseline = mem.rss_bytes if mem else 0
    planned = steps_planned(num_samples, b, job.training.epochs, job.training.max_steps)
    manager = RecomputeManager(ladder=split.ladder, predicted_footprint_bytes=split.footprint_bytes,
                               budget_bytes=None if job.budget_mb is None else int(job.budget_mb * 1024 * 1024),
                               budget_applies_to=job.budget_applies_to, approach_fraction=split.approach_fraction,
                               supported=front.supports_recompute, baseline_bytes=baseline)
    allocator: dict[str, Any] = {"mmap_threshold_pinned": False}

    def switch_recompute(units: tuple[str, ...]) -> None:
        if units and not allocator["mmap_threshold_pinned"]:
            allocator["mmap_threshold_pinned"] = pin_mmap_threshold()
        front.set_recompute(units)

    units = _initial_units(job, manager)
    if units and front.supports_recompute:
        switch_recompute(units)
    progress.emit("loaded", data_load_s=data_load_s, model_load_s=model_load_s,
                  baseline_rss_bytes=mem.rss_bytes if mem else None,
                  baseline_anon_bytes=mem.anon_bytes if mem else None, peak_reset=peak_reset,
                  cpu_s=procfs.cpu_seconds("self"), engine_version=engine_version(job.engine),
                  num_samples=num_samples, steps_planned=planned)

    peaks: list[int] = []

    def before_step() -> None:
        procfs.reset_peak("self")

    def on_step(t: StepRecord) -> None:
        m = procfs.read_memory("self")
        step_hwm = m.hwm_bytes if m else None
        peaks.append(step_hwm or 0)
        progress.emit("step", i=t.i, loss=t.loss if math.isfinite(t.loss) else None, latency_s=t.latency_s,
                      cpu_s=t.cpu_s, t_start=t.t_start, wait_s=t.wait_s, hwm_bytes=step_hwm,
                      recompute=list(front.recompute))
        if not math.isfinite(t.loss):
            raise TrainingFailed(f"non-finite loss ({t.loss}) at step {t.i}; training stopped")
        if split.recompute == "auto" and manager.after_step(t.i, step_hwm) and front.supports_recompute:
            switch_recompute(manager.units)

    batches = ((i, data["x"][idx], data["y"][idx]) for i, idx in enumerate(
        batch_indices(num_samples, b, job.training.seed, job.training.epochs, job.training.max_steps)))
    summary: dict[str, Any] = {}
    try:
        converse(front, split, job.job_id, job.engine, b, planned, batches, on_step, before_step, summary)
    finally:
        summary["recompute"] = {**manager.summary(), "policy": split.recompute if isinstance(split.recompute, str)
                                else list(split.recompute), "final_units": list(front.recompute),
                                "allocator": {**allocator, "threshold_bytes": PINNED_MMAP_THRESHOLD
                                              if allocator["mmap_threshold_pinned"] else None}}
        progress.emit("split", **summary)
    hwm_max = max(peaks, default=0)

    mem = procfs.read_memory("self")
    hwm_max = max(hwm_max, mem.hwm_bytes if mem else 0)
    progress.emit("trained", steps=summary["steps"], hwm_bytes=hwm_max or None,
                  rss_bytes=mem.rss_bytes if mem else None, cpu_s=procfs.cpu_seconds("self"))
    updated = {name: np.asarray(arr) for name, arr in front.get_weights().items()}
    try:
        validate_weights(updated, stage, "updated weights")
    except WeightsError as exc:
        raise TrainingFailed(f"engine '{job.engine}' returned bad weights: {exc}") from exc
    save_weights(staging / "weights.npz", updated)
    front.close()
    progress.emit("done")


__all__ = ["SplitFailed", "StepRecord", "converse", "train_split"]
