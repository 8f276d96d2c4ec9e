"""Run store: typed round trips through SQLite, versioned schema, concurrent writers."""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from pathlib import Path

import pytest

from fedblocks.host.config import parse_config
from fedblocks.host.errors import HostError
from fedblocks.host.store import (
    DB_NAME,
    SCHEMA_VERSION,
    DeviceJobRow,
    DeviceRow,
    RoundRow,
    RunStore,
    StageRow,
)

CONFIG = {
    "name": "store-test",
    "model": {"name": "resnet8"},
    "dataset": {"name": "fsdd"},
    "clients": {"count": 4, "budget_mb": [100, 900]},
    "strategy": {"name": "fedavg"},
    "training": {"rounds": 3, "seed": 11},
}


def _job(round_: int, client: int, **extra: object) -> DeviceJobRow:
    metrics = {"samples": 64, "loss": [2.3, 1.9], "peak_rss_mb": 412.5}
    fields = {
        "round": round_, "status": "ok", "client": client, "serial": f"emulator-{5554 + 2 * client}",
        "stage_id": "grow-1", "job_id": f"r{round_}-c{client}-grow-1", "samples": 64, "loss_first": 2.3,
        "loss_last": 1.9, "step_time_median_s": 0.21, "model_load_s": 0.05, "baseline_rss_mb": 80.0,
        "peak_rss_mb": 412.5, "footprint_mb": 332.5, "predicted_footprint_mb": 300.0, "budget_mb": 512.0,
        "energy_j": 12.5, "energy_source": "modelled", "battery_start": 80.0, "battery_end": 79.0,
        "temp_start": 31.0, "temp_end": 35.5, "push_s": 0.4, "train_s": 7.9, "pull_s": 0.2,
        "bundle_path": f"bundles/r{round_}-c{client}", "metrics_json": json.dumps(metrics),
    }
    fields.update(extra)
    return DeviceJobRow(**fields)  # type: ignore[arg-type]


def test_create_and_round_trip_every_table(tmp_path: Path) -> None:
    cfg = parse_config(CONFIG)
    run_dir = tmp_path / "run"
    with RunStore.create(run_dir, cfg, manifest_path="export/manifest.json") as store:
        store.record_device(DeviceRow("emulator-5554", "Pixel 7", "gs201", "arm64-v8a", 8192.0, 512.0, "flagship-8gb"))
        store.record_stage(StageRow("grow-1", "grow", block=1, first_round=1))
        store.record_round(RoundRow(1, "grow-1", started_at=100.0, selected=2))
        job_id = store.record_device_job(_job(1, 0))
        store.record_device_job(_job(1, 1, status="oom_killed", reason="peak 950 MB > budget 512 MB"))
        store.update_round(1, ended_at=130.0, completed=1, failed=1, accuracy=0.31, loss=1.87, em=0.92)
        store.update_stage("grow-1", last_round=1, frozen_at_round=1)
        store.log_event("block_frozen", "block 1 converged", data={"em": 0.05})
        store.record_checkpoint(1, "checkpoints/r1.npz", "ab" * 32)
        store.set_status("running")

    store = RunStore.open(run_dir)
    run = store.run()
    assert run.name == "store-test" and run.seed == 11 and run.status == "running"
    assert run.manifest_path == "export/manifest.json" and run.finished_at is None
    assert parse_config(run.config()) == cfg
    assert store.devices() == [DeviceRow("emulator-5554", "Pixel 7", "gs201", "arm64-v8a", 8192.0, 512.0, "flagship-8gb")]
    assert store.stages() == [StageRow("grow-1", "grow", 1, 1, 1, 1)]
    assert store.rounds() == [RoundRow(1, "grow-1", 100.0, 130.0, 2, 1, 1, 0.31, 1.87, 0.92, None)]
    jobs = store.device_jobs(round=1)
    assert [j.status for j in jobs] == ["ok", "oom_killed"] and jobs[0].id == job_id
    assert jobs[0] == _job(1, 0, id=job_id)
    assert jobs[0].metrics() == {"samples": 64, "loss": [2.3, 1.9], "peak_rss_mb": 412.5}
    assert store.device_jobs(status="oom_killed")[0].reason == "peak 950 MB > budget 512 MB"
    assert store.device_jobs(serial="emulator-5556")[0].client == 1
    (event,) = store.events(kind="block_frozen")
    assert event.level == "info" and event.data() == {"em": 0.05}
    assert store.latest_checkpoint() is not None and store.latest_checkpoint().round == 1  # type: ignore[union-attr]
    store.set_status("finished")
    assert store.run().status == "finished" and store.run().finished_at is not None
    store.close()


