"""The run store: one SQLite database per run directory (RUN_DIR/run.sqlite), schema in docs/run_store.md.

One connection, guarded by a lock, serves every thread: the round loop and the device-job
threads that report results all write through it, and each write is its own committed
transaction. WAL mode lets `fedblocks report` read a run while it is still being written.
Times are unix seconds (UTC) as REAL; memory in MB (2**20 bytes); energy in joules.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from fedblocks.host.config import ExperimentConfig
from fedblocks.host.errors import HostError

DB_NAME = "run.sqlite"
SCHEMA_VERSION = 3
RUN_STATUSES: tuple[str, ...] = ("created", "running", "finished", "failed", "interrupted")
JOB_STATUSES: tuple[str, ...] = ("ok", "oom_killed", "failed", "straggler", "rejected")
EVENT_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")

# version -> the statements that take a store from it to version + 1 (columns are only ever added)
_MIGRATIONS = {
    1: "ALTER TABLE rounds ADD COLUMN aggregate_s REAL; ALTER TABLE rounds ADD COLUMN eval_s REAL; "
       "ALTER TABLE devices ADD COLUMN client INTEGER;",
    2: "ALTER TABLE device_jobs ADD COLUMN cut TEXT; ALTER TABLE device_jobs ADD COLUMN bytes_up INTEGER; "
       "ALTER TABLE device_jobs ADD COLUMN bytes_down INTEGER;",
}

_SCHEMA = f"""
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    config_json TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'created' CHECK (status IN {RUN_STATUSES!r}),
    manifest_path TEXT,
    seed INTEGER,
    finished_at REAL
);
CREATE TABLE rounds (
    run INTEGER NOT NULL REFERENCES runs(id),
    round INTEGER NOT NULL,
    stage_id TEXT,
    started_at REAL,
    ended_at REAL,
    selected INTEGER,
    completed INTEGER,
    failed INTEGER,
    accuracy REAL,
    loss REAL,
    em REAL,
    notes TEXT,
    aggregate_s REAL,
    eval_s REAL,
    PRIMARY KEY (run, round)
);
CREATE TABLE stages (
    run INTEGER NOT NULL REFERENCES runs(id),
    stage_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    block INTEGER,
    first_round INTEGER,
    last_round INTEGER,
    frozen_at_round INTEGER,
    PRIMARY KEY (run, stage_id)
);
CREATE TABLE device_jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run INTEGER NOT NULL REFERENCES runs(id),
    round INTEGER NOT NULL,
    client INTEGER,
    serial TEXT,
    stage_id TEXT,
    job_id TEXT,
    status TEXT NOT NULL CHECK (status IN {JOB_STATUSES!r}),
    reason TEXT,
    samples INTEGER,
    loss_first REAL,
    loss_last REAL,
    step_time_median_s REAL,
    model_load_s REAL,
    baseline_rss_mb REAL,
    peak_rss_mb REAL,
    footprint_mb REAL,
    predicted_footprint_mb REAL,
    budget_mb REAL,
    energy_j REAL,
    energy_source TEXT,
    battery_start REAL,
    battery_end REAL,
    temp_start REAL,
    temp_end REAL,
    push_s REAL,
    train_s REAL,
    pull_s REAL,
    bundle_path TEXT,
    metrics_json TEXT,
    cut TEXT,
    bytes_up INTEGER,
    bytes_down INTEGER
);
CREATE INDEX device_jobs_by_round ON device_jobs (run, round);
CREATE TABLE devices (
    run INTEGER NOT NULL REFERENCES runs(id),
    serial TEXT NOT NULL,
    model TEXT,
    soc TEXT,
    abi TEXT,
    ram_mb REAL,
    budget_mb REAL,
    profile TEXT,
    client INTEGER,
    PRIMARY KEY (run, serial)
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run INTEGER NOT NULL REFERENCES runs(id),
    ts REAL NOT NULL,
    level TEXT NOT NULL CHECK (level IN {EVENT_LEVELS!r}),
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    data_json TEXT
);
CREATE TABLE checkpoints (
    run INTEGER NOT NULL REFERENCES runs(id),
    round INTEGER NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (run, round)
);
"""


# ---------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class RunRow:
    id: int
    name: str
    created_at: float
    config_json: str
    status: str
    manifest_path: str | None
    seed: int | None
    finished_at: float | None

    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json)


@dataclass(frozen=True)
class RoundRow:
    round: int
    stage_id: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    selected: int | None = None  # clients asked to train
    completed: int | None = None  # results aggregated
    failed: int | None = None  # oom_killed + failed + straggler + rejected
    accuracy: float | None = None  # global test accuracy in [0, 1] (None: not evaluated this round)
    loss: float | None = None  # global test loss
    em: float | None = None  # effective movement of the active block
    notes: str | None = None
    aggregate_s: float | None = None  # host: validating the results and aggregating them
    eval_s: float | None = None  # host: scoring the global model on the test set


@dataclass(frozen=True)
class StageRow:
    stage_id: str
    kind: str
    block: int | None = None
    first_round: int | None = None
    last_round: int | None = None
    frozen_at_round: int | None = None


@dataclass(frozen=True)
class DeviceJobRow:
    round: int
    status: str  # ok | oom_killed | failed | straggler | rejected
    client: int | None = None
    serial: str | None = None
    stage_id: str | None = None
    job_id: str | None = None
    reason: str | None = None
    samples: int | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    step_time_median_s: float | None = None
    model_load_s: float | None = None
    baseline_rss_mb: float | None = None
    peak_rss_mb: float | None = None
    footprint_mb: float | None = None
    predicted_footprint_mb: float | None = None
    budget_mb: float | None = None
    energy_j: float | None = None
    energy_source: str | None = None  # fuel_gauge | odpm | modelled
    battery_start: float | None = None  # percent
    battery_end: float | None = None
    temp_start: float | None = None  # degrees Celsius
    temp_end: float | None = None
    push_s: float | None = None
    train_s: float | None = None
    pull_s: float | None = None
    bundle_path: str | None = None
    metrics_json: str | None = None  # the bundle's whole metrics.json, verbatim
    cut: str | None = None  # SmartSplit: the cut the phone trained up to
    bytes_up: int | None = None  # SmartSplit: bytes the phone sent to the edge server (activations, labels, framing)
    bytes_down: int | None = None  # SmartSplit: bytes it received (gradients, losses, framing)
    id: int | None = None  # assigned by the store

    def metrics(self) -> dict[str, Any] | None:
        return None if self.metrics_json is None else json.loads(self.metrics_json)


@dataclass(frozen=True)
class DeviceRow:
    serial: str
    model: str | None = None
    soc: str | None = None
    abi: str | None = None
    ram_mb: float | None = None
    budget_mb: float | None = None
    profile: str | None = None
    client: int | None = None  # the client id the device stands for


@dataclass(frozen=True)
class EventRow:
    ts: float
    level: str
    kind: str
    message: str
    data_json: str | None = None
    id: int | None = None

    def data(self) -> Any:
        return None if self.data_json is None else json.loads(self.data_json)


@dataclass(frozen=True)
class CheckpointRow:
    round: int
    path: str
    sha256: str
    created_at: float


Row = TypeVar("Row")


def _finite(value: Any) -> Any:
    """NaN / inf (possible in numbers a device reported) are stored as NULL."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _columns(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


