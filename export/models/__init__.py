"""The model zoo: every builder returns a BlockedModel (see docs/models.md)."""

from __future__ import annotations

from collections.abc import Callable

from fedblocks.export.blocks import BlockedModel
from fedblocks.export.errors import ExportError
from fedblocks.export.models.mobilenet import mobilenetv2
from fedblocks.export.models.resnet import resnet8, resnet18, resnet34
from fedblocks.export.models.transformer import char_transformer, vit
from fedblocks.export.models.vgg import vgg16

Builder = Callable[..., BlockedModel]

_BUILDERS: dict[str, Builder] = {
    "resnet8": resnet8,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "vgg16": vgg16,
    "mobilenetv2": mobilenetv2,
    "vit": vit,
    "char_transformer": char_transformer,
}

# The input each model was designed for (CIFAR-10 images); builders accept others they can take.
DEFAULT_INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "resnet8": (3, 32, 32),
    "resnet18": (3, 32, 32),
    "resnet34": (3, 32, 32),
    "vgg16": (3, 32, 32),
    "mobilenetv2": (3, 32, 32),
    "vit": (3, 32, 32),
    "char_transformer": (80,),  # LEAF/TFF Shakespeare: 80 characters of context
}
DEFAULT_NUM_CLASSES: dict[str, int] = {
    "resnet8": 10,
    "resnet18": 10,
    "resnet34": 10,
    "vgg16": 10,
    "mobilenetv2": 10,
    "vit": 10,
    "char_transformer": 90,  # TFF Shakespeare vocabulary: 86 characters + pad, oov, bos, eos
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...], num_blocks: int | None = None) -> BlockedModel:
    """Build zoo model `name` (ExportError for an unknown name or an input it cannot take)."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ExportError(f"unknown model '{name}': choose one of {', '.join(MODEL_NAMES)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ExportError(f"{name}: num_classes must be an integer >= 2, got {num_classes!r}")
    if num_blocks is not None and (not isinstance(num_blocks, int) or isinstance(num_blocks, bool)):
        raise ExportError(f"{name}: num_blocks must be an integer, got {num_blocks!r}")
    return builder(num_classes, tuple(input_shape), num_blocks)
