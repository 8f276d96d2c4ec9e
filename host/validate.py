"""Validation of a result bundle before it may count in aggregation.

Everything a device sends back is untrusted. A bundle counts only if:
status.json says ok (and names the job); weights.npz loads with
allow_pickle=False and holds exactly the stage's trainable + state tensors, with
the manifest's shapes and dtypes, all finite; and, where status/metrics report a
sha256 of weights.npz, the file we pulled hashes to it. Anything else is a
`BundleRejected` with a one-line reason the round loop records.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedblocks.device_runtime.spec import StageSpec

RESULT_FORMAT = "fedblocks.result"
RESULT_VERSION = 1
MAX_JSON_BYTES = 8 * 1024 * 1024


class BundleRejected(Exception):
    """The bundle is not usable; str(exc) is the reason recorded in the run store."""


@dataclass(frozen=True)
class ValidatedResult:
    tensors: dict[str, np.ndarray]
    num_samples: int
    metrics: dict[str, Any]
    weights_sha256: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise BundleRejected(f"{what} missing")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise BundleRejected(f"{what} is larger than {MAX_JSON_BYTES} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleRejected(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BundleRejected(f"{what} is not a JSON object")
    return data


def expected_tensors(stage: StageSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every tensor a bundle for this stage must carry."""
    out = {t.name: (t.shape, t.dtype) for t in stage.trainable}
    out.update({s.name: (s.shape, s.dtype) for s in stage.state})
    return out


def load_weights_strict(path: Path, expected: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, np.ndarray]:
    """Load an .npz without pickle and check names, shapes, dtypes and finiteness."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            missing = sorted(set(expected) - names)
            extra = sorted(names - set(expected))
            if missing:
                raise BundleRejected(f"weights.npz lacks {len(missing)} tensor(s), e.g. '{missing[0]}'")
            if extra:
                raise BundleRejected(f"weights.npz has unexpected tensor(s), e.g. '{extra[0]}'")
            tensors = {name: npz[name] for name in expected}
    except BundleRejected:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise BundleRejected(f"weights.npz cannot be read safely: {exc}") from None
    for name, (shape, dtype) in expected.items():
        t = tensors[name]
        if t.shape != tuple(shape):
            raise BundleRejected(f"'{name}' has shape {list(t.shape)}, manifest says {list(shape)}")
        if t.dtype != np.dtype(dtype):
            raise BundleRejected(f"'{name}' has dtype {t.dtype}, manifest says {dtype}")
        if t.dtype.kind == "f" and not np.all(np.isfinite(t)):
            raise BundleRejected(f"'{name}' contains NaN or Inf")
    return tensors


def validate_bundle(bundle: Path, stage: StageSpec, job_id: str, expected_samples: int | None = None) -> ValidatedResult:
    """Check one pulled result bundle directory against the stage it was trained for."""
    status = _read_json(bundle / "status.json", "status.json")
    if status.get("format") != RESULT_FORMAT:
        raise BundleRejected(f"status.json format is {status.get('format')!r}, expected {RESULT_FORMAT!r}")
    version = status.get("version")
    if not isinstance(version, int) or version > RESULT_VERSION:
        raise BundleRejected(f"status.json version {version!r} is not supported (<= {RESULT_VERSION})")
    if status.get("job_id") != job_id:
        raise BundleRejected(f"status.json is for job {status.get('job_id')!r}, expected {job_id!r}")
    if status.get("status") != "ok":
        reason = str(status.get("reason", ""))[:300]
        raise BundleRejected(f"device reported {status.get('status')!r}: {reason}")
    metrics = _read_json(bundle / "metrics.json", "metrics.json")
    weights_path = bundle / "weights.npz"
    if not weights_path.is_file():
        raise BundleRejected("weights.npz missing")
    digest = sha256_file(weights_path)
    for source, where in ((status, "status.json"), (metrics, "metrics.json")):
        claimed = source.get("weights_sha256")
        if claimed is not None and claimed != digest:
            raise BundleRejected(f"weights.npz sha256 {digest[:12]} does not match {where} ({str(claimed)[:12]})")
    tensors = load_weights_strict(weights_path, expected_tensors(stage))
    samples = metrics.get("samples_seen", metrics.get("num_samples"))
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        raise BundleRejected(f"metrics.json samples_seen is {samples!r}, expected a non-negative integer")
    if expected_samples is not None and samples > expected_samples:
        raise BundleRejected(f"metrics.json claims {samples} samples, the job allowed at most {expected_samples}")
    return ValidatedResult(tensors=tensors, num_samples=samples, metrics=metrics, weights_sha256=digest)
