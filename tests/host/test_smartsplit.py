"""SmartSplit on the host: the cut rule, the round loop on the simulated testbed, a phone dropping mid-batch."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from fedblocks.device_runtime import framing
from fedblocks.host.errors import HostError
from fedblocks.host.loop import RunSettings, run_experiment
from fedblocks.host.split.central import CentralManager, CutCost

TINY = dict(model="resnet8", dataset="cifar10", dataset_fallback="fashion_mnist", limit_train=240, limit_test=64,
            num_clients=2, batch_size=16, max_steps=2, lr=0.05, momentum=0.9, weight_decay=5e-4, seed=3,
            partition="dirichlet", alpha=0.5, rounds=1, fraction=1.0)
MB = 2**20


def _cuts() -> list[CutCost]:
    # forward order; shallow cuts send the largest activations (as in CNNs)
    return [CutCost("a", 10, 8, 8 * MB, 1), CutCost("b", 30, 15, 8 * MB, 10), CutCost("c", 60, 25, 2 * MB, 50),
            CutCost("d", 90, 40, 1 * MB, 80)]


def test_cut_rule_deepest_fit_with_transfer_penalty_recompute_and_caps() -> None:
    m = CentralManager(_cuts(), transfer_penalty=0.5, allow_recompute=False)
    assert m.choose(0, None, 1).cut == "d"
    assert m.choose(0, 65, 1).cut == "c"
    assert m.choose(0, 31, 1).cut == "b"
    assert m.choose(0, 9, 1) is None
    assert m.smallest_footprint_mb() == 10  # what clients_excluded quotes: below it no cut fits
    # transfer as a penalty: a deeper cut that sends 8x more loses once the penalty outweighs depth
    two = [CutCost("a", 10, 8, 1 * MB, 1), CutCost("b", 30, 15, 8 * MB, 10)]
    assert CentralManager(two, transfer_penalty=0.5, allow_recompute=False).choose(0, 31, 1).cut == "b"
    assert CentralManager(two, transfer_penalty=5.0, allow_recompute=False).choose(0, 31, 1).cut == "a"
    rc = CentralManager(_cuts(), allow_recompute=True)
    choice = rc.choose(0, 45, 1)
    assert choice.cut == "d" and choice.recompute_expected and choice.planned_footprint_mb == 40
    assert rc.smallest_footprint_mb() == 8 and rc.choose(0, 8, 1).recompute_expected
    # calibration from a phone's measurement, and a cap after an out-of-memory kill
    assert rc.observe_footprint("d", 60, 40) == 1.5
    assert rc.choose(0, 45, 1).cut == "c"
    assert rc.lower_cap(1, "c") == 1
    assert rc.choose(1, None, 1).cut == "b"
    # the deadline: a slow device is not given a cut it cannot finish in time
    rc.observe_speed(2, 10.0, 1.0)  # 10 FLOP/s
    assert rc.choose(2, None, 10, deadline_s=20).cut == "b"  # c and d need > 20 s at that speed
    state = rc.state_dict()
    again = CentralManager(_cuts())
    again.load_state_dict(json.loads(json.dumps(state)))
    assert again.state_dict() == state


def test_split_round_aggregates_to_the_same_model_as_fedavg(tmp_path: Path) -> None:
    """Each phone trains its front, the server its back; together that is full-model training, so
    SmartSplit (two phones, two different cuts) lands on FedAvg's weights."""
    split = run_experiment(RunSettings(**TINY, strategy="smartsplit", budgets_mb=(6.0, 40.0)), tmp_path / "split")
    run_experiment(RunSettings(**TINY, strategy="fedavg"), tmp_path / "fedavg")
    db = sqlite3.connect(tmp_path / "split" / "run.sqlite")
    rows = db.execute("SELECT client, stage_id, status, cut, bytes_up, bytes_down FROM device_jobs ORDER BY client"
                      ).fetchall()
    cuts = [r[3] for r in rows]
    assert [r[2] for r in rows] == ["ok", "ok"] and cuts[0] != cuts[1]
    assert all(r[1] == f"split_front-{r[3]}" and r[4] > 0 and r[5] > 0 for r in rows)
    events = {k: m for k, m in db.execute("SELECT kind, message FROM events")}
    assert "split_cuts" in events and "client 0 complete" in events["edge_sessions"]
    with np.load(tmp_path / "split" / "final_weights.npz") as a, np.load(tmp_path / "fedavg" / "final_weights.npz") as b:
        assert set(a.files) == set(b.files)
        trained = [n for n in a.files if n.startswith(("blocks.", "head."))]
        for name in trained:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert split.stages_used == sorted(split.stages_used, key=lambda s: cuts.index(s.split("-", 1)[1]))


