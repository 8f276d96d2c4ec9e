"""`fedblocks export` CLI: every user error is one stderr line, exit code 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedblocks.export import models as zoo
from fedblocks.export.blocks import BlockedModel
from fedblocks.export.output_modules import PoolLinearHead, conv_basic_layer
from fedblocks.host.cli import main

from .conftest import RESNET8_STAGES


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["export", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def base_args(out: Path, **overrides: str) -> list[str]:
    args = {"--model": "resnet8", "--input": "3x32x32", "--batch-size": "4", "--engines": "torch",
            "--out": str(out), "--stages": "grow-1", **overrides}
    return [x for kv in args.items() for x in kv]


def test_unknown_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = run_cli(capsys, *base_args(tmp_path, **{"--model": "resnet9000"}))
    assert_one_line_error(rc, err, "unknown model 'resnet9000'", "resnet18")


@pytest.mark.parametrize("shape", ["axbxc", "3x32x", "3,32,32", "0x32x32", ""])
def test_bad_input_syntax(capsys: pytest.CaptureFixture[str], tmp_path: Path, shape: str) -> None:
    rc, _, err = run_cli(capsys, *base_args(tmp_path, **{"--input": shape}))
    assert_one_line_error(rc, err, "--input", "3x32x32")


def test_input_the_model_cannot_take(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = run_cli(capsys, *base_args(tmp_path, **{"--input": "3x32"}))
    assert_one_line_error(rc, err, "resnet8")


def test_unwritable_out(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc, _, err = run_cli(capsys, *base_args(blocker / "out"))
    assert_one_line_error(rc, err, "cannot create output directory")
    rc, _, err = run_cli(capsys, *base_args(blocker))
    assert_one_line_error(rc, err, "not a directory")


def test_bad_numbers_and_stage(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = run_cli(capsys, *base_args(tmp_path, **{"--batch-size": "many"}))
    assert_one_line_error(rc, err, "--batch-size must be an integer")
    rc, _, err = run_cli(capsys, *base_args(tmp_path, **{"--engines": "tflite"}))
    assert_one_line_error(rc, err, "unknown engine 'tflite'")
    rc, _, err = run_cli(capsys, *base_args(tmp_path, **{"--stages": "grow-9"}))
    assert_one_line_error(rc, err, "grow-9")


def test_engine_not_installed(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                              tmp_path: Path) -> None:
    # A None entry in sys.modules makes `import onnxruntime` raise ImportError, exactly as on a
    # machine without the package (even if another test imported it already).
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    rc, _, err = run_cli(capsys, *base_args(tmp_path, **{"--engines": "torch,ort"}))
    assert_one_line_error(rc, err, "engine 'ort' is not installed", "pip install onnxruntime-training-cpu==1.19.2")
    assert not (tmp_path / "manifest.json").exists()


class FunctionalBNBlock(nn.Module):
    """A block written with F.batch_norm (running stats updated in place): the export rewrite
    only swaps nn.BatchNorm modules, so ExecuTorch meets _native_batch_norm_legit_functional."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        h = F.batch_norm(self.conv(x), self.running_mean, self.running_var, self.weight, self.bias, self.training)
        return F.relu(h)


def functional_bn_net(num_classes: int, input_shape: tuple[int, ...], num_blocks: int | None = None) -> BlockedModel:
    c = input_shape[0]
    return BlockedModel("functional_bn_net", [FunctionalBNBlock(c), FunctionalBNBlock(c)], PoolLinearHead(c, num_classes),
                        num_classes=num_classes, input_shape=input_shape, basic_layer=conv_basic_layer,
                        boundary_rule="test model: one FunctionalBNBlock per block")


def test_model_the_engine_cannot_export(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    monkeypatch.setitem(zoo._BUILDERS, "functional_bn_net", functional_bn_net)
    monkeypatch.setattr(zoo, "MODEL_NAMES", (*zoo.MODEL_NAMES, "functional_bn_net"))
    args = base_args(tmp_path, **{"--model": "functional_bn_net", "--input": "4x8x8", "--engines": "executorch",
                                  "--stages": "grow-1"})
    rc, _, err = run_cli(capsys, *args)
    assert_one_line_error(rc, err, "engine 'executorch' cannot export functional_bn_net stage grow-1",
                          "aten._native_batch_norm_legit_functional")


def test_subprocess_error_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fedblocks.host.cli", "export", "--model", "nope", "--input",
                           "3x32x32", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown model 'nope'" in proc.stderr


def test_warm_export_json(capsys: pytest.CaptureFixture[str], resnet8_export: Path) -> None:
    """Re-running the CLI on the fixture's directory rebuilds nothing and says so in --json."""
    rc, out, err = run_cli(capsys, "--model", "resnet8", "--input", "3x32x32", "--batch-size", "4",
                           "--out", str(resnet8_export), "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert data["built"] == []
    assert data["cached"] == len(RESNET8_STAGES) * 3
    assert [s["id"] for s in data["stages"]] == list(RESNET8_STAGES)
    assert data["seconds"] < 10
    for s in data["stages"]:
        assert s["trainable_params"] > 0 and s["memory_total_bytes"] > 0 and s["flops_train_step"] > 0
        assert set(s["artifact_bytes"]) == {"ort", "executorch", "torch"}
