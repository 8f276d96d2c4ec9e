"""Real ResNet-8 artifacts, a real CIFAR-10 shard and a plain torch reference loop."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedblocks.device_runtime.data import batch_indices
from fedblocks.device_runtime.job import sha256_file

MODEL = "resnet8"
BATCH = 32
STAGES = ("full", "grow-2", "shrink-2")
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


@dataclass
class Exported:
    out: Path
    manifest: Any  # fedblocks.export.manifest.Manifest
    init: dict[str, np.ndarray]

    def stage_dict(self, sid: str) -> dict[str, Any]:
        return self.manifest.stage(sid).to_dict()

    def artifacts(self, sid: str, engine: str) -> dict[str, Path]:
        return {role: self.out / ref.path for role, ref in self.manifest.stage(sid).artifacts[engine].items()}

    def init_weights(self, sid: str) -> dict[str, np.ndarray]:
        d = self.stage_dict(sid)
        return {t["name"]: self.init[t["name"]] for t in (*d["trainable"], *d["state"])}


def export_resnet8(engines: tuple[str, ...], stages: tuple[str, ...] = STAGES) -> Exported:
    """Export (content-addressed cache in ~/.cache/fedblocks: a warm run only reads index files)."""
    from fedblocks.export.pipeline import ExportSpec, export_model
    from fedblocks.host.data.dataset import cache_dir

    out = cache_dir() / "tests-device-runtime" / "resnet8"
    manifest = export_model(ExportSpec(MODEL, 10, (3, 32, 32), BATCH, engines=engines, stages=stages), out)
    with np.load(out / manifest.model.init_weights.path, allow_pickle=False) as z:
        init = {n: z[n] for n in z.files}
    return Exported(out, manifest, init)


def cifar_shard(samples: int = 128) -> dict[str, np.ndarray]:
    """`samples` real CIFAR-10 training images (JPEG tarball in ../shared/data), normalised NCHW."""
    from fedblocks.host.data.cifar10 import load_cifar10
    from fedblocks.host.data.dataset import resolve_data_dir

    data_dir = resolve_data_dir()
    if not (data_dir / "cifar10-jpg.tar.gz").exists() and not (data_dir / "cifar-10-python.tar.gz").exists():
        pytest.skip(f"CIFAR-10 not found in {data_dir} (cifar10-jpg.tar.gz)")
    ds = load_cifar10(data_dir, limit_train=samples, limit_test=1)
    return {"x": np.ascontiguousarray(ds.x_train, dtype=np.float32), "y": ds.y_train.astype(np.int64)}


def with_teacher(shard: dict[str, np.ndarray], classes: int = 10, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {**shard, "teacher": rng.standard_normal((len(shard["y"]), classes)).astype(np.float32)}


def write_job(work: Path, exported: Exported, sid: str, engine: str, shard: dict[str, np.ndarray],
              epochs: int | None = 2, max_steps: int | None = None, **extra: Any) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    stage = exported.stage_dict(sid)
    np.savez(work / "shard.npz", **{t["name"]: shard[t["name"]] for t in stage["inputs"]})
    np.savez(work / "init.npz", **exported.init_weights(sid))

    def ref(path: Path) -> dict[str, str]:
        return {"path": str(path), "sha256": sha256_file(path)}

    job: dict[str, Any] = {
        "format": "fedblocks.job", "version": 1, "job_id": f"test-{sid}-{engine}", "engine": engine,
        "stage": stage, "artifacts": {role: ref(p) for role, p in exported.artifacts(sid, engine).items()},
        "data": ref(work / "shard.npz"), "init_weights": ref(work / "init.npz"),
        "training": {"epochs": epochs, "max_steps": max_steps, "batch_size": BATCH, "seed": 7, "threads": 2,
                     "optimizer": {"name": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}},
        "budget_mb": None, "meters": {"memory_hz": 50, "energy_hz": 10, "sysfs_root": str(work / "no-sysfs")},
        "output_dir": "result",
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}
        else:
            job[key] = value
    path = work / "job.json"
    path.write_text(json.dumps(job))
    return path


def torch_reference(sid: str, init: dict[str, np.ndarray], shard: dict[str, np.ndarray], epochs: int | None,
                    max_steps: int | None, seed: int = 7, augment: str = "none") -> tuple[list[float], dict[str, np.ndarray]]:
    """Plain torch eager training of the stage program: same init, same batch order, torch.optim.SGD.

    ``augment="crop-flip"``: each batch's images cropped from the 4-pixel zero-padded image and
    mirrored, written here with np.pad from the draws the job contract names (docs/formats.md)."""
    import torch

    from fedblocks.export.pipeline import ExportSpec, build_blocked_model, stage_program

    torch.manual_seed(0)
    program = stage_program(build_blocked_model(ExportSpec(MODEL, 10, (3, 32, 32), BATCH)), sid)
    program.load_global_state(init, strict=False)
    program.train()
    params = [p for p in program.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    names = [t.name for t in program.input_specs(BATCH)]
    n = len(shard[names[0]])
    losses: list[float] = []
    draws = np.random.default_rng([seed, 0xA06])
    for idx in batch_indices(n, BATCH, seed, epochs, max_steps):
        batch = {name: shard[name][idx] for name in names}
        if augment == "crop-flip":
            x = batch["x"]
            shifts, flips = draws.integers(-4, 5, size=(len(x), 2)), draws.random(len(x)) < 0.5
            padded = np.pad(x, ((0, 0), (0, 0), (4, 4), (4, 4)))
            h, w = x.shape[2:]
            crops = [padded[i, :, 4 + dy:4 + dy + h, 4 + dx:4 + dx + w] for i, (dy, dx) in enumerate(shifts)]
            batch["x"] = np.stack([c[:, :, ::-1] if f else c for c, f in zip(crops, flips, strict=True)])
        inputs = [torch.from_numpy(np.ascontiguousarray(batch[name])) for name in names]
        sgd.zero_grad(set_to_none=True)
        outputs = program(*inputs)
        outputs[0].backward()
        sgd.step()
        program.apply_state_updates(tuple(o.detach() for o in outputs))
        losses.append(float(outputs[0].detach()))
    state = program.global_state()
    wanted = [s.name for s in program.trainable_specs()] + [s.name for s in program.state_specs()]
    return losses, {n: state[n].detach().numpy().copy() for n in wanted}