def test_schema_version_wal_and_plain_sql_readers(tmp_path: Path) -> None:
    RunStore.create(tmp_path, CONFIG).close()
    conn = sqlite3.connect(tmp_path / DB_NAME)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "rounds", "stages", "device_jobs", "devices", "events", "checkpoints"} <= tables
    conn.close()


def test_a_version_1_store_is_upgraded_in_place(tmp_path: Path) -> None:
    """Run stores written before schema 2 (no rounds.aggregate_s / eval_s, no devices.client) open,
    gain the columns, and keep their rows."""
    with RunStore.create(tmp_path, CONFIG) as store:
        store.record_round(RoundRow(round=1, stage_id="full", accuracy=0.5))
        store.record_device(DeviceRow(serial="R58M", model="SM-A525F"))
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.executescript("ALTER TABLE rounds DROP COLUMN aggregate_s; ALTER TABLE rounds DROP COLUMN eval_s; "
                       "ALTER TABLE devices DROP COLUMN client; ALTER TABLE device_jobs DROP COLUMN cut; "
                       "ALTER TABLE device_jobs DROP COLUMN bytes_up; ALTER TABLE device_jobs DROP COLUMN bytes_down; "
                       "PRAGMA user_version = 1;")
    conn.close()
    with RunStore.open(tmp_path) as store:
        assert store.get_round(1) == RoundRow(round=1, stage_id="full", accuracy=0.5)
        assert store.devices() == [DeviceRow(serial="R58M", model="SM-A525F")]
        store.record_round(RoundRow(round=2, stage_id="full", aggregate_s=0.01, eval_s=0.2))
        assert store.get_round(2).eval_s == 0.2
    conn = sqlite3.connect(tmp_path / DB_NAME)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    conn.close()


def test_bad_run_directories_are_host_errors(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="not a run directory"):
        RunStore.open(tmp_path)
    RunStore.create(tmp_path / "a", CONFIG).close()
    with pytest.raises(HostError, match="already holds a run"):
        RunStore.create(tmp_path / "a", CONFIG)
    conn = sqlite3.connect(tmp_path / "a" / DB_NAME)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(HostError, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
        RunStore.open(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / DB_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(HostError, match="not a fedblocks run database"):
        RunStore.open(tmp_path / "b")
    (tmp_path / "c").mkdir()
    foreign = sqlite3.connect(tmp_path / "c" / DB_NAME)
    foreign.execute("CREATE TABLE t (x)")
    foreign.commit()
    foreign.close()
    with pytest.raises(HostError, match="not a fedblocks run store"):
        RunStore.open(tmp_path / "c")


def test_invalid_values_are_refused_and_non_finite_become_null(tmp_path: Path) -> None:
    with RunStore.create(tmp_path, CONFIG) as store:
        with pytest.raises(ValueError, match="device job status must be one of"):
            store.record_device_job(_job(1, 0, status="exploded"))
        with pytest.raises(ValueError, match="event level"):
            store.log_event("x", "y", level="loud")
        with pytest.raises(ValueError, match="cannot update column"):
            store.update_round(1, bogus=1)
        with pytest.raises(ValueError, match="no row"):
            store.update_round(99, accuracy=0.5)
        store.record_device_job(_job(2, 0, energy_j=math.nan, peak_rss_mb=math.inf))
        (job,) = store.device_jobs(round=2)
        assert job.energy_j is None and job.peak_rss_mb is None


def test_concurrent_writers_and_a_reader(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path, CONFIG)
    threads_n, per_thread = 8, 40
    errors: list[BaseException] = []
    stop = threading.Event()

    def device_thread(client: int) -> None:
        try:
            for r in range(per_thread):
                store.record_device_job(_job(r, client))
                store.log_event("job_done", f"client {client} round {r}", data={"client": client})
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def loop_thread() -> None:
        try:
            for r in range(per_thread):
                store.record_round(RoundRow(r, "grow-1", started_at=float(r), selected=threads_n))
                store.update_round(r, completed=threads_n)
        except BaseException as exc:
            errors.append(exc)

    def outside_reader() -> None:  # another process's view: its own connection, WAL snapshots
        conn = sqlite3.connect(tmp_path / DB_NAME, timeout=30)
        while not stop.is_set():
            conn.execute("SELECT count(*) FROM device_jobs").fetchone()
        conn.close()

    workers = [threading.Thread(target=device_thread, args=(c,)) for c in range(threads_n)]
    workers.append(threading.Thread(target=loop_thread))
    reader = threading.Thread(target=outside_reader)
    reader.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    reader.join()
    assert not errors, errors
    jobs = store.device_jobs()
    assert len(jobs) == threads_n * per_thread
    assert len({j.id for j in jobs}) == len(jobs)
    assert len(store.events(kind="job_done")) == threads_n * per_thread
    assert [r.completed for r in store.rounds()] == [threads_n] * per_thread
    store.close()
