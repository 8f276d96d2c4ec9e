"""The report's figures, drawn with matplotlib's SVG backend into inline <svg> text.

No pyplot (no global state, no display): each figure is a matplotlib Figure saved as SVG
with text kept as text (svg.fonttype none: small, searchable) and a per-figure id salt
so several figures can sit in one HTML page without clashing ids. Every figure that
shows energy names its source in its title.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedblocks.host.report.model import MODELLED_SOURCE, RunReport, is_measured, source_label

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
          "#bcbd22")
PHASE_COLORS = {"push": "#9ecae1", "load": "#fdae6b", "train": "#3182bd", "pull": "#6baed6", "aggregate": "#74c476",
                "eval": "#a1d99b", "host": "#bdbdbd"}
PHASE_LABELS = {"load": "load (shard + model)", "aggregate": "host: aggregate", "eval": "host: evaluate",
                "host": "host: other (scheduling, job start-up, polling)"}


@dataclass(frozen=True)
class Plot:
    id: str
    title: str
    svg: str
    caption: str


def _svg(fig: Figure, plot_id: str) -> str:
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"fedblocks-{plot_id}"}), \
            warnings.catch_warnings():
        # layout advice ("constrained_layout not applied ...") is cosmetic: not the user's business
        warnings.filterwarnings("ignore", category=UserWarning, module="matplotlib")
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    start = text.find("<svg")
    text = text[start:]
    # ids must be unique across the page: prefix every id and reference with the plot id
    text = re.sub(r'id="([^"]+)"', lambda m: f'id="{plot_id}-{m.group(1)}"', text)
    text = re.sub(r'url\(#([^)]+)\)', lambda m: f"url(#{plot_id}-{m.group(1)})", text)
    text = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{plot_id}-{m.group(1)}"', text)
    return text.replace("<svg ", f'<svg class="plot" data-plot="{plot_id}" role="img" ', 1)


def _fig(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _mark_stages(ax: Axes, run: RunReport, color: str, label_them: bool, by_time: bool) -> None:
    starts = {x.round: x.started_at for x in run.rounds}
    for i, (sid, first, _last) in enumerate(run.stage_spans()):
        if by_time:
            t = starts.get(first)
            if t is None:
                continue
            x = (t - run.t0) / 60.0
        else:
            x = first - 0.5
        if i > 0:
            ax.axvline(x, color=color, linestyle=":", linewidth=0.9, alpha=0.7)
        if label_them:
            ann = ax.annotate(sid, xy=(x, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -2),
                              textcoords="offset points", fontsize=7, rotation=90, va="top", color="#555555",
                              annotation_clip=True)
            ann.set_in_layout(False)  # a label must never squeeze the axes (one-round runs)


# ---------------------------------------------------------------------------- accuracy + EM
def accuracy_plot(runs: Sequence[RunReport]) -> Plot | None:
    if not any(x.accuracy is not None for r in runs for x in r.rounds):
        return None
    fig, (by_round, by_time) = _fig(12, 4.2, ncols=2)
    single = len(runs) == 1
    for i, r in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        pts = [x for x in r.rounds if x.accuracy is not None]
        by_round.plot([x.round for x in pts], [x.accuracy for x in pts], marker="o", markersize=3, color=color,
                      label=r.label)
        timed = [x for x in pts if x.ended_at is not None]
        by_time.plot([(x.ended_at - r.t0) / 60.0 for x in timed], [x.accuracy for x in timed], marker="o",
                     markersize=3, color=color, label=r.label)
        _mark_stages(by_round, r, color, single, by_time=False)
        _mark_stages(by_time, r, color, single, by_time=True)
    by_round.set_xlabel("round")
    by_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_time.set_xlabel("wall-clock time since the run started, min")
    for ax in (by_round, by_time):
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    by_round.legend(fontsize=8, loc="lower right")
    by_round.set_title("Accuracy vs round (dotted: stage boundaries)", fontsize=10)
    by_time.set_title("Accuracy vs wall-clock time", fontsize=10)
    return Plot("fig-accuracy", "Accuracy", _svg(fig, "fig-accuracy"),
                "Global test accuracy after aggregation (rounds.accuracy), host-evaluated; wall-clock = rounds.ended_at "
                "- runs.created_at. Dotted lines: the round a new stage starts (stages table).")


def em_plot(runs: Sequence[RunReport]) -> Plot | None:
    if not any(x.em is not None for r in runs for x in r.rounds):
        return None
    fig, (ax,) = _fig(12, 3.6)
    for i, r in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        pts = [x for x in r.rounds if x.em is not None]
        ax.plot([x.round for x in pts], [x.em for x in pts], marker=".", color=color, label=r.label)
        em_at = {x.round: x.em for x in pts}
        frozen = [(s.stage_id, s.frozen_at_round) for s in r.stages if s.frozen_at_round is not None]
        for j, (sid, rnd) in enumerate(frozen):
            y = em_at.get(rnd)
            ax.axvline(rnd, color=color, linestyle="--", linewidth=0.8, alpha=0.6)
            if y is not None:
                ax.plot([rnd], [y], marker="*", markersize=12, color=color,
                        label="block frozen" if i == 0 and j == 0 else None)
            ann = ax.annotate(f"{sid} frozen", xy=(rnd, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -2),
                              textcoords="offset points", fontsize=7, rotation=90, va="top", color=color,
                              annotation_clip=True)
            ann.set_in_layout(False)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("effective movement")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Effective movement of the active block (stars: freeze points)", fontsize=10)
    return Plot("fig-em", "Effective movement", _svg(fig, "fig-em"),
                "rounds.em (the strategy's effective-movement value); freeze points from stages.frozen_at_round.")


# ---------------------------------------------------------------------------- memory
def memory_plot(run: RunReport, pid: str) -> Plot | None:
    cells = run.memory
    if not cells:
        return None
    devices = list(dict.fromkeys(c.device for c in cells))
    stages = list(dict.fromkeys(c.stage_id for c in cells))
    width = 0.8 / max(1, len(stages))
    fig, (ax,) = _fig(max(7.0, 0.9 * len(devices) * max(1, len(stages)) ** 0.5 + 3), 4.4)
    by = {(c.device, c.stage_id): c for c in cells}
    labelled: set[str] = set()

    def once(name: str) -> str | None:
        if name in labelled:
            return None
        labelled.add(name)
        return name

    for di, dev in enumerate(devices):
        for si, sid in enumerate(stages):
            c = by.get((dev, sid))
            if c is None:
                continue
            x = di - 0.4 + width * (si + 0.5)
            color = COLORS[si % len(COLORS)]
            if c.excluded:
                ax.bar(x, c.predicted_mb or 0, width * 0.9, facecolor="none", edgecolor="#999999", hatch="//",
                       label=once("excluded by strategy (height: prediction)"))
            elif c.footprint_mb is not None:
                ax.bar(x, c.footprint_mb, width * 0.9, color=color, label=once(f"measured: {sid}"))
            elif c.predicted_mb is not None:  # not measured: a pale bar of the prediction, by stage
                ax.bar(x, c.predicted_mb, width * 0.9, color=color, alpha=0.3,
                       label=once(f"predicted, not measured: {sid}"))
            if c.predicted_mb is not None and not c.excluded:
                ax.plot([x - width * 0.45, x + width * 0.45], [c.predicted_mb] * 2, color="black", linewidth=2,
                        label=once("predicted (manifest)"))
            if c.oom_killed:
                ax.annotate("OOM", (x, c.footprint_mb or c.predicted_mb or 0), ha="center", va="bottom", fontsize=7,
                            color="#d62728")
        budgets = [by[(dev, s)].budget_mb for s in stages if (dev, s) in by and by[(dev, s)].budget_mb is not None]
        if budgets:
            ax.plot([di - 0.45, di + 0.45], [budgets[0]] * 2, color="#d62728", linestyle="--", linewidth=1.5,
                    label=once("budget"))
    ax.set_xticks(range(len(devices)), devices, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("MB")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    measured = any(c.footprint_mb is not None for c in cells)
    ax.set_title("Peak training footprint per device and stage" + ("" if measured else
                 " — NOT measured (prediction vs budget only)"), fontsize=10)
    return Plot(f"{pid}fig-memory", "Memory", _svg(fig, f"{pid}fig-memory"),
                "Bars: measured footprint (peak - baseline RSS of the training process, device_jobs.footprint_mb, max "
                "over jobs); black ticks: the manifest's prediction; red dashes: the device's budget; hatched: the "
                "strategy excluded the device from that stage (budget below the prediction).")


# ---------------------------------------------------------------------------- latency
def step_time_plot(run: RunReport, pid: str) -> Plot | None:
    devices = [d.key for d in run.devices]
    data = [[s * 1000 for j in run.jobs if j.device == dev for s in j.step_latency_s] for dev in devices]
    pairs = [(d, x) for d, x in zip(devices, data, strict=True) if x]
    if not pairs:
        return None
    modelled = any(j.latency_modelled for j in run.jobs)
    fig, (ax,) = _fig(max(6.0, 0.8 * len(pairs) + 2), 4.0)
    ax.boxplot([x for _, x in pairs], tick_labels=[d for d, _ in pairs], showfliers=True)
    ax.set_ylabel("step time, ms (forward + backward + update)")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Step-time distribution per device" + (" — MODELLED (simulated clients)" if modelled else
                                                        " — measured on the device"), fontsize=10)
    return Plot(f"{pid}fig-steps", "Step times", _svg(fig, f"{pid}fig-steps"),
                "metrics.json step_latency_s of every job on the device (monotonic clock), warm-up steps included.")


def round_time_plot(run: RunReport, pid: str) -> Plot | None:
    ts = [t for t in run.timings if t.wall_s is not None]
    if not ts:
        return None
    fig, (ax,) = _fig(max(7.0, 0.35 * len(ts) + 3), 3.8)
    bottom = [0.0] * len(ts)
    x = [t.round for t in ts]
    for phase in ("push", "load", "train", "pull", "aggregate", "eval", "host"):
        vals = [(t.host_s if phase == "host" else getattr(t, f"{phase}_s")) or 0.0 for t in ts]
        if not any(vals):
            continue
        label = PHASE_LABELS.get(phase, phase)
        ax.bar(x, vals, bottom=bottom, color=PHASE_COLORS[phase], label=label)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("seconds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Round-time breakdown (the slowest job's phases + host work)", fontsize=10)
    return Plot(f"{pid}fig-roundtime", "Round time", _svg(fig, f"{pid}fig-roundtime"),
                "Round wall time (host clock) split into the slowest job's push, load, train and pull (device_jobs, "
                "metrics.json), the host's aggregation and evaluation (rounds.aggregate_s, eval_s); the rest is "
                "other host work: scheduling, job start-up and polling, recording.")


# ---------------------------------------------------------------------------- energy
def _source_order(sources: Sequence[str]) -> list[str]:
    return sorted(sources, key=lambda s: (not is_measured(s), s != MODELLED_SOURCE, s))


def energy_round_plot(run: RunReport, pid: str) -> Plot | None:
    sources = _source_order(run.sources())
    if not sources:
        return None
    fig, axes = _fig(12, 3.4 * len(sources), nrows=len(sources))
    devices = [d.key for d in run.devices]
    for ax, source in zip(axes, sources, strict=True):
        for di, dev in enumerate(devices):
            per_round: dict[int, float] = {}
            for j in run.jobs:
                if j.device != dev:
                    continue
                for f in j.energy_figures():
                    if f.source == source:
                        per_round[j.row.round] = per_round.get(j.row.round, 0.0) + f.joules
            if per_round:
                rs = sorted(per_round)
                ax.plot(rs, [per_round[k] for k in rs], marker="o", markersize=3, color=COLORS[di % len(COLORS)],
                        label=dev)
        ax.set_ylabel("J per round")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncols=4)
        ax.set_title(f"Energy per round per device — {source_label(source)}", fontsize=10)
    return Plot(f"{pid}fig-energy-round", "Energy per round", _svg(fig, f"{pid}fig-energy-round"),
                "Joules of each device's training job(s) in each round, one panel per source (device_jobs.energy_j "
                "by energy_source; modelled panel: metrics.json energy_modelled). Sources are never added together.")


def energy_sample_plot(run: RunReport, pid: str) -> Plot | None:
    sources = _source_order(run.sources())
    if not sources:
        return None
    devices = [d.key for d in run.devices]
    fig, axes = _fig(max(6.0, 0.7 * len(devices) * len(sources) + 3), 3.8, ncols=len(sources))
    any_bar = False
    for ax, source in zip(axes, sources, strict=True):
        vals: list[float] = []
        names: list[str] = []
        for dev in devices:
            joules = samples = 0.0
            for j in run.jobs:
                if j.device != dev or not j.ok or not j.samples:
                    continue
                for f in j.energy_figures():
                    if f.source == source:
                        joules += f.joules
                        samples += j.samples
            if samples:
                names.append(dev)
                vals.append(joules / samples)
        if vals:
            any_bar = True
            ax.bar(range(len(vals)), vals, color="#2ca02c" if is_measured(source) else "#9e9ac8")
            ax.set_xticks(range(len(vals)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("J per training sample")
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"J / sample — {source_label(source)}", fontsize=10)
    if not any_bar:
        return None
    return Plot(f"{pid}fig-energy-sample", "Energy per sample", _svg(fig, f"{pid}fig-energy-sample"),
                "Sum of joules / sum of samples over each device's successful jobs, per source. Window energy "
                "(not idle-corrected); `fedblocks bench energy` gives idle-corrected figures.")


def battery_plot(run: RunReport, pid: str) -> Plot | None:
    jobs = [j for j in run.jobs if j.battery_drain_pct is not None or j.row.temp_end is not None]
    if not jobs:
        return None
    fig, (bat, temp) = _fig(12, 3.6, ncols=2)
    for di, d in enumerate(run.devices):
        js = [j for j in jobs if j.device == d.key]
        color = COLORS[di % len(COLORS)]
        drain = [(j.row.round, j.battery_drain_pct) for j in js if j.battery_drain_pct is not None]
        if drain:
            bat.plot([r for r, _ in drain], [v for _, v in drain], marker="o", markersize=3, linestyle="none",
                     color=color, label=d.key)
        tp = [(j.row.round, j.row.temp_start, j.row.temp_end) for j in js if j.row.temp_end is not None]
        if tp:
            temp.plot([r for r, _, _ in tp], [e for _, _, e in tp], marker="o", markersize=3, color=color,
                      label=d.key)
            temp.vlines([r for r, s, _ in tp if s is not None], [s for _, s, _ in tp if s is not None],
                        [e for _, s, e in tp if s is not None], color=color, alpha=0.4)
    bat.set_title("Battery drain per job (fuel-gauge capacity, %-points)", fontsize=10)
    bat.set_xlabel("round")
    bat.set_ylabel("battery start - end, %")
    temp.set_title("Temperature at job end (thermal zone; bar: from start)", fontsize=10)
    temp.set_xlabel("round")
    temp.set_ylabel("°C")
    for ax in (bat, temp):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, ncols=3)
    return Plot(f"{pid}fig-battery", "Battery and temperature", _svg(fig, f"{pid}fig-battery"),
                "device_jobs.battery_start/end (battery capacity %, read from sysfs by the device runtime) and "
                "temp_start/end (first thermal zone, °C). Integer battery levels hide small drains.")


def comparison_energy_plot(runs: Sequence[RunReport]) -> Plot | None:
    """J per training sample per run, one group per source (only with several runs)."""
    if len(runs) < 2:
        return None
    sources = _source_order(list({t.source for r in runs for t in r.summary.energy_totals}))
    if not sources:
        return None
    fig, axes = _fig(max(6.0, 2.2 * len(sources) + 2), 3.6, ncols=len(sources))
    for ax, source in zip(axes, sources, strict=True):
        vals = []
        for r in runs:
            t = next((t for t in r.summary.energy_totals if t.source == source), None)
            vals.append(t.joules_per_sample if t is not None and t.joules_per_sample is not None else 0.0)
        ax.bar(range(len(runs)), vals, color=[COLORS[i % len(COLORS)] for i in range(len(runs))])
        ax.set_xticks(range(len(runs)), [r.label for r in runs], rotation=15, ha="right", fontsize=8)
        ax.set_ylabel("J per training sample")
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{source_label(source)}", fontsize=10)
    return Plot("fig-compare-energy", "Energy per sample by run", _svg(fig, "fig-compare-energy"),
                "Total joules / total samples per run and source (all jobs with a figure of that source).")


def run_plots(run: RunReport, pid: str) -> list[Plot]:
    out = [memory_plot(run, pid), step_time_plot(run, pid), round_time_plot(run, pid), energy_round_plot(run, pid),
           energy_sample_plot(run, pid), battery_plot(run, pid)]
    return [p for p in out if p is not None]
