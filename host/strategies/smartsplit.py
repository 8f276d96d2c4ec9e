"""SmartSplit: each phone trains the front of the model up to its cut, the server trains the rest.

Per round (docs/smartsplit.md):
- plan: the central manager (host/split/central.py) gives every client the deepest cut
  whose predicted device footprint fits its budget, with transfer bytes as a penalty
  (recompute counted for engines that can do it); clients no cut fits sit out; the
  round's participants are sampled among the rest. Each client's stage is
  `split_front-<its cut>` (RoundPlan.client_stages);
- round_session: the edge server (host/split/edge.py) with one server segment
  (`split_back-<cut>`, a private copy of the global weights) per job;
- aggregate: every accepted client's update is its front (from its phone) plus its back
  (from its server session): together the whole model. Each tensor is averaged (FedAvg,
  shard-size weights) over the updates that hold it; with front + back every complete
  client holds every block, whatever its cut;
- after_round: the edge manager (host/split/session.py) turns what was measured into the
  next round's plan (footprint calibration per cut, a cap after an out-of-memory kill,
  measured speeds, server-bottleneck bias) and reports each change as an event.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedblocks.device_runtime.split_config import TORCH_CONV_KERNELS
from fedblocks.host.aggregate import ClientUpdate
from fedblocks.host.config import ParamReader
from fedblocks.host.errors import HostError
from fedblocks.host.split.central import CentralManager, CutCost
from fedblocks.host.split.session import EdgeManager, SplitRound, SplitSettings, device_view, holders_fedavg
from fedblocks.host.strategies.base import (
    ClientInfo,
    ClientResult,
    RoundPlan,
    RoundSession,
    Strategy,
    StrategyContext,
    StrategyEvent,
    select_clients,
)

FRONT, BACK = "split_front", "split_back"
RECOMPUTE_ENGINES = ("torch",)  # engines/split.py: the only one that checkpoints units on the device
MIB = 1024 * 1024


class SmartSplit(Strategy):
    name = "smartsplit"
    description = "SmartSplit: device trains the front up to a budget-chosen cut, the edge server the rest"
    respects_budgets = True

    def __init__(self, params: Mapping[str, Any], ctx: StrategyContext) -> None:
        super().__init__(params, ctx)
        from fedblocks.export.split import describe_cuts
        from fedblocks.export.stages import make_stage, split_cuts

        r = ParamReader(params, "strategy")
        if ctx.model is None:
            raise HostError("strategy smartsplit: needs the model layout (StrategyContext.model)")
        known = split_cuts(ctx.model)
        cuts = r.str_list("cuts", known)
        unknown = [c for c in cuts if c not in known]
        if unknown or not cuts:
            raise r.error("cuts", f"unknown cut {unknown[0] if unknown else '(none)'}: choose from {', '.join(known)}")
        self.transfer_penalty = r.float("transfer_penalty", 0.5, min=0.0)
        recompute = r.str("recompute", "auto", choices=("auto", "off", "all"))
        transport = r.str("transport", "auto", choices=("auto", "direct", "reverse"))
        self.settings = SplitSettings(
            recompute=recompute, approach_fraction=r.float("approach_fraction", 0.85, min=0.01, max=1.0),
            max_parallel=r.int("max_parallel", 2, min=1),
            via=("reverse" if ctx.testbed == "adb" else "direct") if transport == "auto" else transport,
            torch_conv=r.str("torch_conv", "auto", choices=("auto", *TORCH_CONV_KERNELS)))
        r.unknown_keys_error()
        order = [c for c in known if c in cuts]  # forward order, whatever order the config lists
        momentum = ctx.training.momentum > 0
        self.cuts: dict[str, dict[str, Any]] = {d.cut: d.to_dict() for d in
                                                describe_cuts(ctx.model, ctx.training.batch_size, order)}
        self.templates = {c: make_stage(ctx.model, f"{BACK}-{c}") for c in order}
        allow = recompute != "off" and ctx.engine in RECOMPUTE_ENGINES
        self.central = CentralManager([CutCost.from_description(self.cuts[c], momentum) for c in order],
                                      transfer_penalty=self.transfer_penalty, allow_recompute=allow)
        self.edge = EdgeManager(self.central, {c: device_view(self.cuts[c], momentum)[0] / MIB for c in order})
        self._planned: dict[int, str] = {}
        self._changes: list[dict[str, Any]] = []
        self._sessions: dict[int, Mapping[str, Any]] = {}  # the last round's server sessions, by client
        if not any(self.central.choose(c.client_id, c.budget_mb, 1) for c in ctx.clients):
            need = min(c.footprint_recompute_mb if allow else c.footprint_mb for c in self.central.cuts)
            raise HostError(f"clients: no client budget fits even the shallowest SmartSplit cut ({need:.1f} MB "
                            "predicted); raise some budgets")

    # ------------------------------------------------------------------ stages
    @classmethod
    def stage_ids_for(cls, model: Any) -> list[str] | None:
        from fedblocks.export.stages import split_cuts

        # the server segments (split_back-<cut>) never go to a device: the strategy builds them itself
        return [f"{FRONT}-{c}" for c in split_cuts(model)]

    def required_stages(self) -> list[str]:
        return [f"{FRONT}-{c}" for c in self.cuts]

    def eligible(self, stage_id: str, clients: Sequence[ClientInfo]) -> list[ClientInfo]:
        """Clients some cut fits (SmartSplit gives every client its own cut, whatever `stage_id`)."""
        return [c for c in clients if self.central.choose(c.client_id, c.budget_mb, self._steps(c)) is not None]

    def eligibility_footprint_mb(self, stage_id: str) -> float:
        """The smallest cut's planned footprint, not `stage_id`'s: a client is excluded when no cut fits."""
        return self.central.smallest_footprint_mb()

    # ------------------------------------------------------------------ rounds
    def _steps(self, client: ClientInfo) -> int:
        t = self.ctx.training
        per_epoch = client.num_samples // t.batch_size
        total = per_epoch * t.epochs
        return total if t.max_steps is None else min(total, t.max_steps)

    def plan_round(self, rnd: int, global_weights: Mapping[str, np.ndarray],
                   clients: Sequence[ClientInfo]) -> RoundPlan | None:
        if rnd > self.ctx.total_rounds:
            return None
        choices = {c.client_id: self.central.choose(c.client_id, c.budget_mb, self._steps(c)) for c in clients}
        eligible = [c for c in clients if choices[c.client_id] is not None]
        chosen = select_clients(eligible, self.ctx.fraction, len(self.ctx.clients), self.ctx.seed, rnd)
        stages = {cid: f"{FRONT}-{choices[cid].cut}" for cid in chosen}  # type: ignore[union-attr]
        job = self.default_job()
        if not chosen:
            cut = self.central.cuts[0].cut
            return RoundPlan(f"{FRONT}-{cut}", (), {}, notes="no client fits any cut")
        common = Counter(stages.values()).most_common(1)[0][0]
        notes = "cuts " + ", ".join(f"c{cid}={choices[cid].cut}{'+rc' if choices[cid].recompute_expected else ''}"  # type: ignore[union-attr]
                                    for cid in chosen)
        self._planned = {cid: choices[cid].cut for cid in chosen}  # type: ignore[union-attr]
        return RoundPlan(stage_id=common, client_ids=chosen, jobs={c: job for c in chosen}, notes=notes,
                         client_stages=stages)

    def round_session(self, rnd: int, plan: RoundPlan, global_weights: Mapping[str, np.ndarray]) -> RoundSession:
        def observe(statuses: Mapping[int, str], metrics: Mapping[int, Mapping[str, Any]],
                    server: Mapping[int, Mapping[str, Any]]) -> None:
            flops = {c: int(d["device"]["train_flops"]) for c, d in self.cuts.items()}
            self._changes = self.edge.observe(rnd, self._planned, statuses, metrics, server, flops)
            self._sessions = dict(server)

        return SplitRound(rnd, plan, global_weights, self.cuts, self.templates, int(self.ctx.model.num_classes),
                          self.ctx.training.batch_size, self.settings, self.ctx.training.momentum > 0, observe)

    def aggregate(self, rnd: int, plan: RoundPlan, global_weights: Mapping[str, np.ndarray],
                  results: Sequence[ClientResult]) -> dict[str, np.ndarray]:
        if not results:
            return dict(global_weights)
        updates = [ClientUpdate(r.client_id, r.tensors, r.num_samples) for r in results]
        return holders_fedavg(global_weights, updates, self.ctx.weighted_aggregation)

    def after_round(self, rnd: int, global_weights: Mapping[str, np.ndarray],
                    metrics: Mapping[str, Any]) -> list[StrategyEvent]:
        events = [StrategyEvent("split_cuts", f"round {rnd}: " + ", ".join(f"client {c} at cut {cut}"
                                                                         for c, cut in sorted(self._planned.items())),
                                {"cuts": {str(c): cut for c, cut in self._planned.items()}})] if self._planned else []
        if self._sessions:
            events.append(StrategyEvent("edge_sessions", f"round {rnd}: server segments: " + ", ".join(
                f"client {c} {m['status']}" + (f" ({m['reason']})" if m["reason"] else "")
                for c, m in sorted(self._sessions.items())), {"sessions": {str(c): dict(m) for c, m in
                                                                           self._sessions.items()}}))
            self._sessions = {}
        for change in self._changes:
            kind = change["kind"]
            events.append(StrategyEvent(f"edge_{kind}", f"round {rnd}: edge manager: {kind} "
                                        + ", ".join(f"{k}={v}" for k, v in change.items() if k != "kind"), change))
        self._changes = []
        return events

    def state_dict(self) -> dict[str, Any]:
        return {"edge": self.edge.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.edge.load_state_dict(state.get("edge") or {})
