"""VGG-16 with BatchNorm, CIFAR variant (one Linear classifier); one block per resolution."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from fedblocks.export.blocks import BlockedModel
from fedblocks.export.models.common import check_image_shape, check_num_blocks
from fedblocks.export.output_modules import PoolLinearHead, conv_basic_layer
from fedblocks.export.rewrites import ExplicitBatchNorm2d, MaxPool2x2

# Conv widths per resolution group; every group ends in a 2x2 max-pool.
VGG16_GROUPS = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]


def vgg16(num_classes: int, input_shape: tuple[int, ...], num_blocks: int | None = None) -> BlockedModel:
    name = "vgg16"
    check_num_blocks(name, num_blocks, len(VGG16_GROUPS))
    c_in, _, _ = check_image_shape(name, input_shape, min_side=32, multiple=32)
    blocks: list[nn.Module] = []
    prev = c_in
    for widths in VGG16_GROUPS:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, width in enumerate(widths):
            layers[f"conv{i}"] = nn.Conv2d(prev, width, 3, padding=1, bias=False)
            layers[f"bn{i}"] = ExplicitBatchNorm2d(width)
            layers[f"relu{i}"] = nn.ReLU()
            prev = width
        layers["pool"] = MaxPool2x2()
        blocks.append(nn.Sequential(layers))
    return BlockedModel(
        name, blocks, PoolLinearHead(prev, num_classes), num_classes=num_classes, input_shape=tuple(input_shape),
        basic_layer=conv_basic_layer, boundary_rule="one block per resolution (each ends in its max-pool)",
    )
