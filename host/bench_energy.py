"""``fedblocks bench energy``: idle-corrected joules per training sample of one stage on one phone.

    fedblocks bench energy --serial S --stage STAGE_ID [--model resnet8 --engine torch --batch-size 32]
                           --duration SECONDS [--idle-seconds N] [--json]

1. connects to the phone (fedblocks.testbed AdbDevice: a real phone or a virtual one);
2. builds the stage's engine artifacts and the device-runtime zipapp, and pushes them
   through the content-addressed device cache (DeviceClient, as a federated round does);
3. reads an idle baseline: the device runtime's own energy meter (meters.py: ODPM, else
   fuel gauge) sampled on the phone for --idle-seconds while nothing trains;
4. runs a short calibration job (step time), then a training job of ~--duration seconds
   through the device runtime (job.json -> result bundle), with the same meter;
5. reports joules per sample with the idle power subtracted over the training window,
   the source and its achieved sampling rate. A measured source is never mixed with the
   modelled one: the modelled figure (power profile) is reported beside it, labelled.

Registered by host/bench.py (BENCH_EXTENSIONS -> ``register_bench``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedblocks.host.clients.base import JobRequest
from fedblocks.host.clients.device import DeviceClient, RuntimeBundle
from fedblocks.host.errors import HostError

SOURCES = ("auto", "odpm", "fuel_gauge", "modelled")
VIRTUAL_MANUFACTURER = "Fedblocks"  # ro.product.manufacturer of fedblocks virtual phones (testbed/virtual/profiles)
CALIBRATION_STEPS = 4
SHARD_BATCHES = 16  # the shard cycles (epochs) when the job needs more steps
MAX_STEPS = 1_000_000

# Runs ON the phone with its python3: the device runtime's own meters, sampled while idle.
# argv: pyz path, seconds, hz, source preference. Prints one JSON line.
IDLE_SCRIPT = r"""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from fedblocks.device_runtime import meters
root = Path(os.environ.get("FEDBLOCKS_SYSFS_ROOT") or "/")
seconds, hz, pref = float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
meter = None if pref == "modelled" else meters.pick_energy_meter(root, pref)
if meter is None:
    print(json.dumps({"source": "modelled", "joules": None, "window_s": seconds}))
    sys.exit(0)
