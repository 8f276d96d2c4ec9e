"""The interface every on-device training engine adapter implements.

An adapter loads one stage's artifacts, moves weights in and out BY NAME as numpy
arrays, and runs one training step with torch.optim.SGD semantics. BatchNorm
running statistics are updated from the stage's extra outputs
(running = (1-m)*running + m*batch) so they evolve identically in every engine.
Adapters import only numpy and their own engine.

Threads: the runtime exports the job's `training.threads` to the training process as
FEDBLOCKS_THREADS (and OMP/MKL/OPENBLAS_NUM_THREADS). Engines that do not read those
variables themselves (ONNX Runtime: SessionOptions.intra_op_num_threads) must apply
FEDBLOCKS_THREADS when it is set, so engines are compared at the same thread count.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

import numpy as np

from ..spec import OptimizerConfig, StageSpec

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
PINNED_MMAP_THRESHOLD = 128 * 1024


def threads_from_env() -> int | None:
    """FEDBLOCKS_THREADS as a positive int, or None when unset / not a positive number."""
    value = os.environ.get("FEDBLOCKS_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def pin_mmap_threshold(nbytes: int = PINNED_MMAP_THRESHOLD) -> bool:
    """Make the C allocator hand large blocks back to the system when they are freed.

    glibc raises its mmap threshold after the first large free (up to 32 MiB), so later
    large frees stay in its heap and the process RSS ratchets up instead of dropping:
    per-step gradient outputs (ExecuTorch) or freed activations (recompute in a split job)
    would then count as footprint. A fixed threshold (mallopt) turns that off. True when
    the allocator took it (glibc; bionic ignores the parameter).
    """
    try:
        import ctypes

        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


def trim_heap() -> bool:
    """Hand the C allocator's free memory back to the system (glibc malloc_trim).

    Called just before the baseline is taken: memory freed while loading (the weights file,
    the engine's load-time scratch) would otherwise stay resident in the heap and silently
    absorb the first training allocations, so the footprint would read low. False where the
    C library has no malloc_trim.
    """
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


class EngineError(RuntimeError):
    """The engine could not load or run the stage (message says which artifact/op)."""


class TrainingEngine(ABC):
    name: str = ""
    # artifact roles this engine needs, e.g. ("training_model", "eval_model", "optimizer_model", "checkpoint")
    artifact_roles: tuple[str, ...] = ()

    def __init__(self, stage: StageSpec, artifacts: dict[str, str], optimizer: OptimizerConfig) -> None:
        self.stage = stage
        self.optimizer = optimizer

    @abstractmethod
    def set_weights(self, tensors: dict[str, np.ndarray]) -> None:
        """Load trainable (and state) tensors by global name; names/shapes/dtypes are pre-validated."""

    @abstractmethod
    def get_weights(self) -> dict[str, np.ndarray]:
        """Current trainable + state tensors by global name (float32 copies)."""

    @abstractmethod
    def step(self, inputs: dict[str, np.ndarray]) -> float:
        """One forward + backward + SGD update (+ running-stat update); returns the loss."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine resources."""
