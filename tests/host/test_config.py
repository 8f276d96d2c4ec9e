"""Experiment config: valid files load into typed objects; every error names its field."""

from __future__ import annotations

import hashlib
import json
import textwrap
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from fedblocks.host.config import ExperimentConfig, ParamReader, load_config, parse_config
from fedblocks.host.errors import HostError

QUICKSTART = """
name = "quickstart"
[model]
name = "resnet8"
[dataset]
name = "cifar10"
fallback = "fashion_mnist"
limit_train = 2000
[partition]
scheme = "dirichlet"
alpha = 0.5
samples_per_client = 300
[clients]
count = 6
testbed = "virtual"
profiles = ["lowend-2gb", "flagship-8gb"]
engine = "ort"
[strategy]
name = "profl"
em_window = 6
em_threshold = 0.1
[training]
rounds = 20
fraction = 0.5
local_epochs = 1
batch_size = 32
seed = 7
deadline_s = 300
[training.optimizer]
name = "sgd"
lr = 0.01
momentum = 0.9
weight_decay = 5e-4
[evaluation]
every = 2
batch_size = 256
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(textwrap.dedent(text))
    return path


def _edit(section_line: str, replacement: str) -> str:
    assert section_line in QUICKSTART
    return QUICKSTART.replace(section_line, replacement, 1)


def test_quickstart_loads_into_typed_config(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, QUICKSTART))
    assert isinstance(cfg, ExperimentConfig) and cfg.name == "quickstart"
    assert cfg.model.name == "resnet8" and cfg.model.num_classes is None
    assert (cfg.dataset.name, cfg.dataset.fallback, cfg.dataset.limit_train) == ("cifar10", "fashion_mnist", 2000)
    assert cfg.partition.samples_per_client == 300 and cfg.partition.alpha == 0.5
    assert cfg.clients.profile_for(0) == "lowend-2gb" and cfg.clients.profile_for(3) == "flagship-8gb"
    assert cfg.clients.budgets(0) is None
    assert cfg.strategy.name == "profl" and dict(cfg.strategy.params) == {"em_window": 6, "em_threshold": 0.1}
    assert cfg.training.rounds == 20 and cfg.training.deadline_s == 300.0
    assert isinstance(cfg.training.deadline_s, float)
    assert cfg.training.optimizer.momentum == 0.9 and cfg.evaluation.every == 2
    with pytest.raises(TypeError):
        cfg.strategy.params["em_window"] = 3  # type: ignore[index]


def test_to_dict_round_trips(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, QUICKSTART))
    again = parse_config(cfg.to_dict(), source=cfg.source)
    assert again == cfg
    assert '"em_window": 6' in cfg.to_json()


def test_defaults_fill_optional_sections(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, """
        [model]
        name = "resnet18"
        [dataset]
        name = "fsdd"
        [clients]
        count = 100
        budget_mb = [100, 900]
        [strategy]
        name = "fedavg"
    """))
    assert cfg.name == "exp"  # the file's stem
    assert cfg.training.rounds == 20 and cfg.training.local_epochs == 5 and cfg.training.optimizer.lr == 0.01
    assert cfg.partition.scheme == "dirichlet" and cfg.evaluation.batch_size == 256
    budgets = cfg.clients.budgets(seed=0)
    assert budgets is not None and len(budgets) == 100 and all(100 <= b <= 900 for b in budgets)
    assert budgets == cfg.clients.budgets(seed=0) and budgets != cfg.clients.budgets(seed=1)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("rounds = 20", "rounds = -3", "config: training.rounds: must be an integer >= 1, got -3"),
        ('name = "profl"', 'name = "foo"', "config: strategy.name: unknown strategy 'foo' (choose "),
        ("rounds = 20", "roundz = 20", "config: training.roundz: unknown key (known here: "),
        ("fraction = 0.5", "fraction = 1.5", "config: training.fraction: must be a number in (0, 1], got 1.5"),
        ("lr = 0.01", "lr = 0", "config: training.optimizer.lr: must be a number > 0, got 0"),
        ("lr = 0.01", 'lr = "fast"', "config: training.optimizer.lr: must be a finite number, got 'fast'"),
        ("count = 6", "count = true", "config: clients.count: must be an integer, got True"),
        ('testbed = "virtual"', 'testbed = "adb"', "config: clients.serials: testbed 'adb' needs the phones' serials"),
        ('engine = "ort"', 'engine = "tflite"', "config: clients.engine: unknown value 'tflite' (choose ort, torch, executorch)"),
        ('scheme = "dirichlet"', 'scheme = "natural"', "config: partition.scheme: 'natural' needs a dataset with its own clients"),
        ('name = "cifar10"', 'name = "imagenet"', "config: dataset.name: unknown value 'imagenet'"),
        ('fallback = "fashion_mnist"', 'fallback = "cifar10"', "config: dataset.fallback: must differ from dataset.name"),
        ('name = "resnet8"', 'name = "vgg99"', "config: model.name: unknown model 'vgg99' (choose "),
        ('profiles = ["lowend-2gb", "flagship-8gb"]', 'profiles = ["lowend-2gb"]\nbudget_mb = [100, 900]',
         "config: clients.budget_mb: give either clients.profiles or clients.budget_mb, not both"),
        ('profiles = ["lowend-2gb", "flagship-8gb"]', "budget_mb = [900, 100]",
         "config: clients.budget_mb: must be [low, high] with low <= high, got [900.0, 100.0]"),
        ('profiles = ["lowend-2gb", "flagship-8gb"]', "budget_mb = [100]",
         "config: clients.budget_mb: must hold exactly 2 numbers, got 1"),
        ('profiles = ["lowend-2gb", "flagship-8gb"]', 'profiles = ["potato-1gb"]',
         "config: clients.profiles: unknown profile 'potato-1gb'"),
        ("every = 2", "every = 0", "config: evaluation.every: must be an integer >= 1, got 0"),
        ('name = "quickstart"', 'name = "my run!"', "config: name: use letters, digits"),
        ("alpha = 0.5", "alpha = -1", "config: partition.alpha: must be a number > 0, got -1"),
        ("seed = 7", 'seed = 7\naugment = "mixup"', "config: training.augment: unknown value 'mixup' (choose none, crop-flip)"),
        ("seed = 7", "seed = 7\nhost_threads = 0", "config: training.host_threads: must be an integer >= 1, got 0"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    with pytest.raises(HostError) as info:
        load_config(_write(tmp_path, _edit(old, new)))
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_missing_sections_and_files(tmp_path: Path) -> None:
    with pytest.raises(HostError, match=r"^config: model: missing section \(required\)$"):
        load_config(_write(tmp_path, QUICKSTART.replace('[model]\nname = "resnet8"\n', "")))
    with pytest.raises(HostError, match=r"^config: clients.count: missing \(required\)$"):
        load_config(_write(tmp_path, QUICKSTART.replace("count = 6\n", "")))
    with pytest.raises(HostError, match="no such file"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(HostError, match="not valid TOML"):
        load_config(_write(tmp_path, "[model\nname = 1"))
    no_eval = QUICKSTART.replace("[evaluation]\nevery = 2\nbatch_size = 256\n", "")
    with pytest.raises(HostError, match=r"^config: evaluation: must be a table, got int$"):
        load_config(_write(tmp_path, "evaluation = 3\n" + no_eval))


def test_strategy_params_table_and_relative_paths(tmp_path: Path) -> None:
    text = _edit("em_window = 6\nem_threshold = 0.1", "[strategy.params]\nem_window = 6")
    text = text.replace("limit_train = 2000", 'data_dir = "data"')
    cfg = load_config(_write(tmp_path, text))
    assert dict(cfg.strategy.params) == {"em_window": 6}
    assert cfg.dataset.data_dir == (tmp_path / "data").resolve()
    both = _edit("em_window = 6\nem_threshold = 0.1", "em_window = 6\n[strategy.params]\nem_window = 7")
    with pytest.raises(HostError, match=r"config: strategy.em_window: given both in \[strategy\] and in \[strategy.params\]"):
        load_config(_write(tmp_path, both))


def test_param_reader_for_strategies() -> None:
    reader = ParamReader({"em_window": 6, "em_threshold": 0.5, "mode": "fast", "typo": 1}, "strategy")
    assert reader.int("em_window", 6, min=2) == 6
    assert reader.float("em_threshold", 0.1, min=0.0, max=1.0) == 0.5
    assert reader.float("lambda1", 0.01) == 0.01  # default when absent
    assert reader.int("max_rounds_per_block", None) is None
    assert reader.str("mode", "slow", choices=["slow", "fast"]) == "fast"
    with pytest.raises(HostError, match=r"^config: strategy.typo: unknown key \(known here: "):
        reader.unknown_keys_error()
    strict = ParamReader({"em_window": 1, "em_threshold": 2.0, "mode": "x", "lams": [1, "a"]}, "strategy")
    with pytest.raises(HostError, match=r"^config: strategy.em_window: must be an integer >= 2, got 1$"):
        strict.int("em_window", 6, min=2)
    with pytest.raises(HostError, match=r"^config: strategy.em_threshold: must be a number in \[0, 1\], got 2.0$"):
        strict.float("em_threshold", 0.1, min=0.0, max=1.0)
    with pytest.raises(HostError, match=r"^config: strategy.mode: unknown value 'x' \(choose slow, fast\)$"):
        strict.str("mode", "slow", choices=["slow", "fast"])
    with pytest.raises(HostError, match=r"^config: strategy.lams: must be a list of numbers"):
        strict.float_list("lams", None)
    with pytest.raises(HostError, match=r"^config: strategy.needed: missing \(required\)$"):
        strict.float("needed")
    clean = ParamReader({"a": 1}, "strategy")
    clean.int("a")
    clean.unknown_keys_error()  # nothing unknown: no error


def test_host_threads_reach_the_run_settings(tmp_path: Path) -> None:
    from fedblocks.host.loop import settings_from_config

    cfg = load_config(_write(tmp_path, _edit("seed = 7", "seed = 7\nhost_threads = 3")))
    assert cfg.training.host_threads == 3 and parse_config(cfg.to_dict(), source=cfg.source) == cfg
    assert settings_from_config(cfg).host_threads == 3
    unset = settings_from_config(load_config(_write(tmp_path, QUICKSTART)))
    assert unset.host_threads is None
    # unset, the field leaves the fingerprint as it was before the field existed, so runs made
    # then still resume; set, it is part of the experiment
    before = {k: v for k, v in asdict(unset).items() if k not in ("label", "serials", "base_port", "host_threads")}
    assert unset.fingerprint() == hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode()).hexdigest()
    assert unset.fingerprint() != replace(unset, host_threads=1).fingerprint()


def test_augmentation_is_for_image_datasets(tmp_path: Path) -> None:
    augmented = _edit("seed = 7", 'seed = 7\naugment = "crop-flip"')
    cfg = load_config(_write(tmp_path, augmented))
    assert cfg.training.augment == "crop-flip" and parse_config(cfg.to_dict(), source=cfg.source) == cfg
    audio = augmented.replace('name = "cifar10"\nfallback = "fashion_mnist"', 'name = "fsdd"')
    with pytest.raises(HostError) as info:
        load_config(_write(tmp_path, audio))
    assert str(info.value) == ("config: training.augment: 'crop-flip' crops and mirrors images; "
                               "dataset 'fsdd' is not images (use 'none')")
