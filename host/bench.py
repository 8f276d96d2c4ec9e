"""``fedblocks bench ...``: benchmarks. ``bench stage`` runs one stage program through the
device runtime exactly as a phone would (job.json -> separate process -> result bundle)
and, in the same run, times torch eager on the same stage, same weights, same batches,
same thread count.

Other benchmarks plug in as modules listed in BENCH_EXTENSIONS, each exposing
``register_bench(bench_subparsers)``; a module that does not exist yet is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedblocks.host.errors import HostError

BENCH_EXTENSIONS: tuple[str, ...] = ("fedblocks.host.bench_energy",)
ENGINES = ("ort", "executorch", "torch")
MIB = 1024 * 1024


def register(sub: argparse._SubParsersAction) -> None:
    import importlib

    bench = sub.add_parser("bench", help="benchmarks (stage programs through the device runtime vs torch eager)")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    bsub.required = True
    _register_stage(bsub)
    for modname in BENCH_EXTENSIONS:
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                continue
            raise
        module.register_bench(bsub)


def _register_stage(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("stage", help="one stage (or all) through the device runtime, side by side with torch eager")
    p.add_argument("--model", default="resnet18", help="zoo model (default resnet18)")
    p.add_argument("--stage", default="full",
                   help="K (= grow-K, the single-block stage K), full, grow-K, shrink-K, or all (default full)")
    p.add_argument("--engine", default="ort", choices=ENGINES, help="engine the runtime uses (default ort)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="training steps per run (default 6; the first is warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="leading steps excluded from the median (default 1)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runtime / eager pairs per stage, run alternately; ratios are the median of the pairs' "
                        "ratios, so a machine that speeds up or slows down mid-run does not bias them (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads for every engine and torch eager (default: CPUs available)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--input-shape", default="3,32,32", help="per-sample input shape (default 3,32,32)")
    p.add_argument("--export-dir", type=Path, default=None,
                   help="export cache (default $FEDBLOCKS_CACHE/bench-export or ~/.cache/fedblocks/bench-export)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=bench_stage_command)


@dataclass
class StageBenchRow:
    model: str
    stage: str
    engine: str
    batch_size: int
    threads: int
    steps: int
    status: str
    reason: str
    step_ms: float | None  # runtime engine: median step time excluding warm-up
    step_ms_min: float | None
    step_ms_max: float | None
    eager_ms: float | None  # torch eager, same stage, same batches
    eager_ms_min: float | None
    eager_ms_max: float | None
    ratio: float | None  # median over the repeats of (runtime median step / eager median step)
    step_cpu_ms: float | None  # CPU time per step (all threads), median excluding warm-up: robust to other load
    eager_cpu_ms: float | None
    cpu_ratio: float | None  # median over the repeats, like ratio
    repeats: int  # runtime / eager pairs measured (step and eager figures pool their timed steps)
    ratio_min: float | None  # the pairs' lowest and highest wall ratio: the run-to-run spread
    ratio_max: float | None
    cpu_ratio_min: float | None
    cpu_ratio_max: float | None
    footprint_mib: float | None  # measured peak - baseline RSS of the runtime's training process
    footprint_anon_mib: float | None  # the same for RssAnon (sampled; excludes engine code pages a step faults in)
    predicted_mib: float | None  # the runtime's memory.predicted_footprint_bytes: the manifest's engine prediction
    prediction_method: str | None  # manifest memory.engines.<engine>.method, or "engine-agnostic" without one
    error_pct: float | None  # (measured - predicted) / predicted
    # footprint / the full model's footprint in the same run (progressive stages must fit where full does not)
    footprint_vs_full: float | None
    predicted_vs_full: float | None
    baseline_mib: float | None
    peak_mib: float | None
    peak_source: str | None
    model_load_s: float | None
    energy_j: float | None
    energy_source: str | None


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise HostError(f"--input-shape: expected comma-separated integers like 3,32,32, got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise HostError(f"--input-shape: dimensions must be positive, got {text!r}")
    return shape


def resolve_stage_ids(requested: str, all_ids: list[str]) -> list[str]:
    if requested == "all":
        return list(all_ids)
    sid = f"grow-{requested}" if requested.isdigit() else requested
    if sid not in all_ids:
        raise HostError(f"--stage {requested!r}: the model has no stage {sid!r} (it has: {', '.join(all_ids)}, all)")
    return [sid]


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def bench_stage_command(args: argparse.Namespace) -> int:
    from fedblocks.export.errors import ExportError

    for name, value in (("--batch-size", args.batch_size), ("--steps", args.steps)):
        if value < 2:
            raise HostError(f"{name} must be >= 2, got {value}")
    if args.repeats < 1:
        raise HostError(f"--repeats must be >= 1, got {args.repeats}")
    if not 0 <= args.warmup < args.steps:
        raise HostError(f"--warmup must be in [0, --steps), got {args.warmup}")
    threads = args.threads or _available_cpus()
    if threads < 1:
        raise HostError(f"--threads must be >= 1, got {threads}")
    try:
        rows, env = bench_stages(args.model, args.stage, args.engine, args.batch_size, args.steps, args.warmup,
                                 threads, args.num_classes, _parse_shape(args.input_shape), args.export_dir,
                                 show_progress=not args.json, repeats=args.repeats)
    except ExportError as exc:
        raise HostError(str(exc)) from None
    if args.json:
        print(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=1))
    else:
        _print_table(rows, env)
    return 0 if all(r.status == "ok" for r in rows) else 1


def _export_dir(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    from fedblocks.host.data.dataset import cache_dir

    return cache_dir() / "bench-export"


def bench_stages(model: str, stage: str, engine: str, batch_size: int, steps: int, warmup: int, threads: int,
                 num_classes: int, input_shape: tuple[int, ...], export_dir: Path | None,
                 show_progress: bool = True, repeats: int = 1) -> tuple[list[StageBenchRow], dict[str, Any]]:
    """Export (cached), then per stage, ``repeats`` times: a runtime run in a separate process, then torch
    eager in-process on the same batches."""
    from rich.progress import Progress

    from fedblocks.export.pipeline import ExportSpec, build_blocked_model, export_model, stage_program
    from fedblocks.export.stages import stage_ids

    out = _export_dir(export_dir)
    probe = build_blocked_model(ExportSpec(model, num_classes, input_shape, batch_size, engines=(engine,)))
    sids = resolve_stage_ids(stage, stage_ids(probe))
    spec = ExportSpec(model, num_classes, input_shape, batch_size, engines=(engine,), stages=tuple(sids))
    env: dict[str, Any] = {"cpus": _available_cpus(), "threads": threads, "loadavg_start": os.getloadavg(),
                           "python": sys.version.split()[0]}
    rows: list[StageBenchRow] = []
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task(f"exporting {model} ({engine})", total=None)

        def on_export(done: int, total: int, label: str) -> None:
            progress.update(task, completed=done, total=total, description=f"export {label}")

        manifest = export_model(spec, out, on_export)
        init_path = out / manifest.model.init_weights.path
        with np.load(init_path, allow_pickle=False) as z:
            init_all = {n: z[n] for n in z.files}
        progress.update(task, total=len(sids), completed=0, description="benchmarking")
        for sid in sids:
            progress.update(task, description=f"{sid}: {engine} through the device runtime")
            entry = manifest.stage(sid)
            stage_dict = entry.to_dict()
            with tempfile.TemporaryDirectory(prefix="fedblocks-bench-") as tmp:
                work = Path(tmp)
                data = synthetic_shard(stage_dict, steps, seed=0)
                weights = {t["name"]: init_all[t["name"]] for t in (*stage_dict["trainable"], *stage_dict["state"])}
                pairs: list[tuple[dict[str, Any], tuple[list[float], list[float]]]] = []
                status, reason = "ok", ""
                for rep in range(repeats):
                    label = f" ({rep + 1}/{repeats})" if repeats > 1 else ""
                    progress.update(task, description=f"{sid}: {engine} through the device runtime{label}")
                    run_dir = work / f"run-{rep}"
                    run_dir.mkdir()
                    job = write_bench_job(run_dir, f"bench-{sid}-{engine}", engine, stage_dict,
                                          {role: out / ref.path for role, ref in entry.artifacts[engine].items()},
                                          data, weights, steps, threads)
                    metrics, status, reason = run_runtime(job)
                    progress.update(task, description=f"{sid}: torch eager{label}")
                    program = stage_program(build_blocked_model(spec), sid)  # fresh weights for every pair
                    program.load_global_state(init_all, strict=False)
                    pairs.append((metrics, time_torch_eager(program, stage_dict, data, steps, threads)))
                    if status != "ok":
                        break  # a failing runtime fails the same way again
            method = (entry.memory.engines[engine].method if engine in entry.memory.engines else "engine-agnostic")
            rows.append(_row(model, sid, engine, batch_size, threads, steps, warmup, status, reason, pairs, method))
            progress.advance(task)
    env["loadavg_end"] = os.getloadavg()
    return relative_to_full(rows), env


def relative_to_full(rows: list[StageBenchRow]) -> list[StageBenchRow]:
    """Fill footprint_vs_full / predicted_vs_full when the full stage is among the rows."""
    import dataclasses

    full = next((r for r in rows if r.stage == "full"), None)
    if full is None:
        return rows

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    return [dataclasses.replace(r, footprint_vs_full=ratio(r.footprint_mib, full.footprint_mib),
                                predicted_vs_full=ratio(r.predicted_mib, full.predicted_mib)) for r in rows]


def synthetic_shard(stage: dict[str, Any], steps: int, seed: int) -> dict[str, np.ndarray]:
    """steps * batch samples of the stage's inputs (normal floats; labels in [0, classes))."""
    rng = np.random.default_rng(seed)
    batch = stage["inputs"][0]["shape"][0]
    n = batch * steps
    out: dict[str, np.ndarray] = {}
    for spec in stage["inputs"]:
        shape = (n, *spec["shape"][1:])
        if spec["dtype"].startswith("int"):
            classes = 10 if spec["name"] == "y" else 2
            out[spec["name"]] = rng.integers(0, classes, size=shape).astype(spec["dtype"])
        else:
            out[spec["name"]] = rng.standard_normal(shape).astype(spec["dtype"])
    return out


