"""Builders, manifest, object store and weights: the pieces under `fedblocks export`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from fedblocks.export import builders, pipeline
from fedblocks.export.builders import ort as ort_builder
from fedblocks.export.errors import ExportError
from fedblocks.export.manifest import MANIFEST_VERSION, ArtifactRef, Manifest
from fedblocks.export.models import build_model
from fedblocks.export.objects import ObjectStore, cache_key
from fedblocks.export.stages import make_stage
from fedblocks.export.weights import load_weights, save_weights, state_dict_to_arrays, weights_to_bytes

from .conftest import RESNET8, RESNET8_STAGES


# ------------------------------------------------------------------ weights
def test_weights_round_trip_and_deterministic_bytes(tmp_path: Path) -> None:
    tensors = {"blocks.0.conv.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
               "y": np.array([1, 2], dtype=np.int64)}
    save_weights(tmp_path / "w.npz", tensors)
    back = load_weights(tmp_path / "w.npz")
    assert list(back) == list(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value)
        assert back[name].dtype == value.dtype
    assert weights_to_bytes(tensors) == (tmp_path / "w.npz").read_bytes() == weights_to_bytes(tensors)


def test_weights_refuse_pickles(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="object arrays"):
        save_weights(tmp_path / "w.npz", {"x": np.array([{"a": 1}], dtype=object)})
    np.savez(tmp_path / "evil.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ExportError, match=r"not a valid \.npz"):
        load_weights(tmp_path / "evil.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ExportError, match=r"not a valid \.npz"):
        load_weights(tmp_path / "junk.npz")


def test_state_dict_to_arrays_selects_by_name() -> None:
    module = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    arrays = state_dict_to_arrays(module, ["1.running_var", "0.weight"])
    assert list(arrays) == ["1.running_var", "0.weight"]
    np.testing.assert_array_equal(arrays["0.weight"], module[0].weight.detach().numpy())
    with pytest.raises(ExportError, match="no tensor named"):
        state_dict_to_arrays(module, ["nope"])


# ------------------------------------------------------------------ object store
def test_object_store_dedupes_and_indexes(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    a = store.put_bytes(b"hello", "bin")
    b = store.put_bytes(b"hello", "bin")
    assert a == b and a.path == f"objects/{a.sha256}.bin" and a.bytes == 5
    src = tmp_path / "file"
    src.write_bytes(b"hello")
    assert store.put_file(src, "bin") == a and not src.exists()
    assert store.verify(a)
    key = cache_key({"model": "resnet8", "stage": "full"})
    assert key == cache_key({"stage": "full", "model": "resnet8"})
    assert store.get_index(key) is None
    store.put_index(key, {"artifacts": {"program": a.to_dict()}})
    assert store.get_index(key) == {"artifacts": {"program": a.to_dict()}}
    (store.index / f"{key}.json").write_text("{broken")
    assert store.get_index(key) is None


# ------------------------------------------------------------------ manifest
def test_manifest_round_trip_and_refusals(resnet8_export: Path, tmp_path: Path) -> None:
    manifest = Manifest.load(resnet8_export / "manifest.json")
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    assert [s.id for s in manifest.stages] == list(RESNET8_STAGES)
    raw = manifest.to_dict()
    for mutate, message in (
        (lambda d: d.update(format="something.else"), "not a fedblocks manifest"),
        (lambda d: d.update(version=MANIFEST_VERSION + 1), "version 2 is not supported"),
        (lambda d: d["model"].update(input_shape=[3, "x"]), "input_shape"),
        (lambda d: d["stages"][0]["artifacts"]["torch"]["program"].update(sha256="zz"), "sha256"),
        (lambda d: d["stages"][0]["artifacts"]["torch"]["program"].update(path="/etc/passwd"), "relative"),
        (lambda d: d["stages"][0]["artifacts"]["ort"].pop("checkpoint"), "missing role 'checkpoint'"),
        (lambda d: d["stages"][0]["outputs"].pop(0), "scalar loss"),
    ):
        broken = json.loads(json.dumps(raw))
        mutate(broken)
        path = tmp_path / "manifest.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(ExportError, match=message) as info:
            Manifest.load(path)
        assert "\n" not in str(info.value)
    with pytest.raises(ExportError, match="does not exist"):
        Manifest.load(tmp_path / "absent.json")


def test_manifest_describes_every_stage(resnet8_export: Path) -> None:
    manifest = Manifest.load(resnet8_export / "manifest.json")
    model = build_model("resnet8", 10, (3, 32, 32))
    init = load_weights(resnet8_export / manifest.model.init_weights.path)
    assert set(init) == set(model.state_dict())
    store = ObjectStore(resnet8_export)
    assert store.verify(manifest.model.init_weights)
    for entry in manifest.stages:
        stage = make_stage(model, entry.id)
        assert [t.name for t in entry.trainable] == [s.name for s in stage.trainable_specs()]
        assert [t.name for t in entry.frozen] == [s.name for s in stage.frozen_specs()]
        assert entry.outputs[0].name == "loss"
        assert {s.source for s in entry.state} <= {o.name for o in entry.outputs}
        assert entry.memory.total_bytes == (entry.memory.params_bytes + entry.memory.grads_bytes
                                            + entry.memory.optimizer_bytes + entry.memory.activations_bytes)
        assert entry.flops.train_step > entry.flops.forward > 0
        for engine, roles in entry.artifacts.items():
            assert set(roles) == set(builders.builder(engine).ROLES)
            for ref in roles.values():
                assert store.verify(ref), f"{entry.id}/{engine}: {ref.path} does not match its sha256"


# ------------------------------------------------------------------ cache
def test_warm_reexport_reuses_everything(resnet8_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("a builder ran although every artifact was cached")

    for engine in builders.ENGINES:
        monkeypatch.setattr(builders.builder(engine), "build", no_build)
    monkeypatch.setattr(pipeline, "build_blocked_model", no_build)  # not even the model is built
    before = (resnet8_export / "manifest.json").read_text()
    start = time.perf_counter()
    manifest, built = pipeline.export_model_with_stats(RESNET8, resnet8_export)
    elapsed = time.perf_counter() - start
    assert built == []
    assert elapsed < 5, f"warm re-export took {elapsed:.1f} s"
    assert json.loads((resnet8_export / "manifest.json").read_text()) == json.loads(before)
    assert len(manifest.stages) == len(RESNET8_STAGES)


def test_cache_key_changes_rebuild_only_what_changed(tmp_path: Path) -> None:
    spec = pipeline.ExportSpec(model="resnet8", num_classes=10, input_shape=(3, 32, 32), batch_size=4,
                               engines=("torch",), stages=("grow-1",))
    _, built = pipeline.export_model_with_stats(spec, tmp_path)
    assert built == ["grow-1/torch"]
    _, built = pipeline.export_model_with_stats(spec, tmp_path)
    assert built == []
    other_seed = pipeline.ExportSpec(**{**spec.__dict__, "seed": 1})
    manifest, built = pipeline.export_model_with_stats(other_seed, tmp_path)
    assert built == ["grow-1/torch"]
    assert manifest.seed == 1


# ------------------------------------------------------------------ engine specifics
def test_torch_program_trains_and_keeps_frozen_frozen(tmp_path: Path) -> None:
    torch.manual_seed(0)
    stage = make_stage(build_model("resnet8", 10, (3, 32, 32)), "grow-2")
    inputs = stage.example_inputs(4, 0)
    files = builders.builder("torch").build(stage, inputs, tmp_path)
    module = torch.export.load(files["program"]).module()
    params = dict(module.named_parameters())
    trainable = {s.name for s in stage.trainable_specs()}
    assert {n for n, p in params.items() if p.requires_grad} == trainable
    frozen_before = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
    assert frozen_before
    outputs = module(*inputs)
    outputs[0].backward()
    assert all(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in trainable)
    assert all(params[n].grad is None for n in frozen_before)
    torch.testing.assert_close(outputs[0], stage(*inputs)[0])


def test_ort_artifacts_keep_global_names_and_ir_version(tmp_path: Path) -> None:
    torch.manual_seed(0)
    stage = make_stage(build_model("resnet8", 10, (3, 32, 32)), "shrink-2")
    files = builders.builder("ort").build(stage, stage.example_inputs(4, 0), tmp_path)
    training = onnx.load(str(files["training_model"]))
    assert training.ir_version <= ort_builder.MAX_IR_VERSION
    graph_inputs = {i.name for i in training.graph.input}
    assert {s.name for s in stage.trainable_specs()} <= graph_inputs
    assert [o.name for o in training.graph.output][: len(stage.output_specs(4))] == [
        s.name for s in stage.output_specs(4)
    ]
    from onnxruntime.training.api import CheckpointState

    state = CheckpointState.load_checkpoint(str(files["checkpoint"]))
    names = {n for n, _ in state.parameters}
    assert {s.name for s in stage.trainable_specs()} <= names
    assert names - {s.name for s in stage.trainable_specs()} <= {s.name for s in stage.frozen_specs()}


class TorchBNNet(nn.Module):
    """A stage-shaped module with torch's own BatchNorm2d, exported for ORT *without* the
    explicit-BN rewrite: reproduces the eval_model.onnx bug from research/engines.md."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor]:
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return (nn.functional.cross_entropy(self.fc(h), y),)


