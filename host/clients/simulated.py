"""The simulated testbed: in-process torch training of the very stage program the phones run.

Same initial weights, same shard, same batch order (fedblocks.device_runtime.data.batch_indices
from the job seed), same SGD semantics (torch.optim.SGD, dampening 0) and the same
running-statistic update as the device runtime, so a simulated round aggregates to the
same weights as a virtual-phone round up to float rounding.

What is NOT measured here, and is labelled so in metrics.json:
- memory: the predicted footprint (manifest estimate) is compared with the client's
  budget; a job whose prediction exceeds it ends `oom_killed` ("modelled");
- latency: host wall time per step divided by the profile's cpu_speed ("modelled");
- energy: cpu seconds x active power + wall x idle power of the profile ("modelled").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedblocks.device_runtime.bundle import BundleWriter
from fedblocks.device_runtime.data import BatchAugmenter, batch_indices, load_shard, steps_planned
from fedblocks.export.weights import load_weights
from fedblocks.host.clients.base import ClientDescription, ClientExecutor, JobOutcome, JobRequest

MIB = 1024 * 1024


@dataclass(frozen=True)
class SimulatedProfile:
    """The few phone numbers the simulated testbed models with."""

    name: str = "simulated"
    cpu_speed: float = 1.0  # relative to this host's core
    active_mw: float = 1200.0
    idle_mw: float = 300.0


class SimulatedClient(ClientExecutor):
    kind = "simulated"

    def __init__(self, client_id: int, budget_mb: float | None, profile: SimulatedProfile,
                 stage_builder: Callable[[str], Any], torch_lock: threading.Lock | None = None) -> None:
        super().__init__(client_id, budget_mb, f"sim-{client_id:03d}")
        self.profile = profile
        self.stage_builder = stage_builder
        # torch intra-op threads already use the cores; one job at a time keeps timings honest
        self.torch_lock = torch_lock or threading.Lock()

    def describe(self) -> ClientDescription:
        return ClientDescription(model="simulated (torch in the host process)", profile=self.profile.name)

    def run(self, request: JobRequest, cancel: threading.Event) -> JobOutcome:
        if request.peer is not None:  # a job that trains with a server (SmartSplit): host/split/simulated.py
            from fedblocks.host.split.simulated import run_split_job

            return run_split_job(self, request, cancel)
        t0 = time.monotonic()
        writer = BundleWriter(request.bundle_dir)
        staging = writer.open()
        metrics: dict[str, Any] = {"testbed": "simulated", "stage_id": request.stage.id,
                                   "stage_kind": request.stage.kind, "batch_size": request.batch_size,
                                   "augment": request.augment, "engine": "torch-eager (simulated)", "loss": [], "step_latency_s": [],
                                   "steps": 0, "samples_seen": 0}
        predicted = int(request.stage.memory.get("total_bytes", 0) or 0)
        metrics["memory"] = {"predicted_footprint_bytes": predicted, "footprint_bytes": None,
                             "peak_rss_bytes": None, "peak_source": "modelled",
                             "budget_bytes": None if request.budget_mb is None else int(request.budget_mb * MIB)}
        if request.budget_mb is not None and predicted > request.budget_mb * MIB:
            reason = (f"predicted footprint {predicted / MIB:.1f} MB exceeds the budget {request.budget_mb:.0f} MB "
                      "(modelled low-memory kill, simulated testbed)")
            writer.commit(request.job_id, "oom_killed", reason, metrics)
            return JobOutcome(request.bundle_dir, time.monotonic() - t0)
        with self.torch_lock:
            status, reason = self._train(request, cancel, staging, metrics, t0)
        if status == "deadline":
            writer.discard()
            return JobOutcome(None, time.monotonic() - t0, straggler=True, error=reason)
        writer.commit(request.job_id, status, reason, metrics)
        return JobOutcome(request.bundle_dir, time.monotonic() - t0)

    def _train(self, request: JobRequest, cancel: threading.Event, staging: Any, metrics: dict[str, Any],
               t0: float) -> tuple[str, str]:
        from fedblocks.export.weights import save_weights

        stage = request.stage
        cpu0 = time.process_time()
        wall0 = time.monotonic()
        data = load_shard(request.shard.path, stage)
        program = self.stage_builder(stage.id)
        # frozen tensors come from the round's global weights (the phones get them baked into
        # the artifacts), then the job's initial trainable + state tensors
        program.load_global_state(load_weights(request.artifacts["global_weights"].path), strict=True)
        program.load_global_state(load_weights(request.init_weights.path), strict=False)
        program.train()
        trainable = {n: p for n, p in program.named_parameters() if p.requires_grad}
        params = [trainable[t.name] for t in stage.trainable]
        opt = request.optimizer
        sgd = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
        n = len(data[stage.inputs[0].name])
        metrics["num_samples"] = n
        metrics["steps_planned"] = steps_planned(n, stage.batch_size, request.epochs, request.max_steps)
        input_names = [t.name for t in stage.inputs]
        augment = BatchAugmenter(request.augment, request.seed)
        for i, idx in enumerate(batch_indices(n, stage.batch_size, request.seed, request.epochs, request.max_steps)):
            if cancel.is_set():
                return "deadline", "cancelled by the round loop"
            if request.deadline_s is not None and time.monotonic() - t0 > request.deadline_s:
                return "deadline", f"missed the round deadline of {request.deadline_s:.0f} s at step {i}"
            ts = time.monotonic()
            batch = augment({name: data[name][idx] for name in input_names})
            inputs = [torch.from_numpy(np.ascontiguousarray(batch[name])) for name in input_names]
            sgd.zero_grad(set_to_none=True)
            outputs = program(*inputs)
            loss = outputs[0]
            loss.backward()
            sgd.step()
            program.apply_state_updates(tuple(o.detach() for o in outputs))
            value = float(loss.detach())
            metrics["loss"].append(value if np.isfinite(value) else None)
            metrics["step_latency_s"].append((time.monotonic() - ts) / self.profile.cpu_speed)
            metrics["steps"] = i + 1
            metrics["samples_seen"] = (i + 1) * stage.batch_size
            if not np.isfinite(value):
                return "failed", f"non-finite loss ({value}) at step {i}"
        state = program.global_state()
        updated = {t.name: state[t.name].detach().numpy().astype(np.float32, copy=True) for t in stage.trainable}
        updated.update({s.name: state[s.name].detach().numpy().astype(np.float32, copy=True) for s in stage.state})
        save_weights(staging / "weights.npz", updated)
        cpu_s = (time.process_time() - cpu0) / self.profile.cpu_speed
        wall_s = (time.monotonic() - wall0) / self.profile.cpu_speed
        lat = metrics["step_latency_s"]
        metrics["step_latency_median_s"] = float(np.median(lat)) if lat else None
        metrics["latency_source"] = "modelled"
        metrics["train_s"] = wall_s
        metrics["cpu_s"] = cpu_s
        joules = cpu_s * self.profile.active_mw / 1000 + wall_s * self.profile.idle_mw / 1000
        metrics["energy"] = {"source": "modelled", "joules": joules, "window_s": wall_s,
                             "power_profile": {"name": self.profile.name, "cpu_active_mw": self.profile.active_mw,
                                               "idle_mw": self.profile.idle_mw},
                             "note": "host CPU time scaled by the profile's cpu_speed x profile power"}
        return "ok", ""
