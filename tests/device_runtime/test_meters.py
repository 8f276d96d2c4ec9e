"""Energy sources against fake sysfs trees with known current/voltage/counter sequences."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedblocks.device_runtime import meters
from fedblocks.device_runtime.job import PowerProfile, load_job

from .conftest import tiny_job


def battery(root: Path) -> Path:
    d = root / meters.BATTERY_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d


def put(path: Path, value: object) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(f"{value}\n")
    tmp.replace(path)  # atomic, like a sysfs read never sees half a number


def feed(meter: meters.FuelGauge, root: Path, ts: np.ndarray, current: np.ndarray, voltage: np.ndarray) -> None:
    d = battery(root)
    for t, i, v in zip(ts, current, voltage, strict=True):
        put(d / "current_now", round(float(i)))
        put(d / "voltage_now", round(float(v)))
        meter.sample(float(t))


def test_trapezoid_is_exact_for_linear_power() -> None:
    ts = np.array([0.0, 1.0, 3.0])
    p = np.array([1.0, 2.0, 4.0])
    assert meters.integrate_trapezoid(ts, p, 0.0, 3.0) == pytest.approx(1.5 + 6.0)
    # Sub-window: interpolated edges. P(t) = 1 + t on [0, 1]: integral over [0.25, 0.75] = 0.5 + 0.25.
    assert meters.integrate_trapezoid(ts, p, 0.25, 0.75) == pytest.approx(0.75)
    # Outside the samples the nearest value is held.
    assert meters.integrate_trapezoid(ts, p, -1.0, 0.0) == pytest.approx(1.0)


@pytest.mark.parametrize(("scale_i", "scale_v", "sign", "units"), [
    (1e6, 1e6, -1, ("uA", "uV")),  # Linux ABI: uA, negative while discharging
    (1e6, 1e6, +1, ("uA", "uV")),  # Android convention / magnitude-only drivers
    (1e3, 1e3, +1, ("mA", "mV")),  # some Samsung devices report mA
    (1e3, 1e6, -1, ("mA", "uV")),
])
def test_fuel_gauge_sequence_matches_analytic(tmp_path: Path, scale_i: float, scale_v: float, sign: int,
                                              units: tuple[str, str]) -> None:
    # I(t) = 0.4 A + 0.1 A/s * t, V = 4.0 V constant over 3 s at 10 Hz: E = 4 * (0.4*3 + 0.05*9) = 6.6 J.
    ts = np.linspace(0.0, 3.0, 31)
    current = sign * (0.4 + 0.1 * ts) * scale_i
    voltage = np.full_like(ts, 4.0) * scale_v
    meter = meters.FuelGauge(tmp_path)
    assert meters.FuelGauge.available(tmp_path) is False
    feed(meter, tmp_path, ts, current, voltage)
    assert meters.FuelGauge.available(tmp_path)
    result = meter.energy(0.0, 3.0)
    assert result.source == "fuel_gauge" and result.samples == 31
    assert result.joules == pytest.approx(6.6, rel=1e-3)  # rel: integer rounding of the raw mA values
    assert (result.detail["current_unit"], result.detail["voltage_unit"]) == units
    assert result.detail["current_sign"] == ("negative" if sign < 0 else "positive")
    assert result.sample_hz == pytest.approx(10.0)
    # A window inside the samples: integral of 4 * (0.4 + 0.1 t) over [0.55, 2.45].
    a, b = 0.55, 2.45
    assert meter.energy(a, b).joules == pytest.approx(4 * (0.4 * (b - a) + 0.05 * (b * b - a * a)), rel=1e-3)


def test_fuel_gauge_quadratic_power_converges(tmp_path: Path) -> None:
    # I and V both linear -> P quadratic; the trapezoid error at 10 Hz is O(h^2), tiny here.
    ts = np.linspace(0.0, 2.0, 21)
    current = -(0.5 + 0.25 * ts) * 1e6
    voltage = (4.2 - 0.1 * ts) * 1e6
    meter = meters.FuelGauge(tmp_path)
    feed(meter, tmp_path, ts, current, voltage)
    power = np.polynomial.Polynomial([0.5, 0.25]) * np.polynomial.Polynomial([4.2, -0.1])
    exact = float(power.integ()(2.0) - power.integ()(0.0))
    assert meter.energy(0.0, 2.0).joules == pytest.approx(exact, rel=1e-4)


def test_forced_units_override_the_heuristic(tmp_path: Path) -> None:
    meter = meters.FuelGauge(tmp_path, current_unit="uA", voltage_unit="uV")
    feed(meter, tmp_path, np.array([0.0, 1.0]), np.array([15000.0, 15000.0]), np.array([4e6, 4e6]))
    # 15000 would be read as mA by the heuristic; forced uA gives 15 mA * 4 V * 1 s.
    assert meter.energy(0.0, 1.0).joules == pytest.approx(0.06)
    auto = meters.FuelGauge(tmp_path)
    feed(auto, tmp_path, np.array([0.0, 1.0]), np.array([15000.0, 15000.0]), np.array([4e6, 4e6]))
    assert auto.energy(0.0, 1.0).joules == pytest.approx(60.0)


def test_fuel_gauge_live_sampling_with_a_writer_thread(tmp_path: Path) -> None:
    """A writer thread changes the gauge while the sampler thread polls at 10 Hz."""
    d = battery(tmp_path)
    put(d / "voltage_now", 3_800_000)
    put(d / "current_now", -1_000_000)
    meter = meters.FuelGauge(tmp_path)
    sampler = meters.SysfsSampler(tmp_path, meter, hz=10)
    switched: list[float] = []

    def writer() -> None:
        time.sleep(0.6)
        put(d / "current_now", -2_000_000)  # 1 A -> 2 A
        switched.append(time.monotonic())

    start = time.monotonic()
    sampler.start()
    w = threading.Thread(target=writer)
    w.start()
    time.sleep(1.5)
    w.join()
    sampler.stop()
    end = time.monotonic()
    exact = 3.8 * 1.0 * (switched[0] - start) + 3.8 * 2.0 * (end - switched[0])
    result = meter.energy(start, end)
    # A step between two samples is smeared over one interval: error <= dP * interval = 3.8 W * 0.1 s (+ slack
    # for a loaded machine where the sampler runs late).
    assert result.joules == pytest.approx(exact, abs=3.8 * 0.2)
    assert result.samples >= 8


ODPM_TEMPLATE = "t={t}\nCH0(T={t})[S10M_VDD_TPU], {a}\nCH1(T={t})[VSYS_PWR_DISPLAY], {b}\n"


def write_odpm(root: Path, t_ms: int, dev0: tuple[int, int], dev1: int) -> None:
    d0 = root / "sys/bus/iio/devices/iio:device0"
    d1 = root / "sys/bus/iio/devices/iio:device1"
    d0.mkdir(parents=True, exist_ok=True)
    d1.mkdir(parents=True, exist_ok=True)
    put(d0 / "energy_value", ODPM_TEMPLATE.format(t=t_ms, a=dev0[0], b=dev0[1]).rstrip("\n"))
    put(d1 / "energy_value", f"t={t_ms}\nCH0(T={t_ms})[S4M_VDD_CPUCL0], {dev1}")


def test_parse_odpm() -> None:
    rails = meters.parse_odpm(ODPM_TEMPLATE.format(t=12, a=100, b=2500))
    assert rails == {"S10M_VDD_TPU": 100.0, "VSYS_PWR_DISPLAY": 2500.0}


def test_odpm_counters_sum_over_rails_and_devices(tmp_path: Path) -> None:
    assert not meters.Odpm.available(tmp_path)
    write_odpm(tmp_path, 0, (1_000_000, 5_000_000), 7_000_000)
    assert meters.Odpm.available(tmp_path)
    meter = meters.Odpm(tmp_path)
    # Rails draw 0.5 W, 1 W and 2 W (uWs counters grow by 0.5e6, 1e6, 2e6 per second), 11 samples over 2 s.
    for k in range(11):
        t = k * 0.2
        write_odpm(tmp_path, int(t * 1000), (int(1e6 + 0.5e6 * t), int(5e6 + 1e6 * t)), int(7e6 + 2e6 * t))
        meter.sample(t)
    result = meter.energy(0.0, 2.0)
    assert result.source == "odpm" and result.joules == pytest.approx(3.5 * 2.0)
    assert result.detail["rails_joules"] == pytest.approx(
        {"S10M_VDD_TPU": 1.0, "VSYS_PWR_DISPLAY": 2.0, "S4M_VDD_CPUCL0": 4.0})
    assert meter.energy(0.3, 1.3).joules == pytest.approx(3.5)  # interpolated counters at the window edges


def test_odpm_counter_reset_is_not_negative_energy(tmp_path: Path) -> None:
    meter = meters.Odpm(tmp_path)
    for t, value in ((0.0, 5_000_000), (1.0, 6_000_000), (2.0, 0), (3.0, 1_000_000)):
        write_odpm(tmp_path, int(t * 1000), (value, 0), 0)
        if not meter.files:
            meter = meters.Odpm(tmp_path)
        meter.sample(t)
    assert meter.energy(0.0, 3.0).joules == pytest.approx(2.0)  # 1 J before the reset + 1 J after it


def test_modelled_energy() -> None:
    profile = PowerProfile(name="midrange", cpu_active_mw=1800, idle_mw=300)
    result = meters.modelled_energy(cpu_s=4.0, window_s=2.5, profile=profile)
    assert result.source == "modelled" and result.joules == pytest.approx(4.0 * 1.8 + 2.5 * 0.3)
    assert result.to_dict()["power_profile"]["name"] == "midrange"
    assert meters.modelled_energy(None, 1.0, profile).joules is None


def test_pick_energy_meter_prefers_odpm(tmp_path: Path) -> None:
    assert meters.pick_energy_meter(tmp_path, "auto") is None
    d = battery(tmp_path)
    put(d / "current_now", -500000)
    put(d / "voltage_now", 3900000)
    assert isinstance(meters.pick_energy_meter(tmp_path, "auto"), meters.FuelGauge)
    write_odpm(tmp_path, 0, (1, 1), 1)
    assert isinstance(meters.pick_energy_meter(tmp_path, "auto"), meters.Odpm)
    assert isinstance(meters.pick_energy_meter(tmp_path, "fuel_gauge"), meters.FuelGauge)
    assert meters.pick_energy_meter(tmp_path, "modelled") is None


def test_snapshots(tmp_path: Path) -> None:
    d = battery(tmp_path)
    put(d / "capacity", 87)
    put(d / "temp", 312)  # deci-degrees C
    put(d / "status", "Discharging")
    put(d / "voltage_now", 3_950_000)
    for i, (kind, temp) in enumerate((("cpu-0-0", 41500), ("battery", 31200))):
        z = tmp_path / meters.THERMAL_DIR / f"thermal_zone{i}"
        z.mkdir(parents=True)
        put(z / "type", kind)
        put(z / "temp", temp)
    pol = tmp_path / meters.CPUFREQ_DIR / "policy4"
    pol.mkdir(parents=True)
    put(pol / "scaling_cur_freq", 2_400_000)
    put(pol / "scaling_governor", "schedutil")
    assert meters.battery_snapshot(tmp_path) == {"level_pct": 87, "temp_c": 31.2, "status": "Discharging",
                                                 "voltage_v": pytest.approx(3.95)}
    assert meters.thermal_snapshot(tmp_path) == {"cpu-0-0": 41.5, "battery": 31.2}
    snap = meters.cpufreq_snapshot(tmp_path)
    assert snap["policy4"]["cur_khz"] == 2_400_000 and snap["policy4"]["governor"] == "schedutil"
    assert meters.battery_snapshot(tmp_path / "missing")["level_pct"] is None


def test_sysfs_root_job_wins_over_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = tiny_job(tmp_path)
    monkeypatch.setenv("FEDBLOCKS_SYSFS_ROOT", "/from/env")
    assert load_job(files.write()).meters.sysfs_root == tmp_path / "nosysfs"
    del files.job["meters"]["sysfs_root"]
    assert load_job(files.write()).meters.sysfs_root == Path("/from/env")
    monkeypatch.delenv("FEDBLOCKS_SYSFS_ROOT")
    assert load_job(files.write()).meters.sysfs_root == Path("/")
