"""Export-friendly replacements for torch layers, written with plain tensor ops.

Why: the three on-device engines differ in what they can train.
- ExecuTorch's `to_edge` rejects `_native_batch_norm_legit_functional` and its
  portable BatchNorm kernel is inference-only; its portable conv backward is ~170x
  slower than matmul (research/engines.md). LayerNorm / softmax / GELU / embedding
  are also written with plain ops so every engine sees only mean, mul, rsqrt, exp,
  matmul and friends.
- Buffer mutation inside `forward` is handled differently by ONNX tracing, ORT
  training, ExecuTorch and torch.export, so no module here mutates a buffer: a
  training BatchNorm *records* its batch statistics on itself, the stage program
  returns them as outputs, and the runtime applies
  `running = (1 - momentum) * running + momentum * batch` (docs/formats.md).

Every replacement keeps the parameter / buffer names of the torch layer it stands
for (`weight`, `bias`, `running_mean`, `running_var`), so state dicts move between
the two unchanged. `num_batches_tracked` is dropped: momentum is always a fixed
number here (never the cumulative-average mode), so nothing reads it; load a
torch BatchNorm state dict with `strict=False` or drop that key.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from fedblocks.export.errors import ExportError

ENGINES = ("torch", "ort", "executorch")


def batch_norm_training(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode batch norm over every dim but 1 with mean / mul / rsqrt: (y, batch mean,
    biased batch variance), the statistics flat (C,)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    mean = x.mean(dim=dims, keepdim=True)
    centered = x - mean
    var = (centered * centered).mean(dim=dims, keepdim=True)
    y = centered * torch.rsqrt(var + eps) * weight.reshape(shape) + bias.reshape(shape)
    return y, mean.reshape(-1), var.reshape(-1)


class ExplicitBatchNorm(nn.Module):
    """BatchNorm over every dim but 1 (works for (N, C), (N, C, L), (N, C, H, W)).

    Train mode: normalise with the batch mean and the biased batch variance,
    computed with mean / mul / rsqrt, and record `(mean, unbiased var)` (detached)
    in `self.batch_stats` for the stage program to return. Eval mode: use the
    running statistics. Buffers are never written in `forward`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.batch_stats: tuple[Tensor, Tensor] | None = None

    def _shape(self, x: Tensor) -> list[int]:
        return [1, self.num_features] + [1] * (x.dim() - 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            y, mean, var = batch_norm_training(x, self.weight, self.bias, self.eps)
            self._record_batch_stats(x, mean, var)
            return y
        shape = self._shape(x)
        normalized = (x - self.running_mean.reshape(shape)) * torch.rsqrt(self.running_var.reshape(shape) + self.eps)
        return normalized * self.weight.reshape(shape) + self.bias.reshape(shape)

    def _record_batch_stats(self, x: Tensor, mean: Tensor, biased_var: Tensor) -> None:
        """`batch_stats` = (batch mean, unbiased batch variance), detached, for the stage to return."""
        n = x.numel() // self.num_features
        # n - 1 == 0 gives inf/nan, as torch does; the model builders refuse such shapes.
        self.batch_stats = (mean.detach(), biased_var.detach() * (n / max(n - 1, 1)))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


# Named aliases so model code reads like torch's.
ExplicitBatchNorm2d = ExplicitBatchNorm
ExplicitBatchNorm1d = ExplicitBatchNorm


def apply_batch_stats(bn: ExplicitBatchNorm, mean: Tensor, var: Tensor) -> None:
    """The runtime's running-stat update, for torch eager: running = (1-m)*running + m*batch."""
    m = bn.momentum
    with torch.no_grad():
        bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
        bn.running_var.mul_(1 - m).add_(var.to(bn.running_var.dtype), alpha=m)


class _BatchNormTrainingFn(torch.autograd.Function):
    """Training-mode batch norm that exports as ONE ONNX BatchNormalization (training_mode=1, momentum=0).

    forward: batch_norm_training, the explicit math of ExplicitBatchNorm;
    symbolic: the ONNX node, whose running-statistic outputs with momentum 0 are exactly the
    batch mean and the biased batch variance (checked against numpy on ORT 1.19).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float,  # type: ignore[override]
                num_features: int) -> tuple[Tensor, Tensor, Tensor]:
        return batch_norm_training(x, weight, bias, eps)

    @staticmethod
    def symbolic(g: Any, x: Any, weight: Any, bias: Any, eps: float, num_features: int) -> Any:
        zeros = g.op("Constant", value_t=torch.zeros(num_features))
        ones = g.op("Constant", value_t=torch.ones(num_features))
        return g.op("BatchNormalization", x, weight, bias, zeros, ones, epsilon_f=eps, momentum_f=0.0,
                    training_mode_i=1, outputs=3)


class OrtBatchNorm(ExplicitBatchNorm):
    """ExplicitBatchNorm whose training-mode forward exports as ONNX BatchNormalization (ORT only).

    Why: ORT trains it with its fused BatchNormInternal / BatchNormalizationGrad kernels
    instead of ~10 elementwise and reduction nodes forward and ~25 backward; measured on
    ResNet-18 full at batch 32, one thread: 751 -> 698 ms per ORT step. The batch
    statistics it records are the node's batch mean and biased variance times n/(n-1),
    as ExplicitBatchNorm records them. Outside an ONNX export, and in eval mode, it is
    ExplicitBatchNorm (same names, same math).
    """

    @classmethod
    def from_explicit(cls, bn: ExplicitBatchNorm) -> OrtBatchNorm:
        new = cls(bn.num_features, bn.eps, bn.momentum)
        new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var = bn.running_mean, bn.running_var  # type: ignore[assignment]
        new.train(bn.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and torch.onnx.is_in_onnx_export()):
            return super().forward(x)
        y, mean, var = _BatchNormTrainingFn.apply(x, self.weight, self.bias, self.eps, self.num_features)
        self._record_batch_stats(x, mean, var)
        return y


class ExplicitLayerNorm(nn.Module):
    """LayerNorm over the last dim with mean / mul / rsqrt (names: weight, bias)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        centered = x - mean
        var = (centered * centered).mean(dim=-1, keepdim=True)
        return centered * torch.rsqrt(var + self.eps) * self.weight + self.bias


def explicit_softmax(x: Tensor, dim: int = -1) -> Tensor:
    """Softmax as exp / sum (max-shifted; the shift carries no gradient)."""
    shifted = x - x.amax(dim=dim, keepdim=True).detach()
    e = torch.exp(shifted)
    return e / e.sum(dim=dim, keepdim=True)


class ExplicitSoftmax(nn.Module):
    """explicit_softmax as a module, so rewrite_for_engine can give ORT its native Softmax: ORT 1.19
    has no gradient for the ReduceMax of the shift (the ONNX graph has no stop-gradient)."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return explicit_softmax(x, self.dim)


class MaxPool2x2(nn.Module):
    """2x2 stride-2 max-pool as reshape + amax (plain ops ExecuTorch can differentiate; ORT gets
    its native MaxPool, which has a gradient where ReduceMax has none)."""

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))


def explicit_gelu(x: Tensor) -> Tensor:
    """GELU, tanh approximation, with mul / tanh only."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


class ExplicitEmbedding(nn.Module):
    """Embedding as one_hot(x) @ weight: the backward is a matmul in every engine."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.weight = nn.Parameter(torch.randn(num_embeddings, dim))

    def forward(self, x: Tensor) -> Tensor:
        classes = torch.arange(self.num_embeddings, device=x.device, dtype=x.dtype)
        one_hot = (x.unsqueeze(-1) == classes).to(self.weight.dtype)
        return one_hot @ self.weight


class UnfoldConv2d(nn.Module):
    """Conv2d as unfold + matmul (same `weight` / `bias` names and shapes as nn.Conv2d).

    ExecuTorch's portable convolution_backward is extremely slow (and its forward
    convolution too: ResNet-18's 64-channel 32x32 conv takes 2.8 s at batch 32); routed
    this way forward and backward are matrix multiplies plus copies.

    Ungrouped convs (``_im2col_forward``): channels-last im2col, i.e. one permute of the
    input, the kh*kw shifted taps concatenated along channels, and ONE batch-1 ``bmm`` of
    (N*H_out*W_out, kh*kw*C_in) x (kh*kw*C_in, C_out). A bmm because ExecuTorch's XNNPACK
    backend takes bmm with two runtime operands (its fully-connected path wants a
    constant weight), and the training program is lowered to XNNPACK
    (builders/executorch.py): measured at batch 32, one thread, forward + backward of
    ResNet-18's 512-channel 4x4 conv: 436 ms per-tap bmm on portable kernels -> 36 ms
    (torch eager: 33 ms); its 64-channel 32x32 conv: 256 -> 98 ms (eager 42 ms).
    Grouped and depthwise convs keep one matmul (or multiply) per kernel tap.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
        bias: bool,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> UnfoldConv2d:
        if not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
            raise ExportError(f"UnfoldConv2d: padding {conv.padding!r} / mode {conv.padding_mode!r} not supported")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,  # type: ignore[arg-type]
                  conv.padding, conv.dilation, conv.groups, conv.bias is not None)  # type: ignore[arg-type]
        new.weight = conv.weight  # share: same Parameter object, same name
        new.bias = conv.bias
        new.train(conv.training)
        return new

    def _im2col_forward(self, x: Tensor, out_h: int, out_w: int) -> Tensor:
        n, c, _, w = x.shape
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        x = x.permute(0, 2, 3, 1)  # channels-last view (N, H, W, C)
        # Zero padding by concatenation (see forward)
        if ph:
            zeros = torch.zeros(n, ph, w, c, dtype=x.dtype, device=x.device)
            x = torch.cat([zeros, x, zeros], dim=1)
        if pw:
            zeros = torch.zeros(n, x.shape[1], pw, c, dtype=x.dtype, device=x.device)
            x = torch.cat([zeros, x, zeros], dim=2)
        taps = [x[:, i * dh: i * dh + sh * (out_h - 1) + 1: sh, j * dw: j * dw + sw * (out_w - 1) + 1: sw, :]
                for i in range(kh) for j in range(kw)]
        cols = torch.cat(taps, dim=3) if len(taps) > 1 else taps[0].contiguous()  # (N, Ho, Wo, taps*C)
        cols = cols.reshape(1, n * out_h * out_w, kh * kw * c)
        # weight (Cout, C, kh, kw) -> rows (tap, c), the order of the concatenated taps
        weight = self.weight.permute(0, 2, 3, 1).reshape(1, self.out_channels, kh * kw * c).transpose(1, 2)
        out = torch.bmm(cols, weight).reshape(n, out_h, out_w, self.out_channels).permute(0, 3, 1, 2)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1)
        return out.contiguous()

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if self.groups == 1:
            return self._im2col_forward(x, out_h, out_w)
        # Zero padding by concatenation: its backward is a plain slice. (F.pad / F.unfold backward
        # lower to constant_pad_nd with negative padding, which ExecuTorch's portable kernel rejects.)
        if ph:
            zeros = torch.zeros(n, c, ph, w, dtype=x.dtype, device=x.device)
            x = torch.cat([zeros, x, zeros], dim=2)
        if pw:
            zeros = torch.zeros(n, c, x.shape[2], pw, dtype=x.dtype, device=x.device)
            x = torch.cat([zeros, x, zeros], dim=3)
        g = self.groups
        depthwise = g == c == self.out_channels
        weight = self.weight.reshape(g, self.out_channels // g, c // g, kh * kw)
        out: Tensor | None = None
        # One matmul per kernel tap on a shifted, strided view: no kh*kw-times im2col buffer.
        # Depthwise: one per-channel multiply per tap instead (no G tiny matmuls).
        for i in range(kh):
            for j in range(kw):
                tap = x[:, :, i * dh: i * dh + sh * (out_h - 1) + 1: sh, j * dw: j * dw + sw * (out_w - 1) + 1: sw]
                if depthwise:
                    term = tap * self.weight[:, 0, i, j].reshape(1, c, 1, 1)
                else:
                    cols = tap.reshape(n, g, c // g, out_h * out_w)
                    term = torch.matmul(weight[:, :, :, i * kw + j].unsqueeze(0), cols)  # (N, G, Cout/G, L)
                out = term if out is None else out + term
        assert out is not None
        result = out.reshape(n, self.out_channels, out_h, out_w)
        if self.bias is not None:
            result = result + self.bias.reshape(1, -1, 1, 1)
        return result


def _swap_modules(module: nn.Module, convert: dict[type, object]) -> None:
    for name, child in list(module.named_children()):
        fn = convert.get(type(child))
        if fn is not None:
            setattr(module, name, fn(child))  # type: ignore[operator]
        else:
            _swap_modules(child, convert)


def batchnorm_to_explicit(bn: nn.modules.batchnorm._BatchNorm) -> ExplicitBatchNorm:
    """An ExplicitBatchNorm with a torch BatchNorm's parameters and running stats (shared tensors)."""
    if bn.momentum is None or not bn.affine or not bn.track_running_stats:
        raise ExportError("BatchNorm with momentum=None, affine=False or no running stats is not supported")
    new = ExplicitBatchNorm(bn.num_features, bn.eps, bn.momentum)
    new.weight, new.bias = bn.weight, bn.bias
    new.running_mean, new.running_var = bn.running_mean, bn.running_var  # type: ignore[assignment]
    new.train(bn.training)
    return new


def rewrite_for_engine(module: nn.Module, engine: str) -> nn.Module:
    """A deep copy of `module` with every layer the engine cannot train swapped out.

    Parameter and buffer names are unchanged. All engines: torch BatchNorm ->
    ExplicitBatchNorm (zoo models already use it). "executorch": nn.Conv2d ->
    UnfoldConv2d as well. "ort": BatchNorm -> OrtBatchNorm (one fused ONNX node in training
    mode), ExplicitSoftmax -> nn.Softmax and MaxPool2x2 ->
    nn.MaxPool2d (ORT 1.19 has no ReduceMax gradient). The input module is never modified; train / eval modes
    of every submodule are preserved.
    """
    if engine not in ENGINES:
        raise ExportError(f"unknown engine '{engine}': choose one of {', '.join(ENGINES)}")
    out = copy.deepcopy(module)
    convert: dict[type, object] = {
        nn.BatchNorm1d: batchnorm_to_explicit,
        nn.BatchNorm2d: batchnorm_to_explicit,
    }
    if engine == "executorch":
        convert[nn.Conv2d] = UnfoldConv2d.from_conv
    if engine == "ort":
        convert[ExplicitBatchNorm] = OrtBatchNorm.from_explicit
        convert[nn.BatchNorm1d] = lambda bn: OrtBatchNorm.from_explicit(batchnorm_to_explicit(bn))
        convert[nn.BatchNorm2d] = lambda bn: OrtBatchNorm.from_explicit(batchnorm_to_explicit(bn))
        convert[ExplicitSoftmax] = lambda m: nn.Softmax(dim=m.dim)
        convert[MaxPool2x2] = lambda m: nn.MaxPool2d(2, 2)
    _swap_modules(out, convert)
    return out
