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

Rewrites of training_model.onnx, all exact up to float32 summation order (docs/device_runtime.md has the
measurements):
- every ``ReluGrad(dY, Y)`` becomes ``Mul(dY, Cast(Greater(Y, 0)))``: ORT 1.19's CPU
  ReluGrad is a scalar Eigen select, ~20x slower than the three vectorised kernels
  (ResNet-18 full: 70 of ~850 ms per step); Y is the ReLU's output (>= 0), so the mask
  is the same and the gradients are bit-identical;
- ``conv_input_grad_as_conv``: the input gradient of stride-1 'same' convolutions is a
  forward Conv with the rotated, transposed kernel instead of ConvGrad's per-image
  transposed GEMM (ResNet-18 full: ~5-8 % of a step); the rotation is a MatMul with the
  anti-identity, not a negative-step Slice (~1 % of a step);
- value_info for the intermediates ORT cannot shape-infer (``memory_ort.annotate_shapes``):
  ORT then plans them in its static memory pattern instead of allocating them while the
  step runs.

``predict_memory`` sizes what ORT allocates for one step from the finished training
graph (export/memory_ort.py) and adds what the device runtime's adapter holds: the
manifest records it as ``memory.engines.ort``.
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

import numpy as np
import torch
from torch import Tensor, nn

from fedblocks.device_runtime.engines.sgd import sgd_scratch_floats
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
PREDICT_MEMORY_NEEDS_ARTIFACTS = True  # predict_memory plans from the built training graph


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
    """Make eval_model.onnx's BatchNormalization nodes loadable; returns how many were changed.

    generate_artifacts turns every BatchNormalization of the eval model to training_mode=0
    but keeps its three outputs, which ORT refuses to load. A node whose running-statistic
    outputs nothing reads (torch BatchNorm in train mode) is cut to its single output. A
    node whose statistics ARE read (OrtBatchNorm: the stage returns them as its batch
    statistics) is set back to training_mode=1, so the eval model's forward is the
    training forward, as it is for explicit BatchNorm math.
    """
    consumed = {name for node in model.graph.node for name in node.input}
    consumed |= {o.name for o in model.graph.output}
    fixed = 0
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or len(node.output) <= 1:
            continue
        mode = next((a for a in node.attribute if a.name == "training_mode"), None)
        if mode is not None and mode.i == 1:
            continue
        if any(name in consumed for name in node.output[1:]):
            if mode is None:
                from onnx import helper

                node.attribute.append(helper.make_attribute("training_mode", 1))
            else:
                mode.i = 1
        else:
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


RELU_GRAD_ZERO = "fedblocks.relu_grad.zero"


def replace_relu_grad(model: Any) -> int:
    """Rewrite every com.microsoft ReluGrad(dY, Y) as Mul(dY, Cast(Greater(Y, 0), float)); returns how many.

    Exact: ReluGrad passes dY where Y > 0 and 0 elsewhere, and so does the mask.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    nodes = list(graph.node)
    count = 0
    rewritten = []
    for node in nodes:
        if node.op_type != "ReluGrad" or node.domain != "com.microsoft":
            rewritten.append(node)
            continue
        dy, y = node.input[0], node.input[1]
        base = f"{node.name or node.output[0]}/fedblocks"
        mask, maskf = f"{base}/mask", f"{base}/mask_float"
        rewritten += [
            helper.make_node("Greater", [y, RELU_GRAD_ZERO], [mask], name=f"{base}/Greater"),
            helper.make_node("Cast", [mask], [maskf], name=f"{base}/Cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [dy, maskf], [node.output[0]], name=f"{base}/Mul"),
        ]
        count += 1
    if count:
        if RELU_GRAD_ZERO not in {i.name for i in graph.initializer}:
            graph.initializer.append(helper.make_tensor(RELU_GRAD_ZERO, TensorProto.FLOAT, [], [0.0]))
        del graph.node[:]
        graph.node.extend(rewritten)
    return count


def _attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _tap_reversal(graph: Any, taps: int) -> str:
    """The name of a (taps, taps) float anti-identity initializer (added once): x @ J reverses x's last axis."""
    from onnx import numpy_helper

    name = f"fedblocks/reverse_{taps}"
    if name not in {i.name for i in graph.initializer}:
        graph.initializer.append(numpy_helper.from_array(np.eye(taps, dtype=np.float32)[::-1].copy(), name))
    return name


