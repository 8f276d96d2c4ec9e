"""Strategies as pure functions of (round, weights, results): selection, schedules, freezing, state."""

from __future__ import annotations

import importlib.util
from importlib.machinery import SourceFileLoader
from pathlib import Path

import numpy as np
import pytest

from fedblocks.device_runtime.spec import StageSpec
from fedblocks.host.errors import HostError
from fedblocks.host.strategies import STRATEGIES
from fedblocks.host.strategies.base import (
    ClientInfo,
    ClientResult,
    EvalTarget,
    StrategyContext,
    TrainingDefaults,
    select_clients,
)

K = 3
SHAPES = {**{f"blocks.{i}.w": (4,) for i in range(K)}, "head.w": (4,),
          **{f"basic_layers.{j}.w": (4,) for j in range(1, K)},
          **{f"output_modules.{i}.layers.{j}.w": (4,) for i in range(K - 1) for j in range(i + 1, K)},
          **{f"output_modules.{i}.head.w": (4,) for i in range(K - 1)}}


def spec(sid: str, trainable: list[str], teacher: bool = False) -> StageSpec:
    inputs = [{"name": "x", "shape": [8, 3], "dtype": "float32"},
              {"name": "teacher", "shape": [8, 10], "dtype": "float32"} if teacher
              else {"name": "y", "shape": [8], "dtype": "int64"}]
    return StageSpec.from_dict({"id": sid, "kind": sid.split("-")[0], "inputs": inputs,
                                "outputs": [{"name": "loss", "shape": [], "dtype": "float32"}],
                                "trainable": [{"name": n, "shape": [4], "dtype": "float32"} for n in trainable]})


def stages() -> dict[str, StageSpec]:
    out = {"full": spec("full", [n for n in SHAPES if n.startswith(("blocks.", "head."))])}
    for k in range(1, K + 1):
        exit_names = ["head.w"] if k == K else [n for n in SHAPES if n.startswith(f"output_modules.{k - 1}.")]
        out[f"grow-{k}"] = spec(f"grow-{k}", [f"blocks.{k - 1}.w", *exit_names])
    out[f"shrink-{K}"] = spec(f"shrink-{K}", [f"blocks.{K - 1}.w", "head.w"])
    for j in range(2, K):
        out[f"shrink-{j}"] = spec(f"shrink-{j}", [f"basic_layers.{j - 1}.w"], teacher=True)
    for k in range(1, K + 1):
        out[f"neulite-{k}"] = spec(f"neulite-{k}", [f"blocks.{k - 1}.w"])
    return out


FOOTPRINT = {"full": 40.0, "grow-1": 25.0, "grow-2": 15.0, "grow-3": 10.0, "shrink-3": 10.0, "shrink-2": 5.0,
             "neulite-1": 26.0, "neulite-2": 16.0, "neulite-3": 12.0}


def ctx(budgets: list[float | None], rounds: int = 30, fraction: float = 0.5, logits_fn=None) -> StrategyContext:
    clients = [ClientInfo(i, b, 100 + i) for i, b in enumerate(budgets)]
    sources = {}
    for i in range(K - 1):
        for j in range(i + 1, K):
            sources[f"output_modules.{i}.layers.{j}.w"] = f"basic_layers.{j}.w"
        sources[f"output_modules.{i}.head.w"] = "head.w"
    return StrategyContext(num_blocks=K, stages=stages(), footprint_mb=FOOTPRINT, clients=clients, total_rounds=rounds,
                           fraction=fraction, seed=5, training=TrainingDefaults(1, 0.1, 0.0, 0.0, 8),
                           tensor_shapes=SHAPES, output_module_sources=sources, logits_fn=logits_fn)


def zeros() -> dict[str, np.ndarray]:
    return {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}


BUDGETS = [30.0, 30.0, 45.0, 45.0, 20.0, 12.0, None, 50.0]


def test_selection_is_seeded_by_round_and_respects_the_fraction() -> None:
    clients = [ClientInfo(i, None, 10) for i in range(10)]
    a = select_clients(clients, 0.3, 10, seed=1, rnd=4)
    assert a == select_clients(clients, 0.3, 10, seed=1, rnd=4) and len(a) == 3
    assert any(select_clients(clients, 0.3, 10, seed=1, rnd=r) != a for r in range(5, 9))


def test_fedavg_ignores_budgets_exclusivefl_keeps_only_clients_that_fit() -> None:
    fed = STRATEGIES["fedavg"]({}, ctx(BUDGETS, fraction=1.0))
    ex = STRATEGIES["exclusivefl"]({}, ctx(BUDGETS, fraction=1.0))
    c = ctx(BUDGETS).clients
    assert fed.plan_round(1, zeros(), c).client_ids == tuple(range(8))
    plan = ex.plan_round(1, zeros(), c)
    assert plan.stage_id == "full" and plan.client_ids == (2, 3, 6, 7)  # budget >= 40 MB or unconstrained
    assert not fed.respects_budgets and ex.respects_budgets
    assert fed.plan_round(31, zeros(), c) is None
    with pytest.raises(HostError, match="no client budget fits the full model"):
        STRATEGIES["exclusivefl"]({}, ctx([10.0, 20.0]))


