"""``fedblocks testbed provision``: put the device runtime on each phone and check it can run.

Per device: build fedblocks-runtime.pyz (deterministic, so an unchanged runtime is
never pushed twice), push it through the content-addressed cache, copy it to the
stable path ``<base_dir>/fedblocks-runtime.pyz``, then check python3, numpy and the
training engines ON the device, and print one readiness line naming the exact gap.

The same check, without the push and with a quick (no import) engine probe, feeds
``fedblocks devices``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .cache import DeviceCache
from .device import Device, DeviceError, sha256_file
from .errors import TestbedError

RUNTIME_NAME = "fedblocks-runtime.pyz"
MIN_PYTHON = (3, 11)

# engine name (as in job.json) -> (module whose import proves it trains, distributions, how to install)
ENGINE_PROBES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "executorch": ("executorch.extension.training", ("executorch",), "pip install executorch==1.5.1"),
    "torch": ("torch", ("torch",), "pip install torch"),
    "ort": ("onnxruntime.training.api", ("onnxruntime-training-cpu", "onnxruntime-training"),
            "pip install onnxruntime-training-cpu==1.19.2 (x86_64 only)"),
}

# Runs ON the device with its python3: prints one JSON line. Only stdlib at top level;
# each probe is isolated so one broken engine cannot hide the others.
_PROBE = r"""
import json, sys, subprocess, importlib.util, importlib.metadata as md
deep = sys.argv[1] == "deep"
probes = json.loads(sys.argv[2])
out = {"python": "%d.%d.%d" % sys.version_info[:3], "executable": sys.executable, "numpy": None,
       "numpy_error": None, "engines": {}}
try:
    import numpy
    out["numpy"] = numpy.__version__
except Exception as exc:
    out["numpy_error"] = "%s: %s" % (type(exc).__name__, exc)
children = {}
for name, (module, dists) in probes.items():
    version = None
    for dist in dists:
        try:
            version = md.version(dist)
            break
        except Exception:
            pass
    entry = {"version": version, "ok": False, "error": None}
    out["engines"][name] = entry
    if deep:
        # each import in its own process, all at once: a crashing native wheel cannot take
        # the probe down, and the slow imports (seconds each) overlap
        # (same interpreter flags as this python: the child must see what the runtime sees)
        flags = subprocess._args_from_interpreter_flags()
        children[name] = subprocess.Popen([sys.executable, *flags, "-c", "import " + module],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    else:
        entry["ok"] = importlib.util.find_spec(module.split(".")[0]) is not None and version is not None
        if not entry["ok"]:
            entry["error"] = "not installed"
for name, child in children.items():
    entry = out["engines"][name]
    try:
        _, err = child.communicate(timeout=float(sys.argv[3]))
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        entry["error"] = "import did not finish within %s s" % sys.argv[3]
        continue
    lines = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
    if child.returncode == 0:
        entry["ok"] = True
    elif child.returncode < 0:
        entry["error"] = "import crashed (signal %d)" % -child.returncode
    else:
        entry["error"] = (lines[-1] if lines else "exit %d" % child.returncode)[:300]
print("FEDBLOCKS_PROBE " + json.dumps(out))
"""


@dataclass
class Readiness:
    """Whether a device can run fedblocks jobs, and the first thing missing if not."""

    serial: str
    python: str | None = None          # "python3" or "python" (the command the runtime runs with)
    python_version: str | None = None
    numpy: str | None = None
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    runtime_path: str | None = None
    runtime_sha256: str | None = None
    runtime_current: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return not self.problems

    @property
    def usable_engines(self) -> list[str]:
        return [name for name, e in self.engines.items() if e.get("ok")]

    def summary(self) -> str:
        if self.ready:
            return f"ready: python {self.python_version}, numpy {self.numpy}, engines {', '.join(self.usable_engines)}"
        return "not ready: " + "; ".join(self.problems)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ready"] = self.ready
        data["usable_engines"] = self.usable_engines
        return data


def runtime_remote_path(device: Device) -> str:
    return f"{device.base_dir}/{RUNTIME_NAME}"


def build_runtime(out_dir: Path) -> Path:
    """The device runtime zipapp, built by the device runtime's own builder."""
    from fedblocks.device_runtime import build_runtime_pyz

    return build_runtime_pyz(Path(out_dir) / RUNTIME_NAME)


def check_device(device: Device, *, deep: bool, runtime_sha256: str | None = None,
                 timeout_s: float = 180.0) -> Readiness:
    """Probe python, numpy and the engines on ``device``.

    ``deep`` imports each engine (seconds per engine); otherwise only checks that it is
    installed. ``runtime_sha256``: the runtime the host would push, to say whether the
    device's copy is current.
    """
    r = Readiness(serial=device.serial)
    res = device.shell(
        "for p in python3 python; do if command -v $p >/dev/null 2>&1; then echo $p; break; fi; done", 30,
        idempotent=True)
    found = res.stdout.strip().splitlines()
    if not found:
        r.problems.append("no python3 on PATH: install Python for the adb shell user (docs/testbed.md, Python on the phones)")
        return r
    r.python = found[0] if found[0] in ("python3", "python") else None
    if r.python is None:
        r.problems.append(f"unexpected answer looking for python: {res.stdout[:80]!r}")
        return r
    probes = {name: [module, list(dists)] for name, (module, dists, _) in ENGINE_PROBES.items()}
    cmd = [r.python, "-c", _PROBE, "deep" if deep else "quick", json.dumps(probes), str(int(timeout_s - 10))]
    res = device.shell(cmd, timeout_s, idempotent=True)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("FEDBLOCKS_PROBE ")), None)
    if res.exit_code != 0 or line is None:
        detail = (res.stderr or res.stdout).strip().splitlines()
        r.problems.append(f"{r.python} does not run: {detail[-1][:160] if detail else f'exit {res.exit_code}'}")
        return r
    probe = _parse_probe(line[len("FEDBLOCKS_PROBE "):])
    r.python_version = probe.get("python")
    r.numpy = probe.get("numpy")
    r.engines = probe.get("engines", {})
    version = _version_tuple(r.python_version)
    if version is None or version < MIN_PYTHON:
        r.problems.append(f"{r.python} is {r.python_version}; the runtime needs Python >= "
                          f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]}")
    if r.numpy is None:
        r.problems.append(f"numpy missing: {r.python} -m pip install numpy")
    if not r.usable_engines:
        options = "; ".join(f"{name}: {hint}" for name, (_, _, hint) in ENGINE_PROBES.items())
        r.problems.append(f"no engine: install one of {options}")
    remote = runtime_remote_path(device)
    if device.exists(remote):
        r.runtime_path = remote
        r.runtime_sha256 = device.sha256(remote)
        r.runtime_current = runtime_sha256 is None or r.runtime_sha256 == runtime_sha256
        if not r.runtime_current:
            r.problems.append("runtime out of date: run fedblocks testbed provision")
    else:
        r.problems.append("runtime not pushed: run fedblocks testbed provision")
    if r.runtime_path and r.python and not r.problems:
        res = device.shell([r.python, remote, "--help"], 60, idempotent=True)
        if res.exit_code != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()
            r.problems.append(f"the runtime does not start: {tail[-1][:160] if tail else res.exit_code}")
    return r


