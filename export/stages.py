"""Stage programs: one trainable nn.Module per training stage, ready for torch.export.

A StageProgram runs a path of modules taken from a BlockedModel and ends in a loss:
  forward(x, *targets) -> (loss, *batch_stats[, z])
- loss is a 0-d float32 tensor (always the first output);
- batch_stats: for every BatchNorm that trains in the stage (in module order), its
  batch mean then its UNBIASED batch variance, named "<running buffer name>:batch".
  The runtime applies running = (1 - momentum) * running + momentum * batch
  (`state_specs()` says which buffer, from which output, with which momentum).
  In eval mode (stage.eval()) these outputs are the running statistics themselves,
  so applying the update is a no-op;
- split_front stages also return the cut activation "z" last.

Names: the program's named_parameters() / named_buffers() are exactly the global
names of the BlockedModel (`blocks.1.0.conv1.weight`, `output_modules.1.head.fc.weight`);
modules the stage does not run are absent. trainable ∪ frozen ∪ state = all of them,
disjoint.

Ownership: a StageProgram holds DEEP COPIES of the modules it runs (so requires_grad
flags and train/eval modes of one stage never leak into the model or another stage).
Move weights with `load_from(model)` / `load_global_state(tensors)` and back with
`model.load_state_dict(stage.state_dict(), strict=False)`.

Stage ids (1-based block numbers, K = model.num_blocks):
- "full":      the whole model trainable, cross-entropy.
- "grow-k":    blocks 1..k-1 frozen (eval mode, under torch.no_grad(): nothing kept
               for backward), block k trainable (train mode), then output module k
               trainable (the real head for k = K); cross-entropy.
- "shrink-K":  blocks 1..K-1 frozen, block K + head trainable; cross-entropy.
- "shrink-j":  (j < K) blocks 1..j-1 frozen, basic layer j trainable, basic layers
               j+1..K and the head frozen (eval mode, gradients flow through them);
               loss MSE(logits, teacher), teacher (B, num_classes) float32 = the logits
               of the previous, fuller shrunk model: model.shrunk_logits(x, j + 1).
- "split_front-c" (not in stage_ids()): blocks 1..c trainable, loss sum(z * g) where
               g (same shape as the cut activation z) is the server's gradient, so
               dL/dz = g exactly (SmartSplit's on-device trick).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedblocks.export.blocks import BlockedModel
from fedblocks.export.errors import ExportError
from fedblocks.export.rewrites import ExplicitBatchNorm


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class StateEntry:
    """A running statistic: running = (1 - momentum) * running + momentum * outputs[source]."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    source: str
    momentum: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "source": self.source, "momentum": self.momentum}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _spec(name: str, t: Tensor) -> TensorSpec:
    return TensorSpec(name, tuple(int(s) for s in t.shape), _dtype_name(t.dtype))


# ---------------------------------------------------------------- loss heads
class LossHead:
    """How a stage turns its last activation z into the loss, and which inputs that needs."""

    kind = "abstract"

    def target_specs(self, batch_size: int, z_shape: tuple[int, ...]) -> list[TensorSpec]:
        raise NotImplementedError

    def loss(self, z: Tensor, *targets: Tensor) -> Tensor:
        raise NotImplementedError

    def example_targets(self, batch_size: int, z_shape: tuple[int, ...], gen: torch.Generator) -> list[Tensor]:
        raise NotImplementedError


class CrossEntropyLoss(LossHead):
    """Mean cross-entropy of logits (B, classes) against labels y (B,) int64."""

    kind = "cross_entropy"

    def target_specs(self, batch_size: int, z_shape: tuple[int, ...]) -> list[TensorSpec]:
        return [TensorSpec("y", (batch_size,), "int64")]

    def loss(self, z: Tensor, *targets: Tensor) -> Tensor:
        return F.cross_entropy(z, targets[0])

    def example_targets(self, batch_size: int, z_shape: tuple[int, ...], gen: torch.Generator) -> list[Tensor]:
        return [torch.randint(0, z_shape[0], (batch_size,), generator=gen, dtype=torch.int64)]


class DistillMSELoss(LossHead):
    """Mean squared error between logits and teacher logits (B, classes) float32."""

    kind = "mse_teacher"

    def target_specs(self, batch_size: int, z_shape: tuple[int, ...]) -> list[TensorSpec]:
        return [TensorSpec("teacher", (batch_size, *z_shape), "float32")]

    def loss(self, z: Tensor, *targets: Tensor) -> Tensor:
        return F.mse_loss(z, targets[0])

    def example_targets(self, batch_size: int, z_shape: tuple[int, ...], gen: torch.Generator) -> list[Tensor]:
        return [torch.randn((batch_size, *z_shape), generator=gen)]


class GradientDotLoss(LossHead):
    """sum(z * g): backward gives dL/dz = g, the gradient the server sent for the cut activation."""

    kind = "gradient_dot"

    def target_specs(self, batch_size: int, z_shape: tuple[int, ...]) -> list[TensorSpec]:
        return [TensorSpec("g", (batch_size, *z_shape), "float32")]

    def loss(self, z: Tensor, *targets: Tensor) -> Tensor:
        return (z * targets[0]).sum()

    def example_targets(self, batch_size: int, z_shape: tuple[int, ...], gen: torch.Generator) -> list[Tensor]:
        return [torch.randn((batch_size, *z_shape), generator=gen)]


