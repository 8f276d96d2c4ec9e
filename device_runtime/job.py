"""job.json (host -> device): parsing and validation into typed objects.

Every problem raises JobError whose message names the offending field, so a
malformed job ends as a `failed` bundle with a reason the host can act on.
The exact contract is docs/formats.md, section "job.json".
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import AUGMENTATIONS, augmentable
from .spec import OptimizerConfig, SpecError, StageSpec
from .split_config import SplitConfig, SplitConfigError, parse_split_config

JOB_FORMAT = "fedblocks.job"
JOB_VERSION = 1
ENGINES = ("ort", "executorch", "torch")
ENERGY_SOURCES = ("auto", "fuel_gauge", "odpm", "modelled")
BUDGET_MODES = ("process", "footprint")
CURRENT_UNITS = ("auto", "uA", "mA")
VOLTAGE_UNITS = ("auto", "uV", "mV", "V")
MIN_MEMORY_HZ = 20.0
MAX_ENERGY_HZ = 10.0  # fuel gauges update slowly; Perfetto polls no faster than 100 ms
SYSFS_ROOT_ENV = "FEDBLOCKS_SYSFS_ROOT"
DEFAULT_OUTPUT_DIR = "result"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class JobError(ValueError):
    """The job file is malformed or refers to something that is not usable."""


@dataclass(frozen=True)
class FileRef:
    """A file the job refers to, with the sha256 it must have."""

    path: Path  # absolute (relative paths are resolved against the job file's directory)
    sha256: str

    def verify(self, what: str) -> None:
        """Raise JobError unless the file exists and has the expected sha256."""
        if not self.path.is_file():
            raise JobError(f"{what}: file not found: {self.path}")
        try:
            actual = sha256_file(self.path)
        except OSError as exc:
            raise JobError(f"{what}: cannot read {self.path}: {exc.strerror or exc}") from exc
        if actual != self.sha256:
            raise JobError(f"{what}: sha256 mismatch for {self.path}: expected {self.sha256}, got {actual}"
                           " (stale or corrupted copy; push it again)")

    def to_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "sha256": self.sha256}


@dataclass(frozen=True)
class PowerProfile:
    """Power model for the `modelled` energy source (labelled as modelled in every report).

    energy = cpu_seconds * cpu_active_mw + wall_seconds * idle_mw, i.e. cpu_active_mw is
    the extra draw of ONE busy core and idle_mw the device's baseline draw.
    """

    name: str = "generic"
    cpu_active_mw: float = 1000.0
    idle_mw: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "cpu_active_mw": self.cpu_active_mw, "idle_mw": self.idle_mw}


@dataclass(frozen=True)
class MeterConfig:
    memory_hz: float = 50.0
    energy_hz: float = 10.0
    sysfs_root: Path = Path("/")
    energy_source: str = "auto"
    current_unit: str = "auto"
    voltage_unit: str = "auto"
    power_profile: PowerProfile = field(default_factory=PowerProfile)

    def to_dict(self) -> dict[str, Any]:
        return {"memory_hz": self.memory_hz, "energy_hz": self.energy_hz, "sysfs_root": str(self.sysfs_root),
                "energy_source": self.energy_source, "current_unit": self.current_unit,
                "voltage_unit": self.voltage_unit, "power_profile": self.power_profile.to_dict()}


@dataclass(frozen=True)
class TrainingConfig:
    batch_size: int
    seed: int
    optimizer: OptimizerConfig
    epochs: int | None = 1
    max_steps: int | None = None
    threads: int | None = None  # intra-op threads for the engine (None: engine default)
    augment: str = "none"  # data.AUGMENTATIONS: applied to every batch's image input

    def to_dict(self) -> dict[str, Any]:
        o = self.optimizer
        return {"epochs": self.epochs, "max_steps": self.max_steps, "batch_size": self.batch_size,
                "seed": self.seed, "threads": self.threads, "augment": self.augment,
                "optimizer": {"name": o.name, "lr": o.lr, "momentum": o.momentum,
                              "weight_decay": o.weight_decay}}


@dataclass(frozen=True)
class Job:
    job_id: str
    engine: str
    stage: StageSpec
    stage_dict: dict[str, Any]  # the manifest entry as given (the child re-parses it)
    artifacts: dict[str, FileRef]
    data: FileRef
    init_weights: FileRef
    training: TrainingConfig
    meters: MeterConfig
    output_dir: Path
    budget_mb: float | None = None
    budget_applies_to: str = "process"
    timeout_s: float | None = None
    split: SplitConfig | None = None  # SmartSplit: the server to talk to (split_config.py)

    def verify_files(self) -> None:
        """Check that every referenced file exists with the right sha256 (JobError otherwise)."""
        for role, ref in sorted(self.artifacts.items()):
            ref.verify(f"artifacts.{role}")
        self.data.verify("data")
        self.init_weights.verify("init_weights")

    def to_dict(self) -> dict[str, Any]:
        """The job with every path absolute: what the training child reads."""
        return {
            "format": JOB_FORMAT, "version": JOB_VERSION, "job_id": self.job_id, "engine": self.engine,
            "stage": self.stage_dict,
            "artifacts": {role: ref.to_dict() for role, ref in self.artifacts.items()},
            "data": self.data.to_dict(), "init_weights": self.init_weights.to_dict(),
            "training": self.training.to_dict(), "budget_mb": self.budget_mb,
            "budget_applies_to": self.budget_applies_to, "timeout_s": self.timeout_s,
            "meters": self.meters.to_dict(), "output_dir": str(self.output_dir),
            **({"split": self.split.to_dict()} if self.split is not None else {}),
        }


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_job_json(path: Path) -> dict[str, Any]:
    """The raw job object; JobError for unreadable files and bad JSON."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise JobError(f"job file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"cannot read job file {path}: {exc}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobError(f"job.json is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if not isinstance(raw, dict):
        raise JobError(f"job.json: expected an object at the top level, got {type(raw).__name__}")
    return raw


