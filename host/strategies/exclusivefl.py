"""ExclusiveFL: FedAvg over only the clients whose budget fits the full model's predicted footprint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedblocks.host.errors import HostError
from fedblocks.host.strategies.base import ClientInfo, StrategyContext
from fedblocks.host.strategies.fedavg import FULL_STAGE, FedAvg


class ExclusiveFL(FedAvg):
    name = "exclusivefl"
    description = "ExclusiveFL, full model on only the clients whose memory budget fits it"
    respects_budgets = True

    def __init__(self, params: Mapping[str, Any], ctx: StrategyContext) -> None:
        super().__init__(params, ctx)
        if not self.eligible(FULL_STAGE, ctx.clients):
            need = ctx.footprint_mb[FULL_STAGE]
            raise HostError(f"clients: no client budget fits the full model ({need:.0f} MB predicted); "
                            "ExclusiveFL has no one to train — raise some budgets or pick another strategy")

    def candidates(self, clients: Sequence[ClientInfo]) -> list[ClientInfo]:
        return self.eligible(FULL_STAGE, clients)
