"""MobileNetV2, CIFAR variant (stride-1 stem, stride 1 in the 24-channel stage); one block per resolution."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from fedblocks.export.blocks import BlockedModel
from fedblocks.export.models.common import check_image_shape, check_num_blocks
from fedblocks.export.output_modules import PoolLinearHead, conv_basic_layer
from fedblocks.export.rewrites import ExplicitBatchNorm2d

# (expansion t, out channels c, repeats n, first stride s); torchvision's table with the
# CIFAR change (stem stride 1, second stage stride 1) so 32x32 ends at 4x4.
CIFAR_CONFIG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def relu6(x: Tensor) -> Tensor:
    return torch.clamp(x, 0.0, 6.0)


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.has_expand = expansion != 1
        if self.has_expand:
            self.expand = nn.Conv2d(in_ch, hidden, 1, bias=False)
            self.expand_bn = ExplicitBatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.dw_bn = ExplicitBatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, out_ch, 1, bias=False)
        self.project_bn = ExplicitBatchNorm2d(out_ch)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        h = relu6(self.expand_bn(self.expand(x))) if self.has_expand else x
        h = relu6(self.dw_bn(self.dw(h)))
        h = self.project_bn(self.project(h))
        return x + h if self.use_residual else h


class ConvBNReLU6(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False)
        self.bn = ExplicitBatchNorm2d(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return relu6(self.bn(self.conv(x)))


def mobilenetv2(num_classes: int, input_shape: tuple[int, ...], num_blocks: int | None = None) -> BlockedModel:
    name = "mobilenetv2"
    downsamples = sum(1 for _, _, _, s in CIFAR_CONFIG if s == 2)
    check_num_blocks(name, num_blocks, downsamples + 1)
    c_in, _, _ = check_image_shape(name, input_shape, min_side=2 ** downsamples)
    groups: list[OrderedDict[str, nn.Module]] = [OrderedDict(stem=ConvBNReLU6(c_in, STEM_CHANNELS, 3))]
    prev, index = STEM_CHANNELS, 0
    for t, c, n, s in CIFAR_CONFIG:
        if s == 2:  # a resolution change starts a new block
            groups.append(OrderedDict())
        for i in range(n):
            groups[-1][str(index)] = InvertedResidual(prev, c, s if i == 0 else 1, t)
            prev, index = c, index + 1
    groups[-1]["last"] = ConvBNReLU6(prev, LAST_CHANNELS, 1)
    return BlockedModel(
        name, [nn.Sequential(g) for g in groups], PoolLinearHead(LAST_CHANNELS, num_classes),
        num_classes=num_classes, input_shape=tuple(input_shape), basic_layer=conv_basic_layer,
        boundary_rule="one block per resolution; stem in block 1, last 1x1 conv in block K",
    )
