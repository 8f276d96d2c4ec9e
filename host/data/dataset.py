"""The ``Dataset`` type, where data files are looked for, and shared helpers."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedblocks.host.errors import HostError

DATASET_NAMES: tuple[str, ...] = ("cifar10", "fashion_mnist", "fsdd", "shakespeare")
IMAGE_DATASETS: tuple[str, ...] = ("cifar10", "fashion_mnist")  # where crop-and-flip augmentation makes sense
# Datasets whose samples come with their own owners (speakers, roles): partition scheme "natural".
NATURAL_CLIENT_DATASETS: tuple[str, ...] = ("fsdd", "shakespeare")

# Fixed subset seed for limit_train / limit_test, so a limited load is the same subset every time.
SUBSET_SEED = 0


class DataMissingError(HostError):
    """A dataset's file is not where it was looked for (a fallback dataset may be used)."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset, ready for partitioning.

    Images are float32 NCHW, normalised per channel with the constants documented in
    docs/data.md; character sequences are int64 ids. Labels are int64 in [0, num_classes).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    # Index arrays into the train split, one per natural client (speaker, role); None otherwise.
    natural_clients: list[np.ndarray] | None = None
    natural_client_names: list[str] | None = None
    source: str = ""  # the file (or directory) it was read from
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.y_test.shape[0])


def project_root() -> Path:
    """The fedblocks checkout: host/data/dataset.py -> parents[2]."""
    return Path(__file__).resolve().parents[2]


def default_data_dir() -> Path:
    return project_root().parent / "shared" / "data"


def resolve_data_dir(data_dir: Path | str | None = None) -> Path:
    """Explicit argument, then $FEDBLOCKS_DATA, then ../shared/data beside the project root."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("FEDBLOCKS_DATA")
    if env:
        return Path(env).expanduser()
    return default_data_dir()


def cache_dir() -> Path:
    """$FEDBLOCKS_CACHE, else ~/.cache/fedblocks (decoded datasets live in its datasets/ folder)."""
    env = os.environ.get("FEDBLOCKS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedblocks"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def subset_indices(n: int, limit: int | None) -> np.ndarray | None:
    """Sorted indices of a fixed pseudo-random subset of size ``limit`` (None: keep all)."""
    if limit is None or limit >= n:
        return None
    if limit <= 0:
        raise HostError(f"dataset limit must be a positive integer, got {limit}")
    chosen = np.random.default_rng(SUBSET_SEED).permutation(n)[:limit]
    return np.sort(chosen)


def remap_natural_clients(clients: list[np.ndarray], kept: np.ndarray, n_before: int) -> list[np.ndarray]:
    """Translate index arrays into the train split after keeping only rows ``kept``."""
    new_index = np.full(n_before, -1, dtype=np.int64)
    new_index[kept] = np.arange(kept.shape[0], dtype=np.int64)
    out = []
    for idx in clients:
        mapped = new_index[idx]
        out.append(mapped[mapped >= 0])
    return out


def normalise_images(
    images_u8: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], layout: str = "NHWC"
) -> np.ndarray:
    """uint8 NHWC (or NCHW) -> float32 NCHW, (x/255 - mean) / std per channel.

    Two passes (scale into a fresh float32 array, then shift in place): a contiguous NCHW
    input normalises 50,000 CIFAR images in well under a second.
    """
    nchw = images_u8.transpose(0, 3, 1, 2) if layout == "NHWC" else images_u8
    std32 = np.asarray(std, dtype=np.float32)
    scale = (1.0 / (255.0 * std32))[None, :, None, None].astype(np.float32)
    shift = (np.asarray(mean, dtype=np.float32) / std32)[None, :, None, None]
    x = np.empty(nchw.shape, dtype=np.float32)
    np.multiply(nchw, scale, out=x, dtype=np.float32)
    x -= shift
    return x
