"""Weights in and out of a stage: .npz by global tensor name, never pickle.

A stage's weights are exactly its trainable tensors plus its state tensors
(BatchNorm running statistics); frozen tensors are baked into the artifacts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .spec import StageSpec


class WeightsError(ValueError):
    """Weights that do not match the stage (names, shapes, dtypes, finiteness)."""


def expected_tensors(stage: StageSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    return {t.name: (t.shape, t.dtype) for t in (*stage.trainable, *stage.state)}


def validate_weights(tensors: dict[str, np.ndarray], stage: StageSpec, what: str) -> None:
    """Raise WeightsError naming the first tensor that is missing, unknown, mis-shaped or non-finite."""
    expected = expected_tensors(stage)
    frozen = {t.name for t in stage.frozen}
    for name in sorted(tensors):
        if name not in expected:
            hint = " (it is frozen in this stage: baked into the artifacts)" if name in frozen else ""
            raise WeightsError(f"{what}: unexpected tensor '{name}' for stage '{stage.id}'{hint}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise WeightsError(f"{what}: missing tensor '{missing[0]}'{more} for stage '{stage.id}'")
    for name, (shape, dtype) in expected.items():
        arr = tensors[name]
        if tuple(arr.shape) != shape:
            raise WeightsError(f"{what}: tensor '{name}' has shape {list(arr.shape)}, expected {list(shape)}")
        if arr.dtype != np.dtype(dtype):
            raise WeightsError(f"{what}: tensor '{name}' has dtype {arr.dtype}, expected {dtype}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise WeightsError(f"{what}: tensor '{name}' has non-finite values (NaN or Inf)")


def load_weights(path: Path, stage: StageSpec, what: str = "init_weights") -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            tensors = {name: npz[name] for name in npz.files}
    except Exception as exc:  # OSError, ValueError (pickled data), zipfile.BadZipFile ...
        raise WeightsError(f"{what}: {path} is not a readable .npz of plain arrays "
                           f"({type(exc).__name__}: {exc})") from exc
    validate_weights(tensors, stage, what)
    return tensors


def save_weights(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Uncompressed .npz (fast to write on a phone; the host compresses if it wants)."""
    with open(path, "wb") as f:
        np.savez(f, **{name: np.ascontiguousarray(arr) for name, arr in tensors.items()})
