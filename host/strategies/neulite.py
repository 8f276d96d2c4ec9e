"""NeuLite: progressive block training with the Curriculum Mentor loss and the Training Harmonizer.

Stage k ("neulite-k", built by fedblocks.export.neulite on top of the ordinary stage
programs): block k + its output module (the real head for k = K) + a projection head
train, blocks before it are frozen except the previous block's last conv + norm
(harmonizer). Loss: CE - lambda1 * nHSIC(Z, X) - lambda2 * nHSIC(h(Z), onehot(Y)).
Updates to the previous block's harmonized layers land in the global weights, so the
later stages see them (forward co-adaptation).

Schedule: `progressive` (default) gives every block an equal share of the rounds, in
order (the remainder goes to the last block); `round_robin` cycles through the stages
round by round as the released code does. Each round samples only clients whose
budget fits that stage's predicted footprint.

Lambdas (not published): lambda1 = 0.01 (input term kept small: it rewards keeping
input information, which fights compression in early blocks), lambda2 = 0.1 (label
term); both are `[strategy.params]` fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedblocks.host.config import ParamReader
from fedblocks.host.errors import HostError
from fedblocks.host.strategies.base import (
    ClientInfo,
    EvalTarget,
    RoundPlan,
    Strategy,
    StrategyContext,
    StrategyEvent,
)


class NeuLite(Strategy):
    name = "neulite"
    description = "NeuLite, progressive blocks with curriculum (nHSIC) loss and harmonizer"
    respects_budgets = True

    def __init__(self, params: Mapping[str, Any], ctx: StrategyContext) -> None:
        super().__init__(params, ctx)
        p = ParamReader(params, "strategy")
        self.lambda1 = p.float("lambda1", 0.01, min=0.0)
        self.lambda2 = p.float("lambda2", 0.1, min=0.0)
        self.schedule = p.str("schedule", "progressive", choices=("progressive", "round_robin"))
        p.unknown_keys_error()
        self.stage_list = [f"neulite-{k}" for k in range(1, ctx.num_blocks + 1)]
        for sid in self.stage_list:
            if sid not in ctx.stages:
                raise HostError(f"strategy: NeuLite needs stage '{sid}', which was not built")
            if not self.eligible(sid, ctx.clients):
                raise HostError(f"clients: no client budget fits NeuLite stage '{sid}' "
                                f"({ctx.footprint_mb[sid]:.0f} MB predicted); raise the smallest budgets")
        self.current_block = 1

    def required_stages(self) -> list[str]:
        return list(self.stage_list)

    def make_stage(self, model: Any, stage_id: str) -> Any:
        from fedblocks.export.neulite import make_neulite_stage

        if stage_id.startswith("neulite-"):
            return make_neulite_stage(model, stage_id, self.lambda1, self.lambda2)
        return super().make_stage(model, stage_id)

    def initial_weights(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from fedblocks.export.neulite import projection_head_weights

        if self.ctx.model is None:
            raise HostError("NeuLite needs the model to initialise its projection heads")
        return {**weights, **projection_head_weights(self.ctx.model, self.ctx.seed)}

    def block_for_round(self, rnd: int) -> int:
        k_total = self.ctx.num_blocks
        if self.schedule == "round_robin":
            return (rnd - 1) % k_total + 1
        per_block = max(1, self.ctx.total_rounds // k_total)
        return min(k_total, (rnd - 1) // per_block + 1)

    def plan_round(self, rnd: int, global_weights: Mapping[str, np.ndarray],
                   clients: Sequence[ClientInfo]) -> RoundPlan | None:
        if rnd > self.ctx.total_rounds:
            return None
        k = self.block_for_round(rnd)
        self.current_block = k
        sid = f"neulite-{k}"
        return self.make_plan(rnd, sid, self.eligible(sid, clients), notes=f"block {k} (curriculum loss)")

    def after_round(self, rnd: int, global_weights: Mapping[str, np.ndarray],
                    metrics: Mapping[str, Any]) -> list[StrategyEvent]:
        if rnd < self.ctx.total_rounds and self.block_for_round(rnd + 1) != self.block_for_round(rnd):
            self.current_block = self.block_for_round(rnd + 1)
            if self.schedule == "progressive":
                return [StrategyEvent("block_frozen", f"block {self.block_for_round(rnd)} done, moving to "
                                      f"block {self.current_block}", {"block": self.block_for_round(rnd)})]
        return []

    def eval_target(self) -> EvalTarget:
        return EvalTarget("prefix", self.current_block)

    def state_dict(self) -> dict[str, Any]:
        return {"current_block": self.current_block}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.current_block = int(state["current_block"])
