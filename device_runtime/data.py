"""The local data shard and the batch order the seed fixes.

A shard is an .npz (no pickle) with one array per stage input, named like the
input (x, y, teacher, ...), all with the same number of samples N and per-sample
shape equal to the input's shape without the batch dimension.

Batch order (the host and tests reproduce it with `batch_indices`):
    rng = numpy.random.default_rng(seed)
    for every epoch: perm = rng.permutation(N); batches are perm[0:B], perm[B:2B], ...
    (a trailing partial batch is dropped; training stops after `epochs` epochs or
    `max_steps` steps, whichever comes first).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

# numpy.random is imported here, with the shard, not lazily by the first batch: that import (~3 MB of
# modules and code) would land after the baseline RSS and count as training footprint.
import numpy as np
import numpy.random

from .spec import StageSpec


class DataError(ValueError):
    """The shard does not fit the stage."""


def load_shard(path: Path, stage: StageSpec) -> dict[str, np.ndarray]:
    """Arrays by stage input name, validated and cast to the input dtypes."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {name: npz[name] for name in npz.files}
    except Exception as exc:  # OSError, ValueError (pickled data), zipfile.BadZipFile, EOFError ...
        raise DataError(f"data: {path} is not a readable .npz of plain arrays "
                        f"({type(exc).__name__}: {exc})") from exc
    out: dict[str, np.ndarray] = {}
    count: int | None = None
    for spec in stage.inputs:
        if spec.name not in raw:
            raise DataError(f"data: shard has no array '{spec.name}' (has: {', '.join(sorted(raw)) or 'none'}); "
                            f"stage '{stage.id}' needs {', '.join(t.name for t in stage.inputs)}")
        arr = raw[spec.name]
        if arr.ndim == 0 or tuple(arr.shape[1:]) != spec.shape[1:]:
            raise DataError(f"data: array '{spec.name}' has shape {list(arr.shape)}; expected "
                            f"[N, {', '.join(str(s) for s in spec.shape[1:])}]".replace(", ]", "]"))
        target = np.dtype(spec.dtype)
        if arr.dtype != target and not np.can_cast(arr.dtype, target, casting="same_kind"):
            raise DataError(f"data: array '{spec.name}' has dtype {arr.dtype}; expected {spec.dtype}")
        if count is None:
            count = arr.shape[0]
        elif arr.shape[0] != count:
            raise DataError(f"data: array '{spec.name}' has {arr.shape[0]} samples but "
                            f"'{stage.inputs[0].name}' has {count}")
        out[spec.name] = np.ascontiguousarray(arr, dtype=target)
    assert count is not None
    if count < stage.batch_size:
        raise DataError(f"data: shard has {count} samples, fewer than one batch of {stage.batch_size} "
                        "(batches are fixed-size; send at least one full batch)")
    return out


def steps_planned(num_samples: int, batch_size: int, epochs: int | None, max_steps: int | None) -> int:
    per_epoch = num_samples // batch_size
    if epochs is None:
        assert max_steps is not None
        return max_steps
    total = per_epoch * epochs
    return total if max_steps is None else min(total, max_steps)


def batch_indices(num_samples: int, batch_size: int, seed: int, epochs: int | None,
                  max_steps: int | None) -> Iterator[np.ndarray]:
    """Sample indices of every training step, in order (see the module docstring)."""
    rng = np.random.default_rng(seed)
    per_epoch = num_samples // batch_size
    total = steps_planned(num_samples, batch_size, epochs, max_steps)
    done = 0
    while done < total:
        perm = rng.permutation(num_samples)
        for b in range(per_epoch):
            if done >= total:
                return
            yield perm[b * batch_size:(b + 1) * batch_size]
            done += 1


# --- augmentation -------------------------------------------------------------------------
# Random crop with zero padding + horizontal flip, the CIFAR recipe of the ProFL / NeuLite code
# (research/methods.md). A shard is a fixed array, so without it every client sees the same
# 500 images each epoch and overfits them. The draws come from their own generator, so the
# batch order above does not change; the simulated testbed calls the same function, so both
# testbeds see the same augmented batches for the same seed.
AUGMENTATIONS = ("none", "crop-flip")
AUGMENT_IMAGE_INPUT = "x"  # the image input an augmentation transforms
AUGMENT_PASSIVE_INPUTS = ("y",)  # inputs it leaves as they are (labels do not move with a crop)
CROP_PAD = 4


def augmentable(stage: StageSpec) -> str | None:
    """None when `stage` can be augmented, else why not (one phrase)."""
    names = [t.name for t in stage.inputs]
    if AUGMENT_IMAGE_INPUT not in names:
        return f"the stage has no image input '{AUGMENT_IMAGE_INPUT}'"
    other = [n for n in names if n not in (AUGMENT_IMAGE_INPUT, *AUGMENT_PASSIVE_INPUTS)]
    if other:
        # e.g. ProFL shrinking's teacher logits: computed on the unaugmented images, a crop would
        # make them the targets of another picture
        return f"input '{other[0]}' is per-sample data computed from the unaugmented images"
    spec = next(t for t in stage.inputs if t.name == AUGMENT_IMAGE_INPUT)
    if (len(spec.shape) != 4 or not spec.dtype.startswith("float") or spec.shape[2] <= 2 * CROP_PAD
            or spec.shape[3] <= 2 * CROP_PAD):
        return (f"input '{AUGMENT_IMAGE_INPUT}' is not a float batch of images [N, C, H, W] larger than "
                f"{2 * CROP_PAD}x{2 * CROP_PAD} pixels")
    return None


class BatchAugmenter:
    """Transforms the image input of every batch, in step order, from one seed."""

    def __init__(self, kind: str, seed: int) -> None:
        if kind not in AUGMENTATIONS:
            raise ValueError(f"augmentation '{kind}' is unknown (choose from {', '.join(AUGMENTATIONS)})")
        self.kind = kind
        # a second stream beside the batch order's default_rng(seed): same seed, different draws
        self.rng = np.random.default_rng([seed, 0xA06])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.kind == "none":
            return batch
        return {**batch, AUGMENT_IMAGE_INPUT: crop_flip(batch[AUGMENT_IMAGE_INPUT], self.rng)}


def crop_flip(x: np.ndarray, rng: np.random.Generator, pad: int = CROP_PAD) -> np.ndarray:
    """Each image shifted by (dy, dx) uniform in [-pad, pad] with zeros filling in (a crop of the
    zero-padded image), then mirrored left-right with probability 1/2. One output array, no
    padded copy: the footprint grows by no more than the batch itself."""
    n, _, h, w = x.shape
    shifts = rng.integers(-pad, pad + 1, size=(n, 2))
    flips = rng.random(n) < 0.5
    out = np.zeros_like(x)
    for i in range(n):
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        # out[r, c] = x[r + dy, c + dx] where that lies inside the image
        out[i, :, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
            x[i, :, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
        if flips[i]:
            out[i] = out[i, :, :, ::-1].copy()
    return out
