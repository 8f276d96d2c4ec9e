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

from abc import ABC, abstractmethod

import numpy as np

from ..spec import OptimizerConfig, StageSpec


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
