"""TEST FIXTURES for the report tests: recorded runs written through the run store's own API
(host/store.py RunStore). The numbers are synthetic but shaped like real ones (metrics.json
as the device runtime writes it, docs/formats.md); they are NOT measurements.

- `write_profl_run`: ProFL on 4 phones, measured fuel-gauge energy (+ the modelled figure
  every job also reports), one device excluded from the last stage by its budget, one
  oom_killed job and one straggler.
- `write_exclusivefl_run`: ExclusiveFL, same phones: two excluded (budget < full model),
  only modelled energy (simulated testbed: no memory measured).
- `write_in_progress_run`: status running, no finished_at, the last round partial.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedblocks.host.store import DeviceJobRow, DeviceRow, RoundRow, RunStore, StageRow

PHONES = (  # serial, model, soc, ram MB, budget MB, profile
    ("R58M1234ABC", "SM-A525F", "Snapdragon 720G", 5632.0, 700.0, "midrange"),
    ("1A2B3C4D5E", "Pixel 6", "Google Tensor", 7680.0, 900.0, "flagship"),
    ("ZY22G7K9Q", "moto g(30)", "Snapdragon 662", 3788.0, 380.0, "lowend"),
    ("127.0.0.1:7101", "fedblocks virtual phone", "virtual (midrange profile)", 4096.0, 600.0, "midrange"),
)
MIB = 1024 * 1024


def _config(strategy: str, testbed: str, rounds: int, name: str) -> dict[str, Any]:
    """ExperimentConfig.to_dict() layout."""
    return {"name": name, "model": {"name": "resnet8"}, "dataset": {"name": "cifar10"},
            "partition": {"scheme": "dirichlet", "alpha": 0.5},
            "clients": {"count": len(PHONES), "testbed": testbed, "engine": "ort",
                        "serials": [p[0] for p in PHONES]},
            "strategy": {"name": strategy}, "training": {"rounds": rounds, "batch_size": 32, "seed": 0},
            "evaluation": {"every": 1, "batch_size": 256}}


def _metrics(rng: np.random.Generator, job_id: str, stage: str, steps: int, step_s: float, baseline_mb: float,
             footprint_mb: float | None, predicted_mb: float, budget_mb: float | None, source: str,
             power_w: float, battery: tuple[float, float], temp: tuple[float, float], status: str) -> dict[str, Any]:
    lat = list(np.round(rng.normal(step_s, step_s * 0.08, steps).clip(step_s * 0.5), 5))
    lat[0] = round(step_s * 2.5, 5)  # warm-up step
    train_s = float(sum(lat))
    cpu_s = train_s * 3.6
    modelled_j = cpu_s * 1.8 + train_s * 0.3
    energy: dict[str, Any]
    if source == "modelled":
        energy = {"source": "modelled", "joules": modelled_j, "window_s": train_s, "sample_hz": None, "samples": 0,
                  "cpu_s": cpu_s, "power_profile": {"name": "midrange", "cpu_active_mw": 1800, "idle_mw": 300}}
    else:
        energy = {"source": source, "joules": power_w * train_s, "window_s": train_s, "sample_hz": 9.8,
                  "samples": int(train_s * 9.8), "current_unit": "uA", "voltage_unit": "uV", "current_sign": -1,
                  "mean_power_w": power_w}
    peak = None if footprint_mb is None else (baseline_mb + footprint_mb) * MIB
    return {
        "format": "fedblocks.metrics", "version": 1, "job_id": job_id, "engine": "ort", "engine_version": "1.19.2",
        "stage_id": stage, "stage_kind": stage.split("-")[0], "batch_size": 32, "threads": 4,
        "num_samples": steps * 32, "steps": steps, "steps_planned": steps, "samples_seen": steps * 32,
        "epochs_completed": 1, "loss": list(np.round(np.linspace(2.3, 1.6, steps), 4)),
        "step_latency_s": lat, "step_latency_median_s": float(np.median(lat[1:])), "data_load_s": 0.21,
        "model_load_s": 0.84, "train_s": train_s, "wall_s": train_s + 1.3, "cpu_s": cpu_s,
        "memory": {"baseline_rss_bytes": None if footprint_mb is None else baseline_mb * MIB,
                   "peak_rss_bytes": peak, "peak_source": "modelled" if footprint_mb is None else "vmhwm",
                   "footprint_bytes": None if footprint_mb is None else footprint_mb * MIB,
                   "predicted_footprint_bytes": predicted_mb * MIB, "budget_bytes": None if budget_mb is None
                   else budget_mb * MIB, "budget_applies_to": "footprint"},
        "energy": energy,
        "energy_modelled": {"source": "modelled", "joules": modelled_j, "window_s": train_s, "cpu_s": cpu_s},
        "battery": {"start": {"level_pct": battery[0], "temp_c": temp[0]}, "end": {"level_pct": battery[1],
                                                                                      "temp_c": temp[1]}},
        "thermal_c": {"start": {"cpu-0": temp[0]}, "end": {"cpu-0": temp[1]}},
        "status": status,
    }


def _job(rng: np.random.Generator, rnd: int, client: int, stage: str, predicted: float, *, status: str = "ok",
         reason: str | None = None, source: str = "fuel_gauge", measured_memory: bool = True) -> DeviceJobRow:
    serial, _model, _soc, _ram, budget, _profile = PHONES[client]
    step_s = (0.11, 0.07, 0.19, 0.13)[client]
    steps = 40 if status == "ok" else 12
    footprint = predicted * rng.uniform(0.92, 1.12) if measured_memory else None
    if status == "oom_killed" and measured_memory:
        footprint = budget * 1.01
    baseline = 118.0 + 10 * client
    bat0 = 87.0 - rnd
    temp0 = 31.0 + client + rnd * 0.4
    power_w = (2.9, 2.2, 3.4, 2.6)[client]
    job_id = f"r{rnd}-c{client}-{stage}"
    m = _metrics(rng, job_id, stage, steps, step_s, baseline, footprint, predicted, budget, source, power_w,
                 (bat0, bat0 - (1.0 if status == "ok" else 0.0)), (temp0, temp0 + 3.5), status)
    energy = m["energy"]
    return DeviceJobRow(
        round=rnd, status=status, client=client, serial=serial, stage_id=stage, job_id=job_id, reason=reason,
        samples=m["samples_seen"] if status == "ok" else None, loss_first=m["loss"][0], loss_last=m["loss"][-1],
        step_time_median_s=m["step_latency_median_s"], model_load_s=m["model_load_s"],
        baseline_rss_mb=None if footprint is None else baseline, peak_rss_mb=None if footprint is None
        else baseline + footprint, footprint_mb=footprint, predicted_footprint_mb=predicted, budget_mb=budget,
        energy_j=energy["joules"], energy_source=energy["source"], battery_start=bat0,
        battery_end=m["battery"]["end"]["level_pct"], temp_start=temp0, temp_end=temp0 + 3.5,
        push_s=round(rng.uniform(0.3, 1.5), 3), train_s=m["train_s"], pull_s=round(rng.uniform(0.05, 0.3), 3),
        bundle_path=f"bundles/round-{rnd:04d}/client-{client:03d}", metrics_json=json.dumps(m))


def _devices(store: RunStore) -> None:
    for serial, model, soc, ram, budget, profile in PHONES:
        store.record_device(DeviceRow(serial, model, soc, "arm64-v8a", ram, budget, profile))


def write_profl_run(run_dir: Path) -> Path:
    rng = np.random.default_rng(1)
    store = RunStore.create(run_dir, _config("profl", "adb", 6, "fixture-profl"), seed=0)
    store.set_status("running")
    _devices(store)
    t0 = store.run().created_at
    stages = [("grow-1", 1, 2, 180.0), ("grow-2", 3, 4, 310.0), ("grow-3", 5, 6, 520.0)]
    accs = [0.21, 0.29, 0.34, 0.41, 0.45, 0.52]
    ems = [0.081, 0.012, 0.064, 0.009, 0.051, 0.007]
    t = t0 + 30.0
    for sid, first, last, predicted in stages:
        store.record_stage(StageRow(sid, "grow", int(sid[-1]), first, last, last))
        for rnd in range(first, last + 1):
            eligible = [c for c in range(4) if PHONES[c][4] >= predicted]
            jobs = []
            for c in eligible:
                if rnd == 3 and c == 2:
                    jobs.append(_job(rng, rnd, c, sid, predicted, status="oom_killed",
                                     reason="peak RSS 384 MB over the 380 MB budget (low-memory kill)"))
                elif rnd == 5 and c == 0:
                    jobs.append(_job(rng, rnd, c, sid, predicted, status="straggler",
                                     reason="missed the round deadline of 600 s"))
                else:
                    jobs.append(_job(rng, rnd, c, sid, predicted))
            for j in jobs:
                store.record_device_job(j)
            ok = sum(1 for j in jobs if j.status == "ok")
            wall = max((j.push_s or 0) + (j.train_s or 0) + (j.pull_s or 0) + 1.05 for j in jobs) + 2.4
            store.record_round(RoundRow(rnd, sid, t, t + wall, len(jobs), ok, len(jobs) - ok, accs[rnd - 1],
                                        2.1 - 0.1 * rnd, ems[rnd - 1], f"block {sid[-1]}"))
            t += wall + 1.0
    store.log_event("result_excluded", "round 3 client 2: oom_killed", level="warning", data={"round": 3})
    store.set_status("finished")
    store.close()
    return run_dir


def write_exclusivefl_run(run_dir: Path) -> Path:
    rng = np.random.default_rng(2)
    store = RunStore.create(run_dir, _config("exclusivefl", "simulated", 4, "fixture-exclusivefl"), seed=0)
    store.set_status("running")
    t = store.run().created_at + 20.0
    predicted = 650.0  # the full model: fits only the 700 and 900 MB phones
    store.record_stage(StageRow("full", "full", None, 1, 4, None))
    for rnd in range(1, 5):
        jobs = [_job(rng, rnd, c, "full", predicted, source="modelled", measured_memory=False) for c in (0, 1)]
        for j in jobs:
            store.record_device_job(j)
        wall = max(j.train_s or 0 for j in jobs) + 3.0
        store.record_round(RoundRow(rnd, "full", t, t + wall, 2, 2, 0, 0.18 + 0.06 * rnd, 2.0, None, "full model"))
        t += wall + 1.0
    store.set_status("finished")
    store.close()
    (run_dir / "settings.json").write_text(json.dumps({"budgets_mb": [p[4] for p in PHONES], "num_clients": 4,
                                                       "profiles": [p[5] for p in PHONES]}))
    return run_dir


def write_in_progress_run(run_dir: Path) -> Path:
    rng = np.random.default_rng(3)
    store = RunStore.create(run_dir, _config("profl", "adb", 5, "fixture-in-progress"), seed=0)
    store.set_status("running")
    _devices(store)
    t = store.run().created_at + 25.0
    store.record_stage(StageRow("grow-1", "grow", 1, 1, 3, None))
    for rnd in (1, 2):
        jobs = [_job(rng, rnd, c, "grow-1", 180.0) for c in range(4)]
        for j in jobs:
            store.record_device_job(j)
        store.record_round(RoundRow(rnd, "grow-1", t, t + 40.0, 4, 4, 0, 0.2 + 0.05 * rnd, 2.0, 0.05, "block 1"))
        t += 41.0
    # round 3 has started: one job back, no end time, not evaluated yet
    store.record_device_job(_job(rng, 3, 1, "grow-1", 180.0))
    store.record_round(RoundRow(3, "grow-1", t, None, 4, None, None, None, None, None, "block 1"))
    store.close()  # no set_status("finished"): still running
    return run_dir