def write_bench_job(work: Path, job_id: str, engine: str, stage: dict[str, Any], artifacts: dict[str, Path],
                    data: dict[str, np.ndarray], weights: dict[str, np.ndarray], steps: int, threads: int,
                    momentum: float = 0.9, weight_decay: float = 5e-4, lr: float = 0.01) -> Path:
    from fedblocks.device_runtime.job import sha256_file

    np.savez(work / "shard.npz", **data)
    np.savez(work / "init.npz", **weights)

    def ref(path: Path) -> dict[str, str]:
        return {"path": str(path), "sha256": sha256_file(path)}

    job = {
        "format": "fedblocks.job", "version": 1, "job_id": job_id, "engine": engine, "stage": stage,
        "artifacts": {role: ref(p) for role, p in artifacts.items()},
        "data": ref(work / "shard.npz"), "init_weights": ref(work / "init.npz"),
        "training": {"epochs": None, "max_steps": steps, "batch_size": stage["inputs"][0]["shape"][0], "seed": 0,
                     "threads": threads,
                     "optimizer": {"name": "sgd", "lr": lr, "momentum": momentum, "weight_decay": weight_decay}},
        "budget_mb": None, "meters": {"memory_hz": 50, "energy_hz": 10},
        "output_dir": "result",
    }
    path = work / "job.json"
    path.write_text(json.dumps(job))
    return path


