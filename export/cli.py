"""``fedblocks export``: cut a model into blocks and export every stage for every engine.

    fedblocks export --model resnet18 --num-classes 10 --input 3x32x32 --batch-size 32 \
        --engines ort,executorch,torch --out DIR [--blocks N] [--stages grow-1,full] [--seed 0] [--json]

Writes DIR/manifest.json and DIR/objects/; shows a progress bar over (stage x
engine) and a table per stage (or, with --json, the manifest summary as JSON).
User errors raise ExportError: the dispatcher prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from fedblocks.export.builders import ENGINES
from fedblocks.export.errors import ExportError
from fedblocks.export.manifest import Manifest

_SHAPE = re.compile(r"^\d+(x\d+)*$")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export",
        help="export a model's stage programs as on-device training artifacts",
        description="Cut a model into blocks and export every stage program for ORT, ExecuTorch and torch.",
    )
    # Values are validated in _parse_spec (not by argparse) so every mistake is one line + exit 2.
    p.add_argument("--model", required=True, help="zoo model name, e.g. resnet18")
    p.add_argument("--num-classes", default="10", help="number of classes (default 10)")
    p.add_argument("--input", required=True, help="per-sample input shape, e.g. 3x32x32")
    p.add_argument("--batch-size", default="32", help="batch size baked into the artifacts (default 32)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list from {','.join(ENGINES)} (default all)")
    p.add_argument("--out", required=True, help="output directory (manifest.json + objects/)")
    p.add_argument("--blocks", default=None, help="number of blocks (default: the model's natural split)")
    p.add_argument("--stages", default=None, help="comma list of stage ids (default: all), e.g. grow-1,full")
    p.add_argument("--seed", default="0", help="seed of the initial weights (default 0)")
    p.add_argument("--split", action="store_true",
                   help="also export SmartSplit cuts: split_front-<cut> / split_back-<cut> + the manifest's split section")
    p.add_argument("--cuts", default=None, help="with --split: comma list of cuts (default: every cut), e.g. 1.stem.conv,2")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON instead of a table")
    p.set_defaults(func=run)


def _int(value: str, option: str, minimum: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ExportError(f"{option} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ExportError(f"{option} must be >= {minimum}, got {number}")
    return number


def parse_shape(text: str) -> tuple[int, ...]:
    """'3x32x32' -> (3, 32, 32); ExportError naming the expected form otherwise."""
    cleaned = text.strip().lower()
    if not _SHAPE.match(cleaned):
        raise ExportError(f"--input {text!r} is not a shape: use CxHxW, e.g. 3x32x32")
    shape = tuple(int(d) for d in cleaned.split("x"))
    if any(d <= 0 for d in shape):
        raise ExportError(f"--input {text!r}: every dimension must be positive, e.g. 3x32x32")
    return shape


def _list(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    return items or None


def _parse_spec(args: argparse.Namespace) -> Any:
    from fedblocks.export.models import MODEL_NAMES
    from fedblocks.export.pipeline import ExportSpec

    if args.model not in MODEL_NAMES:
        raise ExportError(f"unknown model '{args.model}': choose one of {', '.join(MODEL_NAMES)}")
    shape = parse_shape(args.input)
    engines = _list(args.engines) or ()
    stages = _list(args.stages)
    cuts = _list(getattr(args, "cuts", None))
    if cuts is not None and not getattr(args, "split", False):
        raise ExportError("--cuts needs --split")
    for option, items in (("--engines", engines), ("--stages", stages or ()), ("--cuts", cuts or ())):
        if len(set(items)) != len(items):
            raise ExportError(f"{option} names an item twice: {','.join(items)}")
    for engine in engines:
        if engine not in ENGINES:
            raise ExportError(f"unknown engine '{engine}' in --engines: choose from {', '.join(ENGINES)}")
    return ExportSpec(
        model=args.model,
        num_classes=_int(args.num_classes, "--num-classes", 2),
        input_shape=shape,
        batch_size=_int(args.batch_size, "--batch-size", 2),
        engines=engines,
        num_blocks=None if args.blocks is None else _int(args.blocks, "--blocks", 2),
        stages=stages,
        seed=_int(args.seed, "--seed", 0),
        split=bool(getattr(args, "split", False)),
        cuts=cuts,
    )


def summary(manifest: Manifest, out_dir: Path, built: list[str], seconds: float) -> dict[str, Any]:
    """The --json output: per stage, what the table shows."""
    return {
        "manifest": str(out_dir / "manifest.json"),
        "model": manifest.model.name,
        "num_blocks": manifest.model.num_blocks,
        "batch_size": manifest.batch_size,
        "engines": list(manifest.engines),
        "built": built,
        "cached": sum(len(s.artifacts) for s in manifest.stages) - len(built),
        "seconds": round(seconds, 2),
        "stages": [
            {
                "id": s.id,
                "kind": s.kind,
                "trainable_params": s.param_count("trainable"),
                "frozen_params": s.param_count("frozen"),
                "memory_total_bytes": s.memory.total_bytes,
                "flops_train_step": s.flops.train_step,
                "artifact_bytes": {e: sum(r.bytes for r in roles.values()) for e, roles in s.artifacts.items()},
            }
            for s in manifest.stages
        ],
        **({"split_cuts": [
            {"cut": c["cut"], "activation_shape": c["activation"]["shape"],
             "transfer_bytes_per_batch": c["transfer_bytes_per_batch"]["total"],
             "device_footprint_bytes": c["device"]["footprint_bytes"],
             "device_footprint_recompute_all_bytes": c["device"]["footprint_recompute_all_bytes"],
             "server_footprint_bytes": c["server"]["footprint_bytes"]}
            for c in manifest.split.cuts]} if manifest.split is not None else {}),
    }


def _table(data: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"{data['model']}: {data['num_blocks']} blocks, batch {data['batch_size']}")
    table.add_column("stage")
    table.add_column("trainable", justify="right")
    table.add_column("frozen", justify="right")
    table.add_column("footprint MB", justify="right")
    table.add_column("GFLOP/step", justify="right")
    for engine in data["engines"]:
        table.add_column(f"{engine} MB", justify="right")
    for s in data["stages"]:
        table.add_row(
            s["id"], f"{s['trainable_params']:,}", f"{s['frozen_params']:,}",
            f"{s['memory_total_bytes'] / 2**20:.1f}", f"{s['flops_train_step'] / 1e9:.2f}",
            *(f"{s['artifact_bytes'][e] / 2**20:.2f}" if e in s["artifact_bytes"] else "-" for e in data["engines"]),
        )
    return table


def _cut_table(data: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="SmartSplit cuts (predicted; per batch)")
    for name in ("cut", "activation", "transfer MB", "device MB", "device MB, recompute all", "server MB"):
        table.add_column(name, justify="left" if name in ("cut", "activation") else "right")
    for c in data["split_cuts"]:
        table.add_row(c["cut"], "x".join(str(d) for d in c["activation_shape"]),
                      f"{c['transfer_bytes_per_batch'] / 2**20:.2f}", f"{c['device_footprint_bytes'] / 2**20:.1f}",
                      f"{c['device_footprint_recompute_all_bytes'] / 2**20:.1f}",
                      f"{c['server_footprint_bytes'] / 2**20:.1f}")
    return table


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedblocks.export.pipeline import export_model_with_stats

    spec = _parse_spec(args)
    out_dir = Path(args.out)
    console = Console(stderr=True)
    start = time.perf_counter()
    with Progress(TextColumn("[bold]export[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label)

        manifest, built = export_model_with_stats(spec, out_dir, progress)
    data = summary(manifest, out_dir, built, time.perf_counter() - start)
    if args.json:
        json.dump(data, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        out = Console()
        out.print(_table(data))
        if "split_cuts" in data:
            out.print(_cut_table(data))
        out.print(f"wrote {data['manifest']} ({len(built)} built, {data['cached']} cached, {data['seconds']} s)")
    return 0
