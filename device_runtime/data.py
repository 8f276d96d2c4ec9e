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
