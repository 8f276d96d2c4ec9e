"""Content-addressed client shards: deterministic .npz files named by their sha256.

The bytes must depend on the arrays only. ``np.savez`` happens to give stable bytes on
CPython 3.11 (``ZipFile.open`` falls back to ZipInfo's 1980 default date), but that is an
implementation detail and the entries' "made by" OS differs on Windows. So we write the
zip ourselves: entries in a fixed order (x, y, then extras sorted by name), stored
uncompressed, dated 1980-01-01, made-by unix, mode 0644, each the standard .npy
serialisation (np.lib.format.write_array, allow_pickle=False). np.load reads it like
any .npz.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedblocks.host.errors import HostError

_FIXED_DATE = (1980, 1, 1, 0, 0, 0)
_ARRAY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ShardRef:
    path: Path  # <out_dir>/<sha256>.npz
    sha256: str
    num_samples: int


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Byte-deterministic .npz of ``arrays`` in the given order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            info.create_system = 3  # unix, whatever the writing OS
            zf.writestr(info, _npy_bytes(array))
    return buf.getvalue()


def write_shard(
    x: np.ndarray, y: np.ndarray, out_dir: Path, extra: dict[str, np.ndarray] | None = None
) -> ShardRef:
    """Write x, y (+ extra arrays, e.g. ``teacher``) as ``<out_dir>/<sha256>.npz``; reuse if present.

    Every array must have the same first dimension (samples) and a plain numeric dtype.
    """
    x, y = np.asarray(x), np.asarray(y)
    arrays: dict[str, np.ndarray] = {"x": x, "y": y}
    for name in sorted(extra or {}):
        if name in arrays or not _ARRAY_NAME.match(name):
            raise HostError(f"shard: extra array name '{name}' is reserved or not a plain identifier")
        arrays[name] = np.asarray(extra[name])  # type: ignore[index]
    n = x.shape[0] if x.ndim else -1
    for name, array in arrays.items():
        if array.dtype.hasobject or array.dtype.kind not in "biuf":
            raise HostError(f"shard: array '{name}' has dtype {array.dtype}; only bool/int/float arrays go to devices")
        if array.ndim == 0 or array.shape[0] != n:
            raise HostError(f"shard: array '{name}' has shape {array.shape}; every array needs {n} rows like x")
    payload = npz_bytes(arrays)
    digest = hashlib.sha256(payload).hexdigest()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{digest}.npz"
    if not path.is_file() or path.stat().st_size != len(payload):
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".shard-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return ShardRef(path=path, sha256=digest, num_samples=int(n))


def read_shard(path: Path, sha256: str | None = None) -> dict[str, np.ndarray]:
    """Load a shard's arrays (never unpickling); verify its sha256 when given."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HostError(f"shard {path}: cannot read ({exc.strerror})") from None
    if sha256 is not None:
        if not _SHA256.match(sha256):
            raise HostError(f"shard {path}: '{sha256}' is not a sha256 hex digest")
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise HostError(f"shard {path}: sha256 {actual} does not match the expected {sha256}")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise HostError(f"shard {path}: not a valid .npz ({exc})") from None
