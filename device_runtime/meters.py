"""Energy, battery, thermal and CPU-frequency meters over a (configurable) sysfs root.

Energy sources, each result labelled with its source (never mixed silently):
- `odpm`: Pixel on-device power monitor, <root>/sys/bus/iio/devices/iio:device*/energy_value,
  cumulative micro-watt-seconds per rail; energy = counter delta summed over rails.
- `fuel_gauge`: <root>/sys/class/power_supply/battery/{current_now, voltage_now}; power
  P = |I| * V (magnitude: vendors disagree on the sign) integrated with the trapezoid rule.
  Units per measurement: current is uA by the Linux ABI, but some vendors report mA; a
  run whose largest |current_now| is below 20000 is read as mA (20 mA would be an
  implausibly small draw for a phone that is training, 20 A an impossible one).
  Voltage: > 1e5 -> uV, > 100 -> mV, else V. The job can force units instead.
- `modelled`: CPU seconds of the training process x the profile's active power per core,
  plus the profile's idle power x wall time. Not a measurement; labelled `modelled`.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .job import PowerProfile

BATTERY_DIR = "sys/class/power_supply/battery"
THERMAL_DIR = "sys/class/thermal"
CPUFREQ_DIR = "sys/devices/system/cpu/cpufreq"
ODPM_GLOB = "sys/bus/iio/devices/iio:device*/energy_value"
MA_THRESHOLD = 20_000  # max |current_now| below this -> the device reports mA, not uA
_ODPM_LINE = re.compile(r"^CH(\d+)\(T=(\d+)\)\[([^\]]+)\],\s*(\d+)\s*$")


@dataclass
class EnergyResult:
    source: str  # fuel_gauge | odpm | modelled
    joules: float | None
    window_s: float
    sample_hz: float | None = None  # achieved sampling rate (None for modelled)
    samples: int = 0
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "joules": self.joules, "window_s": self.window_s,
                "sample_hz": self.sample_hz, "samples": self.samples, **self.detail}


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _read_number(path: Path) -> float | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return float(text.split()[0])
    except (ValueError, IndexError):
        return None


def integrate_trapezoid(ts: np.ndarray, values: np.ndarray, start: float, end: float) -> float:
    """Integral of the piecewise-linear curve through (ts, values) over [start, end].

    Values outside the sampled range are held constant at the nearest sample.
    """
    if end <= start or len(ts) == 0:
        return 0.0
    inside = (ts > start) & (ts < end)
    grid = np.concatenate(([start], ts[inside], [end]))
    vals = np.interp(grid, ts, values)
    return float(np.sum((vals[1:] + vals[:-1]) * np.diff(grid)) / 2.0)


def _achieved_hz(ts: list[float]) -> float | None:
    if len(ts) < 2 or ts[-1] <= ts[0]:
        return None
    return round((len(ts) - 1) / (ts[-1] - ts[0]), 3)


def current_scale(raw: np.ndarray, unit: str) -> tuple[float, str]:
    """Factor that turns raw current_now values into amperes, and the unit it assumed."""
    if unit == "auto":
        top = float(np.max(np.abs(raw))) if raw.size else 0.0
        unit = "mA" if 0 < top < MA_THRESHOLD else "uA"
    return {"uA": 1e-6, "mA": 1e-3}[unit], unit


def voltage_scale(raw: np.ndarray, unit: str) -> tuple[float, str]:
    if unit == "auto":
        top = float(np.max(np.abs(raw))) if raw.size else 0.0
        unit = "uV" if top > 1e5 else "mV" if top > 100 else "V"
    return {"uV": 1e-6, "mV": 1e-3, "V": 1.0}[unit], unit


class FuelGauge:
    """Samples current_now / voltage_now; energy = trapezoid integral of |I| * V."""

    source = "fuel_gauge"

    def __init__(self, root: Path, current_unit: str = "auto", voltage_unit: str = "auto") -> None:
        self.dir = Path(root) / BATTERY_DIR
        self.current_unit = current_unit
        self.voltage_unit = voltage_unit
        self._ts: list[float] = []
        self._current: list[float] = []
        self._voltage: list[float] = []
        self._lock = threading.Lock()

    @classmethod
    def available(cls, root: Path) -> bool:
        d = Path(root) / BATTERY_DIR
        return _read_number(d / "current_now") is not None and _read_number(d / "voltage_now") is not None

    def sample(self, t: float) -> None:
        current = _read_number(self.dir / "current_now")
        voltage = _read_number(self.dir / "voltage_now")
        if current is None or voltage is None:
            return  # a transient read error: skip this sample rather than invent one
        with self._lock:
            self._ts.append(t)
            self._current.append(current)
            self._voltage.append(voltage)

    def energy(self, start: float, end: float) -> EnergyResult:
        with self._lock:
            ts, i_raw, v_raw = np.array(self._ts), np.array(self._current), np.array(self._voltage)
        in_window = (ts >= start) & (ts <= end)
        i_scale, i_unit = current_scale(i_raw[in_window] if in_window.any() else i_raw, self.current_unit)
        v_scale, v_unit = voltage_scale(v_raw, self.voltage_unit)
        watts = np.abs(i_raw * i_scale) * (v_raw * v_scale)
        joules = integrate_trapezoid(ts, watts, start, end) if ts.size else None
        signs = np.sign(i_raw[in_window]) if in_window.any() else np.sign(i_raw)
        sign = ("negative" if (signs < 0).all() else "positive" if (signs > 0).all() else "mixed") \
            if signs.size else None
        return EnergyResult(
            source=self.source, joules=joules, window_s=end - start,
            sample_hz=_achieved_hz(self._ts), samples=int(in_window.sum()),
            detail={"current_unit": i_unit, "voltage_unit": v_unit, "current_sign": sign,
                    "mean_power_w": (joules / (end - start)) if joules is not None and end > start else None})


def parse_odpm(text: str) -> dict[str, float]:
    """Rail name -> cumulative energy in uWs (= uJ) from one energy_value file."""
    rails: dict[str, float] = {}
    for line in text.splitlines():
        m = _ODPM_LINE.match(line.strip())
        if m:
            rails[m.group(3)] = float(m.group(4))
    return rails


class Odpm:
    """Samples every ODPM device's cumulative per-rail energy counters."""

    source = "odpm"

    def __init__(self, root: Path) -> None:
        self.files = sorted(Path(root).glob(ODPM_GLOB))
        self._ts: list[float] = []
        self._rails: list[dict[str, float]] = []
        self._lock = threading.Lock()

    @classmethod
    def available(cls, root: Path) -> bool:
        return any(parse_odpm(_read_text(p) or "") for p in Path(root).glob(ODPM_GLOB))

    def read(self) -> dict[str, float]:
        rails: dict[str, float] = {}
        for i, path in enumerate(self.files):
            for name, uws in parse_odpm(_read_text(path) or "").items():
                rails[name if name not in rails else f"iio:device{i}:{name}"] = uws
        return rails

    def sample(self, t: float) -> None:
        rails = self.read()
        if rails:
            with self._lock:
                self._ts.append(t)
                self._rails.append(rails)

    def energy(self, start: float, end: float) -> EnergyResult:
        with self._lock:
            ts, snapshots = np.array(self._ts), list(self._rails)
        names = sorted({name for snap in snapshots for name in snap})
        per_rail: dict[str, float] = {}
        for name in names:
            present = [(t, snap[name]) for t, snap in zip(ts, snapshots, strict=True) if name in snap]
            rt = np.array([p[0] for p in present])
            counter = np.array([p[1] for p in present])
            # A counter that goes backwards was reset: accumulate only the forward steps.
            steps = np.maximum(np.diff(counter, prepend=counter[:1]), 0.0)
            cumulative = np.cumsum(steps)
            per_rail[name] = float(np.interp(end, rt, cumulative) - np.interp(start, rt, cumulative)) / 1e6
        joules = sum(per_rail.values()) if per_rail else None
        in_window = int(((ts >= start) & (ts <= end)).sum()) if ts.size else 0
        return EnergyResult(source=self.source, joules=joules, window_s=end - start,
                            sample_hz=_achieved_hz(self._ts), samples=in_window,
                            detail={"rails_joules": per_rail})


