"""ExecuTorch training program (.pte), executorch 1.5.1.

Path: ``rewrite_for_engine(stage, "executorch")`` (Conv2d -> channels-last im2col +
one bmm, so forward and backward run through matrix multiplies instead of the
portable convolution / convolution_backward kernels, which are ~100-170x slower;
BatchNorm is already explicit mean/var math) -> ``torch.export.export`` ->
``_export_forward_backward`` (joint forward + backward graph; the loss is output 0)
-> ``to_edge_transform_and_lower`` with the XNNPACK partitioner (``lower``: bmm and
the elementwise / copy ops, none of the configs that bake a weight) -> ``to_executorch``.

Program signature: ``forward(*stage_inputs, *frozen_tensors)``. ExecuTorch bakes
non-trainable weights into the program as constants, and a device must be able
to replace frozen blocks by name (ProFL freezes blocks trained in earlier stages),
so every tensor of the stage's ``frozen`` list is a program input, in that order,
after the stage inputs. Their export-time values ship beside the program as the
``frozen`` artifact (an .npz by global name), the defaults a device uses when a job
does not set them. Trainable parameters are the program's parameters, named by
their global names (``TrainingModule.named_parameters()``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedblocks.device_runtime.engines.sgd import sgd_scratch_floats
from fedblocks.export.builders import failing_operator, first_line, require_modules, stage_label
from fedblocks.export.errors import ExportError
from fedblocks.export.weights import weights_to_bytes

ENGINE = "executorch"
ROLES: dict[str, str] = {"program": "pte", "frozen": "npz"}


# Loggers that warn on every import of executorch (torchao's optional CUDA kernels, a torch
# pytree deprecation); silenced so a CLI error stays one line.
_IMPORT_NOISE = ("torchao", "torch.utils._pytree")


def check_available() -> None:
    for name in _IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)
    require_modules(ENGINE, "executorch.exir", "executorch.extension.training",
                    "executorch.backends.xnnpack.partition.xnnpack_partitioner")


class FrozenAsInputs(nn.Module):
    """``forward(*inputs, *frozen)`` = stage(*inputs) with the frozen tensors taken from the inputs.

    The wrapper registers the stage's child modules directly (so parameter names
    stay global) but with the frozen tensors removed from them; they are bound per
    call with ``torch.func.functional_call``.
    """

    def __init__(self, stage: nn.Module, frozen_names: list[str]) -> None:
        super().__init__()
        inner = copy.deepcopy(stage)
        for name in frozen_names:
            owner, _, leaf = name.rpartition(".")
            module = inner.get_submodule(owner)
            module._parameters.pop(leaf, None)
            module._buffers.pop(leaf, None)
        for key, child in inner._modules.items():
            self._modules[key] = child
        self._inner = (inner,)  # a tuple: not registered twice as a submodule
        self._frozen_names = list(frozen_names)

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        n_inputs = len(args) - len(self._frozen_names)
        frozen = dict(zip(self._frozen_names, args[n_inputs:], strict=True))
        outputs = torch.func.functional_call(self._inner[0], frozen, args[:n_inputs], strict=False)
        # Only the loss may carry a gradient into the joint graph.
        return (outputs[0], *(o.detach() for o in outputs[1:]))


# XNNPACK partitioner configs whose weight operand becomes a constant inside the delegate.
_STATIC_WEIGHT_CONFIGS = ("LinearConfig", "AddmmConfig", "MMConfig", "ConvolutionConfig", "BatchNormConfig",
                          "PreluConfig")


def lower(joint_program: torch.export.ExportedProgram, trainable: list[str]) -> Any:
    """The joint forward/backward program in ExecuTorch's edge dialect, its bmm delegated to XNNPACK.

    XNNPACK (ExecuTorch's CPU backend, in its Python bindings and Android builds) runs the
    convolutions' batch-1 bmm (UnfoldConv2d) forward and backward and the elementwise,
    copy and reduction ops around them; their operands are runtime tensors computed in the
    graph, so trained weights are read afresh every step (checked: after an SGD update the
    delegate's loss follows torch's). Not offered to XNNPACK: the configs that take a
    weight operand as a constant (linear, addmm, mm, convolution, batch norm, prelu), which
    would freeze that parameter (seen with all configs: a Linear bias vanished from the
    program's parameters). If a trainable tensor is not a program parameter after
    lowering anyway, the program is built without XNNPACK.
    """
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge, to_edge_transform_and_lower

    configs = [c for c in ALL_PARTITIONER_CONFIGS if c.__name__ not in _STATIC_WEIGHT_CONFIGS]
    lowered = to_edge_transform_and_lower(copy.deepcopy(joint_program),
                                          partitioner=[XnnpackPartitioner(configs=configs)])
    signature = lowered.exported_program().graph_signature
    if set(trainable) <= set(signature.parameters):
        return lowered
    return to_edge(joint_program)


def program_inputs(stage: nn.Module, example_inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Stage inputs followed by the frozen tensors' current values (the .pte's input order)."""
    state = stage.state_dict()
    return (*example_inputs, *(state[s.name].detach().clone() for s in stage.frozen_specs()))


def build(stage: nn.Module, example_inputs: tuple[Tensor, ...], workdir: Path) -> dict[str, Path]:
    check_available()
    from torch.export.experimental import _export_forward_backward

    from fedblocks.export.rewrites import rewrite_for_engine

    rewritten = rewrite_for_engine(stage, "executorch")
    wrapper = FrozenAsInputs(rewritten, [s.name for s in stage.frozen_specs()])
    inputs = program_inputs(stage, example_inputs)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.export.export(wrapper, inputs, strict=False)
            program = _export_forward_backward(program)
            buffer = lower(program, [s.name for s in stage.trainable_specs()]).to_executorch().buffer
    except Exception as exc:
        op = failing_operator(exc)
        what = f"operator {op} is not supported" if op else first_line(exc)
        raise ExportError(f"engine 'executorch' cannot export {stage_label(stage)}: {what}") from None
    path = workdir / "program.pte"
    path.write_bytes(buffer)
    frozen_path = workdir / "frozen.npz"
    frozen_names = [s.name for s in stage.frozen_specs()]
    frozen_path.write_bytes(weights_to_bytes(dict(zip(frozen_names, (t.numpy() for t in inputs[len(example_inputs):]),
                                                      strict=True))))
    return {"program": path, "frozen": frozen_path}


PREDICT_MEMORY_NEEDS_ARTIFACTS = True  # predict_memory reads the program's memory plan


def planned_memory_bytes(program_path: Path) -> int:
    """Bytes of the memory-planned buffers of the program's ``forward`` (the .pte's non_const_buffer_sizes).

    ExecuTorch plans every intermediate of the joint forward/backward graph into these
    buffers at export; the runtime allocates them when the method loads.
    """
    from executorch.exir._serialize._program import deserialize_pte_binary

    loaded = deserialize_pte_binary(Path(program_path).read_bytes())
    program = getattr(loaded, "program", loaded)
    plans = [p for p in program.execution_plan if p.name == "forward"] or list(program.execution_plan)
    return int(sum(plans[0].non_const_buffer_sizes))


def predict_memory(stage: nn.Module, files: dict[str, Path], batch_size: int) -> dict[str, Any]:
    """``memory.engines.executorch``: what training this stage costs on the device runtime's ExecuTorch adapter.

    ExecuTorch plans every activation of the joint graph at export (``planned_bytes``); the
    adapter loads the program and runs its warm-up step before the baseline is taken, so
    those buffers are in the baseline RSS, not in the footprint (they are in total_bytes).
    What a step adds is the gradients the training module hands out as fresh tensors each
    step (a transient of exactly the gradient bytes, measured on ResNet-18 stages), the
    step's input batch, which the runtime gathers from the shard, and, with momentum, one
    gradient-sized buffer per trainable tensor.
    """
    from fedblocks.export.memory import input_batch_bytes

    trainable = [t for t in stage.parameters() if t.requires_grad]
    grads = sum(t.numel() * t.element_size() for t in trainable)
    params = sum(t.numel() * t.element_size() for t in (*stage.parameters(), *stage.buffers()))
    planned = planned_memory_bytes(files["program"])
    scratch = 4 * sgd_scratch_floats([t.numel() for t in trainable])  # the runtime's one-chunk SGD scratch
    batch = input_batch_bytes(stage, batch_size)
    return {"method": "executorch-memory-plan", "footprint_bytes": grads + batch, "momentum_bytes": grads,
            "total_bytes": params + planned + scratch + grads + batch,
            "detail": {"planned_bytes": planned, "gradient_outputs_bytes": grads, "input_batch_bytes": batch,
                       "sgd_scratch_bytes": scratch}}
