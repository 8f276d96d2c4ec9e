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


def _free_port_block(count: int) -> int:
    import socket

    for base in range(17300, 40000, 53):
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


@pytest.mark.slow
def test_report_of_a_tiny_virtual_phone_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two virtual phones (the device runtime really trains, meters really read the phones' sysfs):
    measured memory and fuel-gauge energy in the page equal the store, and the page says the
    virtual phones' joules are not a physical measurement."""
    cfg = tmp_path / "virtual.toml"
    text = CONFIG.replace('count = 3\ntestbed = "simulated"', f'count = 2\ntestbed = "virtual"\nbase_port = '
                                                              f'{_free_port_block(2)}')
    cfg.write_text(text.replace('engine = "torch"', 'engine = "ort"').replace("rounds = 3", "rounds = 2"))
    run_dir = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(run_dir), "--json"]) == 0
    capsys.readouterr()
    out = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    page = parse(out)
    with sqlite3.connect(f"file:{run_dir / 'run.sqlite'}?mode=ro", uri=True) as conn:
        mem = conn.execute("SELECT serial, stage_id, max(footprint_mb) FROM device_jobs "
                           "GROUP BY serial, stage_id").fetchall()
        energy = dict(conn.execute("SELECT energy_source, sum(energy_j) FROM device_jobs "
                                   "GROUP BY energy_source").fetchall())
    shown = {(r["device"], r["stage"]): fnum(r["footprint_mb"]) for r in page.rows("memory")}
    for serial, stage, footprint in mem:
        assert footprint is not None and footprint > 0, "the device runtime measured the footprint"
        assert shown[(serial, stage)] == pytest.approx(footprint, abs=1e-3)
    totals = {r["source"]: fnum(r["joules"]) for r in page.rows("energy_totals")}
    assert "fuel_gauge" in energy and totals["fuel_gauge"] == pytest.approx(energy["fuel_gauge"], abs=1e-5)
    assert "not a physical measurement" in out.read_text(encoding="utf-8")
