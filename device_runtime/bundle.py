"""The result bundle: a directory that appears complete or not at all.

Files go into a hidden staging directory beside the output directory (same file
system); status.json is written last, then the staging directory is renamed into
place. A reader that sees `output_dir/status.json` sees a finished bundle.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

RESULT_FORMAT = "fedblocks.result"
METRICS_FORMAT = "fedblocks.metrics"
BUNDLE_VERSION = 1
STATUSES = ("ok", "oom_killed", "failed")
# Scratch files of a run that do not belong in the finished bundle.
SCRATCH_FILES = ("plan.json", "progress.jsonl")


class BundleError(OSError):
    """The bundle cannot be written (unwritable directory, a non-bundle in the way...)."""


def json_safe(value: Any) -> Any:
    """Non-finite floats become null so the files stay strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(json_safe(obj), f, indent=1, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _is_bundle_or_empty(path: Path) -> bool:
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    if not names:
        return True
    try:
        status = json.loads((path / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(status, dict) and status.get("format") == RESULT_FORMAT


class BundleWriter:
    def __init__(self, output_dir: Path) -> None:
        self.final = Path(output_dir).absolute()
        self.staging = self.final.parent / f".{self.final.name}.tmp-{os.getpid()}"

    def open(self) -> Path:
        """Create the staging directory (BundleError if the output location is unusable)."""
        if self.final.exists() and not _is_bundle_or_empty(self.final):
            raise BundleError(f"output_dir {self.final} exists and is not a result bundle; "
                              "remove it or choose another output_dir")
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            if self.staging.exists():
                shutil.rmtree(self.staging)
            self.staging.mkdir()
        except OSError as exc:
            raise BundleError(f"cannot create the result bundle beside {self.final}: "
                              f"{exc.strerror or exc}") from exc
        return self.staging

    def commit(self, job_id: str | None, status: str, reason: str, metrics: dict[str, Any]) -> Path:
        """Write metrics.json, then status.json, then rename the staging directory into place."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        try:
            for name in SCRATCH_FILES:
                (self.staging / name).unlink(missing_ok=True)
            if status != "ok":
                (self.staging / "weights.npz").unlink(missing_ok=True)  # only a finished run has weights
            _write_json(self.staging / "metrics.json", {"format": METRICS_FORMAT, "version": BUNDLE_VERSION,
                                                        "job_id": job_id, **metrics})
            _write_json(self.staging / "status.json", {"format": RESULT_FORMAT, "version": BUNDLE_VERSION,
                                                       "job_id": job_id, "status": status, "reason": reason})
            old = None
            if self.final.exists():  # a previous bundle (checked in open): swap, then delete it
                old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
                os.rename(self.final, old)
            os.rename(self.staging, self.final)
            _fsync_dir(self.final.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            raise BundleError(f"cannot write the result bundle {self.final}: {exc.strerror or exc}") from exc
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
