"""The model zoo: builds, shapes, block structure, names, bad input."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from fedblocks.export.blocks import BlockedModel
from fedblocks.export.errors import ExportError
from fedblocks.export.models import DEFAULT_INPUT_SHAPES, DEFAULT_NUM_CLASSES, MODEL_NAMES, build_model

EXPECTED_BLOCKS = {"resnet8": 3, "resnet18": 4, "resnet34": 4, "vgg16": 5, "mobilenetv2": 4, "vit": 3,
                   "char_transformer": 2}


@cache
def _build(name: str) -> BlockedModel:
    """One instance per model for this file (tests only switch train/eval modes)."""
    torch.manual_seed(0)
    return build_model(name, DEFAULT_NUM_CLASSES[name], DEFAULT_INPUT_SHAPES[name])


def _batch(model: BlockedModel, n: int = 2) -> torch.Tensor:
    if model.input_dtype == "int64":
        return torch.randint(0, model.num_classes, (n, *model.input_shape))
    return torch.randn(n, *model.input_shape)


def test_zoo_is_complete() -> None:
    assert set(MODEL_NAMES) == set(EXPECTED_BLOCKS)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_builds_and_forward_shape(name: str) -> None:
    model = _build(name)
    assert model.num_blocks == EXPECTED_BLOCKS[name]
    x = _batch(model)
    with torch.no_grad():
        model.train()
        out = model(x)
        assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
        # eval mode, block by block: block_output_shape agrees with a real forward
        model.eval()
        h = x
        for k in range(1, model.num_blocks + 1):
            h = model.block(k)(h)
            assert tuple(h.shape[1:]) == model.block_output_shape(k)
        out = model.head(h)
        assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
        for j in range(2, model.num_blocks + 1):  # every basic layer maps block j-1's shape to block j's
            a = torch.zeros(1, *model.block_output_shape(j - 1), dtype=torch.float32)
            assert tuple(model.basic_layer(j)(a).shape[1:]) == model.block_output_shape(j)


@pytest.mark.parametrize(("name", "shape"), [("resnet8", (3, 32, 32)), ("vit", (3, 8, 8)), ("char_transformer", (12,))])
def test_sub_model_exits(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, shape).eval()
    x = _batch(model)
    with torch.no_grad():
        full = model(x)
        assert torch.allclose(model.prefix_logits(x, model.num_blocks), full)
        assert torch.allclose(model.shrunk_logits(x, model.num_blocks + 1), full)
        h = model.block(1)(x)
        assert torch.allclose(model.prefix_logits(x, 1), model.output_module(1)(h))
        for k in range(1, model.num_blocks):
            assert model.prefix_logits(x, k).shape == (2, 10)
        # shrunk model with only block 1 left: basic layers 2..K then the head
        expected = h
        for j in range(2, model.num_blocks + 1):
            expected = model.basic_layer(j)(expected)
        assert torch.allclose(model.shrunk_logits(x, 2), model.head(expected))


def test_reference_parameter_counts() -> None:
    # Known counts of the reference architectures with 10 classes: CIFAR ResNet-18/34 (kuangliu),
    # torchvision MobileNetV2 (3,504,872 at 1000 classes -> 2,236,682 at 10; CIFAR strides do not
    # change parameters), VGG-16-BN CIFAR without conv biases (BN follows every conv).
    expected = {"resnet18": 11_173_962, "resnet34": 21_282_122, "mobilenetv2": 2_236_682,
                "vgg16": 14_728_266 - (2 * 64 + 2 * 128 + 3 * 256 + 6 * 512)}
    for name, count in expected.items():
        assert _build(name).param_count() == count, name


def test_resnet18_structure_and_names() -> None:
    model = _build("resnet18")
    assert [model.block_output_shape(k) for k in range(1, 5)] == [(64, 32, 32), (128, 16, 16), (256, 8, 8),
                                                                    (512, 4, 4)]
    names = dict(model.named_parameters())
    assert names["blocks.0.stem.conv.weight"].shape == (64, 3, 3, 3)
    assert names["blocks.1.0.conv1.weight"].shape == (128, 64, 3, 3)
    assert names["head.fc.weight"].shape == (10, 512)
    # ProFL basic layers: 3x3 stride-2 conv, no bias, doubling channels
    for j, (cin, cout) in zip((2, 3, 4), ((64, 128), (128, 256), (256, 512)), strict=True):
        layer = model.basic_layer(j)
        assert isinstance(layer, torch.nn.Conv2d) and layer.bias is None
        assert layer.weight.shape == (cout, cin, 3, 3) and layer.stride == (2, 2) and layer.padding == (1, 1)
    assert sorted(model.output_modules.keys()) == ["0", "1", "2"]
    assert sorted(model.output_module(1).layers.keys()) == ["1", "2", "3"]
    assert sorted(model.output_module(3).layers.keys()) == ["3"]
    assert "num_batches_tracked" not in " ".join(model.state_dict())


@pytest.mark.parametrize("name", ["resnet8", "vit", "char_transformer"])
def test_output_module_sources_match_shapes(name: str) -> None:
    model = _build(name)
    state = model.state_dict()
    sources = model.output_module_sources()
    assert sources and set(sources) == {n for n in state if n.startswith("output_modules.")}
    for target, source in sources.items():
        assert state[target].shape == state[source].shape, (target, source)


def test_block_tensor_names_partition_the_blocks() -> None:
    model = _build("resnet8")
    per_block = [set(model.block_tensor_names(k)) for k in range(1, 4)]
    all_block = {n for n in model.state_dict() if n.startswith("blocks.")}
    assert set().union(*per_block) == all_block
    assert sum(len(s) for s in per_block) == len(all_block)
    assert "blocks.0.stem.bn.running_mean" in per_block[0]


def test_num_blocks_override() -> None:
    assert build_model("vit", 10, (3, 32, 32), num_blocks=2).num_blocks == 2
    assert build_model("char_transformer", 90, (80,), num_blocks=4).num_blocks == 4
    assert build_model("resnet18", 10, (3, 32, 32), num_blocks=4).num_blocks == 4
    with pytest.raises(ExportError, match="num_blocks=3"):
        build_model("resnet18", 10, (3, 32, 32), num_blocks=3)
    with pytest.raises(ExportError, match="must divide"):
        build_model("vit", 10, (3, 32, 32), num_blocks=4)


def test_other_input_shapes() -> None:
    model = build_model("resnet8", 100, (1, 28, 28))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 100)
    assert build_model("vit", 10, (1, 28, 28)).block_output_shape(1) == (49, 192)
    assert build_model("vgg16", 10, (3, 64, 64)).block_output_shape(5) == (512, 2, 2)


@pytest.mark.parametrize(
    ("name", "shape", "needle"),
    [
        ("resnet18", (1, 4, 4), ">= 8"),
        ("resnet18", (3, 32), "C,H,W"),
        ("vgg16", (3, 30, 30), "divisible by 32"),
        ("vit", (3, 30, 30), "divisible by 4"),
        ("mobilenetv2", (3, 0, 32), "C,H,W"),
        ("char_transformer", (3, 32, 32), "seq_len"),
    ],
)
def test_bad_input_shape_is_one_clear_error(name: str, shape: tuple[int, ...], needle: str) -> None:
    with pytest.raises(ExportError, match=needle) as info:
        build_model(name, 10, shape)
    assert "\n" not in str(info.value)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ExportError) as info:
        build_model("resnet50", 10, (3, 32, 32))
    message = str(info.value)
    assert "\n" not in message and "resnet50" in message
    assert all(n in message for n in MODEL_NAMES)


def test_bad_num_classes() -> None:
    with pytest.raises(ExportError, match="num_classes"):
        build_model("resnet8", 1, (3, 32, 32))