def output_dir_of(raw: Any, job_dir: Path) -> Path:
    """Best-effort output directory, even for a job that fails validation (so the failure gets a bundle)."""
    if isinstance(raw, dict) and isinstance(raw.get("output_dir"), str) and raw["output_dir"].strip():
        return _resolve(raw["output_dir"], job_dir)
    return job_dir / DEFAULT_OUTPUT_DIR


def job_id_of(raw: Any) -> str | None:
    if isinstance(raw, dict) and isinstance(raw.get("job_id"), str):
        return raw["job_id"]
    return None


def load_job(path: Path) -> Job:
    path = Path(path).absolute()
    return parse_job(read_job_json(path), path.parent)


def parse_job(raw: dict[str, Any], job_dir: Path) -> Job:
    """Validate a job object; relative paths resolve against job_dir."""
    fmt = raw.get("format")
    if fmt != JOB_FORMAT:
        raise JobError(f"format: expected '{JOB_FORMAT}', got {fmt!r}")
    version = raw.get("version")
    if not _is_int(version) or version < 1:
        raise JobError(f"version: expected a positive integer, got {version!r}")
    if version > JOB_VERSION:
        raise JobError(f"version: job version {version} is newer than this runtime understands "
                       f"({JOB_VERSION}); push a newer fedblocks-runtime.pyz")
    job_id = _req(raw, "job_id", str)
    if not _JOB_ID.match(job_id):
        raise JobError(f"job_id: {job_id!r} must be 1-128 characters of letters, digits, '.', '_', ':' or '-'")
    engine = _req(raw, "engine", str)
    if engine not in ENGINES:
        raise JobError(f"engine: {engine!r} is not one of {', '.join(ENGINES)}")

    stage_dict = _req(raw, "stage", dict)
    try:
        stage = StageSpec.from_dict(stage_dict)
    except SpecError as exc:
        raise JobError(f"stage: {exc}") from exc
    _check_stage(stage)

    artifacts_raw = _req(raw, "artifacts", dict)
    if not artifacts_raw:
        raise JobError("artifacts: must name at least one artifact (role -> {path, sha256})")
    artifacts = {str(role): _file_ref(ref, f"artifacts.{role}", job_dir) for role, ref in artifacts_raw.items()}
    data = _file_ref(_req(raw, "data", dict), "data", job_dir)
    init_weights = _file_ref(_req(raw, "init_weights", dict), "init_weights", job_dir)
    training = _training(_req(raw, "training", dict), stage)
    meters = _meters(raw.get("meters", {}))

    budget_mb = raw.get("budget_mb")
    if budget_mb is not None and not (_is_number(budget_mb) and budget_mb > 0):
        raise JobError(f"budget_mb: expected a positive number of MiB or null, got {budget_mb!r}")
    budget_applies_to = raw.get("budget_applies_to", "process")
    if budget_applies_to not in BUDGET_MODES:
        raise JobError(f"budget_applies_to: expected one of {', '.join(BUDGET_MODES)}, got {budget_applies_to!r}")
    timeout_s = raw.get("timeout_s")
    if timeout_s is not None and not (_is_number(timeout_s) and timeout_s > 0):
        raise JobError(f"timeout_s: expected a positive number of seconds or null, got {timeout_s!r}")
    out = raw.get("output_dir", DEFAULT_OUTPUT_DIR)
    if not isinstance(out, str) or not out.strip():
        raise JobError(f"output_dir: expected a non-empty path string, got {out!r}")
    split = None
    if raw.get("split") is not None or stage.kind == "split_front":
        try:
            split = parse_split_config(raw.get("split"), stage)
        except SplitConfigError as exc:
            raise JobError(str(exc)) from exc
        if training.augment != "none":
            # the server's half of the step sees only the activations; it could not redo the crop
            raise JobError("training.augment: split (SmartSplit) jobs train on the shard as it is; send 'none'")
    return Job(job_id=job_id, engine=engine, stage=stage, stage_dict=stage_dict, artifacts=artifacts,
               data=data, init_weights=init_weights, training=training, meters=meters,
               output_dir=_resolve(out, job_dir),
               budget_mb=None if budget_mb is None else float(budget_mb),
               budget_applies_to=budget_applies_to,
               timeout_s=None if timeout_s is None else float(timeout_s), split=split)


