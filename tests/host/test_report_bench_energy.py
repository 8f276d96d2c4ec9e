"""`fedblocks bench energy`: idle-corrected J/sample. The arithmetic and the validation of what a
phone sends back on their own; end to end on a virtual phone (a real adbd on 127.0.0.1)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from fedblocks.host.bench_energy import IdleBaseline, bench_energy, compute_result, parse_idle
from fedblocks.host.cli import main
from fedblocks.host.errors import HostError

BASE = {"serial": "s", "model": "resnet8", "stage": "grow-1", "engine": "torch", "batch_size": 32, "status": "ok",
        "reason": ""}


def _metrics(source: str, joules: float, window: float, samples: int, **energy: Any) -> dict[str, Any]:
    return {"samples_seen": samples, "steps": samples // 32, "step_latency_median_s": 0.1,
            "energy": {"source": source, "joules": joules, "window_s": window, "sample_hz": 9.7, **energy},
            "energy_modelled": {"source": "modelled", "joules": 3.0, "window_s": window},
            "battery": {"start": {"level_pct": 80, "temp_c": 30.5}, "end": {"level_pct": 79, "temp_c": 31.0}}}


def test_idle_output_is_validated() -> None:
    idle = parse_idle('noise\n{"source": "fuel_gauge", "joules": 2.5, "window_s": 5.0, "sample_hz": 9.9, '
                      '"samples": 50}\n', 5.0)
    assert idle.power_w == pytest.approx(0.5) and idle.sample_hz == 9.9 and idle.samples == 50
    for bad in ("no json here", '{"source": "battery_guess", "joules": 1, "window_s": 5}',
                '{"source": "fuel_gauge", "joules": -1, "window_s": 5}',
                '{"source": "fuel_gauge", "joules": 1, "window_s": 5000}', "[1, 2]"):
        with pytest.raises(HostError):
            parse_idle(bad, 5.0)


def test_idle_correction_per_source() -> None:
    idle = IdleBaseline("fuel_gauge", 2.5, 5.0, 9.9, 50)  # 0.5 W idle
    r = compute_result(_metrics("fuel_gauge", 10.0, 4.0, 320), idle, BASE)
    assert r.idle_joules_in_window == pytest.approx(2.0)
    assert r.corrected_joules == pytest.approx(8.0)
    assert r.joules_per_sample == pytest.approx(8.0 / 320)
    assert r.joules_per_sample_uncorrected == pytest.approx(10.0 / 320)
    assert r.modelled_joules_per_sample == pytest.approx(3.0 / 320)  # reported beside, never mixed in
    assert r.source_label == "measured: fuel gauge" and r.sample_hz == 9.7
    # a different source while idle: no correction, and a note says why
    r = compute_result(_metrics("odpm", 10.0, 4.0, 320), idle, BASE)
    assert r.corrected_joules is None and r.joules_per_sample is None
    assert any("not corrected" in n for n in r.notes)
    # modelled: the idle part is the power profile's idle_mw, labelled as modelled
    r = compute_result(_metrics("modelled", 10.0, 4.0, 320, power_profile={"idle_mw": 300}),
                       IdleBaseline("modelled", None, 5.0, None, 0), BASE)
    assert r.idle_joules_in_window == pytest.approx(1.2) and r.source_label == "modelled: power profile"
    assert any("MODELLED" in n for n in r.notes)
    # untrusted numbers: NaN energy from the phone gives no figure, not a crash
    r = compute_result(_metrics("fuel_gauge", float("nan"), 4.0, 320), idle, BASE)
    assert r.train_joules is None and r.joules_per_sample is None


def test_bad_arguments_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--duration", "0"], ["--duration", "5", "--energy-hz", "50"], ["--duration", "5",
                                                                                "--idle-seconds", "-1"]):
        assert main(["bench", "energy", "--serial", "127.0.0.1:1", "--stage", "1", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in range(5555, 5586):
            return port


@pytest.mark.slow
def test_bench_energy_on_a_virtual_phone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    virtual = pytest.importorskip("fedblocks.testbed.virtual")
    from fedblocks.testbed.keys import create_key

    key = create_key(tmp_path / "adbkey")
    monkeypatch.setenv("FEDBLOCKS_ADB_KEY", str(tmp_path / "adbkey"))
    testbed = virtual.VirtualTestbed(1, _free_port(), [virtual.load_profile("midrange")], state_dir=tmp_path / "vp",
                                     authorized_keys=[Path(f"{key.path}.pub")])
    with testbed:
        (serial,) = testbed.serials
        r = bench_energy(serial, "1", "resnet8", "torch", 16, 4.0, 3.0, 10.0, "auto", 10, (3, 32, 32), "python3",
                         tmp_path / "work", show_progress=False)
    assert r.status == "ok", r.reason
    assert r.source == "fuel_gauge"  # the virtual phone's sysfs battery model is a fuel gauge
    assert r.stage == "grow-1" and r.samples and r.samples % 16 == 0
    assert r.sample_hz and r.sample_hz > 2 and r.idle_sample_hz and r.idle_sample_hz > 2
    assert r.train_window_s and r.train_window_s > 1.0
    assert r.idle_power_w is not None and r.idle_power_w > 0
    assert r.train_joules is not None and r.idle_joules_in_window is not None
    assert r.train_joules > r.idle_joules_in_window, "training draws more than idle on the virtual phone"
    assert r.joules_per_sample == pytest.approx((r.train_joules - r.idle_joules_in_window) / r.samples)
    assert any("not a physical measurement" in n for n in r.notes), "a virtual phone's joules are labelled"
    json.dumps(r.__dict__)  # --json output is plain JSON