def conv_input_grad_as_conv(model: Any) -> int:
    """Compute ConvGrad's input gradient with a forward Conv for stride-1 'same' convolutions; returns how many.

    dX of a stride-1, dilation-1, ungrouped conv with odd kernel k and padding (k-1)/2 is
    the same convolution of dY with the kernel transposed (in <-> out channels) and
    rotated by 180 degrees. ORT's ConvGrad computes dX per image as a transposed-A GEMM
    over the whole weight (memory-bound when the image is small: ResNet-18's 512-channel
    4x4 convs take 26 ms for dX against 13 ms for the forward conv, one thread); MLAS's
    forward Conv does the same arithmetic at forward-conv speed. ConvGrad keeps computing
    dW. Mathematically exact (the float32 sums run in another order).
    """
    from onnx import TensorProto, helper

    graph = model.graph
    rewritten: list[Any] = []
    count = 0
    for node in graph.node:
        if node.op_type == "ConvGrad" and node.domain == "com.microsoft" and node.output and node.output[0]:
            kernel = list(_attribute(node, "kernel_shape", []))
            pads = list(_attribute(node, "pads", [0] * 2 * len(kernel)))
            same = (len(kernel) == 2 and kernel[0] == kernel[1] and kernel[0] % 2 == 1 and kernel[0] > 1
                    and pads == [(kernel[0] - 1) // 2] * 4)
            if (same and list(_attribute(node, "strides", [1, 1])) == [1, 1]
                    and list(_attribute(node, "dilations", [1, 1])) == [1, 1] and _attribute(node, "group", 1) == 1
                    and _attribute(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")):
                dy, w = node.input[0], node.input[2]
                base = f"{node.name or node.output[0]}/fedblocks_dx"
                taps = kernel[0] * kernel[1]
                reverse = _tap_reversal(graph, taps)
                for suffix, values in (("taps", [0, 0, taps]), ("kernel", [0, 0, *kernel])):
                    graph.initializer.append(helper.make_tensor(f"{base}/{suffix}", TensorProto.INT64, [len(values)],
                                                                values))
                # The k*k taps reversed by a MatMul with the anti-identity (exact: one product by 1.0 per
                # output), then in <-> out transposed in 4-D. A negative-step Slice was 13 of ResNet-18's
                # 20 ms per step of rotation (one thread); the MatMul is ~2x faster. Transposing first, in
                # 3-D, was as fast but cost one weight-sized buffer more at the step's peak (+10 MB, measured).
                rewritten += [
                    helper.make_node("Reshape", [w, f"{base}/taps"], [f"{base}/w_taps"], name=f"{base}/Flatten"),
                    helper.make_node("MatMul", [f"{base}/w_taps", reverse], [f"{base}/w_rev"], name=f"{base}/Rotate"),
                    helper.make_node("Reshape", [f"{base}/w_rev", f"{base}/kernel"], [f"{base}/w_t"],
                                     name=f"{base}/Unflatten"),
                    helper.make_node("Transpose", [f"{base}/w_t"], [f"{base}/w_rot"], name=f"{base}/Transpose",
                                     perm=[1, 0, 2, 3]),
                    helper.make_node("Conv", [dy, f"{base}/w_rot"], [node.output[0]], name=f"{base}/Conv",
                                     kernel_shape=kernel, pads=pads, strides=[1, 1], dilations=[1, 1], group=1),
                ]
                node.output[0] = ""
                count += 1
                if not any(node.output):
                    continue  # a frozen conv: ConvGrad had nothing left to compute
        rewritten.append(node)
    if count:
        del graph.node[:]
        graph.node.extend(rewritten)
    return count


def _pin_ir(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    changed = fix_eval_batchnorm(model) if path.name.startswith("eval_model") else 0
    if path.name.startswith("training_model"):
        from fedblocks.export.memory_ort import annotate_shapes

        changed += replace_relu_grad(model)
        changed += conv_input_grad_as_conv(model)
        changed += annotate_shapes(model)
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


def predict_memory(stage: Any, files: dict[str, Path], batch_size: int) -> dict[str, Any]:
    """``memory.engines.ort`` (docs/formats.md): what training this stage costs on the device runtime's ORT adapter.

    - ``footprint_bytes`` (peak - baseline RSS of a step, plain SGD): the arena growth of
      one step by ORT's allocation plan (``memory_ort.plan_training_step``) and the step's
      input batch, which the runtime gathers from the shard (graph inputs are not in the plan);
    - ``momentum_bytes``: SGD momentum buffers, one per trainable tensor (numpy, allocated
      at the first step);
    - ``total_bytes``: everything the stage holds beyond the engine's own code: every stage
      tensor (checkpoint), the gradient accumulation buffers and the SGD scratch (ORT and
      the adapter allocate them at load, so they are in the baseline), and the footprint.
    """
    from fedblocks.export.memory import input_batch_bytes
    from fedblocks.export.memory_ort import optimized_training_graph, plan_training_step

    plan = plan_training_step(optimized_training_graph(files["training_model"], files["checkpoint"]))
    trainable = [t for t in stage.parameters() if t.requires_grad]
    grads = sum(t.numel() * t.element_size() for t in trainable)
    params = sum(t.numel() * t.element_size() for t in (*stage.parameters(), *stage.buffers()))
    scratch = 4 * sgd_scratch_floats([t.numel() for t in trainable])  # the runtime's one-chunk SGD scratch
    batch = input_batch_bytes(stage, batch_size)
    detail = {**plan.detail(), "input_batch_bytes": batch, "gradient_buffers_bytes": grads,
              "sgd_scratch_bytes": scratch}
    if plan.unmodelled_ops:
        detail["unmodelled_ops"] = len(plan.unmodelled_ops)
    footprint = plan.step_bytes + batch
    return {"method": "ort-allocation-plan", "footprint_bytes": footprint, "momentum_bytes": grads,
            "total_bytes": params + grads + scratch + footprint, "detail": detail}
