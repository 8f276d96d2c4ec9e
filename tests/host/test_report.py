"""`fedblocks report`: built from recorded runs (written through RunStore, tests/host/report_fixtures.py),
checked against the run store queried directly, rendered in headless Chromium."""

from __future__ import annotations

import csv
import json
import sqlite3
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from fedblocks.host.cli import main
from fedblocks.host.report import ReportResult, build_report
from fedblocks.host.report.model import load_runs

from .report_fixtures import write_exclusivefl_run, write_in_progress_run, write_profl_run

CHROMIUM = Path("/usr/bin/chromium")
RUN_FIGURES = ("fig-memory", "fig-steps", "fig-roundtime", "fig-energy-round", "fig-energy-sample", "fig-battery")
RUN_TABLES = ("rounds", "stages", "memory", "latency", "round_time", "energy_totals", "energy", "devices", "failures")


class PageParser(HTMLParser):
    """Collects tables (id -> column keys + rows of data-value strings), svg plots, figures, scripts, links."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict[str, Any]] = {}
        self.svgs: list[str] = []
        self.figures: list[str] = []
        self.scripts = 0
        self.external: list[str] = []
        self.svg_text: dict[str, list[str]] = {}
        self._table: str | None = None
        self._svg: str | None = None
        self._in_text = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id") or ""
            self.tables[self._table] = {"columns": [], "rows": []}
        elif tag == "th" and self._table is not None:
            self.tables[self._table]["columns"].append(a.get("data-key"))
        elif tag == "tr" and self._table is not None:
            self._row: list[str | None] = []
        elif tag == "td" and self._table is not None:
            self._row.append(a.get("data-value"))
        elif tag == "svg":
            self._svg = a.get("data-plot") or ""
            self.svgs.append(self._svg)
            self.svg_text[self._svg] = []
        elif tag == "figure":
            self.figures.append(a.get("id") or "")
        elif tag == "text" and self._svg is not None:
            self._in_text = True
        if tag in ("script", "iframe", "object", "embed"):
            self.scripts += 1
        for key in ("src", "href", "xlink:href"):
            v = a.get(key)
            if v and not v.startswith("#"):
                self.external.append(v)
        if tag == "link":
            self.external.append(a.get("href") or "link")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag == "tr" and self._table is not None and self._row:
            self.tables[self._table]["rows"].append(self._row)
            self._row = []
        elif tag == "svg":
            self._svg = None
        elif tag == "text":
            self._in_text = False

    def handle_data(self, data: str) -> None:
        if self._in_text and self._svg is not None:
            self.svg_text[self._svg].append(data)

    def rows(self, table: str) -> list[dict[str, str | None]]:
        t = self.tables[table]
        return [dict(zip(t["columns"], r, strict=True)) for r in t["rows"]]


def parse(path: Path) -> PageParser:
    p = PageParser()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def fnum(v: str | None) -> float | None:
    return None if v in (None, "null", "") else float(v)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {"profl": write_profl_run(root / "profl"), "exclusivefl": write_exclusivefl_run(root / "exclusivefl"),
            "in_progress": write_in_progress_run(root / "in_progress")}


@pytest.fixture(scope="module")
def single(recorded: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> ReportResult:
    out = tmp_path_factory.mktemp("single")
    return build_report([recorded["profl"]], out / "report.html", csv_dir=out / "csv", markdown=out / "summary.md")


@pytest.fixture(scope="module")
def compared(recorded: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> ReportResult:
    out = tmp_path_factory.mktemp("compare")
    return build_report([recorded["profl"], recorded["exclusivefl"], recorded["in_progress"]], out / "report.html",
                        csv_dir=out / "csv", markdown=out / "summary.md")


def db(run_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{run_dir / 'run.sqlite'}?mode=ro", uri=True)


# ---------------------------------------------------------------------------- structure
def test_page_is_self_contained_with_every_plot_and_table(single: ReportResult) -> None:
    page = parse(single.html)
    assert page.scripts == 0
    assert page.external == [], "the page must open offline: no external references"
    for fig in ("fig-accuracy", "fig-em", *RUN_FIGURES):
        assert fig in page.svgs, fig
        assert fig in page.figures, fig
        assert len(page.svg_text[fig]) > 3, f"{fig}: an SVG without axis text"
    for table in ("summary", *RUN_TABLES):
        assert table in page.tables, table
    assert set(single.plots) == set(page.svgs)
    # every energy figure names its source in its title
    energy_text = " ".join(page.svg_text["fig-energy-round"])
    assert "measured: fuel gauge" in energy_text and "modelled: power profile" in energy_text
    assert "measured: fuel gauge" in " ".join(page.svg_text["fig-energy-sample"])
    # stage boundaries and freeze points are labelled on the curves
    assert "grow-2" in " ".join(page.svg_text["fig-accuracy"])
    assert "grow-1 frozen" in " ".join(page.svg_text["fig-em"])


# ---------------------------------------------------------------------------- numbers = store
def test_rounds_and_summary_equal_the_store(single: ReportResult, recorded: dict[str, Path]) -> None:
    page = parse(single.html)
    with db(recorded["profl"]) as conn:
        rounds = conn.execute("SELECT round, stage_id, accuracy, em, ended_at - started_at FROM rounds "
                              "ORDER BY round").fetchall()
        final = conn.execute("SELECT round, accuracy FROM rounds WHERE accuracy IS NOT NULL "
                             "ORDER BY round DESC LIMIT 1").fetchone()
        peak = conn.execute("SELECT max(footprint_mb) FROM device_jobs").fetchone()[0]
        ok, total = conn.execute("SELECT sum(status = 'ok'), count(*) FROM device_jobs").fetchone()
    shown = page.rows("rounds")
    assert [(int(r["round"]), r["stage"], fnum(r["accuracy"]), fnum(r["em"])) for r in shown] == \
        [(r[0], r[1], r[2], r[3]) for r in rounds]
    assert [fnum(r["duration_s"]) for r in shown] == pytest.approx([r[4] for r in rounds], abs=1e-3)
    summary = {r["metric"]: r["run1"] for r in page.rows("summary")}
    assert summary["final accuracy (round)"] == f"{final[1]:.4f} (round {final[0]})"
    assert summary["device jobs: ok / total"] == f"{ok} / {total}"
    assert summary["peak training footprint, MB (device, budget)"].startswith(f"{peak:.1f} (")


def test_energy_equals_the_store_per_source(single: ReportResult, recorded: dict[str, Path]) -> None:
    page = parse(single.html)
    with db(recorded["profl"]) as conn:
        measured = conn.execute("SELECT energy_source, sum(energy_j), count(*) FROM device_jobs "
                                "WHERE energy_j IS NOT NULL GROUP BY energy_source").fetchall()
        modelled = conn.execute("SELECT sum(json_extract(metrics_json, '$.energy_modelled.joules')), count(*) "
                                "FROM device_jobs").fetchone()
        ok_fg = conn.execute("SELECT sum(energy_j), sum(samples) FROM device_jobs WHERE status = 'ok' "
                             "AND energy_source = 'fuel_gauge'").fetchone()
        per_job = conn.execute("SELECT round, serial, energy_j FROM device_jobs ORDER BY id").fetchall()
    assert [m[0] for m in measured] == ["fuel_gauge"]
    totals = {r["source"]: r for r in page.rows("energy_totals")}
    assert set(totals) == {"fuel_gauge", "modelled"}, "measured and modelled must stay separate totals"
    assert fnum(totals["fuel_gauge"]["joules"]) == pytest.approx(measured[0][1], abs=1e-5)
    assert int(totals["fuel_gauge"]["jobs"]) == measured[0][2]
    assert fnum(totals["modelled"]["joules"]) == pytest.approx(modelled[0], abs=1e-5)
    assert fnum(totals["fuel_gauge"]["joules_per_sample"]) == pytest.approx(ok_fg[0] / ok_fg[1], rel=1e-6)
    # the summary carries one energy row per source, never a sum of both
    summary = {r["metric"]: r["run1"] for r in page.rows("summary")}
    assert fnum(summary["energy total, J — measured: fuel gauge"]) == pytest.approx(measured[0][1], abs=1e-3)
    assert fnum(summary["energy total, J — modelled: power profile"]) == pytest.approx(modelled[0], abs=1e-3)
    assert not any(k.startswith("energy total") and "measured" in k and "modelled" in k for k in summary)
    # per job: the measured rows are exactly the store's energy_j
    fg_rows = [(int(r["round"]), r["device"], fnum(r["joules"])) for r in page.rows("energy")
               if r["source"] == "fuel_gauge"]
    assert [(a, b) for a, b, _ in fg_rows] == [(r[0], r[1]) for r in per_job]
    assert [c for _, _, c in fg_rows] == pytest.approx([r[2] for r in per_job], abs=1e-5)


def test_memory_latency_devices_equal_the_store(single: ReportResult, recorded: dict[str, Path]) -> None:
    page = parse(single.html)
    with db(recorded["profl"]) as conn:
        mem = conn.execute("SELECT serial, stage_id, max(footprint_mb), max(predicted_footprint_mb), max(budget_mb), "
                           "count(*) FROM device_jobs GROUP BY serial, stage_id").fetchall()
        fails = dict(conn.execute("SELECT serial, count(*) FROM device_jobs WHERE status != 'ok' "
                                  "GROUP BY serial").fetchall())
        runs = dict(conn.execute("SELECT serial, count(*) FROM device_jobs GROUP BY serial").fetchall())
        devices = conn.execute("SELECT serial, model, soc, ram_mb, budget_mb FROM devices").fetchall()
        steps: dict[str, list[float]] = {}
        for serial, m in conn.execute("SELECT serial, metrics_json FROM device_jobs"):
            steps.setdefault(serial, []).extend(json.loads(m)["step_latency_s"])
    shown = {(r["device"], r["stage"]): r for r in page.rows("memory")}
    for serial, stage, footprint, predicted, budget, jobs in mem:
        row = shown[(serial, stage)]
        assert fnum(row["footprint_mb"]) == pytest.approx(footprint, abs=1e-3)
        assert fnum(row["predicted_mb"]) == pytest.approx(predicted, abs=1e-3)
        assert fnum(row["budget_mb"]) == pytest.approx(budget, abs=1e-3)
        assert int(row["jobs"]) == jobs
    # the 380 MB phone never got grow-3 (520 MB predicted): marked excluded by the strategy
    excluded = [k for k, r in shown.items() if r["state"] and r["state"].startswith("excluded")]
    assert excluded == [("ZY22G7K9Q", "grow-3")]
    dev = {r["device"]: r for r in page.rows("devices")}
    for serial, model, soc, ram, budget in devices:
        assert (dev[serial]["model"], dev[serial]["soc"]) == (model, soc)
        assert fnum(dev[serial]["ram_mb"]) == ram and fnum(dev[serial]["budget_mb"]) == budget
        assert int(dev[serial]["jobs"]) == runs[serial]
        assert int(dev[serial]["failed"]) == fails.get(serial, 0)
    assert "oom_killed" in dev["ZY22G7K9Q"]["failure_reasons"] and "low-memory kill" in dev["ZY22G7K9Q"][
        "failure_reasons"]
    assert "straggler" in dev["R58M1234ABC"]["failure_reasons"]
    lat = {r["device"]: r for r in page.rows("latency")}
    for serial, values in steps.items():
        assert fnum(lat[serial]["step_median_s"]) == pytest.approx(statistics.median(values), abs=1e-6)
        assert int(lat[serial]["steps"]) == len(values)


def test_csv_equals_html(single: ReportResult) -> None:
    page = parse(single.html)
    assert sorted(p.stem for p in single.csv_files) == sorted(page.tables)
    for path in single.csv_files:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        html_rows = page.tables[path.stem]["rows"]
        assert len(rows) - 1 == len(html_rows), path.name
        for got, want in zip(rows[1:], html_rows, strict=True):
            for g, w in zip(got, want, strict=True):
                if w == "null":
                    assert g == ""
                elif g.replace(".", "", 1).replace("-", "", 1).replace("e", "", 1).isdigit():
                    assert float(g) == float(w), (path.name, g, w)
                else:
                    assert g == w, (path.name, g, w)
    md = single.markdown.read_text(encoding="utf-8") if single.markdown else ""
    assert "| metric |" in md and "final accuracy (round)" in md and "never summed" in md


# ---------------------------------------------------------------------------- robustness + comparison
def test_comparison_failed_modelled_only_and_in_progress(compared: ReportResult, recorded: dict[str, Path]) -> None:
    page = parse(compared.html)
    labels = [r.label for r in compared.runs]
    assert page.tables["summary"]["columns"] == ["metric", "run1", "run2", "run3"]
    legend = " ".join(page.svg_text["fig-accuracy"])
    assert all(label in legend for label in labels), "accuracy curves of every run overlaid"
    assert "fig-compare-energy" in page.svgs
    for i in (1, 2, 3):
        for table in RUN_TABLES:
            assert f"run{i}-{table}" in page.tables
    notes = {r.label: " ".join(n.text for n in r.notes) for r in compared.runs}
    profl, excl, progress = labels
    # failed devices
    assert "oom_killed" in notes[profl] and "straggler" in notes[profl]
    assert len(page.rows("run1-failures")) == 2
    # only modelled energy: said so, no measured figure anywhere in that run
    assert "no MEASURED energy" in notes[excl]
    assert {r["source"] for r in page.rows("run2-energy")} == {"modelled"}
    assert {r["kind"] for r in page.rows("run2-energy")} == {"modelled"}
    summary = {r["metric"]: r for r in page.rows("summary")}
    assert summary["energy total, J — measured: fuel gauge"]["run2"] == "null"
    assert "not measured" in notes[excl]
    excluded = {r["device"] for r in page.rows("run2-memory") if (r["state"] or "").startswith("excluded")}
    assert excluded == {"client-2", "client-3"}
    # still in progress: said so; the partial round is there with no end time and no accuracy
    assert "still in progress" in notes[progress] and "round(s) 3 have no end time" in notes[progress]
    r3 = page.rows("run3-rounds")[-1]
    assert (r3["round"], r3["duration_s"], r3["accuracy"]) == ("3", "null", "null")
    assert summary["status"]["run3"] == "running (in progress)"
    assert summary["rounds recorded / planned"]["run3"] == "3 / 5"
    with db(recorded["in_progress"]) as conn:
        assert conn.execute("SELECT finished_at FROM runs").fetchone()[0] is None
    md = compared.markdown.read_text(encoding="utf-8") if compared.markdown else ""
    assert "still in progress" in md and "no MEASURED energy" in md and " vs " in md


def test_a_comparison_directory_expands_to_its_runs(recorded: dict[str, Path]) -> None:
    runs = load_runs([recorded["profl"].parent])
    assert sorted(r.run_dir.name for r in runs) == ["exclusivefl", "in_progress", "profl"]


def test_not_a_run_dir_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        assert main(["report", str(bad), "--out", str(tmp_path / "r.html")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(bad) in err and "Traceback" not in err
    assert not (tmp_path / "r.html").exists()


def test_cli_json(recorded: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(recorded["exclusivefl"]), "--out", str(tmp_path / "r.html"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["html"] == str(tmp_path / "r.html") and (tmp_path / "r.html").is_file()
    (run,) = out["runs"]
    assert set(run["energy_j"]) == {"modelled"} and run["final_accuracy"] == pytest.approx(0.42)


# ---------------------------------------------------------------------------- headless Chromium
@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed (Debian package `chromium`)")
def test_opens_in_headless_chromium(compared: ReportResult, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1400,4000",
           compared.html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size == (1400, 4000)
        rgb = img.convert("RGB")
        colors = rgb.getcolors(maxcolors=1 << 20) or []
        non_white = sum(n for n, c in colors if sum(c) < 720)
    assert len(colors) > 200, "a near-uniform screenshot: the page did not render"
    assert non_white > 0.05 * 1400 * 4000, "the screenshot is almost blank"


def test_a_run_with_nothing_recorded_yet_and_a_flat_config(tmp_path: Path) -> None:
    from dataclasses import asdict

    from fedblocks.host.loop import RunSettings
    from fedblocks.host.store import RunStore

    RunStore.create(tmp_path / "new", asdict(RunSettings(strategy="fedavg", rounds=7))).close()
    result = build_report([tmp_path / "new"], tmp_path / "r.html", csv_dir=tmp_path / "csv")
    (run,) = result.runs
    assert (run.strategy, run.model, run.summary.rounds_planned) == ("fedavg", "resnet8", 7)
    notes = " ".join(n.text for n in run.notes)
    assert "still in progress" in notes and "no rounds recorded yet" in notes
    page = parse(result.html)
    assert page.svgs == [] and page.tables["rounds"]["rows"] == []
    assert "No evaluated round yet" in result.html.read_text(encoding="utf-8")


def test_a_file_that_is_not_a_run_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.sqlite").write_bytes(b"this is not sqlite" * 100)
    assert main(["report", str(tmp_path / "bad"), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run.sqlite" in err


def test_a_device_excluded_after_it_ran_the_stage_is_marked(tmp_path: Path) -> None:
    """ExclusiveFL on phones: the prediction fits every budget, round 1 measures more (oom_killed),
    and from round 2 the loop plans with the measured footprint and records whom that excluded."""
    from dataclasses import asdict

    from fedblocks.host.loop import RunSettings
    from fedblocks.host.report.model import load_run
    from fedblocks.host.store import DeviceJobRow, DeviceRow, RoundRow, RunStore

    settings = RunSettings(strategy="exclusivefl", rounds=2, num_clients=2, testbed="virtual",
                           budgets_mb=(60.0, 100.0))
    store = RunStore.create(tmp_path / "run", asdict(settings))
    for serial, budget in (("127.0.0.1:7001", 60.0), ("127.0.0.1:7002", 100.0)):
        store.record_device(DeviceRow(serial=serial, model="Virtual M4", budget_mb=budget))
    store.record_round(RoundRow(round=1, stage_id="full", selected=2, completed=1, failed=1))
    store.record_device_job(DeviceJobRow(round=1, status="oom_killed", client=0, serial="127.0.0.1:7001",
                                         stage_id="full", predicted_footprint_mb=33.0, budget_mb=60.0))
    store.record_device_job(DeviceJobRow(round=1, status="ok", client=1, serial="127.0.0.1:7002", stage_id="full",
                                         footprint_mb=80.0, predicted_footprint_mb=33.0, budget_mb=100.0))
    store.log_event("clients_excluded", "full: 1 client(s) excluded", data={
        "round": 2, "stage": "full", "clients": [0], "footprint_mb": 80.0, "serials": ["127.0.0.1:7001"]})
    store.close()
    run = load_run(tmp_path / "run")
    cells = {(c.device, c.stage_id): c for c in run.memory}
    assert cells[("127.0.0.1:7001", "full")].excluded and cells[("127.0.0.1:7001", "full")].oom_killed == 1
    assert not cells[("127.0.0.1:7002", "full")].excluded
    devices = {d.key: d for d in run.devices}
    assert devices["127.0.0.1:7001"].excluded_from == ("full",) and devices["127.0.0.1:7002"].excluded_from == ()