def _check_stage(stage: StageSpec) -> None:
    batch = {t.shape[0] if t.shape else None for t in stage.inputs}
    if len(batch) != 1 or None in batch or 0 in batch:
        raise JobError(f"stage.inputs: every input needs the same leading batch dimension, got "
                       f"{[list(t.shape) for t in stage.inputs]}")
    if stage.outputs[0].shape != ():
        raise JobError(f"stage.outputs[0]: must be the scalar loss, got shape {list(stage.outputs[0].shape)}")
    names = [t.name for t in (*stage.trainable, *stage.state)]
    if len(set(names)) != len(names):
        raise JobError("stage: a tensor name appears twice in trainable/state")
    outputs = {t.name for t in stage.outputs}
    for s in stage.state:
        if s.source not in outputs:
            raise JobError(f"stage.state '{s.name}': source '{s.source}' is not a stage output")
    if not stage.trainable:
        raise JobError("stage.trainable: a training stage needs at least one trainable tensor")


def _training(d: dict[str, Any], stage: StageSpec) -> TrainingConfig:
    epochs = d.get("epochs", 1)
    max_steps = d.get("max_steps")
    for key, value in (("epochs", epochs), ("max_steps", max_steps)):
        if value is not None and not (_is_int(value) and value >= 1):
            raise JobError(f"training.{key}: expected a positive integer or null, got {value!r}")
    if epochs is None and max_steps is None:
        raise JobError("training: set 'epochs' or 'max_steps' (both are null)")
    batch_size = _req(d, "batch_size", int, where="training.")
    if batch_size != stage.batch_size:
        raise JobError(f"training.batch_size: {batch_size} does not match the stage's batch size "
                       f"{stage.batch_size} (artifacts are exported for a fixed batch)")
    seed = d.get("seed", 0)
    if not _is_int(seed) or seed < 0:
        raise JobError(f"training.seed: expected a non-negative integer, got {seed!r}")
    threads = d.get("threads")
    if threads is not None and not (_is_int(threads) and threads >= 1):
        raise JobError(f"training.threads: expected a positive integer or null, got {threads!r}")
    augment = d.get("augment", "none")
    if augment not in AUGMENTATIONS:
        raise JobError(f"training.augment: expected one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    why_not = augmentable(stage) if augment != "none" else None
    if why_not:
        raise JobError(f"training.augment: '{augment}' cannot apply to stage '{stage.id}': {why_not} "
                       "(send augment 'none' for this stage)")
    try:
        optimizer = OptimizerConfig.from_dict(d.get("optimizer", {"name": "sgd"}))
    except SpecError as exc:
        raise JobError(str(exc)) from exc
    return TrainingConfig(batch_size=batch_size, seed=seed, optimizer=optimizer, epochs=epochs,
                          max_steps=max_steps, threads=threads, augment=augment)


def _meters(d: Any) -> MeterConfig:
    if not isinstance(d, dict):
        raise JobError(f"meters: expected an object, got {type(d).__name__}")
    memory_hz = d.get("memory_hz", MeterConfig.memory_hz)
    if not _is_number(memory_hz) or memory_hz < MIN_MEMORY_HZ or memory_hz > 1000:
        raise JobError(f"meters.memory_hz: expected a number in [{MIN_MEMORY_HZ:g}, 1000], got {memory_hz!r}")
    energy_hz = d.get("energy_hz", MeterConfig.energy_hz)
    if not _is_number(energy_hz) or not 0 < energy_hz <= MAX_ENERGY_HZ:
        raise JobError(f"meters.energy_hz: expected a number in (0, {MAX_ENERGY_HZ:g}], got {energy_hz!r}")
    # The job wins over the environment; the environment wins over "/".
    root = d.get("sysfs_root")
    if root is None:
        root = os.environ.get(SYSFS_ROOT_ENV) or "/"
    if not isinstance(root, str) or not root:
        raise JobError(f"meters.sysfs_root: expected a directory path string, got {root!r}")
    choices = (("energy_source", ENERGY_SOURCES), ("current_unit", CURRENT_UNITS),
               ("voltage_unit", VOLTAGE_UNITS))
    picked: dict[str, str] = {}
    for key, allowed in choices:
        value = d.get(key, "auto")
        if value not in allowed:
            raise JobError(f"meters.{key}: expected one of {', '.join(allowed)}, got {value!r}")
        picked[key] = value
    profile_raw = d.get("power_profile")
    profile = PowerProfile()
    if profile_raw is not None:
        if not isinstance(profile_raw, dict):
            raise JobError("meters.power_profile: expected an object {name, cpu_active_mw, idle_mw}")
        name = profile_raw.get("name", "custom")
        if not isinstance(name, str):
            raise JobError(f"meters.power_profile.name: expected a string, got {name!r}")
        vals: dict[str, float] = {}
        for key in ("cpu_active_mw", "idle_mw"):
            v = profile_raw.get(key, getattr(PowerProfile, key))
            if not _is_number(v) or v < 0:
                raise JobError(f"meters.power_profile.{key}: expected a non-negative number, got {v!r}")
            vals[key] = float(v)
        profile = PowerProfile(name=name, **vals)
    return MeterConfig(memory_hz=float(memory_hz), energy_hz=float(energy_hz), sysfs_root=Path(root),
                       power_profile=profile, **picked)


def _file_ref(d: Any, where: str, job_dir: Path) -> FileRef:
    if not isinstance(d, dict):
        raise JobError(f"{where}: expected an object {{path, sha256}}, got {type(d).__name__}")
    path = _req(d, "path", str, where=f"{where}.")
    sha = _req(d, "sha256", str, where=f"{where}.")
    if not path:
        raise JobError(f"{where}.path: must not be empty")
    if not _SHA256.match(sha):
        raise JobError(f"{where}.sha256: expected 64 lowercase hex digits, got {sha!r}")
    return FileRef(path=_resolve(path, job_dir), sha256=sha)


def _resolve(path: str, base: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (base / p)


def _req(d: dict[str, Any], key: str, typ: type, where: str = "") -> Any:
    if key not in d:
        raise JobError(f"{where}{key}: missing field")
    value = d[key]
    ok = _is_int(value) if typ is int else isinstance(value, typ)
    if not ok:
        raise JobError(f"{where}{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}"[:300])
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
