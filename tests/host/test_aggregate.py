"""FedAvg over a stage's tensors against hand-computed averages."""

from __future__ import annotations

import numpy as np
import pytest

from fedblocks.host.aggregate import AggregationError, ClientUpdate, fedavg


def _globals() -> dict[str, np.ndarray]:
    return {"a": np.zeros((2,), np.float32), "b.running_mean": np.zeros((1,), np.float32),
            "frozen": np.full((3,), 7.0, np.float32)}


def test_sample_weighted_average_matches_hand_computation() -> None:
    updates = [ClientUpdate(0, {"a": np.array([1.0, 2.0], np.float32), "b.running_mean": np.array([4.0], np.float32)}, 100),
               ClientUpdate(1, {"a": np.array([3.0, 6.0], np.float32), "b.running_mean": np.array([0.0], np.float32)}, 300)]
    new = fedavg(_globals(), updates, ["a", "b.running_mean"], weighted=True)
    # a: (100*[1,2] + 300*[3,6]) / 400 = [2.5, 5.0]; running mean: 100*4/400 = 1.0
    np.testing.assert_allclose(new["a"], [2.5, 5.0])
    np.testing.assert_allclose(new["b.running_mean"], [1.0])
    assert new["a"].dtype == np.float32
    # tensors outside the stage are untouched (same object, same values)
    np.testing.assert_array_equal(new["frozen"], [7.0, 7.0, 7.0])


def test_unweighted_switch_gives_plain_mean() -> None:
    updates = [ClientUpdate(0, {"a": np.array([1.0, 2.0], np.float32)}, 100),
               ClientUpdate(1, {"a": np.array([3.0, 6.0], np.float32)}, 300)]
    new = fedavg(_globals(), updates, ["a"], weighted=False)
    np.testing.assert_allclose(new["a"], [2.0, 4.0])
    np.testing.assert_array_equal(new["b.running_mean"], [0.0])


def test_disagreeing_updates_are_refused() -> None:
    with pytest.raises(AggregationError, match="shape"):
        fedavg(_globals(), [ClientUpdate(0, {"a": np.zeros(3, np.float32)}, 1)], ["a"])
    with pytest.raises(AggregationError, match="did not return"):
        fedavg(_globals(), [ClientUpdate(0, {}, 1)], ["a"])
    with pytest.raises(AggregationError, match="no client updates"):
        fedavg(_globals(), [], ["a"])
