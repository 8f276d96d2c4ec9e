"""Transformers with explicit attention math: a small CIFAR ViT and a character-level model.

No nn.MultiheadAttention / TransformerEncoderLayer / LayerNorm / softmax kernels:
ExecuTorch's to_edge rejects those in training (research/engines.md), so attention,
LayerNorm, softmax, GELU and the embedding are matmul / mean / rsqrt / exp / tanh.
Blocks are equal groups of encoder layers; the (patch or token) embedding is in block 1.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn

from fedblocks.export.blocks import BlockedModel
from fedblocks.export.errors import ExportError
from fedblocks.export.models.common import check_image_shape
from fedblocks.export.output_modules import TokenHead, linear_basic_layer
from fedblocks.export.rewrites import ExplicitEmbedding, ExplicitLayerNorm, ExplicitSoftmax, explicit_gelu


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.softmax = ExplicitSoftmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        dh = d // self.heads
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, dh).permute(2, 0, 3, 1, 4)  # (3, B, H, T, dh)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(dh))
        if self.causal:  # mask built from arange comparisons: plain ops in every engine
            pos = torch.arange(t, device=x.device)
            future = (pos.unsqueeze(0) > pos.unsqueeze(1)).to(scores.dtype)
            scores = scores - future * 1e9
        out = torch.matmul(self.softmax(scores), v)  # (B, H, T, dh)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, causal: bool = False) -> None:
        super().__init__()
        self.norm1 = ExplicitLayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.norm2 = ExplicitLayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(explicit_gelu(self.fc1(self.norm2(x))))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> Linear(C*p*p, D) + learned position embedding."""

    def __init__(self, channels: int, height: int, width: int, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(channels * patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, (height // patch) * (width // patch), dim) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        p = self.patch
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return self.proj(patches.reshape(b, (h // p) * (w // p), c * p * p)) + self.pos


class TokenEmbed(nn.Module):
    """Token ids -> one-hot @ table (ExplicitEmbedding) + learned position embedding."""

    def __init__(self, vocab: int, seq_len: int, dim: int) -> None:
        super().__init__()
        self.tok = ExplicitEmbedding(vocab, dim)
        nn.init.normal_(self.tok.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(1, seq_len, dim) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.tok(x) + self.pos


def _group_layers(name: str, embed: nn.Module, layers: list[nn.Module], num_blocks: int | None,
                  default_blocks: int) -> list[nn.Module]:
    depth = len(layers)
    k = default_blocks if num_blocks is None else num_blocks
    allowed = [d for d in range(2, depth + 1) if depth % d == 0]
    if k not in allowed:
        raise ExportError(f"{name}: num_blocks={k} must divide its {depth} encoder layers; "
                          f"choose one of {', '.join(map(str, allowed))}")
    per = depth // k
    blocks: list[nn.Module] = []
    for b in range(k):
        group: OrderedDict[str, nn.Module] = OrderedDict()
        if b == 0:
            group["embed"] = embed
        for i in range(per):
            group[str(i)] = layers[b * per + i]
        blocks.append(nn.Sequential(group))
    return blocks


VIT_PATCH, VIT_DIM, VIT_DEPTH, VIT_HEADS, VIT_MLP, VIT_BLOCKS = 4, 192, 6, 3, 384, 3


def vit(num_classes: int, input_shape: tuple[int, ...], num_blocks: int | None = None) -> BlockedModel:
    """ViT for small images: 4x4 patches, D=192, 6 layers, 3 heads, MLP 384, mean-pooled head."""
    name = "vit"
    c, h, w = check_image_shape(name, input_shape, min_side=VIT_PATCH, multiple=VIT_PATCH)
    layers: list[nn.Module] = [EncoderLayer(VIT_DIM, VIT_HEADS, VIT_MLP) for _ in range(VIT_DEPTH)]
    blocks = _group_layers(name, PatchEmbed(c, h, w, VIT_PATCH, VIT_DIM), layers, num_blocks, VIT_BLOCKS)
    return BlockedModel(
        name, blocks, TokenHead(VIT_DIM, num_classes, pool="mean"), num_classes=num_classes,
        input_shape=(c, h, w), basic_layer=linear_basic_layer,
        boundary_rule="equal groups of encoder layers; patch embedding in block 1",
    )


CHAR_DIM, CHAR_DEPTH, CHAR_HEADS, CHAR_MLP, CHAR_BLOCKS = 128, 4, 4, 256, 2


def char_transformer(num_classes: int, input_shape: tuple[int, ...], num_blocks: int | None = None) -> BlockedModel:
    """Next-character classifier (LEAF Shakespeare task): ids (B, T) int64 -> logits over the vocabulary.

    The vocabulary is the class set (num_classes); causal self-attention, 4 layers, D=128,
    4 heads; the head reads the last position.
    """
    name = "char_transformer"
    shape = tuple(input_shape)
    if len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 1:
        raise ExportError(f"{name}: input shape must be (seq_len,) with a positive length, got {list(shape)}")
    layers: list[nn.Module] = [EncoderLayer(CHAR_DIM, CHAR_HEADS, CHAR_MLP, causal=True) for _ in range(CHAR_DEPTH)]
    blocks = _group_layers(name, TokenEmbed(num_classes, shape[0], CHAR_DIM), layers, num_blocks, CHAR_BLOCKS)
    return BlockedModel(
        name, blocks, TokenHead(CHAR_DIM, num_classes, pool="last"), num_classes=num_classes,
        input_shape=shape, basic_layer=linear_basic_layer, input_dtype="int64",
        boundary_rule="equal groups of encoder layers; token embedding in block 1",
    )
