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
- "split_front-<cut>" (SmartSplit, not in stage_ids(); cuts from split_cuts()): the
               device's part, everything up to the cut trainable; loss sum(z * g) where g
               (same shape as the cut activation z) is the server's gradient, so dL/dz = g
               exactly (SmartSplit's on-device trick). z is returned last, still attached to
               the autograd graph (the torch engine backpropagates g from it directly).
- "split_back-<cut>": the server's part: input "z" (the cut activation), everything after
               the cut + head trainable, cross-entropy. `cut_gradient_step()` trains it one
               step and returns dL/dz, the gradient the server sends back.
A cut is "k" (after block k, k = 1..K-1) or "k.<child>[.<grandchild>]" (inside block k,
after that child of the block's nn.Sequential, e.g. "1.stem.conv" = after ResNet's stem
conv); split_cuts() lists them in forward order. Names stay global: the front part of a
cut block holds `blocks.0.stem.conv.*`, the back part `blocks.0.stem.bn.*` and on.
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedblocks.export.blocks import BlockedModel, propagate_shapes
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
    part: str = ""  # blocks only: child path of a cut inside the block ("stem.conv"); "" = whole block
    side: str = ""  # with part: "front" (children up to and including the path) | "back" (the rest)


class StageProgram(nn.Module):
    """A stage's module path + loss head (see module doc). Build with make_stage()."""

    def __init__(self, model: BlockedModel, stage_id: str, kind: str, block: int | None,
                 steps: list[Step], loss_head: LossHead, return_z: bool = False,
                 input_spec: tuple[str, tuple[int, ...], str] | None = None) -> None:
        super().__init__()
        self.stage_id = stage_id
        self.kind = kind
        self.block = block
        self.loss_head = loss_head
        self.return_z = return_z
        self.model_name = model.model_name
        self.num_classes = model.num_classes
        # the first input: the model's "x", or (split_back) the cut activation "z"
        self.input_name, self.input_shape, self.input_dtype = input_spec or ("x", model.input_shape, model.input_dtype)
        self.steps = tuple(steps)
        for container in ("blocks", "basic_layers", "output_modules"):
            chosen = [s for s in steps if s.container == container]
            if chosen:
                source = getattr(model, container)
                setattr(self, container, nn.ModuleDict({s.key: _copy_step_module(source, s) for s in chosen}))
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
        if any(s.part for s in self.steps) or self.input_name != "x":  # a cut inside a block: trace it
            modules = [self._module(s) for s in self.steps]
            return propagate_shapes(modules, self.input_shape, getattr(torch, self.input_dtype))[-1]
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
            outputs.append(x)  # attached: a runtime may backpropagate the server's g from it directly
        return tuple(outputs)

    # ------------------------------------------------------------ specs
    def input_specs(self, batch_size: int) -> list[TensorSpec]:
        x = TensorSpec(self.input_name, (batch_size, *self.input_shape), self.input_dtype)
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


_STAGE_RE = re.compile(r"^(full|grow|shrink|split_front|split_back)(?:-(\d+)((?:\.[A-Za-z0-9_]+)*))?$")
SPLIT_KINDS = ("split_front", "split_back")


def make_stage(model: BlockedModel, stage_id: str) -> StageProgram:
    """The StageProgram for `stage_id` (see module doc); ExportError for an id the model lacks."""
    k_total = model.num_blocks
    match = _STAGE_RE.match(stage_id) if isinstance(stage_id, str) else None
    valid = f"valid: {', '.join(stage_ids(model))}, split_front-<cut> / split_back-<cut> for a cut in split_cuts()"
    if match is None or (match.group(1) == "full") != (match.group(2) is None):
        raise ExportError(f"unknown stage id {stage_id!r} for {model.model_name}; {valid}")
    kind = match.group(1)
    if kind == "full":
        steps = [Step("blocks", str(i), True) for i in range(k_total)] + [Step("head", "", True)]
        return StageProgram(model, "full", "full", None, steps, CrossEntropyLoss())
    if kind in SPLIT_KINDS:
        return _make_split_stage(model, stage_id, kind, stage_id.split("-", 1)[1], valid)
    if match.group(3):
        raise ExportError(f"unknown stage id {stage_id!r} for {model.model_name}; {valid}")
    k = int(match.group(2))
    lo, hi = {"grow": (1, k_total), "shrink": (2, k_total)}[kind]
    if not lo <= k <= hi:
        raise ExportError(f"stage {stage_id!r}: block {k} out of range {lo}..{hi} for {model.model_name}; {valid}")
    frozen_prefix = [Step("blocks", str(i), False, no_grad=True) for i in range(k - 1)]
    if kind == "grow" or k == k_total:
        exit_step = Step("head", "", True) if k == k_total else Step("output_modules", str(k - 1), True)
        steps = [*frozen_prefix, Step("blocks", str(k - 1), True), exit_step]
        return StageProgram(model, stage_id, kind, k, steps, CrossEntropyLoss())
    steps = [*frozen_prefix, Step("basic_layers", str(k - 1), True)]
    steps += [Step("basic_layers", str(j - 1), False) for j in range(k + 1, k_total + 1)]
    steps.append(Step("head", "", False))
    return StageProgram(model, stage_id, kind, k, steps, DistillMSELoss())


# ---------------------------------------------------------------- SmartSplit cuts
def _children(module: nn.Module) -> list[str]:
    return list(module._modules) if isinstance(module, nn.Sequential) else []


def _inner_cuts(module: nn.Module, prefix: str, depth: int) -> list[str]:
    """Cuts after every child but the last of a Sequential (and, one level down, inside its children)."""
    names = _children(module)
    out: list[str] = []
    for name in names[:-1]:
        if depth > 1:
            out += _inner_cuts(module._modules[name], f"{prefix}.{name}", depth - 1)  # type: ignore[arg-type]
        out.append(f"{prefix}.{name}")
    if names and depth > 1:
        out += _inner_cuts(module._modules[names[-1]], f"{prefix}.{names[-1]}", depth - 1)  # type: ignore[arg-type]
    return out


def split_cuts(model: BlockedModel, inner: bool = True) -> list[str]:
    """Every candidate SmartSplit cut in forward order (see module doc).

    Whole-block cuts "1".."K-1"; with `inner`, also cuts inside every block whose module is
    an nn.Sequential: after each child but the last, and inside a child that is itself a
    Sequential (ResNet's stem: "1.stem.conv", "1.stem.bn"). The place after a last child
    is the place after its parent, listed once under the parent's name.
    """
    cuts: list[str] = []
    for k in range(1, model.num_blocks + 1):
        if inner:
            cuts += _inner_cuts(model.block(k), str(k), 2)
        if k < model.num_blocks:
            cuts.append(str(k))
    return cuts


def parse_cut(model: BlockedModel, cut: str) -> tuple[int, tuple[str, ...]]:
    """(block k, child path inside block k) of a cut id; ExportError for a cut the model lacks."""
    cuts = split_cuts(model)
    if cut not in cuts:
        raise ExportError(f"{model.model_name} has no split cut {cut!r} (cuts: {', '.join(cuts)})")
    head, *path = cut.split(".")
    return int(head), tuple(path)


def _sequential_part(module: nn.Module, path: tuple[str, ...], side: str) -> nn.Module:
    """Deep copy of the children of Sequential `module` before/after the cut at `path`, names kept."""
    names = _children(module)
    j = names.index(path[0])
    kept: OrderedDict[str, nn.Module] = OrderedDict()
    child: nn.Module = module._modules[path[0]]  # type: ignore[assignment]
    if side == "front":
        for name in names[:j]:
            kept[name] = copy.deepcopy(module._modules[name])  # type: ignore[arg-type]
        kept[path[0]] = _sequential_part(child, path[1:], side) if len(path) > 1 else copy.deepcopy(child)
    else:
        if len(path) > 1:
            kept[path[0]] = _sequential_part(child, path[1:], side)
        for name in names[j + 1:]:
            kept[name] = copy.deepcopy(module._modules[name])  # type: ignore[arg-type]
    return nn.Sequential(kept)


def _copy_step_module(source: Any, step: Step) -> nn.Module:
    module = source[int(step.key)] if step.container == "blocks" else source[step.key]
    if step.part:
        return _sequential_part(module, tuple(step.part.split(".")), step.side)
    return copy.deepcopy(module)


def cut_activation_shape(model: BlockedModel, cut: str) -> tuple[int, ...]:
    """Per-sample shape of the activation at `cut` (what the device sends)."""
    return make_stage(model, f"split_front-{cut}").z_shape


def _make_split_stage(model: BlockedModel, stage_id: str, kind: str, cut: str, valid: str) -> StageProgram:
    try:
        k, path = parse_cut(model, cut)
    except ExportError as exc:
        raise ExportError(f"stage {stage_id!r}: {exc}; {valid}") from None
    part = ".".join(path)
    k_total = model.num_blocks
    if kind == "split_front":
        steps = [Step("blocks", str(i), True) for i in range(k - 1)]
        steps.append(Step("blocks", str(k - 1), True, part=part, side="front"))
        return StageProgram(model, stage_id, kind, k, steps, GradientDotLoss(), return_z=True)
    z_shape = cut_activation_shape(model, cut)
    first = k - 1 if part else k  # the cut block's remaining children run on the server too
    steps = [Step("blocks", str(i), True, part=part if i == k - 1 and part else "",
                  side="back" if i == k - 1 and part else "") for i in range(first, k_total)]
    steps.append(Step("head", "", True))
    return StageProgram(model, stage_id, kind, k, steps, CrossEntropyLoss(), input_spec=("z", z_shape, "float32"))


def cut_gradient_step(program: StageProgram, z: Tensor, y: Tensor,
                      optimizer: torch.optim.Optimizer | None = None) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """One server step of a split_back program: (loss, dL/dz, outputs).

    Forward from the received activation z (a leaf that requires grad), backward, then the
    optimizer step (if given) and the running-statistic update; dL/dz is what goes back
    to the device.
    """
    if program.kind != "split_back":
        raise ExportError(f"cut_gradient_step needs a split_back stage, got {program.stage_id}")
    z_leaf = z.detach().requires_grad_(True)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    outputs = program(z_leaf, y)
    outputs[0].backward()
    if optimizer is not None:
        optimizer.step()
    program.apply_state_updates(tuple(o.detach() for o in outputs))
    assert z_leaf.grad is not None
    return outputs[0].detach(), z_leaf.grad, tuple(o.detach() for o in outputs)
