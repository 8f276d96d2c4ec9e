"""Typed views of the stage and optimizer descriptions a job carries.

The device runtime imports only the standard library, numpy and one engine, so
these mirror the manifest's stage entry (docs/formats.md) instead of importing
fedblocks.export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class SpecError(ValueError):
    """A stage or optimizer description that does not match the contract."""


def _field(d: dict[str, Any], key: str, where: str) -> Any:
    if not isinstance(d, dict):
        raise SpecError(f"{where}: expected an object, got {type(d).__name__}")
    if key not in d:
        raise SpecError(f"{where}: missing field '{key}'")
    return d[key]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: float32, int64 ...

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> TensorSpec:
        name = _field(d, "name", where)
        shape = _field(d, "shape", where)
        dtype = _field(d, "dtype", where)
        if not isinstance(name, str) or not name:
            raise SpecError(f"{where}: 'name' must be a non-empty string")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise SpecError(f"{where} '{name}': 'shape' must be a list of non-negative integers")
        if dtype not in ("float32", "float64", "float16", "int64", "int32", "uint8", "bool"):
            raise SpecError(f"{where} '{name}': unsupported dtype '{dtype}'")
        return cls(name=name, shape=tuple(shape), dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class StateSpec:
    """A running statistic the stage updates: running = (1-m)*running + m*batch_output."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    source: str  # name of the stage output carrying the batch statistic
    momentum: float

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> StateSpec:
        t = TensorSpec.from_dict(d, where)
        source = _field(d, "source", where)
        momentum = _field(d, "momentum", where)
        if not isinstance(source, str) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            raise SpecError(f"{where} '{t.name}': needs a string 'source' and a 'momentum' in [0, 1]")
        return cls(t.name, t.shape, t.dtype, source, float(momentum))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "source": self.source, "momentum": self.momentum}


@dataclass(frozen=True)
class StageSpec:
    """One stage program as the manifest describes it (the parts a device needs)."""

    id: str
    kind: str  # full | grow | shrink | split_front ...
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]  # outputs[0] is the scalar loss
    trainable: tuple[TensorSpec, ...]
    state: tuple[StateSpec, ...] = ()
    frozen: tuple[TensorSpec, ...] = ()
    memory: dict[str, int] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.inputs[0].shape[0]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageSpec:
        where = "stage"
        sid = _field(d, "id", where)
        kind = _field(d, "kind", where)

        def specs(key: str, required: bool = True) -> tuple[TensorSpec, ...]:
            items = _field(d, key, where) if required else d.get(key, [])
            if not isinstance(items, list):
                raise SpecError(f"stage '{sid}': '{key}' must be a list")
            return tuple(TensorSpec.from_dict(x, f"stage '{sid}' {key}") for x in items)

        inputs, outputs, trainable = specs("inputs"), specs("outputs"), specs("trainable")
        frozen = specs("frozen", required=False)
        state_items = d.get("state", [])
        if not isinstance(state_items, list):
            raise SpecError(f"stage '{sid}': 'state' must be a list")
        state = tuple(StateSpec.from_dict(x, f"stage '{sid}' state") for x in state_items)
        if not inputs or not outputs:
            raise SpecError(f"stage '{sid}': needs at least one input and the loss output")
        memory = d.get("memory", {})
        return cls(str(sid), str(kind), inputs, outputs, trainable, state, frozen,
                   dict(memory) if isinstance(memory, dict) else {})


@dataclass(frozen=True)
class OptimizerConfig:
    """torch.optim.SGD semantics (dampening 0, no Nesterov) in every engine."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OptimizerConfig:
        if not isinstance(d, dict):
            raise SpecError("training.optimizer: expected an object")
        name = d.get("name", "sgd")
        if name != "sgd":
            raise SpecError(f"training.optimizer.name: '{name}' is not supported (use 'sgd')")
        vals = {k: d.get(k, getattr(cls, k)) for k in ("lr", "momentum", "weight_decay")}
        for k, v in vals.items():
            if not isinstance(v, (int, float)) or v < 0 or v != v:
                raise SpecError(f"training.optimizer.{k}: must be a non-negative number, got {v!r}")
        return cls(name="sgd", lr=float(vals["lr"]), momentum=float(vals["momentum"]),
                   weight_decay=float(vals["weight_decay"]))
