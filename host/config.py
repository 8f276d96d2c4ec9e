"""Experiment configuration: a TOML file validated into frozen dataclasses (docs/config.md).

Every error is a HostError naming the field path, e.g.
``config: training.rounds: must be an integer >= 1, got -3``.

Strategy-specific keys stay a mapping (``StrategyConfig.params``); each strategy reads
them with ``ParamReader(config.strategy.params, "strategy")`` so every strategy reports
bad values the same way, then calls ``unknown_keys_error()``.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, overload

import numpy as np

from fedblocks.device_runtime.data import AUGMENTATIONS
from fedblocks.host.data.dataset import DATASET_NAMES, IMAGE_DATASETS, NATURAL_CLIENT_DATASETS
from fedblocks.host.data.partition import DEFAULT_MIN_SAMPLES, PARTITION_SCHEMES
from fedblocks.host.errors import HostError

TESTBEDS: tuple[str, ...] = ("virtual", "adb", "simulated")
ENGINES: tuple[str, ...] = ("ort", "torch", "executorch")
OPTIMIZERS: tuple[str, ...] = ("sgd",)
# Used only when fedblocks.host.strategies cannot be imported (its STRATEGIES is the source of truth).
DEFAULT_STRATEGY_NAMES: tuple[str, ...] = ("fedavg", "exclusivefl", "profl", "neulite")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


def config_error(path: str, message: str) -> HostError:
    return HostError(f"config: {path}: {message}" if path else f"config: {message}")


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(bound)


class ParamReader:
    """Typed, range-checked reads from one TOML table; errors name ``<prefix>.<key>``.

    ``default=REQUIRED`` (the default) makes a key mandatory; ``default=None`` makes it
    optional (the read returns None when absent). Call ``unknown_keys_error()`` after the
    last read: it raises on keys nobody read (typos).
    """

    def __init__(self, section: Mapping[str, Any] | None, prefix: str) -> None:
        if section is not None and not isinstance(section, Mapping):
            raise config_error(prefix, f"must be a table, got {type(section).__name__}")
        self.section: Mapping[str, Any] = section or {}
        self.prefix = prefix
        self.read: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, message: str) -> HostError:
        return config_error(self.path(key), message)

    def has(self, key: str) -> bool:
        return key in self.section

    def _take(self, key: str, default: Any) -> tuple[bool, Any]:
        """(present, value); raises when a required key is missing."""
        self.read.add(key)
        if key in self.section:
            return True, self.section[key]
        if default is REQUIRED:
            raise self.error(key, "missing (required)")
        return False, default

    def _check_range(self, key: str, v: float, what: str, min: float | None, max: float | None,
                     exclusive_min: bool) -> None:
        if min is not None and (v <= min if exclusive_min else v < min):
            if max is None:
                raise self.error(key, f"must be {what} {'>' if exclusive_min else '>='} {_fmt(min)}, got {v!r}")
            lo = "(" if exclusive_min else "["
            raise self.error(key, f"must be {what} in {lo}{_fmt(min)}, {_fmt(max)}], got {v!r}")
        if max is not None and v > max:
            lo = "(" if exclusive_min else "["
            where = f"<= {_fmt(max)}" if min is None else f"in {lo}{_fmt(min)}, {_fmt(max)}]"
            raise self.error(key, f"must be {what} {where}, got {v!r}")

    @overload
    def int(self, key: str, default: int = ..., *, min: int | None = None, max: int | None = None) -> int: ...
    @overload
    def int(self, key: str, default: None, *, min: int | None = None, max: int | None = None) -> int | None: ...
    def int(self, key: str, default: Any = REQUIRED, *, min: int | None = None, max: int | None = None) -> Any:
        present, v = self._take(key, default)
        if not present:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(key, f"must be an integer, got {v!r}")
        self._check_range(key, v, "an integer", min, max, False)
        return v

    @overload
    def float(self, key: str, default: float = ..., *, min: float | None = None, max: float | None = None,
              exclusive_min: bool = False) -> float: ...
    @overload
    def float(self, key: str, default: None, *, min: float | None = None, max: float | None = None,
              exclusive_min: bool = False) -> float | None: ...
    def float(self, key: str, default: Any = REQUIRED, *, min: float | None = None, max: float | None = None,
              exclusive_min: bool = False) -> Any:
        present, v = self._take(key, default)
        if not present:
            return v
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self.error(key, f"must be a finite number, got {v!r}")
        self._check_range(key, v, "a number", min, max, exclusive_min)
        return v + 0.0

    @overload
    def str(self, key: str, default: str = ..., *, choices: Sequence[str] | None = None) -> str: ...
    @overload
    def str(self, key: str, default: None, *, choices: Sequence[str] | None = None) -> str | None: ...
    def str(self, key: str, default: Any = REQUIRED, *, choices: Sequence[str] | None = None) -> Any:
        present, v = self._take(key, default)
        if not present:
            return v
        if not isinstance(v, str) or not v:
            raise self.error(key, f"must be a non-empty string, got {v!r}")
        if choices is not None and v not in choices:
            raise self.error(key, f"unknown value {v!r} (choose {', '.join(choices)})")
        return v

    def bool(self, key: str, default: Any = REQUIRED) -> Any:
        present, v = self._take(key, default)
        if present and not isinstance(v, bool):
            raise self.error(key, f"must be true or false, got {v!r}")
        return v

    def str_list(self, key: str, default: Any = REQUIRED) -> Any:
        present, v = self._take(key, default)
        if not present:
            return v if v is None else tuple(v)
        if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
            raise self.error(key, f"must be a list of non-empty strings, got {v!r}")
        return tuple(v)

    def float_list(self, key: str, default: Any = REQUIRED, *, length: int | None = None,
                   min: float | None = None, max: float | None = None) -> Any:
        present, v = self._take(key, default)
        if not present:
            return v if v is None else tuple(v)
        if not isinstance(v, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v
        ):
            raise self.error(key, f"must be a list of numbers, got {v!r}")
        if length is not None and len(v) != length:
            raise self.error(key, f"must hold exactly {length} numbers, got {len(v)}")
        for x in v:
            self._check_range(key, x, "a list of numbers each", min, max, False)
        return tuple(x + 0.0 for x in v)

    def table(self, key: str) -> ParamReader:
        """A reader for the sub-table ``key`` (empty when absent)."""
        _, v = self._take(key, None)
        return ParamReader(v, self.path(key))

    def rest(self) -> dict[str, Any]:
        """Every key not read yet (and mark them read): for sections that pass keys through."""
        out = {k: v for k, v in self.section.items() if k not in self.read}
        self.read.update(out)
        return out

    def unknown_keys_error(self) -> None:
        """Raise a HostError naming the first key that no read asked for (a typo or a stray key)."""
        unknown = sorted(set(self.section) - self.read)
        if unknown:
            known = ", ".join(sorted(self.read)) or "none"
            raise self.error(unknown[0], f"unknown key (known here: {known})")


# ---------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class ModelConfig:
    name: str
    num_classes: int | None = None  # None: the dataset's
    blocks: int | None = None  # None: the model's own partition


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    fallback: str | None = None  # loaded instead when `name`'s files are absent
    limit_train: int | None = None
    limit_test: int | None = None
    data_dir: Path | None = None  # None: $FEDBLOCKS_DATA, then ../shared/data


@dataclass(frozen=True)
class PartitionConfig:
    scheme: str = "dirichlet"
    alpha: float = 0.5
    samples_per_client: int | None = None
    min_samples: int = DEFAULT_MIN_SAMPLES


@dataclass(frozen=True)
class ClientsConfig:
    count: int
    testbed: str = "virtual"
    profiles: tuple[str, ...] = ()  # cycled over clients
    budget_mb: tuple[float, float] | None = None  # uniform draw per client, seeded
    serials: tuple[str, ...] = ()  # adb testbed
    base_port: int = 6600  # virtual testbed
    engine: str = "ort"

    def profile_for(self, client_id: int) -> str | None:
        """The profile of client ``client_id`` (0-based): profiles are cycled."""
        return self.profiles[client_id % len(self.profiles)] if self.profiles else None

    def budgets(self, seed: int) -> tuple[float, ...] | None:
        """Per-client memory budgets (MB) drawn uniformly from budget_mb; None without budget_mb."""
        if self.budget_mb is None:
            return None
        lo, hi = self.budget_mb
        rng = np.random.default_rng([seed, 0xB0D6E7])
        return tuple(float(round(b, 1)) for b in rng.uniform(lo, hi, size=self.count))


@dataclass(frozen=True)
class StrategyConfig:
    name: str
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class OptimizerSettings:
    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass(frozen=True)
class TrainingConfig:
    rounds: int = 20
    fraction: float = 0.2  # share of clients selected per round
    local_epochs: int = 5
    batch_size: int = 32
    seed: int = 0
    deadline_s: float = 600.0  # a device job still running after this is a straggler
    max_steps: int | None = None  # optional cap on local steps per job
    weighted_aggregation: bool = True  # FedAvg weights by sample count (False: unweighted, as ProFL's code)
    augment: str = "none"  # "crop-flip": random 4-pixel crop + horizontal flip of every training batch
    # torch intra-op threads of the host process (simulated clients, SmartSplit server segments,
    # evaluation); None: torch's default, recorded in the checkpoint so a resume keeps it
    host_threads: int | None = None
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)


@dataclass(frozen=True)
class EvaluationConfig:
    every: int = 1  # rounds
    batch_size: int = 256


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    model: ModelConfig
    dataset: DatasetConfig
    partition: PartitionConfig
    clients: ClientsConfig
    strategy: StrategyConfig
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    source: Path | None = None  # the TOML file it came from

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``parse_config(cfg.to_dict())`` gives back an equal config."""
        return {
            "name": self.name,
            "model": _drop_none(vars(self.model)),
            "dataset": _drop_none({**vars(self.dataset),
                                   "data_dir": None if self.dataset.data_dir is None else str(self.dataset.data_dir)}),
            "partition": _drop_none(vars(self.partition)),
            "clients": _drop_none({
                **vars(self.clients),
                "profiles": list(self.clients.profiles) or None,
                "budget_mb": None if self.clients.budget_mb is None else list(self.clients.budget_mb),
                "serials": list(self.clients.serials) or None,
            }),
            "strategy": {"name": self.strategy.name, **_plain(self.strategy.params)},
            "training": _drop_none({**vars(self.training), "optimizer": vars(self.training.optimizer)}),
            "evaluation": vars(self.evaluation),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


# ---------------------------------------------------------------------------- loading


def load_config(path: Path | str) -> ExperimentConfig:
    """Read and validate an experiment TOML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HostError(f"config: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HostError(f"config: {path}: cannot read ({exc})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise HostError(f"config: {path}: not valid TOML ({exc})") from None
    return parse_config(data, base_dir=path.parent, source=path, default_name=path.stem)


def parse_config(
    data: Mapping[str, Any],
    base_dir: Path | None = None,
    source: Path | None = None,
    default_name: str = "experiment",
) -> ExperimentConfig:
    """Validate an already-parsed mapping (a TOML document or a stored ``to_dict()``).

    Relative paths (dataset.data_dir, profile files) are resolved against ``base_dir``.
    """
    top = ParamReader(data, "")
    for section in ("model", "dataset", "clients", "strategy"):
        if section not in data:
            raise config_error(section, "missing section (required)")
    name = top.str("name", default_name)
    if not _NAME.match(name):
        raise top.error("name", f"use letters, digits, '_', '.', '-' only, got {name!r}")
    model = _model(top.table("model"))
    dataset = _dataset(top.table("dataset"), base_dir)
    partition = _partition(top.table("partition"), dataset)
    clients = _clients(top.table("clients"), base_dir)
    strategy = _strategy(top.table("strategy"))
    training = _training(top.table("training"))
    not_images = [d for d in (dataset.name, dataset.fallback) if d is not None and d not in IMAGE_DATASETS]
    if training.augment != "none" and not_images:
        raise config_error("training.augment", f"{training.augment!r} crops and mirrors images; dataset "
                           f"{not_images[0]!r} is not images (use 'none')")
    evaluation = _evaluation(top.table("evaluation"))
    top.unknown_keys_error()
    return ExperimentConfig(name, model, dataset, partition, clients, strategy, training, evaluation, source)


def _known_names(module: str, attr: str) -> tuple[str, ...] | None:
    """Names another subsystem registers (None when it cannot be imported here)."""
    try:
        names = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None
    return tuple(names)


def _model(r: ParamReader) -> ModelConfig:
    name = r.str("name")
    known = _known_names("fedblocks.export.models", "MODEL_NAMES")
    if known is not None and name not in known:
        raise r.error("name", f"unknown model {name!r} (choose {', '.join(known)})")
    cfg = ModelConfig(name=name, num_classes=r.int("num_classes", None, min=2), blocks=r.int("blocks", None, min=1))
    r.unknown_keys_error()
    return cfg


def _dataset(r: ParamReader, base_dir: Path | None) -> DatasetConfig:
    name = r.str("name", choices=DATASET_NAMES)
    fallback = r.str("fallback", None, choices=DATASET_NAMES)
    if fallback == name:
        raise r.error("fallback", f"must differ from dataset.name ({name!r})")
    data_dir = r.str("data_dir", None)
    folder = None
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not folder.is_absolute() and base_dir is not None:
            folder = (base_dir / folder).resolve()
    cfg = DatasetConfig(name, fallback, r.int("limit_train", None, min=1), r.int("limit_test", None, min=1), folder)
    r.unknown_keys_error()
    return cfg


def _partition(r: ParamReader, dataset: DatasetConfig) -> PartitionConfig:
    cfg = PartitionConfig(
        scheme=r.str("scheme", "dirichlet", choices=PARTITION_SCHEMES),
        alpha=r.float("alpha", 0.5, min=0.0, exclusive_min=True),
        samples_per_client=r.int("samples_per_client", None, min=1),
        min_samples=r.int("min_samples", DEFAULT_MIN_SAMPLES, min=0),
    )
    if cfg.scheme == "natural":
        for path, ds in (("dataset.name", dataset.name), ("dataset.fallback", dataset.fallback)):
            if ds is not None and ds not in NATURAL_CLIENT_DATASETS:
                raise config_error(
                    "partition.scheme",
                    f"'natural' needs a dataset with its own clients ({', '.join(NATURAL_CLIENT_DATASETS)}), "
                    f"but {path} is {ds!r}",
                )
    r.unknown_keys_error()
    return cfg


def _check_profile(r: ParamReader, profile: str, base_dir: Path | None) -> str:
    if profile.endswith(".toml"):
        p = Path(profile).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = (base_dir / p).resolve()
        if not p.is_file():
            raise r.error("profiles", f"profile file {str(p)!r} does not exist")
        return str(p)
    builtin = _known_names("fedblocks.testbed.virtual.profiles", "BUILTIN_PROFILES")
    aliases = _known_names("fedblocks.testbed.virtual.profiles", "ALIASES") or ()
    if builtin is not None and profile not in builtin and profile not in aliases:
        raise r.error("profiles", f"unknown profile {profile!r} (choose {', '.join(builtin)}, or a .toml file)")
    return profile


def _clients(r: ParamReader, base_dir: Path | None) -> ClientsConfig:
    count = r.int("count", min=1)
    testbed = r.str("testbed", "virtual", choices=TESTBEDS)
    profiles = r.str_list("profiles", ())
    budget = r.float_list("budget_mb", None, length=2, min=1.0)
    if profiles and budget is not None:
        raise r.error("budget_mb", "give either clients.profiles or clients.budget_mb, not both")
    if budget is not None and budget[0] > budget[1]:
        raise r.error("budget_mb", f"must be [low, high] with low <= high, got {list(budget)}")
    profiles = tuple(_check_profile(r, p, base_dir) for p in profiles)
    serials = r.str_list("serials", ())
    if testbed == "adb" and not serials:
        raise r.error("serials", "testbed 'adb' needs the phones' serials (see `fedblocks devices`)")
    if testbed != "adb" and serials:
        raise r.error("serials", f"only used with testbed = 'adb' (testbed is {testbed!r})")
    cfg = ClientsConfig(
        count=count,
        testbed=testbed,
        profiles=profiles,
        budget_mb=None if budget is None else (budget[0], budget[1]),
        serials=serials,
        base_port=r.int("base_port", 6600, min=1024, max=65535),
        engine=r.str("engine", "ort", choices=ENGINES),
    )
    r.unknown_keys_error()
    return cfg


def _strategy(r: ParamReader) -> StrategyConfig:
    known = _known_names("fedblocks.host.strategies", "STRATEGIES") or DEFAULT_STRATEGY_NAMES
    name = r.str("name")
    if name not in known:
        raise r.error("name", f"unknown strategy {name!r} (choose {', '.join(known)})")
    params = r.rest()
    # Also accept the keys nested in a [strategy.params] table (merged; a key may appear once).
    nested = params.pop("params", None)
    if nested is not None:
        if not isinstance(nested, Mapping):
            raise r.error("params", f"must be a table, got {type(nested).__name__}")
        for key, value in nested.items():
            if key in params:
                raise r.error(key, "given both in [strategy] and in [strategy.params]")
            params[key] = value
    return StrategyConfig(name=name, params=_freeze(params))


def _training(r: ParamReader) -> TrainingConfig:
    opt = r.table("optimizer")
    optimizer = OptimizerSettings(
        name=opt.str("name", "sgd", choices=OPTIMIZERS),
        lr=opt.float("lr", 0.01, min=0.0, exclusive_min=True),
        momentum=opt.float("momentum", 0.9, min=0.0, max=0.999),
        weight_decay=opt.float("weight_decay", 5e-4, min=0.0),
    )
    opt.unknown_keys_error()
    cfg = TrainingConfig(
        rounds=r.int("rounds", 20, min=1),
        fraction=r.float("fraction", 0.2, min=0.0, max=1.0, exclusive_min=True),
        local_epochs=r.int("local_epochs", 5, min=1),
        batch_size=r.int("batch_size", 32, min=1),
        seed=r.int("seed", 0, min=0),
        deadline_s=r.float("deadline_s", 600.0, min=0.0, exclusive_min=True),
        max_steps=r.int("max_steps", None, min=1),
        weighted_aggregation=r.bool("weighted_aggregation", True),
        augment=r.str("augment", "none", choices=AUGMENTATIONS),
        host_threads=r.int("host_threads", None, min=1),
        optimizer=optimizer,
    )
    r.unknown_keys_error()
    return cfg


def _evaluation(r: ParamReader) -> EvaluationConfig:
    cfg = EvaluationConfig(every=r.int("every", 1, min=1), batch_size=r.int("batch_size", 256, min=1))
    r.unknown_keys_error()
    return cfg
