"""The export pipeline as explicit named stages, each a function from one artifact to the next:

    model -> blocks -> stage program -> engine artifact -> [split cuts] -> manifest

``export_model(spec, out_dir)`` runs them for every (stage x engine) and writes
``out_dir/manifest.json``. Every file goes to the content-addressed store
(``out_dir/objects``); each step's result is indexed by a cache key (objects.py),
so an unchanged model + stage + engine is never rebuilt -- a warm re-export only
reads index files and does not even construct the model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fedblocks.export import builders
from fedblocks.export.errors import ExportError
from fedblocks.export.manifest import (
    ArtifactRef,
    BlockEntry,
    EngineMemoryEntry,
    FlopsEntry,
    Manifest,
    MemoryEntry,
    ModelEntry,
    SplitSection,
    StageEntry,
    StateEntry,
    TensorEntry,
)
from fedblocks.export.objects import ObjectStore, cache_key, package_versions, source_hash
from fedblocks.export.weights import state_dict_to_arrays, weights_to_bytes

OPTIMIZERS = ("sgd",)
_STAGE_ID = re.compile(r"^[a-z_]+(-\d+(\.[A-Za-z0-9_]+)*)?$")  # split stages: split_front-1.stem.conv

# progress(done, total, label): called before each (stage, engine) unit of work and once at the end.
Progress = Callable[[int, int, str], None]


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    model: str
    num_classes: int
    input_shape: tuple[int, ...]
    batch_size: int
    engines: tuple[str, ...] = builders.ENGINES
    num_blocks: int | None = None
    stages: tuple[str, ...] | None = None  # None: every stage of the model
    seed: int = 0
    optimizer: str = "sgd"
    # SmartSplit: also export split_front-<cut> (every engine) + split_back-<cut> (server, torch eager:
    # no device artifacts) and the manifest's `split` section. cuts None: every cut of split_cuts().
    split: bool = False
    cuts: tuple[str, ...] | None = None

    def validate(self) -> None:
        from fedblocks.export.models import MODEL_NAMES

        if self.model not in MODEL_NAMES:
            raise ExportError(f"unknown model '{self.model}': choose one of {', '.join(MODEL_NAMES)}")
        if not self.input_shape or not all(isinstance(d, int) and d > 0 for d in self.input_shape):
            raise ExportError(f"input shape must be positive integers, got {list(self.input_shape)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ExportError(f"batch size must be an integer >= 2 (BatchNorm needs 2 samples), got {self.batch_size}")
        if not self.engines:
            raise ExportError("no engines given: choose from " + ", ".join(builders.ENGINES))
        for engine in self.engines:
            if engine not in builders.ENGINES:
                raise ExportError(f"unknown engine '{engine}': choose from {', '.join(builders.ENGINES)}")
        if len(set(self.engines)) != len(self.engines):
            raise ExportError("each engine may be named once")
        if self.optimizer not in OPTIMIZERS:
            raise ExportError(f"optimizer '{self.optimizer}' is not supported (use: {', '.join(OPTIMIZERS)})")
        for sid in self.stages or ():
            if not _STAGE_ID.match(sid):
                raise ExportError(f"bad stage id {sid!r} (expected e.g. full, grow-2, shrink-3)")
        if self.cuts is not None and not self.split:
            raise ExportError("cuts given without split: pass --split to export SmartSplit cuts")


@dataclasses.dataclass
class _Context:
    """What the cache keys share, and the model once (if ever) it has been built."""

    spec: ExportSpec
    store: ObjectStore
    base_key: dict[str, Any]
    model: Any = None
    built: list[str] = dataclasses.field(default_factory=list)  # "stage/engine" actually built (tests read this)


# ------------------------------------------------------------------ stage 1: model
def build_blocked_model(spec: ExportSpec) -> Any:
    """The seeded BlockedModel: same spec + seed -> the same initial weights, bit for bit."""
    from fedblocks.export.models import build_model

    torch.manual_seed(spec.seed)
    model = build_model(spec.model, spec.num_classes, tuple(spec.input_shape), spec.num_blocks)
    model.train()
    return model


def _ctx_model(ctx: _Context) -> Any:
    if ctx.model is None:
        ctx.model = build_blocked_model(ctx.spec)
    return ctx.model


# ------------------------------------------------------------------ stage 2: blocks (+ initial weights)
def model_entry(ctx: _Context) -> tuple[ModelEntry, tuple[BlockEntry, ...], list[str]]:
    """Model description, its blocks and its stage ids; the seeded weights go to the store."""
    key = cache_key({**ctx.base_key, "step": "model"})
    cached = ctx.store.get_index(key)
    if cached is not None:
        try:
            entry = ModelEntry.from_dict(cached["model"])
            blocks = tuple(BlockEntry.from_dict(b, "blocks") for b in cached["blocks"])
            if ctx.store.has(entry.init_weights):
                return entry, blocks, list(cached["stage_ids"])
        except (ExportError, KeyError, TypeError):
            pass  # damaged index entry: rebuild below
    from fedblocks.export.stages import stage_ids

    model = _ctx_model(ctx)
    # Every state-dict key (output modules share tensors with basic layers/head, both names kept).
    weights_ref = ctx.store.put_bytes(weights_to_bytes(state_dict_to_arrays(model)), "npz")
    params = dict(model.named_parameters())
    blocks = tuple(
        BlockEntry(
            index=k,
            params=sum(params[n].numel() for n in model.block_tensor_names(k) if n in params),
            tensors=tuple(model.block_tensor_names(k)),
        )
        for k in range(1, model.num_blocks + 1)
    )
    entry = ModelEntry(
        name=ctx.spec.model,
        num_classes=ctx.spec.num_classes,
        input_shape=tuple(ctx.spec.input_shape),
        num_blocks=model.num_blocks,
        param_count=model.param_count(),
        init_weights=weights_ref,
    )
    ids = stage_ids(model)
    ctx.store.put_index(key, {"model": entry.to_dict(), "blocks": [b.to_dict() for b in blocks], "stage_ids": ids})
    return entry, blocks, ids


# ------------------------------------------------------------------ stage 3: stage program
def stage_program(model: Any, stage_id: str) -> Any:
    """The StageProgram for ``stage_id`` holding the model's current (initial) weights."""
    from fedblocks.export.stages import make_stage

    return make_stage(model, stage_id)


