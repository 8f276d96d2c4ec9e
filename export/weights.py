"""Weights as ``.npz`` files keyed by global tensor name (never pickle).

The host, the export pipeline and the tests move weights with these three helpers;
the device runtime reads the same files with plain ``np.load(allow_pickle=False)``.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedblocks.export.errors import ExportError


def save_weights(path: str | Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write ``tensors`` as an uncompressed .npz (names are the archive members)."""
    for name, value in tensors.items():
        if not isinstance(value, np.ndarray):
            raise ExportError(f"weights '{name}': expected a numpy array, got {type(value).__name__}")
        if value.dtype == object:
            raise ExportError(f"weights '{name}': object arrays cannot be saved (no pickle)")
    Path(path).write_bytes(weights_to_bytes(tensors))


def weights_to_bytes(tensors: Mapping[str, np.ndarray]) -> bytes:
    """The exact bytes :func:`save_weights` writes.

    Same tensors -> same bytes (fixed zip timestamps, insertion order kept), so the
    sha256 of a weights file is a content address devices can cache by.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, value in tensors.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, member.getvalue())
    return buf.getvalue()


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Read an .npz written by :func:`save_weights`; never unpickles."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise ExportError(f"weights file {path} does not exist") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ExportError(f"weights file {path} is not a valid .npz: {exc}") from None


def state_dict_to_arrays(module: nn.Module, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Parameters and buffers of ``module`` by name as float32/int64 numpy copies.

    ``names`` selects (and orders) the tensors; None takes the whole state dict.
    """
    state = module.state_dict(keep_vars=False)
    wanted = list(state) if names is None else list(names)
    missing = [n for n in wanted if n not in state]
    if missing:
        raise ExportError(f"module has no tensor named {missing[0]!r} ({len(missing)} missing)")
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        tensor: torch.Tensor = state[name].detach().cpu()
        out[name] = tensor.numpy().copy()
    return out
