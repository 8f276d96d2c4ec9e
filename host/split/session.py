"""One SmartSplit round on the server side (a RoundSession) and the edge manager across rounds.

`SplitRound` starts the round's EdgeServer, opens one server session per job the loop
starts (a private split_back copy holding the round's global weights) and hands each
job its `split` job.json section; at the end it returns the server-side tensors of the
clients whose phone AND server side both completed.

`EdgeManager` turns what a round measured into the next round's cut plan (it feeds
the CentralManager, host/split/central.py):
- an out-of-memory kill at cut c caps that client at the cut before c;
- a phone's measured training footprint above the prediction raises that cut's
  calibration (every client's planning at that cut uses it);
- a phone's measured front compute (metrics.json split.phase_s) gives its FLOP/s;
- when the server was the bottleneck (server seconds per step above the phones'
  front seconds per step, summed over the round's sessions), the depth weight of the
  next plan grows (`depth_bias`), moving work back to the phones; it decays when not.
Every change is reported as an event (after_round) and checkpointed with the strategy.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedblocks.device_runtime.spec import OptimizerConfig
from fedblocks.host.peer import PeerEndpoint, RoundSession, SessionResult
from fedblocks.host.split.central import CentralManager
from fedblocks.host.split.edge import EdgeServer, server_program, session_tensors

if TYPE_CHECKING:
    from fedblocks.host.strategies.base import RoundPlan

MIB = 1024 * 1024


@dataclass(frozen=True)
class SplitSettings:
    recompute: str = "auto"  # auto | off | all (what the job's on-device manager does)
    approach_fraction: float = 0.85
    max_parallel: int = 2
    via: str = "direct"  # direct | reverse
    bind_host: str = "127.0.0.1"
    io_timeout_s: float = 300.0
    torch_conv: str = "auto"  # auto | onednn | native (torch_conv_for)


# Below this many FLOPs per training step a front's compute is tens of milliseconds, noise
# next to its transfers and the server's step: there memory is what counts, and torch's
# native convolutions skip oneDNN's layout reorders of the cut activation and its gradient
# (2 x z). Measured at ResNet-18 cut 1.stem.conv (0.23 GFLOP): 28.7 -> 16.8 MB, and no
# slower; at cut 3 (81 GFLOP) native was 39 % slower (docs/smartsplit.md).
NATIVE_CONV_MAX_TRAIN_FLOPS = 1e9


def torch_conv_for(setting: str, description: Mapping[str, Any]) -> str:
    """The convolution kernels a torch front uses at a cut: `setting`, with "auto" resolved by
    the cut's training FLOPs per step."""
    if setting != "auto":
        return setting
    return "native" if float(description["device"]["train_flops"]) < NATIVE_CONV_MAX_TRAIN_FLOPS else "onednn"


def device_view(description: Mapping[str, Any], momentum: bool) -> tuple[int, list[dict[str, Any]]]:
    """(footprint, recompute ladder) in the device runtime's terms: training memory above the
    post-load baseline (parameters are resident before it), plus one momentum buffer."""
    device = description["device"]
    shift = -int(device["params_bytes"]) + (int(device["grads_bytes"]) if momentum else 0)
    ladder = [{"units": list(r["units"]), "footprint_bytes": max(0, int(r["footprint_bytes"]) + shift)}
              for r in device.get("recompute_ladder", [])]
    return max(0, int(device["footprint_bytes"]) + shift), ladder


class SplitRound(RoundSession):
    def __init__(self, rnd: int, plan: RoundPlan, weights: Mapping[str, np.ndarray], cuts: Mapping[str, Any],
                 templates: Mapping[str, Any], num_classes: int, batch_size: int, settings: SplitSettings,
                 momentum: bool, on_finish: Callable[[Mapping[int, str], Mapping[int, Mapping[str, Any]],
                                                      Mapping[int, Mapping[str, Any]]], None] | None = None) -> None:
        self.rnd = rnd
        self.plan = plan
        self.weights = weights
        self.cuts = cuts  # cut -> description (export/split.py to_dict)
        self.templates = templates  # cut -> split_back template program
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.settings = settings
        self.momentum = momentum
        self.on_finish = on_finish  # (job statuses, job metrics, server session metrics): the edge manager
        self.server = EdgeServer(settings.bind_host, 0, settings.max_parallel, settings.io_timeout_s).start()

    def cut_of(self, client_id: int) -> str:
        return self.plan.stage_of(client_id).split("-", 1)[1]

    def endpoint(self, client_id: int, job_id: str, steps: int) -> PeerEndpoint:
        cut = self.cut_of(client_id)
        d = self.cuts[cut]
        job = self.plan.jobs[client_id]
        program = server_program(self.templates[cut], self.weights)
        session = self.server.open_session(
            client_id, job_id, cut, program,
            OptimizerConfig(lr=job.lr, momentum=job.momentum, weight_decay=job.weight_decay), steps,
            self.batch_size, tuple(d["activation"]["shape"]), self.num_classes)
        footprint, ladder = device_view(d, self.momentum)
        s = self.settings

        def fields(host: str, port: int) -> dict[str, Any]:
            return {"split": {"server": {"host": host, "port": port}, "token": session.token, "cut": cut,
                              "activation_shape": list(d["activation"]["shape"]), "footprint_bytes": footprint,
                              "recompute_ladder": ladder, "recompute": s.recompute,
                              "approach_fraction": s.approach_fraction, "io_timeout_s": s.io_timeout_s,
                              "torch_conv": torch_conv_for(s.torch_conv, d)}}

        return PeerEndpoint(s.bind_host, self.server.port, fields, s.via)

    def finish(self, statuses: Mapping[int, str], metrics: Mapping[int, Mapping[str, Any]]) -> dict[int, SessionResult]:
        accepted = [cid for cid, st in statuses.items() if st == "ok"]
        done = self.server.results(accepted)
        if self.on_finish is not None:
            self.on_finish(statuses, metrics, {s.client_id: s.metrics() for s in self.server.sessions()})
        edge = f"{self.settings.bind_host}:{self.server.port}"
        return {cid: SessionResult(session_tensors(s), {"server": {**s.metrics(), "edge_address": edge}})
                for cid, s in done.items()}

    def close(self) -> None:
        self.server.close()


