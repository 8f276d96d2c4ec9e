"""torch .pt2 builder: the stage's ExportedProgram, saved with torch.export.save.

torch.export (training IR, the default since torch 2.5) lifts parameters and
buffers to graph inputs and keeps them in the program's state dict, with their
requires_grad flags. ``torch.export.load(path).module()`` therefore returns a
GraphModule whose trainable parameters have ``requires_grad=True`` and whose
frozen ones do not: it trains with plain autograd + torch.optim.SGD, and every
tensor (trainable, frozen, state) can be set by its global name via
``load_state_dict(strict=False)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedblocks.export.builders import first_line, stage_label
from fedblocks.export.errors import ExportError

ENGINE = "torch"
ROLES: dict[str, str] = {"program": "pt2"}


def check_available() -> None:
    """torch is a core dependency: always there."""


def build(stage: nn.Module, example_inputs: tuple[Tensor, ...], workdir: Path) -> dict[str, Path]:
    from fedblocks.export.rewrites import rewrite_for_engine

    stage = rewrite_for_engine(stage, "torch")  # torch BatchNorm -> explicit (zoo models have none)
    try:
        program = torch.export.export(stage, example_inputs, strict=False)
    except Exception as exc:  # torch.export raises many types; report the first line
        raise ExportError(f"engine 'torch' cannot export {stage_label(stage)}: {first_line(exc)}") from None
    path = workdir / "program.pt2"
    torch.export.save(program, path)
    return {"program": path}


def predict_memory(stage: nn.Module, files: dict[str, Path], batch_size: int) -> dict[str, Any]:
    """``memory.engines.torch``: the device runtime's torch adapter trains the .pt2 with autograd.

    Footprint = the gradients (``zero_grad(set_to_none=True)`` frees them every step) + the
    tensors autograd saves + the largest transient, i.e. export/memory.py's engine-agnostic
    estimate; momentum adds one gradient-sized buffer per trainable tensor.
    """
    from fedblocks.export.memory import predict_footprint

    fp = predict_footprint(stage, batch_size, "sgd", momentum=False)  # type: ignore[arg-type]
    footprint = fp.grads_bytes + fp.activations_bytes
    return {"method": "autograd-saved-tensors", "footprint_bytes": footprint, "momentum_bytes": fp.grads_bytes,
            "total_bytes": fp.params_bytes + footprint,
            "detail": {"grads_bytes": fp.grads_bytes, "saved_and_transient_bytes": fp.activations_bytes}}
