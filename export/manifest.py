"""manifest.json: what `fedblocks export` wrote, as typed, validated dataclasses.

The JSON shape is documented field by field in docs/formats.md. Readers refuse an
unknown ``format`` or a ``version`` newer than :data:`MANIFEST_VERSION` with one line.
Paths inside a manifest are relative to the manifest's directory.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedblocks.export.errors import ExportError

MANIFEST_FORMAT = "fedblocks.manifest"
MANIFEST_VERSION = 1
DTYPES = ("float32", "float64", "float16", "int64", "int32", "uint8", "bool")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Roles each engine's artifacts come in (docs/export.md says what each file is).
ENGINE_ROLES: dict[str, tuple[str, ...]] = {
    "ort": ("training_model", "eval_model", "optimizer_model", "checkpoint"),
    "executorch": ("program", "frozen"),
    "torch": ("program",),
}


def _get(d: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(d, dict):
        raise ExportError(f"manifest {where}: expected an object, got {type(d).__name__}")
    if key not in d:
        raise ExportError(f"manifest {where}: missing field '{key}'")
    value = d[key]
    # bool is an int subclass; a count or a size must not be true/false.
    if (kind is int or (isinstance(kind, tuple) and int in kind)) and isinstance(value, bool):
        raise ExportError(f"manifest {where}.{key}: expected a number, got a boolean")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ExportError(f"manifest {where}.{key}: expected {names}, got {type(value).__name__}")
    return value


def _nonneg_int(d: Any, key: str, where: str) -> int:
    value = _get(d, key, where, int)
    if value < 0:
        raise ExportError(f"manifest {where}.{key}: must be >= 0, got {value}")
    return value


def _shape(d: Any, where: str) -> tuple[int, ...]:
    shape = _get(d, "shape", where, list)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ExportError(f"manifest {where}.shape: must be a list of non-negative integers")
    return tuple(shape)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TensorEntry:
        name = _get(d, "name", where, str)
        if not name:
            raise ExportError(f"manifest {where}.name: must not be empty")
        dtype = _get(d, "dtype", where, str)
        if dtype not in DTYPES:
            raise ExportError(f"manifest {where} '{name}': unsupported dtype '{dtype}'")
        return cls(name, _shape(d, f"{where} '{name}'"), dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class StateEntry(TensorEntry):
    """A running statistic: running = (1 - momentum) * running + momentum * output[source]."""

    source: str = ""
    momentum: float = 0.1

    @classmethod
    def from_dict(cls, d: Any, where: str) -> StateEntry:
        t = TensorEntry.from_dict(d, where)
        source = _get(d, "source", f"{where} '{t.name}'", str)
        momentum = _get(d, "momentum", f"{where} '{t.name}'", (int, float))
        if not 0 <= momentum <= 1:
            raise ExportError(f"manifest {where} '{t.name}'.momentum: must be in [0, 1], got {momentum}")
        return cls(t.name, t.shape, t.dtype, source, float(momentum))

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "source": self.source, "momentum": self.momentum}


@dataclass(frozen=True)
class ArtifactRef:
    """One content-addressed file: ``path`` is ``objects/<sha256>.<ext>`` relative to the manifest."""

    path: str
    sha256: str
    bytes: int

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ArtifactRef:
        path = _get(d, "path", where, str)
        sha = _get(d, "sha256", where, str)
        size = _nonneg_int(d, "bytes", where)
        if not _SHA256.match(sha):
            raise ExportError(f"manifest {where}.sha256: not a sha256 hex digest")
        if os.path.isabs(path) or ".." in Path(path).parts:
            raise ExportError(f"manifest {where}.path: must be relative and inside the export directory")
        return cls(path, sha, size)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class EngineMemoryEntry:
    """One engine's own prediction for a stage (``memory.engines.<engine>``; docs/formats.md).

    ``footprint_bytes``: peak - baseline RSS of a training step on the device runtime's
    adapter for that engine, plain SGD; ``momentum_bytes``: what SGD momentum adds;
    ``total_bytes``: everything the stage holds in memory beyond the engine's own code,
    footprint included (plain SGD); ``method`` says how it was predicted, ``detail`` its
    parts (bytes or counts, method-specific).
    """

    method: str
    footprint_bytes: int
    momentum_bytes: int
    total_bytes: int
    detail: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> EngineMemoryEntry:
        detail = d.get("detail", {}) if isinstance(d, dict) else None
        if not isinstance(detail, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in detail.items()):
            raise ExportError(f"manifest {where}.detail: must map names to integers")
        return cls(_get(d, "method", where, str), _nonneg_int(d, "footprint_bytes", where),
                   _nonneg_int(d, "momentum_bytes", where), _nonneg_int(d, "total_bytes", where), dict(detail))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "footprint_bytes": self.footprint_bytes, "momentum_bytes": self.momentum_bytes,
                "total_bytes": self.total_bytes, "detail": dict(self.detail)}


@dataclass(frozen=True)
class MemoryEntry:
    """Predicted training footprint of a stage at ``batch_size`` (bytes).

    The six numbers are engine-agnostic (torch's saved-tensor accounting); ``engines`` (optional,
    written since the engine-aware estimators) holds each exported engine's own prediction.
    """

    batch_size: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    total_bytes: int
    engines: dict[str, EngineMemoryEntry] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> MemoryEntry:
        keys = ("batch_size", "params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "total_bytes")
        values = [_nonneg_int(d, k, where) for k in keys]
        raw = d.get("engines", {})
        if not isinstance(raw, dict):
            raise ExportError(f"manifest {where}.engines: expected an object")
        unknown = [e for e in raw if e not in ENGINE_ROLES]
        if unknown:
            raise ExportError(f"manifest {where}.engines: unknown engine {unknown[0]!r}")
        engines = {e: EngineMemoryEntry.from_dict(v, f"{where}.engines.{e}") for e, v in raw.items()}
        return cls(*values, engines=engines)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in self.__dict__.items() if k != "engines"}
        if self.engines:
            out["engines"] = {e: m.to_dict() for e, m in self.engines.items()}
        return out


@dataclass(frozen=True)
class FlopsEntry:
    forward: int
    train_step: int

    @classmethod
    def from_dict(cls, d: Any, where: str) -> FlopsEntry:
        return cls(_nonneg_int(d, "forward", where), _nonneg_int(d, "train_step", where))

    def to_dict(self) -> dict[str, int]:
        return {"forward": self.forward, "train_step": self.train_step}


@dataclass(frozen=True)
class StageEntry:
    id: str
    kind: str
    block: int
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    trainable: tuple[TensorEntry, ...]
    state: tuple[StateEntry, ...]
    frozen: tuple[TensorEntry, ...]
    memory: MemoryEntry
    flops: FlopsEntry
    artifacts: dict[str, dict[str, ArtifactRef]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: str = "stage") -> StageEntry:
        sid = _get(d, "id", where, str)
        where = f"stage '{sid}'"

        def tensors(key: str) -> tuple[TensorEntry, ...]:
            return tuple(TensorEntry.from_dict(x, f"{where} {key}") for x in _get(d, key, where, list))

        inputs, outputs = tensors("inputs"), tensors("outputs")
        if not inputs:
            raise ExportError(f"manifest {where}: needs at least one input")
        if not outputs or outputs[0].shape != ():
            raise ExportError(f"manifest {where}: outputs[0] must be the scalar loss")
        state = tuple(StateEntry.from_dict(x, f"{where} state") for x in _get(d, "state", where, list))
        output_names = {o.name for o in outputs}
        for s in state:
            if s.source not in output_names:
                raise ExportError(f"manifest {where} state '{s.name}': source '{s.source}' is not an output")
        arts_raw = _get(d, "artifacts", where, dict)
        artifacts: dict[str, dict[str, ArtifactRef]] = {}
        for engine, roles in arts_raw.items():
            if engine not in ENGINE_ROLES:
                raise ExportError(f"manifest {where}: unknown engine '{engine}' in artifacts")
            if not isinstance(roles, dict):
                raise ExportError(f"manifest {where}.artifacts.{engine}: expected an object")
            missing = [r for r in ENGINE_ROLES[engine] if r not in roles]
            if missing:
                raise ExportError(f"manifest {where}.artifacts.{engine}: missing role '{missing[0]}'")
            artifacts[engine] = {
                role: ArtifactRef.from_dict(ref, f"{where}.artifacts.{engine}.{role}") for role, ref in roles.items()
            }
        return cls(
            id=sid,
            kind=_get(d, "kind", where, str),
            block=_nonneg_int(d, "block", where),
            inputs=inputs,
            outputs=outputs,
            trainable=tensors("trainable"),
            state=state,
            frozen=tensors("frozen"),
            memory=MemoryEntry.from_dict(_get(d, "memory", where, dict), f"{where}.memory"),
            flops=FlopsEntry.from_dict(_get(d, "flops", where, dict), f"{where}.flops"),
            artifacts=artifacts,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "block": self.block,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "trainable": [t.to_dict() for t in self.trainable],
            "state": [t.to_dict() for t in self.state],
            "frozen": [t.to_dict() for t in self.frozen],
            "memory": self.memory.to_dict(),
            "flops": self.flops.to_dict(),
            "artifacts": {e: {r: ref.to_dict() for r, ref in roles.items()} for e, roles in self.artifacts.items()},
        }

    def param_count(self, which: str) -> int:
        """Element count of the ``trainable`` or ``frozen`` tensors."""
        return sum(t.numel for t in getattr(self, which))


@dataclass(frozen=True)
class BlockEntry:
    index: int
    params: int
    tensors: tuple[str, ...]

    @classmethod
    def from_dict(cls, d: Any, where: str) -> BlockEntry:
        names = _get(d, "tensors", where, list)
        if not all(isinstance(n, str) for n in names):
            raise ExportError(f"manifest {where}.tensors: must be a list of names")
        return cls(_nonneg_int(d, "index", where), _nonneg_int(d, "params", where), tuple(names))

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "params": self.params, "tensors": list(self.tensors)}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    num_blocks: int
    param_count: int
    init_weights: ArtifactRef

    @classmethod
    def from_dict(cls, d: Any, where: str = "model") -> ModelEntry:
        shape = _get(d, "input_shape", where, list)
        if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            raise ExportError(f"manifest {where}.input_shape: must be a list of positive integers")
        return cls(
            name=_get(d, "name", where, str),
            num_classes=_nonneg_int(d, "num_classes", where),
            input_shape=tuple(shape),
            num_blocks=_nonneg_int(d, "num_blocks", where),
            param_count=_nonneg_int(d, "param_count", where),
            init_weights=ArtifactRef.from_dict(_get(d, "init_weights", where, dict), f"{where}.init_weights"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "num_blocks": self.num_blocks,
            "param_count": self.param_count,
            "init_weights": self.init_weights.to_dict(),
        }


@dataclass(frozen=True)
class SplitSection:
    """SmartSplit cuts (optional `split` object; docs/formats.md and docs/smartsplit.md).

    Each cut is stored as export/split.py's CutDescription.to_dict(); the reader checks
    the fields the host plans with and that both stages are in the manifest.
    """

    cuts: tuple[dict[str, Any], ...]
    server_engine: str = "torch"

    @classmethod
    def from_dict(cls, d: Any, stage_ids: set[str]) -> SplitSection:
        where = "split"
        cuts = _get(d, "cuts", where, list)
        for i, c in enumerate(cuts):
            w = f"split.cuts[{i}]"
            cut = _get(c, "cut", w, str)
            for key in ("front_stage", "back_stage"):
                sid = _get(c, key, w, str)
                if sid not in stage_ids:
                    raise ExportError(f"manifest {w}.{key}: stage '{sid}' is not in the manifest")
            TensorEntry.from_dict(_get(c, "activation", w, dict), f"{w} activation")
            transfer = _get(c, "transfer_bytes_per_batch", w, dict)
            for key in ("up", "down", "total"):
                _nonneg_int(transfer, key, f"{w}.transfer_bytes_per_batch")
            device = _get(c, "device", w, dict)
            for key in ("footprint_bytes", "footprint_recompute_all_bytes", "train_flops"):
                _nonneg_int(device, key, f"{w}.device")
            for j, u in enumerate(_get(device, "units", f"{w}.device", list)):
                _get(u, "name", f"{w}.device.units[{j}]", str)
                for key in ("saved_bytes", "input_bytes", "recompute_flops", "footprint_if_recomputed_bytes"):
                    _nonneg_int(u, key, f"{w}.device.units[{j}]")
            _nonneg_int(_get(c, "server", w, dict), "footprint_bytes", f"{w}.server")
            if not cut:
                raise ExportError(f"manifest {w}.cut: must not be empty")
        return cls(tuple(cuts), _get(d, "server_engine", where, str))

    def to_dict(self) -> dict[str, Any]:
        return {"server_engine": self.server_engine, "cuts": [dict(c) for c in self.cuts]}

    def cut(self, cut_id: str) -> dict[str, Any]:
        for c in self.cuts:
            if c["cut"] == cut_id:
                return c
        raise ExportError(f"manifest has no split cut '{cut_id}' (it has: {', '.join(c['cut'] for c in self.cuts)})")


@dataclass(frozen=True)
class Manifest:
    created_by: str
    versions: dict[str, str]  # package -> version that built the artifacts
    model: ModelEntry
    batch_size: int
    seed: int
    optimizer: str
    engines: tuple[str, ...]
    blocks: tuple[BlockEntry, ...]
    stages: tuple[StageEntry, ...]
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION
    split: SplitSection | None = None  # only when exported with SmartSplit cuts

    def stage(self, stage_id: str) -> StageEntry:
        for s in self.stages:
            if s.id == stage_id:
                return s
        known = ", ".join(s.id for s in self.stages)
        raise ExportError(f"manifest has no stage '{stage_id}' (it has: {known})")

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        fmt = _get(d, "format", "", str)
        if fmt != MANIFEST_FORMAT:
            raise ExportError(f"not a fedblocks manifest (format '{fmt}', expected '{MANIFEST_FORMAT}')")
        version = _get(d, "version", "", int)
        if version > MANIFEST_VERSION or version < 1:
            raise ExportError(
                f"manifest version {version} is not supported (this fedblocks reads up to {MANIFEST_VERSION}); "
                "upgrade fedblocks or re-export"
            )
        versions = _get(d, "versions", "", dict)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in versions.items()):
            raise ExportError("manifest .versions: must map package names to version strings")
        engines = _get(d, "engines", "", list)
        unknown = [e for e in engines if e not in ENGINE_ROLES]
        if unknown:
            raise ExportError(f"manifest .engines: unknown engine {unknown[0]!r}")
        optimizer = _get(_get(d, "optimizer", "", dict), "name", "optimizer", str)
        stages = tuple(StageEntry.from_dict(s) for s in _get(d, "stages", "", list))
        ids = [s.id for s in stages]
        if len(set(ids)) != len(ids):
            raise ExportError("manifest .stages: stage ids must be unique")
        return cls(
            created_by=_get(d, "created_by", "", str),
            versions=dict(versions),
            model=ModelEntry.from_dict(_get(d, "model", "", dict)),
            batch_size=_nonneg_int(d, "batch_size", ""),
            seed=_get(d, "seed", "", int),
            optimizer=optimizer,
            engines=tuple(engines),
            blocks=tuple(BlockEntry.from_dict(b, f"blocks[{i}]") for i, b in enumerate(_get(d, "blocks", "", list))),
            stages=stages,
            format=fmt,
            version=version,
            split=SplitSection.from_dict(d["split"], set(ids)) if d.get("split") is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "created_by": self.created_by,
            "versions": dict(self.versions),
            "model": self.model.to_dict(),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "optimizer": {"name": self.optimizer},
            "engines": list(self.engines),
            "blocks": [b.to_dict() for b in self.blocks],
            "stages": [s.to_dict() for s in self.stages],
            **({"split": self.split.to_dict()} if self.split is not None else {}),
        }

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename) so a reader never sees half a manifest."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ExportError(f"manifest {path} does not exist; run `fedblocks export` first") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExportError(f"manifest {path} is not readable JSON: {exc}") from None
        return cls.from_dict(data)
