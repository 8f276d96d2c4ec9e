"""SmartSplit at export: cuts, front/back stage programs, gradient parity (eager), cut costs, manifest."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from fedblocks.export.blocks import BlockedModel
from fedblocks.export.errors import ExportError
from fedblocks.export.manifest import Manifest
from fedblocks.export.memory import predict_footprint
from fedblocks.export.models import build_model
from fedblocks.export.pipeline import ExportSpec, export_model
from fedblocks.export.split import describe_cut
from fedblocks.export.stages import cut_gradient_step, make_stage, split_cuts

B = 4


@pytest.fixture(scope="module")
def resnet8() -> BlockedModel:
    torch.manual_seed(0)
    return build_model("resnet8", 10, (3, 16, 16))


def test_cuts_in_forward_order_inside_and_between_blocks(resnet8: BlockedModel) -> None:
    assert split_cuts(resnet8) == ["1.stem.conv", "1.stem.bn", "1.stem", "1", "2"]
    assert split_cuts(resnet8, inner=False) == ["1", "2"]
    with pytest.raises(ExportError, match="no split cut"):
        make_stage(resnet8, "split_front-3")
    with pytest.raises(ExportError, match="no split cut"):
        make_stage(resnet8, "split_back-1.stem.relu")  # after the stem's last child = cut "1.stem"


@pytest.mark.parametrize("cut", ["1.stem.conv", "1.stem", "1", "2"])
def test_front_and_back_partition_the_model_by_global_name(resnet8: BlockedModel, cut: str) -> None:
    front, back = make_stage(resnet8, f"split_front-{cut}"), make_stage(resnet8, f"split_back-{cut}")
    full = set(make_stage(resnet8, "full").state_dict())
    assert not set(front.state_dict()) & set(back.state_dict())
    assert set(front.state_dict()) | set(back.state_dict()) == full
    assert back.input_specs(B)[0].name == "z" and back.input_specs(B)[0].shape == (B, *front.z_shape)
    assert [s.name for s in front.input_specs(B)] == ["x", "g"] and front.output_specs(B)[-1].name == "z"


@pytest.mark.parametrize("cut", ["1.stem.conv", "1.stem.bn", "1", "2"])
def test_split_step_equals_unsplit_step(resnet8: BlockedModel, cut: str) -> None:
    """Front (sum(z*g) trick, backward from the server's g) + back = the full model's step."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(B, 3, 16, 16, generator=gen), torch.randint(0, 10, (B,), generator=gen)
    full = make_stage(resnet8, "full")
    sgd_full = torch.optim.SGD(full.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    out = full(x, y)
    out[0].backward()
    grads_full = {n: p.grad.clone() for n, p in full.named_parameters()}
    sgd_full.step()
    front, back = make_stage(resnet8, f"split_front-{cut}"), make_stage(resnet8, f"split_back-{cut}")
    sgd_front = torch.optim.SGD(front.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sgd_back = torch.optim.SGD(back.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    outputs = front(x, torch.zeros(B, *front.z_shape))
    loss, dz, _ = cut_gradient_step(back, outputs[-1], y, sgd_back)
    # the stage's own loss with the server's g has exactly dL/dz = g
    sgd_front.zero_grad()
    front(x, dz)[0].backward()
    grads = {**{n: p.grad for n, p in front.named_parameters()}, **{n: p.grad for n, p in back.named_parameters()}}
    sgd_front.step()
    assert torch.allclose(loss, out[0].detach(), rtol=1e-6)
    for name, ref in grads_full.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-7, msg=name)
    updated = {**dict(front.named_parameters()), **dict(back.named_parameters())}
    for name, ref in full.named_parameters():
        torch.testing.assert_close(updated[name], ref, rtol=1e-4, atol=1e-7, msg=name)


def test_cut_costs_and_recompute_model(resnet8: BlockedModel) -> None:
    for cut in split_cuts(resnet8):
        d = describe_cut(resnet8, cut, 8)
        front = make_stage(resnet8, f"split_front-{cut}")
        assert d.device_footprint_bytes == predict_footprint(front, 8).total_bytes
        z_bytes = 8 * int(torch.tensor(front.z_shape).prod()) * 4
        assert (d.up_bytes, d.down_bytes) == (z_bytes + 8 * 8, z_bytes)
        assert d.device_footprint_recompute_all_bytes <= d.device_footprint_bytes
        ladder = d.recompute_ladder()
        footprints = [d.device_footprint_bytes] + [fp for _, fp in ladder]
        assert all(a > b for a, b in itertools.pairwise(footprints))  # every rung lowers it
        assert {u for names, _ in ladder for u in names} <= {u.name for u in d.units}
    deep = describe_cut(resnet8, "2", 8)
    assert [u.name for u in deep.units] == ["blocks.0.stem", "blocks.0.0", "blocks.1.0"]
    assert deep.device_footprint_recompute_all_bytes < 0.8 * deep.device_footprint_bytes


def test_export_with_split_section_round_trips(tmp_path: Path) -> None:
    spec = ExportSpec(model="resnet8", num_classes=10, input_shape=(3, 16, 16), batch_size=4, engines=("torch",),
                      stages=("full",), split=True, cuts=("1.stem.conv", "2"))
    manifest = export_model(spec, tmp_path)
    ids = [s.id for s in manifest.stages]
    assert ids == ["full", "split_front-1.stem.conv", "split_back-1.stem.conv", "split_front-2", "split_back-2"]
    assert manifest.stage("split_back-2").artifacts == {}  # the server runs it in torch eager
    assert set(manifest.stage("split_front-2").artifacts) == {"torch"}
    again = Manifest.load(tmp_path / "manifest.json")
    assert again.split is not None and [c["cut"] for c in again.split.cuts] == ["1.stem.conv", "2"]
    cut = again.split.cut("2")
    assert cut["activation"]["shape"] == [4, 32, 8, 8] and cut["device"]["recompute_ladder"]
    # a manifest without a split section (every manifest before SmartSplit) still loads
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw.pop("split")
    raw["stages"] = [s for s in raw["stages"] if not s["id"].startswith("split")]
    assert Manifest.from_dict(raw).split is None
    bad = json.loads((tmp_path / "manifest.json").read_text())
    bad["split"]["cuts"][0]["back_stage"] = "split_back-9"
    with pytest.raises(ExportError, match="split_back-9"):
        Manifest.from_dict(bad)
    with pytest.raises(ExportError, match="no split cut"):
        export_model(ExportSpec(model="resnet8", num_classes=10, input_shape=(3, 16, 16), batch_size=4,
                                engines=("torch",), stages=("full",), split=True, cuts=("7",)), tmp_path)
