"""A small SmartSplit setup: ResNet-8 on 3x16x16, batch 8, exported with cuts, an edge server, jobs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedblocks.device_runtime.data import batch_indices
from fedblocks.device_runtime.job import sha256_file

MODEL, INPUT, BATCH, CLASSES = "resnet8", (3, 16, 16), 8, 10
CUTS = ("1.stem.conv", "1.stem", "2")
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
SEED = 7


@dataclass
class SplitExport:
    out: Path
    manifest: Any
    init: dict[str, np.ndarray]
    model: Any  # the BlockedModel (templates for the server segments)

    def front(self, cut: str) -> Any:
        return self.manifest.stage(f"split_front-{cut}")

    def artifacts(self, cut: str, engine: str) -> dict[str, Path]:
        return {role: self.out / ref.path for role, ref in self.front(cut).artifacts[engine].items()}

    def front_init(self, cut: str) -> dict[str, np.ndarray]:
        s = self.front(cut)
        return {t.name: self.init[t.name] for t in (*s.trainable, *s.state)}


def export_split(engines: tuple[str, ...] = ("torch", "ort")) -> SplitExport:
    from fedblocks.export.pipeline import ExportSpec, build_blocked_model, export_model
    from fedblocks.host.data.dataset import cache_dir

    spec = ExportSpec(MODEL, CLASSES, INPUT, BATCH, engines=engines, stages=("full",), split=True, cuts=CUTS)
    out = cache_dir() / "tests-smartsplit" / "resnet8-16"
    manifest = export_model(spec, out)
    with np.load(out / manifest.model.init_weights.path, allow_pickle=False) as z:
        init = {n: z[n] for n in z.files}
    return SplitExport(out, manifest, init, build_blocked_model(spec))


def synthetic_shard(samples: int = 32, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((samples, *INPUT)).astype(np.float32),
            "y": rng.integers(0, CLASSES, samples).astype(np.int64)}


def back_program(exported: SplitExport, cut: str, weights: dict[str, np.ndarray] | None = None) -> Any:
    from fedblocks.export.stages import make_stage

    program = make_stage(exported.model, f"split_back-{cut}")
    program.load_global_state(weights or exported.init, strict=True)
    return program


def split_section(exported: SplitExport, cut: str, port: int, token: str, momentum: bool = True,
                  **extra: Any) -> dict[str, Any]:
    from fedblocks.host.split.session import device_view

    d = exported.manifest.split.cut(cut)
    footprint, ladder = device_view(d, momentum)
    return {"server": {"host": "127.0.0.1", "port": port}, "token": token, "cut": cut,
            "activation_shape": d["activation"]["shape"], "footprint_bytes": footprint,
            "recompute_ladder": ladder, "recompute": "auto", "io_timeout_s": 60, **extra}


def write_split_job(work: Path, exported: SplitExport, cut: str, engine: str, shard: dict[str, np.ndarray],
                    split: dict[str, Any], max_steps: int = 3, budget_mb: float | None = None,
                    budget_applies_to: str = "footprint") -> Path:
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / "shard.npz", x=shard["x"], y=shard["y"])
    np.savez(work / "init.npz", **exported.front_init(cut))

    def ref(path: Path) -> dict[str, str]:
        return {"path": str(path), "sha256": sha256_file(path)}

    job = {
        "format": "fedblocks.job", "version": 1, "job_id": f"split-{cut}-{engine}", "engine": engine,
        "stage": exported.front(cut).to_dict(),
        "artifacts": {role: ref(p) for role, p in exported.artifacts(cut, engine).items()},
        "data": ref(work / "shard.npz"), "init_weights": ref(work / "init.npz"),
        "training": {"epochs": None, "max_steps": max_steps, "batch_size": BATCH, "seed": SEED, "threads": 1,
                     "optimizer": {"name": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}},
        "budget_mb": budget_mb, "budget_applies_to": budget_applies_to,
        "meters": {"memory_hz": 50, "energy_hz": 10, "sysfs_root": str(work / "no-sysfs")},
        "output_dir": "result", "split": split,
    }
    path = work / "job.json"
    path.write_text(json.dumps(job))
    return path


def full_reference(exported: SplitExport, shard: dict[str, np.ndarray], steps: int) -> dict[str, np.ndarray]:
    """Unsplit eager training of the full model on the same batches, same SGD: every tensor it trains."""
    import torch

    from fedblocks.export.stages import make_stage

    program = make_stage(exported.model, "full")
    program.load_global_state(exported.init, strict=True)
    program.train()
    sgd = torch.optim.SGD(program.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for idx in batch_indices(len(shard["y"]), BATCH, SEED, None, steps):
        sgd.zero_grad(set_to_none=True)
        outputs = program(torch.from_numpy(shard["x"][idx]), torch.from_numpy(shard["y"][idx]))
        outputs[0].backward()
        sgd.step()
        program.apply_state_updates(tuple(o.detach() for o in outputs))
    state = program.global_state()
    names = [s.name for s in program.trainable_specs()] + [s.name for s in program.state_specs()]
    return {n: state[n].detach().numpy().copy() for n in names}