def test_a_phone_dropping_mid_batch_leaves_the_server_consistent(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Client 0's link dies after it sent step 1's activation, before its labels: its partial round
    is discarded on both sides, and the round ends on exactly the model client 1 alone gives."""
    real_send = framing.FrameSocket.send_array
    dropped = threading.Event()

    def send_array(self: framing.FrameSocket, kind: int, step: int, array: np.ndarray) -> None:
        hello_job = getattr(self, "_job", "")
        if kind == framing.MSG_LABELS and step == 1 and "-c0-" in hello_job and not dropped.is_set():
            dropped.set()
            self.sock.close()  # the phone is gone, mid-batch
            raise framing.PeerClosed("link lost")
        real_send(self, kind, step, array)

    real_json = framing.FrameSocket.send_json

    def send_json(self: framing.FrameSocket, kind: int, step: int, meta: dict) -> None:
        if kind == framing.MSG_HELLO:
            self._job = meta["job_id"]  # type: ignore[attr-defined]
        real_json(self, kind, step, meta)

    monkeypatch.setattr(framing.FrameSocket, "send_array", send_array)
    monkeypatch.setattr(framing.FrameSocket, "send_json", send_json)
    both = run_experiment(RunSettings(**TINY, strategy="smartsplit", budgets_mb=(40.0, 40.0)), tmp_path / "drop")
    assert dropped.is_set() and both.rejected_results == 1
    db = sqlite3.connect(tmp_path / "drop" / "run.sqlite")
    status = dict(db.execute("SELECT client, status FROM device_jobs").fetchall())
    assert status == {0: "failed", 1: "ok"}
    sessions = json.loads(db.execute("SELECT data_json FROM events WHERE kind = 'edge_sessions'").fetchone()[0])
    s0, s1 = sessions["sessions"]["0"], sessions["sessions"]["1"]
    assert s0["status"] == "aborted" and s0["steps"] == 1 and s1["status"] == "complete"
    monkeypatch.undo()
    # client 0 excluded by its budget instead: the same round for client 1, nothing of client 0
    alone = run_experiment(RunSettings(**TINY, strategy="smartsplit", budgets_mb=(0.5, 40.0)), tmp_path / "alone")
    assert alone.participating_clients == 1
    with np.load(tmp_path / "drop" / "final_weights.npz") as a, np.load(tmp_path / "alone" / "final_weights.npz") as b:
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_no_cut_fits_anyone_is_a_one_line_config_error(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="shallowest SmartSplit cut"):
        run_experiment(RunSettings(**TINY, strategy="smartsplit", budgets_mb=(0.1, 0.1)), tmp_path / "none")
    with pytest.raises(HostError, match=r"strategy\.cuts"):
        run_experiment(RunSettings(**TINY, strategy="smartsplit", strategy_params={"cuts": ["9"]}), tmp_path / "bad")


def test_torch_conv_auto_gives_native_kernels_to_fronts_that_compute_little() -> None:
    from fedblocks.host.split.session import NATIVE_CONV_MAX_TRAIN_FLOPS, torch_conv_for

    small, big = ({"device": {"train_flops": f}} for f in (0.23e9, 81e9))  # ResNet-18 cuts 1.stem.conv, 3
    assert NATIVE_CONV_MAX_TRAIN_FLOPS == 1e9
    assert (torch_conv_for("auto", small), torch_conv_for("auto", big)) == ("native", "onednn")
    assert (torch_conv_for("onednn", small), torch_conv_for("native", big)) == ("onednn", "native")
