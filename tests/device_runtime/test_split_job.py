"""The device runtime's split job against the edge server over loopback TCP (real engines, real runtime)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from fedblocks.device_runtime import framing
from fedblocks.device_runtime.runner import run_job
from fedblocks.device_runtime.spec import OptimizerConfig
from fedblocks.host.split.edge import EdgeServer, session_tensors

from .split_fixtures import (
    BATCH,
    CLASSES,
    LR,
    MOMENTUM,
    WEIGHT_DECAY,
    SplitExport,
    back_program,
    export_split,
    full_reference,
    split_section,
    synthetic_shard,
    write_split_job,
)

STEPS = 3


@pytest.fixture(scope="module")
def exported() -> SplitExport:
    return export_split()


def _session(server: EdgeServer, exported: SplitExport, cut: str, job_id: str, steps: int = STEPS,
             client: int = 0) -> object:
    shape = tuple(exported.manifest.split.cut(cut)["activation"]["shape"])
    return server.open_session(client, job_id, cut, back_program(exported, cut),
                               OptimizerConfig(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY), steps, BATCH,
                               shape, CLASSES)


def _run(tmp_path: Path, exported: SplitExport, cut: str, engine: str, **split_extra: object
         ) -> tuple[dict, dict, dict[str, np.ndarray], object]:
    shard = synthetic_shard()
    with EdgeServer(max_parallel=1, io_timeout_s=60) as server:
        session = _session(server, exported, cut, f"split-{cut}-{engine}")
        job = write_split_job(tmp_path / engine, exported, cut, engine, shard,
                              split_section(exported, cut, server.port, session.token, **split_extra),
                              max_steps=STEPS)
        rc = run_job(job)
    result = job.parent / "result"
    status = json.loads((result / "status.json").read_text())
    metrics = json.loads((result / "metrics.json").read_text())
    weights = {}
    if rc == 0:
        with np.load(result / "weights.npz") as npz:
            weights = {k: npz[k] for k in npz.files}
    return status, metrics, weights, session


# 1.stem.conv: z is a conv output no saved tensor shares, so the torch front frees it once sent;
# 1.stem and 2 end in a ReLU, which saves its output (z) for backward: z is kept. Both
# convolution kernel choices (split.torch_conv) train the same model.
@pytest.mark.parametrize(("cut", "z_freed", "conv"), [("1.stem.conv", True, "onednn"), ("1.stem.conv", True, "native"),
                                                      ("1.stem", False, "onednn"), ("2", False, "native")])
def test_torch_split_job_matches_unsplit_training(tmp_path: Path, exported: SplitExport, cut: str,
                                                  z_freed: bool, conv: str) -> None:
    status, metrics, front, session = _run(tmp_path, exported, cut, "torch", torch_conv=conv)
    assert status["status"] == "ok", status
    assert session.status == "complete" and session.steps_done == STEPS
    reference = full_reference(exported, synthetic_shard(), STEPS)
    trained = {**front, **session_tensors(session)}
    assert set(trained) == set(reference)
    for name, ref in reference.items():
        np.testing.assert_allclose(trained[name], ref, rtol=1e-4, atol=1e-6, err_msg=name)
    split = metrics["split"]
    d = exported.manifest.split.cut(cut)
    up = d["transfer_bytes_per_batch"]["up"] + 2 * framing.overhead_bytes(4)
    assert split["cut"] == cut and split["steps"] == STEPS and split["forward_passes_per_step"] == 1
    assert split["bytes_sent"] >= STEPS * up  # every batch: the activation and the labels, framed
    assert split["bytes_received"] >= STEPS * d["transfer_bytes_per_batch"]["down"]
    assert metrics["loss"] == pytest.approx(session.losses, rel=1e-6)  # the step loss is the server's
    assert split["activations_freed"] == (STEPS if z_freed else 0) and split["torch_conv"] == conv


def test_ort_split_job_trains_the_same_model_within_kernel_rounding(tmp_path: Path, exported: SplitExport) -> None:
    status, metrics, front, session = _run(tmp_path, exported, "2", "ort")
    assert status["status"] == "ok", status
    assert metrics["split"]["forward_passes_per_step"] == 2  # eval-model forward, then the training graph
    reference = full_reference(exported, synthetic_shard(), STEPS)
    trained = {**front, **session_tensors(session)}
    for name, ref in reference.items():
        np.testing.assert_allclose(trained[name], ref, rtol=1e-3, atol=1e-4, err_msg=name)


def test_recompute_gives_the_same_weights(tmp_path: Path, exported: SplitExport) -> None:
    plain = _run(tmp_path / "plain", exported, "2", "torch", recompute="off")
    ckpt = _run(tmp_path / "ckpt", exported, "2", "torch", recompute="all")
    assert plain[0]["status"] == ckpt[0]["status"] == "ok"
    units = ckpt[1]["split"]["recompute"]["final_units"]
    assert units and plain[1]["split"]["recompute"]["final_units"] == []
    for name, value in plain[2].items():
        np.testing.assert_allclose(ckpt[2][name], value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_manager_switches_recompute_on_when_memory_approaches_the_budget(tmp_path: Path,
                                                                        exported: SplitExport) -> None:
    """A 500 MB budget the job never reaches, but an approach threshold of 2 % of it (10 MB):
    the first step's measured footprint passes it, so the on-device manager climbs the ladder."""
    with EdgeServer(max_parallel=1) as server:
        session = _session(server, exported, "2", "split-2-torch")
        job = write_split_job(tmp_path, exported, "2", "torch", synthetic_shard(),
                              split_section(exported, "2", server.port, session.token, approach_fraction=0.02),
                              max_steps=STEPS, budget_mb=500)
        assert run_job(job) == 0
    metrics = json.loads((tmp_path / "result" / "metrics.json").read_text())
    rc = metrics["split"]["recompute"]
    assert rc["policy"] == "auto" and rc["supported"]
    event = rc["events"][0]
    assert event["reason"] == "measured" and event["step"] == 1 and event["applied"]
    assert event["measured_footprint_bytes"] > 0.02 * 500 * 2**20 and event["units"]
    assert rc["final_units"] == event["units"]


