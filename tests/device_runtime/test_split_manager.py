"""The on-device recompute manager's decisions (pure logic; the split job test runs it for real)."""

from __future__ import annotations

from fedblocks.device_runtime.split_config import LadderRung
from fedblocks.device_runtime.split_manager import RecomputeManager

MB = 2**20
LADDER = (LadderRung(("a",), 80 * MB), LadderRung(("b",), 60 * MB), LadderRung(("c", "d"), 50 * MB))


def _manager(budget_mb: float | None, mode: str = "footprint", supported: bool = True,
             baseline_mb: float = 0) -> RecomputeManager:
    return RecomputeManager(ladder=LADDER, predicted_footprint_bytes=100 * MB,
                            budget_bytes=None if budget_mb is None else int(budget_mb * MB),
                            budget_applies_to=mode, approach_fraction=0.85, supported=supported,
                            baseline_bytes=int(baseline_mb * MB))


def test_prediction_picks_the_first_rung_that_fits() -> None:
    m = _manager(80)  # limit 68 MB: 100 and 80 do not fit, 60 does
    assert m.initial() and m.units == ("a", "b")
    assert m.events == [{"step": 0, "reason": "predicted", "measured_footprint_bytes": None,
                         "budget_bytes": 80 * MB, "budget_applies_to": "footprint", "scale": 1.0,
                         "predicted_bytes": 60 * MB, "units": ["a", "b"], "applied": True}]
    roomy = _manager(200)
    assert not roomy.initial() and roomy.units == () and roomy.events == []
    assert not _manager(None).initial()


def test_nothing_fits_climbs_to_the_top() -> None:
    m = _manager(10)
    assert m.initial() and m.units == ("a", "b", "c", "d")


def test_process_budget_counts_the_baseline() -> None:
    m = _manager(300, mode="process", baseline_mb=180)  # limit 255 - 180 = 75 MB of training memory
    assert m.initial() and m.units == ("a", "b")


def test_measurement_rescales_the_predictions() -> None:
    m = _manager(200)
    assert not m.initial()
    assert not m.after_step(0, 150 * MB)  # 150 <= 170: fine
    # measured 230 MB where 100 were predicted: x2.3, so rung a (80 -> 184) does not fit 170, rung b (138) does
    assert m.after_step(1, 230 * MB) and m.units == ("a", "b")
    e = m.events[-1]
    assert e["reason"] == "measured" and e["step"] == 2 and e["scale"] == 2.3 and e["measured_footprint_bytes"] == 230 * MB
    assert not m.after_step(2, 100 * MB)


def test_unsupported_engine_records_decisions_not_applied() -> None:
    m = _manager(80, supported=False)
    assert m.initial() and m.events[0]["applied"] is False
    assert m.summary()["supported"] is False
