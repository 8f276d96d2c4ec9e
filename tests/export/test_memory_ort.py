"""ORT's step memory, predicted from the training graph (export/memory_ort.py), and the manifest's
per-engine predictions.

Planner rules on hand-made graphs (expected bytes traced by hand from ORT 1.19's
allocation_planner.cc / mem_pattern_planner.h), the arena model, and the prediction
against what ONNX Runtime itself allocates for a real exported training graph (its
BFCArena log: every extension it makes while the step runs).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.training")

from onnx import TensorProto, helper  # noqa: E402

from fedblocks.export.memory_ort import (  # noqa: E402
    ALIGNMENT,
    _Arena,
    annotate_shapes,
    conv_scratch_bytes,
    optimized_training_graph,
    plan_training_step,
)

SHAPE = [16, 64]
NBYTES = 16 * 64 * 4  # 4 KiB, a multiple of ALIGNMENT


def _model(nodes: list, outputs: list[str], shaped: list[str], initializers: list | None = None) -> object:
    """x [16, 64] float32 in; value_info (ORT knows the shape) only for `shaped` values."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=initializers or [],
        value_info=[helper.make_tensor_value_info(v, TensorProto.FLOAT, SHAPE) for v in shaped])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_freed_buffers_are_reused_by_values_of_the_same_shape() -> None:
    # a = -x, b = -a, c = -b, d = -c (graph output). a dies after b is made, so c takes a's
    # buffer; b needs its own; d is handed to the caller (allocated outside the pattern).
    nodes = [helper.make_node("Neg", [i], [o]) for i, o in (("x", "a"), ("a", "b"), ("b", "c"), ("c", "d"))]
    plan = plan_training_step(_model(nodes, ["d"], ["a", "b", "c"]))
    assert plan.pattern_bytes == 2 * NBYTES  # 3 without reuse
    assert plan.dynamic_bytes == NBYTES  # the output


