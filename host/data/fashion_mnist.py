"""Fashion-MNIST from idx files (.gz or raw), e.g. Debian's dataset-fashion-mnist package."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from fedblocks.host.data.dataset import DataMissingError, Dataset, normalise_images, subset_indices
from fedblocks.host.errors import HostError

CLASS_NAMES: tuple[str, ...] = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
# Training-set statistics of x/255 (single channel).
MEAN: tuple[float] = (0.2860,)
STD: tuple[float] = (0.3530,)

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """An idx file (magic 0x0000 08 <ndim>, big-endian uint32 dims, then uint8 data).

    Labels (ndim 1) start at byte 8, images (ndim 3) at byte 16.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise HostError(f"{path}: cannot read idx file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or not 1 <= raw[3] <= 4:
        raise HostError(f"{path}: not an unsigned-byte idx file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise HostError(f"{path}: idx header truncated")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise HostError(f"{path}: idx header says {dims} ({expected} bytes) but the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def find_fashion_mnist(dirs: list[Path]) -> Path:
    for d in dirs:
        for sub in (d, d / "fashion-mnist"):
            if all((sub / f"{name}.gz").is_file() or (sub / name).is_file() for name in FILES.values()):
                return sub
    where = ", ".join(str(d) for d in dirs)
    raise DataMissingError(
        f"dataset fashion_mnist: expected {FILES['x_train']}.gz and the 3 other idx files in {where}; "
        "install them with `apt-get install dataset-fashion-mnist`"
    )


def load_fashion_mnist(
    dirs: list[Path], limit_train: int | None = None, limit_test: int | None = None
) -> Dataset:
    folder = find_fashion_mnist(dirs)
    arrays: dict[str, np.ndarray] = {}
    for key, name in FILES.items():
        path = folder / f"{name}.gz"
        arrays[key] = read_idx(path if path.is_file() else folder / name)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise HostError(f"{folder}: {split} images {x.shape} and labels {y.shape} do not match (N,28,28)/(N,)")
        if y.size and y.max() >= len(CLASS_NAMES):
            raise HostError(f"{folder}: {split} labels outside 0..9")
    tr = subset_indices(arrays["y_train"].shape[0], limit_train)
    te = subset_indices(arrays["y_test"].shape[0], limit_test)
    x_train = arrays["x_train"] if tr is None else arrays["x_train"][tr]
    y_train = arrays["y_train"] if tr is None else arrays["y_train"][tr]
    x_test = arrays["x_test"] if te is None else arrays["x_test"][te]
    y_test = arrays["y_test"] if te is None else arrays["y_test"][te]
    return Dataset(
        name="fashion_mnist",
        x_train=normalise_images(x_train[:, :, :, None], MEAN, STD),
        y_train=y_train.astype(np.int64),
        x_test=normalise_images(x_test[:, :, :, None], MEAN, STD),
        y_test=y_test.astype(np.int64),
        num_classes=10,
        input_shape=(1, 28, 28),
        class_names=CLASS_NAMES,
        source=str(folder),
    )
