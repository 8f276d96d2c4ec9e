"""FedAvg over one stage's tensors.

Only the tensors the stage trains (trainable + state, i.e. BatchNorm running
statistics) are averaged; every other global tensor is left exactly as it was.
Sample-count weighting is the default; `weighted=False` gives the unweighted mean
the ProFL reference code uses (research/methods.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClientUpdate:
    """One validated client result: its updated stage tensors and how many samples it trained on."""

    client_id: int
    tensors: Mapping[str, np.ndarray]
    num_samples: int


class AggregationError(ValueError):
    """The updates cannot be averaged (none given, or names/shapes disagree)."""


def fedavg(
    global_weights: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    names: Iterable[str],
    weighted: bool = True,
) -> dict[str, np.ndarray]:
    """New global weights: `names` replaced by the (sample-weighted) mean of the updates.

    Accumulates in float64 so the result does not depend on float32 summation order
    beyond the final cast; tensors keep the dtype of the global tensor they replace.
    """
    names = list(names)
    if not updates:
        raise AggregationError("no client updates to aggregate")
    if weighted:
        counts = np.array([u.num_samples for u in updates], dtype=np.float64)
        if np.any(counts < 0) or counts.sum() <= 0:
            raise AggregationError("sample-weighted FedAvg needs positive sample counts")
        coeffs = counts / counts.sum()
    else:
        coeffs = np.full(len(updates), 1.0 / len(updates))
    new = dict(global_weights)
    for name in names:
        if name not in global_weights:
            raise AggregationError(f"tensor '{name}' is not a global model tensor")
        ref = global_weights[name]
        acc = np.zeros(ref.shape, dtype=np.float64)
        for coeff, update in zip(coeffs, updates, strict=True):
            if name not in update.tensors:
                raise AggregationError(f"client {update.client_id} did not return '{name}'")
            t = update.tensors[name]
            if t.shape != ref.shape:
                raise AggregationError(f"client {update.client_id}: '{name}' has shape {t.shape}, expected {ref.shape}")
            acc += coeff * t.astype(np.float64)
        new[name] = acc.astype(ref.dtype)
    return new