# ---------------------------------------------------------------------------- store


class RunStore:
    """Typed access to RUN_DIR/run.sqlite; safe to share between threads."""

    def __init__(self, path: Path | str, *, _create: bool = False) -> None:
        self.path = Path(path)
        if not _create and not self.path.is_file():
            raise HostError(f"run store {self.path}: no such file (not a run directory?)")
        try:
            self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._lock = threading.RLock()  # re-entrant: run_id may be resolved inside a write
            self._ensure_schema()
        except sqlite3.DatabaseError as exc:
            raise HostError(f"run store {self.path}: not a fedblocks run database ({exc})") from None
        self._run_id: int | None = None

    # -- opening

    @classmethod
    def create(
        cls,
        run_dir: Path | str,
        config: ExperimentConfig | Mapping[str, Any],
        *,
        name: str | None = None,
        seed: int | None = None,
        manifest_path: str | None = None,
    ) -> RunStore:
        """A new run directory (created if needed) with its database and the run's row."""
        run_dir = Path(run_dir)
        db = run_dir / DB_NAME
        if db.exists():
            raise HostError(f"run directory {run_dir} already holds a run ({DB_NAME}); choose a new run directory")
        run_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(config, ExperimentConfig):
            config_dict = config.to_dict()
            name = name or config.name
            seed = config.training.seed if seed is None else seed
        else:
            config_dict = dict(config)
        store = cls(db, _create=True)
        with store._write() as conn:
            cur = conn.execute(
                "INSERT INTO runs (name, created_at, config_json, status, manifest_path, seed) VALUES (?,?,?,?,?,?)",
                (name or str(config_dict.get("name", run_dir.name)), time.time(),
                 json.dumps(config_dict, sort_keys=True), "created", manifest_path, seed),
            )
            store._run_id = int(cur.lastrowid or 0)
        return store

    @classmethod
    def open(cls, run_dir: Path | str) -> RunStore:
        """The store of an existing run directory (HostError if there is none)."""
        run_dir = Path(run_dir)
        db = run_dir / DB_NAME
        if not db.is_file():
            raise HostError(f"{run_dir}: not a run directory (no {DB_NAME}); start one with `fedblocks run`")
        return cls(db)

    def _ensure_schema(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise HostError(
                f"run store {self.path}: schema version {version} is newer than this fedblocks ({SCHEMA_VERSION}); upgrade"
            )
        if version == SCHEMA_VERSION:
            return
        if version in _MIGRATIONS:   # an older run store: upgrade it in place, step by step
            with self._lock:
                for v in range(version, SCHEMA_VERSION):
                    self._conn.executescript(f"BEGIN; {_MIGRATIONS[v]} PRAGMA user_version = {v + 1}; COMMIT;")
            return
        tables = self._conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
        if tables:
            raise HostError(f"run store {self.path}: an SQLite file that is not a fedblocks run store")
        self._conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    @property
    def run_id(self) -> int:
        if self._run_id is None:
            rows = self._query("SELECT id FROM runs ORDER BY id DESC LIMIT 1")
            if not rows:
                raise HostError(f"run store {self.path}: holds no run")
            self._run_id = int(rows[0][0])
        return self._run_id

    # -- generic helpers

    def _upsert(self, table: str, row: Any, skip: tuple[str, ...] = ()) -> int:
        values = {k: _finite(v) for k, v in asdict(row).items() if k not in skip}
        cols = ["run", *values]
        sql = f"INSERT OR REPLACE INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        with self._write() as conn:
            cur = conn.execute(sql, (self.run_id, *values.values()))
            return int(cur.lastrowid or 0)

    def _update(self, table: str, cls: type, keys: dict[str, Any], changes: dict[str, Any]) -> None:
        allowed = set(_columns(cls)) - set(keys) - {"id"}
        bad = sorted(set(changes) - allowed)
        if bad:
            raise ValueError(f"{table}: cannot update column(s) {', '.join(bad)}")
        if not changes:
            return
        sets = ", ".join(f"{c} = ?" for c in changes)
        where = " AND ".join(f"{k} = ?" for k in ("run", *keys))
        with self._write() as conn:
            cur = conn.execute(
                f"UPDATE {table} SET {sets} WHERE {where}",
                (*(_finite(v) for v in changes.values()), self.run_id, *keys.values()),
            )
            if cur.rowcount == 0:
                raise ValueError(f"{table}: no row with {keys}")

    def _select(self, cls: type[Row], table: str, where: dict[str, Any], order: str) -> list[Row]:
        cols = _columns(cls)
        conds = ["run = ?", *(f"{k} = ?" for k, v in where.items() if v is not None)]
        params = (self.run_id, *(v for v in where.values() if v is not None))
        rows = self._query(f"SELECT {', '.join(cols)} FROM {table} WHERE {' AND '.join(conds)} ORDER BY {order}", params)
        return [cls(*r) for r in rows]

    # -- runs

    def run(self) -> RunRow:
        rows = self._query(f"SELECT {', '.join(_columns(RunRow))} FROM runs WHERE id = ?", (self.run_id,))
        return RunRow(*rows[0])

    def set_status(self, status: str) -> None:
        """Set the run's status; finished / failed / interrupted also stamp finished_at."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
        finished_at = time.time() if status in ("finished", "failed", "interrupted") else None
        with self._write() as conn:
            conn.execute("UPDATE runs SET status = ?, finished_at = ? WHERE id = ?", (status, finished_at, self.run_id))

    def set_manifest(self, manifest_path: str | Path) -> None:
        with self._write() as conn:
            conn.execute("UPDATE runs SET manifest_path = ? WHERE id = ?", (str(manifest_path), self.run_id))

    # -- rounds

    def record_round(self, row: RoundRow) -> None:
        """Insert or replace round ``row.round``."""
        self._upsert("rounds", row)

    def update_round(self, round: int, **changes: Any) -> None:
        """Change some columns of an existing round (e.g. accuracy after evaluation)."""
        self._update("rounds", RoundRow, {"round": round}, changes)

    def rounds(self) -> list[RoundRow]:
        return self._select(RoundRow, "rounds", {}, "round")

    def get_round(self, round: int) -> RoundRow | None:
        rows = self._select(RoundRow, "rounds", {"round": round}, "round")
        return rows[0] if rows else None

    # -- stages

    def record_stage(self, row: StageRow) -> None:
        self._upsert("stages", row)

    def update_stage(self, stage_id: str, **changes: Any) -> None:
        self._update("stages", StageRow, {"stage_id": stage_id}, changes)

    def stages(self) -> list[StageRow]:
        return self._select(StageRow, "stages", {}, "coalesce(first_round, 1e18), stage_id")

    # -- device jobs

    def record_device_job(self, row: DeviceJobRow) -> int:
        """Insert one device job's outcome; returns its id."""
        if row.status not in JOB_STATUSES:
            raise ValueError(f"device job status must be one of {', '.join(JOB_STATUSES)}, got {row.status!r}")
        return self._upsert("device_jobs", row, skip=("id",))

    def device_jobs(self, round: int | None = None, status: str | None = None,
                    serial: str | None = None) -> list[DeviceJobRow]:
        return self._select(DeviceJobRow, "device_jobs", {"round": round, "status": status, "serial": serial}, "id")

    # -- devices

    def record_device(self, row: DeviceRow) -> None:
        self._upsert("devices", row)

    def devices(self) -> list[DeviceRow]:
        return self._select(DeviceRow, "devices", {}, "serial")

    # -- events

    def log_event(self, kind: str, message: str, level: str = "info", data: Any = None) -> int:
        """Append an event; ``data`` must be JSON-serialisable."""
        if level not in EVENT_LEVELS:
            raise ValueError(f"event level must be one of {', '.join(EVENT_LEVELS)}, got {level!r}")
        data_json = None if data is None else json.dumps(data, sort_keys=True, default=str)
        return self._upsert("events", EventRow(time.time(), level, kind, message, data_json), skip=("id",))

    def events(self, kind: str | None = None, level: str | None = None) -> list[EventRow]:
        return self._select(EventRow, "events", {"kind": kind, "level": level}, "id")

    # -- checkpoints

    def record_checkpoint(self, round: int, path: str | Path, sha256: str) -> None:
        self._upsert("checkpoints", CheckpointRow(round, str(path), sha256, time.time()))

    def checkpoints(self) -> list[CheckpointRow]:
        return self._select(CheckpointRow, "checkpoints", {}, "round")

    def latest_checkpoint(self) -> CheckpointRow | None:
        rows = self.checkpoints()
        return rows[-1] if rows else None