def test_aggregate_touches_only_the_planned_stage() -> None:
    fed = STRATEGIES["profl"]({"shrink_rounds": 0}, ctx(BUDGETS))
    plan = fed.plan_round(1, zeros(), ctx(BUDGETS).clients)
    assert plan.stage_id == "grow-1"
    results = [ClientResult(c, {n: np.full(4, float(c), np.float32) for n in
                                [t.name for t in stages()["grow-1"].trainable]}, 100 + c) for c in plan.client_ids]
    new = fed.aggregate(1, plan, zeros(), results)
    counts = np.array([100 + c for c in plan.client_ids], float)
    expected = float((counts * np.array(plan.client_ids)).sum() / counts.sum())
    np.testing.assert_allclose(new["blocks.0.w"], expected, rtol=1e-6)
    np.testing.assert_array_equal(new["blocks.1.w"], 0.0)


def test_profl_schedule_eligibility_teacher_and_output_module_init() -> None:
    calls = []

    def logits_fn(weights, target: EvalTarget, x):
        calls.append(target)
        return np.ones((len(x), 10), np.float32)

    c = ctx(BUDGETS, rounds=20, fraction=1.0, logits_fn=logits_fn)
    s = STRATEGIES["profl"]({"shrink_rounds": 1, "em_window": 2}, c)
    w = zeros()
    seen = []
    for rnd in range(1, 4):
        plan = s.plan_round(rnd, w, c.clients)
        seen.append(plan.stage_id)
        for cid in plan.client_ids:
            assert BUDGETS[cid] is None or FOOTPRINT[plan.stage_id] <= BUDGETS[cid]
        if plan.stage_id == "shrink-2":
            extra = s.extra_inputs(plan, w, np.zeros((3, 3), np.float32))
            assert extra["teacher"].shape == (3, 10) and calls[-1] == EvalTarget("shrunk", 3)
        if rnd == 3:  # growing starts: output modules take the (trained) basic layers and head
            w["basic_layers.2.w"][:] = 3.0
            w["head.w"][:] = 9.0
        w = s.begin_round(rnd, plan, w)
        s.after_round(rnd, w, {})
    assert seen == ["shrink-3", "shrink-2", "grow-1"]
    np.testing.assert_array_equal(w["output_modules.0.layers.2.w"], 3.0)
    np.testing.assert_array_equal(w["output_modules.1.head.w"], 9.0)
    # grow-1 (25 MB) excludes the 20 and 12 MB clients
    assert 4 not in s.plan_round(4, w, c.clients).client_ids


def test_profl_freezes_on_low_effective_movement_and_on_the_cap() -> None:
    c = ctx(BUDGETS, rounds=40, fraction=1.0)
    s = STRATEGIES["profl"]({"shrink_rounds": 0, "em_window": 2, "em_threshold": 0.3,
                             "min_rounds_per_block": 3, "max_rounds_per_block": 6}, c)
    w = zeros()
    rnd = 1
    # block 1 oscillates: EM = 0 once the window is full -> frozen after min_rounds (3)
    for i in range(3):
        plan = s.plan_round(rnd, w, c.clients)
        assert plan.stage_id == "grow-1"
        w = dict(w, **{"blocks.0.w": np.full(4, (-1.0) ** i, np.float32)})
        events = s.after_round(rnd, w, {})
        rnd += 1
    assert [e.kind for e in events] == ["effective_movement", "block_frozen"] and events[1].data["reason"] == "em"
    # block 2 drifts steadily: EM = 1, never below the threshold -> frozen by the cap (6 rounds)
    for i in range(6):
        plan = s.plan_round(rnd, w, c.clients)
        assert plan.stage_id == "grow-2"
        w = dict(w, **{"blocks.1.w": np.full(4, float(i), np.float32)})
        events = s.after_round(rnd, w, {})
        rnd += 1
    assert events[-1].kind == "block_frozen" and events[-1].data["reason"] == "cap"
    assert abs(events[0].data["em"] - 1.0) < 1e-9
    assert s.plan_round(rnd, w, c.clients).stage_id == "grow-3"


