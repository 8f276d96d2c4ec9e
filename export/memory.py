"""Training-memory footprint of a stage: predicted (meta device) and measured (real tensors).

predict_footprint runs the stage once forward and backward on the META device (shapes
only: no data, no compute; ~0.1 s for a ResNet-18 stage) and counts with torch's own
mechanisms what a real step holds:
- params_bytes:      every parameter AND buffer the stage holds (trainable, frozen, running stats);
- grads_bytes:       one gradient per trainable parameter;
- optimizer_bytes:   SGD with momentum: one buffer per trainable parameter; SGD without: 0;
                     Adam/AdamW: two;
- activations_bytes: tensors autograd saves for backward (torch.autograd.graph.saved_tensors_hooks,
                     deduplicated by storage, parameters and buffers excluded; a frozen prefix under
                     torch.no_grad() saves nothing) PLUS the largest transient: the biggest total
                     output of one operator in forward or backward (e.g. a gradient being formed).
Allocator slack, the engine's own runtime and framework overheads are not included: a
device's measured peak RSS lies above this by a roughly constant offset.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fedblocks.export.errors import ExportError
from fedblocks.export.stages import StageProgram

_OPTIMIZER_SLOTS = {"sgd": 0, "adam": 2, "adamw": 2}


@dataclass
class Footprint:
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes

    def to_dict(self, batch_size: int) -> dict[str, int]:
        """The manifest's "memory" object."""
        return {"batch_size": batch_size, "params_bytes": self.params_bytes, "grads_bytes": self.grads_bytes,
                "optimizer_bytes": self.optimizer_bytes, "activations_bytes": self.activations_bytes,
                "total_bytes": self.total_bytes}


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def input_batch_bytes(stage: StageProgram, batch_size: int) -> int:
    """Bytes of one step's inputs (images, labels, teacher logits) at ``batch_size``.

    The device runtime gathers every batch from its shard after the baseline is taken, and ORT
    and ExecuTorch read their inputs from the caller's buffers, so the engine plans leave it out.
    """
    import numpy as np

    return sum(int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
               for s in stage.input_specs(batch_size))


class _SavedTensorCounter:
    """saved_tensors_hooks pack hook: sums the storages autograd keeps, each storage once."""

    def __init__(self, exclude: list[Tensor]) -> None:
        self.keep: list[Tensor] = []  # holds storages alive so their keys stay unique
        self.seen: set[int] = {t.untyped_storage()._cdata for t in exclude}
        self.bytes = 0

    def pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.seen:
            self.seen.add(key)
            self.keep.append(t)
            self.bytes += storage.nbytes()
        return t


def _stage_tensors(stage: StageProgram) -> list[Tensor]:
    return [*stage.parameters(), *stage.buffers()]


def measure_saved_activation_bytes(stage: StageProgram, inputs: tuple[Tensor, ...]) -> int:
    """Bytes of the tensors autograd saves for backward in one forward of `stage` on `inputs`.

    torch's own accounting (saved_tensors_hooks), deduplicated by storage; parameters and
    buffers are not activations and are excluded. Runs one real forward (no backward).
    """
    counter = _SavedTensorCounter(_stage_tensors(stage))
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        stage(*inputs)
    return counter.bytes


class _LargestOpOutput(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        leaves, _ = tree_flatten(out)
        self.largest = max(self.largest, sum(_nbytes(t) for t in leaves if isinstance(t, Tensor)))
        return out


def _meta_copy(stage: StageProgram) -> StageProgram:
    meta = copy.deepcopy(stage)
    meta.to("meta")
    return meta


def predict_saved_and_transient_bytes(stage: StageProgram, batch_size: int) -> tuple[int, int]:
    """(saved-for-backward bytes, largest single-operator output bytes) of one train step, on meta."""
    meta = _meta_copy(stage)
    inputs = tuple(t.to("meta") for t in stage.example_inputs(batch_size))
    counter = _SavedTensorCounter(_stage_tensors(meta))
    tracker = _LargestOpOutput()
    with tracker:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            outputs = meta(*inputs)
        if outputs[0].requires_grad:
            outputs[0].backward()
    return counter.bytes, tracker.largest


def predict_footprint(stage: StageProgram, batch_size: int, optimizer: str = "sgd",
                      momentum: bool = False) -> Footprint:
    """Predicted training footprint of one step of `stage` at `batch_size` (see module doc)."""
    if optimizer not in _OPTIMIZER_SLOTS:
        raise ExportError(f"unknown optimizer '{optimizer}': choose one of {', '.join(_OPTIMIZER_SLOTS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ExportError(f"batch size must be a positive integer, got {batch_size!r}")
    params = sum(_nbytes(t) for t in _stage_tensors(stage))
    grads = sum(_nbytes(p) for p in stage.parameters() if p.requires_grad)
    slots = _OPTIMIZER_SLOTS[optimizer] + (1 if optimizer == "sgd" and momentum else 0)
    saved, transient = predict_saved_and_transient_bytes(stage, batch_size)
    return Footprint(params, grads, slots * grads, saved + transient)
