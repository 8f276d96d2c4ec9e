"""End to end: real ResNet-8 artifacts, a real CIFAR-10 shard, each engine through the runtime
(job.json -> supervised child -> bundle), compared with a plain torch training loop."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedblocks.device_runtime.runner import EXIT_NOT_OK, EXIT_OK, run_job

from .engine_fixtures import (
    BATCH,
    Exported,
    cifar_shard,
    export_resnet8,
    torch_reference,
    with_teacher,
    write_job,
)

pytest.importorskip("onnxruntime.training", reason="onnxruntime-training not installed")


def _engines_ready() -> None:
    from fedblocks.device_runtime import engines

    if not hasattr(engines, "load_engine"):
        pytest.skip("engine adapters (device_runtime/engines) not written yet")


@pytest.fixture(scope="module")
def exported() -> Exported:
    _engines_ready()
    return export_resnet8(("torch", "ort"))


@pytest.fixture(scope="module")
def shard() -> dict[str, np.ndarray]:
    return cifar_shard(128)


def _bundle(job: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    bundle = job.parent / "result"
    return (json.loads((bundle / "status.json").read_text()), json.loads((bundle / "metrics.json").read_text()))


def _weights(job: Path) -> dict[str, np.ndarray]:
    with np.load(job.parent / "result" / "weights.npz", allow_pickle=False) as z:
        return {n: z[n] for n in z.files}


# ORT runs its own kernels (different summation order): agreement is to float tolerance, not bitwise.
TOL = {"torch": (1e-5, 1e-5), "ort": (2e-4, 2e-4), "executorch": (2e-4, 2e-4)}


def check_against_reference(exported: Exported, shard: dict[str, np.ndarray], sid: str, engine: str,
                            tmp: Path, epochs: int = 2) -> dict[str, Any]:
    job = write_job(tmp, exported, sid, engine, shard, epochs=epochs)
    assert run_job(job) == EXIT_OK, _bundle(job)[0]
    _, metrics = _bundle(job)
    ref_losses, ref_weights = torch_reference(sid, exported.init, shard, epochs, None)
    rtol, atol = TOL[engine]
    steps = epochs * (len(shard["y"]) // BATCH)
    assert metrics["steps"] == steps and metrics["samples_seen"] == steps * BATCH
    np.testing.assert_allclose(metrics["loss"], ref_losses, rtol=rtol, atol=atol)
    weights = _weights(job)
    assert sorted(weights) == sorted(ref_weights)
    for name, ref in ref_weights.items():
        np.testing.assert_allclose(weights[name], ref, rtol=10 * rtol, atol=10 * atol, err_msg=name)
    # The run really trained: weights moved and the loss went down over two epochs of real images.
    assert any(not np.array_equal(weights[n], exported.init[n]) for n in weights)
    assert metrics["loss"][-1] < metrics["loss"][0]
    return metrics


@pytest.mark.parametrize(("sid", "engine"), [("full", "torch"), ("full", "ort"), ("grow-2", "ort")])
def test_runtime_matches_torch_reference(exported: Exported, shard: dict[str, np.ndarray], tmp_path: Path,
                                         sid: str, engine: str) -> None:
    metrics = check_against_reference(exported, shard, sid, engine, tmp_path)
    mem = metrics["memory"]
    assert metrics["engine"] == engine and metrics["engine_version"]
    assert mem["peak_reset"] is True and mem["peak_source"] == "vmhwm"
    assert mem["footprint_bytes"] > 0 and mem["peak_rss_bytes"] >= mem["baseline_rss_bytes"]
    assert mem["predicted_footprint_bytes"] > 0 and mem["achieved_hz"] >= 20
    assert len(metrics["step_latency_s"]) == metrics["steps"] and all(t > 0 for t in metrics["step_latency_s"])
    assert metrics["model_load_s"] > 0 and metrics["cpu_s"] > 0
    assert metrics["energy"]["source"] == "modelled" and metrics["energy"]["joules"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(("sid", "engine"), [("grow-2", "torch"), ("shrink-2", "torch"), ("shrink-2", "ort")])
def test_runtime_matches_torch_reference_more_stages(exported: Exported, shard: dict[str, np.ndarray],
                                                     tmp_path: Path, sid: str, engine: str) -> None:
    check_against_reference(exported, with_teacher(shard) if sid.startswith("shrink") else shard, sid, engine,
                            tmp_path)


@pytest.mark.slow
def test_executorch_matches_torch_reference(shard: dict[str, np.ndarray], tmp_path: Path) -> None:
    pytest.importorskip("executorch")
    _engines_ready()
    exported = export_resnet8(("executorch",), ("grow-2",))
    check_against_reference(exported, shard, "grow-2", "executorch", tmp_path, epochs=1)


def test_budget_below_footprint_is_oom_killed(exported: Exported, shard: dict[str, np.ndarray],
                                              tmp_path: Path) -> None:
    """A footprint budget far below what one ResNet-8 step needs (~35 MB predicted): killed, metrics kept."""
    job = write_job(tmp_path, exported, "full", "ort", shard, epochs=1, budget_mb=4,
                    budget_applies_to="footprint")
    assert run_job(job) == EXIT_NOT_OK
    status, metrics = _bundle(job)
    assert status["status"] == "oom_killed", status
    assert "over the budget of 4 MiB" in status["reason"] and "SIGKILL" in status["reason"]
    mem = metrics["memory"]
    assert mem["kill_usage_bytes"] > 4 * 2**20 and mem["budget_bytes"] == 4 * 2**20
    assert mem["baseline_rss_bytes"] > 0 and metrics["model_load_s"] > 0  # what was measured before the kill
    assert metrics["steps"] < 4
    assert not (job.parent / "result" / "weights.npz").exists()


def test_process_budget_counts_the_whole_process(exported: Exported, shard: dict[str, np.ndarray],
                                                 tmp_path: Path) -> None:
    """The default budget is whole-process RSS, like Android's LMK: 64 MiB < python + numpy + ORT."""
    job = write_job(tmp_path, exported, "grow-2", "ort", shard, epochs=1, budget_mb=64)
    assert run_job(job) == EXIT_NOT_OK
    status, metrics = _bundle(job)
    assert status["status"] == "oom_killed" and "process RSS reached" in status["reason"]
    assert metrics["memory"]["budget_applies_to"] == "process"