def test_profl_state_roundtrip_continues_identically() -> None:
    c = ctx(BUDGETS, rounds=40, fraction=1.0)
    params = {"shrink_rounds": 0, "em_window": 3, "em_threshold": 0.2}
    a = STRATEGIES["profl"](params, c)
    rng = np.random.default_rng(0)
    ws = [dict(zeros(), **{"blocks.0.w": rng.normal(size=4).astype(np.float32)}) for _ in range(12)]
    for r in range(1, 6):
        a.plan_round(r, ws[r], c.clients)
        a.after_round(r, ws[r], {})
    b = STRATEGIES["profl"](params, c)
    b.load_state_dict(a.state_dict())
    for r in range(6, 12):
        pa, pb = a.plan_round(r, ws[r], c.clients), b.plan_round(r, ws[r], c.clients)
        assert pa == pb
        assert [e.data for e in a.after_round(r, ws[r], {})] == [e.data for e in b.after_round(r, ws[r], {})]


def test_profl_auto_cap_fits_every_block_into_the_rounds() -> None:
    c = ctx(BUDGETS, rounds=12, fraction=1.0)
    s = STRATEGIES["profl"]({"shrink_rounds": 1, "em_threshold": 0.0}, c)  # EM never triggers
    stages_run = []
    for r in range(1, 13):
        plan = s.plan_round(r, zeros(), c.clients)
        stages_run.append(plan.stage_id)
        s.after_round(r, zeros(), {})
    assert stages_run[:2] == ["shrink-3", "shrink-2"]
    assert stages_run[2:] == ["grow-1"] * 3 + ["grow-2"] * 3 + ["grow-3"] * 4


def test_neulite_progressive_and_round_robin_schedules() -> None:
    c = ctx(BUDGETS, rounds=9, fraction=1.0)
    prog = STRATEGIES["neulite"]({}, c)
    rr = STRATEGIES["neulite"]({"schedule": "round_robin"}, c)
    assert [prog.plan_round(r, zeros(), c.clients).stage_id for r in range(1, 10)] == \
        ["neulite-1"] * 3 + ["neulite-2"] * 3 + ["neulite-3"] * 3
    assert [rr.plan_round(r, zeros(), c.clients).stage_id for r in range(1, 7)] == \
        ["neulite-1", "neulite-2", "neulite-3"] * 2
    plan = prog.plan_round(1, zeros(), c.clients)
    assert all(BUDGETS[i] is None or BUDGETS[i] >= 26.0 for i in plan.client_ids)


def test_bad_params_name_the_field() -> None:
    with pytest.raises(HostError, match=r"strategy.em_threshold"):
        STRATEGIES["profl"]({"em_threshold": 2.0}, ctx(BUDGETS))
    with pytest.raises(HostError, match=r"strategy.typo"):
        STRATEGIES["profl"]({"typo": 1}, ctx(BUDGETS))
    with pytest.raises(HostError, match=r"strategy.schedule"):
        STRATEGIES["neulite"]({"schedule": "zigzag"}, ctx(BUDGETS))
    with pytest.raises(HostError, match="no client budget fits ProFL stage 'grow-1'"):
        STRATEGIES["profl"]({}, ctx([12.0, 20.0]))


def test_accuracy_benchmark_budgets_put_half_the_clients_below_the_full_model() -> None:
    """benchmarks/accuracy: half U[0.5F, F), half U[F, 1.5F], in a seeded random order (not sorted by client)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy"
    loader = SourceFileLoader("fedblocks_accuracy_benchmark", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    bench = importlib.util.module_from_spec(spec)
    loader.exec_module(bench)
    full = 65.68
    budgets = bench.assign_budgets(20, full, seed=0)
    assert budgets == bench.assign_budgets(20, full, seed=0) != bench.assign_budgets(20, full, seed=1)
    below = [b for b in budgets if b < full]
    assert len(below) == 10 and all(0.5 * full <= b for b in below)
    assert all(full <= b <= 1.5 * full for b in budgets if b >= full)
    assert list(budgets) != sorted(budgets)
    assert len(bench.assign_budgets(7, full, seed=3)) == 7 and sum(b < full for b in bench.assign_budgets(7, full, 3)) == 3
    assert bench.assign_budgets(20, full, seed=0, fit_fraction=0.5) == budgets  # the default draws the same
    few = bench.assign_budgets(20, full, seed=0, fit_fraction=0.1)
    assert sum(b >= full for b in few) == 2 and all(0.5 * full <= b <= 1.5 * full for b in few)
    assert sum(b >= full for b in bench.assign_budgets(20, full, seed=0, fit_fraction=1.0)) == 20
    # target 1 against the unconstrained reference: ExclusiveFL + 10 points - FedAvg
    assert bench.target_1_over_fedavg({"fedavg": 0.496, "exclusivefl": 0.435, "profl": 0.499}) == pytest.approx(0.039)
    assert bench.target_1_over_fedavg({"fedavg": 0.496, "exclusivefl": 0.353}) == pytest.approx(-0.043)
    assert bench.target_1_over_fedavg({"fedavg": 0.496, "profl": 0.5}) is None
    assert bench.target_1_over_fedavg({"fedavg": None, "exclusivefl": 0.4}) is None
