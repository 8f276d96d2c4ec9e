"""NeuLite stage programs: progressive block training with the Curriculum Mentor loss and
the Training Harmonizer (research/methods.md, arXiv 2408.10826).

Built ON TOP of fedblocks.export.stages (not a change to it): `make_neulite_stage(model,
k, ...)` returns a StageProgram subclass with the same contract (forward(x, y) ->
(loss, *batch_stats), global tensor names, state specs), so every engine and the host's
simulated clients run it like any other stage. Stage id: "neulite-k".

Stage k:
- blocks 1..k-2 frozen (eval mode, no_grad);
- block k-1 frozen EXCEPT its last conv (or linear) and the norm after it, which stay
  trainable (the harmonizer's backward co-adaptation; the rest of block k-1 is eval mode);
- block k trainable, then output module k (the real head for k = K);
- a projection head h = Linear(C_k, 4c) -> Linear(4c, 2c) -> Linear(2c, c), no activations,
  c = channels of the model's last block (512 for ResNet-18: the paper's 512->2048->1024->512),
  applied to the globally pooled block output; its tensors are global tensors named
  `neulite_proj.{k-1}.{0,1,2}.{weight,bias}`.
Loss (Curriculum Mentor):
  L_k = CE(logits, y) - lambda1 * nHSIC(Z, X) - lambda2 * nHSIC(h(pool(Z)), onehot(y))
Z = flattened block-k output, X = flattened input, nHSIC(A, B) = HSIC(A, B) /
sqrt(HSIC(A, A) HSIC(B, B)), HSIC(A, B) = mean((K_A H) o (K_B H)^T), H = I - 1/m,
K_ij = exp(-||a_i - a_j||^2 / (2 sigma^2 d)), sigma = 5, d = feature dimension.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedblocks.export.blocks import BlockedModel
from fedblocks.export.errors import ExportError
from fedblocks.export.rewrites import ExplicitBatchNorm
from fedblocks.export.stages import CrossEntropyLoss, StageProgram, Step

NEULITE_SIGMA = 5.0
_ID = re.compile(r"^neulite-(\d+)$")


def neulite_stage_ids(model: BlockedModel) -> list[str]:
    return [f"neulite-{k}" for k in range(1, model.num_blocks + 1)]


def projection_dims(model: BlockedModel, k: int) -> list[int]:
    c_k = model.block_output_shape(k)[0]
    c = model.block_output_shape(model.num_blocks)[0]
    return [c_k, 4 * c, 2 * c, c]


def make_projection_head(dims: list[int]) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(a, b) for a, b in itertools.pairwise(dims)])


def projection_head_weights(model: BlockedModel, seed: int) -> dict[str, np.ndarray]:
    """Initial projection-head tensors for every stage, seeded (global names)."""
    out: dict[str, np.ndarray] = {}
    for k in range(1, model.num_blocks + 1):
        torch.manual_seed(seed * 7919 + k)
        head = make_projection_head(projection_dims(model, k))
        for name, p in head.named_parameters():
            out[f"neulite_proj.{k - 1}.{name}"] = p.detach().numpy().copy()
    return out


def gaussian_kernel(a: Tensor, sigma: float = NEULITE_SIGMA) -> Tensor:
    a = a.reshape(a.shape[0], -1)
    d = a.shape[1]
    sq = (a * a).sum(dim=1, keepdim=True)
    dist = (sq + sq.T - 2.0 * (a @ a.T)).clamp_min(0.0)
    return torch.exp(-dist / (2.0 * sigma * sigma * d))


def hsic(k_a: Tensor, k_b: Tensor) -> Tensor:
    m = k_a.shape[0]
    h = torch.eye(m, dtype=k_a.dtype) - 1.0 / m
    return ((k_a @ h) * (k_b @ h).T).mean()


def nhsic(a: Tensor, b: Tensor, sigma: float = NEULITE_SIGMA) -> Tensor:
    k_a, k_b = gaussian_kernel(a, sigma), gaussian_kernel(b, sigma)
    return hsic(k_a, k_b) / torch.sqrt(hsic(k_a, k_a) * hsic(k_b, k_b) + 1e-12)


def _harmonized_modules(block: nn.Module) -> tuple[str, str | None]:
    """Names (inside `block`) of its last conv/linear and the last norm after it."""
    layers = [(n, m) for n, m in block.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise ExportError("NeuLite harmonizer: the previous block has no conv or linear layer")
    # the main path's last layer: skip shortcut/downsample projections
    main = [(n, m) for n, m in layers if "shortcut" not in n and "downsample" not in n] or layers
    conv_name = main[-1][0]
    names = [n for n, _ in block.named_modules()]
    after = names[names.index(conv_name) + 1:]
    norms = [n for n in after if isinstance(dict(block.named_modules())[n], ExplicitBatchNorm)
             and "shortcut" not in n and "downsample" not in n]
    return conv_name, (norms[0] if norms else None)


class NeuLiteStageProgram(StageProgram):
    def __init__(self, model: BlockedModel, k: int, lambda1: float, lambda2: float) -> None:
        k_total = model.num_blocks
        steps = [Step("blocks", str(i), False, no_grad=True) for i in range(k - 2)]
        if k >= 2:
            steps.append(Step("blocks", str(k - 2), True))  # partly trainable: fixed up below
        steps.append(Step("blocks", str(k - 1), True))
        steps.append(Step("head", "", True) if k == k_total else Step("output_modules", str(k - 1), True))
        super().__init__(model, f"neulite-{k}", "neulite", k, steps, CrossEntropyLoss())
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.num_classes = model.num_classes
        self.harmonized: tuple[str, ...] = ()
        if k >= 2:
            prev = self.blocks[str(k - 2)]
            conv_name, norm_name = _harmonized_modules(prev)
            keep = {conv_name} | ({norm_name} if norm_name else set())
            for name, p in prev.named_parameters():
                p.requires_grad_(name.rsplit(".", 1)[0] in keep)
            self.harmonized = tuple(f"blocks.{k - 2}.{n}" for n in sorted(keep))
            self._harmonized_norm = prev.get_submodule(norm_name) if norm_name else None
        self.neulite_proj = nn.ModuleDict({str(k - 1): make_projection_head(projection_dims(model, k))})
        self._proj = self.neulite_proj[str(k - 1)]
        self.train()

    def train(self, mode: bool = True) -> NeuLiteStageProgram:
        super().train(mode)
        if self.block is not None and self.block >= 2 and hasattr(self, "_harmonized_norm"):
            prev = self.blocks[str(self.block - 2)]
            prev.eval()  # frozen parts of the previous block use running statistics ...
            if self._harmonized_norm is not None:
                self._harmonized_norm.train(mode)  # ... except the harmonized norm
        return self

    def training_batchnorms(self) -> list[tuple[str, ExplicitBatchNorm]]:
        out = super().training_batchnorms()
        return [(n, m) for n, m in out if m.weight.requires_grad]

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        x, y = inputs[0], inputs[1]
        h = x
        z: Tensor | None = None
        for step in self.steps:
            module = self._module(step)
            if step.no_grad:
                with torch.no_grad():
                    h = module(h)
            else:
                h = module(h)
            if step.container == "blocks" and step.key == str(self.block - 1):
                z = h
        assert z is not None
        loss = F.cross_entropy(h, y)
        if self.lambda1:
            loss = loss - self.lambda1 * nhsic(z.flatten(1), x.flatten(1))
        if self.lambda2:
            pooled = z.mean(dim=tuple(range(2, z.dim()))) if z.dim() > 2 else z
            onehot = F.one_hot(y, self.num_classes).to(pooled.dtype)
            loss = loss - self.lambda2 * nhsic(self._proj(pooled), onehot)
        outputs: list[Tensor] = [loss]
        for _, bn in self.training_batchnorms():
            if bn.training and bn.batch_stats is not None:
                outputs.extend(bn.batch_stats)
            else:
                outputs.extend((bn.running_mean, bn.running_var))
        return tuple(outputs)


def make_neulite_stage(model: BlockedModel, stage_id: str, lambda1: float = 0.01,
                       lambda2: float = 0.1) -> NeuLiteStageProgram:
    match = _ID.match(stage_id) if isinstance(stage_id, str) else None
    if match is None or not 1 <= int(match.group(1)) <= model.num_blocks:
        raise ExportError(f"unknown NeuLite stage id {stage_id!r}; valid: {', '.join(neulite_stage_ids(model))}")
    return NeuLiteStageProgram(model, int(match.group(1)), lambda1, lambda2)