def run_runtime(job: Path) -> tuple[dict[str, Any], str, str]:
    """`python -m fedblocks.device_runtime run job.json` in a separate process, as on a device."""
    proc = subprocess.run([sys.executable, "-m", "fedblocks.device_runtime", "run", str(job)],
                          capture_output=True, text=True, timeout=3600)
    bundle = job.parent / "result"
    try:
        status = json.loads((bundle / "status.json").read_text())
        metrics = json.loads((bundle / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}, "failed", f"runtime exited {proc.returncode} without a bundle: {proc.stderr.strip()[-300:]}"
    return metrics, status["status"], status.get("reason", "")


def time_torch_eager(program: Any, stage: dict[str, Any], data: dict[str, np.ndarray], steps: int,
                     threads: int) -> tuple[list[float], list[float]]:
    """Per-step (wall seconds, CPU seconds) of plain torch training on the stage program (SGD momentum 0.9,
    wd 5e-4)."""
    import torch

    from fedblocks.device_runtime.data import batch_indices

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        program.train()
        params = [p for p in program.parameters() if p.requires_grad]
        sgd = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
        names = [t["name"] for t in stage["inputs"]]
        batch = stage["inputs"][0]["shape"][0]
        n = len(data[names[0]])
        times: list[float] = []
        cpu: list[float] = []
        for idx in batch_indices(n, batch, 0, None, steps):
            inputs = [torch.from_numpy(data[name][idx]) for name in names]
            c0, t0 = time.process_time(), time.monotonic()
            sgd.zero_grad(set_to_none=True)
            outputs = program(*inputs)
            outputs[0].backward()
            sgd.step()
            program.apply_state_updates(tuple(o.detach() for o in outputs))
            times.append(time.monotonic() - t0)
            cpu.append(time.process_time() - c0)
        return times, cpu
    finally:
        torch.set_num_threads(previous)


def _stats_ms(values: list[float], warmup: int) -> tuple[float | None, float | None, float | None]:
    timed = values[warmup:] or values
    if not timed:
        return None, None, None
    return (round(statistics.median(timed) * 1000, 2), round(min(timed) * 1000, 2), round(max(timed) * 1000, 2))


def _mib(v: Any) -> float | None:
    return None if v is None else round(v / MIB, 1)


def _pair_ratios(pairs: list[tuple[dict[str, Any], tuple[list[float], list[float]]]], warmup: int,
                 cpu: bool) -> list[float]:
    """Per runtime / eager pair: the runtime's median step over eager's (wall, or CPU time)."""
    out = []
    for metrics, eager in pairs:
        runtime = [c for c in metrics.get("step_cpu_s" if cpu else "step_latency_s") or [] if c is not None]
        a, b = _stats_ms(runtime, warmup)[0], _stats_ms(eager[1] if cpu else eager[0], warmup)[0]
        if a and b:
            out.append(a / b)
    return out


def _row(model: str, sid: str, engine: str, batch: int, threads: int, steps: int, warmup: int, status: str,
         reason: str, pairs: list[tuple[dict[str, Any], tuple[list[float], list[float]]]],
         method: str) -> StageBenchRow:
    """One table row. Times pool the timed steps of every pair; memory and energy are the first run's."""

    def pooled(values: list[list[float]]) -> list[float]:  # each run's warm-up steps dropped, then pooled
        return [v for run in values for v in (run[warmup:] or run)]

    metrics = pairs[0][0] if pairs else {}
    step_ms, step_min, step_max = _stats_ms(pooled([list(m.get("step_latency_s") or []) for m, _ in pairs]), 0)
    eager_ms, eager_min, eager_max = _stats_ms(pooled([e[0] for _, e in pairs]), 0)
    step_cpu = _stats_ms(pooled([[c for c in m.get("step_cpu_s") or [] if c is not None] for m, _ in pairs]), 0)[0]
    eager_cpu = _stats_ms(pooled([e[1] for _, e in pairs]), 0)[0]
    wall_ratios, cpu_ratios = _pair_ratios(pairs, warmup, cpu=False), _pair_ratios(pairs, warmup, cpu=True)

    def mid(values: list[float]) -> float | None:
        return round(statistics.median(values), 3) if values else None

    def lo(values: list[float]) -> float | None:
        return round(min(values), 3) if values else None

    def hi(values: list[float]) -> float | None:
        return round(max(values), 3) if values else None

    mem = metrics.get("memory") or {}
    footprint, predicted = mem.get("footprint_bytes"), mem.get("predicted_footprint_bytes")
    energy = metrics.get("energy") or {}
    return StageBenchRow(
        model=model, stage=sid, engine=engine, batch_size=batch, threads=threads, steps=steps, status=status,
        reason=reason, step_ms=step_ms, step_ms_min=step_min, step_ms_max=step_max, eager_ms=eager_ms,
        eager_ms_min=eager_min, eager_ms_max=eager_max,
        ratio=mid(wall_ratios), step_cpu_ms=step_cpu, eager_cpu_ms=eager_cpu, cpu_ratio=mid(cpu_ratios),
        repeats=len(pairs), ratio_min=lo(wall_ratios), ratio_max=hi(wall_ratios), cpu_ratio_min=lo(cpu_ratios),
        cpu_ratio_max=hi(cpu_ratios),
        footprint_mib=_mib(footprint), footprint_anon_mib=_mib(mem.get("footprint_anon_bytes")),
        predicted_mib=_mib(predicted), prediction_method=method,
        error_pct=round(100 * (footprint - predicted) / predicted, 1) if footprint is not None and predicted else None,
        footprint_vs_full=None, predicted_vs_full=None,
        baseline_mib=_mib(mem.get("baseline_rss_bytes")), peak_mib=_mib(mem.get("peak_rss_bytes")),
        peak_source=mem.get("peak_source"), model_load_s=metrics.get("model_load_s"),
        energy_j=energy.get("joules"), energy_source=energy.get("source"))


def _ratio_cell(mid: float | None, lo: float | None, hi: float | None) -> str:
    if mid is None:
        return "-"
    return f"{mid:.2f}" if lo is None or hi is None or lo == hi else f"{mid:.2f} ({lo:.2f}-{hi:.2f})"


def _print_table(rows: list[StageBenchRow], env: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"device runtime vs torch eager ({env['threads']} threads, {env['cpus']} CPUs, "
                        f"load avg {env['loadavg_start'][0]:.2f} -> {env['loadavg_end'][0]:.2f})")
    for col in ("stage", "engine", "status", "step ms", "eager ms", "ratio", "cpu ms", "eager cpu ms", "cpu ratio",
                "footprint MiB", "predicted MiB", "error %", "vs full", "pred vs full", "anon MiB", "baseline MiB",
                "peak MiB", "load s"):
        table.add_column(col, justify="left" if col in ("stage", "engine", "status") else "right")

    def f(v: Any, spec: str = "") -> str:
        return "-" if v is None else format(v, spec)

    for r in rows:
        table.add_row(r.stage, r.engine, r.status if r.status == "ok" else f"{r.status}: {r.reason[:60]}",
                      f(r.step_ms, ".1f"), f(r.eager_ms, ".1f"), _ratio_cell(r.ratio, r.ratio_min, r.ratio_max), f(r.step_cpu_ms, ".1f"),
                      f(r.eager_cpu_ms, ".1f"), _ratio_cell(r.cpu_ratio, r.cpu_ratio_min, r.cpu_ratio_max),
                      f(r.footprint_mib, ".1f"),
                      f(r.predicted_mib, ".1f"), f(r.error_pct, "+.1f"), f(r.footprint_vs_full, ".2f"),
                      f(r.predicted_vs_full, ".2f"), f(r.footprint_anon_mib, ".1f"), f(r.baseline_mib, ".1f"),
                      f(r.peak_mib, ".1f"), f(r.model_load_s, ".2f"))
    Console(width=None if sys.stdout.isatty() else 260).print(table)
    methods = sorted({r.prediction_method for r in rows if r.prediction_method})
    repeats = max((r.repeats for r in rows), default=1)
    print(f"step ms: median wall time per step excluding warm-up, pooled over {repeats} runtime / eager pair(s) "
          "run alternately (min..max in --json); ratio, cpu ratio: median of the pairs' ratios (their range in "
          "brackets); cpu ms: median CPU time "
          "per step, all threads (robust to other load on the machine); footprint = peak - baseline RSS of the "
          "runtime's training process (anon: RssAnon only, sampled); predicted = the manifest's prediction for "
          f"this engine ({', '.join(methods)}; momentum included); vs full = footprint / the full stage's "
          "footprint in this run")
