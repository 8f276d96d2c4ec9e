"""FedAvg: every selected client trains the full model. Budgets are ignored.

This is the *unconstrained reference* (what accuracy would be if every phone had
enough memory); it is labelled as such in summaries and reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedblocks.host.config import ParamReader
from fedblocks.host.strategies.base import ClientInfo, RoundPlan, Strategy, StrategyContext

FULL_STAGE = "full"


class FedAvg(Strategy):
    name = "fedavg"
    description = "FedAvg, full model on every client (unconstrained reference: memory budgets ignored)"
    respects_budgets = False

    def __init__(self, params: Mapping[str, Any], ctx: StrategyContext) -> None:
        super().__init__(params, ctx)
        ParamReader(params, "strategy").unknown_keys_error()

    def required_stages(self) -> list[str]:
        return [FULL_STAGE]

    def candidates(self, clients: Sequence[ClientInfo]) -> list[ClientInfo]:
        return list(clients)

    def plan_round(self, rnd: int, global_weights: Mapping[str, np.ndarray],
                   clients: Sequence[ClientInfo]) -> RoundPlan | None:
        if rnd > self.ctx.total_rounds:
            return None
        return self.make_plan(rnd, FULL_STAGE, self.candidates(clients), notes="full model")
