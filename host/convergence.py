"""ProFL's convergence signal: effective movement (EM) of a block's parameters.

EM_t = ||w_t - w_{t-W}||_1 / sum_{i=t-W+1..t} ||w_i - w_{i-1}||_1  (research/methods.md)

measured on a fixed random sample of up to 10,000 scalar parameters of the active
block (seeded, so a resumed run samples the same scalars). EM is near 1 while the
parameters drift steadily in one direction and near 0 once they only oscillate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MAX_SAMPLED_SCALARS = 10_000


def effective_movement(history: Sequence[np.ndarray], window: int) -> float | None:
    """EM over the last `window` steps of `history` (w_0 .. w_t); None until t >= window."""
    if window < 1:
        raise ValueError("window must be >= 1")
    if len(history) < window + 1:
        return None
    seq = [np.asarray(w, dtype=np.float64) for w in history[-(window + 1):]]
    net = float(np.abs(seq[-1] - seq[0]).sum())
    path = float(sum(np.abs(seq[i] - seq[i - 1]).sum() for i in range(1, len(seq))))
    if path == 0.0:
        return 0.0  # nothing moved at all: as converged as it gets
    return net / path


class EffectiveMovementTracker:
    """Samples a fixed subset of one block's scalars and computes EM after each round."""

    def __init__(self, names: Sequence[str], shapes: Mapping[str, tuple[int, ...]], window: int,
                 seed: int, max_scalars: int = MAX_SAMPLED_SCALARS) -> None:
        self.names = sorted(names)  # sorted: the sample must not depend on dict order
        self.window = window
        sizes = [int(np.prod(shapes[n])) if shapes[n] else 1 for n in self.names]
        total = int(sum(sizes))
        rng = np.random.default_rng(seed)
        count = min(max_scalars, total)
        self.flat_index = np.sort(rng.choice(total, size=count, replace=False)) if total else np.zeros(0, int)
        self.offsets = np.cumsum([0, *sizes])
        self.history: list[np.ndarray] = []

    def sample(self, weights: Mapping[str, np.ndarray]) -> np.ndarray:
        flat = np.concatenate([np.asarray(weights[n], dtype=np.float64).ravel() for n in self.names]) \
            if self.names else np.zeros(0)
        return flat[self.flat_index]

    def observe(self, weights: Mapping[str, np.ndarray]) -> float | None:
        """Record w_t (global weights after a round) and return EM_t (None while warming up)."""
        self.history.append(self.sample(weights))
        # keep only what the window needs
        self.history = self.history[-(self.window + 1):]
        return effective_movement(self.history, self.window)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [h.tolist() for h in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = [np.asarray(h, dtype=np.float64) for h in state.get("history", [])]