def _memory_and_flops(stage: Any, batch_size: int) -> tuple[MemoryEntry, FlopsEntry]:
    from fedblocks.export.flops import stage_flops
    from fedblocks.export.memory import predict_footprint

    # Plain SGD (no optimizer state): momentum is a job setting; the runtime adds one buffer
    # per trainable tensor (= grads_bytes) when a job uses momentum (device_runtime/runner.py).
    fp = predict_footprint(stage, batch_size, "sgd", momentum=False)
    flops = stage_flops(stage, batch_size)
    memory = MemoryEntry(
        batch_size=batch_size,
        params_bytes=int(fp.params_bytes),
        grads_bytes=int(fp.grads_bytes),
        optimizer_bytes=int(fp.optimizer_bytes),
        activations_bytes=int(fp.activations_bytes),
        total_bytes=int(fp.total_bytes),
    )
    return memory, FlopsEntry(forward=int(flops["forward"]), train_step=int(flops["train_step"]))


def stage_description(ctx: _Context, stage_id: str) -> StageEntry:
    """Everything the manifest says about a stage except its artifacts (cached)."""
    key = cache_key({**ctx.base_key, "step": "stage", "batch_size": ctx.spec.batch_size, "stage": stage_id})
    cached = ctx.store.get_index(key)
    if cached is not None:
        try:
            return StageEntry.from_dict({**cached["stage"], "artifacts": {}})
        except (ExportError, KeyError, TypeError):
            pass
    stage = stage_program(_ctx_model(ctx), stage_id)
    b = ctx.spec.batch_size
    memory, flops = _memory_and_flops(stage, b)

    def tensors(specs: list[Any]) -> tuple[TensorEntry, ...]:
        return tuple(TensorEntry(s.name, tuple(s.shape), s.dtype) for s in specs)

    entry = StageEntry(
        id=stage_id,
        kind=stage.kind,
        block=int(stage.block or 0),
        inputs=tensors(stage.input_specs(b)),
        outputs=tensors(stage.output_specs(b)),
        trainable=tensors(stage.trainable_specs()),
        state=tuple(StateEntry(s.name, tuple(s.shape), s.dtype, s.source, s.momentum) for s in stage.state_specs()),
        frozen=tensors(stage.frozen_specs()),
        memory=memory,
        flops=flops,
    )
    ctx.store.put_index(key, {"stage": entry.to_dict()})
    return entry


