"""SmartSplit cuts: what a cut costs the device, the server and the wire, with and without recompute.

For a cut (stages.split_cuts) the device trains the front (`split_front-<cut>`) and the
server the back (`split_back-<cut>`). `describe_cut` gives, at a batch size:
- the cut activation (what goes up, with the int64 labels) and its gradient (what comes
  down), in bytes per batch (payload only; the wire framing adds 24 + 4 x ndim bytes per
  frame, device_runtime/framing.py);
- the device footprint by export/memory.py's method (parameters + gradients + saved
  activations + the largest single-operator output, on the meta device), without
  recompute and with each front unit recomputed (checkpointed), and with all of them;
- per front unit (a block, or the part of the cut block before the cut): the bytes it
  saves for backward, its input, and its forward FLOPs = the cost of recomputing it.

Recompute model (what torch.utils.checkpoint does to a unit): a checkpointed unit keeps
only its input; in backward it runs forward again and, while its backward runs, holds
its saved tensors once more. So with the set R of checkpointed units

    kept(R)        = U_{u not in R} saved(u)  U  U_{u in R} {input(u)}  U  saved(loss)
    during(u in R) = U_{v < u, v not in R} saved(v)  U  U_{v <= u, v in R} {input(v)}  U  saved(u)
    activations(R) = max(bytes(kept(R)), max_{u in R} bytes(during(u))) + largest op output

(U: union of storages, so a tensor saved by two units counts once; in backward the units
after u have already freed their saves when u is recomputed). R = {} gives the
manifest's `memory.activations_bytes` of the front stage. Parameters, gradients and the
optimizer state do not change with R. The benchmark (benchmarks/smartsplit) measures
the same configurations through the device runtime (torch engine, checkpoint on).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from fedblocks.export.blocks import BlockedModel
from fedblocks.export.errors import ExportError
from fedblocks.export.memory import _LargestOpOutput, predict_footprint
from fedblocks.export.stages import StageProgram, make_stage, parse_cut, split_cuts

LABEL_DTYPE_BYTES = 8  # int64 labels travel with the activation


@dataclass(frozen=True)
class FrontUnit:
    """One recompute unit of a front segment (see front_units)."""

    name: str  # module path inside the stage program: "blocks.0.stem", "blocks.1.0"
    block: int  # 1-based block number
    saved_bytes: int  # storages its ops save for backward (its input included when an op saves it)
    input_bytes: int
    forward_flops: int  # the cost of recomputing it
    footprint_if_recomputed_bytes: int  # the device footprint with only this unit checkpointed

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "block": self.block, "saved_bytes": self.saved_bytes,
                "input_bytes": self.input_bytes, "recompute_flops": self.forward_flops,
                "footprint_if_recomputed_bytes": self.footprint_if_recomputed_bytes}


@dataclass(frozen=True)
class CutDescription:
    cut: str
    block: int  # the block the cut is in (or after)
    front_stage: str
    back_stage: str
    activation_shape: tuple[int, ...]  # batch first
    batch_size: int
    up_bytes: int  # activation + labels per batch
    down_bytes: int  # activation gradient per batch
    device_footprint_bytes: int  # no recompute (= the front stage's memory.total_bytes)
    device_footprint_recompute_all_bytes: int
    device_params_bytes: int
    device_grads_bytes: int
    device_train_flops: int
    device_forward_flops: int
    server_train_flops: int
    server_footprint_bytes: int
    units: tuple[FrontUnit, ...]
    # storage sets behind the recompute model (not serialised)
    _saved: dict[str, dict[int, int]] = field(default_factory=dict, repr=False, compare=False)
    _inputs: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)
    _loss_saved: dict[int, int] = field(default_factory=dict, repr=False, compare=False)
    _fixed_bytes: int = field(default=0, repr=False, compare=False)
    _largest_op: int = field(default=0, repr=False, compare=False)

    def footprint_bytes(self, recompute: set[str] | frozenset[str] = frozenset()) -> int:
        """Predicted device footprint with the units in `recompute` checkpointed (module doc)."""
        unknown = set(recompute) - set(self._saved)
        if unknown:
            raise ExportError(f"cut {self.cut}: no front unit {sorted(unknown)[0]!r} (units: {', '.join(self._saved)})")
        # end of forward: what every unit keeps, inputs only for the checkpointed ones
        kept: dict[int, int] = dict(self._loss_saved)
        # backward of a checkpointed unit u: units after u are done (their saves freed); the
        # units before u still hold what they keep, and u holds its saves once more
        earlier: dict[int, int] = {}
        peak = 0
        for name, saved in self._saved.items():
            if name in recompute:
                key, nbytes = self._inputs[name]
                kept[key] = nbytes
                earlier[key] = nbytes
                peak = max(peak, sum({**earlier, **saved}.values()))
            else:
                kept.update(saved)
                earlier.update(saved)
        return self._fixed_bytes + max(sum(kept.values()), peak) + self._largest_op

    def recompute_ladder(self) -> list[tuple[tuple[str, ...], int]]:
        """The on-device manager's plan: (units to add, predicted footprint) rungs.

        Greedy: each rung adds the unit with the most bytes saved per recompute FLOP; when
        no single unit lowers the prediction any more, one last rung adds all the rest if
        that does. Rungs only ever lower the predicted footprint.
        """
        flops = {u.name: max(1, u.forward_flops) for u in self.units}
        chosen: set[str] = set()
        current = self.footprint_bytes(chosen)
        rungs: list[tuple[tuple[str, ...], int]] = []
        remaining = [u.name for u in self.units]
        while remaining:
            gains = {n: current - self.footprint_bytes(chosen | {n}) for n in remaining}
            best = max(remaining, key=lambda n: gains[n] / flops[n])  # ties: the earlier unit
            if gains[best] <= 0:
                rest = self.footprint_bytes(chosen | set(remaining))
                if rest < current:
                    rungs.append((tuple(remaining), rest))
                break
            chosen.add(best)
            remaining.remove(best)
            current -= gains[best]
            rungs.append(((best,), current))
        return rungs

    def to_dict(self) -> dict[str, Any]:
        return {
            "cut": self.cut, "block": self.block, "front_stage": self.front_stage, "back_stage": self.back_stage,
            "activation": {"name": "z", "shape": list(self.activation_shape), "dtype": "float32"},
            "labels": {"name": "y", "shape": [self.batch_size], "dtype": "int64"},
            "transfer_bytes_per_batch": {"up": self.up_bytes, "down": self.down_bytes,
                                         "total": self.up_bytes + self.down_bytes},
            "device": {"footprint_bytes": self.device_footprint_bytes,
                       "footprint_recompute_all_bytes": self.device_footprint_recompute_all_bytes,
                       "params_bytes": self.device_params_bytes, "grads_bytes": self.device_grads_bytes,
                       "train_flops": self.device_train_flops, "forward_flops": self.device_forward_flops,
                       "units": [u.to_dict() for u in self.units],
                       "recompute_ladder": [{"units": list(names), "footprint_bytes": fp}
                                            for names, fp in self.recompute_ladder()]},
            "server": {"footprint_bytes": self.server_footprint_bytes, "train_flops": self.server_train_flops},
        }


class _UnitSaves:
    """saved_tensors_hooks pack hook recording every storage saved, per unit (not deduplicated)."""

    def __init__(self, exclude: list[Tensor]) -> None:
        self.params = {t.untyped_storage()._cdata for t in exclude}
        self.current = "loss"
        self.saved: dict[str, dict[int, int]] = {}
        self.keep: list[Tensor] = []  # holds storages alive so their keys stay unique

    def pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.params:
            self.keep.append(t)
            self.saved.setdefault(self.current, {})[key] = storage.nbytes()
        return t


def front_units(front: StageProgram) -> list[tuple[str, torch.nn.Module]]:
    """The recompute units of a front stage program, in forward order, by module path.

    A block that is an nn.Sequential contributes its children (ResNet: the stem and each
    residual block), any other block itself: the finest granularity a runtime can wrap in
    a checkpoint while the block's own names stay intact.
    """
    units: list[tuple[str, torch.nn.Module]] = []
    for key, block in front.blocks.items():
        if isinstance(block, torch.nn.Sequential) and len(block) > 0:
            units += [(f"blocks.{key}.{child}", module) for child, module in block.named_children()]
        else:
            units.append((f"blocks.{key}", block))
    return units


def _forward_flops(module: torch.nn.Module, x: Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
    return int(counter.get_total_flops())


def _front_storage_sets(front: StageProgram, batch_size: int) -> tuple[dict[str, dict[int, int]], dict[str, tuple[int, int]],
                                                                     dict[int, int], int, dict[str, int]]:
    """Per unit: saved storages, input storage; the loss's saved storages; the largest op output;
    per-unit forward FLOPs. One forward + backward of the front on the meta device."""
    meta = copy.deepcopy(front).to("meta")
    x, g = (t.to("meta") for t in front.example_inputs(batch_size))
    hooks = _UnitSaves([*meta.parameters(), *meta.buffers()])
    tracker = _LargestOpOutput()
    inputs: dict[str, tuple[int, int]] = {}
    flops: dict[str, int] = {}
    keep: list[Tensor] = []
    units = front_units(meta)
    with tracker:
        with torch.autograd.graph.saved_tensors_hooks(hooks.pack, lambda t: t):
            a = x
            for name, unit in units:
                inputs[name] = (a.untyped_storage()._cdata, a.untyped_storage().nbytes())
                keep.append(a)
                hooks.current = name
                a = unit(a)
            hooks.current = "loss"
            loss = front.loss_head.loss(a, g)
        loss.backward()
    a = x
    with torch.no_grad():
        for name, unit in units:
            flops[name] = _forward_flops(unit, a)
            a = unit(a)
    del keep
    return hooks.saved, inputs, hooks.saved.get("loss", {}), tracker.largest, flops


def describe_cut(model: BlockedModel, cut: str, batch_size: int) -> CutDescription:
    """Costs of `cut` at `batch_size` (module doc)."""
    from fedblocks.export.flops import stage_flops

    block, _ = parse_cut(model, cut)
    front = make_stage(model, f"split_front-{cut}")
    back = make_stage(model, f"split_back-{cut}")
    fp = predict_footprint(front, batch_size)
    saved, inputs, loss_saved, largest, unit_flops = _front_storage_sets(front, batch_size)
    z_bytes = batch_size * math.prod(front.z_shape) * 4
    front_flops = stage_flops(front, batch_size)
    back_flops = stage_flops(back, batch_size)
    names = [n for n, _ in front_units(front)]
    desc = CutDescription(
        cut=cut, block=block, front_stage=front.stage_id, back_stage=back.stage_id,
        activation_shape=(batch_size, *front.z_shape), batch_size=batch_size,
        up_bytes=z_bytes + batch_size * LABEL_DTYPE_BYTES, down_bytes=z_bytes,
        device_footprint_bytes=fp.total_bytes, device_footprint_recompute_all_bytes=0,
        device_params_bytes=fp.params_bytes, device_grads_bytes=fp.grads_bytes,
        device_train_flops=front_flops["train_step"], device_forward_flops=front_flops["forward"],
        server_train_flops=back_flops["train_step"],
        server_footprint_bytes=predict_footprint(back, batch_size).total_bytes,
        units=(), _saved={n: saved.get(n, {}) for n in names}, _inputs=inputs, _loss_saved=loss_saved,
        _fixed_bytes=fp.params_bytes + fp.grads_bytes + fp.optimizer_bytes, _largest_op=largest)
    units = tuple(FrontUnit(name=n, block=int(n.split(".")[1]) + 1, saved_bytes=sum(desc._saved[n].values()),
                            input_bytes=inputs[n][1], forward_flops=unit_flops[n],
                            footprint_if_recomputed_bytes=desc.footprint_bytes({n})) for n in names)
    no_recompute = desc.footprint_bytes(frozenset())
    if no_recompute != fp.total_bytes:  # the two counts are the same method: a mismatch is a bug
        raise ExportError(f"cut {cut}: recompute model ({no_recompute} B) disagrees with predict_footprint "
                          f"({fp.total_bytes} B)")
    return _replace(desc, units=units, device_footprint_recompute_all_bytes=desc.footprint_bytes(set(names)))


def _replace(desc: CutDescription, **changes: Any) -> CutDescription:
    import dataclasses

    return dataclasses.replace(desc, **changes)


def describe_cuts(model: BlockedModel, batch_size: int, cuts: list[str] | None = None) -> list[CutDescription]:
    """describe_cut for every cut (default: all of split_cuts(model)), in forward order."""
    return [describe_cut(model, c, batch_size) for c in (cuts if cuts is not None else split_cuts(model))]