sampler = meters.SysfsSampler(root, meter, hz)
start = time.monotonic()
sampler.start()
time.sleep(seconds)
end = time.monotonic()
sampler.stop()
print(json.dumps(meter.energy(start, end).to_dict()))
"""


def register_bench(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser(
        "energy", help="idle-corrected joules per training sample of one stage on one phone",
        description="Measure one stage's training energy on a phone (real or virtual): idle baseline, then "
                    "~DURATION s of training through the device runtime; reports idle-corrected J/sample with "
                    "its source (ODPM, fuel gauge, or modelled) and sampling rate.")
    p.add_argument("--serial", required=True, help="the phone (adb serial, or HOST:PORT of a virtual phone)")
    p.add_argument("--stage", required=True, help="stage id (full, grow-K, shrink-K; K alone = grow-K)")
    p.add_argument("--model", default="resnet8", help="zoo model (default resnet8)")
    p.add_argument("--engine", default="torch", choices=("ort", "executorch", "torch"),
                   help="engine the device runtime uses (default torch)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--duration", type=float, required=True, help="seconds of training to measure")
    p.add_argument("--idle-seconds", type=float, default=10.0, help="idle baseline length (default 10 s)")
    p.add_argument("--energy-hz", type=float, default=10.0, help="meter sampling rate, (0, 10] Hz (default 10)")
    p.add_argument("--source", default="auto", choices=SOURCES,
                   help="energy source: auto = ODPM if readable, else fuel gauge, else modelled")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--input-shape", default="3,32,32", help="per-sample input shape (default 3,32,32)")
    p.add_argument("--python", default="python3", help="python on the phone (default python3)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="host cache for artifacts (default $FEDBLOCKS_CACHE/bench-energy)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=bench_energy_command)


@dataclass
class IdleBaseline:
    source: str
    joules: float | None
    window_s: float
    sample_hz: float | None
    samples: int

    @property
    def power_w(self) -> float | None:
        return None if self.joules is None or self.window_s <= 0 else self.joules / self.window_s


@dataclass
class EnergyBenchResult:
    serial: str
    model: str
    stage: str
    engine: str
    batch_size: int
    status: str
    reason: str
    source: str  # fuel_gauge | odpm | modelled
    source_label: str
    sample_hz: float | None  # achieved sampling rate during training
    steps: int | None
    samples: int | None
    step_median_s: float | None
    train_window_s: float | None
    train_joules: float | None  # over the training window, as measured
    idle_seconds: float
    idle_sample_hz: float | None
    idle_power_w: float | None
    idle_joules_in_window: float | None  # idle power x training window
    corrected_joules: float | None  # train_joules - idle_joules_in_window
    joules_per_sample: float | None  # corrected, the headline figure
    joules_per_sample_uncorrected: float | None
    mean_power_w: float | None
    modelled_joules_per_sample: float | None  # power-profile figure, labelled, never mixed in
    battery_start_pct: float | None
    battery_end_pct: float | None
    temp_start_c: float | None
    temp_end_c: float | None
    notes: list[str] = field(default_factory=list)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def parse_idle(text: str, expected_s: float) -> IdleBaseline:
    """The phone's idle-meter output (untrusted): one JSON object; every number checked."""
    line = next((ln for ln in reversed(text.strip().splitlines()) if ln.startswith("{")), "")
    try:
        data = json.loads(line)
    except ValueError:
        raise HostError(f"idle baseline: the phone's meter printed no JSON ({text.strip()[-200:]!r})") from None
    if not isinstance(data, dict):
        raise HostError("idle baseline: the phone's meter printed something other than a JSON object")
    source = data.get("source")
    if source not in ("fuel_gauge", "odpm", "modelled"):
        raise HostError(f"idle baseline: unknown energy source {source!r} from the phone")
    window = _num(data.get("window_s"))
    if window is None or window <= 0 or window > expected_s * 3 + 30:
        raise HostError(f"idle baseline: implausible window {data.get('window_s')!r} s (asked for {expected_s} s)")
    joules = _num(data.get("joules"))
    if joules is not None and joules < 0:
        raise HostError(f"idle baseline: negative energy {joules} J from the phone")
    samples = data.get("samples")
    return IdleBaseline(source, joules, window, _num(data.get("sample_hz")),
                        samples if isinstance(samples, int) and not isinstance(samples, bool) else 0)


def compute_result(metrics: dict[str, Any], idle: IdleBaseline, base: dict[str, Any]) -> EnergyBenchResult:
    """Idle-corrected figures from a job's metrics.json (untrusted) and the idle baseline."""
    from fedblocks.host.report.model import source_label

    energy = metrics.get("energy") if isinstance(metrics.get("energy"), dict) else {}
    source = energy.get("source") if energy.get("source") in ("fuel_gauge", "odpm", "modelled") else "unknown"
    joules = _num(energy.get("joules"))
    window = _num(energy.get("window_s"))
    samples = metrics.get("samples_seen") if isinstance(metrics.get("samples_seen"), int) else None
    steps = metrics.get("steps") if isinstance(metrics.get("steps"), int) else None
    notes: list[str] = []
    idle_in_window = corrected = None
    if source == "modelled":
        profile = energy.get("power_profile") if isinstance(energy.get("power_profile"), dict) else {}
        idle_mw = _num(profile.get("idle_mw"))
        if window is not None and idle_mw is not None:
            idle_in_window = idle_mw / 1000.0 * window
            notes.append("MODELLED energy (power profile, no meter readable on the phone): the idle part is the "
                         "profile's idle_mw x window, not a measurement")
    elif source != idle.source:
        notes.append(f"the idle baseline was read from {idle.source} but training from {source}: not corrected")
    elif idle.power_w is not None and window is not None:
        idle_in_window = idle.power_w * window
    if joules is not None and idle_in_window is not None:
        corrected = joules - idle_in_window
        if corrected <= 0:
            notes.append("the training window used no more energy than idle: the meter is too coarse for this "
                         "duration (train longer) or the phone is charging")
    modelled = metrics.get("energy_modelled") if isinstance(metrics.get("energy_modelled"), dict) else {}
    modelled_j = _num(modelled.get("joules"))
    bat = metrics.get("battery") if isinstance(metrics.get("battery"), dict) else {}

    def snap(which: str, key: str) -> float | None:
        s = bat.get(which)
        return _num(s.get(key)) if isinstance(s, dict) else None

    def per(joules_: float | None) -> float | None:
        return None if joules_ is None or not samples else joules_ / samples

    if idle.sample_hz is not None and _num(energy.get("sample_hz")) is not None and source != "modelled":
        notes.append(f"sampling: {idle.sample_hz:.1f} Hz idle, {_num(energy.get('sample_hz')):.1f} Hz training")
    return EnergyBenchResult(
        **base, source=source, source_label=source_label(source), sample_hz=_num(energy.get("sample_hz")),
        steps=steps, samples=samples, step_median_s=_num(metrics.get("step_latency_median_s")),
        train_window_s=window, train_joules=joules, idle_seconds=idle.window_s, idle_sample_hz=idle.sample_hz,
        idle_power_w=idle.power_w, idle_joules_in_window=idle_in_window, corrected_joules=corrected,
        joules_per_sample=per(corrected), joules_per_sample_uncorrected=per(joules),
        mean_power_w=None if joules is None or not window else joules / window,
        modelled_joules_per_sample=per(modelled_j) if source != "modelled" else per(joules),
        battery_start_pct=snap("start", "level_pct"), battery_end_pct=snap("end", "level_pct"),
        temp_start_c=snap("start", "temp_c"), temp_end_c=snap("end", "temp_c"), notes=notes)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class _Prepared:
    stage_id: str
    stage_dict: dict[str, Any]
    artifacts: dict[str, Any]  # role -> FileOnHost
    shard: Any  # FileOnHost
    shard_samples: int
    init: Any  # FileOnHost
    pyz: Any  # FileOnHost