def test_server_refusing_the_token_fails_the_job_with_a_reason(tmp_path: Path, exported: SplitExport) -> None:
    with EdgeServer() as server:
        _session(server, exported, "2", "split-2-torch")
        job = write_split_job(tmp_path, exported, "2", "torch", synthetic_shard(),
                              split_section(exported, "2", server.port, "0" * 32))
        assert run_job(job) == 1
    status = json.loads((tmp_path / "result" / "status.json").read_text())
    assert status["status"] == "failed" and "no session for job" in status["reason"]
    assert not (tmp_path / "result" / "weights.npz").exists()


def test_phone_dropping_mid_batch_discards_only_its_partial_round(exported: SplitExport) -> None:
    """One phone vanishes after sending a batch; another phone's session completes untouched."""
    shape = tuple(exported.manifest.split.cut("2")["activation"]["shape"])
    with EdgeServer(max_parallel=2) as server:
        dropper = _session(server, exported, "2", "drop", steps=2, client=1)
        keeper = _session(server, exported, "2", "keep", steps=2, client=2)
        before = {k: v.detach().clone() for k, v in keeper.program.global_state().items()}
        rng = np.random.default_rng(0)

        def phone(session: object, drop: bool) -> None:
            wire = framing.FrameSocket.connect("127.0.0.1", server.port, io_timeout_s=30)
            wire.send_json(framing.MSG_HELLO, 0, {"job_id": session.job_id, "token": session.token, "cut": "2",
                                                  "batch_size": BATCH, "activation_shape": list(shape)})
            wire.recv(framing.MSG_WELCOME)
            for i in range(2):
                wire.send_array(framing.MSG_ACTIVATION, i, rng.standard_normal(shape).astype(np.float32))
                if drop and i == 1:
                    wire.close()  # gone after the activation, before its labels: mid-batch
                    return
                wire.send_array(framing.MSG_LABELS, i, rng.integers(0, CLASSES, BATCH).astype(np.int64))
                wire.recv(framing.MSG_GRADIENT, step=i, shape=shape)
                wire.recv(framing.MSG_LOSS, step=i)
            wire.send_json(framing.MSG_DONE, 2, {"steps": 2})
            wire.recv(framing.MSG_ACK)
            wire.close()

        threads = [threading.Thread(target=phone, args=(dropper, True)),
                   threading.Thread(target=phone, args=(keeper, False))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for _ in range(100):  # the server notices the drop on its next read
            if dropper.status == "aborted":
                break
            threading.Event().wait(0.05)
        assert dropper.status == "aborted" and dropper.program is None and dropper.steps_done == 1
        assert keeper.status == "complete" and keeper.steps_done == 2
        assert set(server.results()) == {2}
        # the survivor's segment trained (changed), from the same starting point as the dropped one
        after = keeper.program.global_state()
        assert any(not np.allclose(before[k].numpy(), after[k].detach().numpy()) for k in before)
        # a token works once: the dropped phone cannot resume its session
        wire = framing.FrameSocket.connect("127.0.0.1", server.port, io_timeout_s=30)
        wire.send_json(framing.MSG_HELLO, 0, {"job_id": "drop", "token": dropper.token, "cut": "2",
                                              "batch_size": BATCH, "activation_shape": list(shape)})
        with pytest.raises(framing.FrameError, match="aborted"):
            wire.recv(framing.MSG_WELCOME)
        wire.close()


@pytest.mark.slow
def test_executorch_split_job_trains_the_same_model_within_kernel_rounding(tmp_path: Path) -> None:
    exported = export_split(("executorch",))
    shard = synthetic_shard()
    with EdgeServer(max_parallel=1, io_timeout_s=600) as server:
        session = _session(server, exported, "2", "split-2-executorch")
        job = write_split_job(tmp_path, exported, "2", "executorch", shard,
                              split_section(exported, "2", server.port, session.token), max_steps=STEPS)
        rc = run_job(job)
    status = json.loads((tmp_path / "result" / "status.json").read_text())
    assert rc == 0, status
    metrics = json.loads((tmp_path / "result" / "metrics.json").read_text())
    assert metrics["split"]["forward_passes_per_step"] == 2 and not metrics["split"]["recompute"]["supported"]
    with np.load(tmp_path / "result" / "weights.npz") as npz:
        trained = {**{k: npz[k] for k in npz.files}, **session_tensors(session)}
    for name, ref in full_reference(exported, shard, STEPS).items():
        np.testing.assert_allclose(trained[name], ref, rtol=1e-3, atol=1e-4, err_msg=name)
