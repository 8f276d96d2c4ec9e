"""ExecuTorch training program (.pte), executorch 1.5.1.

Path: ``rewrite_for_engine(stage, "executorch")`` (Conv2d -> unfold + matmul, so
the backward runs through matmul kernels instead of the portable
convolution_backward, which is ~170x slower; BatchNorm is already explicit
mean/var math) -> ``torch.export.export`` -> ``_export_forward_backward`` (joint
forward + backward graph; the loss is output 0) -> ``to_edge`` ->
``to_executorch`` -> ``.buffer``.

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

import torch
from torch import Tensor, nn

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
    require_modules(ENGINE, "executorch.exir", "executorch.extension.training")


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


def program_inputs(stage: nn.Module, example_inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Stage inputs followed by the frozen tensors' current values (the .pte's input order)."""
    state = stage.state_dict()
    return (*example_inputs, *(state[s.name].detach().clone() for s in stage.frozen_specs()))


def build(stage: nn.Module, example_inputs: tuple[Tensor, ...], workdir: Path) -> dict[str, Path]:
    check_available()
    from executorch.exir import to_edge
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
            buffer = to_edge(program).to_executorch().buffer
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
