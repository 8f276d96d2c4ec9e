"""The runtime's memory prediction (the manifest's engine figure), in-place SGD, and the bench's ratios."""

from __future__ import annotations

import numpy as np
import pytest

from fedblocks.device_runtime.engines.sgd import NumpySGD
from fedblocks.device_runtime.runner import predicted_footprint
from fedblocks.device_runtime.spec import OptimizerConfig

MEMORY = {"batch_size": 32, "params_bytes": 1000, "grads_bytes": 100, "optimizer_bytes": 0,
          "activations_bytes": 500, "total_bytes": 1600}


def test_prediction_uses_the_engines_own_figure() -> None:
    memory = {**MEMORY, "engines": {"ort": {"method": "ort-allocation-plan", "footprint_bytes": 700,
                                            "momentum_bytes": 100, "total_bytes": 1900, "detail": {}}}}
    assert predicted_footprint(memory, momentum=0.0, engine="ort") == 700
    assert predicted_footprint(memory, momentum=0.9, engine="ort") == 800
    # an engine without its own figure (or an older manifest): grads + optimizer state + activations
    assert predicted_footprint(memory, momentum=0.9, engine="torch") == 100 + 100 + 500
    assert predicted_footprint(MEMORY, momentum=0.0) == 600
    broken = {**MEMORY, "engines": {"ort": {"footprint_bytes": "many"}}}
    assert predicted_footprint(broken, momentum=0.0, engine="ort") == 600


@pytest.mark.parametrize("scratch_floats", [64, 16])  # the whole tensor at once; three chunks (16+16+3)
@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.9, 5e-4), (0.0, 1e-2)])
def test_inplace_sgd_is_bit_identical_to_the_reference(momentum: float, weight_decay: float,
                                                       scratch_floats: int) -> None:
    rng = np.random.default_rng(0)
    config = OptimizerConfig(lr=0.05, momentum=momentum, weight_decay=weight_decay)
    reference, inplace = NumpySGD(config), NumpySGD(config)
    p_ref = rng.standard_normal((7, 5)).astype(np.float32)
    p_in = p_ref.copy()
    scratch = np.empty(scratch_floats, dtype=np.float32)
    for _ in range(4):
        grad = rng.standard_normal((7, 5)).astype(np.float32)
        p_ref = reference.update("w", p_ref, grad)
        inplace.update_inplace("w", p_in, grad.copy(), scratch)
        assert np.array_equal(p_ref, p_in)


def test_inplace_sgd_on_a_strided_view_updates_the_view() -> None:
    config = OptimizerConfig(lr=0.05, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng(1)
    base = rng.standard_normal((6, 8)).astype(np.float32)
    view = base[:, ::2]  # not C-contiguous: no flat chunking, the update must still land in `base`
    expected = NumpySGD(config).update("w", view.copy(), np.ones_like(view))
    NumpySGD(config).update_inplace("w", view, np.ones_like(view), np.empty(view.size, dtype=np.float32))
    assert np.array_equal(base[:, ::2], expected)


def test_bench_reports_each_stage_relative_to_full() -> None:
    from fedblocks.host.bench import StageBenchRow, relative_to_full

    def row(stage: str, footprint: float | None, predicted: float | None) -> StageBenchRow:
        fields = dict.fromkeys(StageBenchRow.__dataclass_fields__)
        fields.update(stage=stage, footprint_mib=footprint, predicted_mib=predicted)
        return StageBenchRow(**fields)  # type: ignore[arg-type]

    rows = relative_to_full([row("grow-1", 50.0, 40.0), row("grow-2", None, 20.0), row("full", 100.0, 80.0)])
    assert [(r.footprint_vs_full, r.predicted_vs_full) for r in rows] == [(0.5, 0.5), (None, 0.25), (1.0, 1.0)]
    alone = relative_to_full([row("grow-1", 50.0, 40.0)])
    assert alone[0].footprint_vs_full is None
