"""Bad input never crashes the runtime: each case ends as a `failed` bundle with a precise reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedblocks.device_runtime.job import JobError, load_job
from fedblocks.device_runtime.runner import EXIT_NO_BUNDLE, EXIT_NOT_OK, run_job

from .conftest import JobFiles, ref, tiny_job


def _run_failed(files: JobFiles) -> str:
    """Run the job in-process; assert a complete failed bundle; return its reason."""
    rc = run_job(files.write())
    assert rc == EXIT_NOT_OK
    status = files.status()
    assert status["format"] == "fedblocks.result" and status["status"] == "failed"
    assert sorted(p.name for p in files.bundle.iterdir() if p.name != "runtime.log") == ["metrics.json", "status.json"]
    metrics = files.metrics()
    assert metrics["format"] == "fedblocks.metrics" and metrics["steps"] == 0
    assert not list(files.dir.glob(".result.tmp-*")), "staging directory left behind"
    return status["reason"]


def test_valid_tiny_job_parses(tmp_path: Path) -> None:
    files = tiny_job(tmp_path)
    job = load_job(files.write())
    assert job.stage.batch_size == 4 and job.training.optimizer.momentum == 0.9
    assert job.data.path == tmp_path / "shard.npz" and job.output_dir == tmp_path / "result"
    job.verify_files()


@pytest.mark.parametrize(("mutate", "needle"), [
    (lambda j: j.pop("engine"), "engine: missing field"),
    (lambda j: j.update(engine="tflite"), "engine: 'tflite' is not one of"),
    (lambda j: j.update(format="fedblocks.manifest"), "format: expected 'fedblocks.job'"),
    (lambda j: j.update(version=7), "version: job version 7 is newer"),
    (lambda j: j.update(job_id=5), "job_id: expected str, got int"),
    (lambda j: j.update(job_id="a b/c"), "job_id: 'a b/c' must be"),
    (lambda j: j["training"].update(batch_size="32"), "training.batch_size: expected int"),
    (lambda j: j["training"].update(batch_size=8), "training.batch_size: 8 does not match the stage's batch size 4"),
    (lambda j: j["training"].update(epochs=0), "training.epochs: expected a positive integer"),
    (lambda j: j["training"].update(epochs=None, max_steps=None), "set 'epochs' or 'max_steps'"),
    (lambda j: j["training"]["optimizer"].update(lr=-1), "training.optimizer.lr"),
    (lambda j: j["training"]["optimizer"].update(name="adam"), "training.optimizer.name"),
    (lambda j: j["training"].update(threads=0), "training.threads"),
    (lambda j: j["training"].update(augment="mixup"), "training.augment: expected one of none, crop-flip"),
    (lambda j: j["training"].update(augment="crop-flip"), "training.augment: 'crop-flip' cannot apply to stage"),
    (lambda j: j["meters"].update(memory_hz=5), "meters.memory_hz"),
    (lambda j: j["meters"].update(energy_hz=50), "meters.energy_hz"),
    (lambda j: j["meters"].update(energy_source="monsoon"), "meters.energy_source"),
    (lambda j: j["meters"].update(power_profile={"cpu_active_mw": "lots"}), "meters.power_profile.cpu_active_mw"),
    (lambda j: j.update(budget_mb=-3), "budget_mb"),
    (lambda j: j.update(budget_applies_to="heap"), "budget_applies_to"),
    (lambda j: j.update(timeout_s=0), "timeout_s"),
    (lambda j: j["data"].pop("sha256"), "data.sha256: missing field"),
    (lambda j: j["data"].update(sha256="abc"), "data.sha256: expected 64 lowercase hex digits"),
    (lambda j: j.update(artifacts={}), "artifacts: must name at least one artifact"),
    (lambda j: j.update(artifacts={"program": "objects/x.pt2"}), "artifacts.program: expected an object"),
    (lambda j: j["stage"].pop("trainable"), "stage: stage: missing field 'trainable'"),
    (lambda j: j["stage"]["inputs"][0].update(dtype="complex64"), "unsupported dtype 'complex64'"),
    (lambda j: j["stage"]["outputs"][0].update(shape=[4]), "stage.outputs[0]: must be the scalar loss"),
    (lambda j: j["stage"]["inputs"][1].update(shape=[8]), "same leading batch dimension"),
])
def test_malformed_job_names_the_field(tmp_path: Path, mutate: Any, needle: str) -> None:
    files = tiny_job(tmp_path)
    files.job = json.loads(json.dumps(files.job))  # the stage dict is shared: mutate a copy
    mutate(files.job)
    with pytest.raises(JobError, match=None) as info:
        load_job(files.write())
    assert needle in str(info.value)
    assert needle in _run_failed(files)


def test_bad_json_still_gives_a_failed_bundle(tmp_path: Path) -> None:
    files = tiny_job(tmp_path)
    files.path.write_text('{"format": "fedblocks.job", "version": 1,,}')
    rc = run_job(files.path)
    assert rc == EXIT_NOT_OK
    assert "not valid JSON" in files.status()["reason"] and "line 1" in files.status()["reason"]
    assert files.status()["job_id"] is None


def test_top_level_not_an_object(tmp_path: Path) -> None:
    files = tiny_job(tmp_path)
    files.path.write_text("[1, 2]")
    assert run_job(files.path) == EXIT_NOT_OK
    assert "expected an object at the top level" in files.status()["reason"]


def test_missing_artifact(tmp_path: Path) -> None:
    files = tiny_job(tmp_path)
    (tmp_path / "program.bin").unlink()
    assert "artifacts.program: file not found" in _run_failed(files)


def test_sha256_mismatch(tmp_path: Path) -> None:
    files = tiny_job(tmp_path)
    (tmp_path / "program.bin").write_bytes(b"tampered")
    reason = _run_failed(files)
    assert "artifacts.program: sha256 mismatch" in reason and files.job["artifacts"]["program"]["sha256"] in reason


def test_data_sha256_mismatch(tmp_path: Path) -> None:
    files = tiny_job(tmp_path)
    files.job["data"]["sha256"] = "0" * 64
    assert "data: sha256 mismatch" in _run_failed(files)


def _rewrite_weights(files: JobFiles, tensors: dict[str, np.ndarray]) -> None:
    np.savez(files.dir / "init.npz", **tensors)
    files.job["init_weights"] = ref(files.dir / "init.npz")


GOOD = {"fc.weight": np.zeros((2, 3), np.float32), "fc.bias": np.zeros(2, np.float32)}


@pytest.mark.parametrize(("tensors", "needle"), [
    ({"fc.weight": GOOD["fc.weight"]}, "missing tensor 'fc.bias'"),
    ({**GOOD, "fc.extra": np.zeros(1, np.float32)}, "unexpected tensor 'fc.extra'"),
    ({**GOOD, "fc.bias": np.zeros(3, np.float32)}, "tensor 'fc.bias' has shape [3], expected [2]"),
    ({**GOOD, "fc.bias": np.zeros(2, np.float64)}, "tensor 'fc.bias' has dtype float64, expected float32"),
    ({**GOOD, "fc.weight": np.full((2, 3), np.nan, np.float32)}, "tensor 'fc.weight' has non-finite values"),
])
def test_bad_init_weights(tmp_path: Path, tensors: dict[str, np.ndarray], needle: str) -> None:
    files = tiny_job(tmp_path)
    _rewrite_weights(files, tensors)
    assert needle in _run_failed(files)


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    files = tiny_job(tmp_path)
    with open(tmp_path / "init.npz", "wb") as f:  # a pickled object array where an npz belongs
        np.save(f, np.array([{"fc.weight": 1}], dtype=object), allow_pickle=True)
    files.job["init_weights"] = ref(tmp_path / "init.npz")
    assert "not a readable .npz of plain arrays" in _run_failed(files)


@pytest.mark.parametrize(("arrays", "needle"), [
    ({"x": np.zeros((0, 3), np.float32), "y": np.zeros(0, np.int64)}, "shard has 0 samples, fewer than one batch of 4"),
    ({"x": np.zeros((3, 3), np.float32), "y": np.zeros(3, np.int64)}, "shard has 3 samples, fewer than one batch of 4"),
    ({"x": np.zeros((8, 3), np.float32)}, "shard has no array 'y'"),
    ({"x": np.zeros((8, 5), np.float32), "y": np.zeros(8, np.int64)}, "array 'x' has shape [8, 5]; expected [N, 3]"),
    ({"x": np.zeros((8, 3), np.float32), "y": np.zeros(7, np.int64)}, "array 'y' has 7 samples but 'x' has 8"),
    ({"x": np.zeros((8, 3), np.float32), "y": np.zeros(8, np.float32)}, "array 'y' has dtype float32; expected int64"),
])
def test_bad_shard(tmp_path: Path, arrays: dict[str, np.ndarray], needle: str) -> None:
    files = tiny_job(tmp_path)
    np.savez(tmp_path / "shard.npz", **arrays)
    files.job["data"] = ref(tmp_path / "shard.npz")
    assert needle in _run_failed(files)


def test_shard_not_an_npz(tmp_path: Path) -> None:
    files = tiny_job(tmp_path)
    (tmp_path / "shard.npz").write_bytes(b"PK\x03\x04 truncated zip")
    files.job["data"] = ref(tmp_path / "shard.npz")
    assert "data: " in _run_failed(files) and "not a readable .npz" in files.status()["reason"]


def test_unwritable_output_dir_exits_nonzero_with_one_line(tmp_path: Path) -> None:
    files = tiny_job(tmp_path)
    (tmp_path / "a_file").write_text("not a directory")  # unwritable even for root: its "children" cannot exist
    files.job["output_dir"] = "a_file/result"
    proc = subprocess.run([sys.executable, "-m", "fedblocks.device_runtime", "run", str(files.write())],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_NO_BUNDLE
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedblocks-runtime: error: cannot create the result bundle")
    assert proc.stdout == ""


def test_output_dir_that_is_not_a_bundle_is_left_alone(tmp_path: Path) -> None:
    files = tiny_job(tmp_path, output_dir="precious")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("do not delete")
    proc = subprocess.run([sys.executable, "-m", "fedblocks.device_runtime", "run", str(files.write())],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_NO_BUNDLE
    assert "exists and is not a result bundle" in proc.stderr and proc.stderr.count("\n") == 1
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "do not delete"


def test_previous_bundle_is_replaced(tmp_path: Path) -> None:
    files = tiny_job(tmp_path)
    (tmp_path / "program.bin").unlink()
    _run_failed(files)
    first = files.status()["reason"]
    (tmp_path / "program.bin").write_bytes(b"placeholder program")
    files.job["data"]["sha256"] = "1" * 64
    second = _run_failed(files)
    assert first != second and "data: sha256 mismatch" in second
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_corrupt_artifact_with_matching_hash_is_an_engine_error(tmp_path: Path) -> None:
    """The file is what the host sent (sha256 matches) but no engine can load it: failed, reason from the engine."""
    pytest.importorskip("fedblocks.device_runtime.engines.torch")
    files = tiny_job(tmp_path)
    reason = _run_failed(files)
    assert reason.startswith("torch could not load the program")


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_sigterm_kills_the_child_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    """A cancelled job (SIGTERM to the runtime) kills its training child and removes the staging dir."""
    import signal
    import time

    pytest.importorskip("fedblocks.device_runtime.engines.torch")
    files = tiny_job(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "fedblocks.device_runtime", "run", str(files.write())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _processes_mentioning(f"{tmp_path}/.result.tmp-"):
        time.sleep(0.05)  # wait until the training child exists (it then imports torch for a while)
    assert _processes_mentioning(f"{tmp_path}/.result.tmp-"), "training child never started"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    time.sleep(0.2)
    assert _processes_mentioning(f"{tmp_path}/.result.tmp-") == []
    assert not (tmp_path / "result").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