def test_inplace_activation_and_alias_share_one_buffer() -> None:
    shape = helper.make_tensor("flat", TensorProto.INT64, [1], [16 * 64])
    nodes = [helper.make_node("Neg", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Reshape", ["b", "flat"], ["c"]), helper.make_node("ReduceSum", ["c"], ["loss"])]
    plan = plan_training_step(_model(nodes, ["loss"], ["a", "b"], [shape]))
    assert plan.pattern_bytes == NBYTES  # Relu writes over a (its last use), Reshape aliases b


def test_activation_is_not_inplace_when_its_input_is_read_later() -> None:
    nodes = [helper.make_node("Neg", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("ReduceSum", ["c"], ["loss"])]
    plan = plan_training_step(_model(nodes, ["loss"], ["a", "b", "c"]))
    assert plan.pattern_bytes == 3 * NBYTES  # a, b and c are live together at the Add


def test_values_without_a_static_shape_are_allocated_outside_the_pattern() -> None:
    nodes = [helper.make_node("Neg", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"])]
    plan = plan_training_step(_model(nodes, ["b"], []))
    assert plan.pattern_bytes == 0
    assert plan.dynamic_bytes == 2 * NBYTES  # a (shape inferred here, unknown to ORT) + the output b
    model = _model(nodes, ["b"], [])
    assert annotate_shapes(model) == 1  # a gets value_info; ORT can then plan it
    assert plan_training_step(model).pattern_bytes == NBYTES


def test_arena_grows_by_exactly_what_does_not_fit() -> None:
    arena = _Arena()
    mib = 1 << 20
    arena.allocate("a", mib)
    arena.free("a")
    arena.allocate("b", mib // 2)  # fits (and splits) the freed 1 MiB chunk
    arena.allocate("c", mib // 4)  # fits the remaining half
    assert arena.total == mib
    arena.allocate("d", 2 * mib)  # nothing free is large enough: a new region of exactly 2 MiB
    assert arena.total == 3 * mib
    arena.free("b")
    arena.free("c")  # coalesces with b's chunk and the free rest of the region
    arena.allocate("e", mib)
    assert arena.total == 3 * mib
    arena.allocate("f", 100)
    assert arena.total == 3 * mib + ALIGNMENT  # rounded up to the arena's 256-byte granule


def test_conv_scratch_bytes() -> None:
    # pointwise stride-1 conv: GEMM straight on the input
    assert conv_scratch_bytes("Conv", (32, 64, 8, 8), (128, 64, 1, 1), (32, 128, 8, 8), 1, [1, 1], [0] * 4) == 0
    # more filters than output pixels (ResNet-18 layer 4): the whole im2col of one image
    assert conv_scratch_bytes("Conv", (32, 512, 4, 4), (512, 512, 3, 3), (32, 512, 4, 4), 1, [1, 1], [1] * 4) \
        == 4 * 16 * 512 * 9
    # otherwise one 128x128 tile per thread
    assert conv_scratch_bytes("Conv", (32, 64, 32, 32), (64, 64, 3, 3), (32, 64, 32, 32), 1, [1, 1], [1] * 4,
                              threads=2) == 4 * 128 * 128 * 2
    # ConvGrad: one image's column buffer + the bias multiplier
    assert conv_scratch_bytes("ConvGrad", (32, 64, 32, 32), (64, 64, 3, 3), (32, 64, 32, 32), 1, [1, 1],
                              [1] * 4) == 4 * (64 * 9 * 1024 + 1024)


# ORT logs every arena extension at INFO; the script below runs one training step with the device
# runtime adapter's session options and prints markers around it.
_ARENA_SCRIPT = r"""
import sys, numpy as np, onnxruntime
from onnxruntime.training.api import CheckpointState, Module
from fedblocks.device_runtime.engines.ort import session_options
onnxruntime.set_default_logger_severity(1)
options = session_options(1)
state = CheckpointState.load_checkpoint(sys.argv[2])
module = Module(sys.argv[1], state, None, session_options=options)
module.train()
inputs = []
for spec in __import__("json").loads(sys.argv[3]):
    rng = np.random.default_rng(0)
    if spec["dtype"].startswith("int"):
        inputs.append(rng.integers(0, 2, size=spec["shape"]).astype(spec["dtype"]))
    else:
        inputs.append(rng.standard_normal(spec["shape"]).astype(spec["dtype"]))
sys.stderr.write("FEDBLOCKS-STEP-START\n"); sys.stderr.flush()
module(*inputs)
sys.stderr.write("FEDBLOCKS-STEP-END\n"); sys.stderr.flush()
"""
_EXTEND = re.compile(r"Extending BFCArena for Cpu\. .*num_bytes: (\d+) .*\n.*Extended allocation by (\d+) bytes")


@pytest.mark.parametrize("sid", ["grow-1", "shrink-2", "full"])
def test_plan_matches_what_onnxruntime_allocates(resnet8_export: Path, sid: str) -> None:
    """A ResNet-8 stage (batch 4) against ORT's own arena log for one step: the memory-pattern
    block ORT requests and the total its arena grows by. Extensions for requests under 4 KiB
    are left out: ORT serves those from a fresh 1 MiB region whose pages stay untouched (no RSS).

    Tolerance -2 % .. +5 %. Observed: grow-1 and shrink-2 exact to the byte, full +4.3 %
    (0.14 MiB; ResNet-8 at batch 32 and ResNet-18 at batch 8 and 32: within 0.02 MiB on every
    stage). Before each buffer was held over its whole span, the replay placed buffers in the
    idle gaps between their uses, which ORT does not: full was 9.5 % low here, and ResNet-18's
    full stage 15.3 MiB (8.6 %) low at batch 32."""
    manifest = json.loads((resnet8_export / "manifest.json").read_text())
    stage = next(s for s in manifest["stages"] if s["id"] == sid)
    files = {role: resnet8_export / ref["path"] for role, ref in stage["artifacts"]["ort"].items()}
    plan = plan_training_step(optimized_training_graph(files["training_model"], files["checkpoint"]))
    proc = subprocess.run([sys.executable, "-c", _ARENA_SCRIPT, str(files["training_model"]), str(files["checkpoint"]),
                           json.dumps(stage["inputs"])], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stderr.split("FEDBLOCKS-STEP-START", 1)[1].split("FEDBLOCKS-STEP-END", 1)[0]
    extensions = [(int(req), int(ext)) for req, ext in _EXTEND.findall(log) if int(req) >= 4096]
    assert extensions, log[-2000:]
    pattern_request = max(req for req, _ in extensions)
    grown = sum(ext for _, ext in extensions)
    assert 0.98 * pattern_request <= plan.pattern_bytes <= 1.05 * pattern_request, (pattern_request, plan)
    assert 0.98 * grown <= plan.arena_bytes <= 1.05 * grown, (grown, plan)
    assert plan.unmodelled_ops == ()


def test_manifest_records_each_engines_prediction(resnet8_export: Path) -> None:
    from fedblocks.export.manifest import Manifest

    manifest = Manifest.load(resnet8_export / "manifest.json")
    for stage in manifest.stages:
        # one step's inputs (images, labels, teacher logits), which ORT and ExecuTorch read from the caller
        batch = sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in stage.inputs)
        assert batch >= 4 * 3 * 32 * 32 * 4  # at least the image batch (ResNet-8 at batch 4 here)
        ort, torch_ = stage.memory.engines["ort"], stage.memory.engines["torch"]
        assert ort.method == "ort-allocation-plan" and ort.footprint_bytes > 0
        assert ort.detail["input_batch_bytes"] == batch
        assert ort.footprint_bytes == ort.detail["arena_bytes"] + batch
        assert ort.momentum_bytes == stage.memory.grads_bytes
        assert torch_.footprint_bytes == stage.memory.grads_bytes + stage.memory.activations_bytes
        et = stage.memory.engines["executorch"]
        assert et.method == "executorch-memory-plan" and et.footprint_bytes == stage.memory.grads_bytes + batch
        assert et.detail["input_batch_bytes"] == batch
        assert et.detail["planned_bytes"] > 0 and et.total_bytes > et.detail["planned_bytes"]
        assert stage.memory.engines == Manifest.from_dict(manifest.to_dict()).stage(stage.id).memory.engines


def test_executorch_program_runs_its_matmuls_in_xnnpack(resnet8_export: Path) -> None:
    pytest.importorskip("executorch")
    from executorch.exir._serialize._program import deserialize_pte_binary

    manifest = json.loads((resnet8_export / "manifest.json").read_text())
    stage = next(s for s in manifest["stages"] if s["id"] == "full")
    loaded = deserialize_pte_binary((resnet8_export / stage["artifacts"]["executorch"]["program"]["path"]).read_bytes())
    program = getattr(loaded, "program", loaded)
    forward = next(p for p in program.execution_plan if p.name == "forward")
    assert {d.id for d in forward.delegates} == {"XnnpackBackend"} and len(forward.delegates) >= 7