def modelled_energy(cpu_s: float | None, window_s: float, profile: PowerProfile) -> EnergyResult:
    joules = None if cpu_s is None else cpu_s * profile.cpu_active_mw / 1000 + window_s * profile.idle_mw / 1000
    return EnergyResult(source="modelled", joules=joules, window_s=window_s,
                        detail={"cpu_s": cpu_s, "power_profile": profile.to_dict()})


def pick_energy_meter(root: Path, preference: str, current_unit: str = "auto",
                      voltage_unit: str = "auto") -> FuelGauge | Odpm | None:
    """The measured source to sample (ODPM first: it sits downstream of the charger), or None -> modelled."""
    if preference in ("auto", "odpm") and Odpm.available(root):
        return Odpm(root)
    if preference in ("auto", "fuel_gauge") and FuelGauge.available(root):
        return FuelGauge(root, current_unit, voltage_unit)
    return None


def battery_snapshot(root: Path) -> dict[str, Any]:
    d = Path(root) / BATTERY_DIR
    level = _read_number(d / "capacity")
    temp = _read_number(d / "temp")
    voltage = _read_number(d / "voltage_now")
    v_v = None if voltage is None else voltage * voltage_scale(np.array([voltage]), "auto")[0]
    return {"level_pct": level, "temp_c": None if temp is None else temp / 10.0,
            "status": _read_text(d / "status"), "voltage_v": v_v}


