"""Bad client results are validated away, recorded with their reason, and the run goes on."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from fedblocks.device_runtime.spec import StageSpec
from fedblocks.host.clients.base import ClientExecutor, JobOutcome, JobRequest
from fedblocks.host.loop import RunSettings, run_experiment
from fedblocks.host.validate import BundleRejected, sha256_file, validate_bundle

TINY = dict(model="resnet8", dataset="cifar10", dataset_fallback="fashion_mnist", limit_train=240, limit_test=64,
            num_clients=4, batch_size=16, max_steps=2, lr=0.05, seed=1)


def _rewrite(bundle: Path, change) -> None:
    with np.load(bundle / "weights.npz", allow_pickle=False) as npz:
        tensors = {k: npz[k] for k in npz.files}
    change(tensors)
    with open(bundle / "weights.npz", "wb") as fh:
        np.savez(fh, **tensors)


class Faulty(ClientExecutor):
    """Runs the real simulated client, then damages what it returns (a misbehaving phone)."""

    def __init__(self, inner: ClientExecutor, fault: str) -> None:
        super().__init__(inner.client_id, inner.budget_mb, inner.label)
        self.inner, self.fault = inner, fault

    def run(self, request: JobRequest, cancel: threading.Event) -> JobOutcome:
        if self.fault == "crash":
            raise ConnectionResetError("device vanished mid-job")
        out = self.inner.run(request, cancel)
        first = request.stage.trainable[0]
        if self.fault == "nan":
            _rewrite(out.bundle_dir, lambda t: t[first.name].flat.__setitem__(0, np.nan))
        elif self.fault == "shape":
            _rewrite(out.bundle_dir, lambda t: t.__setitem__(first.name, np.zeros((2, 2), np.float32)))
        return out


FAULTS = {0: "nan", 1: "shape", 2: "crash"}


def test_bad_results_are_excluded_recorded_and_the_run_continues(tmp_path: Path) -> None:
    settings = RunSettings(**TINY, strategy="fedavg", rounds=2)
    summary = run_experiment(settings, tmp_path / "run",
                             wrap_executor=lambda ex: Faulty(ex, FAULTS[ex.client_id]) if ex.client_id in FAULTS else ex)
    assert summary.rounds_completed == 2 and summary.participating_clients == 1
    assert summary.rejected_results == 6
    db = sqlite3.connect(tmp_path / "run" / "run.sqlite")
    rows = {(r, c): (s, why) for r, c, s, why in db.execute("SELECT round, client, status, reason FROM device_jobs")}
    assert rows[(1, 0)][0] == "rejected" and "NaN" in rows[(1, 0)][1]
    assert rows[(1, 1)][0] == "rejected" and "shape" in rows[(1, 1)][1]
    assert rows[(1, 2)][0] == "failed" and "vanished" in rows[(1, 2)][1]
    assert rows[(1, 3)][0] == "ok"
    excluded = [json.loads(d)["client"] for (d,) in db.execute("SELECT data_json FROM events WHERE kind='result_excluded'")]
    assert sorted(excluded) == [0, 0, 1, 1, 2, 2]
    # the new global tensors are exactly the one good client's result
    with np.load(tmp_path / "run" / "bundles" / "round-0002" / "client-003" / "weights.npz") as good, \
            np.load(tmp_path / "run" / "final_weights.npz") as final:
        for name in good.files:
            np.testing.assert_array_equal(final[name], good[name])


def _stage() -> StageSpec:
    return StageSpec.from_dict({
        "id": "grow-1", "kind": "grow",
        "inputs": [{"name": "x", "shape": [4, 2], "dtype": "float32"}, {"name": "y", "shape": [4], "dtype": "int64"}],
        "outputs": [{"name": "loss", "shape": [], "dtype": "float32"},
                    {"name": "bn.running_mean:batch", "shape": [3], "dtype": "float32"}],
        "trainable": [{"name": "w", "shape": [3, 2], "dtype": "float32"}],
        "state": [{"name": "bn.running_mean", "shape": [3], "dtype": "float32", "source": "bn.running_mean:batch",
                   "momentum": 0.1}]})


def _bundle(path: Path, status: str = "ok", tensors: dict | None = None, **extra_status) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"w": np.ones((3, 2), np.float32), "bn.running_mean": np.zeros(3, np.float32)} if tensors is None else tensors
    with open(path / "weights.npz", "wb") as fh:
        np.savez(fh, **tensors)
    (path / "metrics.json").write_text(json.dumps({"samples_seen": 8}))
    (path / "status.json").write_text(json.dumps({"format": "fedblocks.result", "version": 1, "job_id": "j1",
                                                  "status": status, "reason": "", **extra_status}))
    return path


def test_validate_accepts_a_good_bundle_and_checks_the_claimed_hash(tmp_path: Path) -> None:
    b = _bundle(tmp_path / "ok")
    v = validate_bundle(b, _stage(), "j1", expected_samples=8)
    assert v.num_samples == 8 and set(v.tensors) == {"w", "bn.running_mean"}
    assert v.weights_sha256 == sha256_file(b / "weights.npz")
    good = _bundle(tmp_path / "hash", weights_sha256=sha256_file(b / "weights.npz"))
    validate_bundle(good, _stage(), "j1")
    bad = _bundle(tmp_path / "badhash", weights_sha256="0" * 64)
    with pytest.raises(BundleRejected, match="sha256"):
        validate_bundle(bad, _stage(), "j1")


@pytest.mark.parametrize("case, match", [
    ("status", "device reported 'oom_killed'"),
    ("job", "expected 'j1'"),
    ("missing", "lacks 1 tensor"),
    ("extra", "unexpected tensor"),
    ("dtype", "dtype float64"),
    ("inf", "NaN or Inf"),
    ("pickle", "cannot be read safely"),
    ("samples", "claims 8 samples"),
])
def test_validate_rejects_bad_bundles_with_a_reason(tmp_path: Path, case: str, match: str) -> None:
    good = {"w": np.ones((3, 2), np.float32), "bn.running_mean": np.zeros(3, np.float32)}
    b = tmp_path / case
    if case == "status":
        _bundle(b, status="oom_killed")
    elif case == "job":
        _bundle(b)
        s = json.loads((b / "status.json").read_text())
        (b / "status.json").write_text(json.dumps({**s, "job_id": "other"}))
    elif case == "missing":
        _bundle(b, tensors={"w": good["w"]})
    elif case == "extra":
        _bundle(b, tensors={**good, "blocks.9.w": np.zeros(1, np.float32)})
    elif case == "dtype":
        _bundle(b, tensors={**good, "w": good["w"].astype(np.float64)})
    elif case == "inf":
        _bundle(b, tensors={**good, "bn.running_mean": np.array([0, np.inf, 0], np.float32)})
    elif case == "pickle":
        _bundle(b, tensors={**good, "w": np.array([{"evil": 1}], dtype=object)})
    elif case == "samples":
        _bundle(b)
    with pytest.raises(BundleRejected, match=match):
        validate_bundle(b, _stage(), "j1", expected_samples=4 if case == "samples" else None)
