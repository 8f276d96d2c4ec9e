"""Effective movement on synthetic parameter sequences, against the formula."""

from __future__ import annotations

import numpy as np

from fedblocks.host.convergence import EffectiveMovementTracker, effective_movement


def em_by_formula(seq: list[np.ndarray], t: int, w: int) -> float:
    num = np.abs(seq[t] - seq[t - w]).sum()
    den = sum(np.abs(seq[i] - seq[i - 1]).sum() for i in range(t - w + 1, t + 1))
    return float(num / den)


def test_steady_drift_gives_one() -> None:
    seq = [np.full(50, 0.1 * i) for i in range(10)]
    assert abs(effective_movement(seq, 6) - 1.0) < 1e-12


def test_oscillation_gives_about_zero() -> None:
    seq = [np.full(50, 1.0 if i % 2 else -1.0) for i in range(13)]  # even window: back where it started
    assert effective_movement(seq, 6) == 0.0
    noisy = [np.full(50, 5.0) + np.random.default_rng(i).normal(0, 1, 50) for i in range(13)]
    assert effective_movement(noisy, 6) < 0.35  # random walk around a point: net << path


def test_matches_formula_on_a_random_walk_with_drift() -> None:
    rng = np.random.default_rng(3)
    steps = rng.normal(0.05, 0.2, size=(12, 40))
    seq = list(np.cumsum(np.vstack([np.zeros((1, 40)), steps]), axis=0))
    for w in (2, 3, 6):
        assert abs(effective_movement(seq, w) - em_by_formula(seq, len(seq) - 1, w)) < 1e-12
    assert effective_movement(seq[:6], 6) is None  # needs W + 1 observations


def test_tracker_samples_a_fixed_subset_and_follows_the_formula() -> None:
    shapes = {"blocks.0.conv.weight": (64, 64, 3, 3), "blocks.0.bn.weight": (64,)}
    t1 = EffectiveMovementTracker(list(shapes), shapes, window=3, seed=11)
    t2 = EffectiveMovementTracker(list(reversed(list(shapes))), shapes, window=3, seed=11)
    assert len(t1.flat_index) == 10_000  # 36,928 scalars, capped at 10,000
    np.testing.assert_array_equal(t1.flat_index, t2.flat_index)  # same seed, any name order -> same sample
    rng = np.random.default_rng(0)
    weights = {n: rng.normal(size=s) for n, s in shapes.items()}
    flats = []
    ems = []
    for _ in range(6):
        weights = {n: v + rng.normal(0.01, 0.05, size=v.shape) for n, v in weights.items()}
        ems.append(t1.observe(weights))
        flats.append(t1.sample(weights))
    assert ems[:3] == [None, None, None]
    assert abs(ems[-1] - em_by_formula(flats, 5, 3)) < 1e-12
    state = t1.state_dict()
    t3 = EffectiveMovementTracker(list(shapes), shapes, window=3, seed=11)
    t3.load_state_dict(state)
    nxt = {n: v + 0.1 for n, v in weights.items()}
    assert t3.observe(nxt) == t1.observe(nxt)


def test_regimes_either_side_of_the_default_threshold() -> None:
    """Why em_threshold = 0.25 with W = 6 (docs/strategies.md): over many scalars, a block whose global
    weights only fluctuate around a fixed point (converged, iid round noise) gives EM -> 1/W = 0.167;
    one still taking unbiased random steps (a random walk: not converged) gives EM -> 1/sqrt(W) = 0.408;
    steady drift gives 1."""
    rng = np.random.default_rng(7)
    w, n = 6, 10_000
    centre = rng.normal(size=n)
    converged = [centre + rng.normal(0, 0.1, n) for _ in range(w + 1)]
    walk = list(np.cumsum(rng.normal(0, 0.1, size=(w + 1, n)), axis=0))
    em_converged, em_walk = effective_movement(converged, w), effective_movement(walk, w)
    assert em_converged is not None and em_walk is not None
    assert abs(em_converged - 1 / w) < 0.01
    assert abs(em_walk - 1 / np.sqrt(w)) < 0.01
    assert em_converged < 0.25 < em_walk
