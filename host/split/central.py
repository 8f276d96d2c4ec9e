"""The central manager: which devices train this round, and at which cut.

Rule (docs/smartsplit.md), per client i with memory budget B_i, for every cut c in
forward order (depth d_c = position / (number of cuts - 1), 0 = shallowest):

    F_c    = predicted device footprint x calibration_c            (no recompute)
    F_c^rc = predicted footprint with every front unit recomputed x calibration_c
             (only engines that recompute: torch)
    fits   = F_c <= B_i, or F_c^rc <= B_i ("recompute expected": the on-device manager will
             switch it on)
    score  = (1 + depth_bias) x d_c - transfer_penalty x T_c / max_c T_c
             T_c = bytes up + down per batch; depth_bias = 0 unless the edge manager saw the
             server as the bottleneck (host/split/session.py)
    time   = steps_i x (front FLOPs_c / speed_i + T_c / bandwidth)   (when a deadline is set:
             a cut whose time exceeds it does not fit)

and the client gets the fitting cut with the highest score, never deeper than the cap
the edge manager set after an out-of-memory kill (edge.py / EdgeManager). A client that
no cut fits sits the round out. calibration_c starts at 1 and becomes the largest
measured / predicted footprint seen at that cut (never below 1: the prediction leaves
out the engine's own buffers); speed_i is the client's measured front FLOP/s (device
compute seconds from metrics.json), the median of the known speeds until it has one.

Participants: `fraction` x clients (at least one) sampled among the clients some cut
fits, seeded by (seed, round) like every strategy (host/strategies/base.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MIB = 1024 * 1024


@dataclass(frozen=True)
class CutCost:
    """What the manager knows of one cut (from export/split.py's description)."""

    cut: str
    footprint_mb: float
    footprint_recompute_mb: float
    transfer_bytes: int
    front_train_flops: int

    @classmethod
    def from_description(cls, d: Mapping[str, Any], momentum: bool) -> CutCost:
        device = d["device"]
        extra = int(device["grads_bytes"]) if momentum else 0  # SGD momentum: one buffer per trainable tensor
        return cls(cut=d["cut"], footprint_mb=(device["footprint_bytes"] + extra) / MIB,
                   footprint_recompute_mb=(device["footprint_recompute_all_bytes"] + extra) / MIB,
                   transfer_bytes=int(d["transfer_bytes_per_batch"]["total"]),
                   front_train_flops=int(device["train_flops"]))


@dataclass(frozen=True)
class CutChoice:
    cut: str
    recompute_expected: bool
    planned_footprint_mb: float
    score: float


@dataclass
class CentralManager:
    cuts: Sequence[CutCost]  # forward order
    transfer_penalty: float = 0.5
    allow_recompute: bool = True
    bandwidth_bytes_s: float = 50e6  # assumed link speed for the time estimate (loopback / USB 2 class)
    calibration: dict[str, float] = field(default_factory=dict)  # cut -> measured / predicted (>= 1)
    speed_flops_s: dict[int, float] = field(default_factory=dict)  # client -> measured front FLOP/s
    cap: dict[int, int] = field(default_factory=dict)  # client -> deepest cut index allowed
    depth_bias: float = 0.0

    def _depth(self, index: int) -> float:
        return index / max(1, len(self.cuts) - 1)

    def choose(self, client_id: int, budget_mb: float | None, steps: int,
               deadline_s: float | None = None) -> CutChoice | None:
        """The cut for one client (module doc), or None when none fits."""
        t_max = max(c.transfer_bytes for c in self.cuts) or 1
        known = list(self.speed_flops_s.values())
        speed = self.speed_flops_s.get(client_id, statistics.median(known) if known else None)
        best: CutChoice | None = None
        for index, c in enumerate(self.cuts):
            if index > self.cap.get(client_id, len(self.cuts) - 1):
                break
            plain, recompute = self._calibrated(c)
            if budget_mb is None or plain <= budget_mb:
                planned, rc = plain, False
            elif self.allow_recompute and recompute <= budget_mb:
                planned, rc = recompute, True
            else:
                continue
            if deadline_s is not None and speed:
                if steps * (c.front_train_flops / speed + c.transfer_bytes / self.bandwidth_bytes_s) > deadline_s:
                    continue
            score = (1 + self.depth_bias) * self._depth(index) - self.transfer_penalty * c.transfer_bytes / t_max
            if best is None or score > best.score:
                best = CutChoice(c.cut, rc, planned, score)
        return best

    def _calibrated(self, c: CutCost) -> tuple[float, float]:
        """(footprint, footprint with recompute) of a cut in MB, scaled by its calibration."""
        scale = self.calibration.get(c.cut, 1.0)
        return c.footprint_mb * scale, c.footprint_recompute_mb * scale

    def smallest_footprint_mb(self) -> float:
        """The least budget any cut fits (calibrated; with recompute when it is allowed)."""
        return min(min(plain, rc) if self.allow_recompute else plain
                   for plain, rc in map(self._calibrated, self.cuts))

    # ---- feedback (the edge manager calls these between rounds)
    def observe_footprint(self, cut: str, measured_mb: float, predicted_mb: float) -> float | None:
        """Raise the cut's calibration to measured / predicted; returns the new factor if it changed."""
        if predicted_mb <= 0:
            return None
        ratio = measured_mb / predicted_mb
        if ratio > self.calibration.get(cut, 1.0):
            self.calibration[cut] = ratio
            return ratio
        return None

    def observe_speed(self, client_id: int, flops: float, seconds: float) -> None:
        if seconds > 0 and flops > 0:
            self.speed_flops_s[client_id] = flops / seconds

    def lower_cap(self, client_id: int, cut: str) -> int:
        """After an out-of-memory kill at `cut`: the client gets only shallower cuts from now on."""
        index = [c.cut for c in self.cuts].index(cut)
        self.cap[client_id] = min(self.cap.get(client_id, len(self.cuts) - 1), index - 1)
        return self.cap[client_id]

    def state_dict(self) -> dict[str, Any]:
        return {"calibration": dict(self.calibration), "speed": {str(k): v for k, v in self.speed_flops_s.items()},
                "cap": {str(k): v for k, v in self.cap.items()}, "depth_bias": self.depth_bias}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.calibration = {str(k): float(v) for k, v in (state.get("calibration") or {}).items()}
        self.speed_flops_s = {int(k): float(v) for k, v in (state.get("speed") or {}).items()}
        self.cap = {int(k): int(v) for k, v in (state.get("cap") or {}).items()}
        self.depth_bias = float(state.get("depth_bias", 0.0))
