"""The strategy interface: what to train each round, and how results become the new global model.

A strategy is a small object whose methods are functions of (round, global
weights, results) plus its own state; it never touches devices, files or the
run store. The round loop (host/loop.py) knows nothing about any particular
method: it asks `plan_round` what to run, asks `extra_inputs` for any per-client
shard arrays the stage needs (ProFL's teacher logits), hands validated results
to `aggregate`, reports metrics to `after_round`, and evaluates the sub-model
`eval_target` names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedblocks.device_runtime.spec import StageSpec
from fedblocks.host.aggregate import ClientUpdate, fedavg
from fedblocks.host.peer import PeerEndpoint, RoundSession, SessionResult


@dataclass(frozen=True)
class ClientInfo:
    """What a strategy may know about a client when planning."""

    client_id: int
    budget_mb: float | None  # None: unconstrained
    num_samples: int


@dataclass(frozen=True)
class ClientJob:
    """Per-client settings for one round's job."""

    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    max_steps: int | None = None


@dataclass(frozen=True)
class RoundPlan:
    stage_id: str
    client_ids: tuple[int, ...]
    jobs: Mapping[int, ClientJob]
    notes: str = ""
    # per-client stage, for strategies that give clients different stages in one round (SmartSplit's
    # cuts); a client not listed trains `stage_id`
    client_stages: Mapping[int, str] = field(default_factory=dict)

    def stage_of(self, client_id: int) -> str:
        return self.client_stages.get(client_id, self.stage_id)

    def stage_ids(self) -> list[str]:
        """Every stage the round trains, `stage_id` first."""
        others = sorted({self.stage_of(c) for c in self.client_ids} - {self.stage_id})
        return [self.stage_id, *others]


@dataclass(frozen=True)
class ClientResult:
    """A validated client result handed to `aggregate`."""

    client_id: int
    tensors: Mapping[str, np.ndarray]
    num_samples: int
    metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StrategyEvent:
    """Something the strategy decided that the run store should record (EM value, block frozen...)."""

    kind: str
    message: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalTarget:
    """Which model the host evaluates: `prefix` = blocks 1..k + output module k (k = K: full model);
    `shrunk` = blocks 1..k-1 + basic layers k..K + head."""

    kind: str
    k: int


@dataclass(frozen=True)
class TrainingDefaults:
    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    max_steps: int | None = None


@dataclass
class StrategyContext:
    """Everything a strategy may use besides the weights: model layout, stages, clients, budget of rounds."""

    num_blocks: int
    stages: Mapping[str, StageSpec]  # every stage the strategy may plan, by id
    footprint_mb: Mapping[str, float]  # predicted training footprint per stage at the job batch size
    clients: Sequence[ClientInfo]
    total_rounds: int
    fraction: float
    seed: int
    training: TrainingDefaults
    weighted_aggregation: bool = True
    testbed: str = "simulated"  # simulated | virtual | adb
    engine: str = "torch"  # the phones' engine
    tensor_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    block_tensor_names: Mapping[int, Sequence[str]] = field(default_factory=dict)
    output_module_sources: Mapping[str, str] = field(default_factory=dict)
    model: Any = None  # the BlockedModel (for strategies that need its layout, e.g. NeuLite's projection heads)
    # (global weights, EvalTarget, x) -> logits; the host's torch model (ProFL teachers)
    logits_fn: Callable[[Mapping[str, np.ndarray], EvalTarget, np.ndarray], np.ndarray] | None = None


def select_clients(eligible: Sequence[ClientInfo], fraction: float, total_clients: int, seed: int,
                   rnd: int) -> tuple[int, ...]:
    """Sample round `rnd`'s participants among `eligible` (seeded by (seed, round): resumable).

    The per-round count is fraction * total clients (at least 1), capped by how many are eligible.
    """
    if not eligible:
        return ()
    want = max(1, round(fraction * total_clients))
    count = min(want, len(eligible))
    rng = np.random.default_rng([seed, rnd, 0x5E1EC7])
    ids = sorted(c.client_id for c in eligible)
    chosen = rng.choice(len(ids), size=count, replace=False)
    return tuple(sorted(ids[i] for i in chosen))


