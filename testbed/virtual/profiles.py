"""Phone profiles: what a virtual phone claims to be and how its resources behave.

Built-ins live as TOML files next to this module (profiles/*.toml); a custom profile
is a TOML file with the same fields. Every validation error names the field.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TestbedError

PROFILE_DIR = Path(__file__).parent / "profiles"
_BANNER_SAFE = re.compile(r"^[A-Za-z0-9 _.+\-()/]+$")  # no ; : = (they break the CNXN banner)


@dataclass(frozen=True)
class PhoneProfile:
    """One phone model. Power figures are per phone; ``active_mw`` is per fully busy core."""

    name: str                     # profile id, also ro.product.name
    model: str                    # ro.product.model
    device: str                   # ro.product.device (codename)
    manufacturer: str             # ro.product.manufacturer
    soc: str                      # ro.soc.model
    abi: str = "arm64-v8a"        # ro.product.cpu.abi
    sdk: int = 33                 # ro.build.version.sdk
    release: str = "13"           # ro.build.version.release
    ram_mb: int = 4096            # MemTotal in the phone's /proc/meminfo
    budget_mb: int = 0            # memory the phone's processes may use before the LMK kills (0 = derived)
    cpu_speed: float = 1.0        # relative to this host's core; < 1 duty-cycles the phone's processes
    cores: int = 8
    idle_mw: float = 300.0        # whole-phone power with nothing running
    active_mw: float = 1200.0     # extra power per busy core
    battery_mah: float = 4000.0
    voltage: float = 3.85         # nominal battery voltage (V)
    initial_soc: float = 0.9      # battery state of charge at boot (0..1]
    thermal_resistance: float = 8.0   # degC per W above ambient (steady state)
    thermal_tau_s: float = 60.0   # first-order thermal time constant of the SoC zone
    ambient_c: float = 25.0

    @property
    def memory_budget_mb(self) -> int:
        """Explicit budget, else what Android leaves an app on such a phone (~45% of RAM)."""
        return self.budget_mb if self.budget_mb > 0 else int(self.ram_mb * 0.45)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PhoneProfile:
        return profile_from_mapping(json.loads(text), source="profile JSON")

    def properties(self) -> dict[str, str]:
        """System properties ``getprop`` answers (Android names)."""
        return {
            "ro.product.name": self.name,
            "ro.product.model": self.model,
            "ro.product.device": self.device,
            "ro.product.manufacturer": self.manufacturer,
            "ro.product.brand": self.manufacturer.lower(),
            "ro.soc.model": self.soc,
            "ro.product.cpu.abi": self.abi,
            "ro.product.cpu.abilist": self.abi,
            "ro.build.version.sdk": str(self.sdk),
            "ro.build.version.release": self.release,
            "ro.build.type": "user",
            "ro.build.characteristics": "virtual",
            "ro.hardware": "fedblocks-virtual",
            "ro.kernel.qemu": "0",
            "ro.serialno": "",  # filled in per phone
            "ro.fedblocks.virtual": "1",
            "ro.fedblocks.ram_mb": str(self.ram_mb),
            "ro.fedblocks.memory_budget_mb": str(self.memory_budget_mb),
            "ro.fedblocks.cpu_speed": f"{self.cpu_speed:g}",
            "sys.boot_completed": "1",
            "persist.sys.timezone": "UTC",
        }


_FIELDS = {f.name: f for f in dataclasses.fields(PhoneProfile)}
_REQUIRED = [f.name for f in dataclasses.fields(PhoneProfile)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def profile_from_mapping(data: dict[str, Any], source: str) -> PhoneProfile:
    """Validate a parsed TOML table into a profile; errors name ``source`` and the field."""
    if not isinstance(data, dict):
        raise TestbedError(f"{source}: expected a table of profile fields")
    table = data.get("profile", data)
    unknown = sorted(set(table) - set(_FIELDS))
    if unknown:
        raise TestbedError(f"{source}: unknown field {unknown[0]!r} (known: {', '.join(_FIELDS)})")
    missing = [name for name in _REQUIRED if name not in table]
    if missing:
        raise TestbedError(f"{source}: missing required field {missing[0]!r}")
    values: dict[str, Any] = {}
    for name, value in table.items():
        kind = _FIELDS[name].type
        if kind == "str":
            if not isinstance(value, str) or not value:
                raise TestbedError(f"{source}: field {name!r} must be a non-empty string")
            if not _BANNER_SAFE.match(value):
                raise TestbedError(f"{source}: field {name!r}={value!r} may use only letters, digits, "
                                   "space and _ . + - ( ) /")
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise TestbedError(f"{source}: field {name!r} must be an integer, got {value!r}")
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TestbedError(f"{source}: field {name!r} must be a number, got {value!r}")
            value = float(value)
        values[name] = value
    profile = PhoneProfile(**values)
    _check_ranges(profile, source)
    return profile


def _check_ranges(p: PhoneProfile, source: str) -> None:
    checks = [
        ("ram_mb", 256 <= p.ram_mb <= 1 << 20, "between 256 and 1048576"),
        ("budget_mb", 0 <= p.budget_mb <= p.ram_mb, "between 0 (derive) and ram_mb"),
        ("cpu_speed", 0.05 <= p.cpu_speed <= 1.0, "between 0.05 and 1.0 (1.0 = this host's core)"),
        ("cores", 1 <= p.cores <= 64, "between 1 and 64"),
        ("sdk", 16 <= p.sdk <= 99, "an Android API level (16..99)"),
        ("idle_mw", 0 <= p.idle_mw <= 20000, "between 0 and 20000"),
        ("active_mw", 0 <= p.active_mw <= 20000, "between 0 and 20000"),
        ("battery_mah", 100 <= p.battery_mah <= 100000, "between 100 and 100000"),
        ("voltage", 2.5 <= p.voltage <= 20, "between 2.5 and 20 volts"),
        ("initial_soc", 0 < p.initial_soc <= 1, "in (0, 1]"),
        ("thermal_resistance", 0 <= p.thermal_resistance <= 100, "between 0 and 100 degC/W"),
        ("thermal_tau_s", 1 <= p.thermal_tau_s <= 10000, "between 1 and 10000 s"),
        ("ambient_c", -20 <= p.ambient_c <= 60, "between -20 and 60 degC"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise TestbedError(f"{source}: field {name!r}={getattr(p, name)!r} must be {expected}")
    if " " in p.name or "/" in p.name:
        raise TestbedError(f"{source}: field 'name'={p.name!r} must have no spaces or slashes")


def _builtin_names() -> list[str]:
    return sorted(path.stem for path in PROFILE_DIR.glob("*.toml"))


BUILTIN_PROFILES: tuple[str, ...] = tuple(_builtin_names())
ALIASES = {"midrange": "midrange-4gb", "lowend": "lowend-2gb", "flagship": "flagship-8gb"}


def load_profile(name_or_path: str | Path) -> PhoneProfile:
    """A built-in profile by name (see BUILTIN_PROFILES, plus aliases) or a TOML file path."""
    text = str(name_or_path)
    name = ALIASES.get(text, text)
    if name in BUILTIN_PROFILES:
        path = PROFILE_DIR / f"{name}.toml"
    else:
        path = Path(text).expanduser()
        if not (text.endswith(".toml") or path.exists()):
            raise TestbedError(f"unknown profile {text!r}: use one of {', '.join(BUILTIN_PROFILES)} "
                               f"(aliases {', '.join(ALIASES)}) or a .toml file")
        if not path.is_file():
            raise TestbedError(f"profile file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise TestbedError(f"profile {path}: invalid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise TestbedError(f"profile {path}: cannot read: {exc}") from exc
    return profile_from_mapping(data, source=f"profile {path}")
