"""The on-device manager: switch recompute on when memory approaches the budget.

It walks the job's recompute ladder (export-time plan: units in order of best memory
saved per recompute FLOP, each rung with its predicted footprint):

1. before the first step, from the prediction: the first rung whose predicted footprint
   (plus the baseline, for a whole-process budget) is within `approach_fraction` of the
   budget ("predicted");
2. after every step, from the measurement: when the step's peak (VmHWM after a per-step
   reset, minus the baseline for a footprint budget) passes `approach_fraction` of the
   budget, the predictions are scaled by measured / predicted and the manager climbs to
   the first rung that fits ("measured"), or to the top rung when none does.

Every decision is an event recorded in metrics.json (split.recompute.events). An engine
that cannot recompute gets the same decisions recorded with `applied: false`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .split_config import LadderRung


@dataclass
class RecomputeManager:
    ladder: tuple[LadderRung, ...]
    predicted_footprint_bytes: int | None  # no recompute
    budget_bytes: int | None
    budget_applies_to: str  # footprint | process
    approach_fraction: float
    supported: bool
    baseline_bytes: int = 0
    rung: int = 0  # rungs switched on (0 = no recompute)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(u for r in self.ladder[:self.rung] for u in r.units)

    def predicted(self, rung: int) -> int | None:
        if rung == 0:
            return self.predicted_footprint_bytes
        return self.ladder[rung - 1].footprint_bytes

    def _limit(self) -> float | None:
        if self.budget_bytes is None:
            return None
        limit = self.approach_fraction * self.budget_bytes
        return limit - self.baseline_bytes if self.budget_applies_to == "process" else limit

    def _first_fitting(self, scale: float, start: int) -> int | None:
        limit = self._limit()
        if limit is None:
            return None
        for rung in range(start, len(self.ladder) + 1):
            p = self.predicted(rung)
            if p is not None and p * scale <= limit:
                return rung
        return None

    def _move(self, rung: int, step: int, reason: str, measured: int | None, scale: float) -> bool:
        if rung <= self.rung:
            return False
        self.rung = rung
        self.events.append({"step": step, "reason": reason, "measured_footprint_bytes": measured,
                            "budget_bytes": self.budget_bytes, "budget_applies_to": self.budget_applies_to,
                            "scale": round(scale, 4), "predicted_bytes": self.predicted(rung),
                            "units": list(self.units), "applied": self.supported})
        return True

    def initial(self) -> bool:
        """Decide before step 0 from the prediction; True when recompute changed."""
        if self.budget_bytes is None or not self.ladder:
            return False
        fit = self._first_fitting(1.0, 0)
        return self._move(len(self.ladder) if fit is None else fit, 0, "predicted", None, 1.0)

    def after_step(self, step: int, peak_rss_bytes: int | None) -> bool:
        """React to a step's measured peak RSS (VmHWM since a reset before the step)."""
        limit = self._limit()
        if limit is None or peak_rss_bytes is None or self.rung >= len(self.ladder):
            return False
        used = peak_rss_bytes - self.baseline_bytes  # the training footprint, like the prediction
        if used <= limit:
            return False
        predicted = self.predicted(self.rung) or 0
        scale = used / predicted if predicted > 0 else 1.0
        fit = self._first_fitting(scale, self.rung + 1)
        return self._move(len(self.ladder) if fit is None else fit, step + 1, "measured", used, scale)

    def summary(self) -> dict[str, Any]:
        return {"supported": self.supported, "ladder_rungs": len(self.ladder), "rung": self.rung,
                "units": list(self.units), "approach_fraction": self.approach_fraction, "events": self.events}
