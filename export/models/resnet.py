"""CIFAR-style ResNets (3x3 stride-1 stem, no max-pool): ResNet-8/18/34, one block per stage."""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from fedblocks.export.blocks import BlockedModel
from fedblocks.export.models.common import check_image_shape, check_num_blocks
from fedblocks.export.output_modules import PoolLinearHead, conv_basic_layer
from fedblocks.export.rewrites import ExplicitBatchNorm2d


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN, identity or 1x1-conv shortcut (torchvision's names)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = ExplicitBatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = ExplicitBatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), ExplicitBatchNorm2d(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            OrderedDict(conv=nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), bn=ExplicitBatchNorm2d(out_ch),
                        relu=nn.ReLU())
        )


def _resnet(name: str, stage_sizes: list[int], channels: list[int], num_classes: int,
            input_shape: tuple[int, ...], num_blocks: int | None) -> BlockedModel:
    check_num_blocks(name, num_blocks, len(stage_sizes))
    c_in, _, _ = check_image_shape(name, input_shape, min_side=2 ** (len(stage_sizes) - 1))
    blocks: list[nn.Module] = []
    prev = channels[0]
    for s, (n, ch) in enumerate(zip(stage_sizes, channels, strict=True)):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if s == 0:
            layers["stem"] = ConvBNReLU(c_in, channels[0])  # stem folded into block 1
        for b in range(n):
            layers[str(b)] = BasicBlock(prev, ch, stride=2 if (s > 0 and b == 0) else 1)
            prev = ch
        blocks.append(nn.Sequential(layers))
    return BlockedModel(
        name, blocks, PoolLinearHead(channels[-1], num_classes), num_classes=num_classes,
        input_shape=tuple(input_shape), basic_layer=conv_basic_layer,
        boundary_rule="one block per residual stage; stem in block 1",
    )


def resnet8(num_classes: int, input_shape: tuple[int, ...], num_blocks: int | None = None) -> BlockedModel:
    return _resnet("resnet8", [1, 1, 1], [16, 32, 64], num_classes, input_shape, num_blocks)


def resnet18(num_classes: int, input_shape: tuple[int, ...], num_blocks: int | None = None) -> BlockedModel:
    return _resnet("resnet18", [2, 2, 2, 2], [64, 128, 256, 512], num_classes, input_shape, num_blocks)


def resnet34(num_classes: int, input_shape: tuple[int, ...], num_blocks: int | None = None) -> BlockedModel:
    return _resnet("resnet34", [3, 4, 6, 3], [64, 128, 256, 512], num_classes, input_shape, num_blocks)
