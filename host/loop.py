"""The round loop: `run_experiment(settings, run_dir, resume, progress) -> RunSummary`.

Per round: strategy.plan_round -> (strategy.begin_round) -> per-client shards (+ any
extra arrays the stage takes) and initial weights -> jobs on the clients, concurrently,
under a per-round deadline (stragglers are killed, recorded and excluded) -> every
result bundle validated (bad ones recorded with their reason and excluded) ->
strategy.aggregate -> evaluation on the host test set every N rounds -> strategy.after_round
-> everything recorded -> checkpoint (global weights .npz + strategy state) after
every round. The loop knows nothing of any particular method.

Determinism: every random choice is derived from (seed, round, client) — client
selection, job seeds (which fix the device's batch order), NeuLite's projection
heads, EM's parameter sample — so a run resumed from its checkpoint ends with the
same model as one that never stopped.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedblocks.device_runtime.spec import OptimizerConfig, StageSpec
from fedblocks.host.clients.base import ClientExecutor, FileOnHost, JobOutcome, JobRequest
from fedblocks.host.errors import HostError
from fedblocks.host.peer import RoundSession
from fedblocks.host.strategies import STRATEGIES
from fedblocks.host.strategies.base import (
    ClientInfo,
    ClientResult,
    EvalTarget,
    RoundPlan,
    Strategy,
    StrategyContext,
    TrainingDefaults,
)
from fedblocks.host.validate import BundleRejected, sha256_file, validate_bundle

MIB = 1024 * 1024
CHECKPOINT_FORMAT = "fedblocks.checkpoint"
CHECKPOINT_VERSION = 1
TESTBEDS = ("simulated", "virtual", "adb")


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class RunSettings:
    """One experiment, fully resolved (host/config.py's ExperimentConfig maps onto this)."""

    model: str = "resnet8"
    num_blocks: int | None = None
    dataset: str = "cifar10"
    dataset_fallback: str | None = "fashion_mnist"
    data_dir: str | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    partition: str = "dirichlet"
    alpha: float = 0.5
    samples_per_client: int | None = None
    min_samples: int = 1
    num_clients: int = 4
    testbed: str = "simulated"
    budgets_mb: tuple[float | None, ...] = ()  # per client; () = unconstrained
    budget_mode: str = "footprint"  # what a device enforces the budget on: footprint | process
    profiles: tuple[str, ...] = ()  # per client (virtual phones / simulated power model)
    serials: tuple[str, ...] = ()  # adb testbed
    base_port: int = 0  # virtual testbed: first adbd port (0 = pick free ports)
    strategy: str = "fedavg"
    strategy_params: Mapping[str, Any] = field(default_factory=dict)
    rounds: int = 3
    fraction: float = 1.0
    local_epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    augment: str = "none"  # device_runtime.data.AUGMENTATIONS; stages it cannot apply to train unaugmented
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    weighted_aggregation: bool = True
    seed: int = 0
    deadline_s: float | None = None
    engine: str = "torch"
    eval_every: int = 1
    eval_max_samples: int | None = None
    eval_batch_size: int = 256
    host_threads: int | None = None  # torch threads of this process; None: torch's default, kept on resume
    label: str = ""

    def fingerprint(self) -> str:
        """Hash of everything that determines the result (resume refuses a different experiment)."""
        d = asdict(self)
        d.pop("label", None)
        d.pop("serials", None)
        d.pop("base_port", None)
        if d.get("host_threads") is None:  # unset: fingerprints stay those of runs made before the field
            d.pop("host_threads", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- results
@dataclass
class RoundRecord:
    round: int
    stage_id: str
    selected: list[int]
    accepted: list[int]
    rejected: dict[int, str]
    stragglers: dict[int, str]
    accuracy: float | None
    eval_target: str
    train_loss: float | None
    wall_s: float
    energy_j: float | None
    energy_sources: list[str]
    notes: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunSummary:
    run_dir: str
    strategy: str
    strategy_description: str
    respects_budgets: bool
    testbed: str
    rounds_completed: int
    final_accuracy: float | None
    participating_clients: int
    total_clients: int
    peak_predicted_footprint_mb: float
    peak_measured_footprint_mb: float | None
    energy_j: float | None
    energy_sources: list[str]
    dataset: str
    model: str
    wall_s: float
    rejected_results: int
    stragglers: int
    stages_used: list[str]
    weights_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Progress:
    """What the loop reports while it runs (the CLI draws rich progress bars from it)."""

    def run_started(self, total_rounds: int, label: str) -> None: ...
    def round_started(self, rnd: int, plan: RoundPlan) -> None: ...
    def job_finished(self, rnd: int, client_id: int, status: str) -> None: ...
    def round_finished(self, record: RoundRecord) -> None: ...
    def message(self, text: str) -> None: ...


# ----------------------------------------------------------------------------- helpers
def derive_seed(*parts: int) -> int:
    """A 31-bit seed from (seed, round, client, ...): stable across runs and resumes."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint32)[0] >> 1)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _weights_bytes(tensors: Mapping[str, np.ndarray]) -> bytes:
    from fedblocks.export.weights import weights_to_bytes

    return weights_to_bytes({k: tensors[k] for k in sorted(tensors)})


def weights_digest(tensors: Mapping[str, np.ndarray]) -> str:
    return hashlib.sha256(_weights_bytes(tensors)).hexdigest()


def engine_memory(program: Any, engine: str, batch_size: int, seed: int, artifacts_dir: Path) -> dict[str, Any] | None:
    """The engine's own memory prediction for a stage (manifest ``memory.engines.<engine>``), or None.

    ORT's is planned from its training graph, so the stage's ORT artifacts are built first
    (build_stage_artifacts: content-addressed in artifacts_dir, the same files the first
    round then ships).
    """
    from fedblocks.export import builders

    module = builders.builder(engine)
    predict = getattr(module, "predict_memory", None)
    if predict is None:
        return None
    files: dict[str, Path] = {}
    if getattr(module, "PREDICT_MEMORY_NEEDS_ARTIFACTS", False):
        from fedblocks.host.clients.artifacts import build_stage_artifacts

        built = build_stage_artifacts(program, engine, batch_size, seed, artifacts_dir)
        files = {role: f.path for role, f in built.items()}
    return dict(predict(program, files, batch_size))


def planned_footprint_mb(entry: Mapping[str, Any], engine: str, momentum: bool) -> float:
    """What a stage needs on a device (MiB): the engine's total when the entry has one, else the
    engine-agnostic total (momentum is already in it when the entry was made with momentum)."""
    own = (entry["memory"].get("engines") or {}).get(engine)
    if own is not None:
        return (own["total_bytes"] + (own["momentum_bytes"] if momentum else 0)) / MIB
    return entry["memory"]["total_bytes"] / MIB


def stage_entry(program: Any, batch_size: int, momentum: bool, engine: str | None = None,
                artifacts_dir: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """The manifest-style stage entry (docs/formats.md) of a stage program, footprint included.

    With ``engine`` (and ``artifacts_dir``), ``memory.engines.<engine>`` carries that engine's own
    prediction (engine_memory), which the device runtime reports and the host plans with.
    """
    from fedblocks.export.memory import predict_footprint

    fp = predict_footprint(program, batch_size, momentum=momentum)
    memory: dict[str, Any] = fp.to_dict(batch_size)
    if engine is not None and artifacts_dir is not None:
        own = engine_memory(program, engine, batch_size, seed, artifacts_dir)
        if own is not None:
            memory["engines"] = {engine: own}
    return {
        "id": program.stage_id, "kind": program.kind, "block": int(program.block or 0),
        "inputs": [s.to_dict() for s in program.input_specs(batch_size)],
        "outputs": [s.to_dict() for s in program.output_specs(batch_size)],
        "trainable": [s.to_dict() for s in program.trainable_specs()],
        "state": [s.to_dict() for s in program.state_specs()],
        "frozen": [s.to_dict() for s in program.frozen_specs()],
        "memory": memory,
    }


class Recorder:
    """Writes what happened into the run store (RUN_DIR/run.sqlite, host/store.py)."""

    def __init__(self, run_dir: Path, config: Any, settings: RunSettings, resume: bool) -> None:
        from fedblocks.host.store import RunStore

        if resume:
            self.store = RunStore.open(run_dir)
        else:
            self.store = RunStore.create(run_dir, config, name=settings.label or None, seed=settings.seed)
        self.store.set_status("running")

    def job(self, rnd: int, row: Any) -> None:
        self.store.record_device_job(row)

    def event(self, rnd: int, kind: str, message: str, data: Mapping[str, Any] | None = None,
              level: str = "info") -> None:
        self.store.log_event(kind, message, level=level,
                             data=json.loads(json.dumps({"round": rnd, **dict(data or {})}, default=_json_default)))

    def round(self, row: Any) -> None:
        self.store.record_round(row)

    def stage(self, row: Any) -> None:
        self.store.record_stage(row)

    def stages(self) -> dict[str, Any]:
        return {r.stage_id: r for r in self.store.stages()}

    def checkpoint(self, rnd: int, path: Path, sha256: str) -> None:
        self.store.record_checkpoint(rnd, path, sha256)

    def devices(self, exp: Experiment) -> None:
        """One row per client's device: what the device says about itself, its budget and profile."""
        from fedblocks.host.store import DeviceRow

        for c in exp.clients:
            executor = exp.executors[c.client_id]
            d = executor.describe()
            self.store.record_device(DeviceRow(serial=executor.label, client=c.client_id, model=d.model, soc=d.soc,
                                               abi=d.abi,
                                               ram_mb=d.ram_mb, budget_mb=c.budget_mb, profile=d.profile))

    def close(self, status: str) -> None:
        self.store.set_status(status)
        self.store.close()


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite_or_none(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# ----------------------------------------------------------------------------- model side
class HostModel:
    """The global model on the host: evaluation and teacher logits from global weights."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.names = set(model.state_dict())
        self._lock = threading.Lock()

    def load(self, weights: Mapping[str, np.ndarray]) -> None:
        state = {k: torch.from_numpy(np.array(v)) for k, v in weights.items() if k in self.names}
        self.model.load_state_dict(state, strict=False)

    @torch.no_grad()
    def logits(self, weights: Mapping[str, np.ndarray], target: EvalTarget, x: np.ndarray,
               batch: int = 256) -> np.ndarray:
        with self._lock:
            self.load(weights)
            self.model.eval()
            out = []
            for i in range(0, len(x), batch):
                xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))
                if target.kind == "shrunk":
                    out.append(self.model.shrunk_logits(xb, target.k))
                else:
                    out.append(self.model.prefix_logits(xb, target.k))
            return torch.cat(out).numpy()

    def accuracy(self, weights: Mapping[str, np.ndarray], target: EvalTarget, x: np.ndarray,
                 y: np.ndarray, batch: int = 256) -> float:
        pred = self.logits(weights, target, x, batch).argmax(axis=1)
        return float((pred == y).mean())


# ----------------------------------------------------------------------------- checkpoint
def save_checkpoint(run_dir: Path, rnd: int, weights: Mapping[str, np.ndarray], strategy: Strategy,
                    settings: RunSettings, history: Mapping[str, Any]) -> None:
    ckpt = run_dir / "checkpoint"
    data = _weights_bytes(weights)
    _atomic_write_bytes(ckpt / "weights.npz", data)
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "round": rnd,
             "settings_fingerprint": settings.fingerprint(), "weights_sha256": hashlib.sha256(data).hexdigest(),
             "strategy": strategy.name, "strategy_state": strategy.state_dict(), "history": history,
             "rng": {"rule": "every seed derived from (seed, round, client)", "seed": settings.seed}}
    _atomic_write_bytes(ckpt / "state.json", json.dumps(state, default=_json_default, indent=1).encode())


def load_checkpoint(run_dir: Path, settings: RunSettings) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
    ckpt = run_dir / "checkpoint"
    try:
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HostError(f"--resume {run_dir}: no checkpoint there (checkpoint/state.json); start a new run "
                        "with --out") from None
    except (OSError, ValueError) as exc:
        raise HostError(f"--resume {run_dir}: checkpoint/state.json is unreadable ({exc})") from None
    if state.get("format") != CHECKPOINT_FORMAT or int(state.get("version", 99)) > CHECKPOINT_VERSION:
        raise HostError(f"--resume {run_dir}: not a fedblocks checkpoint of a version this host reads")
    if state.get("settings_fingerprint") != settings.fingerprint():
        raise HostError(f"--resume {run_dir}: the config differs from the one this run started with; "
                        "resume with the same config or start a new run")
    path = ckpt / "weights.npz"
    if not path.is_file() or sha256_file(path) != state.get("weights_sha256"):
        raise HostError(f"--resume {run_dir}: checkpoint/weights.npz is missing or does not match state.json")
    with np.load(path, allow_pickle=False) as npz:
        weights = {k: npz[k] for k in npz.files}
    return int(state["round"]), weights, state


# ----------------------------------------------------------------------------- the experiment
@dataclass
class Experiment:
    """Everything built before round 1 (data, shards, model, stages, strategy, clients)."""

    settings: RunSettings
    run_dir: Path
    dataset: Any
    parts: list[np.ndarray]
    model: Any
    host_model: HostModel
    init_weights: dict[str, np.ndarray]
    stage_dicts: dict[str, dict[str, Any]]
    stage_specs: dict[str, StageSpec]
    footprint_mb: dict[str, float]  # what strategies plan with (raised to measured values on phones)
    strategy: Strategy
    clients: list[ClientInfo]
    executors: dict[int, ClientExecutor] = field(default_factory=dict)
    predicted_mb: dict[str, float] = field(default_factory=dict)  # the export-time prediction, never changed
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for ex in self.executors.values():
            try:
                ex.close()
            except Exception:  # closing is best effort
                pass
        for fn in reversed(self.closers):
            try:
                fn()
            except Exception:
                pass


def _load_data(s: RunSettings) -> Any:
    from fedblocks.host.data import load_configured_dataset

    data_dir = Path(s.data_dir) if s.data_dir else None
    return load_configured_dataset(s.dataset, s.dataset_fallback, data_dir, s.limit_train, s.limit_test)


def _partition(s: RunSettings, dataset: Any) -> list[np.ndarray]:
    from fedblocks.host.data import partition

    return partition(dataset.y_train, s.num_clients, s.partition, alpha=s.alpha, seed=s.seed,
                     samples_per_client=s.samples_per_client, natural=dataset.natural_clients,
                     min_samples=max(s.min_samples, s.batch_size))


def _candidate_stage_ids(model: Any, strategy_name: str) -> list[str]:
    from fedblocks.export.stages import stage_ids

    own = STRATEGIES[strategy_name].stage_ids_for(model)
    if own is not None:
        return own
    if strategy_name == "neulite":
        from fedblocks.export.neulite import neulite_stage_ids

        return neulite_stage_ids(model)
    if strategy_name in ("fedavg", "exclusivefl"):
        return ["full"]
    return stage_ids(model)


def build_experiment(s: RunSettings, run_dir: Path, progress: Progress) -> Experiment:
    from fedblocks.export.pipeline import ExportSpec, build_blocked_model
    from fedblocks.export.weights import state_dict_to_arrays

    if s.strategy not in STRATEGIES:
        raise HostError(f"strategy.name: unknown strategy '{s.strategy}' (choose {', '.join(STRATEGIES)})")
    if s.testbed not in TESTBEDS:
        raise HostError(f"clients.testbed: unknown testbed '{s.testbed}' (choose {', '.join(TESTBEDS)})")
    progress.message(f"loading {s.dataset}")
    dataset = _load_data(s)
    parts = _partition(s, dataset)
    spec = ExportSpec(model=s.model, num_classes=int(dataset.num_classes), input_shape=tuple(dataset.input_shape),
                      batch_size=s.batch_size, engines=(s.engine,), num_blocks=s.num_blocks, seed=s.seed)
    model = build_blocked_model(spec)
    init = state_dict_to_arrays(model)
    budgets = list(s.budgets_mb) or [None] * s.num_clients
    if len(budgets) != s.num_clients:
        raise HostError(f"clients.budgets_mb: {len(budgets)} budgets for {s.num_clients} clients")
    clients = [ClientInfo(i, budgets[i], len(parts[i])) for i in range(s.num_clients)]
    strategy_cls = STRATEGIES[s.strategy]
    # A throwaway instance is not needed: stage programs come from the strategy class's builder.
    stage_dicts: dict[str, dict[str, Any]] = {}
    progress.message("predicting stage footprints")
    probe = _StageFactory(model, s.strategy, s.strategy_params)
    # A phone testbed runs the real engine: plan with that engine's own prediction (simulated clients run none).
    engine = None if s.testbed == "simulated" else s.engine
    for sid in _candidate_stage_ids(model, s.strategy):
        stage_dicts[sid] = stage_entry(probe.build(sid), s.batch_size, s.momentum > 0, engine, run_dir / "artifacts",
                                       s.seed)
    stage_specs = {sid: StageSpec.from_dict(d) for sid, d in stage_dicts.items()}
    footprint_mb = {sid: planned_footprint_mb(d, s.engine, s.momentum > 0) for sid, d in stage_dicts.items()}
    host_model = HostModel(copy.deepcopy(model))
    ctx = StrategyContext(
        num_blocks=model.num_blocks, stages=stage_specs, footprint_mb=footprint_mb, clients=clients,
        total_rounds=s.rounds, fraction=s.fraction, seed=s.seed,
        training=TrainingDefaults(epochs=s.local_epochs, lr=s.lr, momentum=s.momentum,
                                  weight_decay=s.weight_decay, batch_size=s.batch_size, max_steps=s.max_steps),
        weighted_aggregation=s.weighted_aggregation,
        tensor_shapes={k: tuple(v.shape) for k, v in init.items()},
        block_tensor_names={k: model.block_tensor_names(k) for k in range(1, model.num_blocks + 1)},
        output_module_sources=model.output_module_sources(), model=model,
        logits_fn=host_model.logits, testbed=s.testbed, engine=s.engine,
    )
    strategy = strategy_cls(s.strategy_params, ctx)
    init = strategy.initial_weights(init)
    return Experiment(s, run_dir, dataset, parts, model, host_model, init, stage_dicts, stage_specs,
                      footprint_mb, strategy, clients, predicted_mb=dict(footprint_mb))


class _StageFactory:
    """Builds stage programs the way the chosen strategy does (NeuLite's variant included)."""

    def __init__(self, model: Any, strategy: str, params: Mapping[str, Any]) -> None:
        self.model = model
        self.strategy = strategy
        self.params = params

    def build(self, stage_id: str) -> Any:
        if stage_id.startswith("neulite-"):
            from fedblocks.export.neulite import make_neulite_stage

            return make_neulite_stage(self.model, stage_id, float(self.params.get("lambda1", 0.01)),
                                      float(self.params.get("lambda2", 0.1)))
        from fedblocks.export.stages import make_stage

        return make_stage(self.model, stage_id)


def _stage_builder(exp: Experiment) -> Callable[[str], Any]:
    """Stage programs for simulated clients, one per stage id, reused across jobs.

    Building a program deep-copies modules and propagates shapes (~1 s); every job
    loads ALL of the program's tensors (frozen ones from the round's global weights),
    so a reused program carries nothing over from the previous job.
    """
    lock = threading.Lock()
    cache: dict[str, Any] = {}

    def build(stage_id: str) -> Any:
        with lock:
            if stage_id not in cache:
                cache[stage_id] = exp.strategy.make_stage(exp.model, stage_id)
            return cache[stage_id]

    return build


def build_executors(exp: Experiment, progress: Progress) -> None:
    s = exp.settings
    if s.testbed == "simulated":
        from fedblocks.host.clients.simulated import SimulatedClient

        profiles = _simulated_profiles(s)
        lock = threading.Lock()
        builder = _stage_builder(exp)
        for c in exp.clients:
            exp.executors[c.client_id] = SimulatedClient(c.client_id, c.budget_mb, profiles[c.client_id],
                                                         builder, lock)
        return
    from fedblocks.host.clients.device import DeviceClient

    runtime = _runtime_bundle(exp.run_dir)
    serials = list(s.serials)
    keys: list[Any] | None = None
    profiles: list[str | None] = [None] * len(exp.clients)
    if s.testbed == "virtual":
        serials, keys, profiles = _start_virtual_testbed(exp, progress)
    if len(serials) < s.num_clients:
        raise HostError(f"clients.serials: {len(serials)} phone(s) for {s.num_clients} clients; "
                        "list one serial per client")
    from fedblocks.testbed.adb_backend import AdbDevice

    for c in exp.clients:
        serial = serials[c.client_id]
        progress.message(f"connecting to {serial}")
        device = AdbDevice.connect(serial, keys=keys) if keys else AdbDevice.connect(serial)
        exp.executors[c.client_id] = DeviceClient(c.client_id, c.budget_mb, device, runtime, label=serial,
                                                  profile=profiles[c.client_id])


def _simulated_profiles(s: RunSettings) -> list[Any]:
    from fedblocks.host.clients.simulated import SimulatedProfile

    out = []
    for i in range(s.num_clients):
        name = s.profiles[i % len(s.profiles)] if s.profiles else ""
        if name:
            try:
                from fedblocks.testbed.virtual import load_profile

                p = load_profile(name)
                out.append(SimulatedProfile(p.name, p.cpu_speed, p.active_mw, p.idle_mw))
                continue
            except Exception as exc:
                raise HostError(f"clients.profiles: cannot load phone profile '{name}': {exc}") from None
        out.append(SimulatedProfile())
    return out


def _runtime_bundle(run_dir: Path) -> Any:
    from fedblocks.device_runtime import build_runtime_pyz
    from fedblocks.host.clients.device import RuntimeBundle

    pyz = build_runtime_pyz(run_dir / "runtime" / "fedblocks-runtime.pyz")
    return RuntimeBundle(FileOnHost(pyz, sha256_file(pyz)))


def _free_port_block(count: int) -> int:
    """A base port with `count` free consecutive ports, outside adb's emulator range."""
    import socket

    for base in range(7100, 60000, 37):
        ok = True
        for port in range(base, base + count):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise HostError("clients.base_port: no block of free localhost ports found; set one explicitly")


def _start_virtual_testbed(exp: Experiment, progress: Progress) -> tuple[list[str], list[Any], list[str | None]]:
    """Start one virtual phone per client; returns their serials, the adb key to connect with and
    the profile names."""
    from fedblocks.testbed.keys import default_key
    from fedblocks.testbed.virtual import VirtualTestbed, load_profile

    s = exp.settings
    key = default_key()
    profiles = [load_profile(s.profiles[i % len(s.profiles)] if s.profiles else "midrange")
                for i in range(len(exp.clients))]
    base = s.base_port or _free_port_block(len(profiles))
    progress.message(f"starting {len(profiles)} virtual phone(s) on ports {base}..{base + len(profiles) - 1}")
    testbed = VirtualTestbed(len(profiles), base, profiles, state_dir=exp.run_dir / "virtual_phones",
                             authorized_keys=[Path(f"{key.path}.pub")])
    testbed.start()
    exp.closers.append(testbed.stop)
    return list(testbed.serials), [key], [s.profiles[i % len(s.profiles)] if s.profiles else "midrange"
                                          for i in range(len(profiles))]


# ----------------------------------------------------------------------------- one round
@dataclass
class _JobResult:
    client_id: int
    job_id: str
    outcome: JobOutcome
    status: str  # ok | rejected | straggler | error | oom_killed | failed
    reason: str
    result: ClientResult | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class RoundRunner:
    def __init__(self, exp: Experiment, recorder: Recorder, progress: Progress) -> None:
        self.exp = exp
        self.recorder = recorder
        self.progress = progress
        self.objects = exp.run_dir / "objects"
        self.shard_dir = exp.run_dir / "shards"
        self._artifact_cache: dict[tuple[str, str], dict[str, FileOnHost]] = {}

    def _stage_weights_file(self, stage: StageSpec, weights: Mapping[str, np.ndarray]) -> FileOnHost:
        names = [t.name for t in stage.trainable] + [t.name for t in stage.state]
        data = _weights_bytes({n: np.asarray(weights[n], dtype=np.float32) for n in names})
        digest = hashlib.sha256(data).hexdigest()
        path = self.objects / f"{digest}.npz"
        if not path.is_file():
            _atomic_write_bytes(path, data)
        return FileOnHost(path, digest)

    def _shard(self, plan: RoundPlan, client_id: int, weights: Mapping[str, np.ndarray]) -> tuple[FileOnHost, int]:
        from fedblocks.host.data import write_shard

        ds = self.exp.dataset
        idx = self.exp.parts[client_id]
        x, y = ds.x_train[idx], ds.y_train[idx]
        extra = self.exp.strategy.extra_inputs(plan, weights, x)
        ref = write_shard(x, y, self.shard_dir, extra or None)
        return FileOnHost(Path(ref.path), ref.sha256), int(ref.num_samples)

    def _artifacts(self, stage_id: str, weights: Mapping[str, np.ndarray]) -> dict[str, FileOnHost]:
        """What carries the stage's frozen tensors: engine artifacts built from the current global
        weights (phones), or the global weights file itself (simulated clients)."""
        if self.exp.settings.testbed == "simulated":
            data = _weights_bytes(weights)
            digest = hashlib.sha256(data).hexdigest()
            path = self.objects / f"{digest}.npz"
            if not path.is_file():
                _atomic_write_bytes(path, data)
            return {"global_weights": FileOnHost(path, digest)}
        from fedblocks.host.clients.artifacts import build_stage_artifacts

        program = self.exp.strategy.make_stage(self.exp.model, stage_id)
        program.load_global_state(dict(weights), strict=True)
        key = (stage_id, weights_digest({t.name: weights[t.name] for t in program.frozen_specs()}))
        if key not in self._artifact_cache:
            self.progress.message(f"building {self.exp.settings.engine} artifacts for {stage_id}")
            self._artifact_cache[key] = build_stage_artifacts(program, self.exp.settings.engine,
                                                              self.exp.settings.batch_size, self.exp.settings.seed,
                                                              self.exp.run_dir / "artifacts")
        return self._artifact_cache[key]

    def run(self, rnd: int, plan: RoundPlan, weights: Mapping[str, np.ndarray],
            session: RoundSession | None = None) -> list[_JobResult]:
        from fedblocks.device_runtime.data import augmentable, steps_planned

        s = self.exp.settings
        per_stage: dict[str, tuple[FileOnHost, dict[str, FileOnHost]]] = {}  # a round may train several stages
        for sid in plan.stage_ids():
            if any(plan.stage_of(c) == sid for c in plan.client_ids):
                per_stage[sid] = (self._stage_weights_file(self.exp.stage_specs[sid], weights),
                                  self._artifacts(sid, weights))
        respects = getattr(self.exp.strategy, "respects_budgets", True)
        requests: list[JobRequest] = []
        for cid in plan.client_ids:
            job = plan.jobs[cid]
            sid = plan.stage_of(cid)
            init, artifacts = per_stage[sid]
            shard, n = self._shard(plan, cid, weights)
            job_id = f"r{rnd}-c{cid}-{sid}"
            bundle_dir = self.exp.run_dir / "bundles" / f"round-{rnd:04d}" / f"client-{cid:03d}"
            if bundle_dir.exists():
                shutil.rmtree(bundle_dir)  # left by an interrupted attempt of this round
            peer = None if session is None else session.endpoint(
                cid, job_id, steps_planned(n, s.batch_size, job.epochs, job.max_steps))
            # ProFL shrinking's teacher logits and SmartSplit's server half see the shard as it is
            augment = s.augment if session is None and augmentable(self.exp.stage_specs[sid]) is None else "none"
            requests.append(JobRequest(
                job_id=job_id, client_id=cid, round=rnd, engine=s.engine, stage=self.exp.stage_specs[sid],
                stage_dict=self.exp.stage_dicts[sid],
                artifacts=artifacts, shard=shard, num_samples=n, init_weights=init, epochs=job.epochs,
                max_steps=job.max_steps, batch_size=s.batch_size, seed=derive_seed(s.seed, rnd, cid),
                optimizer=OptimizerConfig(lr=job.lr, momentum=job.momentum, weight_decay=job.weight_decay),
                budget_mb=self.exp.clients[cid].budget_mb if respects else None,
                budget_mode=s.budget_mode, deadline_s=s.deadline_s, bundle_dir=bundle_dir, augment=augment,
                peer=peer))
        cancel = threading.Event()
        outcomes: dict[int, JobOutcome] = {}
        workers = 1 if s.testbed == "simulated" else max(1, len(requests))
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedblocks-job") as pool:
            futures = {pool.submit(self.exp.executors[r.client_id].run, r, cancel): r for r in requests}
            grace = None if s.deadline_s is None else s.deadline_s + 60.0
            try:
                for fut in cf.as_completed(futures, timeout=grace):
                    r = futures[fut]
                    try:
                        outcomes[r.client_id] = fut.result()
                    except Exception as exc:  # an executor bug must not end the run
                        outcomes[r.client_id] = JobOutcome(None, time.monotonic() - t0,
                                                           error=f"{type(exc).__name__}: {exc}"[:400])
                    self.progress.job_finished(rnd, r.client_id, "done")
            except cf.TimeoutError:
                cancel.set()  # executors notice and kill their jobs; we wait for them to return
                for fut, r in futures.items():
                    try:
                        outcomes[r.client_id] = fut.result()
                    except Exception as exc:
                        outcomes[r.client_id] = JobOutcome(None, time.monotonic() - t0, straggler=True,
                                                           error=f"{type(exc).__name__}: {exc}"[:400])
        results: list[_JobResult] = []
        for r in requests:
            results.append(self._judge(r, outcomes[r.client_id]))
        return results

    def _judge(self, r: JobRequest, outcome: JobOutcome) -> _JobResult:
        if outcome.straggler:
            return _JobResult(r.client_id, r.job_id, outcome, "straggler", outcome.error or "deadline")
        if outcome.bundle_dir is None:
            return _JobResult(r.client_id, r.job_id, outcome, "error", outcome.error or "no result bundle")
        metrics: dict[str, Any] = {}
        try:
            metrics = json.loads((outcome.bundle_dir / "metrics.json").read_text(encoding="utf-8"))
            if not isinstance(metrics, dict):
                metrics = {}
        except (OSError, ValueError):
            metrics = {}
        max_samples = r.num_samples * r.epochs if r.max_steps is None else r.max_steps * r.batch_size
        try:
            v = validate_bundle(outcome.bundle_dir, r.stage, r.job_id, expected_samples=max_samples)
        except BundleRejected as exc:
            status = "rejected"
            try:
                st = json.loads((outcome.bundle_dir / "status.json").read_text(encoding="utf-8"))
                if st.get("status") in ("oom_killed", "failed"):
                    status = st["status"]
            except (OSError, ValueError, AttributeError):
                pass
            return _JobResult(r.client_id, r.job_id, outcome, status, str(exc), metrics=metrics)
        # weight by the shard size the host knows (a device cannot inflate its own weight)
        result = ClientResult(r.client_id, v.tensors, r.num_samples, v.metrics)
        return _JobResult(r.client_id, r.job_id, outcome, "ok", "", result, v.metrics)


# ----------------------------------------------------------------------------- the run
def _energy_of(metrics: Mapping[str, Any]) -> tuple[float | None, str | None]:
    e = metrics.get("energy")
    if isinstance(e, dict):
        return _finite_or_none(e.get("joules")), str(e.get("source")) if e.get("source") else None
    return None, None


def _measured_footprint_mb(metrics: Mapping[str, Any]) -> float | None:
    mem = metrics.get("memory")
    if isinstance(mem, dict):
        fp = _finite_or_none(mem.get("footprint_bytes"))
        return None if fp is None else fp / MIB
    return None


def _job_row(rnd: int, j: _JobResult, exp: Experiment, stage_id: str, serial: str | None) -> Any:
    from fedblocks.host.store import DeviceJobRow

    m = j.metrics
    mem = m.get("memory") if isinstance(m.get("memory"), dict) else {}
    bat = m.get("battery") if isinstance(m.get("battery"), dict) else {}
    temp = m.get("thermal_c") if isinstance(m.get("thermal_c"), dict) else {}
    losses = [v for v in (m.get("loss") or []) if isinstance(v, (int, float))]
    joules, source = _energy_of(m)
    split = m.get("split") if isinstance(m.get("split"), dict) else {}  # SmartSplit jobs

    def mb(key: str) -> float | None:
        v = _finite_or_none(mem.get(key))
        return None if v is None else v / MIB

    def level(snap: Any) -> float | None:
        return _finite_or_none(snap.get("level_pct")) if isinstance(snap, dict) else None

    def first_temp(snap: Any) -> float | None:
        if isinstance(snap, dict):
            for v in snap.values():
                f = _finite_or_none(v)
                if f is not None:
                    return f
        return _finite_or_none(snap)

    status = {"error": "failed"}.get(j.status, j.status)
    samples = m.get("samples_seen")
    return DeviceJobRow(
        round=rnd, status=status, client=j.client_id, serial=serial, stage_id=stage_id, job_id=j.job_id,
        reason=j.reason or None, samples=samples if isinstance(samples, int) and not isinstance(samples, bool) else None,
        loss_first=_finite_or_none(losses[0]) if losses else None,
        loss_last=_finite_or_none(losses[-1]) if losses else None,
        step_time_median_s=_finite_or_none(m.get("step_latency_median_s")),
        model_load_s=_finite_or_none(m.get("model_load_s")),
        baseline_rss_mb=mb("baseline_rss_bytes"), peak_rss_mb=mb("peak_rss_bytes"), footprint_mb=mb("footprint_bytes"),
        predicted_footprint_mb=exp.predicted_mb.get(stage_id), budget_mb=exp.clients[j.client_id].budget_mb,
        energy_j=joules, energy_source=source, battery_start=level(bat.get("start")), battery_end=level(bat.get("end")),
        temp_start=first_temp(temp.get("start")), temp_end=first_temp(temp.get("end")),
        train_s=_finite_or_none(m.get("train_s")), push_s=j.outcome.push_s, pull_s=j.outcome.pull_s,
        bundle_path=None if j.outcome.bundle_dir is None else str(j.outcome.bundle_dir),
        metrics_json=json.dumps(m, default=_json_default) if m else None,
        cut=split.get("cut") if isinstance(split.get("cut"), str) else None,
        bytes_up=_int_or_none(split.get("bytes_sent")), bytes_down=_int_or_none(split.get("bytes_received")))


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _record_exclusions(recorder: Recorder, exp: Experiment, rnd: int, plan: RoundPlan,
                       seen: dict[str, tuple[int, ...]]) -> None:
    """Event `clients_excluded` when the clients a budget-respecting strategy may not give the
    planned stage (budget below the footprint it plans with) change: the report marks them."""
    if not getattr(exp.strategy, "respects_budgets", True):
        return
    eligible = {c.client_id for c in exp.strategy.eligible(plan.stage_id, exp.clients)}
    excluded = tuple(c.client_id for c in exp.clients if c.client_id not in eligible)
    previous = seen.get(plan.stage_id)
    if previous == excluded:
        return
    seen[plan.stage_id] = excluded
    if excluded or previous is not None:   # nobody excluded from the start: nothing to say
        footprint = exp.strategy.eligibility_footprint_mb(plan.stage_id)
        recorder.event(rnd, "clients_excluded",
                       f"{plan.stage_id}: {len(excluded)} client(s) excluded, budget below {footprint:.1f} MB",
                       {"stage": plan.stage_id, "clients": list(excluded), "footprint_mb": footprint,
                        "serials": [exp.executors[c].label for c in excluded]})


def _merge_session_results(session: RoundSession, jobs: list[_JobResult]) -> None:
    """Add the round session's server-side tensors to every accepted result; an accepted client
    whose server side did not complete is rejected (its partial round is discarded)."""
    results = session.finish({j.client_id: j.status for j in jobs}, {j.client_id: j.metrics for j in jobs})
    for j in jobs:
        if j.status != "ok" or j.result is None:
            continue
        extra = results.get(j.client_id)
        if extra is None:
            j.status, j.reason, j.result = "rejected", "the server side of the round did not complete", None
            continue
        j.metrics = {**j.metrics, **dict(extra.metrics)}
        j.result = ClientResult(j.client_id, {**j.result.tensors, **dict(extra.tensors)}, j.result.num_samples,
                                j.metrics)


def _calibrate_footprint(exp: Experiment, stage_id: str, jobs: list[_JobResult]) -> tuple[float, float] | None:
    """Raise a stage's footprint to what the phones measured, so later eligibility is real.

    The export-time prediction leaves out the engine's own allocations (ORT's arena,
    gradient buffers...); the first time phones run a stage, the largest training
    footprint they measured (or the usage an out-of-memory kill reported) replaces the
    prediction when it is higher. Returns (old, new) MB when it changed.
    """
    measured: list[float] = []
    for j in jobs:
        mem = j.metrics.get("memory") if isinstance(j.metrics.get("memory"), dict) else {}
        fp = _finite_or_none(mem.get("footprint_bytes"))
        if j.status == "oom_killed" and mem.get("budget_applies_to") == "footprint":
            kill = _finite_or_none(mem.get("kill_usage_bytes"))
            fp = kill if kill is not None else fp
        if fp is not None:
            measured.append(fp / MIB)
    old = exp.footprint_mb[stage_id]
    if measured and max(measured) > old:
        exp.footprint_mb[stage_id] = max(measured)
        return old, max(measured)
    return None


def run_experiment(config: Any, run_dir: Path, resume: bool = False, progress: Progress | None = None,
                   wrap_executor: Callable[[ClientExecutor], ClientExecutor] | None = None) -> RunSummary:
    """Run (or resume) one experiment into `run_dir`; returns its summary (also written to summary.json).

    `config`: an ExperimentConfig (host/config.py) or an already resolved RunSettings.
    `wrap_executor`: optional hook around each client executor (fault injection, instrumentation).
    """
    from fedblocks.host.store import RoundRow, StageRow

    settings = config if isinstance(config, RunSettings) else settings_from_config(config)
    store_config = asdict(settings) if isinstance(config, RunSettings) else config
    progress = progress or Progress()
    run_dir = Path(run_dir)
    t_start = time.monotonic()
    ckpt_state = run_dir / "checkpoint" / "state.json"
    if not resume and (ckpt_state.exists() or (run_dir / "run.sqlite").exists()):
        raise HostError(f"--out {run_dir}: holds a run already; continue it with --resume {run_dir} "
                        "or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    exp = build_experiment(settings, run_dir, progress)
    weights = exp.init_weights
    start_round = 1
    history: dict[str, Any] = {"participants": [], "peak_measured_mb": None, "energy_j": None,
                               "energy_sources": [], "final_accuracy": None, "stages_used": [],
                               "rejected": 0, "stragglers": 0, "rounds_completed": 0}
    if resume:
        done, weights, state = load_checkpoint(run_dir, settings)
        exp.strategy.load_state_dict(state["strategy_state"])
        history = dict(state.get("history", history))
        exp.footprint_mb.update(history.get("footprint_mb") or {})  # calibrations measured before the stop
        start_round = done + 1
        progress.message(f"resuming after round {done}")
    recorder = Recorder(run_dir, store_config, settings, resume)
    (run_dir / "settings.json").write_text(json.dumps(asdict(settings), indent=1, default=str), encoding="utf-8")
    # the thread count sets torch's float summation order, so a resume keeps the one the run began with
    threads_before = torch.get_num_threads()
    history["host_threads"] = int(settings.host_threads or history.get("host_threads") or threads_before)
    torch.set_num_threads(history["host_threads"])
    status = "failed"
    try:
        build_executors(exp, progress)
        if wrap_executor is not None:
            exp.executors = {cid: wrap_executor(ex) for cid, ex in exp.executors.items()}
        recorder.devices(exp)
        recorder.event(start_round - 1, "host_threads", f"host torch threads: {history['host_threads']}"
                       + (" (kept from the run's start)" if resume else ""), {"threads": history["host_threads"]})
        runner = RoundRunner(exp, recorder, progress)
        progress.run_started(settings.rounds, f"{settings.strategy} on {settings.testbed}")
        stages_seen = recorder.stages()
        excluded_seen: dict[str, tuple[int, ...]] = {}
        rnd = start_round
        while rnd <= settings.rounds:
            plan = exp.strategy.plan_round(rnd, weights, exp.clients)
            if plan is None:
                break
            started_at = time.time()
            t_round = time.monotonic()
            _record_exclusions(recorder, exp, rnd, plan, excluded_seen)
            weights = exp.strategy.begin_round(rnd, plan, weights)
            progress.round_started(rnd, plan)
            # a strategy may run a server side during the round (SmartSplit's server segments)
            session = exp.strategy.round_session(rnd, plan, weights) if plan.client_ids else None
            try:
                jobs = runner.run(rnd, plan, weights, session) if plan.client_ids else []
                if session is not None:
                    _merge_session_results(session, jobs)
            finally:
                if session is not None:
                    session.close()
            accepted = [j for j in jobs if j.status == "ok" and j.result is not None]
            t_aggregate = time.monotonic()
            weights = exp.strategy.aggregate(rnd, plan, weights, [j.result for j in accepted if j.result])
            aggregate_s = time.monotonic() - t_aggregate
            target = exp.strategy.eval_target()
            accuracy = None
            eval_s: float | None = None
            if rnd % max(1, settings.eval_every) == 0 or rnd == settings.rounds:
                t_eval = time.monotonic()
                x_test, y_test = exp.dataset.x_test, exp.dataset.y_test
                if settings.eval_max_samples is not None:
                    x_test, y_test = x_test[:settings.eval_max_samples], y_test[:settings.eval_max_samples]
                accuracy = exp.host_model.accuracy(weights, target, x_test, y_test, settings.eval_batch_size)
                history["final_accuracy"] = accuracy
                eval_s = time.monotonic() - t_eval
            losses = [float(np.mean([v for v in j.metrics.get("loss", []) if v is not None]))
                      for j in accepted if any(v is not None for v in j.metrics.get("loss", []))]
            energy_total: float | None = None
            sources: set[str] = set()
            for j in jobs:
                joules, source = _energy_of(j.metrics)
                if joules is not None:
                    energy_total = (energy_total or 0.0) + joules
                if source:
                    sources.add(source)
                fp = _measured_footprint_mb(j.metrics)
                if fp is not None:
                    history["peak_measured_mb"] = max(history["peak_measured_mb"] or 0.0, fp)
            if energy_total is not None:
                history["energy_j"] = (history["energy_j"] or 0.0) + energy_total
            history["energy_sources"] = sorted(set(history["energy_sources"]) | sources)
            history["participants"] = sorted(set(history["participants"]) | {j.client_id for j in accepted})
            round_stages = [sid for sid in plan.stage_ids()
                            if sid == plan.stage_id or any(plan.stage_of(j.client_id) == sid for j in jobs)]
            history["stages_used"] += [sid for sid in round_stages if sid not in history["stages_used"]]
            history["rejected"] += sum(1 for j in jobs if j.status not in ("ok", "straggler"))
            history["stragglers"] += sum(1 for j in jobs if j.status == "straggler")
            calibrated = {sid: c for sid in round_stages if (c := _calibrate_footprint(
                exp, sid, [j for j in jobs if plan.stage_of(j.client_id) == sid])) is not None}
            if calibrated:
                history["footprint_mb"] = dict(exp.footprint_mb)
            events = exp.strategy.after_round(rnd, weights, {"accuracy": accuracy})
            record = RoundRecord(
                round=rnd, stage_id=plan.stage_id, selected=list(plan.client_ids),
                accepted=[j.client_id for j in accepted],
                rejected={j.client_id: f"{j.status}: {j.reason}" for j in jobs if j.status not in ("ok", "straggler")},
                stragglers={j.client_id: j.reason for j in jobs if j.status == "straggler"},
                accuracy=accuracy, eval_target=f"{target.kind}-{target.k}",
                train_loss=float(np.mean(losses)) if losses else None, wall_s=time.monotonic() - t_round,
                energy_j=energy_total, energy_sources=sorted(sources), notes=plan.notes,
                events=[{"kind": e.kind, "message": e.message, **dict(e.data)} for e in events])
            history["rounds_completed"] = rnd
            # checkpoint first: a crash after it re-records this round on resume instead of re-running it
            save_checkpoint(run_dir, rnd, weights, exp.strategy, settings, history)
            for j in jobs:
                recorder.job(rnd, _job_row(rnd, j, exp, plan.stage_of(j.client_id), exp.executors[j.client_id].label))
                if j.status != "ok":
                    recorder.event(rnd, "result_excluded", f"round {rnd} client {j.client_id}: {j.status}: {j.reason}",
                                   {"client": j.client_id, "status": j.status, "reason": j.reason}, level="warning")
            em = None
            for sid, (old_mb, new_mb) in calibrated.items():
                recorder.event(rnd, "footprint_calibrated", f"{sid}: phones measured "
                               f"{new_mb:.1f} MB (predicted {old_mb:.1f} MB); eligibility now uses "
                               "the measured figure", {"stage": sid, "predicted_mb": old_mb, "measured_mb": new_mb})
            for ev in events:
                recorder.event(rnd, ev.kind, ev.message, ev.data)
                if ev.kind == "effective_movement":
                    em = ev.data.get("em")
            frozen_at = next((rnd for e in events if e.kind == "block_frozen"), None)
            for sid in round_stages:
                prev = stages_seen.get(sid)
                stage_row = StageRow(sid, exp.stage_specs[sid].kind, int(exp.stage_dicts[sid]["block"]) or None,
                                     first_round=prev.first_round if prev else rnd, last_round=rnd,
                                     frozen_at_round=frozen_at if frozen_at and sid == plan.stage_id
                                     else (prev.frozen_at_round if prev else None))
                recorder.stage(stage_row)
                stages_seen[sid] = stage_row
            recorder.round(RoundRow(round=rnd, stage_id=plan.stage_id, started_at=started_at, ended_at=time.time(),
                                    selected=len(plan.client_ids), completed=len(accepted),
                                    failed=len(jobs) - len(accepted), accuracy=accuracy, loss=None, em=em,
                                    notes=plan.notes, aggregate_s=aggregate_s, eval_s=eval_s))
            ckpt = run_dir / "checkpoint" / "weights.npz"
            recorder.checkpoint(rnd, ckpt, sha256_file(ckpt))
            progress.round_finished(record)
            rnd += 1
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        exp.close()
        recorder.close(status)
        torch.set_num_threads(threads_before)
    _atomic_write_bytes(run_dir / "final_weights.npz", _weights_bytes(weights))
    strategy = exp.strategy
    used = history["stages_used"]
    summary = RunSummary(
        run_dir=str(run_dir), strategy=strategy.name, strategy_description=strategy.description,
        respects_budgets=bool(getattr(strategy, "respects_budgets", True)), testbed=settings.testbed,
        rounds_completed=int(history["rounds_completed"]), final_accuracy=history["final_accuracy"],
        participating_clients=len(history["participants"]), total_clients=settings.num_clients,
        peak_predicted_footprint_mb=max((exp.predicted_mb[s] for s in used), default=0.0),
        peak_measured_footprint_mb=history["peak_measured_mb"], energy_j=history["energy_j"],
        energy_sources=list(history["energy_sources"]), dataset=exp.dataset.name, model=settings.model,
        wall_s=time.monotonic() - t_start, rejected_results=int(history["rejected"]),
        stragglers=int(history["stragglers"]), stages_used=list(used), weights_sha256=weights_digest(weights))
    (run_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=1, default=_json_default),
                                          encoding="utf-8")
    return summary


def settings_from_config(cfg: Any) -> RunSettings:
    """Resolve an ExperimentConfig (host/config.py) into the loop's settings."""
    c = cfg.clients
    t = cfg.training
    budgets: tuple[float | None, ...] = ()
    budget_mode = "process"
    drawn = c.budgets(t.seed)
    if drawn is not None:
        budgets = tuple(drawn)
        budget_mode = "footprint"  # a training-memory budget: compared with the predicted footprint
    elif c.profiles:
        from fedblocks.testbed.virtual import load_profile

        budgets = tuple(float(load_profile(c.profile_for(i)).memory_budget_mb) for i in range(c.count))
    return RunSettings(
        model=cfg.model.name, num_blocks=cfg.model.blocks, dataset=cfg.dataset.name,
        dataset_fallback=cfg.dataset.fallback,
        data_dir=None if cfg.dataset.data_dir is None else str(cfg.dataset.data_dir),
        limit_train=cfg.dataset.limit_train, limit_test=cfg.dataset.limit_test,
        partition=cfg.partition.scheme, alpha=cfg.partition.alpha, samples_per_client=cfg.partition.samples_per_client,
        min_samples=cfg.partition.min_samples,
        num_clients=c.count, testbed=c.testbed, budgets_mb=budgets, budget_mode=budget_mode, profiles=c.profiles,
        serials=c.serials, base_port=c.base_port, strategy=cfg.strategy.name,
        strategy_params=_plain_params(cfg.strategy.params), rounds=t.rounds, fraction=t.fraction,
        local_epochs=t.local_epochs, max_steps=t.max_steps, batch_size=t.batch_size, augment=t.augment,
        host_threads=t.host_threads, lr=t.optimizer.lr,
        momentum=t.optimizer.momentum, weight_decay=t.optimizer.weight_decay,
        weighted_aggregation=t.weighted_aggregation, seed=t.seed, deadline_s=t.deadline_s, engine=c.engine,
        eval_every=cfg.evaluation.every, eval_batch_size=cfg.evaluation.batch_size, label=cfg.name)


def _plain_params(params: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        out[k] = _plain_params(v) if isinstance(v, Mapping) else (list(v) if isinstance(v, tuple) else v)
    return out


__all__ = ["Progress", "RoundRecord", "RunSettings", "RunSummary", "derive_seed", "run_experiment"]
