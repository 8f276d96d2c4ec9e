"""The report of a tiny real run: `fedblocks run` (ProFL, simulated testbed, real CIFAR-10 subset)
then `fedblocks report`; the page's numbers are the store's."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fedblocks.host.cli import main

from .test_report import fnum, parse

CONFIG = """
name = "report-tiny"
[model]
name = "resnet8"
[dataset]
name = "cifar10"
fallback = "fashion_mnist"
limit_train = 384
limit_test = 128
[partition]
scheme = "dirichlet"
alpha = 0.5
samples_per_client = 64
[clients]
count = 3
testbed = "simulated"
budget_mb = [20.0, 45.0]
engine = "torch"
[strategy]
name = "profl"
shrink_rounds = 1
[training]
rounds = 3
fraction = 1.0
local_epochs = 1
batch_size = 32
max_steps = 2
seed = 0
deadline_s = 300
[evaluation]
every = 1
"""


@pytest.mark.slow
def test_report_of_a_tiny_real_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(CONFIG)
    run_dir = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(run_dir), "--json"]) == 0
    capsys.readouterr()
    out = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--out", str(out), "--csv", str(tmp_path / "csv")]) == 0
    page = parse(out)
    for fig in ("fig-accuracy", "fig-memory", "fig-steps", "fig-roundtime", "fig-energy-round"):
        assert fig in page.svgs, fig
    with sqlite3.connect(f"file:{run_dir / 'run.sqlite'}?mode=ro", uri=True) as conn:
        rounds = conn.execute("SELECT round, stage_id, accuracy FROM rounds ORDER BY round").fetchall()
        modelled = conn.execute("SELECT sum(energy_j) FROM device_jobs WHERE energy_source = 'modelled'").fetchone()[0]
        jobs = conn.execute("SELECT count(*) FROM device_jobs").fetchone()[0]
    assert [(int(r["round"]), r["stage"], fnum(r["accuracy"])) for r in page.rows("rounds")] == rounds
    totals = {r["source"]: r for r in page.rows("energy_totals")}
    assert set(totals) == {"modelled"}  # the simulated testbed measures no energy, and the report says so
    assert fnum(totals["modelled"]["joules"]) == pytest.approx(modelled, abs=1e-5)
    assert sum(int(r["jobs"]) for r in page.rows("devices")) == jobs
    assert "no MEASURED energy" in out.read_text(encoding="utf-8")