# ------------------------------------------------------------------ stage 4: engine artifact
def engine_artifact(ctx: _Context, stage_id: str, engine: str) -> dict[str, ArtifactRef]:
    """The engine's files for the stage, from the cache or freshly built into the store."""
    spec = ctx.spec
    key = cache_key({**ctx.base_key, "step": "artifact", "batch_size": spec.batch_size, "stage": stage_id,
                     "engine": engine, "optimizer": spec.optimizer})
    cached = ctx.store.get_index(key)
    if cached is not None:
        try:
            refs = {role: ArtifactRef.from_dict(r, f"index {role}") for role, r in cached["artifacts"].items()}
            if all(ctx.store.has(r) for r in refs.values()):
                return refs
        except (ExportError, KeyError, TypeError, AttributeError):
            pass
    module = builders.builder(engine)
    module.check_available()
    stage = stage_program(_ctx_model(ctx), stage_id)
    example_inputs = stage.example_inputs(spec.batch_size, spec.seed)
    with ctx.store.scratch() as workdir:
        files = module.build(stage, example_inputs, workdir)
        refs = {role: ctx.store.put_file(files[role], ext) for role, ext in module.ROLES.items()}
    ctx.built.append(f"{stage_id}/{engine}")
    ctx.store.put_index(key, {"artifacts": {role: r.to_dict() for role, r in refs.items()}})
    return refs


def engine_memory_entry(ctx: _Context, stage_id: str, engine: str,
                        refs: dict[str, ArtifactRef]) -> EngineMemoryEntry | None:
    """The engine's own memory prediction for the stage (the builder's ``predict_memory``), cached.

    None for a builder without one. Keyed by the artifacts' hashes: a rebuilt artifact is re-predicted.
    """
    module = builders.builder(engine)
    if not hasattr(module, "predict_memory"):
        return None
    key = cache_key({**ctx.base_key, "step": "engine-memory", "batch_size": ctx.spec.batch_size, "stage": stage_id,
                     "engine": engine, "artifacts": {role: r.sha256 for role, r in refs.items()}})
    cached = ctx.store.get_index(key)
    if cached is not None:
        try:
            return EngineMemoryEntry.from_dict(cached["memory"], "index memory")
        except (ExportError, KeyError, TypeError):
            pass
    stage = stage_program(_ctx_model(ctx), stage_id)
    files = {role: ctx.store.path(r) for role, r in refs.items()}
    entry = EngineMemoryEntry.from_dict(module.predict_memory(stage, files, ctx.spec.batch_size), f"{engine} memory")
    ctx.store.put_index(key, {"memory": entry.to_dict()})
    return entry


# ------------------------------------------------------------------ stage 4b: SmartSplit cuts
SPLIT_SERVER_STAGE = "split_back"


def split_cut_ids(ctx: _Context) -> list[str]:
    """The cuts to export (spec.cuts, checked against the model's split_cuts())."""
    from fedblocks.export.stages import split_cuts

    key = cache_key({**ctx.base_key, "step": "split_cuts"})
    cached = ctx.store.get_index(key)
    known = list(cached["cuts"]) if cached is not None else None
    if known is None:
        known = split_cuts(_ctx_model(ctx))
        ctx.store.put_index(key, {"cuts": known})
    if ctx.spec.cuts is None:
        return known
    for cut in ctx.spec.cuts:
        if cut not in known:
            raise ExportError(f"{ctx.spec.model} has no split cut '{cut}' (cuts: {', '.join(known)})")
    return list(ctx.spec.cuts)


