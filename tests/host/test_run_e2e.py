"""End to end on virtual phones over the real ADB path (adbd processes on 127.0.0.1, adb-shell client,
content-addressed pushes, the device runtime zipapp as a detached job, pulled result bundles)."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from fedblocks.host.clients.base import ClientExecutor, JobOutcome, JobRequest
from fedblocks.host.loop import RunSettings, run_experiment

E2E = dict(model="resnet8", dataset="cifar10", dataset_fallback="fashion_mnist", limit_train=128, limit_test=64,
           num_clients=2, batch_size=16, max_steps=1, rounds=2, fraction=1.0, strategy="profl", lr=0.05,
           momentum=0.9, seed=0, deadline_s=300,
           strategy_params={"shrink_rounds": 0, "max_rounds_per_block": 1, "min_rounds_per_block": 1})


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def test_virtual_phones_train_two_stages_and_match_the_simulated_testbed(tmp_path: Path) -> None:
    # crop-and-flip augmentation on: the phones' runtime and the simulated clients draw the same crops
    virtual = run_experiment(RunSettings(**E2E, testbed="virtual", engine="torch", augment="crop-flip"),
                             tmp_path / "virtual")
    assert virtual.stages_used == ["grow-1", "grow-2"]
    assert virtual.participating_clients == 2 and virtual.rejected_results == 0
    # measured on the phones, not modelled
    assert virtual.peak_measured_footprint_mb is not None and virtual.peak_measured_footprint_mb > 0
    db = sqlite3.connect(tmp_path / "virtual" / "run.sqlite")
    rows = db.execute("SELECT round, serial, status, samples, peak_rss_mb FROM device_jobs ORDER BY round, client").fetchall()
    assert [(r, s) for r, _, s, _, _ in rows] == [(1, "ok"), (1, "ok"), (2, "ok"), (2, "ok")]
    assert all(serial.startswith("127.0.0.1:") and samples == 16 and peak > 0 for _, serial, _, samples, peak in rows)
    # the round-time breakdown has the host-side transfers, and the devices table what the phones say of themselves
    transfers = db.execute("SELECT push_s, pull_s FROM device_jobs").fetchall()
    assert all(push > 0 and pull > 0 for push, pull in transfers)
    devices = db.execute("SELECT serial, model, soc, abi, ram_mb, profile FROM devices ORDER BY serial").fetchall()
    assert [d[0] for d in devices] == sorted({serial for _, serial, _, _, _ in rows})
    assert all(model == "Virtual M4" and soc and abi == "arm64-v8a" and ram == 4096 and profile == "midrange"
               for _, model, soc, abi, ram, profile in devices)
    # same seed and data on the simulated testbed: the same aggregated model, up to float rounding
    simulated = run_experiment(RunSettings(**E2E, testbed="simulated", engine="torch", augment="crop-flip"),
                               tmp_path / "simulated")
    a, b = _load(tmp_path / "virtual" / "final_weights.npz"), _load(tmp_path / "simulated" / "final_weights.npz")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-5, err_msg=name)
    assert simulated.final_accuracy == pytest.approx(virtual.final_accuracy, abs=1 / 64)
    bundles = sorted((tmp_path / "virtual" / "bundles").glob("round-*/client-*/metrics.json"))
    assert len(bundles) == 4 and all(json.loads(b.read_text())["augment"] == "crop-flip" for b in bundles)
    # ... and the augmentation is not a no-op: without it the same run ends elsewhere
    run_experiment(RunSettings(**E2E, testbed="simulated", engine="torch"), tmp_path / "plain")
    c = _load(tmp_path / "plain" / "final_weights.npz")
    assert any(not np.allclose(a[name], c[name], rtol=0, atol=1e-4) for name in a)


class KilledMidJob(ClientExecutor):
    """Client 1's phone job in round 2 gets 1,000 epochs and a 2 s deadline: the host kills it
    mid-training (its one step alone would finish within 2 s now that an ORT job starts in 0.1 s)."""

    def __init__(self, inner: ClientExecutor) -> None:
        super().__init__(inner.client_id, inner.budget_mb, inner.label)
        self.inner = inner

    def run(self, request: JobRequest, cancel: threading.Event) -> JobOutcome:
        if request.client_id == 1 and request.round == 2:
            request = dataclasses.replace(request, deadline_s=2.0, epochs=1000, max_steps=None)
        return self.inner.run(request, cancel)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.slow
def test_a_job_killed_on_its_phone_is_excluded_and_the_run_goes_on(tmp_path: Path) -> None:
    settings = RunSettings(**{**E2E, "rounds": 3}, testbed="virtual", engine="ort")
    summary = run_experiment(settings, tmp_path / "run", wrap_executor=KilledMidJob)
    assert summary.rounds_completed == 3 and summary.stragglers == 1
    db = sqlite3.connect(tmp_path / "run" / "run.sqlite")
    status = {(r, c): (s, why) for r, c, s, why in db.execute("SELECT round, client, status, reason FROM device_jobs")}
    assert status[(2, 1)][0] == "straggler" and "deadline" in status[(2, 1)][1]
    assert status[(2, 0)][0] == "ok" and status[(3, 1)][0] == "ok"
    assert db.execute("SELECT completed, failed FROM rounds WHERE round = 2").fetchone() == (1, 1)
