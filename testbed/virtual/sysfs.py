"""Battery fuel gauge and thermal zone of a virtual phone, as sysfs-like files.

Model (updated ~10 Hz from the CPU time the phone's own processes used):
    busy_cores(t) = d(utime+stime of all phone processes)/dt     (host CPU-seconds per second)
    P(t)   = idle_mw + busy_cores * active_mw                     [mW]
    V(soc) = voltage * (0.95 + 0.10 * soc)                        [V]  (3.66..4.04 V at 3.85 V nominal)
    I(t)   = P / V                                                [mA], written NEGATIVE (discharging)
    Q(t+dt) = Q(t) - I * dt                                        [mAh], soc = Q / battery_mah
    T_soc: dT/dt = (ambient + R_th * P/1000 - T) / tau            [degC]
    T_batt: the same with tau * 5 and R_th / 2
Sign convention: Linux power-supply ABI, current_now < 0 while discharging (the phone
never charges). Units as on Android: current uA, voltage uV, charge uAh, battery temp in
deci-degC, thermal zone temp in milli-degC.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .profiles import PhoneProfile


@dataclass
class BatteryState:
    charge_mah: float
    soc_temp_c: float
    battery_temp_c: float

    def to_json(self) -> str:
        return json.dumps({"charge_mah": self.charge_mah, "soc_temp_c": self.soc_temp_c,
                           "battery_temp_c": self.battery_temp_c})


class SysfsModel:
    """Integrates the power model and publishes the files under ``root/sys/class``."""

    WINDOW = 5  # samples averaged into the published current (~0.5 s at 10 Hz)

    def __init__(self, root: Path, profile: PhoneProfile, state_file: Path | None = None) -> None:
        self.profile = profile
        self.battery_dir = root / "sys" / "class" / "power_supply" / "battery"
        self.thermal_dir = root / "sys" / "class" / "thermal" / "thermal_zone0"
        self.state_file = state_file
        self.state = self._load_state()
        self._recent_power: list[float] = []
        self._written: dict[Path, str] = {}
        self._state_saved_at = 0.0
        self.power_mw = profile.idle_mw
        self.busy_cores = 0.0

    def _load_state(self) -> BatteryState:
        p = self.profile
        if self.state_file is not None and self.state_file.exists():
            try:
                data = json.loads(self.state_file.read_text())
                return BatteryState(float(data["charge_mah"]), float(data["soc_temp_c"]),
                                    float(data["battery_temp_c"]))
            except (ValueError, KeyError, OSError):
                pass  # a damaged state file: start from a fresh battery
        return BatteryState(p.battery_mah * p.initial_soc, p.ambient_c, p.ambient_c)

    @property
    def soc(self) -> float:
        return max(0.0, min(1.0, self.state.charge_mah / self.profile.battery_mah))

    @property
    def voltage_v(self) -> float:
        return self.profile.voltage * (0.95 + 0.10 * self.soc)

    @property
    def current_ma(self) -> float:
        """Magnitude of the discharge current, averaged over the last WINDOW samples."""
        power = sum(self._recent_power) / len(self._recent_power) if self._recent_power else self.power_mw
        return power / self.voltage_v

    def step(self, dt_s: float, busy_cores: float) -> None:
        p = self.profile
        self.busy_cores = max(0.0, busy_cores)
        self.power_mw = p.idle_mw + self.busy_cores * p.active_mw
        self._recent_power.append(self.power_mw)
        del self._recent_power[:-self.WINDOW]
        current_ma = self.power_mw / self.voltage_v
        self.state.charge_mah = max(0.0, self.state.charge_mah - current_ma * dt_s / 3600.0)
        power_w = self.power_mw / 1000.0
        target_soc = p.ambient_c + p.thermal_resistance * power_w
        self.state.soc_temp_c += (target_soc - self.state.soc_temp_c) * min(1.0, dt_s / p.thermal_tau_s)
        target_batt = p.ambient_c + p.thermal_resistance / 2 * power_w
        self.state.battery_temp_c += (target_batt - self.state.battery_temp_c) * min(
            1.0, dt_s / (p.thermal_tau_s * 5))

    def publish(self) -> None:
        p = self.profile
        full_uah = int(p.battery_mah * 1000)
        current_ua = -round(self.current_ma * 1000)
        battery = {
            "type": "Battery",
            "present": "1",
            "status": "Discharging" if self.state.charge_mah > 0 else "Not charging",
            "health": "Good",
            "technology": "Li-ion",
            "capacity": str(round(self.soc * 100)),
            "charge_counter": str(int(self.state.charge_mah * 1000)),
            "charge_full": str(full_uah),
            "charge_full_design": str(full_uah),
            "current_now": str(current_ua),
            "current_avg": str(current_ua),
            "voltage_now": str(round(self.voltage_v * 1e6)),
            "voltage_max_design": str(round(p.voltage * 1.05 * 1e6)),
            "temp": str(round(self.state.battery_temp_c * 10)),
        }
        files = {self.battery_dir / name: value + "\n" for name, value in battery.items()}
        files[self.thermal_dir / "type"] = "cpu-thermal\n"
        files[self.thermal_dir / "temp"] = f"{round(self.state.soc_temp_c * 1000)}\n"
        for path, text in files.items():
            if self._written.get(path) != text:   # most values do not change from tick to tick
                _atomic_write(path, text)
                self._written[path] = text
        now = time.monotonic()
        if now - self._state_saved_at > 2.0:
            self._written.clear()   # every 2 s rewrite everything (a command may have deleted a file)
            self._state_saved_at = now
            if self.state_file is not None:
                _atomic_write(self.state_file, self.state.to_json())


def _atomic_write(path: Path, text: str) -> None:
    """Readers never see a half-written value (write a sibling, then rename over)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
