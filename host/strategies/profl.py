"""ProFL: progressive model shrinking, then progressive growing with effective-movement freezing.

Schedule (research/methods.md, arXiv 2404.13349), K = number of blocks, stage ids as
fedblocks.export.stages defines them:
1. Shrinking (skipped when `shrink_rounds = 0`), `shrink_rounds` rounds per stage:
   - `shrink-K`: blocks 1..K-1 frozen, the last block + head trained, cross-entropy;
   - `shrink-(K-1)`, ..., `shrink-2`: stage j trains only basic layer j, MSE between its
     logits and the teacher's (the fuller model `shrunk_logits(x, j + 1)`: blocks 1..j +
     basic layers j+1..K + head), the teacher computed by the host on each client's
     shard and shipped as shard array `teacher`.
   When growing starts, every output module is initialised from the trained basic
   layers and head (`output_module_sources`).
2. Growing: `grow-1`, ..., `grow-K`. Block k trains (with output module k; the real head
   for k = K) until its effective movement over `em_window` rounds drops below
   `em_threshold` (after at least `min_rounds_per_block`), or it hits
   `max_rounds_per_block`; then it is frozen and k+1 starts. The last stage trains
   until the run's rounds are spent. EM is logged every round.
Per stage, clients are sampled only among those whose budget fits the stage's
predicted footprint.

Defaults chosen here (the paper publishes none): em_window 6 (paper), em_threshold
0.25, min_rounds_per_block = em_window + 1 (EM needs W + 1 observations),
max_rounds_per_block "auto" = the rounds left when a block starts split evenly over
the blocks still to grow, shrink_rounds 1, shrink_lr = the training lr (the reference
code's 1e-5 barely moves a freshly initialised layer in a few rounds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedblocks.host.config import ParamReader
from fedblocks.host.convergence import EffectiveMovementTracker
from fedblocks.host.errors import HostError
from fedblocks.host.strategies.base import (
    ClientInfo,
    EvalTarget,
    RoundPlan,
    Strategy,
    StrategyContext,
    StrategyEvent,
)


@dataclass(frozen=True)
class Phase:
    stage_id: str
    kind: str  # "warmup" | "shrink" | "grow"
    block: int


class ProFL(Strategy):
    name = "profl"
    description = "ProFL, progressive shrinking then growing, one block per stage"
    respects_budgets = True

    def __init__(self, params: Mapping[str, Any], ctx: StrategyContext) -> None:
        super().__init__(params, ctx)
        p = ParamReader(params, "strategy")
        self.em_window = p.int("em_window", 6, min=1)
        self.em_threshold = p.float("em_threshold", 0.25, min=0.0, max=1.0)
        self.min_rounds = p.int("min_rounds_per_block", self.em_window + 1, min=1)
        self.max_rounds_param: int | None = None
        if p.has("max_rounds_per_block") and p.section["max_rounds_per_block"] != "auto":
            self.max_rounds_param = p.int("max_rounds_per_block", min=1)
        else:
            p.str("max_rounds_per_block", "auto", choices=("auto",))
        self.shrink_rounds = p.int("shrink_rounds", 1, min=0)
        self.shrink_lr = p.float("shrink_lr", ctx.training.lr, min=0.0, exclusive_min=True)
        p.unknown_keys_error()
        k_total = ctx.num_blocks
        phases: list[Phase] = []
        if self.shrink_rounds > 0:
            phases.append(Phase(f"shrink-{k_total}", "warmup", k_total))
            phases += [Phase(f"shrink-{j}", "shrink", j) for j in range(k_total - 1, 1, -1)]
        phases += [Phase(f"grow-{k}", "grow", k) for k in range(1, k_total + 1)]
        self.phases = phases
        for ph in phases:
            if ph.stage_id not in ctx.stages:
                raise HostError(f"strategy: ProFL needs stage '{ph.stage_id}', which the export did not provide")
            if not self.eligible(ph.stage_id, ctx.clients):
                raise HostError(f"clients: no client budget fits ProFL stage '{ph.stage_id}' "
                                f"({ctx.footprint_mb[ph.stage_id]:.0f} MB predicted); raise the smallest budgets")
        # mutable state (state_dict)
        self.phase_index = 0
        self.rounds_in_phase = 0
        self.phase_max_rounds: int | None = None
        self.output_modules_initialised = self.shrink_rounds == 0
        self.frozen_blocks: list[int] = []
        self.tracker: EffectiveMovementTracker | None = None
        self.last_round = 0

    @property
    def phase(self) -> Phase:
        return self.phases[self.phase_index]

    def required_stages(self) -> list[str]:
        return sorted({ph.stage_id for ph in self.phases})

    def _start_grow_phase(self, rnd: int) -> None:
        blocks_left = len(self.phases) - self.phase_index
        rounds_left = self.ctx.total_rounds - rnd + 1
        auto = max(1, rounds_left // max(1, blocks_left))
        self.phase_max_rounds = self.max_rounds_param if self.max_rounds_param is not None else auto
        k = self.phase.block
        names = [n for n in (t.name for t in self.ctx.stages[self.phase.stage_id].trainable)
                 if n.startswith(f"blocks.{k - 1}.")]
        shapes = {n: tuple(self.ctx.tensor_shapes[n]) for n in names}
        self.tracker = EffectiveMovementTracker(names, shapes, self.em_window, seed=self.ctx.seed * 1000 + k)

    def plan_round(self, rnd: int, global_weights: Mapping[str, np.ndarray],
                   clients: Sequence[ClientInfo]) -> RoundPlan | None:
        if rnd > self.ctx.total_rounds:
            return None
        ph = self.phase
        if ph.kind == "grow" and self.tracker is None:
            self._start_grow_phase(rnd)
        job = self.default_job(lr=self.shrink_lr) if ph.kind == "shrink" else None
        notes = {"warmup": "shrinking: last block + head (cross-entropy)",
                 "shrink": f"shrinking: basic layer {ph.block} distils the fuller model",
                 "grow": f"growing: block {ph.block}" + (" + head" if ph.block == self.ctx.num_blocks
                                                          else f" + output module {ph.block}")}[ph.kind]
        return self.make_plan(rnd, ph.stage_id, self.eligible(ph.stage_id, clients), notes=notes, job=job)

    def begin_round(self, rnd: int, plan: RoundPlan,
                    global_weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        weights = dict(global_weights)
        if self.phase.kind == "grow" and not self.output_modules_initialised:
            # the trained basic layers (and head) become every output module's initial weights
            for target, source in self.ctx.output_module_sources.items():
                weights[target] = np.array(weights[source], copy=True)
            self.output_modules_initialised = True
        return weights

    def extra_inputs(self, plan: RoundPlan, global_weights: Mapping[str, np.ndarray],
                     x: np.ndarray) -> dict[str, np.ndarray]:
        if "teacher" not in {t.name for t in self.ctx.stages[plan.stage_id].inputs}:
            return {}
        if self.ctx.logits_fn is None:
            raise HostError("ProFL shrinking needs the host model to compute teacher logits")
        j = int(plan.stage_id.split("-")[1])
        teacher = self.ctx.logits_fn(global_weights, EvalTarget("shrunk", j + 1), x)
        return {"teacher": teacher.astype(np.float32)}

    def after_round(self, rnd: int, global_weights: Mapping[str, np.ndarray],
                    metrics: Mapping[str, Any]) -> list[StrategyEvent]:
        self.last_round = rnd
        self.rounds_in_phase += 1
        ph = self.phase
        events: list[StrategyEvent] = []
        last_phase = self.phase_index == len(self.phases) - 1
        if ph.kind in ("warmup", "shrink"):
            if self.rounds_in_phase >= self.shrink_rounds:
                events.append(StrategyEvent("stage_done", f"{ph.stage_id} done after {self.rounds_in_phase} round(s)",
                                            {"stage": ph.stage_id}))
                self._advance()
            return events
        assert self.tracker is not None
        em = self.tracker.observe(global_weights)
        events.append(StrategyEvent("effective_movement",
                                    f"block {ph.block}: EM {'n/a' if em is None else f'{em:.3f}'}",
                                    {"block": ph.block, "em": em, "window": self.em_window,
                                     "threshold": self.em_threshold, "rounds_in_stage": self.rounds_in_phase}))
        if last_phase:
            return events
        converged = em is not None and self.rounds_in_phase >= self.min_rounds and em < self.em_threshold
        capped = self.phase_max_rounds is not None and self.rounds_in_phase >= self.phase_max_rounds
        if converged or capped:
            why = f"EM {em:.3f} < {self.em_threshold}" if converged else f"cap of {self.phase_max_rounds} rounds"
            events.append(StrategyEvent("block_frozen", f"block {ph.block} frozen after {self.rounds_in_phase} "
                                        f"round(s) ({why})", {"block": ph.block, "reason": "em" if converged else "cap",
                                                              "rounds": self.rounds_in_phase}))
            self.frozen_blocks.append(ph.block)
            self._advance()
        return events

    def _advance(self) -> None:
        self.phase_index = min(self.phase_index + 1, len(self.phases) - 1)
        self.rounds_in_phase = 0
        self.tracker = None
        self.phase_max_rounds = None

    def eval_target(self) -> EvalTarget:
        ph = self.phase
        if ph.kind == "shrink":
            return EvalTarget("shrunk", ph.block)
        return EvalTarget("prefix", ph.block)

    def state_dict(self) -> dict[str, Any]:
        return {"phase_index": self.phase_index, "rounds_in_phase": self.rounds_in_phase,
                "phase_max_rounds": self.phase_max_rounds,
                "output_modules_initialised": self.output_modules_initialised,
                "frozen_blocks": list(self.frozen_blocks), "last_round": self.last_round,
                "tracker": None if self.tracker is None else self.tracker.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.phase_index = int(state["phase_index"])
        self.rounds_in_phase = int(state["rounds_in_phase"])
        self.output_modules_initialised = bool(state["output_modules_initialised"])
        self.frozen_blocks = [int(b) for b in state["frozen_blocks"]]
        self.last_round = int(state["last_round"])
        self.tracker = None
        if state.get("tracker") is not None:
            # rebuild the tracker for the current block (same seed -> same sample), then its history
            max_rounds = state.get("phase_max_rounds")
            self._start_grow_phase(self.last_round + 1)
            self.tracker.load_state_dict(state["tracker"])  # type: ignore[union-attr]
            self.phase_max_rounds = max_rounds
        else:
            self.phase_max_rounds = state.get("phase_max_rounds")