def test_ort_eval_model_batchnorm_fix(tmp_path: Path) -> None:
    import onnxruntime
    from onnxruntime.training import artifacts

    net = TorchBNNet().train()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    torch.onnx.export(net, (x, y), str(tmp_path / "base.onnx"), dynamo=False, export_params=True,
                      do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE, opset_version=17,
                      input_names=["x", "y"], output_names=["loss"])
    trainable = [n for n, _ in net.named_parameters()]
    frozen = [n for n, _ in net.named_buffers() if n != "bn.num_batches_tracked"]
    with ort_builder._native_stderr_silenced():
        artifacts.generate_artifacts(onnx.load(str(tmp_path / "base.onnx")), requires_grad=trainable,
                                     frozen_params=frozen, loss=ort_builder._pass_through_loss(),
                                     optimizer=artifacts.OptimType.SGD, artifact_directory=str(tmp_path))
    eval_model = onnx.load(str(tmp_path / "eval_model.onnx"))
    with pytest.raises(Exception, match="Training_mode"):  # the upstream bug, as generated
        onnxruntime.InferenceSession(eval_model.SerializeToString())
    assert ort_builder.fix_eval_batchnorm(eval_model) == 1
    onnxruntime.InferenceSession(eval_model.SerializeToString())  # loads once fixed