def test_nan_loss_stops_training(exported: Exported, shard: dict[str, np.ndarray], tmp_path: Path) -> None:
    poisoned = {k: v.copy() for k, v in shard.items()}
    poisoned["x"][5] = np.nan  # one sample: exactly one batch per epoch carries it
    job = write_job(tmp_path, exported, "full", "ort", poisoned, epochs=2)
    assert run_job(job) == EXIT_NOT_OK
    status, metrics = _bundle(job)
    assert status["status"] == "failed" and "non-finite loss" in status["reason"]
    losses = metrics["loss"]
    assert losses[-1] is None and all(v is not None for v in losses[:-1])
    assert f"at step {len(losses) - 1}" in status["reason"]
    assert not (job.parent / "result" / "weights.npz").exists()


def _put(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(f"{value}\n")
    tmp.replace(path)


def test_fuel_gauge_energy_in_a_real_run(exported: Exported, shard: dict[str, np.ndarray], tmp_path: Path) -> None:
    """A virtual battery at a constant 1.2 A x 3.9 V: energy = 4.68 W x training window."""
    root = tmp_path / "sysfs"
    bat = root / "sys/class/power_supply/battery"
    _put(bat / "current_now", -1_200_000)
    _put(bat / "voltage_now", 3_900_000)
    _put(bat / "capacity", 80)
    _put(bat / "temp", 305)
    _put(root / "sys/class/thermal/thermal_zone0/type", "cpu")
    _put(root / "sys/class/thermal/thermal_zone0/temp", 45000)
    _put(root / "sys/devices/system/cpu/cpufreq/policy0/scaling_cur_freq", 1_800_000)
    stop = threading.Event()

    def drain() -> None:  # the battery level drops while training
        level = 80
        while not stop.wait(0.3):
            level -= 1
            _put(bat / "capacity", level)

    t = threading.Thread(target=drain)
    t.start()
    try:
        job = write_job(tmp_path / "work", exported, "grow-2", "ort", shard, epochs=1,
                        meters={"sysfs_root": str(root), "energy_hz": 10})
        assert run_job(job) == EXIT_OK
    finally:
        stop.set()
        t.join()
    _, metrics = _bundle(job)
    energy = metrics["energy"]
    assert energy["source"] == "fuel_gauge" and energy["current_unit"] == "uA"
    assert energy["current_sign"] == "negative"
    assert energy["joules"] == pytest.approx(1.2 * 3.9 * energy["window_s"], rel=1e-6)
    assert energy["window_s"] == pytest.approx(metrics["train_s"])
    assert metrics["energy_modelled"]["source"] == "modelled"
    assert metrics["battery"]["start"]["level_pct"] >= metrics["battery"]["end"]["level_pct"]
    assert metrics["battery"]["start"]["temp_c"] == 30.5
    assert metrics["thermal_c"]["end"] == {"cpu": 45.0}
    assert metrics["cpu_freq_khz"]["mean"] == {"policy0": 1_800_000.0}


def test_odpm_energy_in_a_real_run(exported: Exported, shard: dict[str, np.ndarray], tmp_path: Path) -> None:
    """Pixel ODPM counters advancing at 2 W (CPU rail) + 0.5 W (display rail) in real time."""
    root = tmp_path / "sysfs"
    dev = root / "sys/bus/iio/devices/iio:device0/energy_value"
    t0 = time.monotonic()
    stop = threading.Event()

    def write() -> None:
        t = time.monotonic() - t0
        _put(dev, f"t={int(t * 1000)}\nCH0(T={int(t * 1000)})[S4M_VDD_CPUCL0], {int(2e6 * t)}\n"
                  f"CH1(T={int(t * 1000)})[VSYS_PWR_DISPLAY], {int(0.5e6 * t)}")

    def counter() -> None:
        while not stop.wait(0.02):
            write()

    write()
    th = threading.Thread(target=counter)
    th.start()
    try:
        job = write_job(tmp_path / "work", exported, "grow-2", "ort", shard, epochs=1,
                        meters={"sysfs_root": str(root)})
        assert run_job(job) == EXIT_OK
    finally:
        stop.set()
        th.join()
    _, metrics = _bundle(job)
    energy = metrics["energy"]
    assert energy["source"] == "odpm"
    # Counters are written every 20 ms and read at 10 Hz: within 2.5 W x 2 x 30 ms of the exact value.
    assert energy["joules"] == pytest.approx(2.5 * energy["window_s"], abs=0.15)
    assert set(energy["rails_joules"]) == {"S4M_VDD_CPUCL0", "VSYS_PWR_DISPLAY"}
