"""``load_dataset``: one entry point over the dataset readers."""

from __future__ import annotations

import logging
from pathlib import Path

from fedblocks.host.data.cifar10 import load_cifar10
from fedblocks.host.data.dataset import DATASET_NAMES, DataMissingError, Dataset, resolve_data_dir
from fedblocks.host.data.fashion_mnist import SYSTEM_DIR, load_fashion_mnist
from fedblocks.host.data.fsdd import load_fsdd
from fedblocks.host.data.shakespeare import load_shakespeare
from fedblocks.host.errors import HostError

log = logging.getLogger(__name__)


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise HostError(f"dataset {name} must be a positive integer, got {value!r}")


def load_dataset(
    name: str,
    data_dir: Path | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Dataset:
    """Load ``name`` (cifar10 | fashion_mnist | fsdd | shakespeare) from ``data_dir``.

    data_dir: explicit argument, then $FEDBLOCKS_DATA, then ../shared/data beside the
    project root; fashion_mnist then also looks in /usr/share/datasets/fashion-mnist
    (Debian's dataset-fashion-mnist). limit_*: keep a fixed pseudo-random subset (seed 0) of that size.
    Raises DataMissingError (a HostError) naming the expected file when it is absent.
    """
    if name not in DATASET_NAMES:
        raise HostError(f"unknown dataset '{name}' (choose {', '.join(DATASET_NAMES)})")
    _check_limit("limit_train", limit_train)
    _check_limit("limit_test", limit_test)
    folder = resolve_data_dir(data_dir)
    if name == "cifar10":
        return load_cifar10(folder, limit_train, limit_test)
    if name == "fashion_mnist":
        return load_fashion_mnist([folder, SYSTEM_DIR], limit_train, limit_test)
    if name == "fsdd":
        return load_fsdd(folder, limit_train, limit_test)
    return load_shakespeare(folder, limit_train, limit_test)


def load_configured_dataset(
    name: str,
    fallback: str | None = None,
    data_dir: Path | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Dataset:
    """``load_dataset(name)``, or ``load_dataset(fallback)`` when name's files are absent.

    The fallback is logged and recorded in ``Dataset.notes['fallback_from']``.
    """
    try:
        return load_dataset(name, data_dir, limit_train, limit_test)
    except DataMissingError as missing:
        if fallback is None or fallback == name:
            raise
        log.warning("%s; using fallback dataset %s", missing, fallback)
        dataset = load_dataset(fallback, data_dir, limit_train, limit_test)
        dataset.notes["fallback_from"] = f"{name}: {missing}"
        return dataset