def test_failing_operator_is_named() -> None:
    exc = RuntimeError("Operator torch._ops.aten._native_batch_norm_legit_functional.default is not in Core ATen")
    assert builders.failing_operator(exc) == "aten._native_batch_norm_legit_functional.default"
    assert builders.failing_operator(RuntimeError("no op here")) is None
    ort = RuntimeError("gradient_builder.cc:29 ... gradient_builder != nullptr was false. The gradient builder has "
                       "not been registered: ReduceMax for node /blocks.0/pool/ReduceMax\n")
    assert builders.failing_operator(ort) == "ReduceMax for node /blocks.0/pool/ReduceMax"


def test_unknown_engine_and_stage(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown engine 'tflite'"):
        builders.builder("tflite")
    spec = pipeline.ExportSpec(model="resnet8", num_classes=10, input_shape=(3, 32, 32), batch_size=4,
                               engines=("torch",), stages=("grow-7",))
    with pytest.raises(ExportError, match="has no stage 'grow-7'"):
        pipeline.export_model(spec, tmp_path)


def test_artifact_ref_paths_stay_inside() -> None:
    with pytest.raises(ExportError, match="relative"):
        ArtifactRef.from_dict({"path": "../x", "sha256": "0" * 64, "bytes": 1}, "ref")


def _run_onnx(nodes: list, inputs: dict[str, np.ndarray], outputs: list[str], initializers: list | None = None,
              ) -> list[np.ndarray]:
    """Run a one-off ONNX graph (ONNX + com.microsoft ops) on ORT's CPU provider."""
    import onnxruntime
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape)) for n, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], initializer=initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = ort_builder.MAX_IR_VERSION
    return onnxruntime.InferenceSession(model.SerializeToString()).run(outputs, inputs)


def test_relu_grad_rewrite_is_exact() -> None:
    from onnx import helper

    rng = np.random.default_rng(0)
    y = np.maximum(rng.standard_normal((4, 8, 5, 5)).astype(np.float32), 0)  # a ReLU output: zeros included
    dy = rng.standard_normal(y.shape).astype(np.float32)
    node = helper.make_node("ReluGrad", ["dy", "y"], ["dx"], domain="com.microsoft")
    (reference,) = _run_onnx([node], {"dy": dy, "y": y}, ["dx"])
    model = helper.make_model(helper.make_graph([node], "g", [], []))
    assert ort_builder.replace_relu_grad(model) == 1
    assert {n.op_type for n in model.graph.node} == {"Greater", "Cast", "Mul"}
    (rewritten,) = _run_onnx(list(model.graph.node), {"dy": dy, "y": y}, ["dx"], list(model.graph.initializer))
    assert np.array_equal(reference, rewritten)


