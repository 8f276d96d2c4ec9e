"""`fedblocks run CONFIG [--out RUN_DIR] [--resume RUN_DIR] [--compare NAME,...] [--json]`.

Runs one federated experiment (host/loop.py) with progress bars for rounds and
device jobs, then prints a summary table. Comparing strategies: list them in the
config's `[strategy] compare_with = ["exclusivefl"]` (or pass `--compare`); each
strategy then runs back to back on the same data, clients and seed into
RUN_DIR/<strategy>/, and one table compares them (compared strategies run with
their default parameters).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from fedblocks.host.errors import HostError

COMPARE_KEY = "compare_with"


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="run a federated experiment from a TOML config",
                       description="Run a federated experiment (rounds on simulated, virtual or real phones).")
    p.add_argument("config", type=Path, help="experiment TOML (see docs/run.md, examples/quickstart.toml)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<name>-<time>)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--compare", default=None, metavar="NAME[,NAME]",
                   help="also run these strategies (default parameters) for comparison")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON on stdout")
    p.set_defaults(func=run_command)


def _strategy_names(cfg: Any, compare_arg: str | None) -> tuple[Any, list[str]]:
    """The config without the compare key, and the strategies to compare with."""
    from fedblocks.host.config import StrategyConfig
    from fedblocks.host.strategies import STRATEGIES

    params = dict(cfg.strategy.params)
    compare = params.pop(COMPARE_KEY, ())
    if isinstance(compare, str):
        compare = (compare,)
    if not isinstance(compare, (list, tuple)) or not all(isinstance(c, str) for c in compare):
        raise HostError(f"config: strategy.{COMPARE_KEY}: must be a list of strategy names, got {compare!r}")
    names = list(compare)
    if compare_arg:
        names += [n.strip() for n in compare_arg.split(",") if n.strip()]
    for n in names:
        if n not in STRATEGIES:
            raise HostError(f"config: strategy.{COMPARE_KEY}: unknown strategy {n!r} (choose {', '.join(STRATEGIES)})")
    names = [n for i, n in enumerate(names) if n != cfg.strategy.name and n not in names[:i]]
    cfg = dataclasses.replace(cfg, strategy=StrategyConfig(cfg.strategy.name, params))
    return cfg, names


def plan_runs(cfg: Any, compare: list[str], run_dir: Path) -> list[tuple[Any, Path]]:
    """(config, run dir) for each strategy to run: one run in RUN_DIR, or one sub-directory each."""
    from fedblocks.host.config import StrategyConfig

    if not compare:
        return [(cfg, run_dir)]
    runs = [(cfg, run_dir / cfg.strategy.name)]
    for name in compare:
        runs.append((dataclasses.replace(cfg, strategy=StrategyConfig(name, {})), run_dir / name))
    return runs


class RichProgress:
    """Progress bars (rounds, jobs of the current round) on stderr."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.enabled = enabled
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=self.console, disable=not enabled)
        self.rounds_task: Any = None
        self.jobs_task: Any = None

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def run_started(self, total_rounds: int, label: str) -> None:
        if self.rounds_task is not None:
            self.bars.remove_task(self.rounds_task)
        if self.jobs_task is not None:
            self.bars.remove_task(self.jobs_task)
            self.jobs_task = None
        self.rounds_task = self.bars.add_task(f"rounds ({label})", total=total_rounds)

    def round_started(self, rnd: int, plan: Any) -> None:
        if self.jobs_task is not None:
            self.bars.remove_task(self.jobs_task)
        self.jobs_task = self.bars.add_task(f"  round {rnd} {plan.stage_id}: jobs", total=len(plan.client_ids))

    def job_finished(self, rnd: int, client_id: int, status: str) -> None:
        if self.jobs_task is not None:
            self.bars.advance(self.jobs_task)

    def round_finished(self, record: Any) -> None:
        if self.rounds_task is not None:
            self.bars.update(self.rounds_task, completed=record.round)
        if self.enabled:
            acc = "-" if record.accuracy is None else f"{100 * record.accuracy:.1f}%"
            bad = len(record.rejected) + len(record.stragglers)
            extra = f", {bad} excluded" if bad else ""
            em = next((e for e in record.events if e.get("kind") == "effective_movement"), None)
            em_text = "" if em is None or em.get("em") is None else f", EM {em['em']:.2f}"
            self.bars.console.print(f"round {record.round:3d} {record.stage_id:9s} clients {len(record.accepted)}/"
                                    f"{len(record.selected)}{extra}, accuracy {acc}{em_text}")

    def message(self, text: str) -> None:
        if self.enabled:
            self.bars.console.print(f"[dim]{text}[/dim]")


def summary_table(summaries: list[Any]) -> Any:
    from rich.table import Table

    table = Table(title="fedblocks run")
    for col in ("strategy", "rounds", "final accuracy", "participating clients", "peak footprint (MB)",
                "energy (J)"):
        table.add_column(col)
    for s in summaries:
        name = s.strategy + ("" if s.respects_budgets else " (unconstrained reference)")
        acc = "-" if s.final_accuracy is None else f"{100 * s.final_accuracy:.1f}%"
        fp = f"{s.peak_predicted_footprint_mb:.1f} predicted"
        if s.peak_measured_footprint_mb is not None:
            fp += f" / {s.peak_measured_footprint_mb:.1f} measured"
        energy = "-" if s.energy_j is None else f"{s.energy_j:.1f} ({', '.join(s.energy_sources) or '?'})"
        table.add_row(name, str(s.rounds_completed), acc, f"{s.participating_clients}/{s.total_clients}", fp,
                      energy)
    return table


def run_command(args: argparse.Namespace) -> int:
    from fedblocks.host.config import load_config
    from fedblocks.host.loop import run_experiment

    cfg = load_config(args.config)
    cfg, compare = _strategy_names(cfg, args.compare)
    if args.resume is not None and args.out is not None:
        raise HostError("give either --out (a new run) or --resume RUN_DIR (continue one), not both")
    resume = args.resume is not None
    run_dir = args.resume if resume else (args.out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if resume and not run_dir.is_dir():
        raise HostError(f"--resume {run_dir}: no such run directory")
    summaries = []
    with RichProgress(enabled=not args.json) as progress:
        for run_cfg, sub_dir in plan_runs(cfg, compare, run_dir):
            sub_resume = resume and (sub_dir / "checkpoint" / "state.json").exists()
            progress.message(f"{run_cfg.strategy.name}: {'resuming' if sub_resume else 'running'} in {sub_dir}")
            summaries.append(run_experiment(run_cfg, sub_dir, resume=sub_resume, progress=progress))
    if args.json:
        json.dump({"runs": [s.to_dict() for s in summaries]}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        from rich.console import Console

        console = Console()
        console.print(summary_table(summaries))
        for s in summaries:
            console.print(f"{s.strategy}: {s.run_dir} (fedblocks report {s.run_dir})")
    return 0
