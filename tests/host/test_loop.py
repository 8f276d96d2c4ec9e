"""The round loop on the simulated testbed (real CIFAR-10 subset, real stage programs, tiny sizes)."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fedblocks.host.errors import HostError
from fedblocks.host.loop import Progress, RunSettings, run_experiment

TINY = dict(model="resnet8", dataset="cifar10", dataset_fallback="fashion_mnist", limit_train=240, limit_test=64,
            num_clients=3, batch_size=16, max_steps=2, lr=0.05, momentum=0.9, seed=3,
            partition="dirichlet", alpha=0.5)


class StopAfter(Progress):
    """Interrupts the run right after round `n` was checkpointed (like Ctrl-C between rounds)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def round_finished(self, record) -> None:
        if record.round == self.n:
            raise KeyboardInterrupt


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "final_weights.npz", allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def test_resume_gives_the_same_model_as_an_uninterrupted_run(tmp_path: Path) -> None:
    settings = RunSettings(**TINY, strategy="profl", rounds=4, fraction=0.67, budgets_mb=(15.0, 25.0, 40.0),
                           strategy_params={"shrink_rounds": 1, "em_window": 1, "min_rounds_per_block": 1})
    full = run_experiment(settings, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run_experiment(settings, tmp_path / "split", progress=StopAfter(2))
    state = json.loads((tmp_path / "split" / "checkpoint" / "state.json").read_text())
    assert state["round"] == 2
    with pytest.raises(HostError, match="--resume"):  # a new run may not overwrite it
        run_experiment(settings, tmp_path / "split")
    resumed = run_experiment(settings, tmp_path / "split", resume=True)
    assert resumed.weights_sha256 == full.weights_sha256
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert resumed.final_accuracy == full.final_accuracy
    assert resumed.stages_used == full.stages_used == ["shrink-3", "shrink-2", "grow-1", "grow-2"]
    db = sqlite3.connect(tmp_path / "split" / "run.sqlite")
    assert [r[0] for r in db.execute("SELECT round FROM rounds ORDER BY round")] == [1, 2, 3, 4]
    assert db.execute("SELECT status FROM runs").fetchone()[0] == "finished"
    # a different config cannot resume this run
    other = RunSettings(**{**TINY, "seed": 4}, strategy="profl", rounds=4, budgets_mb=(15.0, 25.0, 40.0))
    with pytest.raises(HostError, match="config differs"):
        run_experiment(other, tmp_path / "split", resume=True)


def test_resume_keeps_the_host_thread_count_the_run_began_with(tmp_path: Path) -> None:
    # torch's thread count sets its float summation order: a resume in a process with another
    # default must train with the count the run started with, or it would end elsewhere
    import torch

    settings = RunSettings(**TINY, strategy="fedavg", rounds=3)
    default = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        full = run_experiment(settings, tmp_path / "full")
        with pytest.raises(KeyboardInterrupt):
            run_experiment(settings, tmp_path / "split", progress=StopAfter(1))
        torch.set_num_threads(1)
        resumed = run_experiment(settings, tmp_path / "split", resume=True)
        assert torch.get_num_threads() == 1  # the run gives the process its own count back
    finally:
        torch.set_num_threads(default)
    assert resumed.weights_sha256 == full.weights_sha256
    db = sqlite3.connect(tmp_path / "split" / "run.sqlite")
    events = [(json.loads(d)["round"], json.loads(d)["threads"], m)
              for m, d in db.execute("SELECT message, data_json FROM events WHERE kind = 'host_threads' ORDER BY id")]
    assert events == [(0, 2, "host torch threads: 2"), (1, 2, "host torch threads: 2 (kept from the run's start)")]
    # given in the settings, the count is part of the experiment: another one is another run
    with pytest.raises(HostError, match="config differs"):
        run_experiment(RunSettings(**TINY, strategy="fedavg", rounds=3, host_threads=1), tmp_path / "split",
                       resume=True)


def test_fedavg_run_records_rounds_jobs_and_summary(tmp_path: Path) -> None:
    settings = RunSettings(**TINY, strategy="fedavg", rounds=2, budgets_mb=(5.0, 5.0, 5.0))
    summary = run_experiment(settings, tmp_path / "run")
    # FedAvg is the unconstrained reference: budgets (far too small here) are not enforced
    assert not summary.respects_budgets
    assert summary.participating_clients == 3 and summary.rounds_completed == 2
    assert summary.final_accuracy is not None and 0.0 <= summary.final_accuracy <= 1.0
    assert summary.energy_sources == ["modelled"] and summary.energy_j > 0
    assert summary.peak_predicted_footprint_mb > 5.0
    db = sqlite3.connect(tmp_path / "run" / "run.sqlite")
    jobs = db.execute("SELECT round, client, status, samples, energy_source FROM device_jobs ORDER BY round, client")
    assert [tuple(r) for r in jobs] == [(r, c, "ok", 32, "modelled") for r in (1, 2) for c in range(3)]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["weights_sha256"] == summary.weights_sha256


def test_cli_config_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedblocks.host.cli import main

    quickstart = Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml"
    bad = tmp_path / "bad.toml"
    bad.write_text(re.sub(r"(?m)^rounds = \d+", "rounds = -3", quickstart.read_text(), count=1))
    assert main(["run", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fedblocks run: error: config: training.rounds: must be an integer >= 1, got -3"]
    typo = tmp_path / "typo.toml"
    typo.write_text(quickstart.read_text().replace('compare_with = ["exclusivefl"]', 'compare_with = ["exclusivfl"]'))
    assert main(["run", str(typo), "--out", str(tmp_path / "r")]) == 2
    assert "unknown strategy 'exclusivfl'" in capsys.readouterr().err
    assert main(["run", str(quickstart), "--out", str(tmp_path / "a"), "--resume", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "r").exists()


def test_budget_exclusions_are_recorded_for_the_report(tmp_path: Path) -> None:
    """ExclusiveFL with one client below the full model's footprint: the loop records whom the
    strategy could not give the stage (event clients_excluded), once, naming client and serial."""
    settings = RunSettings(**TINY, strategy="exclusivefl", rounds=2, budgets_mb=(5.0, 400.0, 400.0))
    summary = run_experiment(settings, tmp_path / "run")
    assert summary.participating_clients == 2
    db = sqlite3.connect(tmp_path / "run" / "run.sqlite")
    events = [json.loads(d) for (d,) in db.execute("SELECT data_json FROM events WHERE kind = 'clients_excluded'")]
    assert len(events) == 1
    assert events[0]["stage"] == "full" and events[0]["clients"] == [0] and events[0]["serials"] == ["sim-000"]
    assert events[0]["footprint_mb"] > 5.0