def test_conv_input_grad_rewrite_matches_convgrad() -> None:
    from onnx import helper

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 7, 7)).astype(np.float32)
    w = rng.standard_normal((5, 6, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((2, 5, 7, 7)).astype(np.float32)
    attrs = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1], group=1)
    same = helper.make_node("ConvGrad", ["dy", "x", "w"], ["dx", "dw"], domain="com.microsoft", **attrs)
    strided = helper.make_node("ConvGrad", ["dy2", "x", "w"], ["dx2", "dw2"], domain="com.microsoft",
                               **{**attrs, "strides": [2, 2]})
    frozen = helper.make_node("ConvGrad", ["dy", "x", "w"], ["dx3"], domain="com.microsoft", **attrs)
    dy2 = rng.standard_normal((2, 5, 4, 4)).astype(np.float32)
    feeds = {"dy": dy, "x": x, "w": w, "dy2": dy2}
    outputs = ["dx", "dw", "dx2", "dw2", "dx3"]
    reference = _run_onnx([same, strided, frozen], feeds, outputs)
    model = helper.make_model(helper.make_graph([same, strided, frozen], "g", [], []))
    assert ort_builder.conv_input_grad_as_conv(model) == 2  # the stride-2 conv keeps ConvGrad's dX
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("ConvGrad") == 2 and ops.count("Conv") == 2  # the frozen conv's ConvGrad is gone
    rewritten = _run_onnx(list(model.graph.node), feeds, outputs, list(model.graph.initializer))
    for name, a, b in zip(outputs, reference, rewritten, strict=True):
        assert np.allclose(a, b, rtol=1e-5, atol=1e-5), name
    assert np.array_equal(reference[1], rewritten[1])  # dW still comes from ConvGrad
    rotated = [n.input[1] for n in model.graph.node if n.name.endswith("/fedblocks_dx/Conv")]
    (kernel,) = _run_onnx(list(model.graph.node), feeds, rotated[:1], list(model.graph.initializer))
    assert np.array_equal(kernel, w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])  # the MatMul rotation is exact


def test_ort_batchnorm_exports_one_fused_node_and_keeps_the_batch_statistics(tmp_path: Path) -> None:
    from fedblocks.export.rewrites import ExplicitBatchNorm, OrtBatchNorm, rewrite_for_engine

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = ExplicitBatchNorm(3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.bn(x)
            return (out.mean(), *self.bn.batch_stats)

    torch.manual_seed(0)
    net = Net().train()
    ort_net = rewrite_for_engine(net, "ort")
    assert type(ort_net.bn) is OrtBatchNorm and ort_net.bn.weight is not net.bn.weight  # a copy, same values
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    for a, b in zip(net(x), ort_net(x), strict=True):  # outside an export: ExplicitBatchNorm's math
        assert torch.equal(a, b)
    torch.onnx.export(ort_net, (x,), str(tmp_path / "bn.onnx"), dynamo=False, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE, opset_version=17, input_names=["x"],
                      output_names=["loss", "mean", "var"])
    model = onnx.load(str(tmp_path / "bn.onnx"))
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 1 and {a.name: onnx.helper.get_attribute_value(a) for a in bns[0].attribute}["training_mode"] == 1
    import onnxruntime

    loss, mean, var = onnxruntime.InferenceSession(model.SerializeToString()).run(None, {"x": x.numpy()})
    expected = net(x)
    assert np.allclose(loss, expected[0].detach().numpy(), atol=1e-6)
    assert np.allclose(mean, expected[1].numpy(), rtol=1e-5) and np.allclose(var, expected[2].numpy(), rtol=1e-5)


def test_eval_batchnorm_with_used_statistics_goes_back_to_training_mode() -> None:
    from onnx import TensorProto, helper

    bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], training_mode=0)
    graph = helper.make_graph([bn, helper.make_node("Identity", ["rm"], ["mean"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("mean", TensorProto.FLOAT, None)])
    model = helper.make_model(graph)
    assert ort_builder.fix_eval_batchnorm(model) == 1
    node = model.graph.node[0]
    assert list(node.output) == ["y", "rm", "rv"]
    assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "training_mode")) == 1