def prepare(model: str, stage: str, engine: str, batch_size: int, num_classes: int, input_shape: tuple[int, ...],
            work: Path) -> _Prepared:
    """Stage artifacts, a synthetic shard, initial weights and the runtime zipapp, on the host."""
    from fedblocks.device_runtime import build_runtime_pyz
    from fedblocks.export.pipeline import ExportSpec, build_blocked_model, stage_program
    from fedblocks.export.stages import stage_ids
    from fedblocks.export.weights import save_weights, state_dict_to_arrays
    from fedblocks.host.bench import resolve_stage_ids, synthetic_shard
    from fedblocks.host.clients.artifacts import build_stage_artifacts
    from fedblocks.host.clients.base import FileOnHost
    from fedblocks.host.loop import stage_entry

    spec = ExportSpec(model, num_classes, input_shape, batch_size, engines=(engine,))
    blocked = build_blocked_model(spec)
    (sid,) = resolve_stage_ids(stage, stage_ids(blocked))
    program = stage_program(blocked, sid)
    program.load_global_state(state_dict_to_arrays(blocked), strict=False)
    stage_dict = stage_entry(program, batch_size, momentum=True)
    work.mkdir(parents=True, exist_ok=True)
    artifacts = build_stage_artifacts(program, engine, batch_size, 0, work / "artifacts")
    data = synthetic_shard(stage_dict, SHARD_BATCHES, seed=0)
    shard_path = work / f"shard-{sid}-b{batch_size}.npz"
    np.savez(shard_path, **data)
    names = [t["name"] for t in (*stage_dict["trainable"], *stage_dict["state"])]
    state = state_dict_to_arrays(blocked)
    init_path = work / f"init-{sid}.npz"
    save_weights(init_path, {n: np.asarray(state[n], dtype=np.float32) for n in names})
    pyz = build_runtime_pyz(work / "fedblocks-runtime.pyz")
    return _Prepared(sid, stage_dict, artifacts, FileOnHost(shard_path, _sha256(shard_path)),
                     SHARD_BATCHES * batch_size, FileOnHost(init_path, _sha256(init_path)),
                     FileOnHost(pyz, _sha256(pyz)))


