"""Partitioners: iid sizes, Dirichlet skew vs alpha, determinism, natural clients, errors."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from fedblocks.host.data import label_skew, partition
from fedblocks.host.errors import HostError

# the package exports the function `partition`, which shadows the submodule's attribute name
partition_module = importlib.import_module("fedblocks.host.data.partition")
LABELS = np.repeat(np.arange(10), 1000).astype(np.int64)  # 10 balanced classes, 10,000 samples


def _assert_disjoint(parts: list[np.ndarray], n: int, complete: bool) -> None:
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert np.unique(joined).shape[0] == joined.shape[0], "clients share samples"
    assert joined.min() >= 0 and joined.max() < n
    if complete:
        assert joined.shape[0] == n
    for p in parts:
        assert np.all(np.diff(p) > 0), "index arrays are sorted"


def test_iid_equal_sizes_and_low_skew() -> None:
    parts = partition(LABELS, 7, "iid", seed=1)
    assert sorted({len(p) for p in parts}) == [1428, 1429]
    _assert_disjoint(parts, LABELS.shape[0], complete=True)
    assert label_skew(LABELS, parts) < 0.05
    fixed = partition(LABELS, 20, "iid", samples_per_client=100, seed=1)
    assert [len(p) for p in fixed] == [100] * 20
    _assert_disjoint(fixed, LABELS.shape[0], complete=False)
    with pytest.raises(HostError, match=r"200 clients x 100 samples = 20000 > 10000 available"):
        partition(LABELS, 200, "iid", samples_per_client=100)


def test_dirichlet_skew_decreases_with_alpha() -> None:
    skews = []
    for alpha in (0.05, 0.5, 100.0):
        parts = partition(LABELS, 20, "dirichlet", alpha=alpha, seed=0)
        _assert_disjoint(parts, LABELS.shape[0], complete=True)
        assert min(len(p) for p in parts) >= 10
        skews.append(label_skew(LABELS, parts))
    assert skews[0] > skews[1] > skews[2]
    assert skews[0] > 0.6 and skews[2] < 0.1


def test_dirichlet_fixed_size_skew_and_sizes() -> None:
    skews = []
    for alpha in (0.1, 1.0, 100.0):
        parts = partition(LABELS, 40, "dirichlet", alpha=alpha, seed=3, samples_per_client=200)
        assert [len(p) for p in parts] == [200] * 40
        _assert_disjoint(parts, LABELS.shape[0], complete=False)
        skews.append(label_skew(LABELS, parts))
    assert skews[0] > skews[1] > skews[2]
    # every sample is used when clients x samples == dataset size
    full = partition(LABELS, 50, "dirichlet", alpha=0.5, seed=3, samples_per_client=200)
    _assert_disjoint(full, LABELS.shape[0], complete=True)


def test_partition_is_deterministic_per_seed() -> None:
    for kwargs in ({"scheme": "iid"}, {"scheme": "dirichlet", "alpha": 0.3},
                   {"scheme": "dirichlet", "alpha": 0.3, "samples_per_client": 50}):
        a = partition(LABELS, 12, seed=5, **kwargs)
        b = partition(LABELS, 12, seed=5, **kwargs)
        c = partition(LABELS, 12, seed=6, **kwargs)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_min_samples_is_enforced_or_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    parts = partition(LABELS, 50, "dirichlet", alpha=0.3, seed=2, min_samples=30)
    assert min(len(p) for p in parts) >= 30
    monkeypatch.setattr(partition_module, "MAX_DIRICHLET_ATTEMPTS", 20)
    with pytest.raises(HostError, match=r"after 20 Dirichlet draws .* fewer than 150 samples"):
        partition(LABELS, 60, "dirichlet", alpha=0.01, seed=2, min_samples=150)


def test_natural_clients() -> None:
    natural = [np.arange(0, 40), np.arange(40, 45), np.arange(45, 100), np.arange(100, 180)]
    y = np.zeros(180, dtype=np.int64)
    parts = partition(y, 3, "natural", natural=natural, seed=0, min_samples=10)
    # the 5-sample client is never chosen; the three others are
    assert sorted(len(p) for p in parts) == [40, 55, 80]
    capped = partition(y, 2, "natural", natural=natural, seed=0, samples_per_client=30)
    assert [len(p) for p in capped] == [30, 30]
    assert all(np.all(np.isin(p, natural[0]) | np.isin(p, natural[2]) | np.isin(p, natural[3])) for p in capped)
    with pytest.raises(HostError, match="only 3 natural clients with >= 10 samples"):
        partition(y, 4, "natural", natural=natural)
    with pytest.raises(HostError, match="needs a dataset with its own clients"):
        partition(y, 2, "natural")


def test_bad_arguments_are_host_errors() -> None:
    with pytest.raises(HostError, match="unknown scheme 'shards'"):
        partition(LABELS, 3, "shards")
    with pytest.raises(HostError, match="alpha must be > 0"):
        partition(LABELS, 3, "dirichlet", alpha=0.0)
    with pytest.raises(HostError, match="positive integer"):
        partition(LABELS, 0, "iid")
    with pytest.raises(HostError, match="1-D integer array"):
        partition(LABELS.astype(np.float32), 3, "iid")
