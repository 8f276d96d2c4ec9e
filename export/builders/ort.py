"""ONNX Runtime on-device training artifacts (onnxruntime-training 1.19.2).

Path: ``torch.onnx.export`` (TorchScript exporter, dynamo=False, training mode
preserved, no constant folding so parameters stay initializers under their global
names, opset 17) -> ``onnxruntime.training.artifacts.generate_artifacts`` with

- ``requires_grad`` = the stage's trainable tensors, ``frozen_params`` = every other
  named initializer (frozen weights and frozen BatchNorm running statistics), so
  all of them live in the checkpoint and can be overwritten by name at run time;
- ``loss`` = a pass-through block: the stage program already computes its loss as
  output 0; ``additional_output_names`` keeps the BatchNorm batch statistics;
- ``optimizer`` = SGD. ORT 1.19.2's SGD (SGDOptimizerV2) has no momentum and no
  weight decay; the Python adapter therefore applies torch.optim.SGD itself from
  the gradients ORT computed (``CheckpointState.parameters[name].grad``) and does
  not run this optimizer model. It is shipped for C/Java apps that want plain SGD.

Fixes applied to the generated files: eval_model.onnx BatchNormalization nodes
with 3 outputs and training_mode=0 are cut to one output (ORT refuses to load
them otherwise; research/engines.md) and every model is pinned to IR version <= 10.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedblocks.export.builders import failing_operator, first_line, require_modules, stage_label
from fedblocks.export.errors import ExportError

ENGINE = "ort"
ROLES: dict[str, str] = {
    "training_model": "onnx",
    "eval_model": "onnx",
    "optimizer_model": "onnx",
    "checkpoint": "ckpt",
}
OPSET = 17
MAX_IR_VERSION = 10  # ORT 1.19.2 refuses newer IR versions


def check_available() -> None:
    require_modules(ENGINE, "onnx", "onnxruntime", "onnxruntime.training.artifacts")


def _pass_through_loss() -> Any:
    from onnxruntime.training import onnxblock

    class StageLoss(onnxblock.Block):
        """The stage program's first output already is the loss."""

        def build(self, loss_name: str, *other_outputs: str) -> str:
            return loss_name

    return StageLoss()


def fix_eval_batchnorm(model: Any) -> int:
    """Cut inference-mode BatchNormalization nodes to their single output; returns how many."""
    fixed = 0
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or len(node.output) <= 1:
            continue
        mode = next((a for a in node.attribute if a.name == "training_mode"), None)
        if mode is None or mode.i == 0:
            del node.output[1:]
            fixed += 1
    return fixed


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: ORT's gradient builder logs every graph pass at INFO
    from C++ (set_default_logger_severity does not reach that logger). Errors still arrive as
    Python exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _pin_ir(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    changed = fix_eval_batchnorm(model) if path.name.startswith("eval_model") else 0
    if model.ir_version > MAX_IR_VERSION or changed:
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        onnx.save(model, str(path))


def build(stage: nn.Module, example_inputs: tuple[Tensor, ...], workdir: Path) -> dict[str, Path]:
    from fedblocks.export.rewrites import rewrite_for_engine

    stage = rewrite_for_engine(stage, "ort")  # torch BatchNorm -> explicit (zoo models have none)
    check_available()
    import onnx
    from onnxruntime.training import artifacts

    batch = int(example_inputs[0].shape[0])
    input_names = [s.name for s in stage.input_specs(batch)]
    output_names = [s.name for s in stage.output_specs(batch)]
    trainable = [s.name for s in stage.trainable_specs()]
    frozen = [s.name for s in stage.frozen_specs()]
    base_path = workdir / "base.onnx"
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                stage, example_inputs, str(base_path), dynamo=False, export_params=True,
                do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE,
                opset_version=OPSET, input_names=input_names, output_names=output_names,
            )
    except Exception as exc:
        op = failing_operator(exc)
        what = f"operator {op} is not supported" if op else first_line(exc)
        raise ExportError(f"engine 'ort' cannot export {stage_label(stage)}: {what}") from None
    base = onnx.load(str(base_path))
    initializers = {i.name for i in base.graph.initializer}
    lost = [n for n in trainable if n not in initializers]
    if lost:
        # A trainable tensor renamed/folded by the exporter could not be set by name at run time.
        raise ExportError(f"engine 'ort': {stage_label(stage)} lost trainable tensor '{lost[0]}' in ONNX export")
    frozen_present = [n for n in frozen if n in initializers]
    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.WARNING)  # generate_artifacts logs every step at INFO
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _native_stderr_silenced():
            warnings.simplefilter("ignore")
            artifacts.generate_artifacts(
                base, requires_grad=trainable, frozen_params=frozen_present, loss=_pass_through_loss(),
                optimizer=artifacts.OptimType.SGD, artifact_directory=str(workdir),
                additional_output_names=output_names[1:] or None,
            )
    except Exception as exc:
        op = failing_operator(exc)
        what = f"operator {op} has no gradient" if op else first_line(exc)
        raise ExportError(f"engine 'ort' cannot build training artifacts for {stage_label(stage)}: {what}") from None
    finally:
        logging.getLogger().setLevel(previous)
    files = {
        "training_model": workdir / "training_model.onnx",
        "eval_model": workdir / "eval_model.onnx",
        "optimizer_model": workdir / "optimizer_model.onnx",
        "checkpoint": workdir / "checkpoint",
    }
    for role in ("training_model", "eval_model", "optimizer_model"):
        _pin_ir(files[role])
    base_path.unlink()
    return files