@dataclass
class EdgeManager:
    central: CentralManager
    predicted_mb: Mapping[str, float]  # cut -> predicted device-view footprint (MB) the jobs were given
    log: list[dict[str, Any]] = field(default_factory=list)

    def observe(self, rnd: int, cuts: Mapping[int, str], statuses: Mapping[int, str],
                metrics: Mapping[int, Mapping[str, Any]], server: Mapping[int, Mapping[str, Any]],
                flops: Mapping[str, int]) -> list[dict[str, Any]]:
        """Update the central manager from one round (module doc); returns the changes made."""
        changes: list[dict[str, Any]] = []
        server_per_step, front_per_step = [], []
        for cid, cut in sorted(cuts.items()):
            status = statuses.get(cid, "error")
            m = metrics.get(cid) or {}
            mem = m.get("memory") if isinstance(m.get("memory"), dict) else {}
            split = m.get("split") if isinstance(m.get("split"), dict) else {}
            if status == "oom_killed":
                cap = self.central.lower_cap(cid, cut)
                changes.append({"kind": "cut_capped", "client": cid, "cut": cut, "cap_index": cap,
                                "reason": "out-of-memory kill"})
            measured = mem.get("footprint_bytes")
            recompute = (split.get("recompute") or {}).get("final_units") if isinstance(split, dict) else None
            if isinstance(measured, (int, float)) and measured > 0 and not recompute:  # a no-recompute measurement
                ratio = self.central.observe_footprint(cut, measured / MIB, self.predicted_mb.get(cut, 0.0))
                if ratio is not None:
                    changes.append({"kind": "footprint_calibrated", "cut": cut, "client": cid,
                                    "measured_mb": round(measured / MIB, 2),
                                    "predicted_mb": round(self.predicted_mb.get(cut, 0.0), 2), "factor": round(ratio, 3)})
            phase = split.get("phase_s") if isinstance(split, dict) else None
            steps = split.get("steps") if isinstance(split, dict) else None
            if isinstance(phase, dict) and isinstance(steps, int) and steps > 0:
                front_s = float(phase.get("forward_s", 0.0)) + float(phase.get("backward_s", 0.0))
                self.central.observe_speed(cid, flops.get(cut, 0) * steps, front_s)
                front_per_step.append(front_s / steps)
            srv = server.get(cid) or {}
            if srv.get("server_step_s_mean"):
                server_per_step.append(float(srv["server_step_s_mean"]))
        if server_per_step and front_per_step:
            server_bound = statistics.mean(server_per_step) > statistics.mean(front_per_step)
            bias = self.central.depth_bias
            new_bias = min(2.0, bias + 0.5) if server_bound else max(0.0, bias - 0.25)
            if new_bias != bias:
                changes.append({"kind": "depth_bias", "from": bias, "to": new_bias,
                                "server_step_s": round(statistics.mean(server_per_step), 4),
                                "front_step_s": round(statistics.mean(front_per_step), 4)})
                self.central.depth_bias = new_bias
        for c in changes:
            self.log.append({"round": rnd, **c})
        return changes

    def state_dict(self) -> dict[str, Any]:
        return {"central": self.central.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.central.load_state_dict(state.get("central") or {})


def holders_fedavg(global_weights: Mapping[str, np.ndarray], updates: Sequence[Any], weighted: bool) -> dict[str, np.ndarray]:
    """FedAvg of every tensor over the updates that hold it (host/aggregate.fedavg per holder set)."""
    from fedblocks.host.aggregate import fedavg

    groups: dict[tuple[int, ...], list[str]] = {}
    for name in sorted({n for u in updates for n in u.tensors}):
        holders = tuple(i for i, u in enumerate(updates) if name in u.tensors)
        groups.setdefault(holders, []).append(name)
    new = dict(global_weights)
    for holders, names in groups.items():
        new.update({n: v for n, v in fedavg(global_weights, [updates[i] for i in holders], names, weighted).items()
                    if n in names})
    return new
