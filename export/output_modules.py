"""Heads, basic layers and ProFL output modules.

Basic layer j (j = 2..K) is the single cheap layer that stands in for block j: it
maps block j-1's output shape to block j's output shape. For CNNs it is ProFL's
3x3 conv, padding 1, no bias / norm / activation, stride 2 where block j halves the
resolution (else 1), C_{j-1} -> C_j channels. For token models (ViT, char
transformer) it is a token-wise Linear(D, D).

Output module for prefix k (k = 1..K-1): own copies of basic layers k+1..K, then a
copy of the model's head (pool + Linear). After ProFL's shrinking stage the host
copies the trained basic layers and head into them (`output_module_sources`).
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from fedblocks.export.errors import ExportError
from fedblocks.export.rewrites import ExplicitLayerNorm


class PoolLinearHead(nn.Module):
    """Global average pool over H, W, flatten, Linear: (B, C, H, W) -> (B, classes)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class TokenHead(nn.Module):
    """LayerNorm, then mean over tokens ("mean") or the last token ("last"), then Linear."""

    def __init__(self, dim: int, num_classes: int, pool: str = "mean") -> None:
        super().__init__()
        if pool not in ("mean", "last"):
            raise ValueError(f"pool must be 'mean' or 'last', got {pool!r}")
        self.pool = pool
        self.norm = ExplicitLayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        pooled = x.mean(dim=1) if self.pool == "mean" else x[:, -1]
        return self.fc(pooled)


def conv_basic_layer(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> nn.Conv2d:
    """ProFL's basic layer between two CNN block outputs (C, H, W) -> (C', H', W')."""
    (c_in, h_in, w_in), (c_out, h_out, w_out) = in_shape, out_shape
    for stride in (1, 2):
        if (h_in + 2 - 3) // stride + 1 == h_out and (w_in + 2 - 3) // stride + 1 == w_out:
            return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
    raise ExportError(f"no 3x3 stride-1/2 basic layer maps block output {in_shape} to {out_shape}")


def linear_basic_layer(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> nn.Linear:
    """Token-wise Linear(D, D') between two token-model block outputs (T, D) -> (T, D')."""
    if in_shape[:-1] != out_shape[:-1]:
        raise ExportError(f"no token-wise basic layer maps {in_shape} to {out_shape}")
    return nn.Linear(in_shape[-1], out_shape[-1], bias=False)


class OutputModule(nn.Module):
    """Basic layers k+1..K (own copies) then the head: the exit of the sub-model ending at block k.

    `layers` is keyed like `BlockedModel.basic_layers`: by the 0-based index of the block
    each layer replaces, so `output_modules.{k-1}.layers.{j-1}` is a copy of `basic_layers.{j-1}`.
    """

    def __init__(self, basic_layers: dict[str, nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({key: copy.deepcopy(layer) for key, layer in basic_layers.items()})
        self.head = copy.deepcopy(head)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers.values():
            x = layer(x)
        return self.head(x)
