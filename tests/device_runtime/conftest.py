"""Helpers to write jobs for the device runtime (a small linear stage; real files, real sha256)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedblocks.device_runtime.job import sha256_file

TINY_STAGE: dict[str, Any] = {
    "id": "full", "kind": "full", "block": 0,
    "inputs": [{"name": "x", "shape": [4, 3], "dtype": "float32"},
               {"name": "y", "shape": [4], "dtype": "int64"}],
    "outputs": [{"name": "loss", "shape": [], "dtype": "float32"}],
    "trainable": [{"name": "fc.weight", "shape": [2, 3], "dtype": "float32"},
                  {"name": "fc.bias", "shape": [2], "dtype": "float32"}],
    "state": [], "frozen": [],
    "memory": {"batch_size": 4, "total_bytes": 1000},
}


def ref(path: Path) -> dict[str, str]:
    return {"path": path.name, "sha256": sha256_file(path)}


@dataclass
class JobFiles:
    dir: Path
    job: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.dir / "job.json"

    def write(self) -> Path:
        self.path.write_text(json.dumps(self.job))
        return self.path

    @property
    def bundle(self) -> Path:
        return self.dir / self.job.get("output_dir", "result")

    def status(self) -> dict[str, Any]:
        return json.loads((self.bundle / "status.json").read_text())

    def metrics(self) -> dict[str, Any]:
        return json.loads((self.bundle / "metrics.json").read_text())


def tiny_job(tmp: Path, samples: int = 12, **overrides: Any) -> JobFiles:
    """A valid job for TINY_STAGE (artifact is a placeholder file: these jobs fail before engine load)."""
    rng = np.random.default_rng(0)
    np.savez(tmp / "shard.npz", x=rng.normal(size=(samples, 3)).astype(np.float32),
             y=rng.integers(0, 2, size=samples).astype(np.int64))
    np.savez(tmp / "init.npz", **{"fc.weight": np.zeros((2, 3), np.float32), "fc.bias": np.zeros(2, np.float32)})
    (tmp / "program.bin").write_bytes(b"placeholder program")
    job = {
        "format": "fedblocks.job", "version": 1, "job_id": "tiny-1", "engine": "torch", "stage": TINY_STAGE,
        "artifacts": {"program": ref(tmp / "program.bin")},
        "data": ref(tmp / "shard.npz"), "init_weights": ref(tmp / "init.npz"),
        "training": {"epochs": 1, "max_steps": None, "batch_size": 4, "seed": 0,
                     "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}},
        "budget_mb": None, "meters": {"memory_hz": 50, "energy_hz": 10, "sysfs_root": str(tmp / "nosysfs")},
        "output_dir": "result",
    }
    job.update(overrides)
    return JobFiles(tmp, job)


@pytest.fixture
def python() -> str:
    return sys.executable
