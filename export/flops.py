"""Floating-point operation counts of a stage, by torch's own FlopCounterMode (on the meta device)."""

from __future__ import annotations

import copy

from torch.utils.flop_counter import FlopCounterMode

from fedblocks.export.stages import StageProgram


def stage_flops(stage: StageProgram, batch_size: int) -> dict[str, int]:
    """{"forward": FLOPs of one forward, "train_step": forward + backward} at `batch_size`.

    Counts what FlopCounterMode counts (matmul, conv, attention... : 2 FLOPs per
    multiply-add); elementwise ops are not counted. The optimizer update is not included.
    """
    meta = copy.deepcopy(stage)
    meta.to("meta")
    inputs = tuple(t.to("meta") for t in stage.example_inputs(batch_size))
    counter = FlopCounterMode(display=False)
    with counter:
        outputs = meta(*inputs)
    forward = counter.get_total_flops()
    with counter:  # re-entering resets the counts
        outputs = meta(*inputs)
        if outputs[0].requires_grad:
            outputs[0].backward()
    return {"forward": int(forward), "train_step": int(counter.get_total_flops())}