def _parse_probe(text: str) -> dict[str, Any]:
    """The probe's JSON comes from the device: keep only well-formed fields."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:
        return {}
    if not isinstance(raw, dict):
        return {}
    out: dict[str, Any] = {}
    for key in ("python", "numpy", "executable"):
        if isinstance(raw.get(key), str):
            out[key] = raw[key][:100]
    engines: dict[str, dict[str, Any]] = {}
    raw_engines = raw.get("engines") if isinstance(raw.get("engines"), dict) else {}
    for name in ENGINE_PROBES:
        entry = raw_engines.get(name)
        if isinstance(entry, dict):
            engines[name] = {
                "ok": entry.get("ok") is True,
                "version": entry["version"][:60] if isinstance(entry.get("version"), str) else None,
                "error": entry["error"][:300] if isinstance(entry.get("error"), str) else None,
            }
    out["engines"] = engines
    return out


def _version_tuple(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return None


def provision_device(device: Device, runtime: Path, runtime_sha256: str | None = None,
                     cache: DeviceCache | None = None, *, deep: bool = True) -> Readiness:
    """Push the runtime (cached) to its stable path, then check readiness (``deep``:
    import every engine for real, seconds each; the CLI always does)."""
    digest = runtime_sha256 or sha256_file(runtime)
    cache = cache or DeviceCache(device)
    cached = cache.ensure(runtime, digest)
    remote = runtime_remote_path(device)
    tmp = f"{remote}.tmp"
    device.shell(f"cp -f {shlex.quote(cached)} {shlex.quote(tmp)} && mv -f {shlex.quote(tmp)} "
                 f"{shlex.quote(remote)}", 60, idempotent=True).check(f"install {RUNTIME_NAME}")
    return check_device(device, deep=deep, runtime_sha256=digest)


@dataclass
class ProvisionOutcome:
    serial: str
    readiness: Readiness | None
    error: str | None

    @property
    def ready(self) -> bool:
        return self.readiness is not None and self.readiness.ready

    def line(self) -> str:
        if self.readiness is None:
            return f"{self.serial}: unreachable: {self.error}"
        return f"{self.serial}: {self.readiness.summary()}"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"serial": self.serial, "ready": self.ready, "error": self.error}
        data["readiness"] = self.readiness.to_json() if self.readiness else None
        return data


def provision_serials(serials: list[str], max_workers: int = 8) -> list[ProvisionOutcome]:
    from .inventory import open_device

    with tempfile.TemporaryDirectory(prefix="fedblocks-runtime-") as tmp:
        runtime = build_runtime(Path(tmp))
        digest = sha256_file(runtime)

        def one(serial: str) -> ProvisionOutcome:
            try:
                with open_device(serial) as device:
                    return ProvisionOutcome(serial, provision_device(device, runtime, digest), None)
            except (DeviceError, TestbedError) as exc:
                return ProvisionOutcome(serial, None, str(exc))

        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(serials)))) as pool:
            return list(pool.map(one, serials))


def provision_command(args: argparse.Namespace) -> int:
    """CLI: exit 0 when every device is ready, 1 when some is not; one line per device."""
    from .inventory import discover_serials

    serials = discover_serials(args.serial)
    if not serials:
        raise TestbedError("no devices to provision: pass --serial HOST:PORT, set FEDBLOCKS_DEVICES, "
                           "or connect a phone (see docs/testbed.md)")
    outcomes = _with_status(f"provisioning {len(serials)} device(s)", not args.json,
                            lambda: provision_serials(serials))
    if args.json:
        print(json.dumps([o.to_json() for o in outcomes], indent=2))
    else:
        for outcome in outcomes:
            print(outcome.line())
    return 0 if all(o.ready for o in outcomes) else 1


def _with_status(message: str, show: bool, work: Any) -> Any:
    if not show:
        return work()
    from rich.console import Console

    console = Console(stderr=True)
    with console.status(message):
        return work()