def _run_job(client: MeteredDeviceClient, prep: _Prepared, engine: str, batch_size: int, steps: int, job_id: str,
             work: Path, deadline_s: float) -> tuple[dict[str, Any], str, str]:
    from fedblocks.device_runtime.spec import OptimizerConfig, StageSpec

    bundle = work / "bundles" / job_id
    request = JobRequest(
        job_id=job_id, client_id=0, round=0, engine=engine, stage=StageSpec.from_dict(prep.stage_dict),
        stage_dict=prep.stage_dict, artifacts=prep.artifacts, shard=prep.shard, num_samples=prep.shard_samples,
        init_weights=prep.init, epochs=None, max_steps=steps, batch_size=batch_size, seed=0,
        optimizer=OptimizerConfig(lr=0.01, momentum=0.9, weight_decay=5e-4), budget_mb=None,
        budget_mode="process", deadline_s=deadline_s, bundle_dir=bundle)
    outcome = client.run(request, threading.Event())
    if outcome.bundle_dir is None:
        raise HostError(f"bench energy: job {job_id} on {client.label} returned no result ({outcome.error})")
    try:
        status = json.loads((outcome.bundle_dir / "status.json").read_text(encoding="utf-8"))
        metrics = json.loads((outcome.bundle_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HostError(f"bench energy: job {job_id}: unreadable result bundle ({exc})") from None
    if not isinstance(status, dict) or not isinstance(metrics, dict):
        raise HostError(f"bench energy: job {job_id}: malformed result bundle")
    return metrics, str(status.get("status")), str(status.get("reason") or "")


class MeteredDeviceClient(DeviceClient):
    """A DeviceClient whose job.json carries this benchmark's meter settings (rate, source)."""

    def __init__(self, device: Any, runtime: RuntimeBundle, meters: dict[str, Any]) -> None:
        super().__init__(0, None, device, runtime, label=str(device.serial))
        self.meters = meters

    def job_json(self, request: JobRequest, remote: dict[str, str]) -> dict[str, Any]:
        job = super().job_json(request, remote)
        job["meters"] = {**job.get("meters", {}), **self.meters}
        return job


def measure_idle(device: Any, pyz_remote: str, python: str, seconds: float, hz: float,
                 source: str) -> IdleBaseline:
    res = device.shell([python, "-c", IDLE_SCRIPT, pyz_remote, str(seconds), str(hz), source],
                       timeout_s=seconds + 120)
    if res.exit_code != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise HostError(f"idle baseline on {device.serial} failed (exit {res.exit_code}): {tail[0][:200]}")
    return parse_idle(res.stdout, seconds)


def bench_energy(serial: str, stage: str, model: str, engine: str, batch_size: int, duration_s: float,
                 idle_s: float, hz: float, source: str, num_classes: int, input_shape: tuple[int, ...],
                 python: str, work: Path, show_progress: bool = True) -> EnergyBenchResult:
    from rich.console import Console

    from fedblocks.testbed.adb_backend import AdbDevice

    console = Console(stderr=True, quiet=not show_progress)
    with console.status(f"connecting to {serial}"):
        device = AdbDevice.connect(serial)  # first: a wrong serial fails in seconds, before the export
    try:
        with console.status(f"exporting {model} {stage} ({engine})"):
            prep = prepare(model, stage, engine, batch_size, num_classes, input_shape, work)
        # a virtual phone: its sandbox sets FEDBLOCKS_SYSFS_ROOT (its battery files are a model)
        probe = device.shell('getprop ro.product.manufacturer; echo "${FEDBLOCKS_SYSFS_ROOT:-}"', timeout_s=30)
        lines = [ln.strip() for ln in probe.stdout.splitlines()]
        virtual = probe.ok and (VIRTUAL_MANUFACTURER in lines or any(ln.startswith("/") for ln in lines))
        client = MeteredDeviceClient(device, RuntimeBundle(prep.pyz, python=python),
                                     {"energy_hz": hz, "energy_source": source})
        with console.status(f"calibration: {CALIBRATION_STEPS} steps of {prep.stage_id} (pushes what the phone "
                            "lacks)"):
            cal, cal_status, cal_reason = _run_job(client, prep, engine, batch_size, CALIBRATION_STEPS,
                                                   f"bench-energy-cal-{prep.stage_id}", work,
                                                   max(600.0, duration_s * 4))
        if cal_status != "ok":
            raise HostError(f"bench energy: calibration job on {serial} ended {cal_status}: {cal_reason[:300]}")
        step_s = _num(cal.get("step_latency_median_s"))
        if step_s is None or step_s <= 0:
            raise HostError("bench energy: the calibration job reported no usable step time")
        steps = max(CALIBRATION_STEPS, min(MAX_STEPS, round(duration_s / step_s)))
        pyz_remote = client.cache.ensure(prep.pyz.path, prep.pyz.sha256)
        with console.status(f"idle baseline: {idle_s:.0f} s at {hz:g} Hz"):
            idle = measure_idle(device, pyz_remote, python, idle_s, hz, source)
        with console.status(f"training {prep.stage_id}: {steps} steps (~{steps * step_s:.0f} s)"):
            metrics, status, reason = _run_job(client, prep, engine, batch_size, steps,
                                               f"bench-energy-{prep.stage_id}", work,
                                               max(600.0, steps * step_s * 4 + 120))
    finally:
        device.close()
    base = {"serial": serial, "model": model, "stage": prep.stage_id, "engine": engine, "batch_size": batch_size,
            "status": status, "reason": reason}
    result = compute_result(metrics, idle, base)
    if status != "ok":
        result.notes.append(f"the training job ended {status}: {reason[:200]}")
    if virtual and result.source != "modelled":
        result.notes.append("a virtual phone: its fuel gauge is the virtual phone's battery model (CPU use x "
                            "profile power), read through the real meter code — not a physical measurement")
    return result


def _parse_shape(text: str) -> tuple[int, ...]:
    from fedblocks.host.bench import _parse_shape as parse

    return parse(text)


def bench_energy_command(args: argparse.Namespace) -> int:
    from fedblocks.export.errors import ExportError

    if not args.duration > 0:
        raise HostError(f"--duration must be > 0 seconds, got {args.duration}")
    if not args.idle_seconds > 0:
        raise HostError(f"--idle-seconds must be > 0, got {args.idle_seconds}")
    if not 0 < args.energy_hz <= 10:
        raise HostError(f"--energy-hz must be in (0, 10] (fuel gauges update no faster), got {args.energy_hz}")
    if args.batch_size < 1:
        raise HostError(f"--batch-size must be >= 1, got {args.batch_size}")
    work = args.work_dir
    if work is None:
        from fedblocks.host.data.dataset import cache_dir

        work = cache_dir() / "bench-energy"
    try:
        result = bench_energy(args.serial, args.stage, args.model, args.engine, args.batch_size, args.duration,
                              args.idle_seconds, args.energy_hz, args.source, args.num_classes,
                              _parse_shape(args.input_shape), args.python, Path(work), show_progress=not args.json)
    except ExportError as exc:
        raise HostError(str(exc)) from None
    if args.json:
        print(json.dumps(asdict(result), indent=1))
    else:
        print_result(result)
    return 0 if result.status == "ok" else 1


def print_result(r: EnergyBenchResult) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(v: float | None, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    t = Table(title=f"{r.model} {r.stage} on {r.serial} ({r.engine}, batch {r.batch_size}) — {r.source_label}")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    rows = [
        ("status", r.status if r.status == "ok" else f"{r.status}: {r.reason[:80]}"),
        ("energy source", r.source_label),
        ("sampling rate (training / idle), Hz", f"{f(r.sample_hz, '.1f')} / {f(r.idle_sample_hz, '.1f')}"),
        ("steps / samples", f"{r.steps} / {r.samples}"),
        ("step median, ms", f(None if r.step_median_s is None else r.step_median_s * 1000, ".1f")),
        ("training window, s", f(r.train_window_s, ".2f")),
        ("energy in window, J", f(r.train_joules, ".3f")),
        ("mean power, W", f(r.mean_power_w, ".3f")),
        (f"idle power, W ({r.idle_seconds:.0f} s baseline)", f(r.idle_power_w, ".3f")),
        ("idle-corrected energy, J", f(r.corrected_joules, ".3f")),
        ("J / sample (idle-corrected)", f(r.joules_per_sample, ".5f")),
        ("J / sample (uncorrected)", f(r.joules_per_sample_uncorrected, ".5f")),
        ("J / sample, modelled (power profile)", f(r.modelled_joules_per_sample, ".5f")),
        ("battery %, start -> end", f"{f(r.battery_start_pct, '.0f')} -> {f(r.battery_end_pct, '.0f')}"),
        ("battery temp °C, start -> end", f"{f(r.temp_start_c, '.1f')} -> {f(r.temp_end_c, '.1f')}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)
    for n in r.notes:
        print(f"note: {n}")