__all__ = ["ClientInfo", "ClientJob", "ClientResult", "EvalTarget", "PeerEndpoint", "RoundPlan", "RoundSession",
           "SessionResult", "Strategy", "StrategyContext", "StrategyEvent", "TrainingDefaults", "select_clients"]


class Strategy(ABC):
    name: str = ""
    description: str = ""

    def __init__(self, params: Mapping[str, Any], ctx: StrategyContext) -> None:
        self.ctx = ctx

    # --- what the loop calls ---
    def required_stages(self) -> list[str]:
        """Stage ids this strategy may plan (the loop exports / builds exactly these)."""
        return list(self.ctx.stages)

    def make_stage(self, model: Any, stage_id: str) -> Any:
        """The StageProgram for `stage_id` (simulated clients and export use exactly this)."""
        from fedblocks.export.stages import make_stage

        return make_stage(model, stage_id)

    def initial_weights(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Global weights before round 1 (a strategy may add its own tensors)."""
        return weights

    @abstractmethod
    def plan_round(self, rnd: int, global_weights: Mapping[str, np.ndarray],
                   clients: Sequence[ClientInfo]) -> RoundPlan | None:
        """The stage and clients for round `rnd` (1-based); None when the strategy is done."""

    def begin_round(self, rnd: int, plan: RoundPlan,
                    global_weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Global weights the planned round starts from (ProFL initialises output modules here)."""
        return dict(global_weights)

    def extra_inputs(self, plan: RoundPlan, global_weights: Mapping[str, np.ndarray],
                     x: np.ndarray) -> dict[str, np.ndarray]:
        """Extra shard arrays the planned stage takes besides x / y (e.g. `teacher`)."""
        return {}

    def aggregate(self, rnd: int, plan: RoundPlan, global_weights: Mapping[str, np.ndarray],
                  results: Sequence[ClientResult]) -> dict[str, np.ndarray]:
        """FedAvg over the planned stage's trainable + state tensors; other tensors untouched."""
        if not results:
            return dict(global_weights)
        stage = self.ctx.stages[plan.stage_id]
        names = [t.name for t in stage.trainable] + [s.name for s in stage.state]
        updates = [ClientUpdate(r.client_id, r.tensors, r.num_samples) for r in results]
        return fedavg(global_weights, updates, names, weighted=self.ctx.weighted_aggregation)

    def after_round(self, rnd: int, global_weights: Mapping[str, np.ndarray],
                    metrics: Mapping[str, Any]) -> list[StrategyEvent]:
        return []

    def eval_target(self) -> EvalTarget:
        return EvalTarget("prefix", self.ctx.num_blocks)

    def round_session(self, rnd: int, plan: RoundPlan, global_weights: Mapping[str, np.ndarray]) -> RoundSession | None:
        """A server side for the planned round (default: none)."""
        return None

    @classmethod
    def stage_ids_for(cls, model: Any) -> list[str] | None:
        """The stages this strategy may plan for `model`, if not the loop's default set."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None

    # --- helpers for subclasses ---
    def eligible(self, stage_id: str, clients: Sequence[ClientInfo]) -> list[ClientInfo]:
        need = self.eligibility_footprint_mb(stage_id)
        return [c for c in clients if c.budget_mb is None or need <= c.budget_mb]

    def eligibility_footprint_mb(self, stage_id: str) -> float:
        """The smallest budget (MB) eligible() lets train in a round planned as `stage_id`; the
        `clients_excluded` event quotes it."""
        return self.ctx.footprint_mb[stage_id]

    def default_job(self, lr: float | None = None, epochs: int | None = None) -> ClientJob:
        t = self.ctx.training
        return ClientJob(epochs=t.epochs if epochs is None else epochs, lr=t.lr if lr is None else lr,
                         momentum=t.momentum, weight_decay=t.weight_decay, max_steps=t.max_steps)

    def make_plan(self, rnd: int, stage_id: str, clients: Sequence[ClientInfo], notes: str = "",
                  job: ClientJob | None = None) -> RoundPlan:
        chosen = select_clients(clients, self.ctx.fraction, len(self.ctx.clients), self.ctx.seed, rnd)
        job = job or self.default_job()
        return RoundPlan(stage_id=stage_id, client_ids=chosen, jobs={c: job for c in chosen}, notes=notes)
