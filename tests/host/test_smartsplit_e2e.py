"""End to end: `fedblocks run` with strategy = "smartsplit" on virtual phones (the device runtime's split
job over loopback TCP to the edge server), then `fedblocks report` on that run directory."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fedblocks.host.cli import main

from .test_report import fnum, parse
from .test_report_real_run import _free_port_block

CONFIG = """
name = "smartsplit-e2e"
[model]
name = "resnet8"
[dataset]
name = "cifar10"
fallback = "fashion_mnist"
limit_train = 128
limit_test = 64
[partition]
scheme = "iid"
samples_per_client = 48
[clients]
count = 2
testbed = "TESTBED"
budget_mb = [300.0, 400.0]
engine = "torch"
BASE_PORT
[strategy]
name = "smartsplit"
cuts = ["1.stem", "2"]
torch_conv = "onednn"  # the simulated testbed runs fronts on the host's kernels (oneDNN): same rounding
[training]
rounds = 1
fraction = 1.0
local_epochs = 1
batch_size = 16
max_steps = 2
seed = 0
deadline_s = 300
[training.optimizer]
lr = 0.05
momentum = 0.9
weight_decay = 5e-4
[evaluation]
every = 1
"""


def _run(tmp_path: Path, testbed: str, capsys: pytest.CaptureFixture[str]) -> Path:
    cfg = tmp_path / f"{testbed}.toml"
    port = f"base_port = {_free_port_block(2)}" if testbed == "virtual" else ""
    cfg.write_text(CONFIG.replace("TESTBED", testbed).replace("BASE_PORT", port))
    run_dir = tmp_path / testbed
    assert main(["run", str(cfg), "--out", str(run_dir), "--json"]) == 0
    capsys.readouterr()
    return run_dir


def test_fedblocks_run_smartsplit_on_virtual_phones_then_report(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run(tmp_path, "virtual", capsys)
    with sqlite3.connect(f"file:{run_dir / 'run.sqlite'}?mode=ro", uri=True) as conn:
        jobs = conn.execute("SELECT serial, status, cut, bytes_up, bytes_down, footprint_mb, metrics_json "
                            "FROM device_jobs ORDER BY client").fetchall()
        sessions = json.loads(conn.execute("SELECT data_json FROM events WHERE kind = 'edge_sessions'"
                                           ).fetchone()[0])["sessions"]
    assert [j[1] for j in jobs] == ["ok", "ok"]
    for serial, _, cut, up, down, footprint, metrics_json in jobs:
        metrics = json.loads(metrics_json)
        split = metrics["split"]
        assert serial.startswith("127.0.0.1:") and cut == "2" and split["cut"] == "2"
        # measured on the phone: its socket counters, its footprint; the server saw the same bytes
        # (each step sends the cut activation: batch 16 x block 2's 32 channels at half the input
        # resolution, 16x16 for CIFAR-10, 14x14 for the Fashion-MNIST fallback, float32)
        shape = split["activation_shape"]
        assert split["steps"] == 2 and shape[:2] == [16, 32] and shape[2] == shape[3] in (14, 16)
        assert up == split["bytes_sent"] > 2 * int(np.prod(shape)) * 4 and down == split["bytes_received"] > 0
        assert footprint is not None and footprint > 0 and split["recompute"]["supported"]
        assert metrics["server"]["status"] == "complete" and metrics["server"]["bytes_from_device"] == up
    assert {s["status"] for s in sessions.values()} == {"complete"}

    out = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--out", str(out), "--csv", str(tmp_path / "csv")]) == 0
    page = parse(out)
    shown = page.rows("split")
    assert [(r["device"], r["cut"], r["status"]) for r in shown] == [(j[0], "2", "ok") for j in jobs]
    for row, job in zip(shown, jobs, strict=True):
        assert fnum(row["up_mb"]) == pytest.approx(job[3] / 2**20, abs=1e-3)
        assert fnum(row["down_mb"]) == pytest.approx(job[4] / 2**20, abs=1e-3)
    assert (tmp_path / "csv" / "split.csv").is_file()

    # the same experiment on the simulated testbed (the phone's loop in-process): the same model
    sim_dir = _run(tmp_path, "simulated", capsys)
    with np.load(run_dir / "final_weights.npz") as a, np.load(sim_dir / "final_weights.npz") as b:
        for name in a.files:
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_virtual_phones_reach_the_edge_server_through_adb_reverse(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """transport = "reverse": the path real phones take (DeviceClient maps a device port with
    AdbDevice.reverse, the phone connects to its own 127.0.0.1, the virtual adbd forwards)."""
    cfg = tmp_path / "reverse.toml"
    cfg.write_text(CONFIG.replace("TESTBED", "virtual").replace("BASE_PORT", f"base_port = {_free_port_block(2)}")
                   .replace('torch_conv = "onednn"', 'torch_conv = "auto"\ntransport = "reverse"'))
    run_dir = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(run_dir), "--json"]) == 0
    capsys.readouterr()
    with sqlite3.connect(f"file:{run_dir / 'run.sqlite'}?mode=ro", uri=True) as conn:
        jobs = conn.execute("SELECT status, metrics_json FROM device_jobs").fetchall()
    assert [s for s, _ in jobs] == ["ok", "ok"]
    for _, metrics_json in jobs:
        metrics = json.loads(metrics_json)
        host, port = metrics["split"]["server"].rsplit(":", 1)
        # the phone talked to a port of its own (the reverse listener), not the edge server's
        edge_port = metrics["server"]["edge_address"].rsplit(":", 1)[1]
        assert host == "127.0.0.1" and port != edge_port and metrics["server"]["status"] == "complete"
        assert metrics["server"]["bytes_from_device"] == metrics["split"]["bytes_sent"]
        assert metrics["split"]["torch_conv"] == "native"  # auto: these ResNet-8 fronts are far below 1 GFLOP
