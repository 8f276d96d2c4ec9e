"""Stage programs: ids, global names, freezing, losses, batch statistics, rewrites, torch.export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedblocks.export.blocks import BlockedModel
from fedblocks.export.errors import ExportError
from fedblocks.export.models import DEFAULT_NUM_CLASSES, MODEL_NAMES, build_model
from fedblocks.export.rewrites import (
    ExplicitBatchNorm2d,
    ExplicitLayerNorm,
    UnfoldConv2d,
    apply_batch_stats,
    batchnorm_to_explicit,
    rewrite_for_engine,
)
from fedblocks.export.stages import StageProgram, make_stage, stage_ids

B = 4


@pytest.fixture(scope="module")
def resnet8() -> BlockedModel:
    torch.manual_seed(0)
    return build_model("resnet8", 10, (3, 16, 16))


def _names(stage: StageProgram) -> set[str]:
    return set(stage.state_dict())


def test_stage_ids_in_training_order() -> None:
    model = build_model("resnet18", 10, (3, 8, 8))
    assert stage_ids(model) == ["shrink-4", "shrink-3", "shrink-2", "grow-1", "grow-2", "grow-3", "grow-4", "full"]


@pytest.mark.parametrize("bad", ["grow-0", "grow-4", "shrink-1", "shrink-4", "full-1", "grow", "grow-x", "foo",
                                 "split_front-3", " grow-1"])
def test_bad_stage_id(resnet8: BlockedModel, bad: str) -> None:
    with pytest.raises(ExportError) as info:
        make_stage(resnet8, bad)
    assert "\n" not in str(info.value) and "grow-1" in str(info.value)


def test_names_are_global_and_partitioned(resnet8: BlockedModel) -> None:
    global_state = resnet8.state_dict()
    for sid in stage_ids(resnet8):
        stage = make_stage(resnet8, sid)
        own = stage.state_dict()
        assert own and set(own) <= set(global_state), sid
        for name, t in own.items():
            assert t.shape == global_state[name].shape and torch.equal(t, global_state[name]), (sid, name)
        trainable = {s.name for s in stage.trainable_specs()}
        frozen = {s.name for s in stage.frozen_specs()}
        state = {s.name for s in stage.state_specs()}
        assert not (trainable & frozen) and not (trainable & state) and not (frozen & state), sid
        assert trainable | frozen | state == set(own), sid


def test_stage_contents(resnet8: BlockedModel) -> None:
    def trainable(sid: str) -> set[str]:
        return {s.name for s in make_stage(resnet8, sid).trainable_specs()}

    params = {n for n, _ in resnet8.named_parameters()}
    assert trainable("grow-2") == {n for n in params if n.startswith(("blocks.1.", "output_modules.1."))}
    assert trainable("grow-3") == {n for n in params if n.startswith(("blocks.2.", "head."))}
    assert trainable("shrink-3") == trainable("grow-3")
    assert trainable("shrink-2") == {"basic_layers.1.weight"}
    assert trainable("full") == {n for n in params if n.startswith(("blocks.", "head."))}
    shrink2 = make_stage(resnet8, "shrink-2")
    assert _names(shrink2) == {n for n in resnet8.state_dict()
                               if n.startswith(("blocks.0.", "basic_layers.", "head."))}
    assert {s.name for s in shrink2.frozen_specs()} >= {"basic_layers.2.weight", "head.fc.weight",
                                                        "blocks.0.stem.bn.running_mean"}
    assert shrink2.state_specs() == []  # no BatchNorm trains in a shrink-j stage
    grow1 = make_stage(resnet8, "grow-1")
    assert not any(n.startswith(("blocks.1.", "head.", "basic_layers.")) for n in _names(grow1))
    assert [s.name for s in grow1.input_specs(B)] == ["x", "y"]
    assert [s.name for s in shrink2.input_specs(B)] == ["x", "teacher"]
    assert shrink2.input_specs(B)[1].shape == (B, 10) and shrink2.input_specs(B)[1].dtype == "float32"


def test_output_specs_and_state(resnet8: BlockedModel) -> None:
    stage = make_stage(resnet8, "grow-2")
    outs = stage.output_specs(B)
    assert outs[0].name == "loss" and outs[0].shape == () and outs[0].dtype == "float32"
    state = stage.state_specs()
    assert [o.name for o in outs[1:]] == [s.source for s in state]
    assert all(s.name.startswith("blocks.1.") and s.momentum == pytest.approx(0.1) for s in state)
    assert state[0].name == "blocks.1.0.bn1.running_mean" and state[1].name == "blocks.1.0.bn1.running_var"
    outputs = stage(*stage.example_inputs(B))
    assert len(outputs) == len(outs)
    for spec, t in zip(outs, outputs, strict=True):
        assert tuple(t.shape) == spec.shape and str(t.dtype) == f"torch.{spec.dtype}"


def test_batch_stats_are_the_bn_batch_statistics(resnet8: BlockedModel) -> None:
    stage = make_stage(resnet8, "grow-2")
    seen: dict[str, torch.Tensor] = {}
    _, bn = stage.training_batchnorms()[0]
    bn.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0].detach()))
    outputs = stage(*stage.example_inputs(B))
    var, mean = torch.var_mean(seen["x"], dim=(0, 2, 3), unbiased=True)
    assert torch.allclose(outputs[1], mean, atol=1e-6) and torch.allclose(outputs[2], var, atol=1e-5)
    # apply_state_updates is the runtime's formula
    before = bn.running_var.clone()
    stage.apply_state_updates(outputs)
    assert torch.allclose(bn.running_var, 0.9 * before + 0.1 * var, atol=1e-6)
    # eval mode: the "batch" outputs are the running stats, so the update is a no-op
    stage.eval()
    outputs = stage(*stage.example_inputs(B))
    assert torch.equal(outputs[1], bn.running_mean) and torch.equal(outputs[2], bn.running_var)
    stage.train()


def test_train_mode_keeps_frozen_parts_in_eval(resnet8: BlockedModel) -> None:
    stage = make_stage(resnet8, "shrink-2")
    stage.train()
    assert stage.training and not stage.blocks["0"].training and not stage.head.training
    assert stage.basic_layers["1"].training and not stage.basic_layers["2"].training
    grow = make_stage(resnet8, "grow-3")
    assert not grow.blocks["0"].training and not grow.blocks["1"].training and grow.blocks["2"].training


@pytest.mark.parametrize("sid", ["shrink-3", "shrink-2", "grow-1", "grow-2", "grow-3", "full"])
def test_sgd_step_moves_only_trainable(resnet8: BlockedModel, sid: str) -> None:
    stage = make_stage(resnet8, sid)
    before = {n: t.detach().clone() for n, t in stage.state_dict().items()}
    outputs = stage(*stage.example_inputs(B))
    assert torch.isfinite(outputs[0]) and outputs[0].dim() == 0
    outputs[0].backward()
    trainable = [p for p in stage.parameters() if p.requires_grad]
    torch.optim.SGD(trainable, lr=0.1).step()
    for name, p in stage.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and not torch.equal(p.detach(), before[name]), (sid, name)
        else:
            assert p.grad is None and torch.equal(p.detach(), before[name]), (sid, name)
    for name, b in stage.named_buffers():  # forward never mutates buffers
        assert torch.equal(b, before[name]), (sid, name)
    assert all(torch.equal(t, resnet8.state_dict()[n]) for n, t in before.items())  # the model is untouched


def test_losses_match_model_semantics(resnet8: BlockedModel) -> None:
    torch.manual_seed(1)
    x, y = torch.randn(B, 3, 16, 16), torch.randint(0, 10, (B,))
    resnet8.eval()
    with torch.no_grad():
        for j in (2,):  # shrink-j: MSE(blocks 1..j-1 + basic layers j..K + head, teacher)
            teacher = resnet8.shrunk_logits(x, j + 1)
            expected = F.mse_loss(resnet8.shrunk_logits(x, j), teacher)
            assert torch.allclose(make_stage(resnet8, f"shrink-{j}")(x, teacher)[0], expected, atol=1e-6)
        for k in (1, 2, 3):  # grow-k: CE(blocks 1..k-1 eval + block k train + exit k)
            resnet8.block(k).train()
            expected = F.cross_entropy(resnet8.prefix_logits(x, k), y)
            resnet8.block(k).eval()
            assert torch.allclose(make_stage(resnet8, f"grow-{k}")(x, y)[0], expected, atol=1e-5)
        resnet8.train()
        assert torch.allclose(make_stage(resnet8, "full")(x, y)[0], F.cross_entropy(resnet8(x), y), atol=1e-5)


def test_load_from_and_back(resnet8: BlockedModel) -> None:
    stage = make_stage(resnet8, "grow-2")
    model = build_model("resnet8", 10, (3, 16, 16))
    assert not torch.equal(stage.blocks["1"][0].conv1.weight, model.blocks[1][0].conv1.weight)
    stage.load_from(model)
    assert torch.equal(stage.blocks["1"][0].conv1.weight, model.blocks[1][0].conv1.weight)
    with pytest.raises(ExportError, match="shape"):
        stage.load_global_state({"blocks.1.0.conv1.weight": torch.zeros(3)})
    with torch.no_grad():
        stage.blocks["1"][0].conv1.weight.add_(1.0)
    model.load_state_dict(stage.state_dict(), strict=False)
    assert torch.equal(stage.blocks["1"][0].conv1.weight, model.blocks[1][0].conv1.weight)


def test_split_front_gradient_is_g(resnet8: BlockedModel) -> None:
    stage = make_stage(resnet8, "split_front-1")
    x, g = stage.example_inputs(B)
    assert g.shape == (B, *resnet8.block_output_shape(1))
    loss, *_, z = stage(x, g)
    assert torch.allclose(loss, (z * g).sum(), rtol=1e-5)
    assert stage.output_specs(B)[-1].name == "z"


# Small inputs keep this fast; test_models covers the default shapes.
SMALL_INPUTS = {"resnet8": (3, 8, 8), "resnet18": (3, 8, 8), "resnet34": (3, 8, 8), "vgg16": (3, 32, 32),
                "mobilenetv2": (3, 8, 8), "vit": (3, 8, 8), "char_transformer": (12,)}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_zoo_model_stage_runs(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, DEFAULT_NUM_CLASSES[name], SMALL_INPUTS[name])
    ids = stage_ids(model)
    assert len(ids) == 2 * model.num_blocks  # K-1 shrink + K grow + full
    for sid in (ids[0], ids[1], f"grow-{model.num_blocks - 1}"):
        stage = make_stage(model, sid)
        assert set(stage.state_dict()) <= set(model.state_dict())
        outputs = stage(*stage.example_inputs(2))
        assert torch.isfinite(outputs[0]), (name, sid)
        outputs[0].backward()
        assert all(p.grad is not None for p in stage.parameters() if p.requires_grad)


# ------------------------------------------------------------------ rewrites
def test_explicit_batchnorm_equals_torch() -> None:
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(6, momentum=0.2)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    exp = ExplicitBatchNorm2d(6, momentum=0.2)
    exp.load_state_dict({k: v for k, v in ref.state_dict().items() if k != "num_batches_tracked"})
    x = torch.randn(5, 6, 7, 3) * 3 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_exp = ref(xa), exp(xb)
    assert torch.allclose(out_ref, out_exp, atol=1e-5)
    (out_ref * out_ref).sum().backward()
    (out_exp * out_exp).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-4)
    assert torch.allclose(ref.weight.grad, exp.weight.grad, atol=1e-4)
    # running stats: torch updates in forward; ours records, the runtime formula applies
    assert exp.batch_stats is not None
    apply_batch_stats(exp, *exp.batch_stats)
    assert torch.allclose(exp.running_mean, ref.running_mean, atol=1e-6)
    assert torch.allclose(exp.running_var, ref.running_var, atol=1e-5)
    ref.eval()
    exp.eval()
    assert torch.allclose(ref(x), exp(x), atol=1e-5)
    # conversion shares the tensors
    conv = batchnorm_to_explicit(ref)
    assert conv.running_var is ref.running_var and conv.weight is ref.weight and not conv.training


def test_explicit_layernorm_equals_torch() -> None:
    ref = nn.LayerNorm(8)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    exp = ExplicitLayerNorm(8)
    exp.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 8)
    assert torch.allclose(ref(x), exp(x), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, padding=1, bias=False),
        dict(in_channels=8, out_channels=8, kernel_size=3, stride=1, padding=1, groups=8, bias=True),
        dict(in_channels=8, out_channels=4, kernel_size=1, stride=2, padding=0, bias=False),
        dict(in_channels=8, out_channels=4, kernel_size=(3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1),
             groups=2, bias=True),
    ],
)
def test_unfold_conv_equals_conv2d(kwargs: dict) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs)
    unfold = UnfoldConv2d.from_conv(conv)
    assert dict(unfold.named_parameters()).keys() == dict(conv.named_parameters()).keys()
    x = torch.randn(2, 8, 9, 11)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = conv(xa), unfold(xb)
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    g = torch.randn_like(a)
    wa = torch.autograd.grad(a, [xa, conv.weight], g)
    wb = torch.autograd.grad(b, [xb, unfold.weight], g)
    assert torch.allclose(wa[0], wb[0], atol=1e-5) and torch.allclose(wa[1], wb[1], atol=1e-4)


def test_rewrite_for_engine_keeps_names_and_numbers(resnet8: BlockedModel) -> None:
    stage = make_stage(resnet8, "grow-2")
    et = rewrite_for_engine(stage, "executorch")
    assert list(et.state_dict()) == list(stage.state_dict())
    assert any(isinstance(m, UnfoldConv2d) for m in et.modules())
    assert not any(isinstance(m, UnfoldConv2d) for m in stage.modules())  # original untouched
    assert [n for n, p in et.named_parameters() if p.requires_grad] == [s.name for s in stage.trainable_specs()]
    inputs = stage.example_inputs(B)
    for a, b in zip(stage(*inputs), et(*inputs), strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ExportError, match="unknown engine"):
        rewrite_for_engine(stage, "tflite")


# ------------------------------------------------------------------ torch.export
@pytest.mark.parametrize("sid", ["shrink-3", "shrink-2", "grow-1", "grow-2", "grow-3", "full"])
def test_torch_export_resnet8(resnet8: BlockedModel, sid: str) -> None:
    stage = make_stage(resnet8, sid)
    inputs = stage.example_inputs(B)
    ep = torch.export.export(stage, inputs, strict=False)
    assert len(ep.graph_signature.output_specs) == len(stage.output_specs(B))
    # parameters keep their global names in the exported program
    assert set(ep.graph_signature.parameters) == {n for n, _ in stage.named_parameters()}
    for a, b in zip(ep.module()(*inputs), stage(*inputs), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_torch_export_strict_resnet8_grow(resnet8: BlockedModel) -> None:
    stage = make_stage(resnet8, "grow-2")
    ep = torch.export.export(stage, stage.example_inputs(B), strict=True)
    assert len(ep.graph_signature.output_specs) == len(stage.output_specs(B))


@pytest.mark.slow
def test_executorch_trains_rewritten_resnet8_stage(resnet8: BlockedModel, tmp_path) -> None:
    """The ExecuTorch path (engines.md) on a rewritten stage: same loss and batch statistics as eager.

    Guards UnfoldConv2d's plain-op padding: F.pad / F.unfold backward lowers to negative
    constant_pad_nd, which the portable kernel rejects at run time.
    """
    pytest.importorskip("executorch")
    from executorch.exir import to_edge
    from executorch.extension.training import _load_for_executorch_for_training
    from torch.export.experimental import _export_forward_backward

    stage = rewrite_for_engine(make_stage(resnet8, "grow-2"), "executorch")
    inputs = stage.example_inputs(B)
    ep = _export_forward_backward(torch.export.export(stage, inputs, strict=True))
    path = tmp_path / "grow-2.pte"
    path.write_bytes(to_edge(ep).to_executorch().buffer)
    module = _load_for_executorch_for_training(str(path))
    got = module.forward_backward("forward", inputs)
    expected = stage(*inputs)
    for a, b in zip(got[: len(expected)], expected, strict=True):
        assert torch.allclose(a, b.detach(), atol=1e-4)