def thermal_snapshot(root: Path) -> dict[str, float]:
    """Zone type (or zoneN) -> degrees C. Values are millidegrees; a value below 1000 is taken as degrees."""
    zones: dict[str, float] = {}
    for zone in sorted(Path(root).glob(f"{THERMAL_DIR}/thermal_zone*")):
        temp = _read_number(zone / "temp")
        if temp is None:
            continue
        name = _read_text(zone / "type") or zone.name
        if name in zones:
            name = f"{name}:{zone.name}"
        zones[name] = temp / 1000.0 if abs(temp) >= 1000 else temp
    return zones


def cpufreq_snapshot(root: Path) -> dict[str, dict[str, Any]]:
    policies: dict[str, dict[str, Any]] = {}
    for pol in sorted(Path(root).glob(f"{CPUFREQ_DIR}/policy*")):
        cur = _read_number(pol / "scaling_cur_freq")
        if cur is None:
            continue
        policies[pol.name] = {"cur_khz": int(cur), "governor": _read_text(pol / "scaling_governor"),
                              "related_cpus": _read_text(pol / "related_cpus")}
    return policies


class SysfsSampler(threading.Thread):
    """Samples the energy meter (and CPU frequencies) at a fixed rate until stopped."""

    def __init__(self, root: Path, meter: FuelGauge | Odpm | None, hz: float) -> None:
        super().__init__(name="fedblocks-energy", daemon=True)
        self.root = Path(root)
        self.meter = meter
        self.interval = 1.0 / hz
        self._stop_event = threading.Event()
        self.freq_ts: list[float] = []
        self.freq_khz: list[dict[str, int]] = []

    def sample_once(self) -> None:
        t = time.monotonic()
        if self.meter is not None:
            self.meter.sample(t)
        freqs = {name: p["cur_khz"] for name, p in cpufreq_snapshot(self.root).items()}
        if freqs:
            self.freq_ts.append(t)
            self.freq_khz.append(freqs)

    def run(self) -> None:
        next_t = time.monotonic()
        while not self._stop_event.is_set():
            self.sample_once()
            next_t += self.interval
            self._stop_event.wait(max(0.0, next_t - time.monotonic()))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
        self.sample_once()  # a last sample so the window's end is covered

    def mean_freq_khz(self, start: float, end: float) -> dict[str, float]:
        picked = [f for t, f in zip(self.freq_ts, self.freq_khz, strict=True) if start <= t <= end]
        names = sorted({n for f in picked for n in f})
        return {n: round(float(np.mean([f[n] for f in picked if n in f])), 1) for n in names}
