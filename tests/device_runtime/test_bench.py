"""`fedblocks bench stage`: argument handling, and one real (small) run through the device runtime."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedblocks.host.bench import _row, resolve_stage_ids, synthetic_shard
from fedblocks.host.cli import main

IDS = ["shrink-4", "shrink-3", "shrink-2", "grow-1", "grow-2", "grow-3", "grow-4", "full"]


def test_resolve_stage_ids() -> None:
    assert resolve_stage_ids("3", IDS) == ["grow-3"]
    assert resolve_stage_ids("shrink-2", IDS) == ["shrink-2"]
    assert resolve_stage_ids("all", IDS) == IDS


@pytest.mark.parametrize(("argv", "needle"), [
    (["--stage", "9"], "has no stage 'grow-9'"),
    (["--steps", "1"], "--steps must be >= 2"),
    (["--warmup", "5", "--steps", "3"], "--warmup must be in [0, --steps)"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--input-shape", "3,x,32"], "--input-shape: expected comma-separated integers"),
    (["--model", "alexnet"], "unknown model 'alexnet'"),
])
def test_bad_arguments_are_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "stage", "--model", "resnet8", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1 and err.startswith("fedblocks bench: error:")


def test_ratios_are_the_median_of_alternate_pairs_and_times_pool_their_steps() -> None:
    """A machine that slows down between pairs moves both sides of a pair, not the ratio."""

    def runtime(step_s: float) -> dict[str, object]:
        return {"step_latency_s": [9.0, step_s, step_s], "step_cpu_s": [9.0, step_s, step_s],
                "memory": {"footprint_bytes": 2**20, "predicted_footprint_bytes": 2**20}}

    def eager(step_s: float) -> tuple[list[float], list[float]]:
        return [9.0, step_s, step_s], [9.0, step_s, step_s]

    # pair 1 on a fast machine (ratio 1.1), pair 2 twice as slow (1.2), pair 3 in between (1.0)
    pairs = [(runtime(1.1), eager(1.0)), (runtime(2.4), eager(2.0)), (runtime(1.5), eager(1.5))]
    row = _row("m", "full", "ort", 32, 1, 3, 1, "ok", "", pairs, "plan")
    assert row.repeats == 3 and row.ratio == row.cpu_ratio == 1.1
    assert (row.ratio_min, row.ratio_max) == (1.0, 1.2) == (row.cpu_ratio_min, row.cpu_ratio_max)
    assert row.step_ms == 1500.0 and row.eager_ms == 1500.0  # pooled medians, warm-up steps (9 s) dropped
    assert (row.step_ms_min, row.step_ms_max) == (1100.0, 2400.0)
    assert row.footprint_mib == 1.0 and row.error_pct == 0.0  # memory from the first run


def test_synthetic_shard_fits_the_stage() -> None:
    stage = {"inputs": [{"name": "x", "shape": [4, 3, 8, 8], "dtype": "float32"},
                        {"name": "y", "shape": [4], "dtype": "int64"},
                        {"name": "teacher", "shape": [4, 10], "dtype": "float32"}]}
    shard = synthetic_shard(stage, steps=3, seed=0)
    assert shard["x"].shape == (12, 3, 8, 8) and shard["y"].dtype.name == "int64"
    assert shard["teacher"].shape == (12, 10) and 0 <= shard["y"].min() and shard["y"].max() < 10


@pytest.mark.slow
def test_bench_stage_resnet8_torch_json(tmp_path: pytest.TempPathFactory) -> None:
    """A real bench run: export (cached), runtime in a separate process, torch eager side by side."""
    pytest.importorskip("fedblocks.device_runtime.engines.torch")
    proc = subprocess.run([sys.executable, "-m", "fedblocks.host.cli", "bench", "stage", "--model", "resnet8",
                           "--stage", "2", "--engine", "torch", "--steps", "3", "--repeats", "2", "--json",
                           "--export-dir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    (row,) = out["rows"]
    assert row["stage"] == "grow-2" and row["status"] == "ok" and row["engine"] == "torch"
    assert row["step_ms"] > 0 and row["eager_ms"] > 0 and row["ratio"] > 0
    assert row["repeats"] == 2 and row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
    assert row["footprint_mib"] > 0 and row["predicted_mib"] > 0 and row["error_pct"] is not None
    assert out["environment"]["threads"] >= 1