# ---------------------------------------------------------------- stage program
@dataclass(frozen=True)
class Step:
    """One module on the stage's path. container: blocks | basic_layers | output_modules | head."""

    container: str
    key: str  # 0-based index as a string ("" for head)
    trainable: bool
    no_grad: bool = False  # frozen prefix: run under torch.no_grad()


class StageProgram(nn.Module):
    """A stage's module path + loss head (see module doc). Build with make_stage()."""

    def __init__(self, model: BlockedModel, stage_id: str, kind: str, block: int | None,
                 steps: list[Step], loss_head: LossHead, return_z: bool = False) -> None:
        super().__init__()
        self.stage_id = stage_id
        self.kind = kind
        self.block = block
        self.loss_head = loss_head
        self.return_z = return_z
        self.model_name = model.model_name
        self.num_classes = model.num_classes
        self.input_shape = model.input_shape
        self.input_dtype = model.input_dtype
        self.steps = tuple(steps)
        for container in ("blocks", "basic_layers", "output_modules"):
            keys = [s.key for s in steps if s.container == container]
            if keys:
                source = getattr(model, container)
                setattr(self, container, nn.ModuleDict({k: copy.deepcopy(source[int(k) if container == "blocks" else k])
                                                        for k in keys}))
        if any(s.container == "head" for s in steps):
            self.head = copy.deepcopy(model.head)
        for step in steps:
            for p in self._module(step).parameters():
                p.requires_grad_(step.trainable)
        self.z_shape = self._z_shape(model)
        self.train()

    def _module(self, step: Step) -> nn.Module:
        if step.container == "head":
            return self.head
        return getattr(self, step.container)[step.key]

    def _z_shape(self, model: BlockedModel) -> tuple[int, ...]:
        """Per-sample shape of the last step's output (the loss head's input)."""
        last = self.steps[-1]
        if last.container in ("head", "output_modules"):
            return (model.num_classes,)
        return model.block_output_shape(int(last.key) + 1)  # a block or the basic layer standing in for it

    def train(self, mode: bool = True) -> StageProgram:
        """Trainable steps follow `mode`; frozen steps always stay in eval mode."""
        super().train(mode)
        for step in self.steps:
            if not step.trainable:
                self._module(step).eval()
        return self

    def training_batchnorms(self) -> list[tuple[str, ExplicitBatchNorm]]:
        """(global name, module) of every BatchNorm in a trainable step, in module order."""
        trainable_ids = {id(self._module(s)) for s in self.steps if s.trainable}
        out: list[tuple[str, ExplicitBatchNorm]] = []
        for step in self.steps:
            if id(self._module(step)) not in trainable_ids:
                continue
            prefix = "head" if step.container == "head" else f"{step.container}.{step.key}"
            for name, m in self._module(step).named_modules(prefix=prefix):
                if isinstance(m, ExplicitBatchNorm):
                    out.append((name, m))
        return out

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        x, targets = inputs[0], inputs[1:]
        for step in self.steps:
            if step.no_grad:
                with torch.no_grad():
                    x = self._module(step)(x)
            else:
                x = self._module(step)(x)
        loss = self.loss_head.loss(x, *targets)
        outputs: list[Tensor] = [loss]
        for _, bn in self.training_batchnorms():
            if bn.training and bn.batch_stats is not None:
                outputs.extend(bn.batch_stats)
            else:
                outputs.extend((bn.running_mean, bn.running_var))
        if self.return_z:
            outputs.append(x.detach())
        return tuple(outputs)

    # ------------------------------------------------------------ specs
    def input_specs(self, batch_size: int) -> list[TensorSpec]:
        x = TensorSpec("x", (batch_size, *self.input_shape), self.input_dtype)
        return [x, *self.loss_head.target_specs(batch_size, self.z_shape)]

    def output_specs(self, batch_size: int) -> list[TensorSpec]:
        specs = [TensorSpec("loss", (), "float32")]
        for name, bn in self.training_batchnorms():
            specs.append(_spec(f"{name}.running_mean:batch", bn.running_mean))
            specs.append(_spec(f"{name}.running_var:batch", bn.running_var))
        if self.return_z:
            specs.append(TensorSpec("z", (batch_size, *self.z_shape), "float32"))
        return specs

    def trainable_specs(self) -> list[TensorSpec]:
        return [_spec(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def state_specs(self) -> list[StateEntry]:
        entries: list[StateEntry] = []
        for name, bn in self.training_batchnorms():
            for stat in ("running_mean", "running_var"):
                buf = getattr(bn, stat)
                entries.append(StateEntry(f"{name}.{stat}", tuple(buf.shape), _dtype_name(buf.dtype),
                                          f"{name}.{stat}:batch", float(bn.momentum)))
        return entries

    def frozen_specs(self) -> list[TensorSpec]:
        state = {e.name for e in self.state_specs()}
        frozen = [_spec(n, p) for n, p in self.named_parameters() if not p.requires_grad]
        return frozen + [_spec(n, b) for n, b in self.named_buffers() if n not in state]

    def example_inputs(self, batch_size: int, seed: int = 0) -> tuple[Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        if self.input_dtype.startswith("int"):  # token ids: the vocabulary is the class set
            x = torch.randint(0, self.num_classes, (batch_size, *self.input_shape), generator=gen,
                              dtype=getattr(torch, self.input_dtype))
        else:
            x = torch.randn((batch_size, *self.input_shape), generator=gen)
        return (x, *self.loss_head.example_targets(batch_size, self.z_shape, gen))

    # ------------------------------------------------------------ weights
    def global_state(self) -> dict[str, Tensor]:
        """Every tensor of the stage by global name (parameters and buffers)."""
        return {**dict(self.named_parameters()), **dict(self.named_buffers())}

    def load_global_state(self, tensors: dict[str, Tensor | np.ndarray], strict: bool = False) -> list[str]:
        """Copy tensors in by global name (extra names ignored); returns the stage names not given.

        strict=True raises ExportError when a stage tensor is missing or a shape differs.
        """
        own = self.global_state()
        missing = [n for n in own if n not in tensors]
        if strict and missing:
            raise ExportError(f"stage {self.stage_id}: no value for {len(missing)} tensors, e.g. '{missing[0]}'")
        with torch.no_grad():
            for name, t in own.items():
                if name not in tensors:
                    continue
                value = torch.as_tensor(tensors[name])
                if tuple(value.shape) != tuple(t.shape):
                    raise ExportError(f"stage {self.stage_id}: '{name}' has shape {list(value.shape)}, "
                                      f"expected {list(t.shape)}")
                t.copy_(value.to(t.dtype))
        return missing

    def load_from(self, model: BlockedModel) -> None:
        """Copy the model's current values of every tensor this stage holds."""
        self.load_global_state(dict(model.state_dict()), strict=True)

    def apply_state_updates(self, outputs: tuple[Tensor, ...]) -> None:
        """The runtime's running-stat update in torch eager, from forward()'s outputs."""
        by_name = dict(zip((s.name for s in self.output_specs(1)), outputs, strict=False))
        buffers = dict(self.named_buffers())
        with torch.no_grad():
            for e in self.state_specs():
                running = buffers[e.name]
                running.mul_(1 - e.momentum).add_(by_name[e.source].to(running.dtype), alpha=e.momentum)


# ---------------------------------------------------------------- factory
def stage_ids(model: BlockedModel) -> list[str]:
    """All stages in training order: shrink-K..shrink-2, grow-1..grow-K, full."""
    k_total = model.num_blocks
    return ([f"shrink-{j}" for j in range(k_total, 1, -1)] + [f"grow-{k}" for k in range(1, k_total + 1)]
            + ["full"])


_STAGE_RE = re.compile(r"^(full|grow|shrink|split_front)(?:-(\d+))?$")


def make_stage(model: BlockedModel, stage_id: str) -> StageProgram:
    """The StageProgram for `stage_id` (see module doc); ExportError for an id the model lacks."""
    k_total = model.num_blocks
    match = _STAGE_RE.match(stage_id) if isinstance(stage_id, str) else None
    valid = f"valid: {', '.join(stage_ids(model))}, split_front-1..split_front-{k_total - 1}"
    if match is None or (match.group(1) == "full") != (match.group(2) is None):
        raise ExportError(f"unknown stage id {stage_id!r} for {model.model_name}; {valid}")
    kind = match.group(1)
    if kind == "full":
        steps = [Step("blocks", str(i), True) for i in range(k_total)] + [Step("head", "", True)]
        return StageProgram(model, "full", "full", None, steps, CrossEntropyLoss())
    k = int(match.group(2))
    lo, hi = {"grow": (1, k_total), "shrink": (2, k_total), "split_front": (1, k_total - 1)}[kind]
    if not lo <= k <= hi:
        raise ExportError(f"stage {stage_id!r}: block {k} out of range {lo}..{hi} for {model.model_name}; {valid}")
    frozen_prefix = [Step("blocks", str(i), False, no_grad=True) for i in range(k - 1)]
    if kind == "split_front":
        steps = [Step("blocks", str(i), True) for i in range(k)]
        return StageProgram(model, stage_id, kind, k, steps, GradientDotLoss(), return_z=True)
    if kind == "grow" or k == k_total:
        exit_step = Step("head", "", True) if k == k_total else Step("output_modules", str(k - 1), True)
        steps = [*frozen_prefix, Step("blocks", str(k - 1), True), exit_step]
        return StageProgram(model, stage_id, kind, k, steps, CrossEntropyLoss())
    steps = [*frozen_prefix, Step("basic_layers", str(k - 1), True)]
    steps += [Step("basic_layers", str(j - 1), False) for j in range(k + 1, k_total + 1)]
    steps.append(Step("head", "", False))
    return StageProgram(model, stage_id, kind, k, steps, DistillMSELoss())