def split_description(ctx: _Context, cut: str) -> dict[str, Any]:
    """export/split.py's description of one cut at the spec's batch size (cached)."""
    key = cache_key({**ctx.base_key, "step": "split_cut", "batch_size": ctx.spec.batch_size, "cut": cut})
    cached = ctx.store.get_index(key)
    if cached is not None and isinstance(cached.get("cut"), dict):
        return dict(cached["cut"])
    from fedblocks.export.split import describe_cut

    described = describe_cut(_ctx_model(ctx), cut, ctx.spec.batch_size).to_dict()
    ctx.store.put_index(key, {"cut": described})
    return described


# ------------------------------------------------------------------ stage 5: manifest
def _created_by() -> str:
    try:
        return f"fedblocks {metadata.version('fedblocks')}"
    except metadata.PackageNotFoundError:
        return "fedblocks (not installed)"


def export_model(spec: ExportSpec, out_dir: Path, progress: Progress | None = None) -> Manifest:
    """Export every requested (stage x engine) of ``spec`` into ``out_dir``; returns the manifest."""
    manifest, _ = export_model_with_stats(spec, out_dir, progress)
    return manifest


def export_model_with_stats(
    spec: ExportSpec, out_dir: Path, progress: Progress | None = None
) -> tuple[Manifest, list[str]]:
    """:func:`export_model` plus the list of "stage/engine" artifacts that were built (not cached)."""
    spec.validate()
    for engine in spec.engines:
        builders.check_installed(engine)  # cheap; the full import happens only if something must be built
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create output directory {out_dir}: {exc.strerror or exc}") from None
    store = ObjectStore(out_dir)
    versions = package_versions()
    base_key = {
        "model": spec.model, "num_classes": spec.num_classes, "input_shape": list(spec.input_shape),
        "num_blocks": spec.num_blocks, "seed": spec.seed, "versions": versions, "source": source_hash(),
    }
    ctx = _Context(spec=spec, store=store, base_key=base_key)
    model, blocks, all_ids = model_entry(ctx)
    stage_list = list(spec.stages) if spec.stages else list(all_ids)
    for sid in stage_list:
        if sid not in all_ids:
            raise ExportError(f"{spec.model} has no stage '{sid}' (it has: {', '.join(all_ids)})")
    cuts = split_cut_ids(ctx) if spec.split else []
    stage_list += [sid for cut in cuts for sid in (f"split_front-{cut}", f"{SPLIT_SERVER_STAGE}-{cut}")
                   if sid not in stage_list]
    # the server segment runs on the host (torch eager, from the global weights): no device artifacts
    engines_of = {sid: () if sid.startswith(f"{SPLIT_SERVER_STAGE}-") else tuple(spec.engines) for sid in stage_list}
    total = sum(len(e) for e in engines_of.values())
    done = 0
    stages: list[StageEntry] = []
    for sid in stage_list:
        entry = stage_description(ctx, sid)
        artifacts: dict[str, dict[str, ArtifactRef]] = {}
        for engine in engines_of[sid]:
            if progress is not None:
                progress(done, total, f"{sid} / {engine}")
            artifacts[engine] = engine_artifact(ctx, sid, engine)
            done += 1
        engine_memory = {e: m for e in artifacts if (m := engine_memory_entry(ctx, sid, e, artifacts[e])) is not None}
        stages.append(dataclasses.replace(entry, artifacts=artifacts,
                                          memory=dataclasses.replace(entry.memory, engines=engine_memory)))
    split = SplitSection(tuple(split_description(ctx, cut) for cut in cuts)) if spec.split else None
    if progress is not None:
        progress(done, total, "done")
    manifest = Manifest(
        created_by=_created_by(),
        versions=versions,
        model=model,
        batch_size=spec.batch_size,
        seed=spec.seed,
        optimizer=spec.optimizer,
        engines=tuple(spec.engines),
        blocks=blocks,
        stages=tuple(stages),
        split=split,
    )
    manifest.save(out_dir / "manifest.json")
    return manifest, list(ctx.built)
